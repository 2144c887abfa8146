"""Classifier members beyond multi-class logits, on load_breast_cancer.

``NeuralNetBinaryClassifier`` members (one output, ``BCEWithLogitsLoss``,
sigmoid, threshold) and ``NeuralNetClassifier`` members with skorch's default
``NLLLoss`` on a module ending in softmax: the merge trains on the members'
loss, predicts through their nonlinearity, scores held-out data as the members
predict (by their threshold) and exports with its threshold.
"""

import copy
import json

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier

from sk_softmerge import SoftMergeClassifier, load_merged
from sk_softmerge._tasks import ClassificationTask, classification_loss
from sk_softmerge.baselines import (
    BestMemberClassifier,
    FisherMergeClassifier,
    GreedySoupClassifier,
    LearnedSoupClassifier,
    OutputEnsembleClassifier,
    RegMeanClassifier,
    UniformSoupClassifier,
)

from conftest import fork, forked_members, make_module, parameters_of


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    return ((X - X.mean(0)) / X.std(0)).astype(np.float32), y


def forked_binary(X, y, n_members=3, seed=0, **net_params):
    torch.manual_seed(seed)
    params = dict(
        optimizer=torch.optim.SGD,
        lr=0.1,
        max_epochs=2,
        batch_size=32,
        train_split=None,
        verbose=0,
    )
    params.update(net_params)
    shared = NeuralNetBinaryClassifier(make_module(X.shape[1], 1), **params).fit(
        X, y.astype(np.float32)
    )
    return fork(shared, X, y.astype(np.float32), n_members, seed, max_epochs=3)


@pytest.fixture(scope="module")
def binary(cancer):
    return forked_binary(*cancer)


@pytest.fixture(scope="module")
def softmax_members(cancer):
    return forked_members(*cancer, softmax=True, lr=0.1)


@pytest.fixture(scope="module")
def merge(binary, cancer):
    return SoftMergeClassifier(
        binary, granularity="layer", cv=None, random_state=0
    ).fit(*cancer)


class TestBinaryMembers:
    def test_fit_predict_proba_score(self, merge, binary, cancer):
        X, y = cancer
        np.testing.assert_array_equal(merge.classes_, [0, 1])
        proba = merge.predict_proba(X)
        assert proba.shape == (len(X), 2)
        np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
        assert merge.gates_.shape == (3, 2)
        assert merge.score(X, y) > 0.9
        assert np.isfinite(merge.loss_curve_).all()
        assert set(merge.validation_scores_) >= {"soft merge", "member 2"}

    def test_merged_net_is_a_binary_net_predicting_through_sigmoid(self, merge, cancer):
        X, _ = cancer
        net = merge.merged_net_
        assert type(net) is NeuralNetBinaryClassifier
        np.testing.assert_array_equal(net.predict_proba(X), merge.predict_proba(X))
        with torch.no_grad():
            logits = net.module_(torch.as_tensor(X)).numpy()[:, 0]
        expected = 1 / (1 + np.exp(-logits))
        np.testing.assert_allclose(merge.predict_proba(X)[:, 1], expected, rtol=1e-5)
        np.testing.assert_array_equal(merge.predict(X), net.predict(X))

    def test_predict_uses_the_members_threshold(self, binary, cancer):
        X, y = cancer
        strict = [copy.deepcopy(m).set_params(threshold=0.9) for m in binary]
        merge = SoftMergeClassifier(strict, random_state=0, max_epochs=2).fit(X, y)
        proba = merge.predict_proba(X)[:, 1]
        np.testing.assert_array_equal(merge.predict(X), (proba > 0.9).astype(int))
        np.testing.assert_array_equal(merge.predict(X), merge.merged_net_.predict(X))

    def test_trains_on_binary_cross_entropy(self, binary):
        loss = classification_loss(binary[0], torch.device("cpu"))
        output = torch.tensor([[0.0], [2.0]])
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            output[:, 0], torch.tensor([1.0, 0.0])
        )
        torch.testing.assert_close(loss(output, torch.tensor([1, 0])), expected)

    def test_members_unchanged(self, binary, cancer):
        members = copy.deepcopy(binary)
        before = [parameters_of(m) for m in members]
        SoftMergeClassifier(members, random_state=0, max_epochs=2).fit(*cancer)
        for member, state in zip(members, before, strict=True):
            for name, value in member.module_.state_dict().items():
                assert torch.equal(value, state[name])

    def test_grid_search(self, binary, cancer):
        search = GridSearchCV(
            SoftMergeClassifier(binary, max_epochs=2, random_state=0),
            {"l0_weight": [0.0, 0.1]},
            cv=2,
        ).fit(*cancer)
        assert search.score(*cancer) > 0.9

    def test_labels_outside_0_1_refused(self, binary, cancer):
        X, y = cancer
        with pytest.raises(ValueError, match=r"y holds labels \[2\]"):
            SoftMergeClassifier(binary).fit(X, np.where(y == 1, 2, 0))

    def test_mixed_with_multiclass_net_refused(self, binary, softmax_members, cancer):
        with pytest.raises(
            ValueError,
            match=r"estimators\[1\] is a NeuralNetClassifier, but estimators\[0\] is a "
            r"NeuralNetBinaryClassifier",
        ):
            SoftMergeClassifier([binary[0], softmax_members[0]]).fit(*cancer)

    def test_validation_scores_are_the_accuracy_of_predict(self, binary, cancer):
        # With threshold 0.9, predict (class 1 above 0.9) and argmax disagree
        # on some held-out samples; validation_scores_ must follow predict.
        X, y = cancer
        strict = [copy.deepcopy(m).set_params(threshold=0.9) for m in binary]
        merge = SoftMergeClassifier(
            strict,
            granularity="layer",
            max_epochs=2,
            cv=None,
            refit=False,
            random_state=0,
        ).fit(X, y)
        X_val, y_val = held_out_part(X, y, merge)
        scores = merge.validation_scores_
        for i, member in enumerate(strict):
            accuracy = np.mean(member.predict(X_val) == y_val)
            assert scores[f"member {i}"] == pytest.approx(accuracy, abs=1e-12)
        by_argmax = [np.mean(m.predict_proba(X_val).argmax(1) == y_val) for m in strict]
        assert by_argmax != [scores[f"member {i}"] for i in range(len(strict))]
        assert merge.selected_ == "soft merge"  # no refit: merged_net_ was scored
        accuracy = np.mean(merge.merged_net_.predict(X_val) == y_val)
        assert scores["soft merge"] == pytest.approx(accuracy, abs=1e-12)

    def test_default_threshold_scores_as_before(self, merge, binary, cancer):
        X, y = cancer
        X_val, y_val = held_out_part(X, y, merge)
        for i, member in enumerate(binary):
            accuracy = np.mean(member.predict(X_val) == y_val)
            assert merge.validation_scores_[f"member {i}"] == pytest.approx(accuracy)

    @pytest.mark.parametrize(
        "Baseline",
        [
            BestMemberClassifier,
            GreedySoupClassifier,
            OutputEnsembleClassifier,
            FisherMergeClassifier,
            LearnedSoupClassifier,
            RegMeanClassifier,
            UniformSoupClassifier,
        ],
    )
    def test_baselines(self, Baseline, binary, cancer):
        X, y = cancer
        model = Baseline(binary).fit(X, y)
        assert model.predict_proba(X).shape == (len(X), 2)
        assert model.score(X, y) > 0.9


def held_out_part(X, y, merge):
    """The held-out part that ``merge.fit`` scored on: its first draw from
    ``random_state`` seeds the task's split, as ``_fit_data`` does."""
    seed = np.random.RandomState(merge.random_state).randint(np.iinfo(np.int32).max)
    task = ClassificationTask(classes=merge.classes_)
    _, X_val, _, y_val = task.split(X, y, merge.validation_fraction, seed)
    return X_val, y_val


@pytest.fixture(scope="module")
def weighted_strict_merge(cancer):
    """A merge of binary members with threshold 0.9 and a pos_weight."""
    X, y = cancer
    members = forked_binary(
        X, y, n_members=2, threshold=0.9, criterion__pos_weight=torch.tensor(2.0)
    )
    return SoftMergeClassifier(members, max_epochs=2, random_state=0).fit(X, y)


def read_meta(path):
    with safetensors.safe_open(path, "pt") as file:
        return json.loads(file.metadata()["sk_softmerge"])


def write_meta(path, meta):
    tensors = safetensors.torch.load_file(path)
    metadata = {"sk_softmerge": json.dumps(meta)}
    safetensors.torch.save_file(tensors, path, metadata=metadata)


class TestBinaryExport:
    def test_round_trip_with_threshold_and_pos_weight(
        self, weighted_strict_merge, cancer, tmp_path
    ):
        X, _ = cancer
        merge = weighted_strict_merge
        path = merge.save_merged(tmp_path / "binary.safetensors")
        meta = read_meta(path)
        assert meta["net"]["class"] == "NeuralNetBinaryClassifier"
        assert meta["net"]["threshold"] == 0.9
        assert meta["net"]["criterion_arguments"] == {}
        pos_weight = safetensors.torch.load_file(path)[".criterion.pos_weight"]
        assert pos_weight.dtype == torch.float32
        assert torch.equal(pos_weight, torch.tensor(2.0))
        assert meta["classes"] == [0, 1]
        net = load_merged(path, make_module, n_features=X.shape[1], n_classes=1)
        assert type(net) is NeuralNetBinaryClassifier
        assert net.threshold == 0.9
        np.testing.assert_array_equal(net.predict_proba(X), merge.predict_proba(X))
        np.testing.assert_array_equal(net.predict(X), merge.merged_net_.predict(X))
        np.testing.assert_array_equal(net.classes_[net.predict(X)], merge.predict(X))
        # The threshold matters: by argmax, some predictions would differ.
        assert (net.predict(X) != net.predict_proba(X).argmax(1)).any()
        criterion, original = net.criterion_, merge.merged_net_.criterion_
        assert type(criterion) is torch.nn.BCEWithLogitsLoss
        assert criterion.pos_weight.dtype == original.pos_weight.dtype
        assert torch.equal(criterion.pos_weight, original.pos_weight)
        assert criterion.reduction == original.reduction

    def test_round_trip_with_the_default_threshold(self, merge, cancer, tmp_path):
        X, _ = cancer
        path = merge.save_merged(tmp_path / "binary.safetensors")
        assert read_meta(path)["net"]["threshold"] == 0.5
        net = load_merged(path, make_module, n_features=X.shape[1], n_classes=1)
        assert net.threshold == 0.5
        assert net.criterion_.pos_weight is None
        np.testing.assert_array_equal(net.predict_proba(X), merge.predict_proba(X))
        np.testing.assert_array_equal(net.predict(X), merge.predict(X))

    @pytest.mark.parametrize(
        "field, value, match",
        [
            ("threshold", None, r"net.threshold=None; expected a number, for a bin"),
            ("threshold", "0.9", r"net.threshold='0.9'; expected a finite"),
            ("threshold", True, r"net.threshold=True; expected a finite"),
            ("class", "NeuralNetClassifier", r"net.threshold=0.9; expected null"),
        ],
    )
    def test_malformed_metadata_refused(
        self, weighted_strict_merge, tmp_path, field, value, match
    ):
        path = weighted_strict_merge.save_merged(tmp_path / "binary.safetensors")
        meta = read_meta(path)
        meta["net"][field] = value
        write_meta(path, meta)
        with pytest.raises(ValueError, match=match):
            load_merged(path, make_module, n_features=30, n_classes=1)

    def test_classes_other_than_0_1_refused(self, weighted_strict_merge, tmp_path):
        path = weighted_strict_merge.save_merged(tmp_path / "binary.safetensors")
        meta = read_meta(path)
        meta["classes"] = [1, 0]
        write_meta(path, meta)
        with pytest.raises(ValueError, match=r"classes=\[1, 0\]; expected \[0, 1\]"):
            load_merged(path, make_module, n_features=30, n_classes=1)

    def test_non_finite_threshold_refused_at_save(self, merge, tmp_path):
        broken = copy.copy(merge)
        broken.merged_net_ = copy.deepcopy(merge.merged_net_)
        broken.merged_net_.threshold = float("nan")
        with pytest.raises(
            ValueError, match=r"it has net.threshold=nan; expected a finite number"
        ):
            broken.save_merged(tmp_path / "binary.safetensors")
        assert list(tmp_path.iterdir()) == []


class TestSoftmaxMembersWithNLLLoss:
    def test_fit_predict_through_the_modules_softmax(self, softmax_members, cancer):
        X, y = cancer
        assert type(softmax_members[0].criterion_) is torch.nn.NLLLoss
        merge = SoftMergeClassifier(softmax_members, random_state=0).fit(X, y)
        net = merge.merged_net_
        assert type(net) is NeuralNetClassifier
        with torch.no_grad():
            expected = net.module_(torch.as_tensor(X)).numpy()
        # The module's own softmax output, with no second softmax on top.
        np.testing.assert_allclose(merge.predict_proba(X), expected, rtol=1e-6)
        assert merge.score(X, y) > 0.9
        assert np.isfinite(merge.loss_curve_).all()
        assert merge.validation_scores_["soft merge"] > 0.85

    def test_trains_on_nll_of_the_probabilities(self, softmax_members):
        loss = classification_loss(softmax_members[0], torch.device("cpu"))
        proba = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
        expected = -(np.log(0.75) + np.log(0.5)) / 2
        assert float(loss(proba, torch.tensor([1, 0]))) == pytest.approx(expected)
