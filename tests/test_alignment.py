"""Alignment of hidden units, batch-norm statistics, and align= in the estimator."""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from skorch import NeuralNetClassifier

import sk_softmerge._softmerge
from sk_softmerge import (
    SoftMergeClassifier,
    align_modules,
    recompute_batchnorm_statistics,
)
from sk_softmerge._align._spec import permutation_spec, permute_state

from conftest import batchnorm_module
from conftest import independent_members as train_independent

N_FEATURES = 12


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 8),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(8, 3),
    )


def conv_bn():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, N_FEATURES)),
        torch.nn.Conv1d(1, 4, 3),
        torch.nn.BatchNorm1d(4),
        torch.nn.ReLU(),
        torch.nn.MaxPool1d(2),
        torch.nn.Conv1d(4, 6, 3, padding=1),
        torch.nn.BatchNorm1d(6),
        torch.nn.GELU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 5, 3),
    )


class CustomForward(torch.nn.Module):
    """Not a Sequential: 2-D convolutions, functional calls, view, mean, a skip."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 5, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(5)
        self.conv2 = torch.nn.Conv2d(5, 4, 2)
        self.head = torch.nn.ModuleDict({"fc": torch.nn.Linear(4 * 2 * 2, 7)})
        self.out = torch.nn.Linear(7, 4)
        self.final = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = x.view(x.size(0), 1, 3, 4)
        x = F.relu(self.bn(self.conv1(x)))
        x = F.avg_pool2d(torch.sigmoid(self.conv2(x)), (1, 2), stride=1) * 2.0
        pooled = x.mean(dim=(2, 3))
        hidden = F.dropout(
            self.head["fc"](x.reshape(x.size(0), -1)), 0.2, self.training
        )
        return self.final(self.out(hidden.relu()) + pooled)


class ResidualMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(N_FEATURES, 10)
        self.block1 = torch.nn.Linear(10, 10)
        self.block2 = torch.nn.Sequential(
            torch.nn.Linear(10, 6), torch.nn.ReLU(), torch.nn.Linear(6, 10)
        )
        self.norm = torch.nn.LayerNorm(10)
        self.out = torch.nn.Linear(10, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + torch.relu(self.block1(x))
        x = self.block2(x) + x
        return self.out(self.norm(x))


ARCHITECTURES = {
    "mlp": mlp,
    "conv_bn": conv_bn,
    "residual": ResidualMLP,
    "custom": CustomForward,
}


def randomised(module):
    """Random affine parameters and statistics, so that no unit is like another."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith(("running_var", "norm.weight", "bn.weight")):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", ".bias")):
                tensor.normal_()
    return module.eval()


def member(architecture, seed):
    torch.manual_seed(seed)
    return randomised(ARCHITECTURES[architecture]())


@pytest.fixture
def inputs():
    return torch.randn(32, N_FEATURES)


def shuffled_copy(module, example, seed):
    """A copy of ``module`` with every group of hidden units shuffled."""
    groups = permutation_spec(module, example)
    generator = torch.Generator().manual_seed(seed)
    permutations = [torch.randperm(g.size, generator=generator) for g in groups]
    shuffled = copy.deepcopy(module)
    shuffled.load_state_dict(permute_state(module.state_dict(), groups, permutations))
    return shuffled


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module, state):
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


class TestPermutationSpec:
    def test_mlp_groups(self, inputs):
        groups = permutation_spec(mlp(), inputs)
        assert [(g.name, g.size) for g in groups] == [("0", 16), ("2", 8)]
        assert {(a.tensor, a.axis) for a in groups[1].axes} == {
            ("2.weight", 0),
            ("2.bias", 0),
            ("5.weight", 1),
        }

    def test_flatten_after_conv_gives_blocks(self, inputs):
        groups = permutation_spec(conv_bn(), inputs)
        assert [(g.name, g.size) for g in groups] == [("1", 4), ("5", 6)]
        axes = {(a.tensor, a.axis): a for a in groups[1].axes}
        assert axes["9.weight", 1].block == 5
        assert not axes["6.running_mean", 0].parameter
        assert axes["6.weight", 0].parameter

    def test_residual_joins_groups(self, inputs):
        groups = permutation_spec(ResidualMLP(), inputs)
        assert [(g.name, g.size) for g in groups] == [("inp", 10), ("block2.0", 6)]
        tensors = {a.tensor for a in groups[0].axes}
        assert {"block1.weight", "block2.2.bias", "norm.weight", "out.weight"} <= (
            tensors
        )

    def test_custom_forward(self, inputs):
        groups = permutation_spec(CustomForward(), inputs)
        assert [(g.name, g.size) for g in groups] == [
            ("conv1", 5),
            ("conv2", 4),
            ("head.fc", 7),
        ]
        axes = {(a.tensor, a.axis): a.block for a in groups[1].axes}
        assert axes == {
            ("conv2.weight", 0): 1,
            ("conv2.bias", 0): 1,
            ("head.fc.weight", 1): 4,
            ("out.weight", 0): 1,
            ("out.bias", 0): 1,
            ("final.weight", 1): 1,
        }


METHODS = ["weight_matching", "activation_matching"]


class TestAlignModules:
    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("architecture", ["mlp", "conv_bn", "residual", "custom"])
    def test_shuffled_member_is_aligned_back_exactly(
        self, architecture, method, inputs
    ):
        reference = member(architecture, 0)
        shuffled = shuffled_copy(reference, inputs, seed=1)
        assert not same_state(shuffled, state_of(reference))
        _, aligned = align_modules([reference, shuffled], inputs, method=method)
        for name, value in reference.state_dict().items():
            assert torch.equal(aligned.state_dict()[name], value), name

    @pytest.mark.parametrize("method", METHODS)
    def test_many_shuffled_copies_align_to_one(self, method, inputs):
        # Rounds of matching each member to all others keep exact matches.
        reference = member("mlp", 0)
        copies = [shuffled_copy(reference, inputs, seed=s) for s in range(1, 5)]
        aligned = align_modules([reference, *copies], inputs, method=method)
        for module in aligned:
            assert same_state(module, state_of(reference))

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("architecture", ["mlp", "conv_bn", "residual", "custom"])
    def test_outputs_unchanged(self, architecture, method, inputs):
        members = [member(architecture, seed) for seed in range(3)]
        before = [state_of(m) for m in members]
        aligned = align_modules(members, inputs, method=method)
        with torch.no_grad():
            for original, copy_ in zip(members, aligned, strict=True):
                assert copy_ is not original
                torch.testing.assert_close(
                    copy_(inputs), original(inputs), atol=1e-5, rtol=1e-5
                )
        assert all(map(same_state, members, before))
        assert [same_state(a, s) for a, s in zip(aligned, before, strict=True)] == [
            True,
            False,
            False,
        ]

    @pytest.mark.parametrize("method", METHODS)
    def test_reference_member(self, method, inputs):
        members = [member("mlp", seed) for seed in range(3)]
        aligned = align_modules(members, inputs, reference=2, method=method)
        for name, value in members[2].state_dict().items():
            assert torch.equal(aligned[2].state_dict()[name], value)

    @pytest.mark.parametrize("method", METHODS)
    def test_alignment_brings_members_closer(self, method, inputs):
        members = [member("mlp", seed) for seed in range(2)]
        aligned = align_modules(members, inputs, method=method)

        def distance(a, b):
            return sum(
                float((a.state_dict()[n] - v).pow(2).sum())
                for n, v in b.state_dict().items()
            )

        assert distance(aligned[0], aligned[1]) < distance(members[0], members[1])

    def test_activation_matching_finds_rescaled_units(self):
        # Members that compute the same features with different weights: each
        # unit of the second is a noisy rescaling of one unit of the first.
        torch.manual_seed(0)
        first = mlp()
        second = copy.deepcopy(first)
        with torch.no_grad():
            scale = torch.rand(16) * 3 + 0.1
            second[0].weight.mul_(scale[:, None])
            second[0].bias.mul_(scale)
            second[2].weight.div_(scale[None, :])
        groups = permutation_spec(first, torch.zeros(2, N_FEATURES))
        shuffled = permute_state(
            second.state_dict(), groups, [torch.randperm(16), torch.randperm(8)]
        )
        second.load_state_dict(shuffled)
        X = torch.randn(500, N_FEATURES)
        _, by_activations = align_modules(
            [first, second], X, method="activation_matching"
        )
        torch.testing.assert_close(
            by_activations[0].weight / scale[:, None], first[0].weight
        )

    def test_unknown_method(self, inputs):
        with pytest.raises(ValueError, match="method must be one of"):
            align_modules([mlp(), mlp()], inputs, method="zip")


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(N_FEATURES, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x).unsqueeze(1)
        h, _ = self.attn(h, h, h)
        return self.out(h.squeeze(1))


class Transposed(torch.nn.Module):
    def __init__(self, n_features=N_FEATURES):
        super().__init__()
        self.inp = torch.nn.Linear(n_features, 8)
        self.out = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.out(self.inp(x).view(-1, 4, 2).transpose(1, 2)).sum(1)


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(N_FEATURES, 3)

    def forward(self, x):
        return self.inp(x) if x.sum() > 0 else -self.inp(x)


class TestUnsupported:
    @pytest.mark.parametrize(
        ("module", "message"),
        [
            (Attention, r"module 'attn' is attention \(MultiheadAttention\)"),
            (Transposed, r"operation 'view' .* mixes hidden units"),
            (DataDependent, r"torch.fx cannot trace"),
        ],
    )
    def test_refused_with_message_and_members_untouched(self, module, message, inputs):
        members = [module(), module()]
        before = [state_of(m) for m in members]
        with pytest.raises(ValueError, match=message):
            align_modules(members, inputs)
        assert all(map(same_state, members, before))

    def test_different_architectures(self, inputs):
        with pytest.raises(ValueError, match=r"modules\[1\] does not have"):
            align_modules([mlp(), conv_bn()], inputs)


class TestBatchNormStatistics:
    def test_statistics_of_the_data(self, inputs):
        net = member("conv_bn", 0).train()
        before = state_of(net)
        fresh = recompute_batchnorm_statistics(net, inputs, batch_size=len(inputs))
        assert same_state(net, before) and net.training and not fresh.training
        features = fresh[1](fresh[0](inputs))
        torch.testing.assert_close(fresh[2].running_mean, features.mean((0, 2)))
        torch.testing.assert_close(fresh[2].running_var, features.var((0, 2)))
        assert fresh[2].momentum == net[2].momentum

    def test_a_last_batch_of_one_sample(self):
        # BatchNorm1d cannot normalise one sample in training: it joins the
        # batch before it.
        net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        X = torch.randn(9, 3)
        fresh = recompute_batchnorm_statistics(net, X, batch_size=4)
        with torch.no_grad():
            torch.testing.assert_close(fresh[1].running_mean, net[0](X).mean(0))

    def test_batches_weighted_by_size(self, inputs):
        net = torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, 4), torch.nn.BatchNorm1d(4)
        )
        fresh = recompute_batchnorm_statistics(net, inputs, batch_size=10)
        torch.testing.assert_close(fresh[1].running_mean, fresh[0](inputs).mean(0))

    def test_loads_state_dict(self, inputs):
        nets = [member("conv_bn", seed) for seed in range(2)]
        fresh = recompute_batchnorm_statistics(
            nets[0], inputs, state_dict=nets[1].state_dict()
        )
        assert torch.equal(fresh[1].weight, nets[1][1].weight)
        assert not torch.equal(fresh[2].running_mean, nets[1][2].running_mean)


@pytest.fixture(scope="module")
def independent_members(digits):
    """Members trained from different random initialisations."""
    return train_independent(*digits, partial(batchnorm_module, hidden=24))


class TestEstimator:
    @pytest.mark.parametrize("method", METHODS)
    def test_alignment_merges_independent_members(
        self, method, independent_members, digits, monkeypatch
    ):
        X, y = digits
        # From the average: a start from the best member alone hides what
        # alignment does.
        monkeypatch.setattr(sk_softmerge._softmerge, "choose_start", _average_start)
        before = [state_of(m.module_) for m in independent_members]
        params = dict(max_epochs=2, random_state=0, cv=None, validation_fraction=0)
        aligned = SoftMergeClassifier(independent_members, align=method, **params).fit(
            X, y
        )
        plain = SoftMergeClassifier(independent_members, **params).fit(X, y)
        assert all(map(same_state, [m.module_ for m in independent_members], before))
        assert aligned.score(X, y) > max(0.9, plain.score(X, y))

    def test_merged_statistics_are_those_of_the_fit_data(
        self, independent_members, digits
    ):
        X, y = digits
        merge = SoftMergeClassifier(
            independent_members,
            max_epochs=1,
            random_state=0,
            cv=None,
            validation_fraction=0,
        ).fit(X, y)
        module = merge.merged_net_.module_
        with torch.no_grad():
            features = module[0](torch.as_tensor(X))
        torch.testing.assert_close(module[1].running_mean, features.mean(0))
        torch.testing.assert_close(
            module[1].running_var, features.var(0), rtol=0.05, atol=1e-4
        )

    def test_unsupported_architecture_refused(self, digits):
        X, y = digits
        nets = [
            NeuralNetClassifier(
                Transposed,
                module__n_features=X.shape[1],
                criterion=torch.nn.CrossEntropyLoss,
                max_epochs=1,
                train_split=None,
                verbose=0,
            ).fit(X, y)
            for _ in range(2)
        ]
        before = [state_of(n.module_) for n in nets]
        merge = SoftMergeClassifier(nets, align="weight_matching")
        with pytest.raises(ValueError, match="operation 'view'"):
            merge.fit(X, y)
        assert all(map(same_state, [n.module_ for n in nets], before))

    def test_invalid_align(self, members, digits):
        with pytest.raises(ValueError, match="'align' parameter"):
            SoftMergeClassifier(members, align="zip_it").fit(*digits)


def _average_start(candidates, losses):
    return candidates[0]
