"""What every estimator built over fitted skorch members shares.

Member checking and data validation at fit, ``clone`` that keeps the fitted
members, prediction through the one net in ``merged_net_``, and what differs
between tasks: how targets are encoded and split, the loss the gates train on,
and how a candidate model is scored on held-out data. The classifier mixin and
the regressor mixin supply these to the merge and to the baselines alike.
"""

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin, clone
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._evaluation import correct_predictions, scaled_squared_errors
from ._members import check_members
from ._nets import build_merged_net, module_dtype
from ._tasks import classification_loss, regression_loss


class _MemberMixin:
    """Shared by every estimator whose ``estimators`` are fitted skorch members.

    Subclasses set ``_task`` (a task of :func:`~sk_softmerge._members.check_members`)
    and, when they predict with one net, ``merged_net_`` in ``fit``.
    """

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

        Sets ``n_features_in_`` (and ``feature_names_in_``); returns the nets and
        ``X`` in the members' dtype.
        """
        nets = check_members(self.estimators, self._task)
        X, y = validate_data(self, X, y, allow_nd=True, dtype="numeric", **check_y)
        self._input_dtype = numpy_dtype(module_dtype(nets[0].module_))
        return nets, X.astype(self._input_dtype), y

    def _validate_predict_data(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, allow_nd=True, dtype="numeric")
        # A read-only view (of a pandas frame, say) would make torch warn.
        return np.require(X, dtype=self._input_dtype, requirements="W")

    def _check_targets(self, output: torch.Tensor, y: np.ndarray) -> None:
        """Check ``y`` against the members' output on two samples; no-op here."""


class MemberClassifierMixin(ClassifierMixin, _MemberMixin):
    """Mixin for classifiers whose ``estimators`` are fitted skorch members.

    Subclasses store the members in ``estimators`` and, when they predict with
    one net, set ``merged_net_`` in ``fit``.
    """

    _task = "classification"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags

    def _validate_fit_data(self, X, y):
        """Check members and data; set ``classes_`` and ``n_features_in_``.

        Returns the unwrapped nets, ``X`` as an array and ``y`` as indices into
        ``classes_``.
        """
        nets, X, y = self._check_members_and_X(X, y)
        check_classification_targets(y)
        self.classes_ = np.asarray(nets[0].classes_)
        # A binary skorch net predicts 1 above its threshold, not by argmax.
        self._threshold = getattr(nets[0], "threshold", None)
        return nets, X, class_indices(y, self.classes_)

    @staticmethod
    def _split(X, y, fraction, seed):
        """Stratified train/validation split (plain when a class is too rare)."""
        try:
            return train_test_split(
                X, y, test_size=fraction, stratify=y, random_state=seed
            )
        except ValueError:
            return train_test_split(X, y, test_size=fraction, random_state=seed)

    @staticmethod
    def _task_loss(net, device):
        return classification_loss(net, device)

    @staticmethod
    def _per_sample_losses(forward, X, y, predict):
        """Misclassifications (bool), or None when the model does not predict."""
        correct = correct_predictions(forward, X, y, predict)
        return None if correct is None else ~correct

    @staticmethod
    def _score_of(losses) -> float:
        """Accuracy; -1 for a model that does not predict."""
        return -1.0 if losses is None else float((~losses).mean())

    def _build_net(self, reference, state_dict):
        return build_merged_net(reference, state_dict, self.classes_)

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

    _task = "regression"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _validate_fit_data(self, X, y):
        """Check members and data; set ``n_outputs_`` and ``n_features_in_``.

        Returns the unwrapped nets, ``X`` as an array and ``y`` of shape
        ``(n_samples, n_outputs)``, both in the members' dtype.
        """
        nets, X, y = self._check_members_and_X(X, y, multi_output=True, y_numeric=True)
        self._target_shape = y.shape[1:]
        y = y.reshape(len(y), -1)
        self.n_outputs_ = y.shape[1]
        return nets, X, y.astype(self._input_dtype)

    def _check_targets(self, output, y):
        n_values = output[0].numel()
        if n_values != self.n_outputs_:
            raise ValueError(
                f"y has {self.n_outputs_} target(s) per sample, but the members' "
                f"module outputs {n_values} value(s) per sample (output shape "
                f"{tuple(output.shape[1:])}); y must have one target per output."
            )

    @staticmethod
    def _split(X, y, fraction, seed):
        return train_test_split(X, y, test_size=fraction, random_state=seed)

    @staticmethod
    def _task_loss(net, device):
        return regression_loss(net, device)

    @staticmethod
    def _per_sample_losses(forward, X, y, predict):
        """Squared errors scaled so that R^2 is one minus their mean."""
        return scaled_squared_errors(forward, X, y, predict)

    @staticmethod
    def _score_of(losses) -> float:
        """R^2; minus infinity for a model whose predictions are not finite."""
        return -np.inf if losses is None else float(1 - losses.mean())

    def _build_net(self, reference, state_dict):
        return build_merged_net(reference, state_dict)

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
