"""scikit-learn glue around the merging core: :class:`SoftMergeClassifier`."""

from ._base import MemberClassifierMixin
from ._estimator import _SoftMergeBase


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
        for the merge in ``merged_net_`` (one-hot after a fallback to a member,
        all ones after a fallback to the uniform average, zeros for excluded
        members).
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
        Mean training objective per epoch, over the steps that were not
        skipped (see ``n_skipped_steps_``); ``nan`` for an epoch whose every
        step was skipped.
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
        optimiser. Counted over the epochs of ``loss_curve_``.

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
    gate open, log-alpha 3), unless a member alone or the greedy soup (members
    added in order of accuracy while it does not drop; Wortsman et al., 2022)
    is significantly more accurate on at most 1,024 of the training samples
    (the test of *Validation* below); then that rule's gates start open and
    all others closed (log-alpha -3). The objective is the members' own loss
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
    all of ``(X, y)`` by the same procedure, for as many steps as the folds'
    gates took in ``best_epoch_`` epochs. Every sample thus teaches the final
    gates and takes part in the check. With ``cv=None``, the start, the epoch
    and the check are decided on a held-out ``validation_fraction`` instead,
    and with ``refit=True`` confirmed gates are learned again on all of
    ``(X, y)``.

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
