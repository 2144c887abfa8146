"""Gate-learning schedules against their cost: how much of the output
ensemble's gain each one captures, and what it costs.

Every schedule is ``SoftMergeClassifier(members, random_state=seed, **params)``
on the members of ``quality.py``'s scenarios, fit on all the training data,
with one of these protocols, named by where the open gates of the start sit
and how long the final gates learn on all the data:

- ``open at 1.5, epochs`` (the default since issue 23): the open gates of the
  start at log-alpha 1.5, the final gates for as many epochs as the folds
  chose;
- ``steps`` (the earlier default): open gates at log-alpha 3, the final gates
  for as many steps as the folds' gates took in the chosen number of epochs
  (half the epochs with ``cv=2``);
- ``epochs``: open gates at 3, final gates for the folds' epochs;
- ``open at 0`` and ``open at 1.5``: open gates at 0 or 1.5, final gates for
  the folds' steps; with ``, epochs``, for their epochs (see :func:`open_at`);
- ``fold average``: open gates at 3, no final learning; the final log-alphas
  are the mean of the folds' at the chosen epoch;
- ``EMA``: ``steps``, but every fit keeps an exponential moving average of
  the log-alphas (a horizon of one epoch's steps), scored and kept in place of
  the last step's;
- ``cosine``: ``steps``, with the learning rate decayed to zero along a
  cosine over each fit's steps;
- ``distilled, epochs``: ``epochs``, with the gates learning toward the
  members' output ensemble as well as the labels (see :func:`distilled`);
- ``open at 0, epochs, accuracy guard``: ``open at 0, epochs``, the learned
  merge kept only if its out-of-fold accuracy is at least its start's (see
  :func:`accuracy_guard`);
- ``cascade``: ``open at 0, epochs``, and where no epoch of it beats the start
  out of fold, ``steps`` (see :func:`cascade`);
- ``calibrated check``: the default, with every out-of-fold loss taken at its
  best temperature (see :func:`calibrated_check`).

All but the default replace private functions of the package for the duration
of a fit (``unittest.mock.patch``): they are experiments, not options. "best
fixed rule" and "output ensemble" are read from ``quality.json`` (per seed, the
same definitions as the quality section of RESULTS.md), and for other seeds
from the rows of ``quality.py --json`` runs given to ``--reference``; "cost" is
the fit's wall time over the training of one member for 25 epochs
(``quality.py``'s unit), in this process::

    cd benchmarks && OMP_NUM_THREADS=1 python schedules.py --scenarios f g h
    python quality.py --seeds 3 4 5 --scenarios h --json h345.json
    python schedules.py --scenarios h --seeds 0 1 2 3 4 5 --reference h345.json

Prints one Markdown row per schedule and scenario: SoftMerge's mean test
accuracy over the seeds, its edge over the best fixed rule, the share captured
(where the ensemble is at least one point above the best fixed rule), the mean
cost, and per seed the epochs chosen and the test accuracy. ``--cache DIR``
keeps every scenario's members between runs.
"""

import argparse
import contextlib
import json
import math
import pickle
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from quality import edge_and_captured, member_training_seconds, members_for

import sk_softmerge._core._training as training
import sk_softmerge._softmerge as softmerge
from sk_softmerge import SoftMergeClassifier
from sk_softmerge._core._merger import INIT_LOG_ALPHA
from sk_softmerge._inputs import call

HERE = Path(__file__).parent

SCHEDULES = {
    "earlier default (cv=2, 12 epochs, lr 0.2, steps)": ({}, "steps"),
    "12 epochs, lr 0.2, epochs": ({}, "epochs"),
    "16 epochs, lr 0.2, epochs": ({"max_epochs": 16}, "epochs"),
    "20 epochs, lr 0.15, epochs": ({"max_epochs": 20, "lr": 0.15}, "epochs"),
    "20 epochs, lr 0.2, steps": ({"max_epochs": 20}, "steps"),
    "24 epochs, lr 0.1, epochs": ({"max_epochs": 24, "lr": 0.1}, "epochs"),
    "30 epochs, lr 0.1, steps": ({"max_epochs": 30, "lr": 0.1}, "steps"),
    "30 epochs, lr 0.1, epochs": ({"max_epochs": 30, "lr": 0.1}, "epochs"),
    "40 epochs, lr 0.05, steps": ({"max_epochs": 40, "lr": 0.05}, "steps"),
    "12 epochs, lr 0.2, fold average": ({}, "fold average"),
    "20 epochs, lr 0.2, fold average": ({"max_epochs": 20}, "fold average"),
    "12 epochs, lr 0.2, EMA": ({}, "EMA"),
    "12 epochs, lr 0.4, EMA": ({"lr": 0.4}, "EMA"),
    "12 epochs, lr 0.3, cosine": ({"lr": 0.3}, "cosine"),
    "20 epochs, lr 0.2, cosine": ({"max_epochs": 20}, "cosine"),
    "12 epochs, lr 0.2, open at 0, steps": ({}, "open at 0"),
    "12 epochs, lr 0.2, open at 0, epochs": ({}, "open at 0, epochs"),
    "activation matching, 12 epochs, lr 0.2, steps": (
        {"align": "activation_matching"},
        "steps",
    ),
    "30 epochs, lr 0.1, batch 256, epochs": (
        {"max_epochs": 30, "lr": 0.1, "batch_size": 256},
        "epochs",
    ),
    "30 epochs, lr 0.15, batch 256, epochs": (
        {"max_epochs": 30, "lr": 0.15, "batch_size": 256},
        "epochs",
    ),
    "30 epochs, lr 0.2, batch 512, epochs": (
        {"max_epochs": 30, "lr": 0.2, "batch_size": 512},
        "epochs",
    ),
    "20 epochs, lr 0.1, batch 256, epochs": (
        {"max_epochs": 20, "lr": 0.1, "batch_size": 256},
        "epochs",
    ),
    "cv=None, 60 epochs, lr 0.05 (the earlier default)": (
        {"cv": None, "max_epochs": 60, "lr": 0.05},
        "steps",
    ),
    "12 epochs, lr 0.2, distilled, epochs": ({}, "distilled, epochs"),
    "12 epochs, lr 0.2, open at 0, epochs, accuracy guard": (
        {},
        "open at 0, epochs, accuracy guard",
    ),
    "12 epochs, lr 0.2, open at 1.5, steps": ({}, "open at 1.5"),
    "12 epochs, lr 0.2, open at 1.5, epochs (the default)": (
        {},
        "open at 1.5, epochs",
    ),
    "12 epochs, lr 0.2, REPAIR, steps": ({"repair": True}, "steps"),
    "12 epochs, lr 0.2, cascade: open at 0, epochs, else the earlier default": (
        {},
        "cascade",
    ),
    "12 epochs, lr 0.2, tensor gates": (
        {"granularity": "tensor"},
        "open at 1.5, epochs",
    ),
    "12 epochs, lr 0.2, layer gates": ({"granularity": "layer"}, "open at 1.5, epochs"),
    "12 epochs, lr 0.2, calibrated check": ({}, "calibrated check"),
}


def open_at(log_alpha):
    """A protocol: the open gates of the start at ``log_alpha`` (the default
    1.5), closed ones at -3 as always. The same start (a unit's mixing weights
    are its gates over their sum, so equal open gates give the same mix), but
    a sampled open gate is clamped at 1, where it has no gradient, in 80% of
    draws at 3, 48% at 1.5, 17% at 0."""

    def protocol():
        return mock.patch.object(softmerge, "OPEN_START_LOG_ALPHA", log_alpha)

    return protocol


def _together(*protocols):
    """A protocol that applies all of ``protocols``."""

    @contextlib.contextmanager
    def protocol():
        with contextlib.ExitStack() as stack:
            for each in protocols:
                stack.enter_context(each())
            yield

    return protocol


@contextlib.contextmanager
def final_steps(when=lambda: True):
    """The final gates learn for as many steps as the folds' gates took in
    the chosen epochs (rounded, at least one epoch), not for as many epochs
    (while ``when()`` is true)."""
    learn = softmerge._Samples.learn

    def learning(self, index, max_epochs, after_epoch):
        if after_epoch is None and max_epochs > 0 and when():  # the final gates
            splits = self._fit.data.splits
            share = np.mean([len(train) for train, _ in splits]) / self.n_samples
            max_epochs = max(1, round(max_epochs * share))
        return learn(self, index, max_epochs, after_epoch)

    with mock.patch.object(softmerge._Samples, "learn", learning):
        yield


@contextlib.contextmanager
def fold_average():
    """The final log-alphas are the folds' mean at the chosen epoch."""
    found, learn = {}, softmerge._Samples.learn

    def final(self, index, max_epochs, after_epoch):
        if after_epoch is not None:  # a fold's learning
            return learn(self, index, max_epochs, after_epoch)
        result = found["result"]
        self._fit.merger.set_log_alpha(
            torch.stack([f.log_alphas[result.best_epoch] for f in result.folds]).mean(0)
        )
        return training.GateTraining()

    with (
        recording_cross_fit(found),
        mock.patch.object(softmerge._Samples, "learn", final),
    ):
        yield


def recording_cross_fit(found):
    """Patch ``cross_fit`` to keep each fit's result in ``found["result"]``."""
    cross_fit = softmerge.cross_fit

    def recording(*args, **kwargs):
        found["result"] = cross_fit(*args, **kwargs)
        return found["result"]

    return mock.patch.object(softmerge, "cross_fit", recording)


def _steps(X, kwargs):
    samples = kwargs.get("samples")
    n_samples = len(X) if samples is None else len(samples)
    return math.ceil(n_samples / kwargs.get("batch_size", 128))


@contextlib.contextmanager
def moving_average():
    """Every fit scores and keeps an EMA of its log-alphas (one epoch's
    steps of horizon) instead of the last step's."""
    learn_gates, current = softmerge.learn_gates, {}

    class AveragingAdam(training.Adam):
        def __init__(self, parameter, lr, **kwargs):
            super().__init__(parameter, lr, **kwargs)
            self.average = parameter.detach().clone()
            current["adam"] = self

        def step(self, grad, skip=None):
            super().step(grad, skip)
            self.average.lerp_(self.parameter.detach(), current["rate"])

    def averaged(merger, loss_fn, X, y, after_epoch=None, **kwargs):
        current["rate"] = 1 / _steps(X, kwargs)

        def scored(epoch):
            if after_epoch is not None:
                last = merger.log_alpha.detach().clone()
                merger.set_log_alpha(current["adam"].average)
                after_epoch(epoch)
                merger.set_log_alpha(last)

        result = learn_gates(merger, loss_fn, X, y, after_epoch=scored, **kwargs)
        if kwargs.get("max_epochs", 12) > 0:
            merger.set_log_alpha(current["adam"].average)
        return result

    with (
        mock.patch.object(training, "Adam", AveragingAdam),
        mock.patch.object(softmerge, "learn_gates", averaged),
    ):
        yield


@contextlib.contextmanager
def cosine():
    """Every fit's learning rate falls to zero along a cosine of its steps."""
    learn_gates, current = softmerge.learn_gates, {}

    class CosineAdam(training.Adam):
        def __init__(self, parameter, lr, **kwargs):
            super().__init__(parameter, lr, **kwargs)
            self.base_lr, self.n_steps_taken = lr, 0

        def step(self, grad, skip=None):
            done = min(self.n_steps_taken / max(current["steps"], 1), 1.0)
            self.lr = self.base_lr * 0.5 * (1 + math.cos(math.pi * done))
            self.n_steps_taken += 1
            super().step(grad, skip)

    def scheduled(merger, loss_fn, X, y, **kwargs):
        current["steps"] = kwargs.get("max_epochs", 12) * _steps(X, kwargs)
        return learn_gates(merger, loss_fn, X, y, **kwargs)

    with (
        mock.patch.object(training, "Adam", CosineAdam),
        mock.patch.object(softmerge, "learn_gates", scheduled),
    ):
        yield


DISTILLED_SHARE = 0.5
"""Weight of the output ensemble's probabilities in the targets of
:func:`distilled`; the labels' one-hot vectors have the rest."""


@contextlib.contextmanager
def distilled():
    """Every fit's gates learn toward the output ensemble as well as the
    labels: the cross-entropy of the merge's output against targets of
    ``1 - DISTILLED_SHARE`` times the label's one-hot vector plus
    ``DISTILLED_SHARE`` times the members' mean predicted probabilities
    (knowledge distillation from the K-pass ensemble, whose probabilities are
    computed once per fit). The folds' out-of-fold losses and every check stay
    on the labels. Members must be trained with ``CrossEntropyLoss``."""
    learn, found = SoftMergeClassifier._learn, {}

    def learning(self, fit, X, y, **kwargs):
        if found.get("X") is not X:  # once per fit: its folds share X
            found.update(X=X, ensemble=_ensemble_probabilities(self, X))
        ensemble, share = found["ensemble"], DISTILLED_SHARE
        labels = torch.nn.functional.one_hot(y.long(), ensemble.shape[1])
        targets = (1 - share) * labels.to(ensemble) + share * ensemble
        return learn(self, fit, X, targets, **kwargs)

    with mock.patch.object(SoftMergeClassifier, "_learn", learning):
        yield


def _ensemble_probabilities(estimator, X):
    """Mean predicted probabilities on ``X`` of ``estimator``'s members
    without NaN or inf, on ``X``'s device."""
    members = estimator.named_estimators_.values()
    usable = [
        net for i, net in enumerate(members) if i not in estimator.excluded_estimators_
    ]
    for net in usable:
        if not isinstance(net.criterion_, torch.nn.CrossEntropyLoss):
            raise ValueError(
                "distillation needs members trained with CrossEntropyLoss; "
                f"got {type(net.criterion_).__name__}"
            )
    X_host = X.cpu().numpy()
    probabilities = np.mean([net.predict_proba(X_host) for net in usable], axis=0)
    return torch.as_tensor(probabilities, dtype=torch.float32, device=X.device)


@contextlib.contextmanager
def accuracy_guard():
    """The learned merge is kept only if its pooled out-of-fold accuracy is
    at least that of the rule the folds started from (when every fold started
    from the same rule), not only when no fixed rule beats it significantly:
    a merge whose out-of-fold loss fell while its accuracy fell too gives way
    to the start."""
    choose, found = softmerge.choose_lowest_loss, {}

    def guarded(losses, default):
        name = choose(losses, default)
        result = found.pop("result", None)
        if result is None or name != softmerge.SOFT_MERGE:
            return name
        starts = {fold.start.name for fold in result.folds}
        learned = result.errors[name]
        start = result.errors.get(starts.pop()) if len(starts) == 1 else None
        if learned is None or start is None or learned.mean() <= start.mean():
            return name
        return result.folds[0].start.name

    with (
        recording_cross_fit(found),
        mock.patch.object(softmerge, "choose_lowest_loss", guarded),
    ):
        yield


@contextlib.contextmanager
def cascade(first=0.0):
    """Cross-fit with the open gates at ``first`` (final gates for the folds'
    epochs); where no epoch beats the start significantly out of fold,
    cross-fit again as the earlier default did (open gates at 3, final gates
    for the folds' steps)."""
    cross_fit, fallback = softmerge.cross_fit, {"on": False}

    def cascading(*args, **kwargs):
        fallback["on"] = False
        result = cross_fit(*args, **kwargs)  # open_at(first) set open_log_alpha
        if result.best_epoch == 0:
            fallback["on"] = True
            softmerge.OPEN_START_LOG_ALPHA = INIT_LOG_ALPHA  # the final start
            result = cross_fit(*args, **{**kwargs, "open_log_alpha": INIT_LOG_ALPHA})
        return result

    with (
        open_at(first)(),  # restores the constant on exit
        mock.patch.object(softmerge, "cross_fit", cascading),
        final_steps(lambda: fallback["on"]),
    ):
        yield


@contextlib.contextmanager
def calibrated_check():
    """The out-of-fold losses that choose the epoch, and test it against the
    start, are each taken at the temperature that minimises their mean on the
    samples scored (one scalar per fold and epoch, the start's included), so
    that gates which only soften overconfident members' outputs do not pass
    the test. Members must be trained with ``CrossEntropyLoss``."""

    @torch.no_grad()
    def losses(self, index):
        merger, part = self._fit.merger, self._part(index)
        gates = merger.gates()
        output = torch.cat(
            [
                call(merger, self.X[b], gates=gates)
                for b in part.split(self._fit.eval_batch)
            ]
        )
        scale = _best_temperature(output, self.y[part])
        found = torch.nn.functional.cross_entropy(
            scale * output, self.y[part], reduction="none"
        )
        if self.w is not None:
            found = found * self.w[part]
        return found.cpu().numpy() if torch.isfinite(found).all() else None

    with mock.patch.object(softmerge._Samples, "losses", losses):
        yield


def _best_temperature(logits, y, n_steps=20):
    """The scale ``b`` of ``logits`` of least mean cross-entropy against ``y``
    (Newton's method on ``log b``, steps clipped to 1; 1 for non-finite
    logits)."""
    if not torch.isfinite(logits).all():
        return 1.0
    z, log_b = logits.double(), torch.zeros((), dtype=torch.float64)
    with torch.enable_grad():
        for _ in range(n_steps):
            log_b.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(log_b.exp() * z, y)
            (slope,) = torch.autograd.grad(loss, log_b, create_graph=True)
            (curvature,) = torch.autograd.grad(slope, log_b)
            step = slope / curvature if curvature > 0 else slope.sign()
            log_b = (log_b - step.clamp(-1.0, 1.0)).detach()
    return float(log_b.exp())


EARLIER = _together(open_at(INIT_LOG_ALPHA), final_steps)

PROTOCOLS = {
    "open at 1.5, epochs": contextlib.nullcontext,
    "steps": EARLIER,
    "epochs": open_at(INIT_LOG_ALPHA),
    "fold average": _together(open_at(INIT_LOG_ALPHA), fold_average),
    "EMA": _together(EARLIER, moving_average),
    "cosine": _together(EARLIER, cosine),
    "open at 0": _together(open_at(0.0), final_steps),
    "open at 0, epochs": open_at(0.0),
    "distilled, epochs": _together(open_at(INIT_LOG_ALPHA), distilled),
    "open at 0, epochs, accuracy guard": _together(open_at(0.0), accuracy_guard),
    "open at 1.5": _together(open_at(1.5), final_steps),
    "cascade": cascade,
    "calibrated check": calibrated_check,
}


def scenario_parser(doc, scenarios, seeds=(0, 1, 2)):
    """An argument parser described by the first line of ``doc``, with
    ``--seeds``, ``--scenarios`` and ``--cache`` (see :func:`members_of`)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--scenarios", nargs="+", default=scenarios)
    parser.add_argument(
        "--cache", type=Path, help="keep each scenario's members in this folder"
    )
    return parser


def main():
    parser = scenario_parser(__doc__, ["f", "g", "h"])
    parser.add_argument("--schedules", nargs="+", type=int, help="their positions")
    parser.add_argument(
        "--reference",
        nargs="+",
        default=[],
        metavar="JSON",
        help="more per-seed rows of the quality benchmark (quality.py --json), "
        "for seeds that quality.json lacks",
    )
    parser.add_argument(
        "--offset",
        type=int,
        default=0,
        help="fit with random_state=seed + OFFSET (other folds and gate noise, "
        "the same members)",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    reference = json.loads((HERE / "quality.json").read_text())
    for path in args.reference:
        for scenario, rows in json.loads(Path(path).read_text())["results"].items():
            reference.setdefault(scenario, []).extend(rows)
    chosen = list(SCHEDULES.items())
    if args.schedules:
        chosen = [chosen[i] for i in args.schedules]
    print(
        "| schedule | scenario | SoftMerge | edge | captured | cost | epochs "
        "| SoftMerge per seed |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for scenario in args.scenarios:
        data = {seed: members_of(scenario, seed, args.cache) for seed in args.seeds}
        unit = {
            seed: member_training_seconds(members[0], X, y)
            for seed, (X, _, y, _, members) in data.items()
        }
        for name, (params, protocol) in chosen:
            try:
                scores, costs, epochs = _fits(data, unit, params, protocol, args.offset)
            except ValueError as error:  # e.g. align= on attention layers
                print(f"| {name} | ({scenario}) | {error} |", flush=True)
                continue
            print(
                f"| {name} | ({scenario}) | {np.mean(scores):.2f} | "
                + _edge(reference.get(scenario), args.seeds, scores)
                + f" | {np.mean(costs):.2f} | {', '.join(epochs)} | "
                + " / ".join(f"{score:.1f}" for score in scores)
                + " |",
                flush=True,
            )


def _fits(data, unit, params, protocol, offset):
    """Test accuracy in %, cost and epochs chosen of one schedule, per seed,
    fit with ``random_state=seed + offset``."""
    scores, costs, epochs = [], [], []
    for seed, (X, X_test, y, y_test, members) in data.items():
        merge = SoftMergeClassifier(members, random_state=seed + offset, **params)
        with PROTOCOLS[protocol]():
            start = time.perf_counter()
            merge.fit(X, y)
            costs.append((time.perf_counter() - start) / unit[seed])
        scores.append(100 * merge.score(X_test, y_test))
        epochs.append(str(merge.best_epoch_))
    return scores, costs, epochs


def members_of(scenario, seed, cache):
    """``quality.members_for``, kept in the folder ``cache`` (if given)."""
    if cache is None:
        return members_for(scenario, seed, {})
    path = cache / f"{scenario}{seed}.pkl"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(members_for(scenario, seed, {})))
    return pickle.loads(path.read_bytes())


def _edge(rows, seeds, scores):
    """The edge over the best fixed rule and the share captured
    (``quality.edge_and_captured``), with the quality benchmark's rows of the
    same seeds ("-" where absent) and these fits' scores in %."""
    rows = {row["seed"]: row for row in rows or []}
    if not all(seed in rows for seed in seeds):
        return "- | -"
    fits = zip(seeds, scores, strict=True)
    edge, captured = edge_and_captured(
        [{**rows[seed], "SoftMerge": score / 100} for seed, score in fits]
    )
    return f"{edge:+.2f} | " + ("-" if captured is None else f"{captured:+.0%}")


if __name__ == "__main__":
    main()
