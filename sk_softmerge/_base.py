"""What every estimator built over fitted skorch members shares.

Member checking and data validation at fit, ``clone`` that keeps the fitted
members, and prediction through the one net in ``merged_net_``. At fit, the
classifier mixin and the regressor mixin validate the targets and return the
:class:`~sk_softmerge._tasks.Task` that the shared fit (and the baselines') use
for everything else that differs between tasks.
"""

import copy

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin, clone
from sklearn.utils import Bunch
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    check_consistent_length,
    check_is_fitted,
    validate_data,
)

from ._export import save_merged
from ._inputs import InputDict, cast, check_dict, is_dict, takes_integers
from ._members import check_members, split_names
from ._nets import module_dtype
from ._tasks import ClassificationTask, RegressionTask


class _MemberMixin:
    """Shared by every estimator whose ``estimators`` are fitted skorch members.

    Subclasses set ``_task_name`` (a task of
    :func:`~sk_softmerge._members.check_members`), implement
    ``_validate_fit_data(X, y)`` returning ``(nets, X, y, task)`` and
    ``_fit``, the steps of ``fit`` that :meth:`_fit_atomically` runs on a
    scratch copy, and, when they predict with one net, set ``merged_net_``
    there.
    """

    _FITTED_PRIVATE = (
        "_input_dtype",
        "_integer_inputs",
        "_input_keys",
        "_threshold",
        "_target_shape",
    )
    """Private attributes that ``fit`` sets, besides the public ones ending in _."""

    def _fit_atomically(self, *args, **kwargs):
        """Run ``_fit(*args, **kwargs)`` on a shallow copy and take its fitted
        state only once it succeeded: a refused or failed fit leaves an earlier
        fit exactly as it was. Returns ``self``."""
        scratch = copy.copy(self)  # shares the parameters (members, random state)
        scratch._forget_fit()
        scratch._fit(*args, **kwargs)
        self._forget_fit()
        for name, value in vars(scratch).items():
            if self._is_fitted_attribute(name):
                setattr(self, name, value)
        return self

    def _forget_fit(self) -> None:
        for name in [name for name in vars(self) if self._is_fitted_attribute(name)]:
            delattr(self, name)

    def _is_fitted_attribute(self, name: str) -> bool:
        return (
            name.endswith("_") and not name.startswith("__")
        ) or name in self._FITTED_PRIVATE

    def __sklearn_clone__(self):
        # The default clone would clone each member, and cloning a skorch net
        # un-fits it; the members are inputs to be kept, as FrozenEstimator does.
        params = self.get_params(deep=False)
        estimators = params.pop("estimators")
        return type(self)(estimators, **clone(params, safe=False))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    def _check_members_and_X(self, X, y, **check_y):
        """Unwrap and check the members, validate ``X`` and ``y``.

        ``X`` is an array, or a dict of arrays (one per keyword argument of the
        members' forward, as skorch takes it). Sets ``n_features_in_`` (and
        ``feature_names_in_``) for an array; returns the nets and ``X`` in the
        members' float dtype, integers kept as int64 for members holding an
        embedding.
        """
        nets = check_members(self.estimators, self._task_name)
        members, names = split_names(self.estimators)
        self.named_estimators_ = Bunch(**dict(zip(names, members, strict=True)))
        self._input_dtype = numpy_dtype(module_dtype(nets[0].module_))
        self._integer_inputs = takes_integers(nets[0].module_)
        if is_dict(X):
            X = check_dict(X)
            y = validate_data(self, y=y, **check_y)
            check_consistent_length(X, y)
            for attribute in ("n_features_in_", "feature_names_in_"):
                if hasattr(self, attribute):  # from an earlier fit on an array
                    delattr(self, attribute)
            self._input_keys = list(X)
        else:
            X, y = validate_data(self, X, y, allow_nd=True, dtype="numeric", **check_y)
            self._input_keys = None
        return nets, self._cast(X), y

    def _cast(self, X):
        """``X`` (array or InputDict) in the dtypes the members take."""
        if isinstance(X, InputDict):
            return InputDict(**{key: self._cast(value) for key, value in X.items()})
        return cast(X, self._input_dtype, self._integer_inputs)

    def _validate_predict_data(self, X):
        check_is_fitted(self)
        keys = getattr(self, "_input_keys", None)
        if is_dict(X) != (keys is not None):
            fitted = "a dict of arrays" if keys is not None else "one array"
            raise ValueError(
                f"X is {'a dict' if is_dict(X) else 'an array'}, but the "
                f"estimator was fitted with {fitted}."
            )
        if keys is not None:
            return self._cast(check_dict(X, keys))
        X = validate_data(self, X, reset=False, allow_nd=True, dtype="numeric")
        # A read-only view (of a pandas frame, say) would make torch warn.
        return self._cast(X)


class MemberClassifierMixin(ClassifierMixin, _MemberMixin):
    """Mixin for classifiers whose ``estimators`` are fitted skorch members.

    Subclasses store the members in ``estimators`` and, when they predict with
    one net, set ``merged_net_`` in ``fit``.
    """

    _task_name = "classification"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags

    def _validate_fit_data(self, X, y):
        """Check members and data; set ``classes_`` and ``n_features_in_``.

        Returns the unwrapped nets, ``X`` as an array, ``y`` as indices into
        ``classes_`` and the :class:`~sk_softmerge._tasks.ClassificationTask`.
        """
        nets, X, y = self._check_members_and_X(X, y)
        check_classification_targets(y)
        self.classes_ = np.asarray(nets[0].classes_)
        # A binary skorch net predicts 1 above its threshold, not by argmax.
        self._threshold = getattr(nets[0], "threshold", None)
        task = ClassificationTask(classes=self.classes_, threshold=self._threshold)
        return nets, X, class_indices(y, self.classes_), task

    def predict_proba(self, X):
        """Class probabilities, from one forward pass of ``merged_net_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs, with the shape seen during ``fit``.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Probabilities, columns in the order of ``classes_``.
        """
        X = self._validate_predict_data(X)
        return self.merged_net_.predict_proba(X)

    def predict(self, X):
        """Predicted class of every sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs, with the shape seen during ``fit``.

        Returns
        -------
        y : ndarray of shape (n_samples,)
            Labels taken from ``classes_``.
        """
        proba = self.predict_proba(X)
        if self._threshold is not None:
            return self.classes_[(proba[:, 1] > self._threshold).astype(int)]
        return self.classes_[proba.argmax(axis=1)]


class MemberRegressorMixin(RegressorMixin, _MemberMixin):
    """Mixin for regressors whose ``estimators`` are fitted skorch members.

    Subclasses store the members in ``estimators`` and, when they predict with
    one net, set ``merged_net_`` in ``fit``. Targets are one value per sample
    (``y`` of shape ``(n_samples,)``) or several (``(n_samples, n_outputs)``);
    predictions take the shape of the ``y`` seen in ``fit``.
    """

    _task_name = "regression"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _validate_fit_data(self, X, y):
        """Check members and data; set ``n_outputs_`` and ``n_features_in_``.

        Returns the unwrapped nets, ``X`` as an array, ``y`` of shape
        ``(n_samples, n_outputs)``, both in the members' dtype, and the
        :class:`~sk_softmerge._tasks.RegressionTask`.
        """
        nets, X, y = self._check_members_and_X(X, y, multi_output=True, y_numeric=True)
        self._target_shape = y.shape[1:]
        y = y.reshape(len(y), -1)
        self.n_outputs_ = y.shape[1]
        task = RegressionTask(n_outputs=self.n_outputs_)
        return nets, X, y.astype(self._input_dtype), task

    def _predict_outputs(self, predictions: np.ndarray) -> np.ndarray:
        """Predictions in the shape of the ``y`` seen in ``fit``."""
        return predictions.reshape(len(predictions), *self._target_shape)

    def predict(self, X):
        """Predicted targets, from one forward pass of ``merged_net_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs, with the shape seen during ``fit``.

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            Predictions, of the shape of the ``y`` passed to ``fit``.
        """
        X = self._validate_predict_data(X)
        return self._predict_outputs(self.merged_net_.predict(X))


def class_indices(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Position of every label of ``y`` in ``classes``.

    Raises
    ------
    ValueError
        If ``y`` holds a label that is not in ``classes``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._base import class_indices
    >>> class_indices(np.array(["b", "a"]), np.array(["a", "b"]))
    array([1, 0])
    """
    known = np.isin(y, classes)
    if not known.all():
        unknown = np.unique(y[~known]).tolist()
        raise ValueError(
            f"y holds labels {unknown} that the members do not know; the members' "
            f"classes are {classes.tolist()}."
        )
    sorter = np.argsort(classes)
    return sorter[np.searchsorted(classes, y, sorter=sorter)]


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """NumPy dtype of a torch dtype.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._base import numpy_dtype
    >>> numpy_dtype(torch.float32)
    dtype('float32')
    """
    return torch.empty((), dtype=dtype).numpy().dtype


def weighted_samples(X, y, sample_weight):
    """``X``, ``y`` and the checked weights without the samples of weight
    zero, as if absent; the weights are ``None`` when ``sample_weight`` is.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._base import weighted_samples
    >>> X, y, w = weighted_samples(np.arange(3.0)[:, None], np.arange(3), [1, 0, 2])
    >>> y, w
    (array([0, 2]), array([1., 2.]))
    """
    if sample_weight is None:
        return X, y, None
    weights = np.asarray(sample_weight, dtype=np.float64)
    if weights.shape != (len(y),):
        raise ValueError(
            f"sample_weight must hold one weight per sample, of shape ({len(y)},); "
            f"got shape {weights.shape}."
        )
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError(
            "sample_weight must be finite and non-negative; got values from "
            f"{weights.min()} to {weights.max()}."
        )
    present = weights > 0
    if not present.any():
        raise ValueError(
            "Every sample_weight is zero: there is no sample to learn the gates on."
        )
    if present.all():
        return X, y, weights
    return X[present], y[present], weights[present]


class MergedNetMixin:
    """``save_merged`` for an estimator that predicts with one net,
    ``merged_net_``: the soft merges and the baselines but the ensembles."""

    def save_merged(self, path):
        """Write the merged net to ``path`` with safetensors, without pickle.

        Writes one file, ending in ``.safetensors``: the merged weights (and the
        criterion's tensor arguments) as tensors, and in its header metadata a
        JSON document with the classes (for a classifier), number of features,
        unit names and gates (none for a baseline's merge), tensor shapes and
        dtypes, the SHA-256 of the tensor data and the package version. Nothing
        in the file is executable; :func:`sk_softmerge.load_merged` checks it
        and rebuilds the net.

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
