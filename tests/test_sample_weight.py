"""sample_weight in fit, with scikit-learn's semantics."""

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GridSearchCV

from sk_softmerge import SoftMergeClassifier, SoftMergeRegressor
from sk_softmerge.baselines import BestMemberClassifier, GreedySoupClassifier

PARAMS = dict(max_epochs=3, random_state=0)


class TestSoftMerge:
    def test_zero_weight_is_an_absent_sample(self, members, digits):
        X, y = digits
        rng = np.random.default_rng(0)
        junk = rng.permutation(len(y))[:300]
        X_junk = np.concatenate([X, X[junk][:, ::-1]])  # mirrored images
        y_junk = np.concatenate([y, rng.integers(0, 10, len(junk))])
        weights = np.r_[np.ones(len(y)), np.zeros(len(junk))]
        weighted = SoftMergeClassifier(members, **PARAMS).fit(
            X_junk, y_junk, sample_weight=weights
        )
        plain = SoftMergeClassifier(members, **PARAMS).fit(X, y)
        np.testing.assert_array_equal(weighted.gates_, plain.gates_)
        np.testing.assert_array_equal(weighted.predict_proba(X), plain.predict_proba(X))

    def test_integer_weights_are_repeated_samples(self, members, digits):
        X, y = digits
        counts = np.random.default_rng(1).integers(0, 3, len(y))
        weighted = SoftMergeClassifier(members, **PARAMS).fit(
            X, y, sample_weight=counts
        )
        repeated = SoftMergeClassifier(members, **PARAMS).fit(
            np.repeat(X, counts, axis=0), np.repeat(y, counts)
        )
        # Within the noise of different splits and batches.
        assert abs(weighted.score(X, y) - repeated.score(X, y)) < 0.03
        for name, score in repeated.validation_scores_.items():
            assert abs(weighted.validation_scores_[name] - score) < 0.05

    def test_weights_decide_the_fallback(self, members, digits):
        X, y = digits
        correct = members[0].predict(X) == y
        # Only the samples that member 0 gets wrong count: member 0 scores 0
        # there, the merge does not fall back to it.
        weights = (~correct).astype(float)
        merge = SoftMergeClassifier(members, **PARAMS).fit(X, y, sample_weight=weights)
        assert merge.validation_scores_["member 0"] == 0.0
        assert merge.selected_ != "member 0"

    def test_weighted_scores_on_held_out_data(self, members, digits):
        X, y = digits
        weights = np.where(y == 3, 5.0, 1.0)
        merge = SoftMergeClassifier(members, **PARAMS).fit(X, y, sample_weight=weights)
        plain = SoftMergeClassifier(members, **PARAMS).fit(X, y)
        assert merge.validation_scores_ != plain.validation_scores_

    @pytest.mark.parametrize("wrap", [list, pd.Series, np.asarray])
    def test_weights_as_array_likes(self, members, digits, wrap):
        X, y = digits
        merge = SoftMergeClassifier(members, max_epochs=1)
        merge.fit(X, y, sample_weight=wrap(np.ones(len(y))))
        assert merge.predict(X).shape == y.shape

    def test_weights_not_changed(self, members, digits):
        X, y = digits
        weights = np.linspace(0, 2, len(y))
        before = weights.copy()
        SoftMergeClassifier(members, max_epochs=1).fit(X, y, sample_weight=weights)
        np.testing.assert_array_equal(weights, before)

    @pytest.mark.parametrize(
        "weights, message",
        [
            (lambda n: -np.ones(n), "non-negative"),
            (lambda n: np.r_[np.ones(n - 1), np.nan], "finite"),
            (lambda n: np.ones(n - 1), "one weight per sample"),
            (lambda n: np.zeros(n), "Every sample_weight is zero"),
        ],
    )
    def test_bad_weights_refused(self, members, digits, weights, message):
        X, y = digits
        with pytest.raises(ValueError, match=message):
            SoftMergeClassifier(members, max_epochs=1).fit(
                X, y, sample_weight=weights(len(y))
            )

    def test_regressor(self, regressors, diabetes):
        X, y = diabetes
        weights = np.random.default_rng(0).uniform(0, 2, len(y))
        merge = SoftMergeRegressor(regressors, **PARAMS)
        assert merge.fit(X, y, sample_weight=weights).predict(X).shape == y.shape

    def test_grid_search_routes_weights(self, members, digits):
        X, y = digits
        received = []

        class Recording(SoftMergeClassifier):
            def fit(self, X, y, sample_weight=None):
                received.append(sample_weight)
                return super().fit(X, y, sample_weight=sample_weight)

        weights = np.random.default_rng(0).uniform(0.5, 1.5, len(y))
        search = GridSearchCV(
            Recording(members, max_epochs=1), {"l0_weight": [0.0, 0.1]}, cv=2
        )
        search.fit(X, y, sample_weight=weights)
        assert len(received) == 5  # 2 candidates x 2 folds, then the refit
        assert all(w is not None for w in received)
        np.testing.assert_array_equal(received[-1], weights)


class TestBaselines:
    def test_best_member_on_weighted_samples(self, members, digits):
        X, y = digits
        right = [m.predict(X) == y for m in members[:2]]
        # Weight only where exactly one of the first two members is right.
        for winner in (0, 1):
            weights = (right[winner] & ~right[1 - winner]).astype(float)
            best = BestMemberClassifier(members[:2]).fit(X, y, sample_weight=weights)
            assert best.best_index_ == winner

    def test_greedy_soup(self, members, digits):
        X, y = digits
        weights = np.where(y < 5, 2.0, 1.0)
        soup = GreedySoupClassifier(members).fit(X, y, sample_weight=weights)
        assert soup.predict(X).shape == y.shape
