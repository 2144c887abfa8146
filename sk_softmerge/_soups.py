"""The fits of the baselines: best member, uniform and greedy soups, ensemble,
and the data-aware merges: RegMean, Fisher merging, the learned soup.

The public classes of :mod:`sk_softmerge.baselines` put a task mixin before
these; each implements ``_build(fit)``, ``fit`` a :class:`FitData`.

A soup's batch-norm running statistics are recomputed on the ``fit`` data, as
:class:`~sk_softmerge.SoftMergeClassifier` does for its merge: the first
ingredient's fit its own weights, not the average. The greedy soup scores every
candidate soup that way too, so that it chooses among the nets it would return.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from ._base import MergedNetMixin, weighted_samples
from ._core._average import merged_state
from ._core._batchnorm import has_batchnorm, recompute_batchnorm_statistics
from ._core._evaluation import member_forward, state_forward, weighted
from ._core._fisher import diagonal_fisher, fisher_parameters
from ._core._learned_soup import learn_soup, soup_parameters
from ._core._merger import SoftMerge
from ._core._regmean import regmean_parameters
from ._inputs import check_forward, to_device
from ._rules import greedy_soup
from ._tasks import Task, prediction_function


@dataclass
class FitData:
    """What a baseline's ``_build`` gets from :meth:`SoupBase.fit`.

    Attributes
    ----------
    task : Task
    nets : list of skorch nets
        The members, unwrapped; never run or changed.
    template : torch.nn.Module
        A copy of the first member's module, in eval mode.
    score : callable
        ``score(forward)``: the (weighted) score of a forward function on the
        fit data, as the estimator's ``score`` would give.
    X : torch.Tensor or InputDict
        The fit inputs, on the members' device.
    y : torch.Tensor
        The targets (class indices for classifiers), on that device.
    weights : torch.Tensor of shape (n_samples,) or None
        The samples' weights, of mean 1; ``None`` without ``sample_weight``.
    """

    task: Task
    nets: list
    template: torch.nn.Module
    score: Callable
    X: object
    y: torch.Tensor
    weights: torch.Tensor | None

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [net.module_ for net in self.nets]

    @property
    def device(self) -> torch.device:
        return next(self.template.parameters()).device

    def member_forwards(self) -> list[Callable]:
        """The forward function of every member, run in the template."""
        return [member_forward(self.template, module) for module in self.modules]

    def loss_function(self):
        """The members' task loss on the device."""
        return self.task.loss_function(self.nets[0], self.device)

    def net_of(self, parameters: dict[str, torch.Tensor]):
        """A net of the first member's class whose module holds the float64
        ``parameters`` and the first member's buffers, batch-norm statistics
        recomputed on ``X``."""
        state = merged_state(self.modules, parameters)
        if has_batchnorm(self.template):
            state = recompute_batchnorm_statistics(
                self.template, self.X, state_dict=state
            ).state_dict()
        return self.task.build_net(self.nets[0], state)


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

        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
        self._build(FitData(task, nets, template, score, X, y, weights))
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


class BestMember(MergedNetMixin, SoupBase):
    def _build(self, fit):
        self.scores_ = np.array(list(map(fit.score, fit.member_forwards())))
        self.best_index_ = int(np.argmax(self.scores_))
        best = fit.nets[self.best_index_]
        self.merged_net_ = fit.task.build_net(best, best.module_.state_dict())


class UniformSoup(MergedNetMixin, SoupBase):
    def _build(self, fit):
        self.merged_net_ = self._soup(
            fit.task, fit.nets, list(range(len(fit.nets))), fit.X
        )


class GreedySoup(MergedNetMixin, SoupBase):
    def _build(self, fit):
        def soup_score(ingredients):
            # As the soup would predict: the plain net in eval mode, with the
            # batch-norm statistics recomputed on X that merged_net_ gets.
            state = self._soup_state(fit.nets, ingredients, fit.X)
            return fit.score(state_forward(fit.template, state))

        member_scores = list(map(fit.score, fit.member_forwards()))
        self.ingredients_, self.score_ = greedy_soup(member_scores, soup_score)
        self.merged_net_ = self._soup(fit.task, fit.nets, self.ingredients_, fit.X)


class OutputEnsemble(SoupBase):
    def _build(self, fit):
        self.estimators_ = [copy.deepcopy(net) for net in fit.nets]


class RegMean(MergedNetMixin, SoupBase):
    _parameter_constraints: dict = {
        **SoupBase._parameter_constraints,
        "alpha": [Interval(Real, 0, 1, closed="both")],
    }

    def __init__(self, estimators, *, alpha=0.9):
        super().__init__(estimators)
        self.alpha = alpha

    def _build(self, fit):
        parameters, self.solved_layers_ = regmean_parameters(
            fit.modules, fit.X, alpha=self.alpha, sample_weight=fit.weights
        )
        self.merged_net_ = fit.net_of(parameters)


class FisherMerge(MergedNetMixin, SoupBase):
    _parameter_constraints: dict = {
        **SoupBase._parameter_constraints,
        "fisher": [StrOptions({"sampled", "empirical"})],
        "random_state": ["random_state"],
    }

    def __init__(self, estimators, *, fisher="sampled", random_state=None):
        super().__init__(estimators)
        self.fisher = fisher
        self.random_state = random_state

    def _build(self, fit):
        seed = check_random_state(self.random_state).randint(2**31)
        generator = torch.Generator(fit.device).manual_seed(int(seed))
        loss = fit.loss_function()
        fishers = []
        for net in fit.nets:
            targets = fit.y
            if self.fisher == "sampled":
                predict = prediction_function(net)
                targets = partial(
                    fit.task.draw_targets, predict=predict, generator=generator
                )
            state = {k: v.detach() for k, v in net.module_.state_dict().items()}
            fishers.append(
                diagonal_fisher(fit.template, state, loss, fit.X, targets, fit.weights)
            )
        self.merged_net_ = fit.net_of(fisher_parameters(fit.modules, fishers))


class LearnedSoup(MergedNetMixin, SoupBase):
    _parameter_constraints: dict = {
        **SoupBase._parameter_constraints,
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self, estimators, *, max_epochs=5, lr=0.05, batch_size=256, random_state=None
    ):
        super().__init__(estimators)
        self.max_epochs = max_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.random_state = random_state

    def _build(self, fit):
        seed = check_random_state(self.random_state).randint(2**31)
        criterion = getattr(fit.nets[0].criterion_, "_orig_mod", fit.nets[0].criterion_)
        mixing = learn_soup(
            fit.modules,
            fit.loss_function(),
            fit.X,
            fit.y,
            sample_weight=fit.weights,
            # A temperature scales logits: only for criteria that take logits.
            temperature=isinstance(
                criterion, torch.nn.CrossEntropyLoss | torch.nn.BCEWithLogitsLoss
            ),
            max_epochs=self.max_epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(int(seed)),
        )
        self.mixing_weights_ = mixing.weights.cpu().numpy()
        self.tensor_names_ = mixing.tensor_names
        self.temperature_ = mixing.temperature
        self.loss_curve_ = mixing.loss_curve
        self.merged_net_ = fit.net_of(soup_parameters(fit.modules, mixing))
