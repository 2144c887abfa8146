"""The merging core on plain torch modules: units, weights, merged forward."""

import copy

import pytest
import torch

from sk_softmerge import SoftMerge
from sk_softmerge._merging import find_units, mixing_weights, select_parameters


def mlp(seed, batchnorm=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 4)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(4))
    layers += [torch.nn.ReLU(), torch.nn.Linear(4, 3)]
    return torch.nn.Sequential(*layers)


@pytest.fixture
def modules():
    return [mlp(seed) for seed in range(3)]


class TestSelectParameters:
    def test_none_selects_all(self, modules):
        assert select_parameters(modules[0]) == [
            "0.weight",
            "0.bias",
            "2.weight",
            "2.bias",
        ]

    def test_module_and_glob_patterns(self, modules):
        assert select_parameters(modules[0], "2") == ["2.weight", "2.bias"]
        assert select_parameters(modules[0], ["*.weight"]) == ["0.weight", "2.weight"]
        assert select_parameters(modules[0], ("0.bias", "2")) == [
            "0.bias",
            "2.weight",
            "2.bias",
        ]

    def test_unknown_pattern_names_what_exists(self, modules):
        with pytest.raises(
            ValueError, match=r"'fc9' matches no parameter.*\['0', '2'\]"
        ):
            select_parameters(modules[0], ["0", "fc9"])

    def test_non_string_pattern(self, modules):
        with pytest.raises(TypeError, match="merge patterns must be strings; got int"):
            select_parameters(modules[0], [0])


class TestFindUnits:
    def test_layer_tensor_neuron(self, modules):
        names = select_parameters(modules[0])
        layer = find_units(modules[0], names, "layer")
        assert [u.name for u in layer] == ["0", "2"]
        assert layer[0].parameters == ("0.weight", "0.bias")
        assert [u.name for u in find_units(modules[0], names, "tensor")] == names
        neuron = find_units(modules[0], names, "neuron")
        assert [u.name for u in neuron] == [f"0[{i}]" for i in range(4)] + [
            f"2[{i}]" for i in range(3)
        ]

    def test_unknown_granularity(self, modules):
        with pytest.raises(ValueError, match="granularity must be one of"):
            find_units(modules[0], ["0.weight"], "block")


class TestMixingWeights:
    def test_convex(self):
        z = torch.rand(4, 6)
        w = mixing_weights(z, torch.zeros(4, 6))
        torch.testing.assert_close(w.sum(0), torch.ones(6))
        assert (w >= 0).all()

    def test_all_closed_unit_carried_by_largest_log_alpha(self):
        z = torch.zeros(3, 2)
        z[:, 1] = torch.tensor([0.2, 0.0, 0.6])
        log_alpha = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
        w = mixing_weights(z, log_alpha)
        torch.testing.assert_close(w[:, 0], torch.tensor([0.0, 1.0, 0.0]))
        torch.testing.assert_close(w[:, 1], torch.tensor([0.25, 0.0, 0.75]))


class TestSoftMerge:
    def test_open_gates_give_uniform_average(self, modules):
        merger = SoftMerge(modules)
        assert (merger.gates() == 1).all()
        state = merger.merged_state_dict()
        for name, value in state.items():
            expected = torch.stack([m.state_dict()[name] for m in modules]).mean(0)
            torch.testing.assert_close(value, expected)

    @pytest.mark.parametrize("granularity", ["layer", "tensor", "neuron"])
    def test_one_open_member_reproduces_it(self, modules, granularity):
        merger = SoftMerge(modules, granularity=granularity)
        gates = torch.zeros_like(merger.log_alpha)
        gates[1] = 1.0
        x = torch.randn(7, 5)
        torch.testing.assert_close(merger(x, gates=gates), modules[1](x))

    def test_neuron_gates_act_per_row(self, modules):
        merger = SoftMerge(modules, granularity="neuron")
        gates = torch.ones_like(merger.log_alpha)
        gates[0, 1] = 0.0  # member 0 leaves row 1 of layer 0
        merged = merger.merged_parameters(gates)
        rows = torch.stack([m[0].weight for m in modules])
        torch.testing.assert_close(merged["0.weight"][1], rows[1:, 1].mean(0))
        torch.testing.assert_close(
            merged["0.bias"][1], (modules[1][0].bias[1] + modules[2][0].bias[1]) / 2
        )
        torch.testing.assert_close(merged["0.weight"][0], rows[:, 0].mean(0))

    def test_forward_matches_module_with_merged_weights(self, modules):
        merger = SoftMerge(modules, granularity="tensor")
        with torch.no_grad():
            merger.log_alpha.copy_(torch.randn_like(merger.log_alpha))
        module = copy.deepcopy(modules[0])
        module.load_state_dict(merger.merged_state_dict())
        x = torch.randn(6, 5)
        torch.testing.assert_close(merger(x), module(x))

    def test_unmerged_parameters_come_from_first_module(self, modules):
        merger = SoftMerge(modules, merge="2")
        assert merger.unit_names == ["2"]
        state = merger.merged_state_dict()
        torch.testing.assert_close(state["0.weight"], modules[0][0].weight)
        average = torch.stack([m[2].weight for m in modules]).mean(0)
        torch.testing.assert_close(state["2.weight"], average)

    def test_only_log_alpha_learns_and_modules_untouched(self, modules):
        before = [copy.deepcopy(m.state_dict()) for m in modules]
        merger = SoftMerge(modules)
        assert [p for p in merger.parameters() if p.requires_grad] == [merger.log_alpha]
        loss = merger(torch.randn(4, 5), gates=merger.sample_gates()).sum()
        loss.backward()
        assert merger.log_alpha.grad is not None
        for module, state in zip(modules, before, strict=True):
            for name, value in module.state_dict().items():
                assert torch.equal(value, state[name])
            assert all(p.grad is None for p in module.parameters())

    def test_penalty_is_mean_expected_l0(self, modules):
        merger = SoftMerge(modules, init_log_alpha=-30.0)
        assert merger.penalty().item() < 1e-6
        assert 0.99 < SoftMerge(modules, init_log_alpha=30.0).penalty().item() <= 1

    def test_batchnorm_buffers_come_from_first_module(self):
        modules = [mlp(seed, batchnorm=True).eval() for seed in range(2)]
        modules[1][1].running_mean.fill_(5.0)
        state = SoftMerge(modules).merged_state_dict()
        torch.testing.assert_close(state["1.running_mean"], modules[0][1].running_mean)

    def test_needs_two_modules(self, modules):
        with pytest.raises(ValueError, match="at least 2 modules; got 1"):
            SoftMerge(modules[:1])
