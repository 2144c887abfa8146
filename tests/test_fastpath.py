"""The fast path against its specification, written out naively."""

import copy
import weakref

import pytest
import torch

from sk_softmerge import SoftMerge
from sk_softmerge._core import _fastpath
from sk_softmerge._core._fastpath import (
    ALIGNMENT,
    FlatLayout,
    TemplateBinding,
    merge,
    plan_blocks,
)
from sk_softmerge._core._gates import BETA, GAMMA, ZETA, deterministic_z, logistic_noise


def naive_merge(z, log_alpha, theta, unit_index):
    """The specification of ``_fastpath``, one unit and one member at a time:
    ``sum_k z_ku theta_ku / sum_k z_ku``, or, when every gate of the unit is
    closed, the member(s) with the largest log-alpha."""
    merged = torch.zeros(theta.shape[1], dtype=theta.dtype)
    for u in range(z.shape[1]):
        (where,) = torch.nonzero(unit_index == u, as_tuple=True)
        column = z[:, u]
        if float(column.detach().sum()) > 0:
            weights = column / column.sum()
        else:
            best = log_alpha[:, u] == log_alpha[:, u].max()
            weights = best.to(theta.dtype) / best.sum()
        value = sum(weights[k] * theta[k, where] for k in range(theta.shape[0]))
        merged = merged.index_put((where,), value)
    return merged


def net(seed):
    # Sizes that are no multiples of one another, so that neuron units straddle
    # blocks, and a tensor without bias.
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(2, 5, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 4, 3),
        torch.nn.Linear(3, 2, bias=False),
    )


class TestSpecification:
    @pytest.mark.parametrize("chunked", [False, True])
    @pytest.mark.parametrize("block_sizes", [None, (8,), (64,)])
    @pytest.mark.parametrize("gates", ["sampled", "deterministic", "given"])
    @pytest.mark.parametrize("granularity", ["layer", "tensor", "neuron"])
    def test_values_and_gradients(
        self, granularity, gates, block_sizes, chunked, monkeypatch
    ):
        """Gradients in log-alpha for sampled and deterministic gates, in the
        gates themselves when they are given; reduced in one chunk or in
        chunks of one member's worth (as for a large stack)."""
        if block_sizes is not None:
            monkeypatch.setattr(_fastpath, "BLOCK_SIZES", block_sizes)
        if chunked:
            monkeypatch.setattr(_fastpath, "CHUNK_ELEMENTS", 1)
        merger = SoftMerge([net(seed) for seed in range(4)], granularity=granularity)
        theta, unit_index = merger.theta, merger.unit_index
        n_units = len(merger.units)
        plan = plan_blocks(unit_index, n_units, n_members=4)
        # Reduced in chunks, the plan's indices are compact (int16 here).
        assert (plan.block_unit.dtype == torch.int16) == chunked
        generator = torch.Generator().manual_seed(0)
        log_alpha = torch.randn(4, n_units, generator=generator) * 2
        noise = logistic_noise((4, n_units), generator)
        # Unit 0 closed, carried by member 0; unit 1 closed, shared by a tie;
        # the last unit open, its gates strictly between 0 and 1.
        log_alpha[:, 0] = torch.tensor([-20.0, -21.0, -22.0, -23.0])
        log_alpha[:, 1] = torch.tensor([-20.0, -20.0, -25.0, -25.0])
        log_alpha[:, -1] = torch.tensor([0.0, 0.5, -0.5, 1.0])
        noise[:, -1] = 0.0
        log_alpha.requires_grad_()

        if gates == "sampled":
            fast = merge(log_alpha, theta, plan, noise=noise)
            s = torch.sigmoid((noise + log_alpha) / BETA)
        else:  # the deterministic gate, as given gates or as a function of log-alpha
            s = torch.sigmoid(log_alpha)
        z = (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        if gates == "deterministic":
            fast = merge(log_alpha, theta, plan, gates=deterministic_z(log_alpha))
        elif gates == "given":
            z = z.detach().requires_grad_()
            fast = merge(log_alpha, theta, plan, gates=z)
        assert (z[:, :2] == 0).all() and ((z[:, -1] > 0) & (z[:, -1] < 1)).all()
        slow = naive_merge(z, log_alpha, theta, unit_index)
        torch.testing.assert_close(fast, slow)

        wrt = z if gates == "given" else log_alpha
        probe = torch.randn(theta.shape[1], generator=generator)
        (fast_grad,) = torch.autograd.grad((fast * probe).sum(), wrt)
        (slow_grad,) = torch.autograd.grad((slow * probe).sum(), wrt)
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-5)
        assert (fast_grad[:, :2] == 0).all() and (fast_grad != 0).any()


def mixing_weights(z, log_alpha):
    """The convex weights of every (member, unit), read off a merge of one-hot
    members: member k's weights on every unit are the k-th unit vector, so the
    merged weights of unit u are the weights' column u."""
    n_members, n_units = z.shape
    layout = FlatLayout([torch.Size([n_members])] * n_units)
    one_hot = torch.eye(n_members)
    theta = layout.stack(
        [[one_hot[k]] * n_units for k in range(n_members)], device="cpu", dtype=z.dtype
    )
    unit_index = layout.unit_index([torch.tensor([u]) for u in range(n_units)])
    plan = plan_blocks(unit_index, n_units)
    return torch.stack(layout.parameters(merge(log_alpha, theta, plan, gates=z)), 1)


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

    def test_gates_in_proportion(self):
        z = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
        w = mixing_weights(z, torch.tensor([[0.0, -1.0], [0.0, 2.0]]))
        torch.testing.assert_close(w, torch.tensor([[2 / 3, 0.0], [1 / 3, 1.0]]))


class TestFlatLayout:
    def test_stack_and_parameters_round_trip(self):
        members = [net(seed) for seed in range(3)]
        names = [name for name, _ in members[0].named_parameters()]
        layout = FlatLayout([members[0].get_parameter(n).shape for n in names])
        theta = layout.stack(
            [[m.get_parameter(n) for n in names] for m in members],
            device="cpu",
            dtype=torch.float32,
        )
        assert theta.shape[1] % ALIGNMENT == 0
        assert all((pad == 0).all() for pad in theta.split(layout.split_sizes, 1)[1::2])
        for k, member in enumerate(members):
            for name, value in zip(names, layout.parameters(theta[k]), strict=True):
                assert torch.equal(value, member.get_parameter(name).detach())

    def test_padding_belongs_to_the_unit_before_it(self):
        layout = FlatLayout([torch.Size([2, 3]), torch.Size([2])])
        unit_index = layout.unit_index([torch.tensor([0, 1]), torch.tensor([2])])
        assert unit_index.tolist() == [0] * 3 + [1] * 61 + [2] * 64


class TestPlanBlocks:
    @pytest.mark.parametrize("granularity", ["layer", "tensor"])
    def test_aligned_parameters_leave_no_loose_weights(self, granularity):
        merger = SoftMerge([net(seed) for seed in range(2)], granularity=granularity)
        plan = plan_blocks(merger.unit_index, len(merger.units))
        assert not plan.has_loose

    def test_loose_weights_are_those_of_straddling_blocks(self):
        merger = SoftMerge([net(seed) for seed in range(2)], granularity="neuron")
        plan = plan_blocks(merger.unit_index, len(merger.units))
        blocks = merger.unit_index.view(-1, plan.size)
        straddling = (blocks != blocks[:, :1]).any(1)
        assert plan.has_loose
        assert plan.block_unit[straddling].eq(len(merger.units)).all()
        torch.testing.assert_close(
            plan.loose_index,
            torch.nonzero(straddling.repeat_interleave(plan.size)).flatten(),
        )
        assert torch.equal(plan.loose_unit, merger.unit_index[plan.loose_index].long())

    def test_a_stack_reduced_in_chunks_gets_compact_indices(self, monkeypatch):
        """The same plan in the smallest types: int16 for this small net."""
        merger = SoftMerge([net(seed) for seed in range(2)], granularity="neuron")
        n_units = len(merger.units)
        plan = plan_blocks(merger.unit_index, n_units, n_members=2)
        monkeypatch.setattr(_fastpath, "CHUNK_ELEMENTS", 1)
        compact = plan_blocks(merger.unit_index, n_units, n_members=2)
        assert plan.block_unit.dtype == plan.loose_index.dtype == torch.int64
        for field in ("block_unit", "loose_index", "loose_unit"):
            assert getattr(compact, field).dtype == torch.int16
        for field in ("block_unit", "loose_index", "loose_unit"):
            assert torch.equal(getattr(compact, field).long(), getattr(plan, field))


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(3, 3)
        self.decoder = torch.nn.Linear(3, 3)
        self.decoder.weight = self.encoder.weight

    def forward(self, x, *, shift=0.0):
        return self.decoder(torch.relu(self.encoder(x))) + shift


class TestTemplateBinding:
    def test_is_functional_call(self):
        template = Tied()
        names = ["encoder.weight", "decoder.bias"]
        tensors = (torch.randn(3, 3), torch.randn(3))
        bind = TemplateBinding(template, names, [("decoder.weight", "encoder.weight")])
        x = torch.randn(4, 3)
        expected = torch.func.functional_call(
            template, dict(zip(names, tensors, strict=True)), (x,), {"shift": 1.0}
        )
        torch.testing.assert_close(bind(tensors, (x,), {"shift": 1.0}), expected)

    def test_template_gets_its_parameters_back_when_the_call_raises(self):
        template = Tied()
        before = dict(template.named_parameters(remove_duplicate=False))
        bind = TemplateBinding(template, ["encoder.weight"], [])
        with pytest.raises(RuntimeError):
            bind((torch.randn(3, 3),), (torch.randn(4, 5),), {})
        after = dict(template.named_parameters(remove_duplicate=False))
        assert all(after[name] is tensor for name, tensor in before.items())


class TestLetGoLinear:
    """Large merged linear weights run through a node that lets go of the
    weight before it forms the weight's gradient."""

    @pytest.mark.parametrize("input_shape", [(5,), (4, 5), (2, 3, 5)])
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("input_grad", [True, False])
    def test_is_linear(self, input_shape, bias, input_grad):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(input_shape, generator=generator).requires_grad_(input_grad)
        weight = torch.randn(3, 5, generator=generator, requires_grad=True)
        b = torch.randn(3, generator=generator, requires_grad=True) if bias else None
        inputs = [t for t in (x, weight, b) if t is not None and t.requires_grad]
        results = []
        for linear in (torch.nn.functional.linear, _fastpath._LetGoLinear.apply):
            out = linear(x, weight, b)
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out) + out)
            results.append((out, *grads))
        for fast, expected in zip(*results, strict=True):
            torch.testing.assert_close(fast, expected)

    def test_weight_is_let_go_before_its_gradient_is_formed(self, monkeypatch):
        """The weight is alive for the input's gradient, gone for its own."""
        leaf = torch.randn(3, 5, requires_grad=True)
        weight = leaf * 1.0  # held by the node alone, as a merged weight is
        alive = weakref.ref(weight)
        x = torch.randn(4, 5, requires_grad=True)
        out = _fastpath._LetGoLinear.apply(x, weight, None)
        del weight
        seen = []  # at each product in the backward pass: weight alive?
        matmul = torch.Tensor.__matmul__

        def watched(a, b):
            seen.append(alive() is not None)
            return matmul(a, b)

        monkeypatch.setattr(torch.Tensor, "__matmul__", watched)
        out.sum().backward()
        assert seen == [True, False]
        assert leaf.grad is not None and x.grad is not None

    def test_a_second_backward_pass_is_refused(self):
        """Never a silently missing gradient: the weight is gone."""
        weight = torch.randn(3, 5, requires_grad=True) * 1.0
        x = torch.randn(4, 5, requires_grad=True)
        out = _fastpath._LetGoLinear.apply(x, weight, None).sum()
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="let go of its weight"):
            out.backward()

    @pytest.mark.parametrize("granularity", ["layer", "neuron"])
    def test_merge_gradients_unchanged(self, granularity, monkeypatch):
        """Through the merger, the same outputs and log-alpha gradients with
        every linear weight let go as with none."""
        x = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(0))
        results = []
        for elements in (1, 2**40):
            monkeypatch.setattr(_fastpath, "LET_GO_ELEMENTS", elements)
            merger = SoftMerge(
                [net(seed) for seed in range(3)], granularity=granularity
            )
            assert len(merger._binding.linears) == (2 if elements == 1 else 0)
            generator = torch.Generator().manual_seed(1)
            noise = logistic_noise(merger.log_alpha.shape, generator)
            out = merger(x, gate_noise=noise)
            (grad,) = torch.autograd.grad(out.square().sum(), merger.log_alpha)
            results.append((out, grad))
        torch.testing.assert_close(*[r[0] for r in results])
        torch.testing.assert_close(*[r[1] for r in results])

    def test_template_forward_restored_when_the_call_raises(self, monkeypatch):
        monkeypatch.setattr(_fastpath, "LET_GO_ELEMENTS", 1)
        template = Tied()
        bind = TemplateBinding(template, ["encoder.weight"], [])
        assert bind.linears == [template.encoder]
        with pytest.raises(RuntimeError):
            bind((torch.randn(3, 3),), (torch.randn(4, 5),), {})
        assert "forward" not in vars(template.encoder)
        copy.deepcopy(template)  # nothing of the call is left to copy

    def test_a_linear_with_a_forward_of_its_own_keeps_it(self, monkeypatch):
        monkeypatch.setattr(_fastpath, "LET_GO_ELEMENTS", 1)
        template = torch.nn.Linear(3, 2)
        template.forward = lambda x: torch.zeros(len(x), 2)
        bind = TemplateBinding(template, ["weight"], [])
        assert bind.linears == []
        assert bind((torch.ones(2, 3),), (torch.ones(4, 3),), {}).eq(0).all()


def test_sampled_backward_keeps_no_stack_sized_temporary():
    """With the sample inside the node, only the stack itself is stack-sized
    among the tensors saved for the backward pass."""
    merger = SoftMerge([net(seed) for seed in range(5)], granularity="neuron")
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    noise = logistic_noise(merger.log_alpha.shape, torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        merger(torch.randn(4, 2, 6), gate_noise=noise).sum().backward()
    large = [t for t in saved if t.numel() >= merger.theta.shape[1]]
    assert large, "theta itself is expected among the saved inputs"
    stack = merger.theta.untyped_storage().data_ptr()
    for tensor in large:
        assert tensor.untyped_storage().data_ptr() == stack, tuple(tensor.shape)
