"""scikit-learn glue around the merging core: :class:`SoftMergeRegressor`."""

from ._base import MemberRegressorMixin
from ._estimator import _SoftMergeBase


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
        for the merge in ``merged_net_`` (one-hot after a fallback to a member,
        all ones after a fallback to the uniform average, zeros for excluded
        members).
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
        optimiser. Counted over the epochs of ``loss_curve_``.

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
