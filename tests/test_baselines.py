"""The baselines: best member, uniform and greedy soups, output ensemble."""

import copy

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from skorch import NeuralNetClassifier

from sk_softmerge.baselines import (
    BestMemberClassifier,
    FisherMergeClassifier,
    GreedySoupClassifier,
    LearnedSoupClassifier,
    OutputEnsembleClassifier,
    RegMeanClassifier,
    UniformSoupClassifier,
)

from conftest import batchnorm_module, forked_members, parameters_of

BASELINES = [
    BestMemberClassifier,
    GreedySoupClassifier,
    OutputEnsembleClassifier,
    FisherMergeClassifier,
    LearnedSoupClassifier,
    RegMeanClassifier,
    UniformSoupClassifier,
]


@pytest.fixture(scope="module")
def mixed(digits):
    """Two good forked members and one independently initialised weak one."""
    X, y = digits
    good = forked_members(X, y, n_members=2, seed=5)
    weak = forked_members(X, y, n_members=1, seed=6, lr=0.01)[0]
    return [good[0], weak, good[1]]


def accuracy(net, X, y):
    return float(np.mean(net.predict(X) == y))


@pytest.mark.parametrize("Baseline", BASELINES)
def test_interface_and_members_untouched(Baseline, members, digits):
    X, y = digits
    members = copy.deepcopy(members)
    members[1].module_.train()
    before = [parameters_of(m) for m in members]
    model = Baseline(members).fit(X, y)
    proba = model.predict_proba(X)
    assert proba.shape == (len(X), 10)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(model.predict(X), proba.argmax(1))
    assert model.score(X, y) > 0.8
    assert clone(model).estimators is members
    assert members[1].module_.training
    for member, state in zip(members, before, strict=True):
        for name, value in member.module_.state_dict().items():
            assert torch.equal(value, state[name])


@pytest.mark.parametrize("Baseline", BASELINES)
def test_not_fitted(Baseline, members, digits):
    with pytest.raises(NotFittedError):
        Baseline(members).predict(digits[0])


def test_best_member(mixed, digits):
    X, y = digits
    model = BestMemberClassifier(mixed).fit(X, y)
    scores = [accuracy(m, X, y) for m in mixed]
    np.testing.assert_allclose(model.scores_, scores)
    assert model.best_index_ == int(np.argmax(scores))
    best = mixed[model.best_index_]
    np.testing.assert_array_equal(model.predict_proba(X), best.predict_proba(X))


def test_uniform_soup_is_the_average(mixed, digits):
    model = UniformSoupClassifier(mixed).fit(*digits)
    average = sum(m.module_[0].weight for m in mixed) / 3
    torch.testing.assert_close(model.merged_net_.module_[0].weight, average)


def test_greedy_soup_leaves_out_what_hurts(mixed, digits):
    X, y = digits
    model = GreedySoupClassifier(mixed).fit(X, y)
    assert 1 not in model.ingredients_
    assert sorted(model.ingredients_) == [0, 2]
    assert model.score_ == pytest.approx(model.score(X, y))
    assert model.score_ >= max(accuracy(mixed[i], X, y) for i in (0, 2))


def test_output_ensemble_averages_probabilities(mixed, digits):
    X, _ = digits
    model = OutputEnsembleClassifier(mixed).fit(*digits)
    expected = np.mean([m.predict_proba(X) for m in mixed], axis=0)
    np.testing.assert_allclose(model.predict_proba(X), expected, rtol=1e-6)
    assert all(a is not b for a, b in zip(model.estimators_, mixed, strict=True))


def test_greedy_soup_leaves_out_a_nan_member(mixed, digits):
    X, y = digits
    broken = copy.deepcopy(mixed[0])
    with torch.no_grad():
        broken.module_[0].weight[0, 0] = float("nan")
    model = GreedySoupClassifier([broken, *mixed]).fit(X, y)
    assert 0 not in model.ingredients_
    assert np.isfinite(model.predict_proba(X)).all()
    assert np.isnan(
        UniformSoupClassifier([broken, *mixed]).fit(X, y).predict_proba(X)
    ).all()


@pytest.fixture(scope="module")
def batchnorm_members(digits):
    """Forks of one short training of a net with batch norm."""
    return forked_members(*digits, architecture=batchnorm_module)


@pytest.fixture(scope="module")
def shifted(digits):
    """Held-out data on which no member's batch-norm statistics hold: fewer
    samples than one batch of the recomputation, so its statistics are exact."""
    X, y = digits
    return X[:400] + 0.25, y[:400]


@pytest.mark.parametrize("Soup", [UniformSoupClassifier, GreedySoupClassifier])
def test_soup_batchnorm_statistics_are_those_of_the_fit_data(
    Soup, batchnorm_members, shifted
):
    X, y = shifted
    before = [parameters_of(m) for m in batchnorm_members]
    module = Soup(batchnorm_members).fit(X, y).merged_net_.module_
    with torch.no_grad():
        features = module[0](torch.as_tensor(X))
    torch.testing.assert_close(module[1].running_mean, features.mean(0))
    torch.testing.assert_close(module[1].running_var, features.var(0))
    for member, state in zip(batchnorm_members, before, strict=True):
        bn = member.module_[1]
        assert not torch.allclose(bn.running_mean, module[1].running_mean, atol=0.1)
        assert torch.equal(bn.running_mean, state["1.running_mean"])
        assert torch.equal(bn.running_var, state["1.running_var"])


def test_greedy_soup_scores_soups_as_they_predict(batchnorm_members, shifted):
    # With the statistics recomputed on the fit data, not the first member's.
    X, y = shifted
    model = GreedySoupClassifier(batchnorm_members).fit(X, y)
    assert len(model.ingredients_) > 1
    assert model.score_ == pytest.approx(model.score(X, y))


class TwoInputsWithBatchNorm(torch.nn.Module):
    """Two arrays, as skorch passes a dict: by keyword; batch norm after the
    first layer."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(5 + 3, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, dense, extra):
        hidden = self.hidden(torch.cat([dense, extra], dim=1))
        return self.out(torch.relu(self.bn(hidden)))


def test_soup_batchnorm_statistics_of_dict_inputs():
    rng = np.random.default_rng(0)
    X = {
        "dense": rng.normal(size=(200, 5)).astype(np.float32),
        "extra": rng.normal(1.0, 2.0, size=(200, 3)).astype(np.float32),
    }
    y = (X["dense"][:, 0] > 0).astype(np.int64)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(
            NeuralNetClassifier(
                TwoInputsWithBatchNorm,
                criterion=torch.nn.CrossEntropyLoss,
                max_epochs=2,
                train_split=None,
                verbose=0,
            ).fit(X, y)
        )
    for Soup in (UniformSoupClassifier, GreedySoupClassifier):
        module = Soup(nets).fit(X, y).merged_net_.module_
        with torch.no_grad():
            features = module.hidden(
                torch.cat([torch.as_tensor(X["dense"]), torch.as_tensor(X["extra"])], 1)
            )
        torch.testing.assert_close(module.bn.running_mean, features.mean(0))
