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
from ._devices import resolve_device
from ._evaluation import choose_lowest_loss, member_forward
from ._export import save_merged
from ._merging import SoftMerge
from ._screening import extreme_units, nonfinite_members
from ._tasks import prediction_function
from ._training import learn_gates, warm_start

INIT_LOG_ALPHA = 3.0
"""Gates start open (deterministic gate 1), so training starts from the average;
gates that screening finds suspicious start at minus this value, closed, and so
do all but one member's when that member alone starts best."""

SOFT_MERGE, UNIFORM = "soft merge", "uniform average"
AVERAGE = "average"


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
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        estimators,
        *,
        l0_weight=1e-2,
        max_epochs=20,
        lr=5e-2,
        batch_size=128,
        granularity="layer",
        merge=None,
        validation_fraction=0.2,
        align=None,
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
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Learn the gates that merge the members on ``(X, y)``.

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
                stacklevel=3,
            )
        kept = [i for i in range(len(nets)) if i not in self.excluded_estimators_]
        modules = _member_modules([nets[i] for i in kept], X_train, self.align)

        merger = SoftMerge(
            modules,
            granularity=self.granularity,
            merge=self.merge,
            init_log_alpha=INIT_LOG_ALPHA,
            device=device,
        )
        screened = extreme_units(merger.theta, merger.unit_index, len(merger.units))
        with torch.no_grad():
            merger.log_alpha[screened] = -INIT_LOG_ALPHA
        # Unmerged parameters and buffers come from the first member that looks
        # sound everywhere, so a malicious member never supplies them.
        sound = (~screened.any(dim=1)).nonzero()
        position = int(sound[0]) if len(sound) else 0
        reference = kept[position]
        merger.set_reference(modules[position])
        use_batch_statistics(merger.eval().template)

        X_train = torch.as_tensor(X_train, device=device)
        self._check_targets(_check_forward(merger, X_train), y_train)
        generator = torch.Generator(device=device).manual_seed(
            int(random_state.randint(np.iinfo(np.int32).max))
        )
        # A single sound member is its own merge: there are no gates to learn.
        validation = None
        if X_val is not None:
            X_val = torch.as_tensor(X_val, device=device)
            y_val = torch.as_tensor(y_val, device=device)
            validation = (X_val, y_val)
        y_train = torch.as_tensor(y_train, device=device)
        loss = self._task_loss(nets[reference], device)
        start = None
        if len(kept) > 1:
            start = warm_start(
                merger,
                loss,
                *(validation or (X_train, y_train)),
                members=sound.flatten().tolist(),
                log_alpha=INIT_LOG_ALPHA,
                generator=generator,
            )
        self.start_ = AVERAGE if start is None else f"member {kept[start]}"
        training = learn_gates(
            merger,
            loss,
            X_train,
            y_train,
            l0_weight=self.l0_weight,
            max_epochs=self.max_epochs if len(kept) > 1 else 0,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=generator,
            validation=validation,
            verbose=self.verbose,
        )
        self.loss_curve_ = training.loss_curve
        self.validation_loss_curve_ = training.validation_loss_curve
        self.best_epoch_ = training.best_epoch
        self.n_iter_ = len(self.loss_curve_)
        self.unit_names_ = merger.unit_names
        self.screened_ = _per_estimator(screened.cpu().numpy(), kept, len(nets))

        gates = merger.gates().detach()
        self.selected_, self.validation_scores_ = SOFT_MERGE, None
        if X_val is not None:
            losses = self._validation_losses(
                merger, gates, nets, kept, reference, X_val, y_val
            )
            self.validation_scores_ = {
                name: self._score_of(loss) for name, loss in losses.items()
            }
            self.selected_ = choose_lowest_loss(losses, SOFT_MERGE)
        if self.selected_ in (SOFT_MERGE, UNIFORM):
            if self.selected_ == UNIFORM:
                gates = torch.ones_like(gates)
            state = _merged_state(merger, gates, X_train)
        else:
            member = int(self.selected_.split()[-1])
            gates = torch.zeros_like(gates)
            gates[kept.index(member)] = 1.0
            state = nets[member].module_.state_dict()
        if self.selected_ != SOFT_MERGE:
            warnings.warn(
                f"The soft merge scored {self.validation_scores_[SOFT_MERGE]:.4f} on "
                f"the validation data, significantly below {self.selected_} "
                f"({self.validation_scores_[self.selected_]:.4f}); falling back to "
                f"{self.selected_}. See validation_scores_.",
                UserWarning,
                stacklevel=3,
            )
        self.gates_ = _per_estimator(gates.cpu().numpy(), kept, len(nets))
        self.merged_net_ = self._build_net(nets[reference], state)
        return self

    def _split_validation(self, X, y, random_state):
        """The task's train/validation split; no validation part for 0."""
        if self.validation_fraction == 0:
            return X, None, y, None
        seed = random_state.randint(np.iinfo(np.int32).max)
        return self._split(X, y, self.validation_fraction, seed)

    def _validation_losses(self, merger, gates, nets, kept, reference, X_val, y_val):
        """Per-sample validation loss of the soft merge, the uniform average and
        each member (``None`` for a candidate that does not predict).

        """
        predict = prediction_function(nets[reference])
        candidates = {
            SOFT_MERGE: partial(merger, gates=gates),
            UNIFORM: partial(merger, gates=torch.ones_like(gates)),
        }
        # Members are evaluated as they predict: with their own batch-norm
        # statistics.
        evaluation = copy.deepcopy(merger.template).eval()
        for i in kept:
            candidates[f"member {i}"] = member_forward(evaluation, nets[i].module_)
        return {
            name: self._per_sample_losses(forward, X_val, y_val, predict)
            for name, forward in candidates.items()
        }

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


def _merged_state(merger: SoftMerge, gates: torch.Tensor, X: torch.Tensor) -> dict:
    """Merged weights, with batch-norm statistics recomputed on ``X``."""
    state = merger.merged_state_dict(gates)
    if not has_batchnorm(merger.template):
        return state
    merged = recompute_batchnorm_statistics(merger.template, X, state_dict=state)
    return merged.state_dict()
