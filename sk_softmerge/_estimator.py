"""The fit that every soft merge shares, whatever the members' task.

:class:`SoftMergeClassifier` and :class:`SoftMergeRegressor` differ only in
what their task mixin supplies (target validation and encoding, the
train/validation split, the loss, the per-sample validation loss and score,
``predict``); checking the members, excluding broken ones, screening,
alignment, learning the gates, the validation comparison with its fallback and
building the merged net are here, once.
"""

import copy
import warnings
from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from ._alignment import align_modules
from ._batchnorm import (
    has_batchnorm,
    recompute_batchnorm_statistics,
    use_batch_statistics,
)
from ._candidates import choose_start, fixed_rules
from ._devices import resolve_device
from ._evaluation import choose_lowest_loss, member_forward
from ._export import save_merged
from ._merging import SoftMerge
from ._screening import extreme_units, nonfinite_members
from ._tasks import prediction_function
from ._training import learn_gates

INIT_LOG_ALPHA = 3.0
"""Magnitude of the starting log-alphas: open gates of the starting rule start
at this value (deterministic gate 1), all others at minus it (gate 0)."""

MAX_START_SAMPLES = 1024
"""Without a held-out part, the fixed rules are compared on at most this many
training samples, so that the comparison stays a small part of a fit."""

SOFT_MERGE = "soft merge"


class _SoftMergeBase(BaseEstimator):
    """Parameters, ``fit`` and ``save_merged`` of the soft-merge estimators.

    A subclass puts a task mixin (``MemberClassifierMixin`` or
    ``MemberRegressorMixin``) before this class; see
    :class:`~sk_softmerge.SoftMergeClassifier` for the parameters.
    """

    _parameter_constraints: dict = {
        "estimators": [list, tuple],
        "l0_weight": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "granularity": [StrOptions({"layer", "tensor", "neuron"})],
        "merge": [None, str, list, tuple],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "align": [None, StrOptions({"weight_matching"})],
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
        max_epochs=60,
        lr=5e-2,
        batch_size=128,
        granularity="neuron",
        merge=None,
        validation_fraction=0.2,
        align=None,
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
        self.validation_fraction = validation_fraction
        self.align = align
        self.refit = refit
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
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
        X : array-like of shape (n_samples, ...)
            Training inputs, as the members take them; float64 is cast to the
            members' dtype.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets: labels, each one of the members' classes, for a
            classifier; one value per output of the members for a regressor.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        nets, X, y = self._validate_fit_data(X, y)
        device = resolve_device(self.device)
        random_state = check_random_state(self.random_state)
        X_train, X_val, y_train, y_val = self._split_validation(X, y, random_state)
        kept = self._usable_members(nets)
        merger, average, reference = self._build_merger(nets, kept, X_train, device)
        X, y, X_train, y_train = _on_device(device, X, y, X_train, y_train)
        self._check_targets(_check_forward(merger, X_train), y_train)
        generator = torch.Generator(device=device).manual_seed(
            int(random_state.randint(np.iinfo(np.int32).max))
        )
        validation = None
        if X_val is not None:
            validation = tuple(_on_device(device, X_val, y_val))
        evaluate = self._candidate_evaluation(
            merger, nets, reference, *(validation or (X_train, y_train)), generator
        )
        candidates, losses = self._fixed_rules(merger, average, nets, kept, evaluate)
        start = choose_start(candidates, losses)
        self.start_ = start.name
        merger.start_from(start.gates, INIT_LOG_ALPHA)

        loss = self._task_loss(nets[reference], device)
        learning = partial(
            learn_gates,
            merger,
            loss,
            l0_weight=self.l0_weight,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=generator,
            verbose=self.verbose,
        )
        training = learning(
            X_train,
            y_train,
            max_epochs=self.max_epochs if len(kept) > 1 else 0,
            validation=validation,
        )
        self.loss_curve_ = training.loss_curve
        self.validation_loss_curve_ = training.validation_loss_curve
        self.best_epoch_ = training.best_epoch
        self.n_iter_ = len(self.loss_curve_)

        self.selected_, self.validation_scores_ = SOFT_MERGE, None
        if validation is not None:
            merge = evaluate(partial(merger, gates=merger.gates()))
            losses = {SOFT_MERGE: merge, **losses}
            self.validation_scores_ = self._scores(losses)
            self.selected_ = choose_lowest_loss(losses, SOFT_MERGE)
        if self.selected_ == SOFT_MERGE:
            if self.refit and validation is not None and self.best_epoch_ > 0:
                merger.start_from(start.gates, INIT_LOG_ALPHA)
                learning(X, y, max_epochs=self.best_epoch_)
            gates = merger.gates().detach()
            state = _merged_state(merger, gates, X)
        else:
            fallback = next(c for c in candidates if c.name == self.selected_)
            warnings.warn(
                f"The soft merge scored {self.validation_scores_[SOFT_MERGE]:.4f} on "
                f"the validation data, significantly below {self.selected_} "
                f"({self.validation_scores_[self.selected_]:.4f}); falling back to "
                f"{self.selected_}. See validation_scores_.",
                UserWarning,
                stacklevel=3,
            )
            gates = fallback.gates
            if fallback.member is None:
                state = _merged_state(merger, gates, X)
            else:
                state = nets[fallback.member].module_.state_dict()
        self.unit_names_ = merger.unit_names
        self.gates_ = _per_estimator(gates.cpu().numpy(), kept, len(nets))
        self.merged_net_ = self._build_net(nets[reference], state)
        return self

    def _split_validation(self, X, y, random_state):
        """The task's train/validation split; no validation part for 0."""
        if self.validation_fraction == 0:
            return X, None, y, None
        seed = random_state.randint(np.iinfo(np.int32).max)
        return self._split(X, y, self.validation_fraction, seed)

    def _usable_members(self, nets) -> list[int]:
        """Positions of the members without NaN or inf; sets
        ``excluded_estimators_`` and warns about the others."""
        self.excluded_estimators_ = nonfinite_members([net.module_ for net in nets])
        if len(self.excluded_estimators_) == len(nets):
            raise ValueError(
                "Every member holds non-finite weights (NaN or inf); there is "
                "nothing to merge."
            )
        if self.excluded_estimators_:
            warnings.warn(
                f"estimators {self.excluded_estimators_} hold non-finite weights "
                "(NaN or inf) and are excluded from the merge.",
                UserWarning,
                stacklevel=4,
            )
        return [i for i in range(len(nets)) if i not in self.excluded_estimators_]

    def _build_merger(self, nets, kept, X_train, device):
        """The merger of the usable members, with extreme weights screened.

        Returns the merger, the gates of the uniform average (closed where a
        member's weights on a unit are extreme) and the position in ``nets`` of
        the reference member, the first one screened nowhere: unmerged
        parameters and buffers come from it, so a malicious member never
        supplies them. Sets ``screened_``.
        """
        modules = _member_modules([nets[i] for i in kept], X_train, self.align)
        merger = SoftMerge(
            modules,
            granularity=self.granularity,
            merge=self.merge,
            init_log_alpha=INIT_LOG_ALPHA,
            device=device,
        )
        screened = extreme_units(merger.theta, merger.unit_index, len(merger.units))
        self.screened_ = _per_estimator(screened.cpu().numpy(), kept, len(nets))
        sound = (~screened.any(dim=1)).nonzero()
        position = int(sound[0]) if len(sound) else 0
        merger.set_reference(modules[position])
        use_batch_statistics(merger.eval().template)
        return merger, (~screened).to(merger.log_alpha.dtype), kept[position]

    def _candidate_evaluation(self, merger, nets, reference, X, y, generator):
        """``evaluate(forward)``: per-sample losses of a model on the held-out
        part (on at most ``MAX_START_SAMPLES`` training samples without one)."""
        if self.validation_fraction == 0 and X.shape[0] > MAX_START_SAMPLES:
            # Training data: a subsample tells the rules apart well enough.
            keep = torch.randperm(X.shape[0], generator=generator, device=X.device)
            X, y = X[keep[:MAX_START_SAMPLES]], y[keep[:MAX_START_SAMPLES]]
        predict = prediction_function(nets[reference])
        return partial(self._per_sample_losses, X=X, y=y, predict=predict)

    def _fixed_rules(self, merger, average, nets, kept, evaluate):
        """The candidates of :func:`fixed_rules` and their per-sample losses."""
        # Members are evaluated as they predict: with their own batch-norm
        # statistics, in a copy of the template.
        template = copy.deepcopy(merger.template).eval()
        member_losses = [
            evaluate(member_forward(template, nets[i].module_)) for i in kept
        ]

        def soup_score(gates):
            return self._score_of(evaluate(partial(merger, gates=gates)))

        member_scores = [self._score_of(losses) for losses in member_losses]
        candidates = fixed_rules(average, kept, member_scores, soup_score)
        losses = dict(zip((f"member {i}" for i in kept), member_losses, strict=True))
        for candidate in candidates:
            if candidate.member is None:
                forward = partial(merger, gates=candidate.gates)
                losses[candidate.name] = evaluate(forward)
        return candidates, losses

    def _scores(self, losses: dict) -> dict[str, float]:
        return {name: self._score_of(value) for name, value in losses.items()}

    def save_merged(self, path):
        """Write the merged net to ``path`` with safetensors, without pickle.

        Writes the merged weights to ``path`` (ending in ``.safetensors``) and a
        JSON sidecar of the same stem (``.json``) with the classes (for a
        classifier), number of features, unit names, gates, tensor shapes and
        dtypes, the weights file's SHA-256 and the package version. Nothing in
        either file is executable; :func:`sk_softmerge.load_merged` checks both
        files and rebuilds the net.

        Parameters
        ----------
        path : str or path-like
            Where to write the weights; must end in ``.safetensors``. Existing
            files are replaced only once both new files are written.

        Returns
        -------
        weights_path, sidecar_path : pathlib.Path
            The two files written.

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
        ...     weights, sidecar = merge.save_merged(Path(folder) / "m.safetensors")
        ...     net = load_merged(weights, torch.nn.Linear, in_features=4,
        ...                       out_features=3)
        >>> sidecar.name
        'm.json'
        >>> np.array_equal(net.predict_proba(X), merge.predict_proba(X))
        True
        """
        return save_merged(self, path)


def _per_estimator(
    values: np.ndarray, kept: list[int], n_estimators: int
) -> np.ndarray:
    """Rows for every estimator; excluded ones get zeros (closed gates)."""
    full = np.zeros((n_estimators, values.shape[1]), dtype=values.dtype)
    full[kept] = values
    return full


def _check_forward(merger: SoftMerge, X: torch.Tensor) -> torch.Tensor:
    """The merge's output on two samples; a clear error if ``X`` does not fit."""
    try:
        with torch.no_grad():
            return merger(X[:2])
    except RuntimeError as exc:
        raise ValueError(
            f"X with sample shape {tuple(X.shape[1:])} cannot be passed through "
            f"the members' module: {exc}"
        ) from exc


def _member_modules(nets, X: np.ndarray, align: str | None) -> list:
    modules = [net.module_ for net in nets]
    if align is None:
        return modules
    example = torch.as_tensor(X[:2])
    return align_modules(modules, example)


def _on_device(device, *arrays) -> list[torch.Tensor]:
    return [torch.as_tensor(array, device=device) for array in arrays]


def _merged_state(merger: SoftMerge, gates: torch.Tensor, X: torch.Tensor) -> dict:
    """Merged weights, with batch-norm statistics recomputed on ``X``."""
    state = merger.merged_state_dict(gates)
    if not has_batchnorm(merger.template):
        return state
    merged = recompute_batchnorm_statistics(merger.template, X, state_dict=state)
    return merged.state_dict()
