"""Cross-fitting (``cv``): every sample teaches the gates and checks them."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from sklearn.utils._param_validation import InvalidParameterError

import sk_softmerge._softmerge
from sk_softmerge import SoftMerge, SoftMergeClassifier, SoftMergeRegressor
from sk_softmerge._core._training import GateTraining
from sk_softmerge._crossfit import cross_fit, fold_summary
from sk_softmerge._rules import Candidate, RuleBook

from conftest import forked_members

QUICK = dict(max_epochs=3, granularity="layer", random_state=0)


@pytest.fixture(scope="module")
def crossfitted(members, digits):
    return SoftMergeClassifier(members, cv=3, **QUICK).fit(*digits)


class TestEvidence:
    def test_out_of_fold_scores_of_the_merge_and_every_fixed_rule(self, crossfitted):
        scores = crossfitted.validation_scores_
        assert {"soft merge", "uniform average", "member 0", "member 1"} <= set(scores)
        summary = crossfitted.cv_results_
        assert len(summary["start"]) == 3
        assert set(summary["scores"]) == set(scores)
        for name, per_fold in summary["scores"].items():
            assert per_fold.shape == (3,)
            # Equal folds (digits: 1,797 = 3 x 599): the pooled score is their mean.
            assert per_fold.mean() == pytest.approx(scores[name])

    def test_loss_curve_per_fold_and_pooled(self, crossfitted):
        curves = crossfitted.cv_results_["validation_loss_curve"]
        assert curves.shape == (3, QUICK["max_epochs"] + 1)
        np.testing.assert_allclose(
            crossfitted.validation_loss_curve_, curves.mean(axis=0), rtol=1e-6
        )

    def test_final_gates_take_the_chosen_epochs(self, crossfitted):
        assert 0 <= crossfitted.best_epoch_ <= QUICK["max_epochs"]
        expected = crossfitted.best_epoch_
        assert len(crossfitted.loss_curve_) == crossfitted.n_iter_ == expected

    def test_held_out_protocol_still_available(self, members, digits):
        merge = SoftMergeClassifier(members, cv=None, **QUICK).fit(*digits)
        assert merge.cv_results_ is None
        assert len(merge.validation_loss_curve_) == QUICK["max_epochs"] + 1


class TestProtocol:
    def test_splitter_gives_the_same_gates_as_the_int(self, members, digits):
        by_int = SoftMergeClassifier(members, cv=3, **QUICK).fit(*digits)
        by_splitter = SoftMergeClassifier(members, cv=StratifiedKFold(3), **QUICK)
        by_splitter.fit(*digits)
        np.testing.assert_array_equal(by_int.gates_, by_splitter.gates_)
        assert by_int.validation_scores_ == by_splitter.validation_scores_

    def test_regressor_splitter_gives_the_same_gates_as_the_int(
        self, regressors, diabetes
    ):
        by_int = SoftMergeRegressor(regressors, cv=4, **QUICK).fit(*diabetes)
        by_splitter = SoftMergeRegressor(regressors, cv=KFold(4), **QUICK)
        by_splitter.fit(*diabetes)
        np.testing.assert_array_equal(by_int.gates_, by_splitter.gates_)

    def test_iterable_of_splits(self, members, digits):
        X, y = digits
        splits = list(StratifiedKFold(3).split(X, y))
        by_list = SoftMergeClassifier(members, cv=splits, **QUICK).fit(X, y)
        by_int = SoftMergeClassifier(members, cv=3, **QUICK).fit(X, y)
        np.testing.assert_array_equal(by_int.gates_, by_list.gates_)

    def test_repeatable_with_random_state(self, members, digits):
        params = dict(QUICK, granularity="neuron", cv=3)
        first = SoftMergeClassifier(members, **params).fit(*digits)
        second = SoftMergeClassifier(members, **params).fit(*digits)
        np.testing.assert_array_equal(first.gates_, second.gates_)
        assert first.validation_scores_ == second.validation_scores_
        np.testing.assert_array_equal(
            first.cv_results_["validation_loss_curve"],
            second.cv_results_["validation_loss_curve"],
        )

    @pytest.mark.parametrize("cv", [1, 0, "five", 2.5])
    def test_invalid_cv(self, members, digits, cv):
        with pytest.raises((InvalidParameterError, ValueError), match="cv"):
            SoftMergeClassifier(members, cv=cv).fit(*digits)


def _opening_every_gate(merger, loss_fn, X, y, *, max_epochs, after_epoch=None, **_):
    """A gate learner that makes the merge worse every epoch: it opens every
    member's gates a little more (towards the uniform average)."""
    for epoch in range(max_epochs):
        with torch.no_grad():
            merger.log_alpha.add_(1.5)
        if after_epoch is not None:
            after_epoch(epoch + 1)
    return GateTraining(loss_curve=[0.0] * max_epochs, best_epoch=max_epochs)


@pytest.fixture(scope="module")
def one_good_member(digits):
    """Member 0 trained on the labels, members 1 and 2 on shuffled ones:
    member 0 is the best fixed rule on every fold."""
    X, y = digits
    good = forked_members(X, y, n_members=1, seed=0)
    shuffled = np.random.default_rng(0).permutation(y)
    bad = forked_members(X, shuffled, n_members=2, seed=1)
    return [*good, *bad]


class TestNeverWorse:
    def test_best_member_on_every_fold_is_not_left_for_a_worse_merge(
        self, one_good_member, digits, monkeypatch
    ):
        X, y = digits
        monkeypatch.setattr(sk_softmerge._softmerge, "learn_gates", _opening_every_gate)
        merge = SoftMergeClassifier(one_good_member, cv=3, **QUICK).fit(X, y)
        scores = merge.cv_results_["scores"]
        # Member 0 is the best fixed rule on every fold, and each fold started
        # from it; opening the others' gates made every fold worse.
        others = [name for name in scores if name not in ("member 0", "soft merge")]
        assert all((scores["member 0"] > scores[name]).all() for name in others)
        assert merge.cv_results_["start"] == ["member 0"] * 3
        assert merge.best_epoch_ == 0
        np.testing.assert_array_equal(
            merge.predict_proba(X), one_good_member[0].predict_proba(X)
        )

    def test_learned_merge_never_below_the_best_member(self, one_good_member, digits):
        X, y = digits
        X_fit, X_test, y_fit, y_test = train_test_split(
            X, y, test_size=0.3, stratify=y, random_state=0
        )
        merge = SoftMergeClassifier(one_good_member, **QUICK).fit(X_fit, y_fit)
        scores = merge.validation_scores_
        assert scores[merge.selected_] >= scores["member 0"]
        best = one_good_member[0].score(X_test, y_test)
        assert merge.score(X_test, y_test) >= best - 0.01


class TestCrossFit:
    """The function itself, on a merger of two linear members, 12 samples in
    3 folds, 2 epochs each."""

    @pytest.fixture
    def run(self):
        torch.manual_seed(0)
        merger = SoftMerge([torch.nn.Linear(3, 2) for _ in range(2)])
        book = RuleBook(
            merger.gates().detach(),
            [0, 1],
            [np.zeros(12), np.ones(12)],
            lambda gates, index: np.full(12 if index is None else len(index), 0.5),
            lambda e: 1 - e.mean(),
            12,
        )
        seen = []

        def learn(index, max_epochs, after_epoch):
            seen.append(index)
            for epoch in range(max_epochs):
                after_epoch(epoch + 1)
            return GateTraining(n_skipped_steps=1)

        def run(start, held_out_losses):
            result = cross_fit(
                merger,
                book,
                list(KFold(3).split(np.zeros((12, 1)))),
                choose_start=lambda candidates, errors: candidates[start],
                learn=learn,
                held_out_losses=held_out_losses,
                merge_errors=lambda gates, index: np.zeros(len(index)),
                max_epochs=2,
                open_log_alpha=1.5,
            )
            return result, seen

        return run

    def test_every_sample_scored_once_out_of_fold(self, run):
        result, seen = run(1, lambda index: np.ones(len(index)))
        assert [len(index) for index in seen] == [8, 8, 8]
        assert result.n_skipped_steps == 3
        assert all(len(errors) == 12 for errors in result.errors.values())
        assert result.best_epoch == 0  # no epoch lowered the loss
        assert result.validation_loss_curve == [1.0, 1.0, 1.0]
        summary = fold_summary(result, lambda e: 1 - e.mean())
        np.testing.assert_array_equal(summary["scores"]["member 1"], [0.0] * 3)
        assert summary["start"] == ["member 0"] * 3

    def test_significantly_lower_loss_chooses_its_epoch(self, run):
        losses = iter([np.ones(4), np.full(4, 0.2), np.full(4, 0.5)] * 3)
        result, _ = run(0, lambda index: next(losses))
        assert result.best_epoch == 1
        assert isinstance(result.folds[0].start, Candidate)

    def test_lower_loss_within_the_noise_keeps_the_start(self, run):
        rng = np.random.default_rng(0)
        noise = [rng.normal(0, 1, 4) for _ in range(3)]
        losses = iter([e for n in noise for e in (1 + n, 0.95 + n[::-1], 1 + n)])
        result, _ = run(0, lambda index: next(losses))
        assert result.validation_loss_curve[1] < result.validation_loss_curve[0]
        assert result.best_epoch == 0
