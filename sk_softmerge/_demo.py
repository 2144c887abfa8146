"""The demo behind ``python -m sk_softmerge``.

Trains a small MLP on scikit-learn's bundled digits, forks five members from
it and trains each further on its own skewed bootstrap sample of 70% of the
training data (member ``k`` sees digits ``2k`` and ``2k + 1`` eight times as
often as the others: members that differ). Then merges them on the whole
training data and prints, on the test data, how the merge compares with every
member, every fixed rule a user could pick instead (best member, uniform soup,
greedy soup, each chosen on a held-out fifth of the training data) and the
output ensemble. The merge needs no held-out part: it checks its gates by
cross-fitting on all the training data.
"""

import copy
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

from ._softmerge import SoftMergeClassifier
from .baselines import (
    BestMemberClassifier,
    GreedySoupClassifier,
    OutputEnsembleClassifier,
    UniformSoupClassifier,
)

FAVOURED = 8.0
"""How much more often each member draws its own two digits."""


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
    for k in range(n_members):
        favoured = np.isin(y, [(2 * k) % 10, (2 * k + 1) % 10])
        weights = np.where(favoured, FAVOURED, 1.0)
        rows = rng.choice(len(X), len(X), p=weights / weights.sum())
        member = copy.deepcopy(shared).set_params(max_epochs=10)
        members.append(member.partial_fit(X[rows], y[rows]))
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

    _, X_held, _, y_held = train_test_split(
        X_train, y_train, test_size=0.2, stratify=y_train, random_state=seed
    )
    rules = [
        ("best member", BestMemberClassifier),
        ("uniform soup", UniformSoupClassifier),
        ("greedy soup", GreedySoupClassifier),
    ]
    rows = [(f"member {k}", m.score(X_test, y_test)) for k, m in enumerate(members)]
    rows += [
        (f"{name} (1 pass)", rule(members).fit(X_held, y_held).score(X_test, y_test))
        for name, rule in rules
    ]
    ensemble = OutputEnsembleClassifier(members).fit(X_held, y_held)
    rows += [
        (f"output ensemble ({n_members} passes)", ensemble.score(X_test, y_test)),
        ("SoftMerge (1 pass)", merge.score(X_test, y_test)),
    ]
    print(
        f"Digits, {len(X_train)} train / {len(X_test)} test samples; {n_members} MLP "
        f"members forked from one short pre-training on {len(X_members)} of the "
        "train samples, each then trained on a bootstrap sample that draws two "
        f"digits of its own {FAVOURED:g} times as often ({train_seconds:.1f} s).\n"
        f"Gates learned on all the train samples in {merge_seconds:.1f} s, from the "
        f"{merge.start_}; epochs kept by cross-fitting: {merge.best_epoch_} of "
        f"{merge.max_epochs} (0: no epoch beat the start significantly out of fold); "
        f"open gates: {int((merge.gates_ > 0).sum())}/{merge.gates_.size}; kept: "
        f"{merge.selected_}.\nThe fixed rules choose on a stratified fifth of the "
        "train samples.\n"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  test accuracy")
    for name, score in rows:
        print(f"{name:<{width}}  {score:.4f}")
