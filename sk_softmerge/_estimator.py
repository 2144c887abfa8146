"""The fit that every soft merge shares, whatever the members' task.

:class:`SoftMergeClassifier` and :class:`SoftMergeRegressor` differ only in
their task mixin, whose ``_validate_fit_data`` checks the targets and returns
the :class:`~sk_softmerge._tasks.Task` (split, loss, held-out errors and score,
the merged net's class) that ``fit`` passes along, and in ``predict``. Checking
the members, excluding broken ones, screening, alignment, the fixed rules, gate
learning, the check with its fallback, the refit and building the merged net
are here, once.
"""

import os
import sys
import warnings
from collections.abc import Callable
from functools import partial
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.model_selection import check_cv
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from ._align._matching import ALIGNMENTS, align_modules
from ._align._repair import member_moments, repair_of, repair_sites
from ._base import weighted_samples
from ._core._evaluation import EVALUATION_BATCHES, choose_lowest_loss, weighted
from ._core._merger import INIT_LOG_ALPHA, SoftMerge
from ._core._screening import nonfinite_members, screen
from ._core._training import GateTraining, learn_gates, per_sample_task_losses
from ._crossfit import cross_fit, fold_summary, pooled
from ._devices import resolve_device
from ._export import save_merged
from ._inputs import check_forward, to_device
from ._rules import GREEDY_SOUP, Candidate, RuleBook, choose_start
from ._tasks import ClassificationTask, Task, prediction_function

MAX_START_SAMPLES = 1024
"""The fixed rules are compared on at most this many samples that the gates
learn on (about as many as a held-out fifth would hold): on more, a member's
lead on the samples it memorised would pass the significance test, and the
comparison stays a small part of a fit."""

SOFT_MERGE = "soft merge"


class _SoftMergeBase(BaseEstimator):
    """Parameters, ``fit`` and ``save_merged`` of the soft-merge estimators.

    A subclass puts a task mixin (``MemberClassifierMixin`` or
    ``MemberRegressorMixin``) before this class: ``fit`` calls its
    ``_validate_fit_data(X, y)`` for ``(nets, X, y, task)``, and nothing else
    of it. See :class:`~sk_softmerge.SoftMergeClassifier` for the parameters.
    """

    _parameter_constraints: dict = {
        "estimators": [list, tuple],
        "l0_weight": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "granularity": [StrOptions({"layer", "tensor", "neuron"})],
        "merge": [None, str, list, tuple],
        "cv": [None, Interval(Integral, 2, None, closed="left"), "cv_object"],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "n_iter_no_change": [None, Interval(Integral, 1, None, closed="left")],
        "align": [None, StrOptions(set(ALIGNMENTS))],
        "repair": [StrOptions({"auto"}), "boolean"],
        "refit": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        estimators,
        *,
        l0_weight=0.0,
        max_epochs=12,
        lr=0.2,
        batch_size=128,
        granularity="neuron",
        merge=None,
        cv=2,
        validation_fraction=0.2,
        n_iter_no_change=20,
        align=None,
        repair="auto",
        refit=True,
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.estimators = estimators
        self.l0_weight = l0_weight
        self.max_epochs = max_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.granularity = granularity
        self.merge = merge
        self.cv = cv
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.align = align
        self.repair = repair
        self.refit = refit
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Learn the gates that merge the members on ``(X, y)``.

        The steps: check the members and leave out broken ones; build the
        merger and screen extreme weights; score the fixed rules (uniform
        average, each member, greedy soup) on the held-out part and start the
        gates from the best; learn the gates, keeping the epoch that beats the
        start significantly on the held-out part, if any; check the result
        against every fixed rule; relearn those gates on all of ``(X, y)``;
        build the merged net.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...) or dict of str to array-like
            Training inputs, as the members take them: one array, or one array
            per keyword argument of the members' ``forward`` (as skorch passes
            a dict or :class:`skorch.helper.SliceDict`). Floats are cast to the
            members' dtype; integers stay integers (int64) for members holding
            an ``nn.Embedding``.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets: labels, each one of the members' classes, for a
            classifier; one value per output of the members for a regressor.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of every sample: it multiplies the sample's
            task loss while the gates learn, and its errors on the held-out
            part (the start, the epoch kept, the check against the fixed
            rules). Samples of weight zero are left out, as if absent.
            Batch-norm and REPAIR statistics are not weighted.

        Returns
        -------
        self : object
            The fitted estimator. A fit that raises leaves the estimator as it
            was: fitted as before, or unfitted.
        """
        return self._fit_atomically(X, y, sample_weight)

    def _fit(self, X, y, sample_weight):
        """The steps of :meth:`fit`, setting the fitted attributes of ``self``
        (a scratch copy)."""
        nets, X, y, task = self._validate_fit_data(X, y)
        X, y, sample_weight = weighted_samples(X, y, sample_weight)
        device = resolve_device(self.device)
        random_state = check_random_state(self.random_state)
        data = self._fit_data(task, X, y, sample_weight, random_state, device)
        rows = self._usable_members(nets)
        merger, average, reference = self._build_merger(nets, rows, data)
        task.check_output(check_forward(merger, data.X_train), data.y_train)
        generator = torch.Generator(device=device).manual_seed(
            int(random_state.randint(np.iinfo(np.int32).max))
        )
        fit = _Fit(
            task=task,
            merger=merger,
            loss=task.loss_function(nets[reference], device),
            predict=prediction_function(nets[reference]),
            data=data,
            generator=generator,
            eval_batch=EVALUATION_BATCHES * self.batch_size,
            max_epochs=self.max_epochs if len(rows) > 1 else 0,
        )
        if self.cv is None:
            start, training, chosen = self._fit_held_out(fit, average, nets, rows)
        else:
            start, training, chosen = self._cross_fit(fit, average, nets, rows)
        self._set_fitted(merger, rows, nets, start, training, chosen)
        self.merged_net_ = task.build_net(
            nets[reference], _state_of(chosen, merger, nets, data.X)
        )
        return self

    def _learn(self, fit: "_Fit", X, y, **kwargs):
        """Learn the merger's gates on ``(X, y)`` with the estimator's
        parameters (:func:`~sk_softmerge._core._training.learn_gates`)."""
        return learn_gates(
            fit.merger,
            fit.loss,
            X,
            y,
            l0_weight=self.l0_weight,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=fit.generator,
            verbose=self.verbose,
            **kwargs,
        )

    def _fit_held_out(self, fit, average, nets, rows):
        """The held-out protocol (``cv=None``): choose the start and the epoch
        on the held-out part, check the learned gates against every fixed rule
        there, relearn them on all the data. Returns the start, the training
        and the chosen candidate."""
        data, merger = fit.data, fit.merger
        self.cv_results_ = None
        evaluate = _evaluation(fit)
        book = _rule_book(fit, evaluate, average, nets, rows, self.named_estimators_)
        candidates, errors, _ = book.rules()
        start = choose_start(candidates, errors)
        merger.start_from(start.gates, INIT_LOG_ALPHA)
        training = self._learn(
            fit,
            data.X_train,
            data.y_train,
            max_epochs=fit.max_epochs,
            validation=data.held_out,
            sample_weight=data.w_train,
            n_iter_no_change=self.n_iter_no_change,
        )
        chosen = self._select(fit.task, merger, candidates, errors, evaluate, data)
        if chosen.name == SOFT_MERGE and self._refits(data, training):
            merger.start_from(start.gates, INIT_LOG_ALPHA)
            X_all, y_all, w_all = (
                to_device(data.X, fit.device),
                torch.as_tensor(data.y, device=fit.device),
                _weights_on(fit.device, data.w),
            )
            self._learn(
                fit, X_all, y_all, max_epochs=training.best_epoch, sample_weight=w_all
            )
            chosen = Candidate(SOFT_MERGE, merger.gates().detach())
        return start, training, chosen

    def _cross_fit(self, fit, average, nets, rows):
        """The cross-fitting protocol: learn and score the gates on every fold
        (:func:`~sk_softmerge._crossfit.cross_fit`), choose between the learned
        merge and the fixed rules on the pooled out-of-fold errors, then learn
        the final gates on all the data. Returns the start, the training and
        the chosen candidate; sets ``validation_scores_`` and ``cv_results_``."""
        samples = _Samples(self, fit)
        book = _rule_book(
            fit, samples.errors, average, nets, rows, self.named_estimators_
        )
        splits, choosing = fit.data.splits, _subsample(fit.generator.initial_seed())
        result = cross_fit(
            fit.merger,
            book,
            splits,
            choose_start=choose_start,
            learn=samples.learn,
            held_out_losses=samples.losses,
            merge_errors=samples.merge_errors,
            max_epochs=fit.max_epochs,
            magnitude=INIT_LOG_ALPHA,
            choosing=choosing,
            name=SOFT_MERGE,
        )
        score = samples.task.score
        self.validation_scores_ = {n: score(e) for n, e in result.errors.items()}
        self.cv_results_ = fold_summary(result, score, samples.weights)
        everything = np.arange(samples.n_samples)
        candidates, errors, soup = book.rules(choosing(everything))
        start = choose_start(candidates, errors)
        fit.merger.start_from(start.gates, INIT_LOG_ALPHA)
        # On as many samples as a held-out fifth: on more, the samples that
        # members memorised would let a member pass the test.
        check = choosing(np.arange(sum(len(test) for _, test in splits)))
        evidence = {n: e if e is None else e[check] for n, e in result.errors.items()}
        name = choose_lowest_loss(evidence, SOFT_MERGE)
        if name != SOFT_MERGE:
            self._warn_fallback(name, "out of fold")
            chosen = soup if name == GREEDY_SOUP else _named(candidates, name, start)
            training = GateTraining()
        else:
            epochs = _final_epochs(result.best_epoch, splits, samples.n_samples)
            training = samples.learn(everything, epochs, None)
            chosen = Candidate(SOFT_MERGE, fit.merger.gates().detach())
        training.best_epoch = result.best_epoch
        training.validation_loss_curve = result.validation_loss_curve
        training.n_skipped_steps += result.n_skipped_steps
        return start, training, chosen

    def _fit_data(self, task, X, y, w, random_state, device) -> "_FitData":
        """The data as tensors on ``device``, with the samples' weights
        (``None`` without): all of it and the folds of ``cv``, or, with
        ``cv=None``, the task's train/held-out split of them (no held-out part
        for ``validation_fraction=0``)."""
        splits = None if self.cv is None else _splits(self.cv, task, y)
        if self.cv is not None or self.validation_fraction == 0:
            X_train, y_train, w_train, held_out = X, y, w, None
        else:
            seed = random_state.randint(np.iinfo(np.int32).max)
            weights = () if w is None else (w,)
            parts = task.split(X, y, self.validation_fraction, seed, *weights)
            X_train, X_val, y_train, y_val, *w_parts = parts
            w_train, w_val = w_parts or (None, None)
            held_out = (
                to_device(X_val, device),
                torch.as_tensor(y_val, device=device),
                _weights_on(device, w_val),
            )
        X_train, y_train = (
            to_device(X_train, device),
            torch.as_tensor(y_train, device=device),
        )
        return _FitData(
            X, y, w, X_train, y_train, _weights_on(device, w_train), held_out, splits
        )

    def _usable_members(self, nets) -> list[int]:
        """Positions in ``estimators`` of the members without NaN or inf: the
        rows of the merger. Sets ``excluded_estimators_`` and warns about the
        others."""
        self.excluded_estimators_ = nonfinite_members([net.module_ for net in nets])
        if len(self.excluded_estimators_) == len(nets):
            raise ValueError(
                "Every member holds non-finite weights (NaN or inf); there is "
                "nothing to merge."
            )
        if self.excluded_estimators_:
            names = [list(self.named_estimators_)[i] for i in self.excluded_estimators_]
            warnings.warn(
                f"estimators {self.excluded_estimators_} hold non-finite weights "
                f"(NaN or inf) and are excluded from the merge: {names}.",
                UserWarning,
                stacklevel=_stacklevel_of_caller(),
            )
        return [i for i in range(len(nets)) if i not in self.excluded_estimators_]

    def _build_merger(self, nets, rows, data):
        """The merger of the members at ``rows`` (aligned, when asked), with
        extreme weights screened and unit statistics corrected, when asked.

        Returns the merger, the gates of the uniform average (closed where a
        member's weights on a unit are extreme) and the position in
        ``estimators`` of the reference member, the first one screened nowhere:
        unmerged parameters and buffers come from it, so a malicious member
        never supplies them. Sets ``screened_`` and ``repaired_layers_``.
        """
        modules = [nets[i].module_ for i in rows]
        if self.align is not None:
            modules = align_modules(modules, data.X, method=self.align)
        merger = SoftMerge(
            modules,
            granularity=self.granularity,
            merge=self.merge,
            init_log_alpha=INIT_LOG_ALPHA,
            device=data.X_train.device,
        )
        screened = screen(merger)
        self.screened_ = _per_estimator(screened.cpu().numpy(), rows, len(nets))
        sound = (~screened.any(dim=1)).nonzero()
        row = int(sound[0]) if len(sound) else 0
        merger.set_reference(modules[row])
        merger.use_batch_statistics()
        self.repaired_layers_ = []
        if self.repair is True or (self.repair == "auto" and self.align is not None):
            sites = repair_sites(modules[0], data.X)
            states = [module.state_dict() for module in modules]
            moments = member_moments(
                modules[0], states, sites, data.X, device=merger.theta.device
            )
            repair, kept = repair_of(merger, sites, moments)
            merger.set_repair(repair)
            self.repaired_layers_ = [site.layer for site in kept]
        return merger, (~screened).to(merger.log_alpha.dtype), rows[row]

    def _select(self, task, merger, candidates, errors, evaluate, data) -> Candidate:
        """The learned gates, unless a fixed rule is significantly better on
        the held-out part (then that rule, with a warning). Sets
        ``validation_scores_``."""
        learned = Candidate(SOFT_MERGE, merger.gates().detach())
        self.validation_scores_ = None
        if data.held_out is None:
            return learned
        errors = {SOFT_MERGE: evaluate(partial(merger, gates=learned.gates)), **errors}
        self.validation_scores_ = {name: task.score(e) for name, e in errors.items()}
        name = choose_lowest_loss(errors, SOFT_MERGE)
        if name == SOFT_MERGE:
            return learned
        self._warn_fallback(name, "on the validation data")
        return next(candidate for candidate in candidates if candidate.name == name)

    def _warn_fallback(self, name: str, where: str) -> None:
        scores = self.validation_scores_
        warnings.warn(
            f"The soft merge scored {scores[SOFT_MERGE]:.4f} {where}, "
            f"significantly below {name} ({scores[name]:.4f}); falling back "
            f"to {name}. See validation_scores_.",
            UserWarning,
            stacklevel=_stacklevel_of_caller(),
        )

    def _refits(self, data, training) -> bool:
        """Whether the held-out part confirmed learned gates to relearn."""
        return self.refit and data.held_out is not None and training.best_epoch > 0

    def _set_fitted(self, merger, rows, nets, start, training, chosen) -> None:
        self.start_, self.selected_ = start.name, chosen.name
        self.loss_curve_ = training.loss_curve
        self.validation_loss_curve_ = training.validation_loss_curve
        self.best_epoch_ = training.best_epoch
        self.n_skipped_steps_ = training.n_skipped_steps
        self.n_iter_ = len(self.loss_curve_)
        self.unit_names_ = merger.unit_names
        self.gates_ = _per_estimator(chosen.gates.cpu().numpy(), rows, len(nets))

    def save_merged(self, path):
        """Write the merged net to ``path`` with safetensors, without pickle.

        Writes one file, ending in ``.safetensors``: the merged weights (and the
        criterion's tensor arguments) as tensors, and in its header metadata a
        JSON document with the classes (for a classifier), number of features,
        unit names, gates, tensor shapes and dtypes, the SHA-256 of the tensor
        data and the package version. Nothing in the file is executable;
        :func:`sk_softmerge.load_merged` checks it and rebuilds the net.

        Parameters
        ----------
        path : str or path-like
            Where to write; must end in ``.safetensors``. An existing file is
            replaced only once the new file is written.

        Returns
        -------
        path : pathlib.Path
            The one file written.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np, torch
        >>> from sklearn.datasets import load_iris
        >>> from skorch import NeuralNetClassifier
        >>> from sk_softmerge import SoftMergeClassifier, load_merged
        >>> X, y = load_iris(return_X_y=True)
        >>> X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
        >>> members = [NeuralNetClassifier(
        ...     torch.nn.Linear, module__in_features=4, module__out_features=3,
        ...     criterion=torch.nn.CrossEntropyLoss, max_epochs=5, lr=0.1,
        ...     verbose=0).fit(X, y) for _ in range(2)]
        >>> merge = SoftMergeClassifier(members, max_epochs=2).fit(X, y)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = merge.save_merged(Path(folder) / "m.safetensors")
        ...     net = load_merged(path, torch.nn.Linear, in_features=4,
        ...                       out_features=3)
        >>> path.name
        'm.safetensors'
        >>> np.array_equal(net.predict_proba(X), merge.predict_proba(X))
        True
        """
        return save_merged(self, path)


class _FitData(NamedTuple):
    """The fit data: all of it, on the host (moved to the fit device only for
    the refit and batch-norm statistics, so that the device holds one copy),
    and, on the fit device, the part the gates train on and the held-out part
    (``None`` without one); the folds of ``cv`` (``None`` with ``cv=None``)."""

    X: np.ndarray
    y: np.ndarray
    w: np.ndarray | None
    X_train: torch.Tensor
    y_train: torch.Tensor
    w_train: torch.Tensor | None
    held_out: tuple | None
    splits: list | None


def _weights_on(device, w) -> torch.Tensor | None:
    """Weights of mean 1 (so that a weighted mean is ``mean(w * values)``), as
    a float32 tensor on ``device``; ``None`` for ``None``."""
    if w is None:
        return None
    return torch.as_tensor(w / w.mean(), dtype=torch.float32, device=device)


class _Fit(NamedTuple):
    """What every step of one fit works with."""

    task: Task
    merger: SoftMerge
    loss: Callable
    predict: Callable
    data: _FitData
    generator: torch.Generator
    eval_batch: int
    max_epochs: int

    @property
    def device(self) -> torch.device:
        return self.data.X_train.device


def _evaluation(fit: _Fit):
    """``evaluate(forward)``: per-sample errors of a model on the held-out part
    (on at most ``MAX_START_SAMPLES`` training samples without one), run on
    ``fit.eval_batch`` samples at a time, times the samples' weights of mean 1
    when weighted."""
    data = fit.data
    X, y, w = data.held_out or (data.X_train, data.y_train, data.w_train)
    if data.held_out is None and X.shape[0] > MAX_START_SAMPLES:
        # Training data: a subsample tells the rules apart well enough.
        keep = torch.randperm(X.shape[0], generator=fit.generator, device=X.device)
        keep = keep[:MAX_START_SAMPLES]
        X, y, w = X[keep], y[keep], None if w is None else w[keep] / w[keep].mean()
    errors = partial(
        fit.task.errors, X=X, y=y, predict=fit.predict, batch_size=fit.eval_batch
    )
    return weighted(errors, None if w is None else w.cpu().numpy())


class _Samples:
    """The fit data on the fit device, addressed by sample positions: what
    cross-fitting learns on and scores, each sample's errors weighted by its
    weight of mean 1 over all samples, regression errors scaled alike on
    every part (:meth:`Task.pooled`)."""

    def __init__(self, estimator, fit: "_Fit"):
        data = fit.data
        self._estimator, self._fit = estimator, fit
        self.X, self.y, self.w = data.X_train, data.y_train, data.w_train
        self.n_samples = len(data.y)
        self.task = fit.task.pooled(self.y)
        self.weights = None if self.w is None else self.w.cpu().numpy()

    def _part(self, index):
        if index is None:
            return torch.arange(self.n_samples, device=self.y.device)
        return torch.as_tensor(index, device=self.y.device)

    def errors(self, forward, index=None) -> np.ndarray | None:
        """Per-sample errors of ``forward`` on the samples ``index`` (all for
        ``None``)."""
        fit = self._fit
        errors = partial(
            self.task.errors, forward, predict=fit.predict, batch_size=fit.eval_batch
        )
        if index is None:
            found = errors(self.X, self.y)
        else:  # a few batches gathered at a time, not the part copied
            parts = self._part(index).split(fit.eval_batch)
            found = pooled([errors(self.X[part], self.y[part]) for part in parts])
        if found is None or self.weights is None:
            return found
        return found * self.weights[slice(None) if index is None else index]

    def merge_errors(self, gates, index) -> np.ndarray | None:
        """Per-sample errors of the merge with ``gates``."""
        return self.errors(partial(self._fit.merger, gates=gates), index)

    def losses(self, index) -> np.ndarray | None:
        """Per-sample task losses of the merger's deterministic gates."""
        merger = self._fit.merger
        return per_sample_task_losses(
            merger,
            self._fit.loss,
            self.X,
            self.y,
            self.w,
            merger.gates(),
            self._fit.eval_batch,
            samples=self._part(index),
        )

    def learn(self, index, max_epochs: int, after_epoch) -> GateTraining:
        """Learn the gates on the samples ``index``, their weights of mean 1
        over them; the samples are gathered step by step, not copied."""
        part = self._part(index)
        w = None if self.w is None else self.w / self.w[part].mean()
        return self._estimator._learn(
            self._fit,
            self.X,
            self.y,
            max_epochs=max_epochs,
            sample_weight=w,
            samples=part,
            after_epoch=after_epoch,
        )


def _subsample(seed: int):
    """``choosing(index)``: at most ``MAX_START_SAMPLES`` of the samples
    ``index``, drawn from ``seed`` and the number of samples, in order."""

    def choosing(index):
        rng = np.random.default_rng([seed, len(index)])
        return np.sort(rng.permutation(index)[:MAX_START_SAMPLES])

    return choosing


def _rule_book(fit: _Fit, evaluate, average, nets, rows, names) -> RuleBook:
    """The fixed rules' errors by ``evaluate(forward)``."""
    # Members are evaluated as they predict: with their own batch-norm
    # statistics.
    member_errors = [evaluate(fit.merger.member_forward(nets[i].module_)) for i in rows]
    return RuleBook(
        average,
        rows,
        member_errors,
        lambda gates: evaluate(partial(fit.merger, gates=gates)),
        fit.task.score,
        list(names),
    )


def _splits(cv, task: Task, y: np.ndarray) -> list:
    """The folds of ``cv`` (an int, a splitter or an iterable of splits, as
    :func:`sklearn.model_selection.check_cv` takes it) over the targets ``y``."""
    classifier = isinstance(task, ClassificationTask)
    splitter = check_cv(cv, y, classifier=classifier)
    return list(splitter.split(np.zeros((len(y), 1)), y))


def _stacklevel_of_caller() -> int:
    """The ``stacklevel`` at which a warning of this package's code points at
    the code that called it: the first frame outside this package and
    scikit-learn's ``fit`` wrapper, seen from the caller of this function."""
    package = os.path.dirname(__file__) + os.sep
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(package)
        or frame.f_code.co_filename.endswith(os.path.join("sklearn", "base.py"))
    ):
        frame, level = frame.f_back, level + 1
    return level


def _final_epochs(best_epoch: int, splits, n_samples: int) -> int:
    """Epochs on all ``n_samples`` that take as many steps as ``best_epoch``
    epochs took on a fold's training part (rounded, at least 1 when
    ``best_epoch`` is): the step count is what the folds checked."""
    if best_epoch == 0:
        return 0
    share = np.mean([len(train) for train, _ in splits]) / n_samples
    return max(1, round(best_epoch * share))


def _named(candidates, name: str, default: Candidate) -> Candidate:
    return next((c for c in candidates if c.name == name), default)


def _state_of(chosen: Candidate, merger: SoftMerge, nets, X: np.ndarray) -> dict:
    """Weights and buffers of the chosen candidate's net: a member's own, or
    the merge's, with batch-norm statistics recomputed on ``X``."""
    if chosen.member is not None:
        return nets[chosen.member].module_.state_dict()
    return merger.merged_state_dict(chosen.gates, statistics_from=X)


def _per_estimator(
    values: np.ndarray, rows: list[int], n_estimators: int
) -> np.ndarray:
    """One row per estimator from the merger's rows; excluded ones get zeros
    (closed gates)."""
    full = np.zeros((n_estimators, values.shape[1]), dtype=values.dtype)
    full[rows] = values
    return full
