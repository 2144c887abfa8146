"""Speed of gate learning and of the merged net, against plain training.

Run from the repository root::

    python benchmarks/speed.py            # about 10 minutes on 2 CPU cores
    python benchmarks/speed.py --threads 1  # on a busy machine
    python benchmarks/speed.py --quick    # a smoke run, nothing written

Everything is measured side by side in one process, repeat after repeat, so
that the ratios hold on a noisy machine: each repeat times every contender
once, in a shuffled order, and a ratio is the median over repeats of the
ratio within a repeat (the speed of the 2-core virtual machine of the recorded
runs drifts by up to a third over minutes; contenders timed within seconds of
each other see the same speed). The ratio of the contenders' fastest repeats
is shown beside it. The speed section of
``benchmarks/RESULTS.md`` (between the lines ``<!-- speed:start -->`` and
``<!-- speed:end -->``) is rewritten; the rest of the file is left as it is.

Members are copies of one skorch net trained on MNIST-1D, each with its
weights perturbed: the time of a merge does not depend on how good its members
are. Peak memory is the peak of live torch CPU allocations during ``fit``,
read from ``torch.profiler``'s memory events.
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skorch import NeuralNetClassifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sk_softmerge import SoftMergeClassifier  # noqa: E402

DATA = Path(__file__).with_name("mnist1d.npz")
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- speed:start -->", "<!-- speed:end -->"
N_MEMBERS = (2, 5, 10)
BATCH_SIZE = 64
TARGETS = {"epoch": 1.2, "predict": 1.05, "growth": 1.3}


def load_mnist1d():
    """MNIST-1D as float32 arrays, generated once and cached next to this file."""
    if not DATA.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        np.savez(DATA, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
    d = np.load(DATA)
    return (
        d["x"].astype(np.float32),
        d["y"].astype(np.int64),
        d["x_test"].astype(np.float32),
    )


class MLP(torch.nn.Sequential):
    def __init__(self):
        super().__init__(
            torch.nn.Linear(40, 100),
            torch.nn.ReLU(),
            torch.nn.Linear(100, 100),
            torch.nn.ReLU(),
            torch.nn.Linear(100, 10),
        )


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv1d(1, 25, 5, stride=2, padding=2),
            torch.nn.ReLU(),
            torch.nn.Conv1d(25, 25, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv1d(25, 25, 3, stride=2, padding=1),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(25 * 5, 10)

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def skorch_net(module, max_epochs):
    return NeuralNetClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=max_epochs,
        batch_size=BATCH_SIZE,
        train_split=None,
        device="cpu",
        verbose=0,
    )


def make_members(module_class, X, y, n_members, seed=0):
    torch.manual_seed(seed)
    first = skorch_net(module_class, 3).fit(X, y)
    members = [first]
    for _ in range(n_members - 1):
        member = copy.deepcopy(first)
        with torch.no_grad():
            for p in member.module_.parameters():
                p.add_(0.05 * p.std() * torch.randn_like(p))
        members.append(member)
    return members


def plain_epochs(module, X, y, n_epochs):
    """The floor: a plain PyTorch loop, Adam, same data and batch size."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(n_epochs):
        for batch in torch.randperm(len(X)).split(BATCH_SIZE):
            loss = loss_fn(module(X[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(contenders, repeats, seed=0):
    """Time every contender once per repeat, after one warm-up each.

    The order within a repeat is shuffled, so that no contender always runs
    after the same one (a cache or allocator state left by the previous
    contender would otherwise bias its time the same way in every repeat).
    """
    for fn in contenders.values():
        fn()
    rng = np.random.default_rng(seed)
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name in rng.permutation(list(contenders)):
            times[name].append(timed(contenders[name]))
    return times


def paired_ratio(times, num, den):
    """Median over repeats of the ratio within a repeat."""
    pairs = zip(times[num], times[den], strict=True)
    return statistics.median(a / b for a, b in pairs)


def epoch_times(arch, module_class, data, members, n_epochs, repeats):
    X, y, _ = data
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y)
    blocks = {}
    for n_members in N_MEMBERS:

        def merge(n_members=n_members, max_epochs=n_epochs):
            # Every epoch over the same samples as the plain loop: no folds.
            SoftMergeClassifier(
                members[:n_members],
                max_epochs=max_epochs,
                batch_size=BATCH_SIZE,
                cv=None,
                validation_fraction=0,
                device="cpu",
                random_state=0,
            ).fit(X, y)

        def merge_one_epoch(n_members=n_members):
            merge(n_members, max_epochs=1)

        def plain():
            plain_epochs(copy.deepcopy(members[0].module_), X_t, y_t, n_epochs)

        def skorch():
            skorch_net(copy.deepcopy(members[0].module_), n_epochs).fit(X, y)

        contenders = {"merge": merge, "plain": plain, "skorch": skorch}
        if n_epochs > 1:  # the set-up is what a fit costs beyond its epochs
            contenders["merge_one_epoch"] = merge_one_epoch
        blocks[n_members] = paired(contenders, repeats, seed=n_members)
        print(arch, n_members, blocks[n_members], flush=True)
    rows = []
    for n_members, times in blocks.items():
        setup = 0.0
        if n_epochs > 1:
            one, whole = min(times["merge_one_epoch"]), min(times["merge"])
            setup = one - (whole - one) / (n_epochs - 1)
        rows.append(
            {
                "arch": arch,
                "K": n_members,
                "merge_ms": 1e3 * statistics.median(times["merge"]) / n_epochs,
                "plain_ms": 1e3 * statistics.median(times["plain"]) / n_epochs,
                "skorch_ms": 1e3 * statistics.median(times["skorch"]) / n_epochs,
                "setup_ms": 1e3 * setup,
                "vs_plain": paired_ratio(times, "merge", "plain"),
                "vs_plain_fastest": min(times["merge"]) / min(times["plain"]),
                "vs_skorch": paired_ratio(times, "merge", "skorch"),
            }
        )
        print(rows[-1], flush=True)
    return rows


def predict_times(arch, data, members, repeats, n_calls=10):
    X, y, X_test = data
    merged = SoftMergeClassifier(
        members[:5], max_epochs=1, batch_size=BATCH_SIZE, device="cpu", random_state=0
    ).fit(X, y)
    if type(merged.merged_net_.module_) is not type(members[0].module_):
        raise AssertionError("the merged net must be a plain net of the members' kind")

    def calls(fn):
        return lambda: [fn() for _ in range(n_calls)]

    contenders = {
        "estimator": calls(lambda: merged.predict_proba(X_test)),
        "merged_net": calls(lambda: merged.merged_net_.predict_proba(X_test)),
        "member": calls(lambda: members[0].predict_proba(X_test)),
    }
    for n_members in N_MEMBERS:
        contenders[f"ensemble{n_members}"] = calls(
            lambda n_members=n_members: np.mean(
                [m.predict_proba(X_test) for m in members[:n_members]], axis=0
            )
        )
    times = paired(contenders, repeats)
    row = {
        "arch": arch,
        "member_ms": 1e3 * statistics.median(times["member"]) / n_calls,
        "estimator": paired_ratio(times, "estimator", "member"),
        "merged_net": paired_ratio(times, "merged_net", "member"),
    }
    for k in N_MEMBERS:
        row[f"ensemble{k}"] = paired_ratio(times, f"ensemble{k}", "member")
    print(row, flush=True)
    return row


def peak_bytes(fn):
    """Peak of live torch CPU allocations while ``fn`` runs, above the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    events = [e for e in events if e.name() == "[memory]"]
    live = np.cumsum([e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())])
    return int(max(live.max(initial=0), 0))


def memory(arch, data, members):
    X, y, _ = data
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y)
    n_weights = sum(p.numel() for p in members[0].module_.parameters())
    plain = peak_bytes(
        lambda: plain_epochs(copy.deepcopy(members[0].module_), X_t, y_t, 1)
    )
    rows = []
    for n_members in N_MEMBERS:
        peak = peak_bytes(
            lambda n_members=n_members: SoftMergeClassifier(
                members[:n_members],
                max_epochs=1,
                batch_size=BATCH_SIZE,
                cv=None,
                validation_fraction=0,
                device="cpu",
                random_state=0,
            ).fit(X, y)
        )
        rows.append(
            {
                "arch": arch,
                "K": n_members,
                "peak_kib": peak / 1024,
                "stack_kib": 4 * n_members * n_weights / 1024,
                "net_kib": 4 * n_weights / 1024,
                "plain_peak_kib": plain / 1024,
            }
        )
        print(rows[-1], flush=True)
    return rows


SCALE_WIDTHS = {"1M": 1000, "10M": 3140}
"""Hidden widths of the MLP 40-w-w-10 with about 1 and 10 million weights."""
SCALE_MEMBERS = (2, 5, 10)
SCALE_SAMPLES = 2000
SCALE_MORE_DATA = [("1M", 5, 50_000)]
"""(net, K, samples): cases also run on more data, where a copy of the data or
of an epoch's gate noise would show."""
SCALE_START, SCALE_END = "<!-- memory-scale:start -->", "<!-- memory-scale:end -->"


def scale_fit(
    label, n_members, n_samples=SCALE_SAMPLES, max_epochs=2, with_members=False
):
    """A default fit of ``n_members`` forks of the MLP ``label`` of
    ``SCALE_WIDTHS`` on random data, as a function to call, and the number of
    weights of one member; then, ``with_members``, the members and the data."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_samples, 40)).astype(np.float32)
    y = rng.integers(0, 10, n_samples)
    width = SCALE_WIDTHS[label]
    module = torch.nn.Sequential(
        torch.nn.Linear(40, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )
    torch.manual_seed(0)
    shared = skorch_net(module, max_epochs=1).fit(X[:SCALE_SAMPLES], y[:SCALE_SAMPLES])
    members = []
    for _ in range(n_members):
        member = copy.deepcopy(shared)
        with torch.no_grad():
            for p in member.module_.parameters():
                p.add_(0.01 * torch.randn_like(p))
        members.append(member)

    def fit():
        SoftMergeClassifier(
            members, max_epochs=max_epochs, device="cpu", random_state=0
        ).fit(X, y)

    n_weights = sum(p.numel() for p in shared.module_.parameters())
    if with_members:
        return fit, n_weights, members, (X, y)
    return fit, n_weights


def memory_at_scale():
    """Peak of a default fit (cross-fitting on) of MLPs of about 1M and 10M
    weights, K = 2, 5, 10, against one stack of the members' weights."""
    cases = [(net, k, SCALE_SAMPLES) for net in SCALE_WIDTHS for k in SCALE_MEMBERS]
    rows = []
    for label, n_members, n_samples in cases + SCALE_MORE_DATA:
        fit, n_weights = scale_fit(label, n_members, n_samples)
        start = time.perf_counter()
        peak = peak_bytes(fit)
        stack = 4 * n_members * n_weights
        rows.append(
            {
                "net": label,
                "weights": n_weights,
                "K": n_members,
                "samples": n_samples,
                "peak_mib": peak / 2**20,
                "stack_mib": stack / 2**20,
                "ratio": peak / stack,
                "seconds": time.perf_counter() - start,
            }
        )
        print(rows[-1], flush=True)
    return rows


def peak_breakdown(fn, top=12):
    """The tensors alive at the peak of ``fn``'s torch CPU allocations: lines
    of their size and of the calls that allocated them, largest first.

    Tensors are followed through ``torch.profiler``'s memory profile (an
    internal API of torch); allocations it cannot tie to a tensor are left out.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile, TensorKey

    with profile(
        activities=[ProfilerActivity.CPU],
        profile_memory=True,
        with_stack=True,
        record_shapes=True,
    ) as prof:
        fn()
    live, total, peak, at_peak = {}, 0, 0, {}
    for time_ns, action, (key, _), size in MemoryProfile(
        prof.profiler.kineto_results
    ).timeline:
        if not isinstance(key, TensorKey):
            continue
        if action == Action.CREATE:
            live[key] = (size, time_ns)
            total += size
        elif action == Action.DESTROY and key in live:
            total -= live.pop(key)[0]
        if total > peak:
            peak, at_peak = total, dict(live)
    calls = [e for e in prof.profiler.kineto_results.events() if e.name() != "[memory]"]
    lines = [f"peak {peak / 2**20:.2f} MiB of tensors"]
    for size, time_ns in sorted(at_peak.values(), reverse=True)[:top]:
        enclosing = sorted(
            (e for e in calls if e.start_ns() <= time_ns <= e.end_ns()),
            key=lambda e: e.start_ns(),
        )
        ours = [e.name() for e in enclosing if "sk_softmerge/" in e.name()]
        where = " > ".join(name.split("sk_softmerge/")[-1] for name in ours[-2:])
        lines.append(f"{size / 2**20:7.3f} MiB  {where} > {enclosing[-1].name()}")
    return lines


def memory_scale_section(rows, command, breakdown):
    lines = [
        SCALE_START,
        "### Peak memory of a default fit at 1M and 10M weights",
        "",
        f"`{command}` ({torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}). MLP 40-w-w-10 members (forks of one net), "
        "2,000 samples of 40 features unless stated; "
        "`SoftMergeClassifier(members, max_epochs=2, "
        'device="cpu", random_state=0)`, every other parameter at its default '
        "(neuron gates, cross-fitting on two folds): the peak does not depend on "
        "the number of epochs. Peak: live torch CPU allocations during `fit` "
        "(`torch.profiler` memory events), above what existed before; stack: one "
        "float32 copy of all members' weights. Target (issue 17): peak / stack at "
        "most 1.5 for K = 5 and 10 (on 2,000 samples).",
        "",
        "| net | weights | K | samples | peak MiB | stack MiB | peak / stack "
        "| target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        targeted = r["K"] in (5, 10) and r["samples"] == SCALE_SAMPLES
        target = verdict(r["ratio"] <= 1.5) if targeted else "-"
        lines.append(
            f"| {r['net']} | {r['weights']:,} | {r['K']} | {r['samples']:,} "
            f"| {r['peak_mib']:.1f} | {r['stack_mib']:.1f} | {r['ratio']:.2f} "
            f"| {target} |"
        )
    lines += [
        "",
        "Where the peak lies, 1M weights, K = 5 (`python benchmarks/speed.py "
        "--memory-breakdown`: the tensors alive at the peak, largest first, and "
        "the calls that allocated them):",
        "",
        "```",
        *breakdown,
        "```",
        "",
        "The peak falls in the backward pass of a gate-training step, where "
        "autograd gathers the merged weights' gradients into one flat buffer "
        "(`cat`) while the gradient of the 1000 x 1000 weight matrix (95% of a "
        "member) still exists: the stack plus about two members' worth. The "
        "merged weights themselves are gone by then: the large `nn.Linear` "
        "lets go of its merged weight once its input's gradient is formed, "
        "before it forms the weight's gradient (`_fastpath._LetGoLinear`); "
        "autograd's own node holds both, which put the stack, the merged "
        "weights, that gradient and a batch's activations together at 1.46 "
        "stacks before any bookkeeping. The reduction's index plan is kept in "
        "int16/int32 for a stack reduced in chunks, the data and gate noise "
        "are prepared about one step at a time at this size, and the fixed "
        "rules' one-member gates are expanded columns, not (K, units) "
        "tensors. Where the largest tensor is a smaller share of a member, or "
        "with more members, the ratio is lower (the rows above). Neither the "
        "data nor an epoch's gate noise is copied whole (a fold's samples are "
        "gathered a few steps at a time from the whole data), and evaluations "
        "run a few training batches at a time, so that more samples add little "
        "(last row; before these changes, the fit of that row peaked at 69.6 "
        "MiB, 3.47 stacks, with `max_epochs=1, refit=False`).",
        SCALE_END,
    ]
    return "\n".join(lines)


def verdict(ok):
    return "met" if ok else "**missed**"


def report(epochs, predicts, memories, settings, command):
    lines = [
        START,
        "## Speed",
        "",
        f"Command: `{command}`. {settings}",
        "",
        "### Gate-learning epoch (whole `fit` time / epochs, set-up included)",
        "",
        "Fits use `cv=None, validation_fraction=0`, so that every epoch covers "
        "the same samples as the plain loop (the default cross-fitting runs two "
        "folds' epochs, then the final ones, each with one forward pass over the "
        "fold left out; `benchmarks/quality.py` measures a default fit's cost "
        "in trainings of one member). "
        "Each fit runs the estimator's default number of epochs; `set-up` is what "
        "a fit costs beyond its epochs (a one-epoch fit less the time of one "
        "epoch, both the fastest of the repeats). Each repeat times every "
        "contender once, in a shuffled order; a ratio is the median over repeats "
        "of the ratio within a repeat, times are medians; `(fastest)` is the "
        "ratio of the fastest repeats, shown for the noise. "
        "`plain` is one epoch of a plain PyTorch loop (Adam, batch 64) over one "
        "member, `skorch` one epoch of `NeuralNetClassifier.fit` on the same "
        "data.",
        "",
        "| net | K | merge ms/epoch | plain ms/epoch | skorch ms/epoch "
        "| merge / plain | (fastest) | merge / skorch | set-up ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in epochs:
        lines.append(
            f"| {r['arch']} | {r['K']} | {r['merge_ms']:.1f} | {r['plain_ms']:.1f} "
            f"| {r['skorch_ms']:.1f} | {r['vs_plain']:.2f} "
            f"| {r['vs_plain_fastest']:.2f} | {r['vs_skorch']:.2f} "
            f"| {r['setup_ms']:.0f} |"
        )
    lines += ["", "Growth: ratio (merge / plain) at K over the ratio at K=2.", ""]
    lines += ["| net | " + " | ".join(f"K={k}" for k in N_MEMBERS) + " |"]
    lines += ["|---|" + "---|" * len(N_MEMBERS)]
    growth = {}
    for arch in dict.fromkeys(r["arch"] for r in epochs):
        rows = {r["K"]: r["vs_plain"] for r in epochs if r["arch"] == arch}
        growth[arch] = {k: rows[k] / rows[N_MEMBERS[0]] for k in N_MEMBERS}
        cells = " | ".join(f"{growth[arch][k]:.2f}" for k in N_MEMBERS)
        lines.append(f"| {arch} | {cells} |")
    lines += [
        "",
        "### Predict time (`predict_proba` on the 1,000 test samples)",
        "",
        "Relative to one member's `predict_proba`; `estimator` is "
        "`SoftMergeClassifier.predict_proba` (input validation included), "
        "`merged_net_` the fitted skorch net it wraps; the ensembles average the "
        "members' probabilities.",
        "",
        "| net | member ms | estimator | merged_net_ | "
        + " | ".join(f"ensemble of {k}" for k in N_MEMBERS)
        + " |",
        "|---|---|---|---|" + "---|" * len(N_MEMBERS),
    ]
    for r in predicts:
        cells = " | ".join(f"{r[f'ensemble{k}']:.2f}" for k in N_MEMBERS)
        lines.append(
            f"| {r['arch']} | {r['member_ms']:.2f} | {r['estimator']:.3f} "
            f"| {r['merged_net']:.3f} | {cells} |"
        )
    lines += [
        "",
        "### Peak memory of `fit` (one epoch)",
        "",
        "Peak of live torch CPU allocations during `fit`, above what existed before "
        "(`torch.profiler` memory events); `stack` is one stacked copy of the members' "
        "parameters (K x weights x 4 bytes), `net` one copy of a member's parameters, "
        "`plain` the peak of one epoch of the plain loop (its parameters already "
        "existed).",
        "",
        "| net | K | peak KiB | stack KiB | net KiB | plain-loop peak KiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in memories:
        lines.append(
            f"| {r['arch']} | {r['K']} | {r['peak_kib']:.0f} | {r['stack_kib']:.0f} "
            f"| {r['net_kib']:.0f} | {r['plain_peak_kib']:.0f} |"
        )
    mlp5 = next(r for r in epochs if r["arch"] == "MLP" and r["K"] == 5)
    worst_predict = max(r["estimator"] for r in predicts)
    worst_growth = max(g[N_MEMBERS[-1]] for g in growth.values())
    lines += [
        "",
        "### Against the targets",
        "",
        f"- Gate-learning epoch at K=5, MLP, batch 64, within "
        f"{TARGETS['epoch']}x of the plain epoch: measured "
        f"{mlp5['vs_plain']:.2f}x ({mlp5['vs_skorch']:.2f}x a skorch epoch): "
        f"{verdict(mlp5['vs_plain'] <= TARGETS['epoch'])}.",
        f"- Predict time of the merged net within {TARGETS['predict']}x of one "
        f"member's: worst measured {worst_predict:.3f}x through the estimator: "
        f"{verdict(worst_predict <= TARGETS['predict'])}.",
        f"- Ratio at K={N_MEMBERS[-1]} no more than {TARGETS['growth']}x the ratio "
        f"at K={N_MEMBERS[0]}: worst measured {worst_growth:.2f}x: "
        f"{verdict(worst_growth <= TARGETS['growth'])}.",
        "",
        "What the numbers come from (analysis of this implementation, measured "
        "once piece by piece, not re-measured by each run):",
        "",
        "- Epoch: fits run the estimator's defaults: since 2026-11-30 neuron "
        "gates (one gate per member and output unit, 210 units for the MLP and "
        "85 for the CNN, against 3 and 4 with layer gates) and 60 epochs. A "
        "training step draws the gates and forms every merged weight in one "
        "autograd node with a hand-written backward (hard-concrete sample, "
        "convex weights, a blocked reduction over the flat stack), then runs "
        "the template with the merged tensors in its parameters' places; the L0 "
        "penalty's gradient is added in closed form, and Adam on the log-alphas "
        "is six tensor operations. `sk_softmerge/_core/_fastpath.py` states the "
        "computation and lists each of these pieces with its measured gain. "
        "Per step (MLP, K=5, batch 64, 1 thread, best of 25 interleaved runs of "
        "3 epochs of `learn_gates`, measured when the fast path was fenced): "
        "0.80 ms with neuron gates, 0.65 ms with layer gates, the same as the "
        "code before that change (0.81 and 0.65 ms). The epoch target (1.2x, "
        "met at 1.18x with the former default, layer gates) and the growth "
        "target are missed at the new default on the MLP; on the CNN, whose "
        "plain step costs more, the ratio stays near 1.06. The set-up (member "
        "checks, screening, the held-out comparison of the fixed rules: every "
        "member, the uniform average and the soups of the greedy search; the "
        "merged net) is in the `set-up` column, and is included in "
        "`merge ms/epoch`.",
        "- Predict: `merged_net_` is a plain skorch net of the members' class "
        "and predicts at a member's cost (the `merged_net_` column); the "
        "estimator adds scikit-learn input validation, a fixed cost per call "
        "that matters only for small inputs. Ratios are medians over 11 repeats "
        "of 10 calls each; `merged_net_` and the member run the same operations, "
        "so the spread of that column around 1 is the noise of the measure.",
        "- Memory: the peak holds, besides the stack, the reduction's transient "
        "product (stack-sized for these small stacks, reduced in one chunk, and "
        "freed before the next operation; at most half a member's worth for a "
        "large stack, see the section above), nothing stack-sized kept for "
        "backward, a few steps' shuffled data and gate noise, a subsample of `X` "
        "for the fixed rules' scores (without a held-out part), and the "
        "activations of the evaluation passes (four training batches at a time: "
        "the fixed rules, the batch-norm statistics), which dominate for the "
        "CNN. A reduction without the transient product (batched matrix "
        "products) was measured 2-4x slower on CPU.",
        "- Timings on this machine are noisy (a virtual machine with 2 cores): "
        "a repeat of the run can move a ratio by 0.2, and any other job running "
        "at the same time more; the recorded run used `--threads 1` with "
        "nothing else running.",
        "",
        "GPU: see the GPU check section below (`benchmarks/gpu_check.py`).",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(section):
    text = RESULTS.read_text() if RESULTS.exists() else f"# Results\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, no write")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--memory-scale",
        action="store_true",
        help="only the peak memory of fits at 1M and 10M weights",
    )
    parser.add_argument(
        "--memory-breakdown",
        action="store_true",
        help="only the tensors alive at the peak of the fit of 1M weights, K=5",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_breakdown:
        fit, _ = scale_fit("1M", 5)
        print("\n".join(peak_breakdown(fit)))
        return
    if args.memory_scale:
        rows = memory_at_scale()
        command = "python benchmarks/speed.py --memory-scale" + (
            f" --threads {args.threads}" if args.threads else ""
        )
        breakdown = peak_breakdown(scale_fit("1M", 5)[0])
        section = memory_scale_section(rows, command, breakdown)
        print(section)
        text = RESULTS.read_text()
        if SCALE_START in text:
            head, rest = text.split(SCALE_START, 1)
            text = head + section + rest.split(SCALE_END, 1)[1]
        else:
            text = text.replace(START, section + "\n\n" + START, 1)
        RESULTS.write_text(text)
        return
    # Fits run the estimator's default number of epochs, as a user's fit does.
    n_epochs = SoftMergeClassifier([]).max_epochs
    n_epochs, repeats, predict_repeats = (2, 1, 1) if args.quick else (n_epochs, 7, 11)

    data = load_mnist1d()
    archs = {"MLP": MLP, "CNN": CNN}
    members = {a: make_members(c, *data[:2], max(N_MEMBERS)) for a, c in archs.items()}
    epochs, predicts, memories = [], [], []
    for arch in archs:
        epochs += epoch_times(arch, archs[arch], data, members[arch], n_epochs, repeats)
    for arch in archs:
        predicts.append(predict_times(arch, data, members[arch], predict_repeats))
    for arch in archs:
        memories += memory(arch, data, members[arch])

    settings = (
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"load average {os.getloadavg()[0]:.1f} at the end; {n_epochs} epochs per "
        f"fit, {repeats} repeats, MNIST-1D (4,000 training samples)."
    )
    command = "python benchmarks/speed.py" + (
        f" --threads {args.threads}" if args.threads else ""
    )
    section = report(epochs, predicts, memories, settings, command)
    print(section)
    if not args.quick:
        write_section(section)


if __name__ == "__main__":
    main()
