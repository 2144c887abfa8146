"""A fit that raises leaves the estimator exactly as it was."""

import numpy as np
import pytest

from sk_softmerge import SoftMergeClassifier, SoftMergeRegressor
from sk_softmerge.baselines import GreedySoupClassifier, OutputEnsembleClassifier


def fitted_state(estimator):
    return {
        name: value
        for name, value in vars(estimator).items()
        if estimator._is_fitted_attribute(name)
    }


@pytest.mark.parametrize(
    "make", [SoftMergeClassifier, GreedySoupClassifier, OutputEnsembleClassifier]
)
@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda X, y: (X[:, :30], y), ValueError),  # another width
        (lambda X, y: (X, np.full_like(y, 99)), ValueError),  # unknown labels
        (lambda X, y: (np.full_like(X, np.nan), y), ValueError),  # NaN inputs
    ],
)
def test_refused_refit_keeps_the_earlier_fit(make, spoil, error, members, digits):
    X, y = digits
    estimator = (
        make(members)
        if make is not SoftMergeClassifier
        else make(members, max_epochs=1, random_state=0)
    )
    estimator.fit(X, y)
    before = fitted_state(estimator)
    proba = estimator.predict_proba(X)
    with pytest.raises(error):
        estimator.fit(*spoil(X, y))
    after = fitted_state(estimator)
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert estimator.n_features_in_ == X.shape[1]
    np.testing.assert_array_equal(estimator.predict_proba(X), proba)


def test_refused_first_fit_leaves_it_unfitted(members, digits):
    X, y = digits
    estimator = SoftMergeClassifier(members, max_epochs=1)
    with pytest.raises(ValueError):
        estimator.fit(X[:, :30], y)
    assert fitted_state(estimator) == {}


def test_refit_replaces_every_fitted_attribute(members, digits):
    # A refit on a dict of arrays has no n_features_in_: the earlier one goes.
    X, y = digits
    estimator = SoftMergeClassifier(members, max_epochs=1, random_state=0)
    estimator.fit(X, y, sample_weight=np.ones(len(y)))
    first = fitted_state(estimator)
    estimator.fit(X, y)
    second = fitted_state(estimator)
    assert second.keys() == first.keys()
    assert all(second[name] is not first[name] for name in ("gates_", "merged_net_"))


def test_regressor_refit_refused(regressors, diabetes):
    X, y = diabetes
    estimator = SoftMergeRegressor(regressors, max_epochs=1, random_state=0).fit(X, y)
    predictions = estimator.predict(X)
    with pytest.raises(ValueError):
        estimator.fit(X[:, :3], y)
    np.testing.assert_array_equal(estimator.predict(X), predictions)
