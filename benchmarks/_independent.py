"""Quality scenarios: merging members trained from independent initialisations.

MNIST-1D (generated offline by the ``mnist1d`` package, cached in a git-ignored
``.npz``); four architectures: an MLP 40-100-100-10, a wide MLP 40-512-512-10,
a small 1-D CNN with batch norm (three Conv1d-BatchNorm-ReLU blocks of 16
channels) and a wide one (64 channels). For each seed, five members are
trained from five different random initialisations on one stratified 70% of
the training data (as in scenarios f-h: the held-out fifth of a merge's fit
then holds samples the members did not see); every merge is fit on all of it.
They are compared, on the 1,000 test samples, with their output ensemble, their
uniform weight average unaligned, weight-matched and activation-matched (each
aligned one without and with REPAIR), and SoftMerge with each of these. Batch-norm
statistics of every weight average are recomputed on the training data, as
SoftMerge does for its merged net; where every hidden unit passes through batch
norm (the CNNs), that recomputation is REPAIR and the two columns agree.
"""

import copy
import time

import numpy as np
import torch
from _members import mnist1d
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

from sk_softmerge import SoftMerge, SoftMergeClassifier, align_modules
from sk_softmerge._align._repair import member_moments, repair_sites
from sk_softmerge.baselines import BestMemberClassifier

SEEDS = (0, 1, 2)
N_MEMBERS = 5
MEMBER_SHARE = 0.7
"""Share of the training data the members are trained on (stratified)."""

# (column suffix, align, repair)
VARIANTS = (
    ("", None, False),
    (", weight-matched", "weight_matching", False),
    (", weight-matched + REPAIR", "weight_matching", True),
    (", activation-matched", "activation_matching", False),
    (", activation-matched + REPAIR", "activation_matching", True),
)
METHODS = (
    "best member",
    "best member on test",
    "mean member",
    "output ensemble (5 passes)",
    *(f"uniform soup{suffix}" for suffix, _, _ in VARIANTS),
    *(f"SoftMerge{suffix}" for suffix, _, _ in VARIANTS),
)


def load_mnist1d():
    """MNIST-1D as (X_train, y_train, X_test, y_test)."""
    X_train, X_test, y_train, y_test = mnist1d()
    return X_train, y_train, X_test, y_test


def mlp(width=100):
    return torch.nn.Sequential(
        torch.nn.Linear(40, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def cnn(channels=16):
    def block(n_in, n_out, kernel):
        return [
            torch.nn.Conv1d(n_in, n_out, kernel, stride=2, padding=1),
            torch.nn.BatchNorm1d(n_out),
            torch.nn.ReLU(),
        ]

    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 40)),
        *block(1, channels, 5),
        *block(channels, channels, 3),
        *block(channels, channels, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(channels * 5, 10),
    )


def cnn_spec(channels):
    return dict(module=lambda: cnn(channels), max_epochs=15, lr=5e-3)


ARCHITECTURES = {
    "MLP": dict(module=mlp, max_epochs=20, lr=2e-3),
    "wide MLP": dict(module=lambda: mlp(512), max_epochs=20, lr=2e-3),
    "CNN": cnn_spec(16),
    "wide CNN": cnn_spec(64),
}

WIDTHS = (64, 128, 256)
"""Channels of the CNN in the width sweep (``--independent --widths``)."""


def train_members(architecture, X, y, seed):
    """N_MEMBERS nets of one architecture (a name of ``ARCHITECTURES`` or a
    spec), each from its own initialisation."""
    spec = (
        ARCHITECTURES[architecture] if isinstance(architecture, str) else architecture
    )
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


def uniform_soup(modules, X, repair=False):
    """Uniform weight average, with batch-norm statistics recomputed on X and,
    with ``repair``, its hidden units' statistics brought to the members'
    average (the same code as SoftMerge's)."""
    merger = SoftMerge(modules)
    if repair:
        sites = repair_sites(modules[0], X)
        states = [module.state_dict() for module in modules]
        merger.set_repair(sites, member_moments(modules[0], states, sites, X))
    gates = torch.ones_like(merger.gates())
    soup = copy.deepcopy(modules[0])
    soup.load_state_dict(merger.merged_state_dict(gates, statistics_from=X))
    return soup


def run_scenario(architecture, seed, data):
    """Test accuracy of every method on one architecture and seed."""
    X, y, X_test, y_test = data
    X_members, _, y_members, _ = train_test_split(
        X, y, train_size=MEMBER_SHARE, stratify=y, random_state=seed
    )
    members = train_members(architecture, X_members, y_members, seed)
    modules = [net.module_ for net in members]
    proba = np.mean([net.predict_proba(X_test) for net in members], axis=0)
    # Chosen as in the other scenarios: on the stratified fifth of the training
    # data that SoftMerge holds out by default.
    _, X_val, _, y_val = train_test_split(
        X, y, test_size=0.2, stratify=y, random_state=seed
    )
    best = BestMemberClassifier(members).fit(X_val, y_val)
    member_scores = [net.score(X_test, y_test) for net in members]
    scores = {
        "best member": best.score(X_test, y_test),
        "best member on test": max(member_scores),
        "mean member": float(np.mean(member_scores)),
        "output ensemble (5 passes)": float((proba.argmax(1) == y_test).mean()),
    }
    aligned = {None: modules}
    for method in ("weight_matching", "activation_matching"):
        aligned[method] = align_modules(modules, X, method=method)
    for suffix, align, repair in VARIANTS:
        soup = uniform_soup(aligned[align], X, repair=repair)
        scores[f"uniform soup{suffix}"] = _accuracy(soup, X_test, y_test)
    for suffix, align, repair in VARIANTS:
        merge = SoftMergeClassifier(
            members, align=align, repair=repair, random_state=seed
        )
        start = time.perf_counter()
        scores[f"SoftMerge{suffix}"] = merge.fit(X, y).score(X_test, y_test)
        scores[f"SoftMerge{suffix}: fit seconds"] = time.perf_counter() - start
        scores[f"SoftMerge{suffix}: start, epoch, kept"] = (
            f"{merge.start_}, {merge.best_epoch_}, {merge.selected_}"
        )
    return scores


def run_width(channels, seed, data):
    """How far the aligned, repaired average of five independently trained
    CNNs of ``channels`` channels falls below their mean member, and of every
    pair of them below the pair's mean (activation matching).

    Members, data and soups as in :func:`run_scenario`: members on the
    stratified 70%, alignment and batch-norm recomputation (REPAIR, in these
    nets) on all the training data, test accuracy on the test set.
    """
    X, y, X_test, y_test = data
    X_members, _, y_members, _ = train_test_split(
        X, y, train_size=MEMBER_SHARE, stratify=y, random_state=seed
    )
    members = train_members(cnn_spec(channels), X_members, y_members, seed)
    modules = [net.module_ for net in members]
    accuracy = [_accuracy(module, X_test, y_test) for module in modules]
    scores = {"mean member": float(np.mean(accuracy))}
    for name, method in (
        ("activation-matched", "activation_matching"),
        ("weight-matched", "weight_matching"),
    ):
        soup = uniform_soup(align_modules(modules, X, method=method), X, repair=True)
        scores[f"soup, {name}"] = _accuracy(soup, X_test, y_test)
    pair_gaps = []
    for j in range(N_MEMBERS):
        for k in range(j + 1, N_MEMBERS):
            pair = [modules[j], modules[k]]
            pair = align_modules(pair, X, method="activation_matching")
            soup = uniform_soup(pair, X, repair=True)
            mean = (accuracy[j] + accuracy[k]) / 2
            pair_gaps.append(mean - _accuracy(soup, X_test, y_test))
    scores["pair gap, activation-matched"] = float(np.mean(pair_gaps))
    return scores


def scenarios_widths(seeds=SEEDS, widths=WIDTHS, verbose=True):
    """:func:`run_width` for every width and seed.

    Returns
    -------
    results : dict
        ``{channels: {name: [value per seed]}}``.
    """
    return _every_seed(run_width, widths, seeds, "{} channels", verbose)


def _every_seed(run, keys, seeds, label, verbose):
    """``{key: {name: [value per seed]}}`` from ``run(key, seed, data)``,
    printing each run's scores after ``label.format(key)``."""
    data = load_mnist1d()
    results = {}
    for key in keys:
        results[key] = {}
        for seed in seeds:
            start = time.perf_counter()
            scores = run(key, seed, data)
            for name, value in scores.items():
                results[key].setdefault(name, []).append(value)
            if verbose:
                seconds = time.perf_counter() - start
                print(
                    f"{label.format(key)}, seed {seed} ({seconds:.0f} s): "
                    + format_scores(scores),
                    flush=True,
                )
    return results


def format_widths(results):
    """Markdown table of :func:`scenarios_widths`: points, mean over seeds,
    then each seed's."""

    def cell(values):
        values = 100 * np.asarray(values)
        per_seed = " / ".join(f"{v:.1f}" for v in values)
        return f"**{values.mean():.1f}** ({per_seed})"

    lines = [
        "| channels | mean member | activation-matched + REPAIR: soup "
        "| below the mean member | weight-matched + REPAIR: soup "
        "| below the mean member | 2 members, activation-matched + REPAIR: "
        "below their mean (10 pairs) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for channels, scores in results.items():
        member = np.asarray(scores["mean member"])
        cells = [cell(member)]
        for name in ("activation-matched", "weight-matched"):
            soup = np.asarray(scores[f"soup, {name}"])
            cells += [cell(soup), cell(member - soup)]
        cells.append(cell(scores["pair gap, activation-matched"]))
        lines.append(f"| {channels} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scenarios_independent_init(seeds=SEEDS, architectures=None, verbose=True):
    """Run every architecture and seed.

    Returns
    -------
    results : dict
        ``{architecture: {method: [accuracy per seed]}}``.
    """
    architectures = architectures or list(ARCHITECTURES)
    return _every_seed(run_scenario, architectures, seeds, "{}", verbose)


def format_scores(scores):
    """One line: every name with its value, floats to three decimals."""
    return ", ".join(
        f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}"
        for name, value in scores.items()
    )


def format_table(results):
    """Markdown table: one row per method, one column per architecture; test
    accuracy in %, mean over seeds, then each seed's."""
    architectures = list(results)
    lines = [
        "| method | " + " | ".join(architectures) + " |",
        "| --- |" + " --- |" * len(architectures),
    ]
    for method in METHODS:
        cells = []
        for architecture in architectures:
            values = 100 * np.asarray(results[architecture][method])
            per_seed = " / ".join(f"{v:.1f}" for v in values)
            cells.append(f"**{values.mean():.1f}** ({per_seed})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
