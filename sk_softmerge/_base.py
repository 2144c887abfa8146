"""What every classifier built over fitted members shares.

Member checking and data validation at fit, ``clone`` that keeps the fitted
members, and prediction through the one net in ``merged_net_``.
"""

import numpy as np
import torch
from sklearn.base import ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._members import check_members
from ._nets import module_dtype


class MemberClassifierMixin(ClassifierMixin):
    """Mixin for classifiers whose ``estimators`` are fitted skorch members.

    Subclasses store the members in ``estimators`` and, when they predict with
    one net, set ``merged_net_`` in ``fit``.
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
        tags.classifier_tags.multi_label = False
        return tags

    def _validate_fit_data(self, X, y):
        """Check members and data; set ``classes_`` and ``n_features_in_``.

        Returns the unwrapped nets, ``X`` as an array and ``y`` as indices into
        ``classes_``.
        """
        nets = check_members(self.estimators)
        X, y = validate_data(self, X, y, allow_nd=True, dtype="numeric")
        check_classification_targets(y)
        self.classes_ = np.asarray(nets[0].classes_)
        self._input_dtype = numpy_dtype(module_dtype(nets[0].module_))
        return nets, X.astype(self._input_dtype), class_indices(y, self.classes_)

    def _validate_predict_data(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, allow_nd=True, dtype="numeric")
        return X.astype(self._input_dtype, copy=False)

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
        return self.classes_[proba.argmax(axis=1)]


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
