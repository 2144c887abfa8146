"""SoftMergeClassifier: API, scikit-learn integration, devices, persistence."""

import copy
import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNet

from sk_softmerge import SoftMergeClassifier

from conftest import (
    check_refused,
    forked_members,
    parameters_of,
    predict_without_cuda,
)

# Layer gates: one per member and per Linear, the shapes asserted below.
FAST = dict(
    max_epochs=2, random_state=0, cv=None, validation_fraction=0, granularity="layer"
)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def fitted(members, digits):
    return SoftMergeClassifier(members, **FAST).fit(*digits)


class TestFit:
    def test_fitted_attributes(self, fitted, members, digits):
        _X, _y = digits
        np.testing.assert_array_equal(fitted.classes_, np.arange(10))
        assert fitted.n_features_in_ == 64
        assert fitted.gates_.shape == (3, 2)
        assert fitted.gates_.dtype == np.float32
        assert ((fitted.gates_ >= 0) & (fitted.gates_ <= 1)).all()
        assert fitted.unit_names_ == ["0", "2"]
        assert len(fitted.loss_curve_) == fitted.n_iter_ == 2
        assert all(np.isfinite(fitted.loss_curve_))

    def test_defaults_learn_neuron_gates(self, members, digits):
        defaults = SoftMergeClassifier(members).get_params()
        assert defaults["granularity"] == "neuron" and defaults["max_epochs"] == 12
        assert defaults["cv"] == 2 and defaults["lr"] == 0.2
        assert defaults["l0_weight"] == 0.0 and defaults["refit"] is True
        assert defaults["n_iter_no_change"] == 20
        merge = SoftMergeClassifier(members, max_epochs=2, random_state=0)
        merge.fit(*digits)
        # One gate per member and per output unit: 16 hidden units, 10 classes.
        assert merge.gates_.shape == (3, 16 + 10)
        assert merge.unit_names_[:2] == ["0[0]", "0[1]"]
        assert merge.unit_names_[-1] == "2[9]"

    def test_predict_proba_and_score(self, fitted, digits):
        X, y = digits
        proba = fitted.predict_proba(X)
        assert proba.shape == (len(X), 10)
        np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
        np.testing.assert_array_equal(fitted.predict(X), proba.argmax(1))
        assert fitted.score(X, y) > 0.85

    def test_merged_net_is_usable_alone(self, fitted, members, digits):
        X, _ = digits
        net = fitted.merged_net_
        assert type(net) is type(members[0])
        np.testing.assert_array_equal(net.predict_proba(X), fitted.predict_proba(X))
        np.testing.assert_array_equal(net.classes_, fitted.classes_)
        assert net.module_ is not members[0].module_

    def test_merged_weights_are_gate_weighted_average(self, fitted, members):
        gates = fitted.gates_[:, 0]
        weights = gates / gates.sum()
        expected = sum(
            w * m.module_[0].weight.detach()
            for w, m in zip(weights, members, strict=True)
        )
        torch.testing.assert_close(fitted.merged_net_.module_[0].weight, expected)

    def test_members_unchanged_unmoved_and_mode_kept(self, members, digits):
        members = copy.deepcopy(members)
        members[0].module_.eval()
        members[1].module_.train()
        before = [parameters_of(m) for m in members]
        histories = [len(m.history) for m in members]
        SoftMergeClassifier(members, **FAST).fit(*digits)
        assert [m.module_.training for m in members] == [False, True, True]
        for member, state, n_epochs in zip(members, before, histories, strict=True):
            for name, value in member.module_.state_dict().items():
                assert torch.equal(value, state[name])
                assert value.device.type == "cpu"
            assert len(member.history) == n_epochs
            assert all(p.grad is None for p in member.module_.parameters())

    def test_repeatable_with_random_state(self, members, digits):
        a = SoftMergeClassifier(members, **FAST).fit(*digits)
        b = SoftMergeClassifier(members, **FAST).fit(*digits)
        c = SoftMergeClassifier(members, **{**FAST, "random_state": 1}).fit(*digits)
        np.testing.assert_array_equal(a.gates_, b.gates_)
        assert a.loss_curve_ == b.loss_curve_
        assert a.loss_curve_ != c.loss_curve_

    def test_frozen_members(self, members, digits):
        frozen = [FrozenEstimator(m) for m in members]
        a = SoftMergeClassifier(frozen, **FAST).fit(*digits)
        b = SoftMergeClassifier(members, **FAST).fit(*digits)
        np.testing.assert_array_equal(a.gates_, b.gates_)

    def test_members_with_softmax_output_and_nllloss(self, digits):
        X, y = digits
        members = forked_members(X, y, n_members=2, softmax=True)
        merge = SoftMergeClassifier(members, **FAST).fit(X, y)
        proba = merge.predict_proba(X)
        # probabilities are the module's own output: no second softmax applied
        np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
        assert proba.max() > 0.9
        assert np.isfinite(merge.loss_curve_).all()
        assert merge.score(X, y) > 0.8

    def test_merge_patterns(self, members, digits):
        merge = SoftMergeClassifier(members, merge=["2"], **FAST).fit(*digits)
        assert merge.unit_names_ == ["2"]
        assert merge.gates_.shape == (3, 1)
        torch.testing.assert_close(
            merge.merged_net_.module_[0].weight, members[0].module_[0].weight
        )

    @pytest.mark.parametrize(
        "granularity, n_units", [("tensor", 4), ("neuron", 26), ("layer", 2)]
    )
    def test_granularity(self, members, digits, granularity, n_units):
        merge = SoftMergeClassifier(members, **{**FAST, "granularity": granularity})
        merge.fit(*digits)
        assert merge.gates_.shape == (3, n_units)
        assert len(merge.unit_names_) == n_units

    def test_verbose_shows_progress(self, members, digits, capsys):
        SoftMergeClassifier(members, verbose=1, **FAST).fit(*digits)
        err = capsys.readouterr().err
        assert "learning gates" in err
        assert "loss=" in err and "open_gates=" in err and "2/2" in err

    def test_silent_by_default(self, members, digits, capsys):
        SoftMergeClassifier(members, **FAST).fit(*digits)
        assert capsys.readouterr() == ("", "")


class TestInputs:
    def test_lists_and_float64(self, members, digits):
        X, y = digits
        a = SoftMergeClassifier(members, **FAST).fit(X.astype(np.float64), y)
        b = SoftMergeClassifier(members, **FAST).fit(X.tolist(), y.tolist())
        np.testing.assert_array_equal(a.gates_, b.gates_)
        np.testing.assert_array_equal(a.predict(X.astype(np.float64)), a.predict(X))
        np.testing.assert_array_equal(b.predict(X.tolist()), a.predict(X))

    def test_pandas(self, members, digits):
        X, y = digits
        frame = pd.DataFrame(X, columns=[f"pixel{i}" for i in range(64)])
        merge = SoftMergeClassifier(members, **FAST).fit(frame, pd.Series(y))
        assert list(merge.feature_names_in_) == list(frame.columns)
        expected = merge.merged_net_.predict_proba(X).argmax(1)
        np.testing.assert_array_equal(merge.predict(frame), expected)

    def test_labels_subset_of_classes(self, members, digits):
        X, y = digits
        keep = y < 5
        merge = SoftMergeClassifier(members, **FAST).fit(X[keep], y[keep])
        np.testing.assert_array_equal(merge.classes_, np.arange(10))


class TestBadInput:
    """Each bad input is refused with a message naming what was received."""

    @pytest.mark.parametrize("estimators, n", [([], 0), (None, 1)])
    def test_too_few_members(self, members, digits, estimators, n):
        estimators = members[:1] if estimators is None else estimators
        check_refused(
            SoftMergeClassifier(estimators),
            *digits,
            ValueError,
            f"at least 2 .*got {n}",
        )

    def test_not_a_list(self, members, digits):
        check_refused(
            SoftMergeClassifier(members[0]),
            *digits,
            ValueError,
            "'estimators' parameter",
        )

    def test_not_a_skorch_net(self, members, digits):
        from sklearn.linear_model import LogisticRegression

        check_refused(
            SoftMergeClassifier([members[0], LogisticRegression()]),
            *digits,
            TypeError,
            r"estimators\[1\] must be a fitted skorch net.*got LogisticRegression",
        )

    def test_unfitted_member(self, members, digits):
        unfitted = clone(members[1])
        check_refused(
            SoftMergeClassifier([members[0], unfitted]),
            *digits,
            ValueError,
            r"estimators\[1\] is not fitted",
        )

    def test_different_shapes(self, members, digits):
        X, y = digits
        other = forked_members(X, y, n_members=1)[0]
        other.module_[0] = torch.nn.Linear(64, 8)
        other.module_[2] = torch.nn.Linear(8, 10)
        check_refused(
            SoftMergeClassifier([members[0], other]),
            X,
            y,
            ValueError,
            r"Parameter '0.weight' of estimators\[1\] has shape \(8, 64\), but "
            r"estimators\[0\] has shape \(16, 64\)",
        )

    def test_different_names(self, members, digits):
        X, y = digits
        other = copy.deepcopy(members[1])
        other.module_ = torch.nn.Sequential()
        other.module_.add_module("fc", torch.nn.Linear(64, 16))
        other.module_.add_module("act", torch.nn.ReLU())
        other.module_.add_module("out", torch.nn.Linear(16, 10))
        check_refused(
            SoftMergeClassifier([members[0], other]),
            X,
            y,
            ValueError,
            r"estimators\[1\] has parameter 'fc.weight' where estimators\[0\] has "
            r"'0.weight'",
        )

    def test_extra_parameter(self, members, digits):
        other = copy.deepcopy(members[1])
        other.module_.add_module("3", torch.nn.Linear(10, 10))
        check_refused(
            SoftMergeClassifier([members[0], other]),
            *digits,
            ValueError,
            r"Parameter '3.weight' exists only in estimators\[1\]",
        )

    def test_different_classes(self, members, digits):
        X, y = digits
        keep = y < 9
        other = forked_members(X[keep], y[keep], n_members=1)[0]
        other.module_[2] = torch.nn.Linear(16, 10)
        check_refused(
            SoftMergeClassifier([members[0], other]),
            X,
            y,
            ValueError,
            r"estimators\[1\] has classes \[0, 1, 2, 3, 4, 5, 6, 7, 8\], but "
            r"estimators\[0\] has \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]",
        )

    def test_wrong_number_of_features(self, members, digits):
        X, y = digits
        check_refused(
            SoftMergeClassifier(members),
            X[:, :30],
            y,
            ValueError,
            r"X with sample shape \(30,\) cannot be passed through the members' module",
        )

    @pytest.mark.parametrize("value", [np.nan, np.inf])
    def test_non_finite_X(self, members, digits, value):
        X, y = digits
        X = X.copy()
        X[3, 5] = value
        check_refused(
            SoftMergeClassifier(members), X, y, ValueError, "Input X contains"
        )

    def test_unknown_labels(self, members, digits):
        X, y = digits
        y = y.copy()
        y[:2] = [10, 42]
        check_refused(
            SoftMergeClassifier(members),
            X,
            y,
            ValueError,
            r"y holds labels \[10, 42\] that the members do not know; the members' "
            r"classes are \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]",
        )

    def test_continuous_y(self, members, digits):
        X, y = digits
        check_refused(
            SoftMergeClassifier(members), X, y + 0.5, ValueError, "Unknown label type"
        )

    @pytest.mark.parametrize(
        "params, match",
        [
            ({"l0_weight": -1.0}, "'l0_weight' parameter .* Got -1.0"),
            ({"max_epochs": 0}, "'max_epochs' parameter .* Got 0"),
            ({"lr": 0.0}, "'lr' parameter .* Got 0.0"),
            ({"batch_size": 0}, "'batch_size' parameter .* Got 0"),
            ({"granularity": "block"}, "'granularity' parameter .* Got 'block'"),
            ({"n_iter_no_change": 0}, "'n_iter_no_change' parameter .* Got 0"),
            ({"merge": 3}, "'merge' parameter .* Got 3"),
            ({"merge": ["nope"]}, "merge pattern 'nope' matches no parameter"),
            ({"device": "mps"}, "device='mps' is not supported"),
            ({"device": "tpu"}, "device='tpu' is not a device"),
            ({"device": "cuda:x"}, "device='cuda:x' is not a device"),
            ({"random_state": "seed"}, "'random_state' parameter"),
        ],
    )
    def test_invalid_parameters(self, members, digits, params, match):
        check_refused(
            SoftMergeClassifier(members, **params), *digits, ValueError, match
        )

    @pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
    @pytest.mark.parametrize("device", ["cuda", "cuda:1"])
    def test_cuda_without_cuda(self, members, digits, device):
        check_refused(
            SoftMergeClassifier(members, device=device),
            *digits,
            ValueError,
            f"device='{device}' was requested, but CUDA is not available",
        )

    @pytest.mark.parametrize("method", ["predict", "predict_proba", "score"])
    def test_not_fitted(self, members, digits, method):
        X, y = digits
        args = (X, y) if method == "score" else (X,)
        with pytest.raises(NotFittedError):
            getattr(SoftMergeClassifier(members), method)(*args)

    def test_predict_wrong_number_of_features(self, fitted, digits):
        with pytest.raises(ValueError, match=r"X has 30 features, but .* expecting 64"):
            fitted.predict(digits[0][:, :30])

    def test_predict_nan(self, fitted, digits):
        X = digits[0].copy()
        X[0, 0] = np.nan
        with pytest.raises(ValueError, match="Input X contains NaN"):
            fitted.predict(X)


class TestScikitLearn:
    def test_get_set_params(self, members):
        merge = SoftMergeClassifier(members, l0_weight=0.1)
        params = merge.get_params()
        assert params["l0_weight"] == 0.1 and params["estimators"] is members
        assert merge.set_params(l0_weight=0.5, granularity="tensor") is merge
        assert (merge.l0_weight, merge.granularity) == (0.5, "tensor")

    def test_clone_keeps_fitted_members(self, members):
        merge = SoftMergeClassifier(members, l0_weight=0.3, random_state=2)
        copy_ = clone(merge)
        assert copy_ is not merge
        assert copy_.estimators is members
        assert copy_.get_params()["l0_weight"] == 0.3
        assert all(hasattr(m, "module_") for m in copy_.estimators)

    def test_clone_of_fitted_is_unfitted(self, fitted):
        assert not hasattr(clone(fitted), "gates_")

    @pytest.mark.parametrize("n_jobs", [1, 2])
    def test_grid_search(self, members, digits, n_jobs):
        search = GridSearchCV(
            SoftMergeClassifier(members, **FAST),
            {"l0_weight": [0.0, 0.1]},
            cv=2,
            n_jobs=n_jobs,
        ).fit(*digits)
        assert search.best_params_["l0_weight"] in (0.0, 0.1)
        assert search.best_estimator_.gates_.shape == (3, 2)
        assert search.score(*digits) > 0.8

    def test_grid_search_same_result_in_parallel(self, members, digits):
        grid = {"l0_weight": [0.0, 0.1]}
        results = [
            GridSearchCV(
                SoftMergeClassifier(members, **FAST), grid, cv=2, n_jobs=n_jobs
            )
            .fit(*digits)
            .cv_results_["mean_test_score"]
            for n_jobs in (1, 2)
        ]
        np.testing.assert_array_equal(*results)

    def test_cross_val_score(self, members, digits):
        scores = cross_val_score(SoftMergeClassifier(members, **FAST), *digits, cv=3)
        assert scores.shape == (3,) and (scores > 0.7).all()

    def test_pipeline(self, digits):
        X, y = digits
        scaler = StandardScaler().fit(X)
        members = forked_members(scaler.transform(X).astype(np.float32), y)
        pipe = make_pipeline(StandardScaler(), SoftMergeClassifier(members, **FAST))
        pipe.fit(X, y)
        assert pipe.score(X, y) > 0.8
        assert pipe[-1].n_features_in_ == 64


class TestPersistence:
    def test_joblib_round_trip(self, fitted, digits, tmp_path):
        X, _ = digits
        path = tmp_path / "merge.joblib"
        joblib.dump(fitted, path)
        loaded = joblib.load(path)
        np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))
        np.testing.assert_array_equal(loaded.gates_, fitted.gates_)
        assert loaded.unit_names_ == fitted.unit_names_

    def test_fitted_state_holds_no_torch_objects_outside_nets(self, fitted):
        for name, value in vars(fitted).items():
            if name in ("estimators", "named_estimators_", "merged_net_"):
                continue
            blob = pickle.dumps(value)
            assert b"torch" not in blob, name


@cuda
class TestCuda:
    def test_auto_uses_cuda_and_matches_cpu(self, members, digits):
        gpu = SoftMergeClassifier(members, device="auto", **FAST).fit(*digits)
        assert gpu.merged_net_.device == members[0].device
        cpu = SoftMergeClassifier(members, device="cpu", **FAST).fit(*digits)
        np.testing.assert_allclose(gpu.predict_proba(digits[0]).sum(1), 1, rtol=1e-5)
        assert gpu.gates_.shape == cpu.gates_.shape

    def test_fitted_on_gpu_loads_without_cuda(self, members, digits, tmp_path):
        X, _ = digits
        merge = SoftMergeClassifier(members, device="cuda", **FAST).fit(*digits)
        loaded = predict_without_cuda(merge, "predict", X[:20], tmp_path)
        assert (loaded == merge.predict(X[:20])).all()


def test_members_are_skorch_nets(members):
    assert all(isinstance(m, NeuralNet) for m in members)
