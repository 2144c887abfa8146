"""Quality scenarios: merging members trained from independent initialisations.

MNIST-1D (generated offline by the ``mnist1d`` package, cached in a git-ignored
``.npz``), an MLP (40-100-100-10) and a small 1-D CNN with batch norm. For each
seed, five members are trained on the same training set from five different
random initialisations; they are compared with their uniform weight average
(without and with weight-matching alignment), their output ensemble, and
SoftMerge (without and with alignment), all on the 1,000 test samples.
Batch-norm statistics of every weight average are recomputed on the training
data, as SoftMerge does for its merged net.
"""

import copy
import time

import numpy as np
import torch
from _members import mnist1d
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

from sk_softmerge import (
    SoftMergeClassifier,
    align_modules,
    recompute_batchnorm_statistics,
)
from sk_softmerge.baselines import BestMemberClassifier

SEEDS = (0, 1, 2)
N_MEMBERS = 5
METHODS = (
    "best member",
    "best member on test",
    "uniform soup",
    "uniform soup, aligned",
    "output ensemble (5 passes)",
    "SoftMerge",
    "SoftMerge, aligned",
)


def load_mnist1d():
    """MNIST-1D as (X_train, y_train, X_test, y_test)."""
    X_train, X_test, y_train, y_test = mnist1d()
    return X_train, y_train, X_test, y_test


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(40, 100),
        torch.nn.ReLU(),
        torch.nn.Linear(100, 100),
        torch.nn.ReLU(),
        torch.nn.Linear(100, 10),
    )


def cnn():
    def block(n_in, n_out, kernel):
        return [
            torch.nn.Conv1d(n_in, n_out, kernel, stride=2, padding=1),
            torch.nn.BatchNorm1d(n_out),
            torch.nn.ReLU(),
        ]

    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 40)),
        *block(1, 16, 5),
        *block(16, 16, 3),
        *block(16, 16, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 5, 10),
    )


ARCHITECTURES = {
    "MLP": dict(module=mlp, max_epochs=20, lr=2e-3),
    "CNN": dict(module=cnn, max_epochs=15, lr=5e-3),
}


def train_members(architecture, X, y, seed):
    """N_MEMBERS nets of one architecture, each from its own initialisation."""
    spec = ARCHITECTURES[architecture]
    members = []
    for k in range(N_MEMBERS):
        torch.manual_seed(1000 * seed + k)
        net = NeuralNetClassifier(
            spec["module"](),
            criterion=torch.nn.CrossEntropyLoss,
            optimizer=torch.optim.Adam,
            lr=spec["lr"],
            max_epochs=spec["max_epochs"],
            batch_size=128,
            train_split=None,
            verbose=0,
        )
        members.append(net.fit(X, y))
    return members


def _accuracy(module, X, y):
    with torch.no_grad():
        return float((module.eval()(torch.as_tensor(X)).argmax(1).numpy() == y).mean())


def uniform_soup(modules, X):
    """Uniform weight average, with batch-norm statistics recomputed on X."""
    states = [m.state_dict() for m in modules]
    average = {
        name: torch.stack([s[name] for s in states]).mean(0)
        if value.is_floating_point()
        else value
        for name, value in states[0].items()
    }
    soup = copy.deepcopy(modules[0])
    soup.load_state_dict(average)
    return recompute_batchnorm_statistics(soup, torch.as_tensor(X))


def run_scenario(architecture, seed, data):
    """Test accuracy of every method on one architecture and seed."""
    X, y, X_test, y_test = data
    members = train_members(architecture, X, y, seed)
    modules = [net.module_ for net in members]
    aligned = align_modules(modules, torch.as_tensor(X[:2]))
    proba = np.mean([net.predict_proba(X_test) for net in members], axis=0)
    # Chosen as in the other scenarios: on the stratified fifth of the training
    # data that SoftMerge holds out by default.
    _, X_val, _, y_val = train_test_split(
        X, y, test_size=0.2, stratify=y, random_state=seed
    )
    best = BestMemberClassifier(members).fit(X_val, y_val)
    scores = {
        "best member": best.score(X_test, y_test),
        "best member on test": max(net.score(X_test, y_test) for net in members),
        "uniform soup": _accuracy(uniform_soup(modules, X), X_test, y_test),
        "uniform soup, aligned": _accuracy(uniform_soup(aligned, X), X_test, y_test),
        "output ensemble (5 passes)": float((proba.argmax(1) == y_test).mean()),
    }
    for name, align in (("SoftMerge", None), ("SoftMerge, aligned", "weight_matching")):
        merge = SoftMergeClassifier(members, align=align, random_state=seed)
        scores[name] = merge.fit(X, y).score(X_test, y_test)
        scores[f"{name}: start, kept"] = f"{merge.start_}, {merge.selected_}"
    return scores


def scenarios_independent_init(seeds=SEEDS, verbose=True):
    """Run every architecture and seed.

    Returns
    -------
    results : dict
        ``{architecture: {method: [accuracy per seed]}}``.
    """
    data = load_mnist1d()
    results = {}
    for architecture in ARCHITECTURES:
        results[architecture] = {method: [] for method in METHODS}
        for seed in seeds:
            start = time.perf_counter()
            scores = run_scenario(architecture, seed, data)
            seconds = time.perf_counter() - start
            for method, score in scores.items():
                results[architecture].setdefault(method, []).append(score)
            if verbose:
                print(
                    f"{architecture} seed {seed} ({seconds:.0f} s): "
                    + format_scores(scores),
                    flush=True,
                )
    return results


def format_scores(scores):
    """One line: every name with its value, floats to three decimals."""
    return ", ".join(
        f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}"
        for name, value in scores.items()
    )


def format_table(results, seeds=SEEDS):
    """Markdown table: mean test accuracy (and each seed's) per method."""
    lines = [
        "| model | method | mean test accuracy | per seed |",
        "|---|---|---|---|",
    ]
    for architecture, scores in results.items():
        for method in METHODS:
            values = scores[method]
            per_seed = " / ".join(f"{v:.3f}" for v in values)
            lines.append(
                f"| {architecture} | {method} | {np.mean(values):.3f} | {per_seed} |"
            )
    return "\n".join(lines)
