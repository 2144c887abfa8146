"""scikit-learn glue around the merging core: :class:`SoftMergeClassifier`."""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._alignment import align_modules
from ._batchnorm import (
    has_batchnorm,
    recompute_batchnorm_statistics,
    use_batch_statistics,
)
from ._devices import resolve_device
from ._members import check_members
from ._merging import SoftMerge
from ._nets import build_merged_net, module_dtype
from ._tasks import classification_loss
from ._training import learn_gates

INIT_LOG_ALPHA = 3.0
"""Gates start open (deterministic gate 1), so training starts from the average."""


class SoftMergeClassifier(ClassifierMixin, BaseEstimator):
    """Merge fitted skorch classifiers into one net with learned L0 gates.

    Each member's weights are kept as they are; one hard-concrete gate per
    member and merge unit decides how much the member contributes to that unit
    of the merged net, whose weights are the gate-weighted average of the
    members'. Only the gates are trained, on the members' own loss plus an L0
    penalty. After fit, the merged weights are materialised once in
    ``merged_net_``, so predicting costs one forward pass of one net.

    Parameters
    ----------
    estimators : list of skorch nets
        At least two fitted skorch classifiers of one architecture and one set
        of classes, or such nets wrapped in
        :class:`~sklearn.frozen.FrozenEstimator`. They are never moved,
        modified or re-fitted; ``clone`` keeps them fitted.
    l0_weight : float, default=1e-2
        Weight of the mean expected L0 norm of the gates in the objective.
        Larger values close more gates; ``0`` disables the penalty.
    max_epochs : int, default=20
        Passes over the training data.
    lr : float, default=5e-2
        Adam learning rate of the gates' log-alphas.
    batch_size : int, default=128
        Samples per gradient step.
    granularity : {"layer", "tensor", "neuron"}, default="layer"
        What a gate covers: all parameters of a module (``"layer"``), one
        parameter tensor (``"tensor"``), or one output unit or channel of a
        module with its bias (``"neuron"``).
    merge : None, str or list of str, default=None
        Name patterns (shell-style, as in :mod:`fnmatch`) of the modules or
        parameters to merge, e.g. ``["0", "2.weight"]``; the rest is copied from
        the first member. ``None`` merges everything.
    align : {None, "weight_matching"}, default=None
        ``None`` assumes the members share one basin (forked from one training,
        or fine-tuned from one checkpoint). ``"weight_matching"`` first permutes
        the hidden units of copies of the members to match the first member
        (Git Re-Basin weight matching [3]_), as members trained from different
        random initialisations need; see :func:`~sk_softmerge.align_modules`
        for the supported layers.
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
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during ``fit``, when ``X`` has string column
        names.
    gates_ : ndarray of shape (n_estimators, n_units)
        Deterministic gate of every member on every merged unit, in ``[0, 1]``.
    unit_names_ : list of str
        Name of every merged unit.
    merged_net_ : skorch net
        A fitted net of the members' class and parameters holding the merged
        weights; it can be used on its own.
    loss_curve_ : list of float
        Mean training objective per epoch.
    n_iter_ : int
        Number of epochs run.

    See Also
    --------
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

    References
    ----------
    .. [1] H. Chen, Y. Wu, P. Nguyen, C. Liu and Y. Yesha, "Soft Merging: A
       Flexible and Robust Soft Model Merging Approach for Enhanced Neural
       Network Performance", arXiv:2309.12259, 2023.
    .. [2] C. Louizos, M. Welling and D. P. Kingma, "Learning Sparse Neural
       Networks through L0 Regularization", ICLR 2018, arXiv:1712.01312.
    .. [3] S. K. Ainsworth, J. Hayase and S. Srinivasa, "Git Re-Basin: Merging
       Models modulo Permutation Symmetries", ICLR 2023, arXiv:2209.04836.

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
    >>> merge.gates_.shape
    (2, 2)
    >>> merge.predict(X[:3])
    array([0, 0, 0])
    """

    _parameter_constraints: dict = {
        "estimators": [list, tuple],
        "l0_weight": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "granularity": [StrOptions({"layer", "tensor", "neuron"})],
        "merge": [None, str, list, tuple],
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
        self.align = align
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

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

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Learn the gates that merge the members on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Training inputs, as the members take them; float64 is cast to the
            members' dtype.
        y : array-like of shape (n_samples,)
            Labels, each one of the members' classes.

        Returns
        -------
        self : SoftMergeClassifier
            The fitted estimator.
        """
        nets = check_members(self.estimators)
        device = resolve_device(self.device)
        X, y = validate_data(self, X, y, allow_nd=True, dtype="numeric")
        check_classification_targets(y)
        classes = np.asarray(nets[0].classes_)
        y_index = _class_indices(y, classes)

        merger = SoftMerge(
            _member_modules(nets, X, self.align),
            granularity=self.granularity,
            merge=self.merge,
            init_log_alpha=INIT_LOG_ALPHA,
            device=device,
        ).eval()
        use_batch_statistics(merger.template)
        dtype = module_dtype(merger.template)
        X_t = torch.tensor(X, dtype=dtype, device=device)
        y_t = torch.as_tensor(y_index, device=device)
        _check_forward(merger, X_t)

        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        generator = torch.Generator(device=device).manual_seed(int(seed))
        self.loss_curve_ = learn_gates(
            merger,
            classification_loss(nets[0], device),
            X_t,
            y_t,
            l0_weight=self.l0_weight,
            max_epochs=self.max_epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=generator,
            verbose=self.verbose,
        )
        self.n_iter_ = len(self.loss_curve_)
        self.classes_ = classes
        self.gates_ = merger.gates().detach().cpu().numpy()
        self.unit_names_ = merger.unit_names
        self.merged_net_ = build_merged_net(
            nets[0], _merged_state(merger, X_t), classes
        )
        return self

    def predict_proba(self, X):
        """Class probabilities of the merged net.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs, with the shape seen during ``fit``.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Probabilities, columns in the order of ``classes_``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, allow_nd=True, dtype="numeric")
        dtype = module_dtype(self.merged_net_.module_)
        return self.merged_net_.predict_proba(X.astype(_numpy_dtype(dtype)))

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


def _class_indices(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    known = np.isin(y, classes)
    if not known.all():
        unknown = np.unique(y[~known]).tolist()
        raise ValueError(
            f"y holds labels {unknown} that the members do not know; the members' "
            f"classes are {classes.tolist()}."
        )
    sorter = np.argsort(classes)
    return sorter[np.searchsorted(classes, y, sorter=sorter)]


def _check_forward(merger: SoftMerge, X: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            merger(X[:2])
    except RuntimeError as exc:
        raise ValueError(
            f"X with sample shape {tuple(X.shape[1:])} cannot be passed through "
            f"the members' module: {exc}"
        ) from exc


def _member_modules(nets, X: np.ndarray, align: str | None) -> list:
    modules = [net.module_ for net in nets]
    if align is None:
        return modules
    example = torch.as_tensor(X[:2], dtype=module_dtype(modules[0]))
    return align_modules(modules, example)


def _merged_state(merger: SoftMerge, X: torch.Tensor) -> dict:
    state = merger.merged_state_dict()
    if not has_batchnorm(merger.template):
        return state
    merged = recompute_batchnorm_statistics(merger.template, X, state_dict=state)
    return merged.state_dict()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype
