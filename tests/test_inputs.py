"""Members as users have them: token ids, dict inputs, transformers."""

import copy
import pickle

import joblib
import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from skorch.helper import SliceDict

from sk_softmerge import SoftMergeClassifier, load_merged
from sk_softmerge.baselines import (
    BestMemberClassifier,
    FisherMergeClassifier,
    GreedySoupClassifier,
    LearnedSoupClassifier,
    OutputEnsembleClassifier,
    RegMeanClassifier,
    UniformSoupClassifier,
)

VOCABULARY, LENGTH, N_CLASSES = 20, 8, 3


class TokenClassifier(torch.nn.Module):
    """Embedding, two transformer encoder layers, mean pooling, linear head."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCABULARY, dim)
        layer = torch.nn.TransformerEncoderLayer(
            dim, 2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, N_CLASSES)

    def forward(self, X):
        return self.head(self.encoder(self.embed(X)).mean(1))


class TwoInputs(torch.nn.Module):
    """Dense features and token ids, as skorch passes a dict: by keyword."""

    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(5, 8)
        self.tokens = torch.nn.Embedding(VOCABULARY, 8)
        self.out = torch.nn.Linear(8, N_CLASSES)

    def forward(self, features, ids):
        return self.out(torch.relu(self.dense(features) + self.tokens(ids).mean(1)))


def fitted(module, X, y, seed, epochs):
    torch.manual_seed(seed)
    return NeuralNetClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-2,
        max_epochs=epochs,
        train_split=None,
        verbose=0,
    ).fit(X, y)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    X = rng.integers(0, VOCABULARY, size=(300, LENGTH))
    y = (X[:, :3] >= VOCABULARY // 2).sum(1) % N_CLASSES
    return X, y


@pytest.fixture(scope="module")
def token_members(tokens):
    """Forks of one short training, each trained further on a bootstrap."""
    X, y = tokens
    shared = fitted(TokenClassifier, X, y, seed=0, epochs=3)
    rng = np.random.default_rng(1)
    members = []
    for _ in range(3):
        member = copy.deepcopy(shared).set_params(max_epochs=2)
        rows = rng.integers(0, len(X), len(X))
        members.append(member.partial_fit(X[rows], y[rows]))
    return members


@pytest.fixture(scope="module")
def dict_data():
    rng = np.random.default_rng(0)
    X = {
        "features": rng.normal(size=(240, 5)).astype(np.float32),
        "ids": rng.integers(0, VOCABULARY, size=(240, 4)),
    }
    y = (X["features"][:, 0] > 0).astype(int) + (X["ids"][:, 0] > VOCABULARY // 2)
    return X, y


@pytest.fixture(scope="module")
def dict_members(dict_data):
    X, y = dict_data
    return [fitted(TwoInputs, SliceDict(**X), y, seed, epochs=3) for seed in range(3)]


class TestTokens:
    @pytest.mark.parametrize("granularity", ["neuron", "layer", "tensor"])
    def test_merges_at_every_granularity(self, token_members, tokens, granularity):
        X, y = tokens
        merge = SoftMergeClassifier(
            token_members, granularity=granularity, max_epochs=2, random_state=0
        ).fit(X, y)
        assert merge.predict(X).shape == y.shape
        assert merge.score(X, y) >= 0.5

    def test_neuron_gates_follow_rows(self, token_members, tokens):
        X, y = tokens
        names = (
            SoftMergeClassifier(token_members, max_epochs=1, random_state=0)
            .fit(X, y)
            .unit_names_
        )
        # One gate per embedding row (token), per row of the packed q/k/v
        # projection and per output feature of the attention's projection.
        assert names.count("embed[0]") == 1
        assert sum(n.startswith("embed[") for n in names) == VOCABULARY
        in_proj = "encoder.layers.0.self_attn"
        assert sum(n.startswith(f"{in_proj}[") for n in names) == 3 * 16
        assert sum(n.startswith(f"{in_proj}.out_proj[") for n in names) == 16

    def test_integer_ids_stay_integers(self, token_members, tokens):
        X, y = tokens
        merge = SoftMergeClassifier(token_members, max_epochs=1, random_state=0)
        # int32 ids, as a tokenizer may give them, are embedded as int64.
        merge.fit(X.astype(np.int32), y)
        np.testing.assert_array_equal(
            merge.predict(X), merge.predict(X.astype(np.int16))
        )

    def test_persists(self, token_members, tokens, tmp_path):
        X, y = tokens
        merge = SoftMergeClassifier(token_members, max_epochs=2, random_state=0)
        merge.fit(X, y)
        expected = merge.predict_proba(X)
        joblib.dump(merge, tmp_path / "merge.joblib")
        np.testing.assert_array_equal(
            joblib.load(tmp_path / "merge.joblib").predict_proba(X), expected
        )
        path = merge.save_merged(tmp_path / "merge.safetensors")
        net = load_merged(path, TokenClassifier)
        np.testing.assert_allclose(net.predict_proba(X), expected, rtol=1e-6)

    def test_survives_a_nan_member(self, token_members, tokens):
        X, y = tokens
        broken = copy.deepcopy(token_members[0])
        attention = broken.module_.encoder.layers[0].self_attn
        with torch.no_grad():
            attention.in_proj_weight[0, 0] = float("nan")
        with pytest.warns(UserWarning, match="non-finite"):
            merge = SoftMergeClassifier(
                [broken, *token_members[1:]], max_epochs=2, random_state=0
            ).fit(X, y)
        assert merge.excluded_estimators_ == [0]
        assert np.isfinite(merge.predict_proba(X)).all()

    @pytest.mark.parametrize("align", ["weight_matching", "activation_matching"])
    def test_alignment_refused_with_a_message(self, token_members, tokens, align):
        X, y = tokens
        with pytest.raises(ValueError, match="attention"):
            SoftMergeClassifier(token_members, align=align).fit(X, y)

    def test_integer_features_without_embedding_become_floats(self, digits):
        X, y = digits
        X = (X * 16).astype(np.int64)
        members = [
            fitted(
                torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 10)),
                X.astype(np.float32),
                y,
                seed,
                epochs=1,
            )
            for seed in range(2)
        ]
        merge = SoftMergeClassifier(members, max_epochs=1).fit(X, y)
        assert merge.predict(X).shape == y.shape


class TestDictInputs:
    @pytest.mark.parametrize("wrap", [dict, SliceDict])
    def test_fit_and_predict(self, dict_members, dict_data, wrap):
        X, y = dict_data
        merge = SoftMergeClassifier(dict_members, max_epochs=2, random_state=0)
        merge.fit(wrap(**X), y)
        assert not hasattr(merge, "n_features_in_")
        proba = merge.predict_proba(wrap(**X))
        assert proba.shape == (len(y), N_CLASSES)
        np.testing.assert_allclose(
            proba, merge.merged_net_.predict_proba(SliceDict(**X)), rtol=1e-6
        )
        worst = min(m.score(SliceDict(**X), y) for m in dict_members)
        assert merge.score(X, y) >= worst

    def test_keys_in_another_order(self, dict_members, dict_data):
        X, y = dict_data
        merge = SoftMergeClassifier(dict_members, max_epochs=1, random_state=0)
        merge.fit(X, y)
        swapped = {"ids": X["ids"], "features": X["features"]}
        np.testing.assert_array_equal(merge.predict(swapped), merge.predict(X))

    def test_baselines(self, dict_members, dict_data):
        X, y = dict_data
        for baseline in (
            BestMemberClassifier,
            UniformSoupClassifier,
            GreedySoupClassifier,
            OutputEnsembleClassifier,
            FisherMergeClassifier,
            LearnedSoupClassifier,
            RegMeanClassifier,
        ):
            assert baseline(dict_members).fit(X, y).predict(X).shape == y.shape

    def test_pickles(self, dict_members, dict_data):
        X, y = dict_data
        merge = SoftMergeClassifier(dict_members, max_epochs=1, random_state=0)
        merge.fit(X, y)
        again = pickle.loads(pickle.dumps(merge))
        np.testing.assert_array_equal(again.predict(X), merge.predict(X))

    @pytest.mark.parametrize(
        "change, message",
        [
            (lambda X: {"features": X["features"]}, "fitted with keys"),
            (lambda X: {**X, "extra": X["ids"]}, "fitted with keys"),
            (lambda X: {**X, "ids": X["ids"][:10]}, "one row per sample"),
            (lambda X: {}, "empty dict"),
            (lambda X: {**X, "ids": 3}, "must be an array"),
            (lambda X: X["features"], "fitted with a dict"),
        ],
    )
    def test_bad_inputs_refused(self, dict_members, dict_data, change, message):
        X, y = dict_data
        merge = SoftMergeClassifier(dict_members, max_epochs=1, random_state=0)
        merge.fit(X, y)
        with pytest.raises(ValueError, match=message):
            merge.predict(change(X))

    def test_bad_fit_inputs_refused(self, dict_members, dict_data):
        X, y = dict_data
        merge = SoftMergeClassifier(dict_members, max_epochs=1)
        with pytest.raises(ValueError, match="one row per sample"):
            merge.fit({**X, "ids": X["ids"][:-1]}, y)
        with pytest.raises(ValueError, match="inconsistent numbers of samples"):
            merge.fit(X, y[:-1])
        with pytest.raises(ValueError, match="cannot be passed through"):
            merge.fit({"features": X["features"], "tokens": X["ids"]}, y)

    def test_export_refused_with_a_message(self, dict_members, dict_data, tmp_path):
        X, y = dict_data
        merge = SoftMergeClassifier(dict_members, max_epochs=1).fit(X, y)
        with pytest.raises(ValueError, match="fitted on a dict X"):
            merge.save_merged(tmp_path / "merge.safetensors")

    def test_alignment_refused(self, dict_members, dict_data):
        X, y = dict_data
        with pytest.raises(ValueError, match="dict of arrays"):
            SoftMergeClassifier(dict_members, align="weight_matching").fit(X, y)
