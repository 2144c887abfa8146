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

All but the output ensembles predict with one net, ``merged_net_``. None of
them changes the members.

References
----------
.. [1] M. Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
   models improves accuracy without increasing inference time", ICML 2022.
"""

import numpy as np

from ._base import MemberClassifierMixin, MemberRegressorMixin
from ._soups import BestMember, GreedySoup, OutputEnsemble, UniformSoup

__all__ = [
    "BestMemberClassifier",
    "BestMemberRegressor",
    "GreedySoupClassifier",
    "GreedySoupRegressor",
    "OutputEnsembleClassifier",
    "OutputEnsembleRegressor",
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
