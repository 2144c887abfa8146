"""The demo behind ``python -m sk_softmerge``.

Trains a small MLP on scikit-learn's bundled digits, forks five members from it
(each trained further on its own bootstrap sample of 70% of the training data),
merges them on the whole training data (so that the merge's validation check
sees samples the members did not), and prints how the merge compares with each
member, uniform weight averaging and an output ensemble on the test data.
"""

import copy
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

from ._classifier import SoftMergeClassifier
from ._merging import SoftMerge
from ._nets import build_merged_net


def _forked_members(X, y, n_members, seed):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    shared = NeuralNetClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        lr=0.2,
        max_epochs=2,
        batch_size=64,
        train_split=None,
        verbose=0,
    ).fit(X, y)
    rng = np.random.default_rng(seed)
    members = []
    for _ in range(n_members):
        member = copy.deepcopy(shared).set_params(max_epochs=10)
        sample = rng.integers(0, len(X), len(X))
        members.append(member.partial_fit(X[sample], y[sample]))
    return members


def main(n_members: int = 5, seed: int = 0) -> None:
    """Run the demo and print the comparison table.

    Parameters
    ----------
    n_members : int, default=5
        Number of members to train and merge.
    seed : int, default=0
        Seed of data split, members and merge.
    """
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, stratify=y, random_state=seed
    )
    X_members, _, y_members, _ = train_test_split(
        X_train, y_train, test_size=0.3, stratify=y_train, random_state=seed
    )
    start = time.perf_counter()
    members = _forked_members(X_members, y_members, n_members, seed)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    merge = SoftMergeClassifier(members, random_state=seed).fit(X_train, y_train)
    merge_seconds = time.perf_counter() - start

    average = build_merged_net(
        members[0],
        SoftMerge([m.module_ for m in members]).merged_state_dict(),
        members[0].classes_,
    )
    ensemble = np.mean([m.predict_proba(X_test) for m in members], axis=0)

    rows = [(f"member {k}", m.score(X_test, y_test)) for k, m in enumerate(members)]
    rows += [
        ("uniform weight averaging", average.score(X_test, y_test)),
        (
            f"output ensemble ({n_members} passes)",
            np.mean(ensemble.argmax(1) == y_test),
        ),
        ("SoftMerge (1 pass)", merge.score(X_test, y_test)),
    ]
    print(
        f"Digits, {len(X_train)} train / {len(X_test)} test samples; {n_members} MLP "
        f"members forked from one short pre-training on {len(X_members)} of the "
        f"train samples ({train_seconds:.1f} s).\n"
        f"Gates learned on the train samples in {merge_seconds:.1f} s, from the "
        f"{merge.start_}; epoch kept: {merge.best_epoch_} of {merge.n_iter_} (0: no "
        "epoch beat the start significantly on the held-out fifth); open gates: "
        f"{int((merge.gates_ > 0).sum())}/{merge.gates_.size}; kept: {merge.selected_}."
        "\n"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  test accuracy")
    for name, score in rows:
        print(f"{name:<{width}}  {score:.4f}")
