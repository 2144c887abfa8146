"""SoftMergeRegressor: API, targets, validation, bad input, sklearn, persistence."""

import copy
import json
import pickle
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
import safetensors
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetRegressor

import sk_softmerge._softmerge
from sk_softmerge import SoftMergeClassifier, SoftMergeRegressor, load_merged
from sk_softmerge._tasks import regression_loss
from sk_softmerge.baselines import (
    BestMemberRegressor,
    FisherMergeRegressor,
    GreedySoupRegressor,
    LearnedSoupRegressor,
    OutputEnsembleRegressor,
    RegMeanRegressor,
    UniformSoupRegressor,
)

from conftest import (
    N_HIDDEN,
    check_refused,
    forked_regressors,
    make_module,
    parameters_of,
)

# Layer gates: one per member and per Linear, the shapes asserted below.
FAST = dict(
    max_epochs=2, random_state=0, cv=None, validation_fraction=0, granularity="layer"
)


def fit_quietly(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return estimator.fit(X, y)


@pytest.fixture(scope="module")
def fitted(regressors, diabetes):
    return SoftMergeRegressor(regressors, **FAST).fit(*diabetes)


@pytest.fixture(scope="module")
def split(diabetes):
    X, y = diabetes
    return train_test_split(X, y, test_size=0.3, random_state=0)


@pytest.fixture(scope="module")
def two_outputs(diabetes):
    """Members with two outputs: the target and its square (standardised)."""
    X, y = diabetes
    Y = np.stack([y, (y**2 - (y**2).mean()) / (y**2).std()], axis=1)
    return X, Y.astype(np.float32), forked_regressors(X, Y.astype(np.float32))


class TestFit:
    def test_fitted_attributes(self, fitted):
        assert fitted.n_features_in_ == 10
        assert fitted.n_outputs_ == 1
        assert fitted.gates_.shape == (3, 2)
        assert ((fitted.gates_ >= 0) & (fitted.gates_ <= 1)).all()
        assert fitted.unit_names_ == ["0", "2"]
        assert len(fitted.loss_curve_) == fitted.n_iter_ == 2
        assert np.isfinite(fitted.loss_curve_).all()
        assert fitted.selected_ == "soft merge"
        assert fitted.validation_scores_ is None
        assert fitted.excluded_estimators_ == []
        assert not hasattr(fitted, "classes_")

    def test_predict_and_score_r2(self, fitted, diabetes):
        X, y = diabetes
        predicted = fitted.predict(X)
        assert predicted.shape == (len(X),)
        assert predicted.dtype == np.float32
        assert fitted.score(X, y) == pytest.approx(r2_score(y, predicted))
        assert fitted.score(X, y) > 0.3

    def test_2d_single_target_keeps_its_shape(self, regressors, diabetes):
        X, y = diabetes
        merge = SoftMergeRegressor(regressors, **FAST).fit(X, y[:, None])
        assert merge.predict(X[:5]).shape == (5, 1)
        assert merge.n_outputs_ == 1

    def test_multi_output(self, two_outputs):
        X, Y, members = two_outputs
        merge = SoftMergeRegressor(members, random_state=0).fit(X, Y)
        assert merge.n_outputs_ == 2
        predicted = merge.predict(X)
        assert predicted.shape == Y.shape
        assert merge.score(X, Y) == pytest.approx(r2_score(Y, predicted))
        assert set(merge.validation_scores_) >= {"soft merge", "member 0"}

    def test_merged_net_is_usable_alone(self, fitted, regressors, diabetes):
        X, _ = diabetes
        net = fitted.merged_net_
        assert type(net) is NeuralNetRegressor
        assert net.predict(X).shape == (len(X), 1)
        np.testing.assert_array_equal(net.predict(X)[:, 0], fitted.predict(X))
        assert net.module_ is not regressors[0].module_

    def test_merged_weights_are_gate_weighted_average(self, fitted, regressors):
        gates = fitted.gates_[:, 1]
        weights = gates / gates.sum()
        expected = sum(
            w * m.module_[2].weight.detach()
            for w, m in zip(weights, regressors, strict=True)
        )
        torch.testing.assert_close(fitted.merged_net_.module_[2].weight, expected)

    def test_members_unchanged_and_mode_kept(self, regressors, diabetes):
        members = copy.deepcopy(regressors)
        members[0].module_.eval()
        before = [parameters_of(m) for m in members]
        histories = [len(m.history) for m in members]
        SoftMergeRegressor(members, random_state=0, max_epochs=2).fit(*diabetes)
        assert [m.module_.training for m in members] == [False, True, True]
        for member, state, n_epochs in zip(members, before, histories, strict=True):
            for name, value in member.module_.state_dict().items():
                assert torch.equal(value, state[name])
            assert len(member.history) == n_epochs
            assert all(p.grad is None for p in member.module_.parameters())

    def test_repeatable_with_random_state(self, regressors, diabetes):
        a = SoftMergeRegressor(regressors, max_epochs=2, random_state=0)
        b = SoftMergeRegressor(regressors, max_epochs=2, random_state=0)
        a.fit(*diabetes), b.fit(*diabetes)
        np.testing.assert_array_equal(a.gates_, b.gates_)
        assert a.loss_curve_ == b.loss_curve_
        assert a.validation_scores_ == b.validation_scores_

    def test_frozen_members(self, regressors, diabetes):
        frozen = [FrozenEstimator(m) for m in regressors]
        a = SoftMergeRegressor(frozen, **FAST).fit(*diabetes)
        np.testing.assert_array_equal(
            a.gates_, SoftMergeRegressor(regressors, **FAST).fit(*diabetes).gates_
        )

    def test_pandas(self, regressors, diabetes):
        X, y = diabetes
        frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(10)])
        merge = SoftMergeRegressor(regressors, **FAST).fit(frame, pd.Series(y))
        assert list(merge.feature_names_in_) == list(frame.columns)
        expected = merge.merged_net_.predict(X)[:, 0]
        np.testing.assert_array_equal(merge.predict(frame), expected)

    def test_trains_on_the_members_criterion(self, diabetes):
        X, y = diabetes
        members = forked_regressors(
            X, y[:, None], n_members=2, criterion=torch.nn.L1Loss
        )
        loss = regression_loss(members[0], torch.device("cpu"))
        output, target = torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 4.0])
        assert float(loss(output, target)) == pytest.approx(1.5)
        merge = SoftMergeRegressor(members, random_state=0, max_epochs=2).fit(X, y)
        # The validation loss curve is the members' L1 loss of the merge.
        assert 0 < merge.validation_loss_curve_[0] < 1
        assert merge.score(X, y) > 0.3


class TestValidation:
    def test_scores_are_r2_and_never_worse_than_selected(self, split):
        X_train, _, y_train, _ = split
        members = forked_regressors(X_train, y_train[:, None], n_members=3, seed=1)
        merge = fit_quietly(
            SoftMergeRegressor(members, cv=None, random_state=0, max_epochs=10),
            X_train,
            y_train,
        )
        scores = merge.validation_scores_
        expected = {"soft merge", "uniform average"} | {f"member {i}" for i in range(3)}
        assert set(scores) == expected
        assert all(-1 < s <= 1 for s in scores.values())
        assert scores[merge.selected_] >= scores["soft merge"]
        assert len(merge.validation_loss_curve_) == 11
        curve = merge.validation_loss_curve_
        assert merge.best_epoch_ in (0, int(np.argmin(curve)))

    def test_falls_back_to_the_good_member_exactly(self, split, monkeypatch):
        X_train, X_test, y_train, _ = split
        # Started from the average, which is far worse than the good member.
        monkeypatch.setattr(sk_softmerge._softmerge, "choose_start", _average_start)
        good = forked_regressors(X_train, y_train[:, None], n_members=1, seed=2)[0]
        # Independently initialised, barely trained members: averaging them
        # with the good one cannot beat it.
        weak = [
            forked_regressors(X_train, y_train[:, None], n_members=1, seed=s, lr=1e-4)[
                0
            ]
            for s in (3, 4)
        ]
        merge = SoftMergeRegressor(
            [weak[0], good, weak[1]],
            max_epochs=1,
            lr=1e-6,
            granularity="layer",
            random_state=0,
        )
        with pytest.warns(UserWarning, match="falling back to member 1"):
            merge.fit(X_train, y_train)
        assert merge.selected_ == "member 1"
        np.testing.assert_array_equal(merge.gates_, np.eye(3)[[1]].repeat(2, 0).T)
        np.testing.assert_array_equal(merge.predict(X_test), good.predict(X_test)[:, 0])
        scores = merge.validation_scores_
        assert scores["member 1"] > scores["soft merge"]

    def test_starts_from_the_good_member(self, split):
        X_train, X_test, y_train, _ = split
        good = forked_regressors(X_train, y_train[:, None], n_members=1, seed=2)[0]
        weak = forked_regressors(
            X_train, y_train[:, None], n_members=1, seed=3, lr=1e-4
        )[0]
        merge = SoftMergeRegressor(
            [weak, good], max_epochs=1, lr=1e-6, granularity="layer", random_state=0
        )
        merge = fit_quietly(merge, X_train, y_train)
        assert merge.start_ == "member 1"
        # Only the good member's gates open (all at one value: it alone mixes).
        assert (merge.gates_[0] == 0).all() and (merge.gates_[1] > 0).all()
        np.testing.assert_allclose(merge.gates_[1], merge.gates_[1, 0], rtol=1e-5)
        np.testing.assert_allclose(
            merge.predict(X_test), good.predict(X_test)[:, 0], rtol=1e-5, atol=1e-6
        )

    @pytest.mark.parametrize("how", ["nan", "inf"])
    def test_non_finite_member_excluded(self, regressors, diabetes, how):
        X, y = diabetes
        broken = copy.deepcopy(regressors[1])
        with torch.no_grad():
            broken.module_[0].weight[0, 0] = float(how)
        members = [regressors[0], broken, regressors[2]]
        with pytest.warns(UserWarning, match=r"estimators \[1\] hold non-finite"):
            merge = SoftMergeRegressor(members, random_state=0, max_epochs=2)
            merge.fit(X, y)
        assert merge.excluded_estimators_ == [1]
        assert (merge.gates_[1] == 0).all()
        assert "member 1" not in merge.validation_scores_
        assert np.isfinite(merge.predict(X)).all()
        assert merge.score(X, y) > 0.3

    def test_all_members_broken(self, regressors, diabetes):
        broken = copy.deepcopy(regressors[:2])
        with torch.no_grad():
            for member in broken:
                member.module_[0].weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="Every member holds non-finite"):
            SoftMergeRegressor(broken).fit(*diabetes)


class TestBadInput:
    """Each bad input is refused with a message naming what was received."""

    @pytest.mark.parametrize("estimators, n", [([], 0), (None, 1)])
    def test_too_few_members(self, regressors, diabetes, estimators, n):
        estimators = regressors[:1] if estimators is None else estimators
        check_refused(
            SoftMergeRegressor(estimators),
            *diabetes,
            ValueError,
            f"at least 2 .*got {n}",
        )

    def test_not_a_list(self, regressors, diabetes):
        check_refused(
            SoftMergeRegressor(regressors[0]),
            *diabetes,
            ValueError,
            "'estimators' parameter",
        )

    def test_not_a_skorch_net(self, regressors, diabetes):
        from sklearn.linear_model import Ridge

        check_refused(
            SoftMergeRegressor([regressors[0], Ridge()]),
            *diabetes,
            TypeError,
            r"estimators\[1\] must be a fitted skorch net.*got Ridge",
        )

    def test_classifier_members(self, members, diabetes):
        check_refused(
            SoftMergeRegressor(members),
            *diabetes,
            TypeError,
            r"estimators\[0\] is a NeuralNetClassifier, but a merge for regression "
            r"takes skorch regressor \(NeuralNetRegressor\) members",
        )

    def test_regressor_members_given_to_the_classifier(self, regressors, digits):
        check_refused(
            SoftMergeClassifier(regressors),
            *digits,
            TypeError,
            r"estimators\[0\] is a NeuralNetRegressor, but a merge for "
            r"classification takes skorch classifier",
        )

    def test_mixed_classifier_and_regressor(self, regressors, members, diabetes):
        check_refused(
            SoftMergeRegressor([regressors[0], members[0]]),
            *diabetes,
            TypeError,
            r"estimators\[1\] is a NeuralNetClassifier",
        )

    def test_unfitted_member(self, regressors, diabetes):
        check_refused(
            SoftMergeRegressor([regressors[0], clone(regressors[1])]),
            *diabetes,
            ValueError,
            r"estimators\[1\] is not fitted",
        )

    def test_different_shapes(self, regressors, diabetes):
        other = copy.deepcopy(regressors[1])
        other.module_[0] = torch.nn.Linear(10, 8)
        other.module_[2] = torch.nn.Linear(8, 1)
        check_refused(
            SoftMergeRegressor([regressors[0], other]),
            *diabetes,
            ValueError,
            r"Parameter '0.weight' of estimators\[1\] has shape \(8, 10\), but "
            rf"estimators\[0\] has shape \({N_HIDDEN}, 10\)",
        )

    def test_extra_parameter(self, regressors, diabetes):
        other = copy.deepcopy(regressors[1])
        other.module_.add_module("3", torch.nn.Linear(1, 1))
        check_refused(
            SoftMergeRegressor([regressors[0], other]),
            *diabetes,
            ValueError,
            r"Parameter '3.weight' exists only in estimators\[1\]",
        )

    def test_wrong_number_of_features(self, regressors, diabetes):
        X, y = diabetes
        check_refused(
            SoftMergeRegressor(regressors),
            X[:, :4],
            y,
            ValueError,
            r"X with sample shape \(4,\) cannot be passed through the members' module",
        )

    @pytest.mark.parametrize("value", [np.nan, np.inf])
    def test_non_finite_X(self, regressors, diabetes, value):
        X, y = diabetes
        X = X.copy()
        X[3, 5] = value
        check_refused(
            SoftMergeRegressor(regressors), X, y, ValueError, "Input X contains"
        )

    def test_non_finite_y(self, regressors, diabetes):
        X, y = diabetes
        y = y.copy()
        y[7] = np.nan
        check_refused(
            SoftMergeRegressor(regressors), X, y, ValueError, "Input y contains NaN"
        )

    def test_more_targets_than_outputs(self, regressors, diabetes):
        X, y = diabetes
        check_refused(
            SoftMergeRegressor(regressors),
            X,
            np.stack([y, y, y], axis=1),
            ValueError,
            r"y has 3 target\(s\) per sample, but the members' module outputs 1 "
            r"value\(s\) per sample",
        )

    def test_fewer_targets_than_outputs(self, two_outputs):
        X, Y, members = two_outputs
        check_refused(
            SoftMergeRegressor(members),
            X,
            Y[:, 0],
            ValueError,
            r"y has 1 target\(s\) per sample, but the members' module outputs 2",
        )

    def test_3d_y(self, regressors, diabetes):
        X, y = diabetes
        check_refused(
            SoftMergeRegressor(regressors),
            X,
            y.reshape(-1, 1, 1),
            ValueError,
            "y should be a 1d array|Found array with dim 3",
        )

    def test_string_y(self, regressors, diabetes):
        X, y = diabetes
        check_refused(
            SoftMergeRegressor(regressors),
            X,
            np.where(y > 0, "high", "low"),
            ValueError,
            "could not convert|dtype",
        )

    def test_wrong_number_of_samples(self, regressors, diabetes):
        X, y = diabetes
        check_refused(
            SoftMergeRegressor(regressors),
            X,
            y[:-3],
            ValueError,
            "inconsistent numbers of samples",
        )

    @pytest.mark.parametrize(
        "params, match",
        [
            ({"l0_weight": -1.0}, "'l0_weight' parameter .* Got -1.0"),
            ({"max_epochs": 0}, "'max_epochs' parameter .* Got 0"),
            ({"lr": 0.0}, "'lr' parameter .* Got 0.0"),
            ({"granularity": "block"}, "'granularity' parameter .* Got 'block'"),
            ({"validation_fraction": 1.0}, "'validation_fraction' parameter"),
            ({"merge": ["nope"]}, "merge pattern 'nope' matches no parameter"),
            ({"device": "tpu"}, "device='tpu' is not a device"),
        ],
    )
    def test_invalid_parameters(self, regressors, diabetes, params, match):
        check_refused(
            SoftMergeRegressor(regressors, **params), *diabetes, ValueError, match
        )

    @pytest.mark.parametrize("method", ["predict", "score"])
    def test_not_fitted(self, regressors, diabetes, method):
        X, y = diabetes
        args = (X, y) if method == "score" else (X,)
        with pytest.raises(NotFittedError):
            getattr(SoftMergeRegressor(regressors), method)(*args)

    def test_predict_wrong_number_of_features(self, fitted, diabetes):
        with pytest.raises(ValueError, match=r"X has 4 features, but .* expecting 10"):
            fitted.predict(diabetes[0][:, :4])

    def test_predict_nan(self, fitted, diabetes):
        X = diabetes[0].copy()
        X[0, 0] = np.nan
        with pytest.raises(ValueError, match="Input X contains NaN"):
            fitted.predict(X)

    def test_no_predict_proba(self, fitted):
        assert not hasattr(fitted, "predict_proba")


class TestScikitLearn:
    def test_clone_keeps_fitted_members(self, regressors, fitted):
        merge = SoftMergeRegressor(regressors, l0_weight=0.3, random_state=2)
        copy_ = clone(merge)
        assert copy_.estimators is regressors
        assert copy_.get_params()["l0_weight"] == 0.3
        assert all(hasattr(m, "module_") for m in copy_.estimators)
        assert not hasattr(clone(fitted), "gates_")

    def test_grid_search_over_l0_weight(self, regressors, diabetes):
        search = GridSearchCV(
            SoftMergeRegressor(regressors, **FAST), {"l0_weight": [0.0, 0.1]}, cv=2
        ).fit(*diabetes)
        assert search.best_params_["l0_weight"] in (0.0, 0.1)
        assert search.best_estimator_.gates_.shape == (3, 2)
        assert search.score(*diabetes) > 0.3

    def test_cross_val_score_is_r2(self, regressors, diabetes):
        scores = cross_val_score(SoftMergeRegressor(regressors, **FAST), *diabetes)
        assert scores.shape == (5,) and (scores > 0.2).all()

    def test_pipeline(self, regressors, diabetes):
        X, y = diabetes
        raw = X * 3 + 1
        pipe = make_pipeline(StandardScaler(), SoftMergeRegressor(regressors, **FAST))
        pipe.fit(raw, y)
        assert pipe.score(raw, y) > 0.3
        assert pipe[-1].n_features_in_ == 10


class TestPersistence:
    def test_joblib_round_trip(self, fitted, diabetes, tmp_path):
        X, _ = diabetes
        joblib.dump(fitted, tmp_path / "merge.joblib")
        loaded = joblib.load(tmp_path / "merge.joblib")
        np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
        np.testing.assert_array_equal(loaded.gates_, fitted.gates_)

    def test_fitted_state_holds_no_torch_objects_outside_nets(self, fitted):
        for name, value in vars(fitted).items():
            if name in ("estimators", "named_estimators_", "merged_net_"):
                continue
            assert b"torch" not in pickle.dumps(value), name

    def test_save_and_load_merged(self, fitted, diabetes, tmp_path):
        X, _ = diabetes
        path = fitted.save_merged(tmp_path / "merged.safetensors")
        with safetensors.safe_open(path, "pt") as file:
            meta = json.loads(file.metadata()["sk_softmerge"])
        assert meta["classes"] is None
        assert meta["net"]["class"] == "NeuralNetRegressor"
        net = load_merged(path, make_module, n_features=10, n_classes=1)
        assert type(net) is NeuralNetRegressor
        np.testing.assert_array_equal(net.predict(X)[:, 0], fitted.predict(X))
        assert type(net.criterion_) is torch.nn.MSELoss


BASELINES = [
    BestMemberRegressor,
    GreedySoupRegressor,
    OutputEnsembleRegressor,
    FisherMergeRegressor,
    LearnedSoupRegressor,
    RegMeanRegressor,
    UniformSoupRegressor,
]


class TestBaselines:
    @pytest.mark.parametrize("Baseline", BASELINES)
    def test_interface_and_members_untouched(self, Baseline, regressors, diabetes):
        X, y = diabetes
        members = copy.deepcopy(regressors)
        before = [parameters_of(m) for m in members]
        model = Baseline(members).fit(X, y)
        assert model.predict(X).shape == (len(X),)
        assert model.fit(X, y[:, None]).predict(X).shape == (len(X), 1)
        assert model.score(X, y[:, None]) > 0.3
        assert clone(model).estimators is members
        for member, state in zip(members, before, strict=True):
            for name, value in member.module_.state_dict().items():
                assert torch.equal(value, state[name])

    def test_best_member_scores_are_r2(self, regressors, diabetes):
        X, y = diabetes
        model = BestMemberRegressor(regressors).fit(X, y)
        expected = [r2_score(y, m.predict(X)[:, 0]) for m in regressors]
        np.testing.assert_allclose(model.scores_, expected, rtol=1e-4)
        assert model.best_index_ == int(np.argmax(expected))

    def test_output_ensemble_averages_predictions(self, regressors, diabetes):
        X, y = diabetes
        model = OutputEnsembleRegressor(regressors).fit(X, y)
        expected = np.mean([m.predict(X)[:, 0] for m in regressors], axis=0)
        np.testing.assert_allclose(model.predict(X), expected, rtol=1e-6)

    def test_classifier_members_refused(self, members, digits):
        with pytest.raises(TypeError, match="a merge for regression"):
            BestMemberRegressor(members).fit(*digits)


def _average_start(candidates, losses):
    return candidates[0]
