"""The fits of the baselines: best member, uniform and greedy soups, ensemble.

The public classes of :mod:`sk_softmerge.baselines` put a task mixin before
these; each implements ``_build(task, nets, template, score, X)``.

A soup's batch-norm running statistics are recomputed on the ``fit`` data, as
:class:`~sk_softmerge.SoftMergeClassifier` does for its merge: the first
ingredient's fit its own weights, not the average. The greedy soup scores every
candidate soup that way too, so that it chooses among the nets it would return.
"""

import copy
from functools import partial

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context

from ._base import weighted_samples
from ._core._evaluation import member_forward, state_forward, weighted
from ._core._merger import SoftMerge
from ._inputs import check_forward, to_device
from ._rules import greedy_soup
from ._tasks import prediction_function


class SoupBase(BaseEstimator):
    """Shared fit of the baselines: check members and data, score members.

    A subclass puts a task mixin (``MemberClassifierMixin`` or
    ``MemberRegressorMixin``) first, whose ``_validate_fit_data`` returns the
    :class:`~sk_softmerge._tasks.Task`, and implements
    ``_build(task, nets, template, score, X)``, ``X`` the ``fit`` inputs on the
    members' device.
    """

    _parameter_constraints: dict = {"estimators": [list, tuple]}

    def __init__(self, estimators):
        self.estimators = estimators

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Build the model, choosing among members on ``(X, y)`` where needed.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Held-out inputs, as the members take them.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Labels, each one of the members' classes, for classifiers;
            targets, one per output of the members, for regressors.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of every sample in the scores that choose among
            members (weighted accuracy or R^2).

        Returns
        -------
        self : object
            The fitted estimator. A fit that raises leaves the estimator as it
            was: fitted as before, or unfitted.
        """
        return self._fit_atomically(X, y, sample_weight)

    def _fit(self, X, y, sample_weight):
        """The steps of :meth:`fit`, on a scratch copy of the estimator."""
        nets, X, y, task = self._validate_fit_data(X, y)
        X, y, weights = weighted_samples(X, y, sample_weight)
        weights = None if weights is None else weights / weights.mean()
        # Members are scored in a copy, in eval mode: running a user's skorch net
        # would switch its module to eval mode.
        template = copy.deepcopy(nets[0].module_).eval()
        device = next(template.parameters()).device
        X = to_device(X, device)
        with torch.no_grad():
            task.check_output(check_forward(template, X), y)
        y = torch.as_tensor(y, device=device)
        errors = weighted(
            partial(task.errors, X=X, y=y, predict=prediction_function(nets[0])),
            weights,
        )

        def score(forward):
            return task.score(errors(forward))

        self._build(task, nets, template, score, X)
        return self

    @staticmethod
    def _soup_state(nets, ingredients, X):
        """State dict of the average of the members at ``ingredients``; buffers
        from the first, batch-norm statistics recomputed on ``X``."""
        # Stacking only the ingredients: a left-out member holding NaN would
        # otherwise spoil the average (0 * nan is nan).
        # All gates open: one gate per layer gives the same average.
        modules = [nets[i].module_ for i in ingredients]
        soup = SoftMerge(modules, granularity="layer")
        return soup.merged_state_dict(statistics_from=X)

    @classmethod
    def _soup(cls, task, nets, ingredients, X):
        state = cls._soup_state(nets, ingredients, X)
        return task.build_net(nets[ingredients[0]], state)


class BestMember(SoupBase):
    def _build(self, task, nets, template, score, X):
        self.scores_ = np.array(
            [score(member_forward(template, net.module_)) for net in nets]
        )
        self.best_index_ = int(np.argmax(self.scores_))
        best = nets[self.best_index_]
        self.merged_net_ = task.build_net(best, best.module_.state_dict())


class UniformSoup(SoupBase):
    def _build(self, task, nets, template, score, X):
        self.merged_net_ = self._soup(task, nets, list(range(len(nets))), X)


class GreedySoup(SoupBase):
    def _build(self, task, nets, template, score, X):
        def soup_score(ingredients):
            # As the soup would predict: the plain net in eval mode, with the
            # batch-norm statistics recomputed on X that merged_net_ gets.
            return score(
                state_forward(template, self._soup_state(nets, ingredients, X))
            )

        member_scores = [score(member_forward(template, net.module_)) for net in nets]
        self.ingredients_, self.score_ = greedy_soup(member_scores, soup_score)
        self.merged_net_ = self._soup(task, nets, self.ingredients_, X)


class OutputEnsemble(SoupBase):
    def _build(self, task, nets, template, score, X):
        self.estimators_ = [copy.deepcopy(net) for net in nets]
