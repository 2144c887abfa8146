"""What a user would pick instead of a soft merge, with the same interface.

Each baseline takes the same ``estimators`` as
:class:`~sk_softmerge.SoftMergeClassifier` (fitted skorch classifiers) and
``fit(X, y)`` on held-out data, which it uses only to choose among members:

- :class:`BestMemberClassifier`: the most accurate member on ``(X, y)``;
- :class:`UniformSoupClassifier`: the plain average of all members' weights;
- :class:`GreedySoupClassifier`: members added to an average in order of
  accuracy while accuracy on ``(X, y)`` does not drop (Wortsman et al., 2022);
- :class:`OutputEnsembleClassifier`: the average of the members' predicted
  probabilities, one forward pass per member.

The first three predict with one net, ``merged_net_``. None of them changes the
members.

References
----------
.. [1] M. Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
   models improves accuracy without increasing inference time", ICML 2022.
"""

import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context

from ._base import MemberClassifierMixin
from ._evaluation import correct_predictions, member_forward
from ._merging import SoftMerge
from ._nets import build_merged_net

__all__ = [
    "BestMemberClassifier",
    "GreedySoupClassifier",
    "OutputEnsembleClassifier",
    "UniformSoupClassifier",
]


class _SoupBase(MemberClassifierMixin, BaseEstimator):
    """Shared fit of the baselines: check members and data, score members."""

    _parameter_constraints: dict = {"estimators": [list, tuple]}

    def __init__(self, estimators):
        self.estimators = estimators

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Build the model, choosing among members on ``(X, y)`` where needed.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Held-out inputs, as the members take them.
        y : array-like of shape (n_samples,)
            Labels, each one of the members' classes.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        nets, X, y = self._validate_fit_data(X, y)
        # Members are scored in a copy, in eval mode: running a user's skorch net
        # would switch its module to eval mode.
        template = copy.deepcopy(nets[0].module_).eval()
        device = next(template.parameters()).device
        X = torch.as_tensor(X, device=device)
        y = torch.as_tensor(y, device=device)
        nonlinearity = nets[0]._get_predict_nonlinearity()

        def score(forward):
            correct = correct_predictions(forward, X, y, nonlinearity)
            return -1.0 if correct is None else float(correct.mean())

        self._build(nets, template, score)
        return self

    def _soup(self, nets, ingredients):
        # Stacking only the ingredients: a left-out member holding NaN would
        # otherwise spoil the average (0 * nan is nan).
        soup = SoftMerge([nets[i].module_ for i in ingredients])
        return build_merged_net(
            nets[ingredients[0]], soup.merged_state_dict(), self.classes_
        )


class BestMemberClassifier(_SoupBase):
    """The member most accurate on the data passed to ``fit``.

    Parameters
    ----------
    estimators : list of skorch nets
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

    def _build(self, nets, template, score):
        self.scores_ = np.array(
            [score(member_forward(template, net.module_)) for net in nets]
        )
        self.best_index_ = int(np.argmax(self.scores_))
        best = nets[self.best_index_]
        self.merged_net_ = build_merged_net(
            best, best.module_.state_dict(), self.classes_
        )


class UniformSoupClassifier(_SoupBase):
    """The plain average of all members' weights (a "uniform soup").

    ``fit`` uses its data only to check it; no member is left out, so a member
    holding NaN spoils the soup, as it would for a user averaging by hand.

    Parameters
    ----------
    estimators : list of skorch nets
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) of one
        architecture and one set of classes.

    Attributes
    ----------
    merged_net_ : skorch net
        The averaged net; buffers come from the first member.
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

    def _build(self, nets, template, score):
        self.merged_net_ = self._soup(nets, list(range(len(nets))))


class GreedySoupClassifier(_SoupBase):
    """Greedy soup: add members by accuracy while the soup's accuracy holds.

    Members are ranked by accuracy on the ``fit`` data; starting from the best,
    each next member joins the average if the soup's accuracy on that data does
    not drop (Wortsman et al., 2022).

    Parameters
    ----------
    estimators : list of skorch nets
        Fitted skorch classifiers (or ``FrozenEstimator`` of them) of one
        architecture and one set of classes.

    Attributes
    ----------
    ingredients_ : list of int
        Positions of the members in the soup, in the order they joined.
    score_ : float
        Accuracy of the soup on the ``fit`` data.
    merged_net_ : skorch net
        The soup; buffers come from the first member.
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

    def _build(self, nets, template, score):
        def soup_score(ingredients):
            soup = SoftMerge([nets[i].module_ for i in ingredients]).eval()
            return score(soup)

        member_scores = [score(member_forward(template, net.module_)) for net in nets]
        order = np.argsort(member_scores, kind="stable")[::-1].tolist()
        self.ingredients_, self.score_ = [order[0]], soup_score([order[0]])
        for candidate in order[1:]:
            trial = soup_score([*self.ingredients_, candidate])
            if trial >= self.score_:
                self.ingredients_.append(candidate)
                self.score_ = trial
        self.merged_net_ = self._soup(nets, self.ingredients_)


class OutputEnsembleClassifier(_SoupBase):
    """Average of the members' predicted probabilities: K forward passes.

    ``fit`` keeps copies of the members, so predicting never runs (and so never
    switches to eval mode) the user's nets.

    Parameters
    ----------
    estimators : list of skorch nets
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

    def _build(self, nets, template, score):
        self.estimators_ = [copy.deepcopy(net) for net in nets]

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
