"""Classifier members beyond multi-class logits, on load_breast_cancer.

``NeuralNetBinaryClassifier`` members (one output, ``BCEWithLogitsLoss``,
sigmoid, threshold) and ``NeuralNetClassifier`` members with skorch's default
``NLLLoss`` on a module ending in softmax: the merge trains on the members'
loss and predicts through their nonlinearity.
"""

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier

from sk_softmerge import SoftMergeClassifier
from sk_softmerge._tasks import classification_loss
from sk_softmerge.baselines import (
    BestMemberClassifier,
    GreedySoupClassifier,
    OutputEnsembleClassifier,
    UniformSoupClassifier,
)

from conftest import fork, forked_members, make_module, parameters_of


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    return ((X - X.mean(0)) / X.std(0)).astype(np.float32), y


def forked_binary(X, y, n_members=3, seed=0):
    torch.manual_seed(seed)
    shared = NeuralNetBinaryClassifier(
        make_module(X.shape[1], 1),
        optimizer=torch.optim.SGD,
        lr=0.1,
        max_epochs=2,
        batch_size=32,
        train_split=None,
        verbose=0,
    ).fit(X, y.astype(np.float32))
    return fork(shared, X, y.astype(np.float32), n_members, seed, max_epochs=3)


@pytest.fixture(scope="module")
def binary(cancer):
    return forked_binary(*cancer)


@pytest.fixture(scope="module")
def softmax_members(cancer):
    return forked_members(*cancer, softmax=True, lr=0.1)


@pytest.fixture(scope="module")
def merge(binary, cancer):
    return SoftMergeClassifier(binary, granularity="layer", random_state=0).fit(*cancer)


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

    def test_save_merged_refused_with_a_clear_message(self, merge, tmp_path):
        with pytest.raises(ValueError, match=r"the merged net is a skorch\..*Binary"):
            merge.save_merged(tmp_path / "m.safetensors")

    @pytest.mark.parametrize(
        "Baseline",
        [
            BestMemberClassifier,
            GreedySoupClassifier,
            OutputEnsembleClassifier,
            UniformSoupClassifier,
        ],
    )
    def test_baselines(self, Baseline, binary, cancer):
        X, y = cancer
        model = Baseline(binary).fit(X, y)
        assert model.predict_proba(X).shape == (len(X), 2)
        assert model.score(X, y) > 0.9


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
