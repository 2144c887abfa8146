"""The soft-merge estimators: their shared fit, :class:`SoftMergeClassifier`
and :class:`SoftMergeRegressor`.

The two estimators differ only in their task mixin (``_base``), whose
``_validate_fit_data`` checks the targets and returns the
:class:`~sk_softmerge._tasks.Task` (split, loss, errors and score, the merged
net's class) that ``fit`` passes along, and in ``predict``. Checking the
members, excluding broken ones, screening, alignment, the fixed rules, gate
learning by cross-fitting (or on a held-out part), the check with its
fallback, the final gates and building the merged net are here, once, in
:class:`_SoftMergeBase`, as ``sklearn/ensemble/_voting.py`` holds its base and
both estimators.
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
from ._base import (
    MemberClassifierMixin,
    MemberRegressorMixin,
    MergedNetMixin,
    weighted_samples,
)
from ._core._evaluation import EVALUATION_BATCHES, choose_lowest_loss, weighted
from ._core._merger import INIT_LOG_ALPHA, OPEN_START_LOG_ALPHA, SoftMerge
from ._core._screening import nonfinite_members, screen
from ._core._training import GateTraining, learn_gates, per_sample_task_losses
from ._crossfit import cross_fit, fold_summary, pooled
from ._devices import resolve_device
from ._inputs import check_forward, to_device
from ._rules import GREEDY_SOUP, Candidate, RuleBook, choose_start
from ._tasks import ClassificationTask, Task, prediction_function

MAX_START_SAMPLES = 1024
"""The fixed rules are compared on at most this many samples that the gates
learn on (about as many as a held-out fifth would hold): on more, a member's
lead on the samples it memorised would pass the significance test, and the
comparison stays a small part of a fit."""

SOFT_MERGE = "soft merge"


class _SoftMergeBase(MergedNetMixin, BaseEstimator):
    """Parameters and ``fit`` of the soft-merge estimators (``save_merged`` from
    :class:`~sk_softmerge._base.MergedNetMixin`).

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
        average, each member, greedy soup) once on every sample; on every fold
        of ``cv``, start the gates from the best rule of the other folds, learn
        them there and score every epoch on the fold left out; keep the epoch
        that beats the start significantly out of fold, if any, and check that
        merge against every fixed rule out of fold; learn the final gates on
        all of ``(X, y)``; build the merged net. With ``cv=None``, the start,
        the epoch and the check are decided on a held-out part instead.

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
            task loss while the gates learn, and its out-of-fold (or held-out)
            errors and losses (the start, the epochs kept, the check against
            the fixed rules). Samples of weight zero are left out, as if absent.
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
        evaluate, n_samples = _evaluation(fit)
        book = _rule_book(
            fit, evaluate, n_samples, average, nets, rows, self.named_estimators_
        )
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
            fit,
            samples.errors,
            samples.n_samples,
            average,
            nets,
            rows,
            self.named_estimators_,
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
            open_log_alpha=OPEN_START_LOG_ALPHA,
            choosing=choosing,
            name=SOFT_MERGE,
        )
        score = samples.task.score
        self.validation_scores_ = {n: score(e) for n, e in result.errors.items()}
        self.cv_results_ = fold_summary(result, score, samples.weights)
        everything = np.arange(samples.n_samples)
        candidates, errors, soup = book.rules(choosing(everything))
        start = choose_start(candidates, errors)
        fit.merger.start_from(start.gates, OPEN_START_LOG_ALPHA)
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
            training = samples.learn(everything, result.best_epoch, None)
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


class SoftMergeClassifier(MemberClassifierMixin, _SoftMergeBase):
    """Merge fitted skorch classifiers into one net with learned L0 gates.

    Each member's weights are kept as they are; one hard-concrete gate per
    member and merge unit decides how much the member contributes to that unit
    of the merged net, whose weights are the gate-weighted average of the
    members'. Only the gates are trained, on the members' own loss plus an L0
    penalty. After fit, the merged weights are materialised once in
    ``merged_net_``, so predicting costs one forward pass of one net.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        At least two fitted skorch classifiers (``NeuralNetClassifier``, with
        any criterion, or ``NeuralNetBinaryClassifier``) of one class, one
        architecture and one set of classes, or such nets wrapped in
        :class:`~sklearn.frozen.FrozenEstimator`. They are never moved,
        modified or re-fitted; ``clone`` keeps them fitted. Named as
        ``VotingClassifier`` takes them, by ``(name, net)`` pairs, a member
        goes by its name in ``validation_scores_``, ``start_``, ``selected_``,
        warnings and :func:`~sk_softmerge.plot_gates`; otherwise by
        ``"member i"``.
    l0_weight : float, default=0.0
        Weight of the mean expected L0 norm of the gates in the objective.
        Larger values close more gates, so that fewer members carry each unit;
        ``0`` (the default, the most accurate in our benchmarks) lets the task
        loss alone decide. See *Choosing l0_weight* in the Notes.
    max_epochs : int, default=12
        Passes over the training data.
    lr : float, default=0.2
        Adam learning rate of the gates' log-alphas.
    batch_size : int, default=128
        Samples per gradient step.
    granularity : {"neuron", "layer", "tensor"}, default="neuron"
        What a gate covers: one output unit or channel of a module with its
        bias (``"neuron"``), all parameters of a module (``"layer"``), or one
        parameter tensor (``"tensor"``). Neuron gates let each member carry
        the units it is good at; layer gates can only reweight whole layers.
    merge : None, str or list of str, default=None
        Name patterns (shell-style, as in :mod:`fnmatch`) of the modules or
        parameters to merge, e.g. ``["0", "2.weight"]``; the rest is copied from
        the reference member. ``None`` merges everything.
    cv : int, cross-validation generator, iterable or None, default=2
        How the learned gates are checked: by cross-fitting. On each fold of
        ``cv`` (what :func:`~sklearn.model_selection.check_cv` takes: an int
        gives that many unshuffled ``StratifiedKFold`` folds), the gates learn on
        the other folds, from the fixed rule those choose, and the gates of
        every epoch and every fixed rule are scored on the fold left out. The
        pooled out-of-fold losses choose the number of epochs, the pooled
        out-of-fold errors whether the learned merge or a fixed rule is kept
        (see Notes); the final gates then learn on all of ``(X, y)`` for that
        many epochs. Every sample both teaches the gates and checks them.
        ``None`` holds out ``validation_fraction`` instead.
    validation_fraction : float, default=0.2
        With ``cv=None``: the fraction of ``(X, y)`` held out, stratified, to
        choose the fixed rule the gates start from (uniform average, a member
        alone, greedy soup), the epoch to keep, and to compare the learned
        merge with every fixed rule. ``0`` trains on all data and compares
        nothing.
    n_iter_no_change : int or None, default=20
        Stop learning the gates once this many epochs in a row brought no new
        lowest loss on the held-out part (as scikit-learn's ``MLPClassifier``
        does); ``None`` runs all ``max_epochs``. Only with ``cv=None`` and a
        held-out part.
    align : {None, "weight_matching", "activation_matching"}, default=None
        ``None`` assumes the members share one basin (forked from one training,
        or fine-tuned from one checkpoint). Members trained from different
        random initialisations need their hidden units aligned first: copies
        of the members are permuted to match each other (Git Re-Basin [3]_),
        by their weights (``"weight_matching"``) or by the correlations of
        their hidden units on ``X`` (``"activation_matching"``); see
        :func:`~sk_softmerge.align_modules` for the supported layers.
    repair : "auto" or bool, default="auto"
        Correct the statistics of merged hidden units (REPAIR [4]_): each
        merged unit's pre-activation mean and standard deviation on ``X`` are
        brought to the gate-weighted average of the members', while the gates
        learn (with each batch's statistics) and in ``merged_net_`` (folded
        into the weights and biases, so the architecture is the members').
        Units that pass through batch norm are left to the recomputation of
        its statistics. ``"auto"`` repairs when ``align`` is set.
    refit : bool, default=True
        When the learned gates beat their start on the held-out part, learn
        them again from the same start on all of ``(X, y)`` for the number of
        epochs that the held-out part chose (``best_epoch_``), so that the
        held-out samples train the gates too. ``False`` keeps the gates that
        the held-out part checked. Only with ``cv=None`` and a held-out part
        (cross-fitting always learns the final gates on all the data).
    device : str, default="auto"
        Where the gates are learned: ``"auto"`` (CUDA when available), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``.
    random_state : int, RandomState instance or None, default=None
        Seeds shuffling and gate noise; an int makes ``fit`` repeatable.
    verbose : int, default=0
        Above zero, show a progress bar with the loss and the open gates.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The members' classes.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``, when ``X`` has string column
        names.
    gates_ : ndarray of shape (n_estimators, n_units)
        Deterministic gate of every member on every merged unit, in ``[0, 1]``,
        for the merge in ``merged_net_``: a unit's mixing weights are its gates
        over their sum (one-hot after a fallback to a member, all ones after a
        fallback to the uniform average, zeros for excluded members).
    unit_names_ : list of str
        Name of every merged unit.
    merged_net_ : skorch net
        A fitted net of the members' class and parameters holding the merged
        weights; it can be used on its own.
    validation_scores_ : dict of str to float or None
        Out-of-fold accuracy (with ``cv``; on the held-out part with
        ``cv=None``) of ``"soft merge"`` (the gates checked there),
        ``"uniform average"``, every member that was not excluded (by name,
        ``"member i"`` when unnamed) and ``"greedy soup"`` (when it is neither
        one member nor the average, on some fold);
        ``-1`` for a candidate whose probabilities are not finite; ``None``
        when ``cv=None`` and ``validation_fraction=0``.
    selected_ : str
        Which candidate ``merged_net_`` holds: ``"soft merge"`` (the learned
        gates, or their start when no epoch beat it) unless ``fit`` fell back
        to a fixed rule.
    named_estimators_ : Bunch
        The members by name (``"member i"`` for members given without one).
    excluded_estimators_ : list of int
        Members left out because they hold NaN or inf.
    repaired_layers_ : list of str
        Names of the layers whose output units ``repair`` corrected; empty
        without repair.
    screened_ : ndarray of shape (n_estimators, n_units), dtype bool
        Gates that started closed because the member's weights on that unit lie
        far from every other member's (see Notes).
    loss_curve_ : list of float
        Mean training objective per epoch of the final learning of the gates
        (on all the data with ``cv``), over the steps that were not skipped
        (see ``n_skipped_steps_``); ``nan`` for an epoch whose every step was
        skipped.
    validation_loss_curve_ : list of float
        Task loss of the merge before learning and after every epoch: pooled
        out of fold with ``cv``, on the held-out part with ``cv=None``; empty
        when ``cv=None`` and ``validation_fraction=0``.
    cv_results_ : dict or None
        With ``cv``, per fold: ``"start"``, the fixed rule the fold's gates
        started from; ``"validation_loss_curve"``, an array of shape
        ``(n_folds, max_epochs + 1)`` of the fold's out-of-fold task loss per
        epoch; ``"scores"``, for each key of ``validation_scores_``, an array
        of the folds' scores. ``None`` with ``cv=None``.
    start_ : str
        The fixed rule gate learning started from: ``"uniform average"`` (of
        the members not screened), ``"greedy soup"`` or a member alone
        (``"member i"`` or its name)
        (see Notes).
    best_epoch_ : int
        Epochs of learning kept: those of the lowest out-of-fold (or
        held-out) loss if significantly lower than the start's, else ``0``
        (the start); ``max_epochs`` without any check.
    n_iter_ : int
        Number of epochs of the final learning of the gates (of
        ``loss_curve_``).
    n_skipped_steps_ : int
        Steps of gate learning skipped because their loss or gradient was not
        finite (a sampled merge that overflows, such as an extreme member's
        gate drawn open); they changed neither the gates nor the state of the
        optimiser. Counted over every fold and the final learning.

    See Also
    --------
    SoftMergeRegressor : The same merge for skorch regressors.
    sklearn.ensemble.VotingClassifier : Averages the members' predictions, at
        the cost of one forward pass per member.

    Notes
    -----
    A gate follows the hard-concrete distribution of [2]_ with ``beta=2/3``,
    ``gamma=-0.1`` and ``zeta=1.1``. The merged value of a unit is
    ``sum_k z_k theta_k / sum_k z_k``; when every gate of a unit is closed, the
    member with the largest log-alpha carries it. The merge follows the soft
    merging approach of [1]_. Batch-norm running statistics of ``merged_net_``
    are recomputed on the training data, since neither one member's nor the
    average of the members' statistics fit the merged weights; for the same
    reason, batch-norm layers normalise with each batch's statistics while the
    gates learn.

    *Training.* The gates start from a fixed rule: the uniform average (every
    gate open), unless a member alone or the greedy soup (members added in
    order of accuracy while it does not drop; Wortsman et al., 2022) is
    significantly more accurate on at most 1,024 of the training samples (the
    test of *Validation* below); then that rule's gates start open and all
    others closed (log-alpha -3). Open gates start at log-alpha 1.5 with
    ``cv`` and at 3 with ``cv=None``: the same merge (a unit's mixing weights
    are its gates over their sum), but a gate drawn during training is clamped
    at 1, where it has no gradient, in 48% of draws at 1.5 against 80% at 3,
    so the gates learn from more of their draws. The objective is the members' own loss
    (``CrossEntropyLoss`` on logits, ``NLLLoss`` on the probabilities of a module
    ending in softmax, ``BCEWithLogitsLoss`` on the one logit of a
    ``NeuralNetBinaryClassifier``; any other criterion is replaced by the
    negative log likelihood of the predicted probabilities) plus ``l0_weight``
    times the mean expected L0 norm of all gates; dividing by the number of gates
    keeps one scale of ``l0_weight`` for every architecture and number of
    members.

    *Cross-fitting.* With ``cv``, that procedure (choose the start, learn the
    gates) runs on the training folds of every split, and the deterministic
    merge after every epoch is scored on the fold left out. The epoch of lowest
    pooled out-of-fold task loss is kept if its per-sample losses are
    significantly lower than the start's (the test of *Validation*, on the task
    loss), else the start (``best_epoch_ == 0``). The merge of that epoch is
    then checked against every fixed rule on the pooled out-of-fold errors (of
    at most 1,024 samples, as many as a held-out fifth would hold: on more, the
    samples a member memorised would let it pass), and the final gates learn on
    all of ``(X, y)`` by the same procedure, for ``best_epoch_`` epochs.
    Every sample thus teaches the final gates and takes part in the check.
    With ``cv=None``, the start, the epoch and the check are decided on a
    held-out ``validation_fraction`` instead, and with ``refit=True`` confirmed
    gates are learned again on all of ``(X, y)``.

    *Choosing l0_weight.* The penalty buys sparser gates (fewer members carry
    each unit) at some accuracy: ``0`` (the default) lets the task loss alone
    decide and was the most accurate in our benchmarks; ``1e-2`` and ``0.1``
    close more gates for a few tenths of a point; ``1`` closes every gate it
    can, leaving each unit to the member with the largest log-alpha (never to
    zero). Tune it with ``GridSearchCV`` over ``[0, 1e-2, 1e-1, 1]``; see
    ``docs/choosing-l0-weight.md`` for the measured trade-off.

    *Broken and malicious members.* A member holding NaN or inf is excluded
    before training, with a warning (``excluded_estimators_``). A member whose
    weights on a unit lie far from the members' coordinate-wise median (more
    than ten times the typical distance, and more than the median's own norm:
    weights scaled by 1e3, or replaced by large noise) has its gate on that unit
    start closed (``screened_``); learning may still open it. Unmerged
    parameters and buffers come from the first member that is not screened.

    *Prediction.* ``merged_net_`` is a net of the members' skorch class and
    parameters, so it predicts through their own predict nonlinearity (softmax
    for ``CrossEntropyLoss``, none for probabilities, sigmoid for a binary net)
    and, for a ``NeuralNetBinaryClassifier``, predicts class 1 above its
    ``threshold``, as the members do.

    *Validation.* Out of fold (on the held-out part with ``cv=None``), the
    learned merge is compared with every fixed rule: the uniform average, every
    member and the greedy soup. A candidate replaces the merge only if it is
    significantly more accurate on the same samples: the samples only it gets
    right must outnumber those only the merge gets right by more than twice
    the square root of their sum (a one-sided McNemar test at two sigma), so
    the noise of the validation samples, searched over several candidates, does
    not trade the merge for a member that is no better. Validation data that
    the members were trained on favours them (they memorised it): for the
    fairest check, fit on data some or all members did not see.

    References
    ----------
    .. [1] H. Chen, Y. Wu, P. Nguyen, C. Liu and Y. Yesha, "Soft Merging: A
       Flexible and Robust Soft Model Merging Approach for Enhanced Neural
       Network Performance", arXiv:2309.12259, 2023.
    .. [2] C. Louizos, M. Welling and D. P. Kingma, "Learning Sparse Neural
       Networks through L0 Regularization", ICLR 2018, arXiv:1712.01312.
    .. [3] S. K. Ainsworth, J. Hayase and S. Srinivasa, "Git Re-Basin: Merging
       Models modulo Permutation Symmetries", ICLR 2023, arXiv:2209.04836.
    .. [4] K. Jordan, H. Sedghi, O. Saukh, R. Entezari and B. Neyshabur,
       "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
       ICLR 2023, arXiv:2211.08403.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn.datasets import load_iris
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge import SoftMergeClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    >>> def member(seed):
    ...     torch.manual_seed(seed)
    ...     module = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                                  torch.nn.Linear(16, 3))
    ...     return NeuralNetClassifier(module, criterion=torch.nn.CrossEntropyLoss,
    ...                                max_epochs=20, lr=0.1, verbose=0).fit(X, y)
    >>> merge = SoftMergeClassifier([member(0), member(0)], max_epochs=5,
    ...                             random_state=0).fit(X, y)
    >>> merge.gates_.shape   # one gate per member and output unit: 16 + 3
    (2, 19)
    >>> merge.unit_names_[:2]
    ['0[0]', '0[1]']
    >>> merge.predict(X[:3])
    array([0, 0, 0])
    """


class SoftMergeRegressor(MemberRegressorMixin, _SoftMergeBase):
    """Merge fitted skorch regressors into one net with learned L0 gates.

    The regression counterpart of :class:`SoftMergeClassifier`, with the same
    parameters, gates and fitted attributes: each member's weights are kept as
    they are; one hard-concrete gate per member and merge unit decides how much
    the member contributes to that unit of the merged net, whose weights are
    the gate-weighted average of the members'. Only the gates are trained, on
    the members' own criterion (``MSELoss`` unless they were trained with
    another) plus an L0 penalty. After fit, the merged weights are materialised
    once in ``merged_net_``, so predicting costs one forward pass of one net.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        At least two fitted skorch ``NeuralNetRegressor`` nets of one
        architecture, or such nets wrapped in
        :class:`~sklearn.frozen.FrozenEstimator`. They are never moved,
        modified or re-fitted; ``clone`` keeps them fitted. Named as
        ``VotingClassifier`` takes them, by ``(name, net)`` pairs, a member
        goes by its name in ``validation_scores_``, ``start_``, ``selected_``,
        warnings and :func:`~sk_softmerge.plot_gates`; otherwise by
        ``"member i"``.
    l0_weight : float, default=0.0
        Weight of the mean expected L0 norm of the gates in the objective.
        Larger values close more gates, so that fewer members carry each unit;
        ``0`` (the default, the most accurate in our benchmarks) lets the task
        loss alone decide. See *Choosing l0_weight* in the Notes.
    max_epochs : int, default=12
        Passes over the training data.
    lr : float, default=0.2
        Adam learning rate of the gates' log-alphas.
    batch_size : int, default=128
        Samples per gradient step.
    granularity : {"neuron", "layer", "tensor"}, default="neuron"
        What a gate covers: one output unit or channel of a module with its
        bias (``"neuron"``), all parameters of a module (``"layer"``), or one
        parameter tensor (``"tensor"``). Neuron gates let each member carry
        the units it is good at; layer gates can only reweight whole layers.
    merge : None, str or list of str, default=None
        Name patterns (shell-style, as in :mod:`fnmatch`) of the modules or
        parameters to merge; the rest is copied from the reference member.
        ``None`` merges everything.
    cv : int, cross-validation generator, iterable or None, default=2
        How the learned gates are checked: by cross-fitting. On each fold of
        ``cv`` (what :func:`~sklearn.model_selection.check_cv` takes: an int
        gives that many unshuffled ``KFold`` folds), the gates learn on
        the other folds, from the fixed rule those choose, and the gates of
        every epoch and every fixed rule are scored on the fold left out. The
        pooled out-of-fold losses choose the number of epochs, the pooled
        out-of-fold errors whether the learned merge or a fixed rule is kept
        (see Notes); the final gates then learn on all of ``(X, y)`` for that
        many epochs. Every sample both teaches the gates and checks them.
        ``None`` holds out ``validation_fraction`` instead.
    validation_fraction : float, default=0.2
        With ``cv=None``: the fraction of ``(X, y)`` held out, at random, to
        choose the fixed rule the gates start from (uniform average, a member
        alone, greedy soup), the epoch to keep, and to compare the learned
        merge with every fixed rule. ``0`` trains on all data and compares
        nothing.
    n_iter_no_change : int or None, default=20
        Stop learning the gates once this many epochs in a row brought no new
        lowest loss on the held-out part (as scikit-learn's ``MLPClassifier``
        does); ``None`` runs all ``max_epochs``. Only with ``cv=None`` and a
        held-out part.
    align : {None, "weight_matching", "activation_matching"}, default=None
        ``None`` assumes the members share one basin (forked from one training,
        or fine-tuned from one checkpoint). Members trained from different
        random initialisations need their hidden units aligned first: copies
        of the members are permuted to match each other (Git Re-Basin),
        by their weights (``"weight_matching"``) or by the correlations of
        their hidden units on ``X`` (``"activation_matching"``); see
        :func:`~sk_softmerge.align_modules` for the supported layers.
    repair : "auto" or bool, default="auto"
        Correct the statistics of merged hidden units (REPAIR): each
        merged unit's pre-activation mean and standard deviation on ``X`` are
        brought to the gate-weighted average of the members', while the gates
        learn (with each batch's statistics) and in ``merged_net_`` (folded
        into the weights and biases, so the architecture is the members').
        Units that pass through batch norm are left to the recomputation of
        its statistics. ``"auto"`` repairs when ``align`` is set.
    refit : bool, default=True
        When the learned gates beat their start on the held-out part, learn
        them again from the same start on all of ``(X, y)`` for the number of
        epochs that the held-out part chose (``best_epoch_``), so that the
        held-out samples train the gates too. ``False`` keeps the gates that
        the held-out part checked. Only with ``cv=None`` and a held-out part
        (cross-fitting always learns the final gates on all the data).
    device : str, default="auto"
        Where the gates are learned: ``"auto"`` (CUDA when available), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``.
    random_state : int, RandomState instance or None, default=None
        Seeds the split, shuffling and gate noise; an int makes ``fit``
        repeatable.
    verbose : int, default=0
        Above zero, show a progress bar with the loss and the open gates.

    Attributes
    ----------
    n_outputs_ : int
        Number of targets per sample (``1`` for a ``y`` of shape
        ``(n_samples,)``).
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``, when ``X`` has string column
        names.
    gates_ : ndarray of shape (n_estimators, n_units)
        Deterministic gate of every member on every merged unit, in ``[0, 1]``,
        for the merge in ``merged_net_``: a unit's mixing weights are its gates
        over their sum (one-hot after a fallback to a member, all ones after a
        fallback to the uniform average, zeros for excluded members).
    unit_names_ : list of str
        Name of every merged unit.
    merged_net_ : skorch net
        A fitted ``NeuralNetRegressor`` of the members' parameters holding the
        merged weights; it can be used on its own (it predicts shape
        ``(n_samples, n_outputs)``, as skorch regressors do).
    validation_scores_ : dict of str to float or None
        Out-of-fold R^2 (with ``cv``; on the held-out part with
        ``cv=None``) of ``"soft merge"`` (the gates checked there),
        ``"uniform average"``, every member that was not excluded (by name,
        ``"member i"`` when unnamed) and ``"greedy soup"`` (when it is neither
        one member nor the average, on some fold);
        ``-inf`` for a candidate whose predictions are not finite; ``None``
        when ``cv=None`` and ``validation_fraction=0``.
    selected_ : str
        Which candidate ``merged_net_`` holds: ``"soft merge"`` (the learned
        gates, or their start when no epoch beat it) unless ``fit`` fell back
        to a fixed rule.
    named_estimators_ : Bunch
        The members by name (``"member i"`` for members given without one).
    excluded_estimators_ : list of int
        Members left out because they hold NaN or inf.
    repaired_layers_ : list of str
        Names of the layers whose output units ``repair`` corrected; empty
        without repair.
    screened_ : ndarray of shape (n_estimators, n_units), dtype bool
        Gates that started closed because the member's weights on that unit lie
        far from every other member's.
    loss_curve_ : list of float
        Mean training objective per epoch of the final learning of the gates
        (on all the data with ``cv``), over the steps that were not skipped
        (see ``n_skipped_steps_``); ``nan`` for an epoch whose every step was
        skipped.
    validation_loss_curve_ : list of float
        Task loss of the merge before learning and after every epoch: pooled
        out of fold with ``cv``, on the held-out part with ``cv=None``; empty
        when ``cv=None`` and ``validation_fraction=0``.
    cv_results_ : dict or None
        With ``cv``, per fold: ``"start"``, the fixed rule the fold's gates
        started from; ``"validation_loss_curve"``, an array of shape
        ``(n_folds, max_epochs + 1)`` of the fold's out-of-fold task loss per
        epoch; ``"scores"``, for each key of ``validation_scores_``, an array
        of the folds' scores. ``None`` with ``cv=None``.
    start_ : str
        The fixed rule gate learning started from: ``"uniform average"`` (of
        the members not screened), ``"greedy soup"`` or a member alone
        (``"member i"`` or its name)
        (see :class:`SoftMergeClassifier`).
    best_epoch_ : int
        Epochs of learning kept: those of the lowest out-of-fold (or
        held-out) loss if significantly lower than the start's, else ``0``
        (the start); ``max_epochs`` without any check.
    n_iter_ : int
        Number of epochs of the final learning of the gates (of
        ``loss_curve_``).
    n_skipped_steps_ : int
        Steps of gate learning skipped because their loss or gradient was not
        finite (a sampled merge that overflows, such as an extreme member's
        gate drawn open); they changed neither the gates nor the state of the
        optimiser. Counted over every fold and the final learning.

    See Also
    --------
    SoftMergeClassifier : The same merge for skorch classifiers; its Notes
        describe the gates, training, screening and references.
    sklearn.ensemble.VotingRegressor : Averages the members' predictions, at
        the cost of one forward pass per member.

    Notes
    -----
    Gates, training, the exclusion of members holding NaN or inf and the
    screening of extreme members are those of :class:`SoftMergeClassifier`.

    *Targets.* ``y`` of shape ``(n_samples,)`` or ``(n_samples, n_outputs)``
    needs one target per value that the members' module outputs per sample.
    ``predict`` returns the shape of the ``y`` seen in ``fit``, as scikit-learn
    regressors do; ``score`` is the coefficient of determination R^2 (averaged
    uniformly over outputs).

    *Validation.* Out of fold (on the held-out part with ``cv=None``), the
    merge is compared with every fixed rule (uniform average, every member,
    greedy soup) by their squared errors on the same samples, each output's
    error divided by the variance of its targets (of all of ``y`` out of fold,
    so that one minus the mean is the out-of-fold R^2). With ``d`` the merge's error
    minus a candidate's, sample by sample, the candidate replaces the merge
    only if ``sum(d)`` exceeds twice ``sqrt(sum(d ** 2))``: a one-sided paired
    test of the differences at two sigma, the test that the classifier's
    McNemar test is for 0/1 errors.
    Validation data that the members were trained on favours them.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn.datasets import load_diabetes
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge import SoftMergeRegressor
    >>> X, y = load_diabetes(return_X_y=True)
    >>> X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    >>> y = ((y - y.mean()) / y.std()).astype(np.float32)
    >>> def member(seed):
    ...     torch.manual_seed(seed)
    ...     module = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(),
    ...                                  torch.nn.Linear(16, 1))
    ...     return NeuralNetRegressor(module, max_epochs=20, lr=0.05,
    ...                               verbose=0).fit(X, y[:, None])
    >>> merge = SoftMergeRegressor([member(0), member(0)], max_epochs=5,
    ...                            random_state=0).fit(X, y)
    >>> merge.gates_.shape   # one gate per member and output unit: 16 + 1
    (2, 17)
    >>> merge.predict(X[:3]).shape
    (3,)
    >>> merge.score(X, y) > 0.3
    True
    """


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
    """``evaluate(forward, index=None)``: per-sample errors of a model on the
    held-out part (on at most ``MAX_START_SAMPLES`` training samples without
    one), run on ``fit.eval_batch`` samples at a time, times the samples'
    weights of mean 1 when weighted, at the positions ``index`` of the part
    (all for ``None``; the part is evaluated whole, as regression errors are
    scaled by its variance); and the number of samples of the part."""
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
    errors = weighted(errors, None if w is None else w.cpu().numpy())

    def evaluate(forward, index=None):
        found = errors(forward)
        return found if found is None or index is None else found[index]

    return evaluate, X.shape[0]


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


def _rule_book(
    fit: _Fit, evaluate, n_samples: int, average, nets, rows, names
) -> RuleBook:
    """The fixed rules' errors on ``n_samples`` samples by
    ``evaluate(forward, index)`` (the samples at the positions ``index``, all
    for ``None``)."""
    # Members are evaluated as they predict: with their own batch-norm
    # statistics.
    member_errors = [
        evaluate(fit.merger.member_forward(nets[i].module_), None) for i in rows
    ]
    return RuleBook(
        average,
        rows,
        member_errors,
        lambda gates, index: evaluate(partial(fit.merger, gates=gates), index),
        fit.task.score,
        n_samples,
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
