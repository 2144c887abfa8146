"""Data and members for the benchmarks: bundled data, small nets, forked members.

Nothing is downloaded: MNIST-1D is generated offline by the ``mnist1d`` package
(and cached under ``benchmarks/.cache``), digits ships with scikit-learn.
"""

import copy
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

CACHE = Path(__file__).parent / ".cache"


def mnist1d():
    """MNIST-1D: 4,000 train / 1,000 test samples, 40 features, 10 classes."""
    path = CACHE / "mnist1d.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        CACHE.mkdir(exist_ok=True)
        np.savez(path, **{k: data[k] for k in ("x", "y", "x_test", "y_test")})
    data = np.load(path)
    return (
        data["x"].astype(np.float32),
        data["x_test"].astype(np.float32),
        data["y"],
        data["y_test"],
    )


def digits(seed=0):
    """scikit-learn's digits, scaled to [0, 1]: 1,257 train / 540 test samples."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)


def mlp(n_features, n_classes, hidden=100):
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, n_classes),
    )


class CNN1d(torch.nn.Module):
    """A small 1-D CNN for MNIST-1D (inputs of shape (n, 40))."""

    def __init__(self, n_classes=10, channels=32):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv1d(1, channels, 5, padding=2),
            torch.nn.ReLU(),
            torch.nn.Conv1d(channels, channels, 3, padding=1, stride=2),
            torch.nn.ReLU(),
            torch.nn.Conv1d(channels, channels, 3, padding=1, stride=2),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(channels * 10, n_classes)

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def forked_members(
    module,
    X,
    y,
    *,
    n_members=5,
    seed=0,
    shared_epochs=5,
    member_epochs=20,
    lr=1e-3,
    batch_size=64,
):
    """Members forked from one short shared training, each on a bootstrap sample.

    Returns the list of fitted skorch nets.
    """
    torch.manual_seed(seed)
    shared = NeuralNetClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=lr,
        max_epochs=shared_epochs,
        batch_size=batch_size,
        train_split=None,
        verbose=0,
    ).fit(X, y)
    rng = np.random.default_rng(seed)
    members = []
    for _ in range(n_members):
        member = copy.deepcopy(shared).set_params(max_epochs=member_epochs)
        sample = rng.integers(0, len(X), len(X))
        members.append(member.partial_fit(X[sample], y[sample]))
    return members


def corrupt(member, how):
    """A copy of ``member`` with weights scaled by 1e3 (``"scaled"``) or a NaN."""
    member = copy.deepcopy(member)
    with torch.no_grad():
        for p in member.module_.parameters():
            if how == "scaled":
                p.mul_(1e3)
            elif how == "nan":
                p.view(-1)[0] = float("nan")
            else:
                raise ValueError(f"how must be 'scaled' or 'nan'; got {how!r}.")
    return member
