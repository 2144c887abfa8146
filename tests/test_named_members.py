"""estimators as (name, net) pairs, as VotingClassifier takes them."""

import copy

import matplotlib
import numpy as np
import pytest
import torch
from sklearn.base import clone

from sk_softmerge import SoftMergeClassifier, SoftMergeRegressor, plot_gates
from sk_softmerge.baselines import (
    BestMemberClassifier,
    FisherMergeClassifier,
    GreedySoupClassifier,
    LearnedSoupClassifier,
    OutputEnsembleClassifier,
    RegMeanClassifier,
    UniformSoupClassifier,
)

matplotlib.use("Agg")
NAMES = ["adam", "sgd", "long"]


@pytest.fixture(scope="module")
def named(members):
    return list(zip(NAMES, members, strict=True))


class TestNamed:
    def test_same_merge_as_a_plain_list(self, members, named, digits):
        X, y = digits
        plain = SoftMergeClassifier(members, max_epochs=2, random_state=0).fit(X, y)
        pairs = SoftMergeClassifier(named, max_epochs=2, random_state=0).fit(X, y)
        np.testing.assert_array_equal(pairs.predict_proba(X), plain.predict_proba(X))
        assert list(pairs.named_estimators_) == NAMES
        assert list(plain.named_estimators_) == ["member 0", "member 1", "member 2"]
        assert pairs.named_estimators_["sgd"] is members[1]

    def test_names_in_validation_scores(self, named, digits):
        X, y = digits
        merge = SoftMergeClassifier(named, max_epochs=1, random_state=0).fit(X, y)
        assert set(NAMES) <= set(merge.validation_scores_)
        assert not any(key.startswith("member") for key in merge.validation_scores_)

    def test_start_and_fallback_by_name(self, named, digits, monkeypatch):
        X, y = digits
        # Start from the member named "long" alone; the held-out check then
        # falls back to the greedy soup, whose warning names it.
        monkeypatch.setattr(
            "sk_softmerge._softmerge.choose_start",
            lambda candidates, errors: candidates[1 + NAMES.index("long")],
        )
        with pytest.warns(UserWarning, match="falling back to greedy soup"):
            merge = SoftMergeClassifier(named, max_epochs=1, cv=None, random_state=0)
            merge.fit(X, y)
        assert merge.start_ == "long"
        assert merge.selected_ == "greedy soup"

    def test_warning_names_the_broken_member(self, named, digits):
        X, y = digits
        broken = copy.deepcopy(named[1][1])
        with torch.no_grad():
            broken.module_[0].weight[0, 0] = float("nan")
        pairs = [named[0], ("broken", broken), named[2]]
        with pytest.warns(UserWarning, match=r"\[1\] hold non-finite.*'broken'"):
            SoftMergeClassifier(pairs, max_epochs=1).fit(X, y)

    def test_plot_gates_labels(self, named, digits):
        X, y = digits
        merge = SoftMergeClassifier(named, max_epochs=1, random_state=0).fit(X, y)
        labels = [t.get_text() for t in plot_gates(merge).get_yticklabels()]
        assert labels == NAMES

    def test_clone_keeps_pairs(self, named, digits):
        merge = clone(SoftMergeClassifier(named, max_epochs=1))
        assert merge.estimators[1][0] == "sgd"
        merge.fit(*digits)

    @pytest.mark.parametrize(
        "baseline",
        [
            BestMemberClassifier,
            UniformSoupClassifier,
            GreedySoupClassifier,
            OutputEnsembleClassifier,
            FisherMergeClassifier,
            LearnedSoupClassifier,
            RegMeanClassifier,
        ],
    )
    def test_baselines(self, baseline, named, digits):
        X, y = digits
        assert baseline(named).fit(X, y).predict(X).shape == y.shape

    def test_regressor(self, regressors, diabetes):
        X, y = diabetes
        pairs = [(f"r{i}", net) for i, net in enumerate(regressors)]
        merge = SoftMergeRegressor(pairs, max_epochs=1, random_state=0).fit(X, y)
        assert {"r0", "r1"} <= set(merge.validation_scores_)

    @pytest.mark.parametrize(
        "estimators, error, message",
        [
            (lambda m: [("a", m[0]), m[1]], TypeError, "among pairs"),
            (lambda m: [("a", m[0]), ("a", m[1])], ValueError, "unique"),
            (lambda m: [("greedy soup", m[0]), ("b", m[1])], ValueError, "other names"),
        ],
    )
    def test_bad_names_refused(self, members, digits, estimators, error, message):
        with pytest.raises(error, match=message):
            SoftMergeClassifier(estimators(members), max_epochs=1).fit(*digits)
