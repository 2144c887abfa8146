"""The fast path of a merge: gates and the members' stacked weights in, merged
weights out, and a template run with them.

Everything in this module exists to make a gate-learning step cheap; what it
computes is plain.

Specification
-------------
``theta`` holds the members' merged parameters, one flat row per member
(``n_members x n_weights``, see :class:`FlatLayout`); weight ``i`` belongs to
merge unit ``unit[i]``. ``z[k, u]`` is member ``k``'s gate on unit ``u``: given,
or the hard-concrete sample ``hard_concrete(log_alpha, noise)`` of
:mod:`sk_softmerge._core._gates`, or the deterministic gate. For every unit ``u`` and
member ``k``::

    if sum_k z[k, u] > 0:  c[k, u] = z[k, u]
    else:                  c[k, u] = 1 if log_alpha[k, u] == max_j log_alpha[j, u]
                                     else 0
    merged[i] = sum_k c[k, unit[i]] * theta[k, i] / sum_k c[k, unit[i]]

that is ``sum_k z_ku theta_ku / sum_k z_ku``, and a unit whose gates are all
closed is carried by the member with the largest log-alpha (shared equally on
ties), so no unit collapses to zero. Gradients are those of this formula, in
the gates or, for a sample, in ``log_alpha`` through the sample; a closed unit
does not depend on either. ``tests/test_fastpath.py`` checks :func:`merge`
against this formula written out unit by unit and member by member, and
:class:`TemplateBinding` against :func:`torch.func.functional_call`.

What makes it fast, and what each piece gains
---------------------------------------------
On a small net a training step costs well under a millisecond, most of it
per-operation overhead: every piece below cuts operations or autograd nodes,
and each is kept because leaving it out, alone, slows a step by more than the
noise. Measured with :func:`~sk_softmerge._core._training.learn_gates` on an MLP
40-100-100-10, 5 members, 4000 samples, batch 64, 3 epochs, one CPU thread:
CPU time per step, each variant run 25 times interleaved with the full fast
path (0.65 ms per step with a gate per layer, 0.83 ms with a gate per
neuron); the median of the paired ratios, per layer / per neuron. Two copies
of the same code differ by up to 2 %.

1. One autograd node from gates, or from log-alphas and noise, to the merged
   flat buffer (:class:`_Merge`), with a hand-written backward that saves only
   the stack and ``(n_members, n_units)`` tensors. The same reduction as
   autograd operations: +6 % / +9 %; with the sample in a node of its own
   (:func:`~sk_softmerge._core._gates.hard_concrete`): +5 % / +6 %.
2. A blocked reduction (:func:`plan_blocks`): blocks of consecutive weights of
   one unit are weighted as one row, and their gradient is one dot product;
   only weights in blocks that straddle two units are gathered and scattered
   one by one. A plain gather of every weight's gate, and its backward
   scatter-add: +65 % / +25 %.
3. Every parameter starts at a multiple of ``ALIGNMENT`` weights (zero padding
   between them): with a gate per layer or tensor no block straddles two
   units, and blocks tile the whole stack. Without: +13 % / +3 %.
4. Vectors taken from the flat buffer as they are
   (:meth:`FlatLayout.parameters`), not viewed: a view is one more autograd
   node. +2 to 3 % (in three runs, one of 40 repeats: +3 % / +2 %, where
   two copies of the same code differ by under 1 %).
5. :class:`TemplateBinding` puts the merged tensors in the template's
   parameter dictionaries for the call, instead of
   :func:`torch.func.functional_call`: +8 % / +6 %.

Tried and dropped, being within the noise: zero-dimensional tensors instead of
Python numbers as the constants of the gate operations.

What keeps it small
-------------------
Beside the stack, a large merge's step holds as little as these allow
(measured: ``python benchmarks/speed.py --memory-breakdown``):

- The reduction runs in chunks of at most ``CHUNK_ELEMENTS`` products, one
  alive at a time.
- A stack reduced in chunks keeps its plan's indices in the smallest integer
  types that hold them (:func:`plan_blocks`), converted a chunk at a time.
- A large ``nn.Linear`` of the template runs through :class:`_LetGoLinear`
  (``LET_GO_ELEMENTS``), which lets go of the merged weight before forming its
  gradient: the merged flat buffer is then freed before the largest
  gradient is formed, not after. At 1M weights and 5 members this lowered a
  default fit's peak from 1.50 to 1.43 stacks, for about 1 % more time per
  step (one CPU thread, epochs with and without it alternated in one
  process); the node, written in Python, costs microseconds a call, which
  only a large layer hides.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._gates import hard_concrete_with_slope

ALIGNMENT = 64
"""Every parameter starts at a multiple of this many weights in the flat stack,
so that blocks of any of ``BLOCK_SIZES`` never straddle two parameters."""

BLOCK_SIZES = (64, 32, 16, 8)
"""Block lengths the reduction chooses from, for each merger; each divides
``ALIGNMENT``, so blocks tile the whole stack."""

LOOSE_COST = 4
"""Cost of a weight reduced on its own, in blocks; measured on CPU, where a
scatter-add costs several times a contiguous sum per element."""

LOOSE_OVERHEAD = 1024
"""Cost, in blocks, of the eight extra operations that any loose weight brings."""

CHUNK_ELEMENTS = 2**18
"""The reduction's transient ``(n_members, ...)`` products hold at most this many
elements, or half a member's weights if more: a large stack is reduced in
chunks of blocks, so that a step's memory is the stack plus a few members'
worth, not two stacks. Small stacks are reduced in one chunk, as if there were
none."""


def chunk_blocks(n_members: int, n_blocks: int, size: int) -> int:
    """Blocks per chunk of the reduction (see ``CHUNK_ELEMENTS``).

    Examples
    --------
    >>> from sk_softmerge._core._fastpath import chunk_blocks
    >>> chunk_blocks(5, 200, 64)        # a small stack: one chunk
    200
    >>> chunk_blocks(5, 2**20, 64)      # 64 Mi weights: half a member a chunk
    104857
    >>> chunk_blocks(5, 2**12, 64)      # 256 Ki weights: 256 Ki elements a chunk
    819
    """
    elements = max(CHUNK_ELEMENTS, n_blocks * size // 2)
    return max(1, min(n_blocks, elements // (n_members * size)))


class FlatLayout:
    """Where the merged parameters lie in the flat stack.

    The parameters follow one another, each flattened and followed by zero
    padding up to the next multiple of ``ALIGNMENT``.

    Parameters
    ----------
    shapes : sequence of torch.Size
        Shapes of the merged parameters, in order.

    Attributes
    ----------
    split_sizes : list of int
        Size of every parameter and of the padding after it, alternately:
        splitting a flat buffer by them gives the parameters back.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._fastpath import FlatLayout
    >>> layout = FlatLayout([torch.Size([2, 3]), torch.Size([2])])
    >>> layout.split_sizes
    [6, 58, 2, 62]
    >>> [p.shape for p in layout.parameters(torch.arange(128.0))]
    [torch.Size([2, 3]), torch.Size([2])]
    """

    def __init__(self, shapes: Sequence[torch.Size]):
        self.shapes = [torch.Size(shape) for shape in shapes]
        numels = [shape.numel() for shape in self.shapes]
        padded = [-(-n // ALIGNMENT) * ALIGNMENT for n in numels]
        self.split_sizes = [
            size for n, p in zip(numels, padded, strict=True) for size in (n, p - n)
        ]

    def stack(self, members, *, device, dtype) -> torch.Tensor:
        """The flat stack, shape ``(n_members, n_weights)``.

        Parameters
        ----------
        members : sequence of sequences of torch.Tensor
            Every member's parameters, in the layout's order; copied, detached.
        device : torch.device
            Of the stack.
        dtype : torch.dtype
            Of the stack.

        Returns
        -------
        theta : torch.Tensor
            Zero in the padding.
        """
        shape = (len(members), sum(self.split_sizes))
        theta = torch.zeros(shape, device=device, dtype=dtype)
        for row, parameters in zip(theta, members, strict=True):
            parts = row.split(self.split_sizes)[::2]
            for part, parameter in zip(parts, parameters, strict=True):
                part.copy_(parameter.detach().reshape(-1))
        return theta

    def unit_index(self, units: Sequence[torch.Tensor]) -> torch.Tensor:
        """Unit of every weight of the flat stack.

        Parameters
        ----------
        units : sequence of torch.Tensor of int
            For every parameter, the unit of each of its rows, or a single
            unit for the whole tensor.

        Returns
        -------
        unit_index : torch.Tensor of shape (n_weights,)
            Padding belongs to the last unit before it: it keeps blocks whole,
            and its zeros add nothing to any sum.
        """
        pieces = []
        for rows, shape, padding in zip(
            units, self.shapes, self.split_sizes[1::2], strict=True
        ):
            pieces.append(rows.repeat_interleave(shape.numel() // len(rows)))
            pieces.append(rows[-1:].expand(padding))
        return torch.cat(pieces)

    def parameters(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parameters held in a flat buffer, as views of it."""
        parts = flat.split(self.split_sizes)[::2]
        # A vector needs no view, and a view costs an operation and a backward node.
        return tuple(
            part if len(shape) == 1 else part.view(shape)
            for part, shape in zip(parts, self.shapes, strict=True)
        )


class BlockPlan(NamedTuple):
    """How the reduction splits the flat stack into blocks.

    Parameters
    ----------
    size : int
        Weights per block.
    block_unit : torch.Tensor of shape (n_weights // size,)
        Unit of every block; ``n_units`` for a block that straddles two units.
    loose_index : torch.Tensor of shape (n_loose,)
        Positions of the weights in blocks that straddle two units.
    loose_unit : torch.Tensor of shape (n_loose,)
        Unit of each of those weights.
    """

    size: int
    block_unit: torch.Tensor
    loose_index: torch.Tensor
    loose_unit: torch.Tensor

    @property
    def has_loose(self) -> bool:
        """Whether there are loose weights; when not, the reduction skips the
        operations that handle them."""
        return self.loose_index.shape[0] > 0


def plan_blocks(
    unit_index: torch.Tensor, n_units: int, n_members: int = 1
) -> BlockPlan:
    """Choose the block length that makes the reduction cheapest.

    Parameters
    ----------
    unit_index : torch.Tensor of shape (n_weights,)
        Unit of every weight of the flat stack, ``n_weights`` a multiple of
        ``ALIGNMENT``.
    n_units : int
        Number of units.
    n_members : int, default=1
        Rows of the stack. A stack that the reduction takes in more than one
        chunk (:func:`chunk_blocks`) gets its indices in the smallest integer
        types that hold them, a quarter to a half of int64's memory, converted
        a chunk at a time; a smaller stack gets int64 indices, which its
        gathers and scatters take as they are.

    Returns
    -------
    plan : BlockPlan
        On ``unit_index``'s device.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._fastpath import plan_blocks
    >>> plan = plan_blocks(torch.tensor([0] * 64 + [1] * 64), 2)
    >>> plan.size, plan.block_unit.tolist(), plan.has_loose
    (64, [0, 1], False)
    >>> plan = plan_blocks(torch.tensor([0] * 64 + [1] * 60 + [2] * 4), 3)
    >>> plan.size, plan.loose_index.tolist(), plan.loose_unit.tolist()
    (8, [120, 121, 122, 123, 124, 125, 126, 127], [1, 1, 1, 1, 2, 2, 2, 2])
    """
    n_weights = unit_index.shape[0]
    boundaries = torch.nonzero(unit_index[1:] != unit_index[:-1]).flatten() + 1
    # A block length that divides the stack's length and every boundary between
    # units leaves no weight to reduce on its own.
    common = math.gcd(n_weights, *boundaries.tolist())
    sizes = {*BLOCK_SIZES, common} if common >= min(BLOCK_SIZES) else BLOCK_SIZES

    # For every length, whether each block of it lies in one unit.
    purity = {}
    for size in sizes:
        blocks = unit_index.view(-1, size)
        purity[size] = (blocks == blocks[:, :1]).all(1)

    def cost(size):  # ties go to the longer blocks
        n_loose = int((~purity[size]).sum()) * size
        n_blocks = n_weights // size
        return n_blocks + LOOSE_COST * n_loose + LOOSE_OVERHEAD * (n_loose > 0), -size

    size = min(sizes, key=cost)
    pure = purity[size]
    straddling = torch.nonzero(~pure).flatten()
    offsets = torch.arange(size, device=unit_index.device)
    loose_index = (straddling[:, None] * size + offsets).flatten()
    n_blocks = n_weights // size
    compact = chunk_blocks(n_members, n_blocks, size) < n_blocks
    units = _smallest_int(n_units + 1) if compact else torch.int64
    positions = _smallest_int(n_weights) if compact else torch.int64
    return BlockPlan(
        size,
        torch.where(pure, unit_index[::size], n_units).to(units),
        loose_index.to(positions),
        unit_index[loose_index].to(units),
    )


def _smallest_int(n: int) -> torch.dtype:
    """The smallest integer type that holds ``0, ..., n - 1``."""
    return next(t for t in (torch.int16, torch.int32) if n <= torch.iinfo(t).max + 1)


def _long(index: torch.Tensor) -> torch.Tensor:
    """An index as gathers and scatters take it: int64 (the int32 variants of
    ``index_add_`` run many times slower on the CPU)."""
    return index if index.dtype == torch.int64 else index.long()


def merge(
    log_alpha: torch.Tensor,
    theta: torch.Tensor,
    plan: BlockPlan,
    *,
    gates: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat merged weights, as the module's specification defines them.

    Parameters
    ----------
    log_alpha : torch.Tensor of shape (n_members, n_units)
        Gate parameters: they choose who carries a closed unit, and with
        ``noise`` they give the gates.
    theta : torch.Tensor of shape (n_members, n_weights)
        The flat stack.
    plan : BlockPlan
        From :func:`plan_blocks` on the stack's unit index.
    gates : torch.Tensor of shape (n_members, n_units), default=None
        Gate values in ``[0, 1]``, when ``noise`` is ``None``.
    noise : torch.Tensor of shape (n_members, n_units), default=None
        Logistic noise: the gates are then the hard-concrete sample it gives.

    Returns
    -------
    flat : torch.Tensor of shape (n_weights,)
        Differentiable in ``gates``, or in ``log_alpha`` with ``noise``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._fastpath import merge, plan_blocks
    >>> theta = torch.stack([torch.zeros(64), torch.ones(64)])
    >>> plan = plan_blocks(torch.zeros(64, dtype=torch.long), 1)
    >>> merge(torch.zeros(2, 1), theta, plan, gates=torch.tensor([[1.0], [3.0]]))[:3]
    tensor([0.7500, 0.7500, 0.7500])
    """
    return _Merge.apply(log_alpha, gates, noise, theta, plan)


class _Merge(torch.autograd.Function):
    # Autograd of a gather would scatter-add every weight, and would keep the
    # (n_members, n_weights) gathered weights alive; only small tensors and the
    # stack itself are saved here. Given noise, the sample is drawn inside the
    # node too, as a node of its own costs a step more than the noise (module
    # docstring). The buffer is split into parameters outside the node:
    # autograd's own split backward gathers their gradients faster than Python
    # could.

    @staticmethod
    def forward(ctx, log_alpha, gates, noise, theta, plan):
        slope = None
        if noise is not None:
            gates, slope = hard_concrete_with_slope(log_alpha, noise)
        weights, total, is_open = _convex(gates, log_alpha)
        ctx.save_for_backward(theta, weights, total, is_open, slope)
        ctx.plan = plan
        return _mix(weights.to(theta.dtype), theta, plan)

    @staticmethod
    def backward(ctx, grad_flat):
        theta, weights, total, is_open, slope = ctx.saved_tensors
        grad = _mix_grad(grad_flat, theta, ctx.plan, weights.shape[1])
        grad_z = _convex_grad(grad.to(weights.dtype), weights, total, is_open)
        if slope is None:
            return None, grad_z, None, None, None
        return grad_z * slope, None, None, None, None


def mixing_weights(z: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """The weights ``c[k, u] / sum_k c[k, u]`` of the specification,
    differentiable in ``z``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._fastpath import mixing_weights
    >>> mixing_weights(torch.tensor([[1.0, 0.0], [3.0, 0.0]]),
    ...                torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    tensor([[0.2500, 1.0000],
            [0.7500, 0.0000]])
    """
    return _convex(z, log_alpha)[0]


def _convex(z, log_alpha):
    """Mixing weights ``c / sum_k c``, and what their backward pass needs."""
    best = log_alpha == log_alpha.amax(0, keepdim=True)
    is_open = torch.gt(z.sum(0, keepdim=True), 0.0)
    carried = torch.where(is_open, z, best)
    total = carried.sum(0, keepdim=True)
    return carried / total, total, is_open


def _convex_grad(grad_weights, weights, total, is_open):
    grad_carried = grad_weights - (grad_weights * weights).sum(0, keepdim=True)
    # Closed units do not depend on z; a mask is cheaper than torch.where.
    return grad_carried.div_(total).mul_(is_open)


def _mix(weights: torch.Tensor, theta: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Flat merged weights: each weight's convex combination over members."""
    blocks = theta.view(theta.shape[0], -1, plan.size)
    if plan.has_loose:
        # Straddling blocks read a zero column and are overwritten below.
        weights = torch.nn.functional.pad(weights, (0, 1))
    n_blocks = blocks.shape[1]
    step = chunk_blocks(theta.shape[0], n_blocks, plan.size)
    if step == n_blocks:
        block_weights = weights.index_select(1, _long(plan.block_unit)).unsqueeze(-1)
        flat = (blocks * block_weights).sum(0).view(-1)
    else:
        flat = theta.new_empty(n_blocks, plan.size)
        for start in range(0, n_blocks, step):
            chunk = slice(start, start + step)
            block_weights = weights.index_select(1, _long(plan.block_unit[chunk]))
            # One product alive at a time: not kept past the sum.
            products = blocks[:, chunk] * block_weights.unsqueeze(-1)
            torch.sum(products, 0, out=flat[chunk])
            del products
        flat = flat.view(-1)
    if plan.has_loose:
        loose_index = _long(plan.loose_index)
        loose = weights.index_select(1, _long(plan.loose_unit))
        loose = loose * theta.index_select(1, loose_index)
        flat.index_copy_(0, loose_index, loose.sum(0))
    return flat


def _mix_grad(
    grad_flat: torch.Tensor, theta: torch.Tensor, plan: BlockPlan, n_units: int
) -> torch.Tensor:
    """Gradient of :func:`_mix` in the weights: one dot product per block."""
    blocks = theta.view(theta.shape[0], -1, plan.size)
    # With loose weights, straddling blocks add into a spare last column.
    grad = theta.new_zeros(theta.shape[0], n_units + plan.has_loose)
    grad_blocks = grad_flat.view(-1, plan.size)
    n_blocks = blocks.shape[1]
    step = chunk_blocks(theta.shape[0], n_blocks, plan.size)
    for start in range(0, n_blocks, step):
        chunk = slice(start, start + step)
        products = (blocks[:, chunk] * grad_blocks[chunk]).sum(-1)
        grad.index_add_(1, _long(plan.block_unit[chunk]), products)
    if plan.has_loose:
        loose_index = _long(plan.loose_index)
        loose = theta.index_select(1, loose_index) * grad_flat[loose_index]
        grad.index_add_(1, _long(plan.loose_unit), loose)
        grad = grad[:, :n_units]
    return grad


class TemplateBinding:
    """Run a template module with given tensors in place of some parameters.

    Calling it does what ``torch.func.functional_call(template, dict(zip(names,
    tensors)), args, kwargs)`` does, tied aliases included, without
    ``functional_call``'s search of the module and checks on every call: the
    tensors take the parameters' places in their owners' dictionaries for the
    call, then the template's own parameters return, even if the call raises.

    Parameters
    ----------
    template : torch.nn.Module
        The module to run.
    names : sequence of str
        Names of the parameters to replace, in the order of the tensors.
    aliases : sequence of (str, str)
        ``(alias, name)``: other names under which the template holds the
        parameter ``name`` (tied weights); they get the same tensor.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._fastpath import TemplateBinding
    >>> template = torch.nn.Linear(2, 1)
    >>> call = TemplateBinding(template, ["weight", "bias"], [])
    >>> call((torch.ones(1, 2), torch.zeros(1)), (torch.ones(3, 2),), {}).tolist()
    [[2.0], [2.0], [2.0]]
    """

    def __init__(self, template, names, aliases):
        self.template = template
        positions = {name: i for i, name in enumerate(names)}
        holders = [(name, positions[name]) for name in names]
        holders += [(alias, positions[name]) for alias, name in aliases]
        self.slots = []
        self.linears = []  # run by _LetGoLinear during the call
        for name, position in holders:
            path, _, key = name.rpartition(".")
            owner = template.get_submodule(path)
            store = owner._parameters if key in owner._parameters else owner._buffers
            self.slots.append((store, key, position))
            if (
                key == "weight"
                and type(owner).forward is torch.nn.Linear.forward
                and "forward" not in vars(owner)  # no forward of its own
                and store[key].numel() >= LET_GO_ELEMENTS
            ):
                self.linears.append(owner)

    def __call__(self, tensors, args, kwargs):
        originals = [store[key] for store, key, _ in self.slots]
        try:
            for store, key, position in self.slots:
                store[key] = tensors[position]
            for module in self.linears:
                module.forward = _let_go_linear.__get__(module)
            return self.template(*args, **kwargs)
        finally:
            for (store, key, _), original in zip(self.slots, originals, strict=True):
                store[key] = original
            for module in self.linears:
                module.__dict__.pop("forward", None)


LET_GO_ELEMENTS = 2**16
"""Merged ``nn.Linear`` weights of at least this many elements are run by
:class:`_LetGoLinear`; smaller ones by ``nn.Linear`` itself, as a node written
in Python costs some microseconds a step, which only a large layer hides."""


def _let_go_linear(module, input):
    """``nn.Linear.forward`` through :class:`_LetGoLinear`."""
    return _LetGoLinear.apply(input, module.weight, module.bias)


class _LetGoLinear(torch.autograd.Function):
    # torch.nn.functional.linear whose backward lets go of the weight once the
    # input's gradient is formed, before it forms the weight's gradient.
    # Autograd's own node holds both until it returns: a merged weight is a
    # view of the merged flat buffer, which then lives on beside the weight's
    # gradient, and for the largest layer that is the peak of a gate-learning
    # step. Let go, the buffer is freed as soon as no other node needs a
    # part of it. The weight is kept on ctx, not saved, so that it can be let
    # go: nothing modifies it in place.

    @staticmethod
    def forward(ctx, input, weight, bias):
        needs_input, needs_weight, _ = ctx.needs_input_grad
        ctx.weight = weight if needs_input else None
        ctx.save_for_backward(input if needs_weight else None)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.weight is None:
                raise RuntimeError(
                    "A merged linear layer let go of its weight in an earlier "
                    "backward pass; backward runs through a merge once "
                    "(retain_graph=True is not supported)."
                )
            grad_input = grad @ ctx.weight
            ctx.weight = None
        grad_rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            (input,) = ctx.saved_tensors
            grad_weight = grad_rows.T @ input.reshape(-1, input.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_input, grad_weight, grad_bias
