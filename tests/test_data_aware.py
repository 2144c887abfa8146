"""The data-aware baselines: RegMean, Fisher merging, the learned soup."""

import copy

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor

from sk_softmerge import load_merged
from sk_softmerge._core._fisher import diagonal_fisher, fisher_parameters
from sk_softmerge._core._regmean import regmean_parameters, regmean_weight
from sk_softmerge.baselines import (
    FisherMergeClassifier,
    FisherMergeRegressor,
    LearnedSoupClassifier,
    LearnedSoupRegressor,
    RegMeanClassifier,
    RegMeanRegressor,
    UniformSoupClassifier,
)

from conftest import batchnorm_module, forked_members, make_module, parameters_of

CLASSIFIERS = [RegMeanClassifier, FisherMergeClassifier, LearnedSoupClassifier]
REGRESSORS = [RegMeanRegressor, FisherMergeRegressor, LearnedSoupRegressor]


def merged_state(model):
    return model.merged_net_.module_.state_dict()


@pytest.mark.parametrize("Baseline", CLASSIFIERS)
def test_identical_members_merge_into_that_member(Baseline, members, digits):
    X, y = digits
    same = [copy.deepcopy(members[0]) for _ in range(3)]
    state = merged_state(Baseline(same).fit(X[:300], y[:300]))
    for name, value in members[0].module_.state_dict().items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("Baseline", REGRESSORS)
def test_identical_regressors_merge_into_that_member(Baseline, regressors, diabetes):
    X, y = diabetes
    same = [copy.deepcopy(regressors[1]) for _ in range(2)]
    state = merged_state(Baseline(same).fit(X, y))
    for name, value in regressors[1].module_.state_dict().items():
        assert torch.equal(state[name], value), name


def linear_regressors(X, y, n_members=3):
    """Linear regressors trained on different halves of the data."""
    nets = []
    for seed in range(n_members):
        torch.manual_seed(seed)
        rows = np.random.default_rng(seed).permutation(len(X))[: len(X) // 2]
        nets.append(
            NeuralNetRegressor(
                torch.nn.Linear,
                module__in_features=X.shape[1],
                module__out_features=1,
                max_epochs=3,
                lr=0.05,
                train_split=None,
                verbose=0,
            ).fit(X[rows], y[rows, None])
        )
    return nets


def test_regmean_of_a_linear_layer_is_the_least_squares_solution(diabetes):
    X, y = diabetes
    nets = linear_regressors(X, y)
    merge = RegMeanRegressor(nets, alpha=1.0).fit(X, y)
    # min_W sum_k ||X1 W^T - X1 W_k^T||^2, X1 = [X, 1], solved directly.
    X1 = np.hstack([X, np.ones((len(X), 1))]).astype(np.float64)
    targets = [X1 @ np.hstack(parameters_of_linear(n)).T for n in nets]
    solution, *_ = np.linalg.lstsq(
        np.vstack([X1] * len(nets)), np.vstack(targets), rcond=None
    )
    module = merge.merged_net_.module_
    np.testing.assert_allclose(module.weight.detach()[0], solution[:-1, 0], rtol=1e-5)
    np.testing.assert_allclose(module.bias.detach(), solution[-1], rtol=1e-5)
    assert merge.solved_layers_ == [""]


def parameters_of_linear(net):
    module = net.module_
    return module.weight.detach().double().numpy(), module.bias.detach()[:, None]


def test_regmean_alpha_zero_weighs_columns_by_their_squared_inputs():
    weights = torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]]], dtype=torch.float64)
    grams = torch.tensor(
        [[[1.0, 0.5], [0.5, 3.0]], [[3.0, 0.5], [0.5, 1.0]]], dtype=torch.float64
    )
    merged = regmean_weight(weights, grams, alpha=0.0)
    # Column j: sum_k G_k[j, j] W_k[:, j] / sum_k G_k[j, j].
    torch.testing.assert_close(merged, torch.tensor([[0.5, 1.0]], dtype=torch.float64))


def test_regmean_keeps_the_average_where_no_input_reaches(digits):
    """Dead hidden units: the second layer's Gram matrices are singular in
    their columns; the ridge keeps the members' average there."""
    X, y = digits
    members = forked_members(X, y, n_members=2, seed=3)
    modules = [copy.deepcopy(m.module_) for m in members]
    with torch.no_grad():
        for module in modules:
            module[0].bias[:4] = -1e4  # units 0-3 never fire
    parameters, solved = regmean_parameters(modules, torch.as_tensor(X), alpha=1.0)
    assert solved == ["0", "2"]
    average = sum(m[2].weight.double() for m in modules) / 2
    torch.testing.assert_close(parameters["2.weight"][:, :4], average[:, :4])
    assert torch.isfinite(parameters["2.weight"]).all()


def test_regmean_solves_convolutions():
    """The second convolution's merge minimises the squared error on every
    member's own inputs to it (which differ: the first layers differ)."""
    torch.manual_seed(0)
    modules = [
        torch.nn.Sequential(
            torch.nn.Conv1d(2, 2, 1),
            torch.nn.ReLU(),
            torch.nn.Conv1d(2, 3, 3, padding=1, stride=2),
        )
        for _ in range(2)
    ]
    X = torch.randn(40, 2, 9)
    parameters, solved = regmean_parameters(modules, X, alpha=1.0)
    assert solved == ["0", "2"]
    inputs = [m[1](m[0](X)).detach() for m in modules]

    def objective(weight, bias):
        return sum(
            ((torch.nn.functional.conv1d(h, weight, bias, 2, 1) - m[2](h)) ** 2).sum()
            for m, h in zip(modules, inputs, strict=True)
        )

    weight, bias = parameters["2.weight"].float(), parameters["2.bias"].float()
    best = objective(weight, bias)
    for _ in range(3):
        assert objective(weight + 1e-2 * torch.randn_like(weight), bias) > best
        assert objective(weight, bias + 1e-2 * torch.randn_like(bias)) > best


class Twice(torch.nn.Module):
    """A linear layer called twice (its per-sample gradient is a sum of two
    outer products), a norm, and a linear layer on sequences."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(3, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.per_position = torch.nn.Linear(1, 2)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        hidden = self.norm(self.shared(torch.relu(self.shared(x))))
        return self.head(self.per_position(hidden[..., None]).flatten(1))


class Branching(torch.nn.Module):
    """A module whose forward reads a value back (``.item()``), which
    ``vmap`` cannot trace."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        hidden = self.norm(x)
        if hidden.abs().max().item() > 100:
            hidden = hidden / 100
        return self.head(hidden)


@pytest.mark.parametrize(
    "make",
    [lambda: torch.nn.Linear(3, 2), Twice, Branching],
    ids=["linear", "mixed", "untraceable"],
)
def test_fisher_is_the_mean_squared_per_sample_gradient(make):
    """Both ways to square per-sample gradients (outer products for a
    ``Linear`` called once on one row per sample, ``vmap`` for the rest) give
    the squares of gradients taken one sample at a time."""
    torch.manual_seed(0)
    module = make().eval()
    X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    w = torch.rand(20)
    loss = torch.nn.CrossEntropyLoss()
    fisher = diagonal_fisher(module, module.state_dict(), loss, X, y, w, batch_size=8)
    expected = {name: torch.zeros_like(p) for name, p in module.named_parameters()}
    for i in range(len(X)):
        module.zero_grad()
        loss(module(X[i : i + 1]), y[i : i + 1]).backward()
        for name, p in module.named_parameters():
            expected[name] += w[i] * p.grad**2 / w.sum()
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-7)


def test_fisher_without_information_falls_back_to_the_average(digits):
    """A weight where no member has Fisher information (an input that is always
    zero) is the plain average; a member whose gradients are all zero has no
    say where the others have information."""
    X, y = digits
    X = X.copy()
    X[:, 5] = 0.0
    members = forked_members(X, y, n_members=3, seed=4)
    modules = [copy.deepcopy(m.module_).eval() for m in members]
    loss = torch.nn.CrossEntropyLoss()
    X_t, y_t = torch.as_tensor(X[:200]), torch.as_tensor(y[:200])
    fishers = [diagonal_fisher(m, m.state_dict(), loss, X_t, y_t) for m in modules]
    assert all((f["0.weight"][:, 5] == 0).all() for f in fishers)
    merged = fisher_parameters(modules, fishers)
    average = sum(m[0].weight.double() for m in modules) / 3
    torch.testing.assert_close(merged["0.weight"][:, 5], average[:, 5])

    silent = [{k: torch.zeros_like(v) for k, v in fishers[0].items()}, *fishers[1:]]
    merged = fisher_parameters(modules, silent)
    others = fisher_parameters(modules[1:], fishers[1:])
    informed = fishers[1]["2.weight"] + fishers[2]["2.weight"] > 1e-3
    torch.testing.assert_close(
        merged["2.weight"][informed], others["2.weight"][informed], rtol=1e-3, atol=0
    )


def test_fisher_sampled_and_empirical_differ_and_repeat(members, digits):
    X, y = digits
    sampled = FisherMergeClassifier(members, random_state=0).fit(X[:300], y[:300])
    again = FisherMergeClassifier(members, random_state=0).fit(X[:300], y[:300])
    empirical = FisherMergeClassifier(members, fisher="empirical").fit(X[:300], y[:300])
    state, repeated = merged_state(sampled), merged_state(again)
    assert all(torch.equal(state[k], repeated[k]) for k in state)
    assert not torch.equal(state["0.weight"], merged_state(empirical)["0.weight"])


def test_learned_soup_leaves_out_a_member_that_hurts(digits):
    X, y = digits
    good = forked_members(X, y, n_members=2, seed=5)
    weak = copy.deepcopy(good[0])
    with torch.no_grad():
        for p in weak.module_.parameters():
            p.copy_(torch.randn_like(p))
    soup = LearnedSoupClassifier(
        [good[0], weak, good[1]], max_epochs=10, random_state=0
    )
    soup.fit(X, y)
    assert soup.mixing_weights_.shape == (3, 4)
    assert (soup.mixing_weights_[1] < 0.2).all()
    np.testing.assert_allclose(soup.mixing_weights_.sum(0), 1, rtol=1e-5)
    uniform = UniformSoupClassifier([good[0], weak, good[1]]).fit(X, y)
    assert soup.score(X, y) > uniform.score(X, y) + 0.1
    assert soup.temperature_ != 1.0
    assert len(soup.loss_curve_) == 10


def test_learned_soup_of_regressors_learns_no_temperature(regressors, diabetes):
    soup = LearnedSoupRegressor(regressors, max_epochs=2, random_state=0)
    assert soup.fit(*diabetes).temperature_ == 1.0


@pytest.mark.parametrize("Baseline", CLASSIFIERS)
def test_sample_weight_counts_as_repeated_samples(Baseline, members, digits):
    X, y = digits
    X, y = X[:200], y[:200]
    weights = np.arange(200) % 3
    params = {} if Baseline is RegMeanClassifier else {"random_state": 0}
    if Baseline is FisherMergeClassifier:
        params["fisher"] = "empirical"
    if Baseline is LearnedSoupClassifier:
        params["batch_size"] = 1000  # one step an epoch: the same step either way
    weighted = Baseline(members, **params).fit(X, y, sample_weight=weights)
    rows = np.repeat(np.arange(200), weights)
    repeated = Baseline(members, **params).fit(X[rows], y[rows])
    for name, value in merged_state(repeated).items():
        torch.testing.assert_close(
            merged_state(weighted)[name], value, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("Baseline", CLASSIFIERS)
def test_batchnorm_statistics_are_those_of_the_fit_data(Baseline, digits):
    X, y = digits
    members = forked_members(X, y, architecture=batchnorm_module)
    shifted = X[:400] + 0.25
    model = Baseline(members).fit(shifted, y[:400])
    module = model.merged_net_.module_
    hidden = module[0](torch.as_tensor(shifted))
    torch.testing.assert_close(module[1].running_mean, hidden.mean(0))


@pytest.mark.parametrize("Baseline", CLASSIFIERS)
def test_save_merged_round_trip(Baseline, members, digits, tmp_path):
    X, y = digits
    model = Baseline(members).fit(X[:300], y[:300])
    path = model.save_merged(tmp_path / "merged.safetensors")
    net = load_merged(path, make_module)
    np.testing.assert_array_equal(net.predict_proba(X), model.predict_proba(X))


@pytest.mark.parametrize(
    "Baseline, params, match",
    [
        (RegMeanClassifier, {"alpha": 1.5}, r"'alpha' parameter .* range \[0.0, 1.0\]"),
        (RegMeanClassifier, {"alpha": "big"}, "'alpha' parameter"),
        (
            FisherMergeClassifier,
            {"fisher": "true"},
            "'fisher' parameter .*'empirical'",
        ),
        (FisherMergeClassifier, {"random_state": "a"}, "'random_state' parameter"),
        (LearnedSoupClassifier, {"lr": 0}, r"'lr' parameter .* range \(0.0, inf\)"),
        (LearnedSoupClassifier, {"max_epochs": 0}, "'max_epochs' parameter"),
        (LearnedSoupClassifier, {"batch_size": 1.5}, "'batch_size' parameter"),
    ],
)
def test_bad_parameters_refused(Baseline, params, match, members, digits):
    with pytest.raises(ValueError, match=match):
        Baseline(members, **params).fit(*digits)


@pytest.mark.parametrize("Baseline", CLASSIFIERS)
def test_bad_input_refused(Baseline, members, digits, regressors):
    X, y = digits
    with pytest.raises(ValueError, match="cannot be passed through"):
        Baseline(members).fit(X[:, :10], y)
    with pytest.raises(TypeError, match="a merge for classification"):
        Baseline(regressors).fit(X, y)
    with pytest.raises(ValueError, match="sample_weight must be finite"):
        Baseline(members).fit(X, y, sample_weight=np.full(len(y), -1.0))


@pytest.mark.parametrize("Baseline", CLASSIFIERS)
def test_broken_members_do_not_crash(Baseline, members, digits):
    """Like the uniform soup, these merges leave no member out: a member
    holding NaN spoils the merge, a scaled one pulls it; neither raises, and
    the user's nets are untouched."""
    X, y = digits
    broken, scaled = copy.deepcopy(members[0]), copy.deepcopy(members[1])
    with torch.no_grad():
        broken.module_[0].weight[0, 0] = float("nan")
        for p in scaled.module_.parameters():
            p.mul_(1e3)
    before = parameters_of(broken)
    Baseline([broken, *members[1:]]).fit(X[:300], y[:300])
    model = Baseline([scaled, *members[1:]]).fit(X[:300], y[:300])
    assert np.isfinite(model.predict_proba(X[:50])).all()
    for name, value in parameters_of(broken).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


def test_members_of_another_architecture_refused(digits):
    X, y = digits
    nets = [
        NeuralNetClassifier(
            module,
            criterion=torch.nn.CrossEntropyLoss,
            max_epochs=1,
            train_split=None,
            verbose=0,
        ).fit(X, y)
        for module in (make_module(64, 10), batchnorm_module(64, 10))
    ]
    for Baseline in CLASSIFIERS:
        with pytest.raises((ValueError, TypeError)):
            Baseline(nets).fit(X, y)


@pytest.mark.parametrize("Baseline", REGRESSORS)
def test_save_merged_round_trip_of_regressors(Baseline, regressors, diabetes, tmp_path):
    X, y = diabetes
    model = Baseline(regressors).fit(X, y)
    path = model.save_merged(tmp_path / "merged.safetensors")
    net = load_merged(path, make_module, n_features=10, n_classes=1)
    np.testing.assert_array_equal(net.predict(X)[:, 0], model.predict(X))
