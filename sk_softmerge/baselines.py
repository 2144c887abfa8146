"""What a user would pick instead of a soft merge, with the same interface.

Each baseline takes the same ``estimators`` as
:class:`~sk_softmerge.SoftMergeClassifier` (fitted skorch classifiers) or
:class:`~sk_softmerge.SoftMergeRegressor` (fitted skorch regressors) and
``fit(X, y)`` on held-out data, which it uses to choose among members, by
accuracy for classifiers and by R^2 for regressors, and to recompute the
batch-norm statistics of the soups:

- :class:`BestMemberClassifier`, :class:`BestMemberRegressor`: the best member
  on ``(X, y)``;
- :class:`UniformSoupClassifier`, :class:`UniformSoupRegressor`: the plain
  average of all members' weights;
- :class:`GreedySoupClassifier`, :class:`GreedySoupRegressor`: members added to
  an average in order of score while the score on ``(X, y)`` does not drop
  (Wortsman et al., 2022 [1]_);
- :class:`OutputEnsembleClassifier`, :class:`OutputEnsembleRegressor`: the
  average of the members' predicted probabilities or predictions, one forward
  pass per member.

And the published data-aware merges, which use the ``fit`` data to weigh the
members' weights:

- :class:`RegMeanClassifier`, :class:`RegMeanRegressor`: every linear layer
  (and 1-d or 2-d convolution) merged by least squares on its members' inputs
  (Jin et al., 2023 [2]_);
- :class:`FisherMergeClassifier`, :class:`FisherMergeRegressor`: every weight
  averaged in proportion to the members' Fisher information (Matena and
  Raffel, 2022 [3]_);
- :class:`LearnedSoupClassifier`, :class:`LearnedSoupRegressor`: one mixing
  weight per member and parameter tensor, learned by gradient descent
  (Wortsman et al., 2022 [1]_, the learned soup by layer).

All but the output ensembles predict with one net, ``merged_net_``, which
``save_merged`` writes without pickle. None of them changes the members.

References
----------
.. [1] M. Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
   models improves accuracy without increasing inference time", ICML 2022.
.. [2] X. Jin, X. Ren, D. Preotiuc-Pietro and P. Cheng, "Dataless knowledge
   fusion by merging weights of language models", ICLR 2023.
.. [3] M. Matena and C. Raffel, "Merging models with Fisher-weighted
   averaging", NeurIPS 2022.
"""

import numpy as np

from ._base import MemberClassifierMixin, MemberRegressorMixin
from ._soups import (
    BestMember,
    FisherMerge,
    GreedySoup,
    LearnedSoup,
    OutputEnsemble,
    RegMean,
    UniformSoup,
)

__all__ = [
    "BestMemberClassifier",
    "BestMemberRegressor",
    "FisherMergeClassifier",
    "FisherMergeRegressor",
    "GreedySoupClassifier",
    "GreedySoupRegressor",
    "LearnedSoupClassifier",
    "LearnedSoupRegressor",
    "OutputEnsembleClassifier",
    "OutputEnsembleRegressor",
    "RegMeanClassifier",
    "RegMeanRegressor",
    "UniformSoupClassifier",
    "UniformSoupRegressor",
]


class BestMemberClassifier(MemberClassifierMixin, BestMember):
    """The member most accurate on the data passed to ``fit``.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch classifiers (or ``FrozenEstimator`` of them), with one set
        of classes.

    Attributes
    ----------
    scores_ : ndarray of shape (n_estimators,)
        Accuracy of every member on the ``fit`` data (``-1`` when a member's
        probabilities are not finite).
    best_index_ : int
        Position of the chosen member.
    merged_net_ : skorch net
        A copy of the chosen member.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge.baselines import BestMemberClassifier
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> nets = [NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss, lr=0.5,
    ...     max_epochs=e, train_split=None, verbose=0).fit(X, y) for e in (1, 20)]
    >>> BestMemberClassifier(nets).fit(X, y).best_index_
    1
    """


class UniformSoupClassifier(MemberClassifierMixin, UniformSoup):
    """The plain average of all members' weights (a "uniform soup").

    ``fit`` uses its data to check it and to recompute batch-norm statistics;
    no member is left out, so a member holding NaN spoils the soup, as it would
    for a user averaging by hand.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) of one
        architecture and one set of classes.

    Attributes
    ----------
    merged_net_ : skorch net
        The averaged net; buffers come from the first member, batch-norm
        statistics recomputed on the data passed to ``fit``.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge.baselines import UniformSoupClassifier
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> nets = [NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=5, train_split=None, verbose=0).fit(X, y) for _ in range(3)]
    >>> soup = UniformSoupClassifier(nets).fit(X, y)
    >>> average = sum(n.module_.weight for n in nets) / 3
    >>> torch.allclose(soup.merged_net_.module_.weight, average)
    True
    """


class GreedySoupClassifier(MemberClassifierMixin, GreedySoup):
    """Greedy soup: add members by accuracy while the soup's accuracy holds.

    Members are ranked by accuracy on the ``fit`` data; starting from the best,
    each next member joins the average if the soup's accuracy on that data does
    not drop (Wortsman et al., 2022).

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) of one
        architecture and one set of classes.

    Attributes
    ----------
    ingredients_ : list of int
        Positions of the members in the soup, in the order they joined.
    score_ : float
        Accuracy of the soup on the ``fit`` data.
    merged_net_ : skorch net
        The soup; buffers come from the first member, batch-norm statistics
        recomputed on the data passed to ``fit``.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge.baselines import GreedySoupClassifier
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> nets = [NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss, lr=0.5,
    ...     max_epochs=e, train_split=None, verbose=0).fit(X, y) for e in (1, 20)]
    >>> GreedySoupClassifier(nets).fit(X, y).ingredients_[0]
    1
    """


class OutputEnsembleClassifier(MemberClassifierMixin, OutputEnsemble):
    """Average of the members' predicted probabilities: K forward passes.

    ``fit`` keeps copies of the members, so predicting never runs (and so never
    switches to eval mode) the user's nets.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) with one set
        of classes.

    Attributes
    ----------
    estimators_ : list of skorch nets
        Copies of the members.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge.baselines import OutputEnsembleClassifier
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> nets = [NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=5, train_split=None, verbose=0).fit(X, y) for _ in range(3)]
    >>> ensemble = OutputEnsembleClassifier(nets).fit(X, y)
    >>> ensemble.predict_proba(X[:2]).shape
    (2, 2)
    """

    def predict_proba(self, X):
        """Mean of the members' predicted probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs, with the shape seen during ``fit``.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        X = self._validate_predict_data(X)
        return np.mean([net.predict_proba(X) for net in self.estimators_], axis=0)


class BestMemberRegressor(MemberRegressorMixin, BestMember):
    """The member with the highest R^2 on the data passed to ``fit``.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch regressors (or ``FrozenEstimator`` of them).

    Attributes
    ----------
    scores_ : ndarray of shape (n_estimators,)
        R^2 of every member on the ``fit`` data (``-inf`` when a member's
        predictions are not finite).
    best_index_ : int
        Position of the chosen member.
    merged_net_ : skorch net
        A copy of the chosen member.
    n_outputs_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge.baselines import BestMemberRegressor
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = X[:, :1] - X[:, 1:]
    >>> nets = [NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, lr=0.1, max_epochs=e, train_split=None,
    ...     verbose=0).fit(X, y) for e in (1, 50)]
    >>> BestMemberRegressor(nets).fit(X, y).best_index_
    1
    """


class UniformSoupRegressor(MemberRegressorMixin, UniformSoup):
    """The plain average of all members' weights (a "uniform soup").

    ``fit`` uses its data to check it and to recompute batch-norm statistics;
    no member is left out, so a member holding NaN spoils the soup, as it would
    for a user averaging by hand.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch regressors (or ``FrozenEstimator`` of them) of one
        architecture.

    Attributes
    ----------
    merged_net_ : skorch net
        The averaged net; buffers come from the first member, batch-norm
        statistics recomputed on the data passed to ``fit``.
    n_outputs_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge.baselines import UniformSoupRegressor
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = X[:, :1] - X[:, 1:]
    >>> nets = [NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, max_epochs=5, train_split=None,
    ...     verbose=0).fit(X, y) for _ in range(3)]
    >>> soup = UniformSoupRegressor(nets).fit(X, y)
    >>> average = sum(n.module_.weight for n in nets) / 3
    >>> torch.allclose(soup.merged_net_.module_.weight, average)
    True
    """


class GreedySoupRegressor(MemberRegressorMixin, GreedySoup):
    """Greedy soup: add members by R^2 while the soup's R^2 holds.

    Members are ranked by R^2 on the ``fit`` data; starting from the best, each
    next member joins the average if the soup's R^2 on that data does not drop
    (Wortsman et al., 2022).

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch regressors (or ``FrozenEstimator`` of them) of one
        architecture.

    Attributes
    ----------
    ingredients_ : list of int
        Positions of the members in the soup, in the order they joined.
    score_ : float
        R^2 of the soup on the ``fit`` data.
    merged_net_ : skorch net
        The soup; buffers come from the first member, batch-norm statistics
        recomputed on the data passed to ``fit``.
    n_outputs_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge.baselines import GreedySoupRegressor
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = X[:, :1] - X[:, 1:]
    >>> nets = [NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, lr=0.1, max_epochs=e, train_split=None,
    ...     verbose=0).fit(X, y) for e in (1, 50)]
    >>> GreedySoupRegressor(nets).fit(X, y).ingredients_[0]
    1
    """


class OutputEnsembleRegressor(MemberRegressorMixin, OutputEnsemble):
    """Average of the members' predictions: K forward passes.

    ``fit`` keeps copies of the members, so predicting never runs (and so never
    switches to eval mode) the user's nets.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch regressors (or ``FrozenEstimator`` of them).

    Attributes
    ----------
    estimators_ : list of skorch nets
        Copies of the members.
    n_outputs_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge.baselines import OutputEnsembleRegressor
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = X[:, 0] - X[:, 1]
    >>> nets = [NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, max_epochs=5, train_split=None,
    ...     verbose=0).fit(X, y[:, None]) for _ in range(3)]
    >>> ensemble = OutputEnsembleRegressor(nets).fit(X, y)
    >>> ensemble.predict(X[:2]).shape
    (2,)
    """

    def predict(self, X):
        """Mean of the members' predictions.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs, with the shape seen during ``fit``.

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            Of the shape of the ``y`` passed to ``fit``.
        """
        X = self._validate_predict_data(X)
        mean = np.mean([net.predict(X) for net in self.estimators_], axis=0)
        return self._predict_outputs(mean)


class RegMeanClassifier(MemberClassifierMixin, RegMean):
    """RegMean: each linear layer merged by least squares on the members' inputs.

    For every ``Linear`` layer, and every ``Conv1d`` and ``Conv2d`` of one
    group and fixed zero padding (as the linear map of its unfolded input
    patches), the merged weight ``W`` (bias as a last column) solves
    ``sum_k ||X_k W^T - X_k W_k^T||^2``, ``X_k`` the layer's inputs in member
    ``k`` on the ``fit`` data, through the Gram matrices ``G_k = X_k^T X_k``
    with their off-diagonal entries scaled by ``alpha`` (Jin et al., 2023).
    Other parameters (norms, embeddings) are averaged; batch-norm statistics
    are recomputed on the ``fit`` data. Memory: one ``(d + 1)^2`` float64
    Gram matrix per layer of ``d`` inputs (``in_channels * kernel_size`` for
    a convolution) and member. No member is left out, so a member holding NaN
    spoils the merge, as it spoils the uniform soup.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) of one
        architecture and one set of classes.
    alpha : float, default=0.9
        Scale of the Gram matrices' off-diagonal entries, in [0, 1]: 1 is the
        exact least-squares merge, 0 weighs each input's column by its
        members' squared inputs alone. The paper's recommended 0.9 keeps
        the merge from overfitting inputs that are nearly collinear.

    Attributes
    ----------
    solved_layers_ : list of str
        Names of the layers merged by least squares (``""`` for a module that
        is itself one); the others' parameters are averaged.
    merged_net_ : skorch net
        The merged net; buffers come from the first member, batch-norm
        statistics recomputed on the data passed to ``fit``.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge.baselines import RegMeanClassifier
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> nets = [NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=5, train_split=None, verbose=0).fit(X, y) for _ in range(3)]
    >>> merge = RegMeanClassifier(nets).fit(X, y)
    >>> merge.solved_layers_
    ['']
    """


class FisherMergeClassifier(MemberClassifierMixin, FisherMerge):
    """Fisher merging: each weight averaged in proportion to its Fisher information.

    Member ``k``'s value of each weight is weighed by the diagonal of its
    Fisher information there: the mean over the ``fit`` data of the squared
    per-sample gradient of the member's own loss (Matena and Raffel, 2022).
    Each member's Fisher is divided by its norm over all weights, then
    floored at 1e-6: where no member has information above the floor (a dead
    unit, an input that is always zero, a member whose gradients are all
    zero), the weight is the plain average. Batch-norm statistics are
    recomputed on the ``fit`` data. Costs a forward and a backward pass of
    each member per batch, the squares of a ``Linear`` layer's per-sample
    gradients formed as one product, every other weight's per-sample
    gradients batched with ``torch.func.vmap``; memory, one Fisher per member
    (the size of a member). No member is left out, so a member
    holding NaN spoils the merge, as it spoils the uniform soup.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) of one
        architecture and one set of classes.
    fisher : {"sampled", "empirical"}, default="sampled"
        ``"sampled"``: the gradients' labels are drawn from each member's own
        predictive distribution (its class probabilities): the Fisher
        information proper.
        ``"empirical"``: the labels of the ``fit`` data.
    random_state : int, RandomState instance or None, default=None
        Draws the sampled labels.

    Attributes
    ----------
    merged_net_ : skorch net
        The merged net; buffers come from the first member, batch-norm
        statistics recomputed on the data passed to ``fit``.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge.baselines import FisherMergeClassifier
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> nets = [NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=5, train_split=None, verbose=0).fit(X, y) for _ in range(3)]
    >>> merge = FisherMergeClassifier(nets, random_state=0).fit(X, y)
    >>> merge.predict(X[:3]).shape
    (3,)
    """


class LearnedSoupClassifier(MemberClassifierMixin, LearnedSoup):
    """The learned soup by layer: a mixing weight per member and tensor, learned.

    Every parameter tensor of the soup is the average of the members' values
    weighted by the softmax, over the members, of one learned logit per member
    and tensor. The logits start equal (the uniform soup) and are learned with
    Adam on the members' loss of the ``fit`` data, with a learned temperature
    multiplying the logits (for members trained with ``CrossEntropyLoss`` or
    ``BCEWithLogitsLoss``), as the paper's code does: 5 epochs, learning rate
    0.05, batches of 256 (Wortsman et al., 2022, appendix I). Batch-norm
    statistics are recomputed on the ``fit`` data. Memory: the members'
    stacked weights, and one step's activations.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) of one
        architecture and one set of classes.
    max_epochs : int, default=5
        Passes over the ``fit`` data.
    lr : float, default=0.05
        Adam's learning rate.
    batch_size : int, default=256
        Samples per step.
    random_state : int, RandomState instance or None, default=None
        Draws the order of the samples.

    Attributes
    ----------
    mixing_weights_ : ndarray of shape (n_estimators, n_tensors)
        Each member's weight in each parameter tensor; columns sum to 1.
    tensor_names_ : list of str
        The parameter tensors, in the order of the columns.
    temperature_ : float
        The learned temperature.
    loss_curve_ : list of float
        Mean training loss of every epoch.
    merged_net_ : skorch net
        The soup; buffers come from the first member, batch-norm statistics
        recomputed on the data passed to ``fit``.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge.baselines import LearnedSoupClassifier
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> nets = [NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=5, train_split=None, verbose=0).fit(X, y) for _ in range(3)]
    >>> soup = LearnedSoupClassifier(nets, random_state=0).fit(X, y)
    >>> soup.tensor_names_, soup.mixing_weights_.sum(axis=0).round(5)
    (['weight', 'bias'], array([1., 1.], dtype=float32))
    """


class RegMeanRegressor(MemberRegressorMixin, RegMean):
    """RegMean: each linear layer merged by least squares on the members' inputs.

    For every ``Linear`` layer, and every ``Conv1d`` and ``Conv2d`` of one
    group and fixed zero padding (as the linear map of its unfolded input
    patches), the merged weight ``W`` (bias as a last column) solves
    ``sum_k ||X_k W^T - X_k W_k^T||^2``, ``X_k`` the layer's inputs in member
    ``k`` on the ``fit`` data, through the Gram matrices ``G_k = X_k^T X_k``
    with their off-diagonal entries scaled by ``alpha`` (Jin et al., 2023).
    Other parameters (norms, embeddings) are averaged; batch-norm statistics
    are recomputed on the ``fit`` data. Memory: one ``(d + 1)^2`` float64
    Gram matrix per layer of ``d`` inputs (``in_channels * kernel_size`` for
    a convolution) and member. No member is left out, so a member holding NaN
    spoils the merge, as it spoils the uniform soup.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch regressors (or ``FrozenEstimator`` of them) of one
        architecture.
    alpha : float, default=0.9
        Scale of the Gram matrices' off-diagonal entries, in [0, 1]: 1 is the
        exact least-squares merge, 0 weighs each input's column by its
        members' squared inputs alone. The paper's recommended 0.9 keeps
        the merge from overfitting inputs that are nearly collinear.

    Attributes
    ----------
    solved_layers_ : list of str
        Names of the layers merged by least squares (``""`` for a module that
        is itself one); the others' parameters are averaged.
    merged_net_ : skorch net
        The merged net; buffers come from the first member, batch-norm
        statistics recomputed on the data passed to ``fit``.
    n_outputs_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge.baselines import RegMeanRegressor
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = X[:, :1] - X[:, 1:]
    >>> nets = [NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, max_epochs=5, train_split=None,
    ...     verbose=0).fit(X, y) for _ in range(3)]
    >>> merge = RegMeanRegressor(nets).fit(X, y)
    >>> merge.solved_layers_
    ['']
    """


class FisherMergeRegressor(MemberRegressorMixin, FisherMerge):
    """Fisher merging: each weight averaged in proportion to its Fisher information.

    Member ``k``'s value of each weight is weighed by the diagonal of its
    Fisher information there: the mean over the ``fit`` data of the squared
    per-sample gradient of the member's own loss (Matena and Raffel, 2022).
    Each member's Fisher is divided by its norm over all weights, then
    floored at 1e-6: where no member has information above the floor (a dead
    unit, an input that is always zero, a member whose gradients are all
    zero), the weight is the plain average. Batch-norm statistics are
    recomputed on the ``fit`` data. Costs a forward and a backward pass of
    each member per batch, the squares of a ``Linear`` layer's per-sample
    gradients formed as one product, every other weight's per-sample
    gradients batched with ``torch.func.vmap``; memory, one Fisher per member
    (the size of a member). No member is left out, so a member
    holding NaN spoils the merge, as it spoils the uniform soup.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch regressors (or ``FrozenEstimator`` of them) of one
        architecture.
    fisher : {"sampled", "empirical"}, default="sampled"
        ``"sampled"``: the gradients' labels are drawn from each member's own
        predictive distribution (a Gaussian of unit variance around its
        prediction): the Fisher information proper.
        ``"empirical"``: the labels of the ``fit`` data.
    random_state : int, RandomState instance or None, default=None
        Draws the sampled labels.

    Attributes
    ----------
    merged_net_ : skorch net
        The merged net; buffers come from the first member, batch-norm
        statistics recomputed on the data passed to ``fit``.
    n_outputs_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge.baselines import FisherMergeRegressor
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = X[:, :1] - X[:, 1:]
    >>> nets = [NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, max_epochs=5, train_split=None,
    ...     verbose=0).fit(X, y) for _ in range(3)]
    >>> merge = FisherMergeRegressor(nets, random_state=0).fit(X, y)
    >>> merge.predict(X[:3]).shape
    (3, 1)
    """


class LearnedSoupRegressor(MemberRegressorMixin, LearnedSoup):
    """The learned soup by layer: a mixing weight per member and tensor, learned.

    Every parameter tensor of the soup is the average of the members' values
    weighted by the softmax, over the members, of one learned logit per member
    and tensor. The logits start equal (the uniform soup) and are learned with
    Adam on the members' loss of the ``fit`` data, as the
    paper's code does: 5 epochs, learning rate 0.05, batches of 256
    (Wortsman et al., 2022, appendix I). Batch-norm statistics are recomputed
    on the ``fit`` data. Memory: the members' stacked weights, and one step's
    activations.

    Parameters
    ----------
    estimators : list of skorch nets, or of (str, skorch net) pairs
        Fitted skorch regressors (or ``FrozenEstimator`` of them) of one
        architecture.
    max_epochs : int, default=5
        Passes over the ``fit`` data.
    lr : float, default=0.05
        Adam's learning rate.
    batch_size : int, default=256
        Samples per step.
    random_state : int, RandomState instance or None, default=None
        Draws the order of the samples.

    Attributes
    ----------
    mixing_weights_ : ndarray of shape (n_estimators, n_tensors)
        Each member's weight in each parameter tensor; columns sum to 1.
    tensor_names_ : list of str
        The parameter tensors, in the order of the columns.
    temperature_ : float
        The learned temperature (1.0: regressors learn none).
    loss_curve_ : list of float
        Mean training loss of every epoch.
    merged_net_ : skorch net
        The soup; buffers come from the first member, batch-norm statistics
        recomputed on the data passed to ``fit``.
    n_outputs_ : int
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge.baselines import LearnedSoupRegressor
    >>> X = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    >>> y = X[:, :1] - X[:, 1:]
    >>> nets = [NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, max_epochs=5, train_split=None,
    ...     verbose=0).fit(X, y) for _ in range(3)]
    >>> soup = LearnedSoupRegressor(nets, random_state=0).fit(X, y)
    >>> soup.tensor_names_, soup.mixing_weights_.sum(axis=0).round(5)
    (['weight', 'bias'], array([1., 1.], dtype=float32))
    """
