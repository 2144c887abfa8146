"""Merge quality against the methods a user would pick instead.

Run from the project root::

    python benchmarks/quality.py              # 3 seeds, all scenarios below
    python benchmarks/quality.py --seeds 0 --scenarios a e
    python benchmarks/quality.py --independent  # members from independent inits
    python benchmarks/quality.py --independent --seeds 1 --json i1.json  # likewise
    python benchmarks/quality.py --seeds 1 --json s1.json   # seeds in parallel,
    python benchmarks/quality.py --summarise s0.json s1.json  # then one table
    python benchmarks/quality.py --scenarios k --seeds 0 --json k0.json  # (k) only
    python benchmarks/quality.py --summarise k0.json k1.json  # its section only

Scenarios (5 members each, forked from one short shared training, each member
trained further on its own bootstrap sample of the training data):

    a  MNIST-1D MLP
    b  as (a), one member's weights scaled by 1e3
    c  as (a), one member holding a NaN
    d  scikit-learn digits MLP
    e  MNIST-1D 1-D CNN
    f  MNIST-1D MLP, members of unequal quality: the last 3 of 5 trained on
       labels replaced by a random class with probability 0.6
    g  MNIST-1D MLP, non-IID members: each member's bootstrap sample draws
       two classes of its own 8 times as often as the others
    h  MNIST-1D 1-D CNN, three stride-2 Conv1d + ReLU blocks, no batch norm
    i  scikit-learn diabetes MLP regressor (SoftMergeRegressor)
    j  Friedman #1 MLP regressor (SoftMergeRegressor)
    k  token sequences (``motif_sequences``: 5 classes, 20 tokens of a
       vocabulary of 50, the class is the motif bigram seen most often), a
       2-layer transformer encoder on token and position embeddings, mean
       over positions, linear head (``TokenTransformer``); int64 token ids

In (f), (g), (h) and (k) the members (the shared training included) see 70% of
the training data, stratified, and every merge is fit on all of it, so that the
gates and their check see samples the members did not. Every method sees the
same training data. The baselines that choose (best member, greedy soup) choose
on a 20% of it (stratified for classification), the share a user would hold out;
SoftMerge cross-fits on all of it. Accuracies (R^2 for the regression
scenarios) are on the untouched test set. Results go to
``benchmarks/RESULTS.md`` (classification between the quality markers,
regression between the regression markers, (k) between the token markers, with
its per-seed values) and ``benchmarks/quality.json``
(``benchmarks/regression.json``). A run, or a ``--summarise``, rewrites only the
sections of the scenarios it holds: one of (k) alone leaves the quality section
and ``quality.json`` as they are.

With ``--independent``, the scenarios of ``_independent.py`` run instead: five
members per seed, each from its own random initialisation, for four
architectures, averaged and merged without alignment, weight-matched and
activation-matched, with and without REPAIR (written between the alignment
markers).
"""

import argparse
import copy
import json
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _independent import (
    MEMBER_SHARE,
    METHODS,
    VARIANTS,
    format_scores,
    format_table,
    format_widths,
    scenarios_independent_init,
    scenarios_widths,
)
from _members import (
    CNN1d,
    TokenTransformer,
    corrupt,
    diabetes,
    digits,
    favoured_classes,
    forked_members,
    friedman1,
    mlp,
    mnist1d,
    motif_sequences,
    noisy_labels,
)
from sklearn.model_selection import GridSearchCV, train_test_split

from sk_softmerge import SoftMergeClassifier, SoftMergeRegressor
from sk_softmerge.baselines import (
    BestMemberClassifier,
    BestMemberRegressor,
    FisherMergeClassifier,
    FisherMergeRegressor,
    GreedySoupClassifier,
    GreedySoupRegressor,
    LearnedSoupClassifier,
    LearnedSoupRegressor,
    OutputEnsembleClassifier,
    OutputEnsembleRegressor,
    RegMeanClassifier,
    RegMeanRegressor,
    UniformSoupClassifier,
    UniformSoupRegressor,
)

HERE = Path(__file__).parent
SCENARIOS = {
    "a": "MNIST-1D MLP",
    "b": "MNIST-1D MLP, one member x1e3",
    "c": "MNIST-1D MLP, one member NaN",
    "d": "digits MLP",
    "e": "MNIST-1D CNN",
    "f": "MNIST-1D MLP, unequal quality",
    "g": "MNIST-1D MLP, non-IID",
    "h": "MNIST-1D CNN, stride 2, 70% data",
    "i": "diabetes MLP regressor",
    "j": "Friedman #1 MLP regressor",
    "k": "token motifs, 2-layer transformer",
}
REGRESSION = "ij"
TOKENS = "k"
"""Scenarios of token sequences, written to their own section of RESULTS.md."""
TOKEN_EPOCHS = (10, 20)
"""Shared and per-member training epochs of (k) (Adam, learning rate 3e-3)."""
REGRESSION_EPOCHS = {"i": (10, 10), "j": (10, 20)}
"""Shared and per-member training epochs of the regression scenarios."""
DATA_AWARE = ["RegMean", "Fisher merge", "learned soup"]
"""The published data-aware merges (issue 25), fixed rules too: defaults,
fit on the held-out 20% as the other fixed rules."""
FIXED_RULES = ["best member", "uniform soup", "greedy soup", *DATA_AWARE]
COLUMNS = [
    *FIXED_RULES,
    "best fixed rule",
    "output ensemble",
    "SoftMerge",
    "SoftMerge tuned",
    "SoftMerge layer",
]
SUMMARY_COLUMNS = ["best fixed rule", "output ensemble", "SoftMerge"]
L0_GRID = [0.0, 1e-2, 1e-1, 1.0]
TUNED = "adeij"
"""Scenarios where GridSearchCV also tunes l0_weight."""
L0_SWEEP = "gh"
"""Scenarios where every l0_weight of L0_GRID is fit and recorded."""
MEMBER_EPOCHS = 25
"""Epochs of the member training that a default fit's cost is measured in."""
ROOM = 1.0
"""Points (x 100 R^2) by which the output ensemble must beat the best fixed
rule for a scenario to count in "captured"."""


def members_for(scenario, seed, cache):
    """Training data, test data and members of a scenario (members cached)."""
    if scenario in REGRESSION:
        data = diabetes(seed) if scenario == "i" else friedman1(seed)
        X_train, _, y_train, _ = data
        torch.manual_seed(seed)  # the shared start's initialisation
        members = forked_members(
            mlp(X_train.shape[1], 1),
            X_train,
            y_train,
            seed=seed,
            shared_epochs=REGRESSION_EPOCHS[scenario][0],
            member_epochs=REGRESSION_EPOCHS[scenario][1],
            regression=True,
        )
        return (*data, members)
    if scenario in TOKENS:
        data = motif_sequences(seed)
        return (*data, members_on_70_percent(scenario, seed, data[0], data[2]))
    if scenario in "fgh":
        X_train, X_test, y_train, y_test = mnist1d()
        members = members_on_70_percent(scenario, seed, X_train, y_train)
        return X_train, X_test, y_train, y_test, members
    if scenario in "abce":
        X_train, X_test, y_train, y_test = mnist1d()
    else:
        X_train, X_test, y_train, y_test = digits(seed)
    kind = {"d": "digits", "e": "cnn"}.get(scenario, "mlp")
    if (kind, seed) not in cache:
        # Seeded here, so that a seed's members do not depend on what ran
        # before in the process (--seeds 0 1 2 in one run or one per process).
        torch.manual_seed(seed)
        module = CNN1d() if kind == "cnn" else mlp(X_train.shape[1], 10)
        cache[kind, seed] = forked_members(
            module,
            X_train,
            y_train,
            seed=seed,
            shared_epochs=10,
            member_epochs=10 if kind == "cnn" else 20,
        )
    members = list(cache[kind, seed])
    if scenario == "b":
        members[2] = corrupt(members[2], "scaled")
    if scenario == "c":
        members[2] = corrupt(members[2], "nan")
    return X_train, X_test, y_train, y_test, members


def members_on_70_percent(scenario, seed, X_train, y_train):
    """Members of (f), (g), (h) or (k), trained on a stratified 70% of the
    training data (MNIST-1D's; the motif sequences' for (k))."""
    X, _, y, _ = train_test_split(
        X_train, y_train, test_size=0.3, stratify=y_train, random_state=seed
    )
    torch.manual_seed(seed)
    if scenario in TOKENS:
        # A trial with 40 member epochs (seed 0, a draft of the data with more
        # label noise) gave no better members.
        return forked_members(
            TokenTransformer(n_classes=int(y.max()) + 1),
            X,
            y,
            seed=seed,
            shared_epochs=TOKEN_EPOCHS[0],
            member_epochs=TOKEN_EPOCHS[1],
            lr=3e-3,
        )
    if scenario == "h":
        # A short shared training and long member trainings: members that
        # differ, whose output ensemble beats every weight average.
        module, sample, epochs = CNN1d(strides=(2, 2, 2)), None, (5, 40)
    else:
        module, epochs = mlp(X.shape[1], 10), (10, 20)
        sample = noisy_labels(n_clean=2) if scenario == "f" else favoured_classes()
    return forked_members(
        module,
        X,
        y,
        seed=seed,
        shared_epochs=epochs[0],
        member_epochs=epochs[1],
        sample=sample,
    )


def rules_split(scenario, seed, X_train, y_train):
    """The training data split into the 80% the fixed rules leave and the
    (stratified, for classifiers) 20% they are chosen on or fit on."""
    regression = scenario in REGRESSION
    return train_test_split(
        X_train,
        y_train,
        test_size=0.2,
        stratify=None if regression else y_train,
        random_state=seed,
    )


def run_scenario(scenario, seed, cache):
    X_train, X_test, y_train, y_test, members = members_for(scenario, seed, cache)
    regression = scenario in REGRESSION
    _, X_val, _, y_val = rules_split(scenario, seed, X_train, y_train)
    baselines = [
        ("best member", BestMemberRegressor, BestMemberClassifier),
        ("uniform soup", UniformSoupRegressor, UniformSoupClassifier),
        ("greedy soup", GreedySoupRegressor, GreedySoupClassifier),
        ("RegMean", RegMeanRegressor, RegMeanClassifier),
        ("Fisher merge", FisherMergeRegressor, FisherMergeClassifier),
        ("learned soup", LearnedSoupRegressor, LearnedSoupClassifier),
        ("output ensemble", OutputEnsembleRegressor, OutputEnsembleClassifier),
    ]
    row = {}
    for name, Regressor, Classifier in baselines:
        Baseline = Regressor if regression else Classifier
        model = Baseline(members)
        if "random_state" in model.get_params():
            model.set_params(random_state=seed)
        start = time.perf_counter()
        model.fit(X_val, y_val)
        row[f"{name} seconds"] = time.perf_counter() - start
        row[name] = model.score(X_test, y_test)
    row["best fixed rule"] = max(row[name] for name in FIXED_RULES)

    SoftMerge = SoftMergeRegressor if regression else SoftMergeClassifier
    start = time.perf_counter()
    merge = SoftMerge(members, random_state=seed).fit(X_train, y_train)
    row["fit seconds"] = time.perf_counter() - start
    row["member seconds"] = member_training_seconds(members[0], X_train, y_train)
    row["cost"] = row["fit seconds"] / row["member seconds"]
    row["SoftMerge"] = merge.score(X_test, y_test)
    row["selected"] = merge.selected_
    row["start, best epoch"] = f"{merge.start_}, {merge.best_epoch_}"
    row["closed gates of member 2"] = bool((merge.gates_[2] == 0).all())
    if regression or scenario in TOKENS:
        row["members"] = [float(m.score(X_test, y_test)) for m in members]

    layer = SoftMerge(members, granularity="layer", random_state=seed)
    row["SoftMerge layer"] = layer.fit(X_train, y_train).score(X_test, y_test)

    if scenario in TUNED:
        search = GridSearchCV(
            SoftMerge(members, random_state=seed),
            {"l0_weight": L0_GRID},
            cv=2,
        ).fit(X_train, y_train)
        row["SoftMerge tuned"] = search.score(X_test, y_test)
        row["tuned l0_weight"] = search.best_params_["l0_weight"]
    if scenario in L0_SWEEP:
        row["l0_weight sweep"] = {}
        for l0_weight in L0_GRID:
            swept = SoftMerge(members, l0_weight=l0_weight, random_state=seed)
            swept.fit(X_train, y_train)
            row["l0_weight sweep"][str(l0_weight)] = {
                "score": swept.score(X_test, y_test),
                "open gates": float((swept.gates_ > 0).mean()),
                "best epoch": swept.best_epoch_,
            }
    return row


def member_training_seconds(member, X, y):
    """Wall time of training one member's architecture for ``MEMBER_EPOCHS``
    epochs with skorch (batch 64, Adam, its criterion) on ``(X, y)``: the unit
    of the "cost" column (in this process, with its threads)."""
    net = type(member)(
        copy.deepcopy(member.module_),
        criterion=type(member.criterion_),
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=MEMBER_EPOCHS,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    start = time.perf_counter()
    net.fit(X, y)
    return time.perf_counter() - start


def summarise(results, percent=True):
    """Markdown table: mean and spread over seeds, the edge over the best
    fixed rule and the share of the ensemble's gain over it that was captured.

    Accuracies are shown in %, R^2 (``percent=False``) with three decimals;
    the edge in percentage points (R^2 points x 100 for regression).
    """
    lines = [
        "| scenario | "
        + " | ".join(COLUMNS)
        + " | edge | captured | fit s | cost"
        + " | start, epoch kept, selected (per seed) |",
        "| --- |" + " --- |" * (len(COLUMNS) + 5),
    ]
    for scenario, rows in results.items():
        cells = []
        means = {}
        for column in COLUMNS:
            values = [r[column] for r in rows if column in r]
            if not values:
                cells.append("-")
                continue
            means[column] = np.mean(values)
            if percent:
                cells.append(f"{100 * means[column]:.1f} ± {100 * np.std(values):.1f}")
            else:
                cells.append(f"{means[column]:.3f} ± {np.std(values):.3f}")
        seconds = np.mean([r["fit seconds"] for r in rows])
        edge, captured = edge_and_captured(rows)
        captured = "-" if captured is None else f"{captured:+.0%}"
        fits = "; ".join(f"{r['start, best epoch']}, {r['selected']}" for r in rows)
        lines.append(
            f"| ({scenario}) {SCENARIOS[scenario]} | "
            + " | ".join(cells)
            + f" | {edge:+.2f} | {captured} | {seconds:.1f} | {cost(rows)} | {fits} |"
        )
    return "\n".join(lines)


def edge_and_captured(rows):
    """SoftMerge minus the best fixed rule, in points (x 100), on the means;
    and that edge as a share of the output ensemble's gain over the best fixed
    rule (``None`` where the ensemble beats it by less than ``ROOM`` points)."""
    mean = {c: 100 * np.mean([r[c] for r in rows]) for c in SUMMARY_COLUMNS}
    edge = mean["SoftMerge"] - mean["best fixed rule"]
    room = mean["output ensemble"] - mean["best fixed rule"]
    return edge, edge / room if room >= ROOM else None


def cost(rows):
    """Mean over seeds of the default fit's time over one member's training
    ("-" for rows measured before the column existed)."""
    costs = [r["cost"] for r in rows if "cost" in r]
    return f"{np.mean(costs):.2f}" if costs else "-"


def write_section(section, start, end, after=None):
    """Put ``section`` (markers included) in RESULTS.md in place of the part
    from ``start`` to ``end``; when there is none, insert it after the line
    ``after`` (where given and present), else append it."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start not in text:
        if after and after in text:
            head, tail = text.split(after, 1)
            text = f"{head}{after}\n\n{start}\n{end}{tail}"
        else:
            text += f"\n{start}\n{end}\n"
    before, rest = text.split(start)
    _, after = rest.split(end)
    path.write_text(before + section + after)


def write_results(table, results, seeds, command=None, everything=None):
    start, end = "<!-- quality:start -->", "<!-- quality:end -->"
    rows = [r for rows in results.values() for r in rows]
    fallbacks = sum(r["selected"] != "soft merge" for r in rows)
    learned = sum(not r["start, best epoch"].endswith(", 0") for r in rows)
    command = command or "python benchmarks/quality.py --seeds " + " ".join(
        map(str, seeds)
    )
    section = f"""{start}
## Quality

`{command}` (2 CPU cores,
torch {torch.__version__}). Test accuracy in %, mean ± standard deviation over
{len(seeds)} seeds; 5 members per scenario. The fixed rules (best member,
uniform soup, greedy soup) choose on a stratified 20% of the training data,
and the data-aware merges of `sk_softmerge.baselines` (RegMean, Fisher merge,
learned soup, each at its defaults, seeded) are fit on that 20%; "best fixed
rule" is, in each seed, the best of these six on the test set (a bound no
choice made without the test set can promise). "SoftMerge" is
`SoftMergeClassifier(members, random_state=seed)` with every other parameter at
its default; "tuned" picks `l0_weight` in {L0_GRID} by `GridSearchCV(cv=2)`
(scenarios {", ".join(TUNED)}); "layer" is `granularity="layer"`. "edge" is
SoftMerge minus the best fixed rule in points, "captured" that edge over the
output ensemble's gain on the best fixed rule, both on the means, where that gain
is at least {ROOM:g} point ("-" elsewhere). "fit s" is the default SoftMerge's
fit time, "cost" that time over the time of training one member's architecture
for {MEMBER_EPOCHS} epochs (skorch, Adam, batch 64, on the same training data, in
the same process and threads; mean over seeds). SoftMerge needs no held-out
part: it cross-fits its gates on all the training data (`cv=2`). The last
column gives, for every seed, the rule the gates started from, the epochs kept
(0: no epoch beat the start significantly out of fold, so the merge is that
rule) and what was finally selected. The learned gates were kept in {learned}
of {len(rows)} default fits; the final check fell back to a fixed rule in
{fallbacks}.

{table}

{against_targets(results, everything)}

{fit_times(everything or results)}

{l0_sweep(results)}

Per-seed values are in `benchmarks/quality.json`.
{end}"""
    write_section(section, start, end)
    (HERE / "quality.json").write_text(json.dumps(results, indent=1, default=str))


def against_targets(results, everything=None):
    """The targets of issues 13 and 23, checked on the means over seeds
    (percentage points; x 100 R^2 for regression). ``everything`` holds the
    results of every scenario that ran (the token and regression ones too)."""
    everything = everything or results

    def mean(scenario, column):
        return 100 * float(np.mean([row[column] for row in everything[scenario]]))

    lines = ["Against the targets (means over seeds, percentage points):", ""]
    edges = {s: edge_and_captured(rows)[0] for s, rows in everything.items()}
    worst = min(edges, key=edges.get)
    lines.append(
        f"- Every scenario at least the best fixed rule minus 0.3 (issue 23; "
        f"{len(edges)} scenarios, regression in R^2 x 100): the lowest edge is "
        f"({worst}) {edges[worst]:+.2f} "
        f"({'met' if edges[worst] >= -0.3 else 'missed'})."
    )
    for name in DATA_AWARE:
        gaps = {
            s: mean(s, "SoftMerge") - mean(s, name)
            for s, rows in everything.items()
            if all(name in r for r in rows)
        }
        if gaps:
            lowest = min(gaps, key=gaps.get)
            lines.append(
                f"- SoftMerge at least {name} minus 0.3 on every scenario (issue 25; "
                f"{len(gaps)} scenarios): the lowest is ({lowest}) "
                f"{gaps[lowest]:+.2f} ({'met' if gaps[lowest] >= -0.3 else 'missed'})."
            )
    shares = {s: edge_and_captured(rows)[1] for s, rows in everything.items()}
    shares = {s: share for s, share in shares.items() if share is not None}
    if shares:
        mean_share = float(np.mean(list(shares.values())))
        listed = ", ".join(f"({s}) {share:+.0%}" for s, share in shares.items())
        lines.append(
            f"- Mean share captured over the scenarios with room (the output "
            f"ensemble at least {ROOM:g} point above the best fixed rule): "
            f"{mean_share:+.0%} over {listed} "
            f"({'met' if mean_share >= 0.75 else 'missed'}: target 75%)."
        )
    alike = [s for s in "ade" if s in everything]
    if alike:
        gaps = {s: mean(s, "SoftMerge") - mean(s, "uniform soup") for s in alike}
        lines.append(
            "- Alike members at least the uniform soup minus 0.2: "
            + ", ".join(f"({s}) {gap:+.2f}" for s, gap in gaps.items())
            + f" ({'met' if min(gaps.values()) >= -0.2 else 'missed'})."
        )
    costs = {
        s: float(np.mean([r["cost"] for r in rows]))
        for s, rows in everything.items()
        if all("cost" in r for r in rows)
    }
    if costs:
        highest = max(costs, key=costs.get)
        verdict = (
            "met, stretch 0.5 met too"
            if costs[highest] <= 0.5
            else "met; stretch 0.5 missed"
            if costs[highest] <= 1.0
            else "missed"
        )
        lines.append(
            f"- Cost (default fit over one member's {MEMBER_EPOCHS}-epoch "
            f"training) at most 1.0 on every scenario: highest ({highest}) "
            f"{costs[highest]:.2f}, mean {np.mean(list(costs.values())):.2f} "
            f"({verdict})."
        )
    for s, what in (("b", "scaled by 1e3"), ("c", "holding a NaN")):
        if s in results and "a" in results:
            closed = sum(r["closed gates of member 2"] for r in results[s])
            change = mean(s, "SoftMerge") - mean("a", "SoftMerge")
            lines.append(
                f"- ({s}) with member 2 {what}, SoftMerge {mean(s, 'SoftMerge'):.1f} "
                f"against {mean('a', 'SoftMerge'):.1f} on the clean members "
                f"({change:+.1f}; {'met' if abs(change) <= 1 else 'missed'}: "
                f"within one point); member 2's gates ended closed on every unit "
                f"in {closed} of {len(results[s])} seeds; the uniform soup fell "
                f"from {mean('a', 'uniform soup'):.1f} to "
                f"{mean(s, 'uniform soup'):.1f}."
            )
    return "\n".join(lines)


def fit_times(everything):
    """Mean fit seconds of the data-aware baselines (on the held-out 20%) and
    of the default SoftMerge (on all the training data), every scenario."""
    names = [*DATA_AWARE, "SoftMerge"]
    lines = [
        "Fit time in seconds, mean over seeds (the data-aware baselines on the "
        "held-out 20%, SoftMerge on all the training data):",
        "",
        "| scenario | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for scenario, rows in everything.items():
        if not all(f"{DATA_AWARE[0]} seconds" in r for r in rows):
            continue
        keys = [f"{name} seconds" for name in DATA_AWARE] + ["fit seconds"]
        cells = [f"{np.mean([r[k] for r in rows]):.2f}" for k in keys]
        lines.append(
            f"| ({scenario}) {SCENARIOS[scenario]} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def l0_sweep(results):
    """Accuracy and share of open gates against l0_weight, where swept."""
    lines = [
        "Default fits with each `l0_weight` (test accuracy %, share of open gates, "
        "mean over seeds):",
        "",
        "| scenario | " + " | ".join(f"l0_weight={w}" for w in L0_GRID) + " |",
        "| --- |" + " --- |" * len(L0_GRID),
    ]
    swept = [s for s in results if "l0_weight sweep" in results[s][0]]
    for s in swept:
        cells = []
        for weight in L0_GRID:
            fits = [r["l0_weight sweep"][str(weight)] for r in results[s]]
            score = 100 * np.mean([f["score"] for f in fits])
            share = np.mean([f["open gates"] for f in fits])
            cells.append(f"{score:.1f}, {share:.2f} open")
        lines.append(f"| ({s}) {SCENARIOS[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if swept else ""


def unaligned_edge(scores):
    """Points of unaligned SoftMerge over the best member chosen held out."""
    return 100 * (np.mean(scores["SoftMerge"]) - np.mean(scores["best member"]))


def write_independent(results, seeds, command):
    aligned = [f"SoftMerge{suffix}" for suffix, align, _ in VARIANTS if align]
    notes = []
    for architecture, scores in results.items():
        mean = {method: 100 * np.mean(scores[method]) for method in METHODS}
        gap = mean["mean member"] - mean["uniform soup, activation-matched + REPAIR"]
        gap_weights = (
            mean["mean member"] - mean["uniform soup, weight-matched + REPAIR"]
        )
        best = mean["best member"]
        edges = ", ".join(f"{name} {mean[name] - best:+.1f}" for name in aligned)
        worst = min(
            100 * (np.asarray(scores[name]) - np.asarray(scores["best member"])).min()
            for name in aligned
        )
        notes.append(
            f"- {architecture}: the activation-matched, repaired uniform soup is "
            f"{gap:.1f} points below the mean member (weight-matched, repaired: "
            f"{gap_weights:.1f}); against the best member "
            f"chosen on the held-out fifth, {edges} (lowest single seed of an "
            f"aligned SoftMerge: {worst:+.1f})."
        )
    for architecture, scores in results.items():
        for suffix, _, _ in VARIANTS:
            name = f"SoftMerge{suffix}"
            runs = scores.get(f"{name}: start, epoch, kept", [])
            seconds = scores.get(f"{name}: fit seconds", [])
            if runs:
                notes.append(
                    f"- {architecture}, {name}: start, epoch kept, selected per "
                    "seed: "
                    + "; ".join(runs)
                    + f"; fit {min(seconds):.1f}-{max(seconds):.1f} s."
                )
    section = "\n".join(
        [
            "<!-- alignment:start -->",
            "## Members from independent initialisations (MNIST-1D)",
            "",
            f"`{command}` (2 CPU cores, `OMP_NUM_THREADS=1`, seeds in parallel). "
            "Five members per seed, each from its own random initialisation, "
            f"trained on a stratified {MEMBER_SHARE:.0%} of the 4,000 training "
            "samples (as in scenarios f-h); every merge is fit on all 4,000. "
            "Architectures: MLP 40-100-100-10 and 40-512-512-10; CNN: three "
            "Conv1d-BatchNorm-ReLU blocks of 16 or 64 channels, flatten, linear. "
            "Test accuracy in % on the 1,000 test samples, mean over seeds, then "
            "each seed. 'best member' is chosen on the stratified fifth of the "
            "training data that SoftMerge holds out by default; 'best member on "
            "test' is the best on the test set itself (a bound for any choice "
            "made without it). Uniform soups: the plain average of the members, "
            "as they are or aligned (weight-matched, activation-matched; "
            "`align_modules`), with REPAIR where named (the same code as "
            "SoftMerge's `repair`); batch-norm statistics of every soup are "
            "recomputed on the training data, which in the CNNs, where every "
            "hidden unit passes through batch norm, is REPAIR itself. SoftMerge: "
            "default parameters with the `align` named and `repair=False`, "
            "except '+ REPAIR' (`repair=True`, as the default `\"auto\"` does "
            "with `align` set).",
            "",
            format_table(results),
            "",
            *notes,
            "",
            "Reading: every merge started from one member alone in every seed "
            "(`start_` above): even aligned and repaired, the uniform average of "
            "five independently trained members of these widths stays well below "
            "the best member on the held-out fifth. Width is what closes the gap "
            "(next table): the same CNN falls 6.4 points below its mean member at "
            "64 channels, 3.1 at 128 and 1.1 at 256, and two members of 64 "
            "channels already lose 3.2; no other change of the matching was found "
            "to do as much (the closing note of issue 15 lists what was tried). "
            "What lifts SoftMerge "
            "above the best member is the gates refining that member with units "
            "of the others and the 30% of samples the members did not see, and "
            "it does so unaligned too (unaligned SoftMerge: "
            + ", ".join(
                f"{architecture} {unaligned_edge(scores):+.1f}"
                for architecture, scores in results.items()
            )
            + " against the best member). Weight matching gives better averages "
            "than activation matching here except on the narrow CNN; REPAIR lifts "
            "the aligned MLP averages by up to 3.5 points and is the batch-norm "
            "recomputation in the CNNs.",
            "<!-- alignment:end -->",
        ]
    )
    write_section(section, "<!-- alignment:start -->", "<!-- alignment:end -->")


def run_independent(args, run, write, flags, json_name):
    """A run of the ``--independent`` scenarios: ``run(seeds=...)`` gives
    ``{key: {name: [value per seed]}}``, ``write(results, seeds, command)``
    writes its RESULTS section; with ``--json`` the rows go to that file
    instead (``json_name``, such as ``iN.json``, in the command written), and
    ``--summarise`` writes the section from such files."""
    base = f"python benchmarks/quality.py {flags}"
    if args.summarise:
        parts = [json.loads(Path(path).read_text()) for path in args.summarise]
        seeds = [seed for part in parts for seed in part["seeds"]]
        results = {}
        for part in parts:
            for key, scores in part["results"].items():
                merged = results.setdefault(key, {})
                for name, values in scores.items():
                    merged.setdefault(name, []).extend(values)
        command = (
            f"{base} --seeds N --json {json_name}` for each seed N, then `{base} "
            "--summarise " + " ".join(args.summarise)
        )
        write(results, seeds, command)
        return
    results = run(seeds=args.seeds)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"seeds": args.seeds, "results": results}, indent=1)
        )
        return
    write(results, args.seeds, f"{base} --seeds " + " ".join(map(str, args.seeds)))


def write_widths(results, seeds, command):
    # Widths are keys of the JSON files, read back as strings.
    results = dict(sorted((int(width), scores) for width, scores in results.items()))
    section = "\n".join(
        [
            "<!-- alignment-width:start -->",
            "### How far the aligned average falls below its members, by width",
            "",
            f"`{command}` (2 CPU cores, `OMP_NUM_THREADS=1`, seeds in parallel). "
            "The CNN of the table above (three Conv1d-BatchNorm-ReLU blocks) with "
            "64 (the 'wide CNN'), 128 and 256 channels; five members per seed from "
            "their own initialisations, trained as above on the stratified "
            f"{MEMBER_SHARE:.0%}; alignment (`align_modules`) and batch-norm "
            "recomputation (REPAIR, in these nets) on all 4,000 training "
            "samples. Test accuracy and points below the mean member, mean over "
            "seeds, then each seed. The last column: for each of the 10 pairs of "
            "members, their activation-matched, repaired average against their "
            "mean, averaged over the pairs.",
            "",
            format_widths(results),
            "<!-- alignment-width:end -->",
        ]
    )
    write_section(
        section,
        "<!-- alignment-width:start -->",
        "<!-- alignment-width:end -->",
        after="<!-- alignment:end -->",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--independent", action="store_true")
    parser.add_argument(
        "--widths",
        action="store_true",
        help="with --independent: only the aligned averages of CNNs of several widths",
    )
    parser.add_argument(
        "--member-epochs",
        type=int,
        help="epochs of each regression member after the fork (default: "
        + ", ".join(f"({k}) {v[1]}" for k, v in REGRESSION_EPOCHS.items())
        + ")",
    )
    parser.add_argument(
        "--json", help="only write this run's per-seed rows to this JSON file"
    )
    parser.add_argument(
        "--summarise",
        nargs="+",
        metavar="JSON",
        help="write RESULTS.md from the rows of earlier --json runs",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    if args.member_epochs:
        for scenario, (shared, _) in REGRESSION_EPOCHS.items():
            REGRESSION_EPOCHS[scenario] = (shared, args.member_epochs)
    if args.independent:
        if args.widths:
            run, write = scenarios_widths, write_widths
            flags, json_name = "--independent --widths", "wN.json"
        else:
            run, write = scenarios_independent_init, write_independent
            flags, json_name = "--independent", "iN.json"
        run_independent(args, run, write, flags, json_name)
        return
    if args.summarise:
        results, seeds = {}, []
        for path in args.summarise:
            part = json.loads(Path(path).read_text())
            seeds += part["seeds"]
            for scenario, rows in part["results"].items():
                results.setdefault(scenario, []).extend(rows)
        command = summarise_command(args.summarise, list(results))
        write_all(results, sorted(seeds), args.member_epochs, command)
        return
    cache, results = {}, {s: [] for s in args.scenarios}
    for seed in args.seeds:
        for scenario in args.scenarios:
            start, cpu = time.perf_counter(), time.process_time()
            row = run_scenario(scenario, seed, cache)
            row["seed"] = seed
            row["scenario seconds"] = time.perf_counter() - start
            row["scenario CPU seconds"] = time.process_time() - cpu
            results[scenario].append(row)
            print(
                f"seed {seed} ({scenario}) {time.perf_counter() - start:.0f} s: "
                + format_scores(row),
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"seeds": args.seeds, "results": results})
        )
        return
    write_all(results, args.seeds, args.member_epochs)


def summarise_command(paths, scenarios):
    """The commands behind a ``--summarise`` of ``paths``: one run per seed,
    then this one (as invoked)."""
    script = sys.argv[0]
    # Run from benchmarks/ (the JSON files there), or from the project root.
    where = "cd benchmarks && " if Path(script).parent == Path() else ""
    names = {re.sub(r"\d+(?=\.json$)", "N", Path(path).name) for path in paths}
    name = names.pop() if len(names) == 1 else "FILE.json"
    chosen = (
        ""
        if set(scenarios) == set(SCENARIOS)
        else " --scenarios " + " ".join(sorted(scenarios))
    )
    return (
        f"{where}OMP_NUM_THREADS=1 python {script}{chosen} --seeds N --json "
        f"{name}` for each seed N, in parallel, then `python {script} --summarise "
        + " ".join(paths)
    )


def write_all(results, seeds, member_epochs=None, command=None):
    """Print and write the tables of the scenarios in ``results``: the quality
    section (a-h), the token section (k), the regression section (i, j); a
    section whose scenarios did not run is left as it is."""
    classification = {k: v for k, v in results.items() if k not in REGRESSION + TOKENS}
    tokens = {k: v for k, v in results.items() if k in TOKENS}
    regression = {k: v for k, v in results.items() if k in REGRESSION}
    if classification:
        table = summarise(classification)
        print(table)
        write_results(table, classification, seeds, command, results)
    if tokens:
        table = summarise(tokens)
        print(table)
        write_tokens(table, tokens, seeds, command)
    if regression:
        table = summarise(regression, percent=False)
        print(table)
        write_regression(table, regression, seeds, member_epochs, command)


def write_tokens(table, results, seeds, command=None):
    """The token section: (k)'s table, its data and members, every seed."""
    start, end = "<!-- token:start -->", "<!-- token:end -->"
    rows = [r for rows in results.values() for r in rows]
    fallbacks = sum(r["selected"] != "soft merge" for r in rows)
    learned = sum(not r["start, best epoch"].endswith(", 0") for r in rows)
    if command is None:
        threads = os.environ.get("OMP_NUM_THREADS")
        command = ("OMP_NUM_THREADS=" + threads + " " if threads else "") + (
            "python " + shlex.join(sys.argv)
        )
    columns = [
        *FIXED_RULES,
        "output ensemble",
        "SoftMerge",
        "SoftMerge layer",
    ]
    per_seed = [
        "| scenario | seed | members | "
        + " | ".join(columns)
        + " | start, epoch kept, selected | fit s | scenario s (CPU s) |",
        "| --- |" + " --- |" * (len(columns) + 5),
    ]
    edges, gains = [], []
    for scenario, scenario_rows in results.items():
        for row in scenario_rows:
            members = " / ".join(f"{100 * m:.1f}" for m in row["members"])
            scores = " | ".join(f"{100 * row[c]:.1f}" for c in columns)
            seconds = row.get("scenario seconds")
            timing = (
                f"{seconds:.0f} ({row['scenario CPU seconds']:.0f})"
                if seconds is not None
                else "-"
            )
            edges.append(100 * (row["SoftMerge"] - row["best fixed rule"]))
            gains.append(100 * (row["output ensemble"] - row["best fixed rule"]))
            per_seed.append(
                f"| ({scenario}) | {row['seed']} | {members} | {scores} | "
                f"{row['start, best epoch']}, {row['selected']} | "
                f"{row['fit seconds']:.1f} | {timing} |"
            )
    per_seed = "\n".join(per_seed)
    section = f"""{start}
## Token sequences, transformer members

`{command}` (2 CPU cores,
torch {torch.__version__}). Test accuracy in %, mean ± standard deviation over
{len(seeds)} seeds; 5 members.

Data (`motif_sequences(seed)` in `benchmarks/_members.py`, generated with NumPy
from the seed, nothing downloaded): 3,000 training and 1,000 test sequences of
20 token ids from a vocabulary of 50, 5 classes. Class c owns two motif
bigrams; among uniform filler tokens, a sequence holds k (1-3) bigrams of its
class, k - 1 of a second class, 0 to k of a third class in reverse order (the
same tokens, which do not count) and 0-2 single motif tokens. The label is the
class whose bigrams occur most often, replaced by a random class with
probability 0.05 (so about 96% is the best any model can expect).

Members (`TokenTransformer` in `benchmarks/_members.py`): token and learned
position embeddings (32 dimensions; without positions the encoder could not see
which token follows which), an `nn.TransformerEncoder` of two post-norm
`nn.TransformerEncoderLayer`s (4 heads, feed-forward 64, dropout 0,
`batch_first=True`, `enable_nested_tensor=False`), the mean over positions and a
linear head; skorch `NeuralNetClassifier`s fed int64 NumPy arrays of shape
(n, 20). Forked from {TOKEN_EPOCHS[0]} epochs of shared training (Adam, learning
rate 3e-3, batch 64), each member then trained {TOKEN_EPOCHS[1]} epochs on its
own bootstrap sample. As in (f)-(h), the members (the shared training included)
see a stratified 70% of the training data and every merge is fit on all of it.

Columns as in the quality section: the fixed rules choose on (the data-aware
ones are fit on) a stratified 20% of the training data, "best fixed rule" is
the best of the six on the test set in each seed, "SoftMerge" is
`SoftMergeClassifier(members, random_state=seed)` with every other parameter at
its default, "layer" is
`granularity="layer"`; no `l0_weight` tuning or sweep for (k). The learned gates
were kept in {learned} of {len(rows)} default fits; the final check fell back to
a fixed rule in {fallbacks}.

{table}

Per seed: every member's test accuracy, the merges', the rule the gates started
from, the epoch kept and what was selected, the default fit's time and the
whole scenario's (members' training, every merge and baseline) in seconds,
wall clock (CPU time of the process). The seeds ran in parallel, three
processes on 2 cores shared with other jobs, so that the wall clock overstates
the time on a free core, the CPU time less so.

{per_seed}

SoftMerge minus the best fixed rule, per seed: {signed(edges)} points; the
output ensemble minus the best fixed rule: {signed(gains)}.
{end}"""
    write_section(section, start, end, after="<!-- quality:end -->")


def signed(values):
    """``values`` with signs and one decimal, separated by commas."""
    return ", ".join(f"{value:+.1f}" for value in values)


def write_regression(table, results, seeds, member_epochs, command=None):
    start, end = "<!-- regression:start -->", "<!-- regression:end -->"
    rows = [r for rows in results.values() for r in rows]
    fallbacks = sum(r["selected"] != "soft merge" for r in rows)
    option = f" --member-epochs {member_epochs}" if member_epochs else ""
    command = command or (
        f"OMP_NUM_THREADS=1 python benchmarks/quality.py --scenarios "
        f"{' '.join(results)} --seeds {' '.join(map(str, seeds))}{option}"
    )
    epochs = ", ".join(
        f"({k}) {REGRESSION_EPOCHS[k][0]} shared + {REGRESSION_EPOCHS[k][1]}"
        for k in results
    )
    section = f"""{start}
## Regression

`{command}` (2 CPU cores, torch {torch.__version__}).
Test R^2, mean ± standard deviation over {len(seeds)} seeds. 5 members per
scenario: MLPs (100-100 hidden units, Adam, mean squared error) forked from one
short shared training, each then trained on its own bootstrap sample of the
training data (epochs: {epochs} per member). Features and target are
standardised on the training part (diabetes: 309 train / 133 test samples;
Friedman #1 with noise 1: 1,400 / 600). "SoftMerge" is
`SoftMergeRegressor(members, random_state=seed)` with every other parameter at
its default; "tuned" picks `l0_weight` in {L0_GRID} by `GridSearchCV(cv=2)`;
"layer" is `granularity="layer"`. Best member and greedy soup choose on a
random 20% of the training data, and RegMean, Fisher merge and learned soup
are fit on it. "edge", "captured" and "cost" are those of the
quality section (edge in R^2 x 100). The out-of-fold check fell back from the
soft merge in {fallbacks} of {len(rows)} default fits.

{table}

Per-seed values, with every member's test R^2, are in `benchmarks/regression.json`.
{end}"""
    write_section(section, start, end)
    (HERE / "regression.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
