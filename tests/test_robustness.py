"""Held-out fallback, broken and malicious members, and finite outputs."""

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

import sk_softmerge._softmerge
from sk_softmerge import SoftMergeClassifier

from conftest import forked_members

FIT = dict(max_epochs=10, random_state=0)


@pytest.fixture(scope="module")
def split(digits):
    X, y = digits
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)


@pytest.fixture(scope="module")
def clean(split):
    X_train, _, y_train, _ = split
    return forked_members(X_train, y_train, n_members=4, seed=1)


def corrupted(member, how):
    member = copy.deepcopy(member)
    with torch.no_grad():
        for p in member.module_.parameters():
            if how == "scaled":
                p.mul_(1e3)
            elif how == "noise":
                p.copy_(torch.randn_like(p) * 100)
            elif how == "nan":
                p.view(-1)[0] = float("nan")
            elif how == "inf":
                p.view(-1)[-1] = float("inf")
    return member


def fit_quietly(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return estimator.fit(X, y)


@pytest.fixture(scope="module")
def good_and_weak(split):
    X_train, _, y_train, _ = split
    good = forked_members(X_train, y_train, n_members=1, seed=2)[0]
    # Independently initialised, barely trained members: averaging them
    # with the good one cannot beat it.
    weak = [
        forked_members(X_train, y_train, n_members=1, seed=s, lr=0.01)[0]
        for s in (3, 4)
    ]
    return [weak[0], good, weak[1]]


class TestValidationFallback:
    def test_scores_recorded(self, clean, split):
        X_train, _, y_train, _ = split
        merge = SoftMergeClassifier(clean, cv=None, **FIT)
        merge = fit_quietly(merge, X_train, y_train)
        expected = {"soft merge", "uniform average"} | {f"member {i}" for i in range(4)}
        assert set(merge.validation_scores_) == expected
        assert all(0 <= s <= 1 for s in merge.validation_scores_.values())
        scores = merge.validation_scores_
        assert scores[merge.selected_] >= scores["soft merge"]

    def test_best_epoch_kept(self, clean, split):
        X_train, _, y_train, _ = split
        merge = fit_quietly(SoftMergeClassifier(clean, **FIT), X_train, y_train)
        curve = merge.validation_loss_curve_
        assert len(curve) == FIT["max_epochs"] + 1
        # The epoch of lowest validation loss, or the start when that epoch is
        # not significantly better.
        assert merge.best_epoch_ in (0, int(np.argmin(curve)))
        if merge.selected_ == "soft merge" and merge.best_epoch_ > 0:
            kept = SoftMergeClassifier(
                clean, **{**FIT, "max_epochs": merge.best_epoch_}
            )
            kept = fit_quietly(kept, X_train, y_train)
            np.testing.assert_array_equal(kept.gates_, merge.gates_)

    def test_starts_from_the_best_member(self, good_and_weak, split):
        X_train, X_test, y_train, _ = split
        merge = SoftMergeClassifier(
            good_and_weak, max_epochs=1, lr=1e-6, random_state=0
        )
        merge = fit_quietly(merge, X_train, y_train)
        assert merge.start_ == "member 1"
        assert merge.selected_ == "soft merge"
        # Member 1's gates alone open: it alone mixes into every unit.
        assert merge.gates_[1, 0] > 0
        np.testing.assert_array_equal(merge.gates_[[0, 2], 0], [0.0, 0.0])
        np.testing.assert_allclose(
            merge.predict_proba(X_test),
            good_and_weak[1].predict_proba(X_test),
            rtol=1e-5,
            atol=1e-6,
        )

    def test_falls_back_to_best_member_exactly(self, good_and_weak, split, monkeypatch):
        X_train, X_test, y_train, _ = split
        # Started from the average, which is far worse than the good member.
        monkeypatch.setattr(sk_softmerge._softmerge, "choose_start", _average_start)
        members = good_and_weak
        good = members[1]
        merge = SoftMergeClassifier(members, max_epochs=1, lr=1e-6, random_state=0)
        with pytest.warns(UserWarning, match="falling back to member 1"):
            merge.fit(X_train, y_train)
        assert merge.selected_ == "member 1"
        # Member 1's gates alone open: it alone mixes into every unit.
        assert merge.gates_[1, 0] > 0
        np.testing.assert_array_equal(merge.gates_[[0, 2], 0], [0.0, 0.0])
        for name, value in good.module_.state_dict().items():
            assert torch.equal(merge.merged_net_.module_.state_dict()[name], value)
        np.testing.assert_array_equal(
            merge.predict_proba(X_test), good.predict_proba(X_test)
        )

    def test_disabled(self, clean, split):
        X_train, _, y_train, _ = split
        merge = SoftMergeClassifier(clean, cv=None, validation_fraction=0, **FIT)
        merge.fit(X_train, y_train)
        assert merge.validation_scores_ is None and merge.selected_ == "soft merge"


class TestBrokenMembers:
    @pytest.mark.parametrize("how", ["nan", "inf"])
    @pytest.mark.parametrize("position", [0, 2])
    def test_non_finite_member_excluded(self, clean, split, how, position):
        X_train, X_test, y_train, _ = split
        members = list(clean)
        members.insert(position, corrupted(clean[0], how))
        merge = SoftMergeClassifier(members, **FIT)
        with pytest.warns(UserWarning, match=rf"estimators \[{position}\] hold non"):
            merge.fit(X_train, y_train)
        assert merge.excluded_estimators_ == [position]
        assert (merge.gates_[position] == 0).all()
        assert f"member {position}" not in merge.validation_scores_
        for value in merge.merged_net_.module_.state_dict().values():
            assert torch.isfinite(value).all()
        assert np.isfinite(merge.predict_proba(X_test)).all()

    def test_all_members_broken(self, clean, split):
        X_train, _, y_train, _ = split
        members = [corrupted(m, "nan") for m in clean[:2]]
        with pytest.raises(ValueError, match="Every member holds non-finite weights"):
            SoftMergeClassifier(members).fit(X_train, y_train)

    def test_one_finite_member_left(self, clean, split):
        X_train, X_test, y_train, _ = split
        members = [corrupted(clean[0], "nan"), clean[1]]
        merge = fit_quietly(SoftMergeClassifier(members, **FIT), X_train, y_train)
        assert merge.gates_[0, 0] == 0 and merge.gates_[1, 0] > 0
        np.testing.assert_allclose(
            merge.predict_proba(X_test), clean[1].predict_proba(X_test), rtol=1e-6
        )


@pytest.fixture(scope="module")
def clean_score(clean, split):
    X_train, X_test, y_train, y_test = split
    merge = fit_quietly(SoftMergeClassifier(clean, **FIT), X_train, y_train)
    return merge.score(X_test, y_test)


class TestMaliciousMembers:
    @pytest.mark.parametrize("how", ["scaled", "noise"])
    @pytest.mark.parametrize("granularity", ["layer", "neuron"])
    def test_extreme_member_closed_and_harmless(
        self, clean, split, clean_score, how, granularity
    ):
        X_train, X_test, y_train, y_test = split
        members = [*clean[:2], corrupted(clean[2], how), clean[3]]
        merge = SoftMergeClassifier(members, granularity=granularity, **FIT)
        fit_quietly(merge, X_train, y_train)
        assert (merge.gates_[2] == 0).all()
        assert merge.screened_[2].all() and not merge.screened_[[0, 1, 3]].any()
        assert merge.score(X_test, y_test) >= clean_score - 0.01
        assert np.isfinite(merge.predict_proba(X_test)).all()

    def test_extreme_reference_is_replaced(self, clean, split):
        X_train, X_test, y_train, y_test = split
        members = [corrupted(clean[0], "scaled"), *clean[1:]]
        merge = SoftMergeClassifier(members, merge="2", **FIT)
        fit_quietly(merge, X_train, y_train)
        # The unmerged first layer comes from a sound member, not the malicious
        # one: the first one screened nowhere, or the member the check fell
        # back to (reproduced whole).
        source = clean[1]
        if merge.selected_.startswith("member "):
            source = members[int(merge.selected_.split()[-1])]
            assert source is not members[0]
        torch.testing.assert_close(
            merge.merged_net_.module_[0].weight, source.module_[0].weight
        )
        assert merge.score(X_test, y_test) > 0.8

    def test_huge_values_never_give_nan(self, clean, split):
        X_train, X_test, y_train, _ = split
        huge = copy.deepcopy(clean[2])
        with torch.no_grad():
            for p in huge.module_.parameters():
                p.fill_(1e30)
        members = [*clean[:2], huge, clean[3]]
        for fraction in (0.2, 0.0):
            merge = SoftMergeClassifier(
                members, cv=None, validation_fraction=fraction, **FIT
            )
            fit_quietly(merge, X_train, y_train)
            # Steps that overflow are skipped, not recorded as losses: no
            # infinity, and epochs where every step overflowed are nan.
            assert not np.isinf(merge.loss_curve_).any()
            assert merge.n_skipped_steps_ > 0
            assert np.isfinite(merge.gates_).all()
            assert np.isfinite(merge.predict_proba(X_test)).all()


def _average_start(candidates, losses):
    return candidates[0]
