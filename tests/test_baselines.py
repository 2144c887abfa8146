"""The baselines: best member, uniform and greedy soups, output ensemble."""

import copy

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from sk_softmerge.baselines import (
    BestMemberClassifier,
    GreedySoupClassifier,
    OutputEnsembleClassifier,
    UniformSoupClassifier,
)

from conftest import forked_members, parameters_of

BASELINES = [
    BestMemberClassifier,
    GreedySoupClassifier,
    OutputEnsembleClassifier,
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
