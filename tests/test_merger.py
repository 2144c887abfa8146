"""The merging core on plain torch modules: units, weights, merged forward."""

import copy

import pytest
import torch

from sk_softmerge import SoftMerge
from sk_softmerge._core._gates import hard_concrete, logistic_noise
from sk_softmerge._core._units import find_units, select_parameters


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

    def test_unit_name_of_neuron_gates_says_to_name_the_layer(self, modules):
        names = SoftMerge(modules).unit_names
        assert "2[1]" in names
        with pytest.raises(ValueError, match=r"'2\[1\]' names one output unit.*'2'"):
            select_parameters(modules[0], "2[1]")

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
        merger = SoftMerge(modules, merge="2", granularity="layer")
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

    def test_needs_a_module(self, modules):
        with pytest.raises(ValueError, match="at least 1 module; got 0"):
            SoftMerge([])

    def test_one_module_is_its_own_merge(self, modules):
        x = torch.randn(3, 5)
        torch.testing.assert_close(SoftMerge(modules[:1])(x), modules[0](x))


class TestMembersMustMatch:
    """Members that differ are refused up front, naming what and where."""

    def test_parameter_names(self):
        members = [torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 2))]
        with pytest.raises(
            ValueError,
            match=r"modules\[1\] has parameter '0.weight' where modules\[0\] has "
            r"'weight'",
        ):
            SoftMerge(members)

    def test_parameter_shapes(self):
        with pytest.raises(
            ValueError,
            match=r"Parameter 'weight' of modules\[1\] has shape \(2, 4\), but "
            r"modules\[0\] has shape \(2, 3\)",
        ):
            SoftMerge([torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)])

    def test_parameter_dtypes(self):
        members = [torch.nn.Linear(3, 2) for _ in range(3)]
        members[2].bias.data = members[2].bias.data.double()
        with pytest.raises(
            ValueError,
            match=r"Parameter 'bias' of modules\[2\] has dtype torch.float64, but "
            r"modules\[0\] has dtype torch.float32",
        ):
            SoftMerge(members)

    def test_unmerged_parameters_are_checked_too(self, modules):
        other = mlp(0)
        other[2] = torch.nn.Linear(4, 2)
        with pytest.raises(ValueError, match=r"'2.weight'.*modules\[3\]"):
            SoftMerge([*modules, other], merge="0")


def naive_merged_parameters(merger, gates, modules):
    """Reference: every unit's convex combination, one unit and member at a time."""
    log_alpha = merger.log_alpha
    parameters = {}
    for name in select_parameters(modules[0]):
        rows = []
        for unit_position, unit in enumerate(merger.units):
            if name not in unit.parameters:
                continue
            z = gates[:, unit_position]
            if float(z.detach().sum()) > 0:
                weights = z / z.sum()
            else:
                column = log_alpha[:, unit_position]
                best = column == column.max()
                weights = best.float() / best.sum()
            value = sum(
                w * dict(m.named_parameters())[name].detach()
                for w, m in zip(weights, modules, strict=True)
            )
            rows.append(value)
        if len(rows) == 1:
            parameters[name] = rows[0]
        elif rows:
            parameters[name] = torch.stack([r[i] for i, r in enumerate(rows)])
    return parameters


def conv_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(2, 6, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 7, 5),
        torch.nn.Linear(5, 3),
    )


class TestFastPathEquivalence:
    """The vectorised merge against a naive loop over units and members."""

    @pytest.mark.parametrize("granularity", ["layer", "tensor", "neuron"])
    @pytest.mark.parametrize("make", [mlp, conv_net])
    def test_values_and_log_alpha_gradients(self, granularity, make):
        modules = [make(seed) for seed in range(4)]
        merger = SoftMerge(modules, granularity=granularity)
        with torch.no_grad():
            merger.log_alpha.copy_(torch.randn_like(merger.log_alpha) * 2)
        gates = merger.sample_gates(torch.Generator().manual_seed(0))
        gates = gates.detach().requires_grad_()
        closed = gates.detach().clone()
        closed[:, 0] = 0.0  # a unit with every gate closed
        closed.requires_grad_()

        for z in (gates, closed):
            fast = merger.merged_parameters(z)
            slow = naive_merged_parameters(merger, z, modules)
            assert fast.keys() == slow.keys()
            probes = {k: torch.randn_like(v) for k, v in slow.items()}
            (fast_grad,) = torch.autograd.grad(
                sum((fast[k] * probes[k]).sum() for k in fast), z
            )
            (slow_grad,) = torch.autograd.grad(
                sum((slow[k] * probes[k]).sum() for k in slow), z
            )
            for name in slow:
                torch.testing.assert_close(fast[name], slow[name])
            torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-5)

    def test_log_alpha_gradient_through_sampling(self, modules):
        merger = SoftMerge(modules, granularity="neuron")
        x = torch.randn(8, 5)
        generator = torch.Generator().manual_seed(3)
        gates = merger.sample_gates(generator)
        (merger(x, gates=gates) ** 2).sum().backward()
        fast = merger.log_alpha.grad.clone()

        log_alpha = merger.log_alpha.detach().clone().requires_grad_()
        generator = torch.Generator().manual_seed(3)
        u = torch.rand(log_alpha.shape, generator=generator) * (1 - 2e-6) + 1e-6
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / (2 / 3))
        z = (s * 1.2 - 0.1).clamp(0, 1)
        parameters = naive_merged_parameters(merger, z, modules)
        module = copy.deepcopy(modules[0])
        output = torch.func.functional_call(module, parameters, (x,))
        (output**2).sum().backward()
        torch.testing.assert_close(fast, log_alpha.grad, rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("granularity", ["layer", "neuron"])
    def test_sampled_fast_path_matches_gates_path(self, granularity):
        modules = [conv_net(seed) for seed in range(3)]
        merger = SoftMerge(modules, granularity=granularity)
        with torch.no_grad():
            merger.log_alpha.copy_(torch.randn_like(merger.log_alpha) * 2)
        noise = logistic_noise(merger.log_alpha.shape, torch.Generator().manual_seed(4))
        x = torch.randn(4, 2, 9)
        grads = []
        for kwargs in (
            {"gate_noise": noise},
            {"gates": hard_concrete(merger.log_alpha, noise)},
        ):
            (merger(x, **kwargs) ** 2).sum().backward()
            grads.append(merger.log_alpha.grad)
            merger.log_alpha.grad = None
        torch.testing.assert_close(grads[0], grads[1])
        assert (grads[0] != 0).any()
        with pytest.raises(ValueError, match="not both"):
            merger.merged_parameters(merger.gates(), noise=noise)

    def test_float64_members(self):
        modules = [mlp(seed).double() for seed in range(3)]
        merger = SoftMerge(modules, granularity="neuron")
        gates = torch.rand_like(merger.log_alpha)
        fast = merger.merged_parameters(gates)
        slow = naive_merged_parameters(merger, gates, modules)
        for name in slow:
            assert fast[name].dtype == torch.float64
            torch.testing.assert_close(fast[name], slow[name])

    def test_module_smaller_than_a_block(self):
        modules = [torch.nn.Linear(2, 1) for _ in range(3)]
        merger = SoftMerge(modules, granularity="neuron")
        gates = torch.rand_like(merger.log_alpha, requires_grad=True)
        fast = merger.merged_parameters(gates)
        slow = naive_merged_parameters(merger, gates, modules)
        for name in slow:
            torch.testing.assert_close(fast[name], slow[name])

    def test_backward_keeps_no_stack_sized_temporary(self):
        modules = [conv_net(seed) for seed in range(5)]
        merger = SoftMerge(modules, granularity="neuron")
        stack = merger.theta.untyped_storage().data_ptr()
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gates = merger.sample_gates(torch.Generator().manual_seed(0))
            merger(torch.randn(4, 2, 9), gates=gates).sum().backward()
        large = [t for t in saved if t.numel() >= merger.theta.shape[1]]
        assert large, "theta itself is expected among the saved inputs"
        for tensor in large:
            assert tensor.untyped_storage().data_ptr() == stack, tuple(tensor.shape)


class TiedNet(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = torch.nn.Linear(4, 4)
        self.decoder = torch.nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.register_buffer("shift", torch.full((4,), float(seed)))

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x))) + self.shift


class TestTiedWeights:
    def test_forward_and_state_dict_keep_the_tie(self):
        modules = [TiedNet(seed) for seed in range(3)]
        merger = SoftMerge(modules, granularity="tensor")
        with torch.no_grad():
            merger.log_alpha.copy_(torch.randn_like(merger.log_alpha))
        state = merger.merged_state_dict()
        torch.testing.assert_close(state["decoder.weight"], state["encoder.weight"])
        module = TiedNet(0)
        module.load_state_dict(state)
        x = torch.randn(5, 4)
        torch.testing.assert_close(merger(x), module(x))
        torch.testing.assert_close(state["shift"], modules[0].shift)


class Recurrent(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.gru = torch.nn.GRU(3, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class TestTemplateBinding:
    """The merged tensors take the template's parameters' places for a call only."""

    def test_template_keeps_its_parameters(self, modules):
        merger = SoftMerge(modules)
        before = dict(merger.template.named_parameters())
        merger(torch.randn(4, 5), gates=merger.sample_gates()).sum().backward()
        with pytest.raises(RuntimeError):
            merger(torch.randn(4, 7))  # wrong width: the forward raises midway
        after = dict(merger.template.named_parameters())
        assert before.keys() == after.keys()
        assert all(after[name] is tensor for name, tensor in before.items())

    def test_recurrent_members(self):
        modules = [Recurrent(seed) for seed in range(3)]
        merger = SoftMerge(modules, granularity="tensor")
        with torch.no_grad():
            merger.log_alpha.copy_(torch.randn_like(merger.log_alpha))
        module = Recurrent(0)
        module.load_state_dict(merger.merged_state_dict())
        x = torch.randn(2, 6, 3)
        torch.testing.assert_close(merger(x), module(x))

    def test_new_reference_is_used(self, modules):
        merger = SoftMerge(modules, merge="2")
        x = torch.randn(3, 5)
        merger(x)
        merger.set_reference(modules[1])
        module = copy.deepcopy(modules[1])
        module.load_state_dict(merger.merged_state_dict())
        torch.testing.assert_close(merger(x), module(x))
        assert not torch.allclose(merger(x), modules[0](x))
