"""scikit-learn glue around the merging core: :class:`SoftMergeClassifier`."""

import copy
import warnings
from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from ._alignment import align_modules
from ._base import MemberClassifierMixin
from ._batchnorm import (
    has_batchnorm,
    recompute_batchnorm_statistics,
    use_batch_statistics,
)
from ._devices import resolve_device
from ._evaluation import choose, correct_predictions, member_forward
from ._export import save_merged
from ._merging import SoftMerge
from ._nets import build_merged_net
from ._screening import extreme_units, nonfinite_members
from ._tasks import classification_loss
from ._training import learn_gates, warm_start

INIT_LOG_ALPHA = 3.0
"""Gates start open (deterministic gate 1), so training starts from the average;
gates that screening finds suspicious start at minus this value, closed."""

SOFT_MERGE, UNIFORM = "soft merge", "uniform average"
AVERAGE = "average"


class SoftMergeClassifier(MemberClassifierMixin, BaseEstimator):
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
        the reference member. ``None`` merges everything.
    validation_fraction : float, default=0.2
        Fraction of ``(X, y)`` held out, stratified, to compare the merge with
        every member and with uniform weight averaging. When one of them is
        significantly more accurate than the merge there (see Notes), ``fit``
        warns and falls back to it; a member is then reproduced exactly. ``0``
        trains on all data and compares nothing.
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
        Deterministic gate of every member on every merged unit, in ``[0, 1]``,
        for the merge in ``merged_net_`` (one-hot after a fallback to a member,
        all ones after a fallback to the uniform average, zeros for excluded
        members).
    unit_names_ : list of str
        Name of every merged unit.
    merged_net_ : skorch net
        A fitted net of the members' class and parameters holding the merged
        weights; it can be used on its own.
    validation_scores_ : dict of str to float or None
        Validation accuracy of ``"soft merge"``, ``"uniform average"`` and every
        ``"member i"`` that was not excluded (``-1`` for a candidate whose
        probabilities are not finite); ``None`` when ``validation_fraction=0``.
    selected_ : str
        Which candidate ``merged_net_`` holds: ``"soft merge"`` unless ``fit``
        fell back.
    excluded_estimators_ : list of int
        Members left out because they hold NaN or inf.
    screened_ : ndarray of shape (n_estimators, n_units), dtype bool
        Gates that started closed because the member's weights on that unit lie
        far from every other member's (see Notes).
    loss_curve_ : list of float
        Mean training objective per epoch.
    validation_loss_curve_ : list of float
        Task loss of the merge on the validation data before training and after
        every epoch; empty when ``validation_fraction=0``.
    start_ : str
        Where gate learning started: ``"average"`` (the average of the members
        whose gates start open) or ``"member i"`` alone (see Notes).
    best_epoch_ : int
        Epoch whose gates were kept: the one with the lowest validation loss
        (``0``: the start); the last epoch without validation.
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

    *Training.* Gates start open (log-alpha 3), that is from the uniform average
    of the members, unless one member alone has a lower loss on the validation
    data (on the training data when ``validation_fraction=0``): then that
    member's gates start open and every other gate closed (log-alpha -3). The
    average is the better start for members that share a basin; one member is
    the better start for independently trained ones, whose average, even
    aligned, is far worse than each of them. The objective is the members' own loss plus ``l0_weight``
    times the mean expected L0 norm of all gates; dividing by the number of
    gates keeps one scale of ``l0_weight`` for every architecture and number of
    members. With validation data, the gates of the epoch with the lowest
    validation loss are kept, the initial uniform average included.

    *Choosing l0_weight.* ``0`` lets the task loss alone decide; the default
    ``1e-2`` barely closes a gate that the loss does not need; ``0.1`` closes
    gates that help little; ``1`` closes every gate it can, leaving each unit to
    the member with the largest log-alpha (never to zero). Tune it with
    ``GridSearchCV`` over ``[0, 1e-2, 1e-1, 1]``.

    *Broken and malicious members.* A member holding NaN or inf is excluded
    before training, with a warning (``excluded_estimators_``). A member whose
    weights on a unit lie far from the members' coordinate-wise median (more
    than ten times the typical distance, and more than the median's own norm:
    weights scaled by 1e3, or replaced by large noise) has its gate on that unit
    start closed (``screened_``); learning may still open it. Unmerged
    parameters and buffers come from the first member that is not screened.

    *Validation.* On the held-out part, the merge is compared with the uniform
    average and every member. A candidate replaces the merge only if it is
    significantly more accurate on the same samples: the samples only it gets
    right must outnumber those only the merge gets right by more than twice
    the square root of their sum (a one-sided McNemar test at two sigma), so
    the noise of a small validation set, searched over several candidates, does
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
        y : array-like of shape (n_samples,)
            Labels, each one of the members' classes.

        Returns
        -------
        self : SoftMergeClassifier
            The fitted estimator.
        """
        nets, X, y = self._validate_fit_data(X, y)
        device = resolve_device(self.device)
        random_state = check_random_state(self.random_state)
        X_train, X_val, y_train, y_val = _split(
            X, y, self.validation_fraction, random_state
        )
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
        _check_forward(merger, X_train)
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
        loss = classification_loss(nets[reference], device)
        start = None
        if len(kept) > 1:
            unscreened = sound.flatten().tolist()
            start = warm_start(
                merger,
                loss,
                *(validation or (X_train, y_train)),
                members=unscreened,
                log_alpha=INIT_LOG_ALPHA,
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
            correct = _validation_correct(
                merger, gates, nets, kept, reference, X_val, y_val
            )
            self.validation_scores_ = {
                name: -1.0 if c is None else float(c.mean())
                for name, c in correct.items()
            }
            self.selected_ = choose(correct, SOFT_MERGE)
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
        self.merged_net_ = build_merged_net(nets[reference], state, self.classes_)
        return self

    def save_merged(self, path):
        """Write the merged net to ``path`` with safetensors, without pickle.

        Writes the merged weights to ``path`` (ending in ``.safetensors``) and a
        JSON sidecar of the same stem (``.json``) with the classes, number of
        features, unit names, gates, tensor shapes and dtypes, the weights
        file's SHA-256 and the package version. Nothing in either file is
        executable; :func:`sk_softmerge.load_merged` checks both files and
        rebuilds the net.

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


def _split(X, y, fraction, random_state):
    """Stratified train/validation split; no validation part for ``fraction=0``."""
    if fraction == 0:
        return X, None, y, None
    seed = random_state.randint(np.iinfo(np.int32).max)
    try:
        return train_test_split(X, y, test_size=fraction, stratify=y, random_state=seed)
    except ValueError:
        # Too few samples of some class to stratify: split without it.
        return train_test_split(X, y, test_size=fraction, random_state=seed)


def _validation_correct(merger, gates, nets, kept, reference, X_val, y_val):
    """Per-sample validation correctness of the soft merge, the uniform average
    and each member.

    """
    nonlinearity = nets[reference]._get_predict_nonlinearity()
    candidates = {
        SOFT_MERGE: partial(merger, gates=gates),
        UNIFORM: partial(merger, gates=torch.ones_like(gates)),
    }
    # Members are evaluated as they predict: with their own batch-norm statistics.
    evaluation = copy.deepcopy(merger.template).eval()
    for i in kept:
        candidates[f"member {i}"] = member_forward(evaluation, nets[i].module_)
    return {
        name: correct_predictions(forward, X_val, y_val, nonlinearity)
        for name, forward in candidates.items()
    }


def _per_estimator(
    values: np.ndarray, kept: list[int], n_estimators: int
) -> np.ndarray:
    """Rows for every estimator; excluded ones get zeros (closed gates)."""
    full = np.zeros((n_estimators, values.shape[1]), dtype=values.dtype)
    full[kept] = values
    return full


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
    example = torch.as_tensor(X[:2])
    return align_modules(modules, example)


def _merged_state(merger: SoftMerge, gates: torch.Tensor, X: torch.Tensor) -> dict:
    """Merged weights, with batch-norm statistics recomputed on ``X``."""
    state = merger.merged_state_dict(gates)
    if not has_batchnorm(merger.template):
        return state
    merged = recompute_batchnorm_statistics(merger.template, X, state_dict=state)
    return merged.state_dict()
