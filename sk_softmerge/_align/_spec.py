"""The permutation symmetries of a network's hidden units.

Two networks trained from different random initialisations can compute the
same function with their hidden units in different orders; averaging them
weight by weight then mixes unrelated units. Permuting each member's hidden
units to match the others first puts the members in one basin, where
averaging works. This module finds which permutations leave a network's
function unchanged and applies them to state dicts;
:mod:`sk_softmerge._align._matching` chooses them.

Which tensors a permutation acts on, and along which axis, is read from the
network itself: :func:`permutation_spec` traces it with :mod:`torch.fx`,
propagates shapes with a sample input, and follows every hidden axis from the
layer that creates it to the layers that consume it. Element-wise operations
and pooling carry a permutation through; a residual addition forces its two
operands to share one; flattening the channels of a convolution turns a
permutation of channels into one of blocks of features; the network's inputs
and outputs are never permuted. Anything else that meets a permuted axis is
refused with the name of the module at fault.
"""

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _LPPoolNd,
    _MaxPoolNd,
)

from ._activations import Site


@dataclass(frozen=True)
class PermutedAxis:
    """One axis of one tensor that a permutation of hidden units acts on.

    Parameters
    ----------
    tensor : str
        Name of the parameter or buffer in the module's ``state_dict``.
    axis : int
        The permuted axis.
    block : int
        Consecutive entries of the axis per unit: 1, or the number of spatial
        positions per channel once a convolution's output is flattened.
    parameter : bool
        Whether the tensor is a parameter (weight matching compares parameters;
        buffers such as batch-norm statistics are permuted only).
    """

    tensor: str
    axis: int
    block: int
    parameter: bool


@dataclass(frozen=True)
class PermutationGroup:
    """A set of hidden units that one permutation reorders.

    Parameters
    ----------
    name : str
        Name of the module that creates the units (the first one when a
        residual connection joins several).
    size : int
        Number of units.
    axes : tuple of PermutedAxis
        Every tensor axis the permutation acts on.
    sites : tuple of Site
        Where the units can be observed: the outputs of the layers that create
        them and the inputs of the layers that consume them.
    """

    name: str
    size: int
    axes: tuple[PermutedAxis, ...]
    sites: tuple[Site, ...] = ()


@dataclass(frozen=True)
class _Permuted:
    """A traced value whose ``axis`` holds the units of ``group``."""

    group: int
    axis: int
    block: int


_SCALAR = "scalar"  # a traced value that is not a tensor (a size, a shape)

_ELEMENTWISE_MODULES = (
    torch.nn.Identity,
    torch.nn.ReLU,
    torch.nn.ReLU6,
    torch.nn.LeakyReLU,
    torch.nn.ELU,
    torch.nn.SELU,
    torch.nn.CELU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Mish,
    torch.nn.Sigmoid,
    torch.nn.Tanh,
    torch.nn.Softplus,
    torch.nn.Softsign,
    torch.nn.Hardtanh,
    torch.nn.Hardswish,
    torch.nn.Hardsigmoid,
    torch.nn.LogSigmoid,
    torch.nn.Tanhshrink,
    torch.nn.Softmax,
    torch.nn.LogSoftmax,
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
)
_POOLING_MODULES = (
    _MaxPoolNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _LPPoolNd,
)
_RESHAPE_MODULES = (torch.nn.Flatten, torch.nn.Unflatten)

# Functions and methods that act on each entry alone, or combine tensors entry
# by entry (with broadcasting): they carry a permutation through unchanged.
_ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.abs,
    torch.exp,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    torch.softmax,
    torch.log_softmax,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.softplus,
    F.softsign,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.logsigmoid,
    F.sigmoid,
    F.tanh,
    F.softmax,
    F.log_softmax,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
}
_ELEMENTWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "abs",
    "exp",
    "relu",
    "sigmoid",
    "tanh",
    "clamp",
    "softmax",
    "log_softmax",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "to",
    "type_as",
}
_POOLING_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}


class _SpecBuilder:
    """Follows permutations through a traced graph (one pass, in graph order)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.parameters = {name for name, _ in module.named_parameters()}
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.axes: dict[tuple[str, int], tuple[int, int]] = {}
        self.sites: list[tuple[int, Site]] = []

    # union-find over permutation groups
    def new_group(self, name: str, size: int) -> int:
        self.names.append(name)
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        self.fixed.append(False)
        return len(self.parent) - 1

    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.sizes[a] != self.sizes[b]:
            raise ValueError(
                f"Cannot align: {where} joins the {self.sizes[a]} hidden units of "
                f"{self.names[a]!r} with the {self.sizes[b]} of {self.names[b]!r}."
            )
        a, b = min(a, b), max(a, b)
        self.parent[b] = a
        self.fixed[a] = self.fixed[a] or self.fixed[b]
        return a

    def fix(self, group: int) -> None:
        self.fixed[self.find(group)] = True

    def register(self, tensor: str, axis: int, state: _Permuted) -> None:
        key = (tensor, axis)
        if key in self.axes:
            group, block = self.axes[key]
            if block != state.block:
                raise ValueError(
                    f"Cannot align: axis {axis} of {tensor!r} is used with two "
                    "different layouts of its units."
                )
            self.union(group, state.group, f"the reuse of {tensor!r}")
        else:
            self.axes[key] = (state.group, state.block)

    def observe(self, group: int, site: Site) -> None:
        self.sites.append((group, site))

    def groups(self) -> list[PermutationGroup]:
        members: dict[int, list[PermutedAxis]] = {}
        for (tensor, axis), (group, block) in self.axes.items():
            root = self.find(group)
            if not self.fixed[root]:
                members.setdefault(root, []).append(
                    PermutedAxis(tensor, axis, block, tensor in self.parameters)
                )
        sites: dict[int, list[Site]] = {}
        for group, site in self.sites:
            sites.setdefault(self.find(group), []).append(site)
        return [
            PermutationGroup(
                self.names[root], self.sizes[root], tuple(axes), tuple(sites[root])
            )
            for root, axes in sorted(members.items())
        ]


def permutation_spec(
    module: torch.nn.Module, example_input: torch.Tensor
) -> list[PermutationGroup]:
    """Find the permutations of hidden units that leave ``module``'s function unchanged.

    The module is traced with :func:`torch.fx.symbolic_trace` (on a copy, in
    eval mode) and ``example_input`` is propagated through it to learn every
    intermediate shape. Each ``Linear`` or ``Conv`` layer creates a group of
    hidden units on its output axis; the group reaches every tensor that
    consumes that axis (the next layer's weight, a batch norm's affine
    parameters and running statistics). Element-wise operations, dropout and
    pooling carry a group through; a residual addition merges the groups of its
    operands; flattening channels of a convolution makes each channel a block of
    consecutive features. Groups that reach the output, or meet an unpermuted
    tensor, stay fixed and are left out.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture, built from ``Linear``, ``Conv1d/2d/3d``,
        ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``PReLU``, element-wise
        activations, dropout, pooling, flattening, reshapes and residual
        additions, in ``torch.nn.Sequential`` or in a custom ``forward`` that
        :mod:`torch.fx` can trace.
    example_input : torch.Tensor
        A small batch of valid inputs (two samples are enough).

    Returns
    -------
    groups : list of PermutationGroup
        The permutable groups of hidden units, in the order of their creation.

    Raises
    ------
    ValueError
        If the module cannot be traced, or an operation that the permutations
        do not commute with meets a hidden axis; the message names the module.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._spec import permutation_spec
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 2))
    >>> (group,) = permutation_spec(net, torch.zeros(2, 4))
    >>> group.name, group.size
    ('0', 8)
    >>> [(a.tensor, a.axis) for a in group.axes]
    [('0.weight', 0), ('0.bias', 0), ('2.weight', 1)]
    """
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.MultiheadAttention):
            raise ValueError(
                f"Cannot align {type(module).__name__}: module {name!r} is "
                "attention (MultiheadAttention), through which no permutation of "
                "hidden units is supported. Merge such members without align "
                "(forks of one training share their units' order)."
            )
    module = copy.deepcopy(module).eval()
    device = next((t.device for t in module.parameters()), example_input.device)
    example_input = example_input.to(device)
    try:
        graph_module = fx.symbolic_trace(module)
    except Exception as exc:
        raise ValueError(
            f"Cannot align {type(module).__name__}: torch.fx cannot trace its "
            f"forward ({type(exc).__name__}: {exc}). Alignment needs a forward "
            "without data-dependent control flow."
        ) from exc
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_input)
    except Exception as exc:
        raise ValueError(
            f"Cannot align {type(module).__name__}: the example input of shape "
            f"{tuple(example_input.shape)} does not pass through it "
            f"({type(exc).__name__}: {exc})."
        ) from exc

    builder = _SpecBuilder(module)
    states: dict[fx.Node, object] = {}
    for node in graph_module.graph.nodes:
        if node.op == "output":
            for _, state in _input_states(node, states):
                if isinstance(state, _Permuted):
                    builder.fix(state.group)
            continue
        states[node] = _transfer(node, states, builder, graph_module)
    return builder.groups()


def _transfer(node: fx.Node, states: dict, builder: _SpecBuilder, graph_module):
    """State of ``node``'s output given its inputs' states."""
    meta = node.meta.get("tensor_meta")
    if node.op == "placeholder":
        return None
    if node.op == "get_attr":
        if node.target in builder.parameters:
            raise ValueError(
                f"Cannot align: {_describe(node, graph_module)} uses the parameter "
                f"{node.target!r} directly, whose symmetry is unknown."
            )
        return None if isinstance(meta, TensorMetadata) else _SCALAR
    if meta is None:
        return _SCALAR
    inputs = _input_states(node, states)
    permuted = [s for _, s in inputs if isinstance(s, _Permuted)]

    if node.op == "call_module":
        submodule = graph_module.get_submodule(node.target)
        if isinstance(submodule, torch.nn.Linear | torch.nn.modules.conv._ConvNd):
            return _layer(node, submodule, permuted, builder, graph_module)
        if isinstance(submodule, _BatchNorm | torch.nn.LayerNorm | torch.nn.PReLU):
            return _normalisation(node, submodule, permuted, builder, graph_module)
        if any(True for _ in submodule.parameters()):
            raise ValueError(
                f"Cannot align: {_describe(node, graph_module)} holds parameters "
                "and is not a supported layer (Linear, Conv1d/2d/3d, "
                "BatchNorm1d/2d/3d, LayerNorm, PReLU)."
            )
        if not permuted:
            return None if isinstance(meta, TensorMetadata) else _SCALAR
        if isinstance(submodule, _ELEMENTWISE_MODULES):
            return _elementwise(node, inputs, builder, graph_module)
        if isinstance(submodule, _POOLING_MODULES):
            return _pooling(node, permuted[0], graph_module)
        if isinstance(submodule, _RESHAPE_MODULES):
            return _reshape(node, permuted[0], graph_module)
    elif not permuted:
        return None if isinstance(meta, TensorMetadata) else _SCALAR
    elif node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return _elementwise(node, inputs, builder, graph_module)
        if node.target in _POOLING_FUNCTIONS:
            return _pooling(node, permuted[0], graph_module)
        if node.target in _RESHAPE_FUNCTIONS:
            return _reshape(node, permuted[0], graph_module)
        if node.target in _REDUCTION_FUNCTIONS:
            return _reduction(node, permuted[0], graph_module)
    elif node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return _elementwise(node, inputs, builder, graph_module)
        if node.target in _RESHAPE_METHODS:
            return _reshape(node, permuted[0], graph_module)
        if node.target in _REDUCTION_METHODS:
            return _reduction(node, permuted[0], graph_module)
    raise ValueError(
        f"Cannot align: {_describe(node, graph_module)} receives hidden units of "
        f"{builder.names[builder.find(permuted[0].group)]!r}, and permuting them "
        "may change its result. Supported: element-wise operations, dropout, "
        "pooling, flattening, residual additions."
    )


def _input_states(node: fx.Node, states: dict) -> list[tuple[fx.Node, object]]:
    found = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return [(arg, states.get(arg)) for arg in found]


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _layer(node, layer, permuted, builder, graph_module) -> _Permuted:
    """Linear or Conv: consumes its input's group, creates one for its output."""
    is_linear = isinstance(layer, torch.nn.Linear)
    ndim_in = len(_shape(node.args[0]))
    if permuted:
        (state,) = permuted
        expected_axis = ndim_in - 1 if is_linear else ndim_in - layer.weight.dim() + 1
        if state.axis != expected_axis or (not is_linear and state.block != 1):
            raise ValueError(
                f"Cannot align: {_describe(node, graph_module)} receives hidden units "
                f"on axis {state.axis}, not on its feature or channel axis."
            )
    out_axis = len(_shape(node)) - 1 if is_linear else ndim_in - layer.weight.dim() + 1
    prefix = f"{node.target}."
    if permuted:
        state = permuted[0]
        builder.observe(
            state.group, Site(node.target, "input", state.axis, state.block)
        )
    if not is_linear and layer.groups != 1:
        if not (layer.groups == layer.in_channels == layer.out_channels and permuted):
            raise ValueError(
                f"Cannot align: {_describe(node, graph_module)} is a grouped "
                "convolution; only groups=1 and depthwise convolutions are supported."
            )
        output = _Permuted(permuted[0].group, out_axis, 1)
    else:
        if permuted:
            builder.register(prefix + "weight", 1, permuted[0])
        size = layer.out_features if is_linear else layer.out_channels
        output = _Permuted(builder.new_group(node.target, size), out_axis, 1)
    builder.observe(output.group, Site(node.target, "output", out_axis))
    builder.register(prefix + "weight", 0, output)
    if layer.bias is not None:
        builder.register(prefix + "bias", 0, output)
    return output


def _normalisation(node, layer, permuted, builder, graph_module):
    """BatchNorm, LayerNorm, PReLU: per-unit tensors follow the input's group."""
    if not permuted:
        return None
    (state,) = permuted
    ndim = len(_shape(node.args[0]))
    if isinstance(layer, torch.nn.LayerNorm):
        ok = len(layer.normalized_shape) == 1 and state.axis == ndim - 1
        tensors = ["weight", "bias"]
    elif isinstance(layer, torch.nn.PReLU):
        ok = layer.num_parameters == 1 or (state.axis == 1 and ndim > 1)
        tensors = ["weight"] if layer.num_parameters > 1 else []
    else:
        ok = state.axis == 1
        tensors = ["weight", "bias", "running_mean", "running_var"]
    if not ok:
        raise ValueError(
            f"Cannot align: {_describe(node, graph_module)} receives hidden units on "
            f"axis {state.axis}, not on the axis it normalises or scales."
        )
    for name in tensors:
        if getattr(layer, name, None) is not None:
            builder.register(f"{node.target}.{name}", 0, state)
    return state


def _elementwise(node, inputs, builder, graph_module):
    """Entry-wise combination: every permuted operand must share one group."""
    permuted = [(arg, s) for arg, s in inputs if isinstance(s, _Permuted)]
    first_arg, first = permuted[0]
    where = _describe(node, graph_module)
    for arg, state in permuted[1:]:
        # Broadcasting aligns trailing axes: compare positions from the end.
        if (state.axis - len(_shape(arg)), state.block) != (
            first.axis - len(_shape(first_arg)),
            first.block,
        ):
            raise ValueError(
                f"Cannot align: {where} combines hidden units laid out on different "
                "axes."
            )
        builder.union(first.group, state.group, where)
    if any(s is None for _, s in inputs):
        # An operand that no permutation reaches (a network input, a constant)
        # pins the units it is combined with.
        builder.fix(first.group)
    axis = first.axis + len(_shape(node)) - len(_shape(first_arg))
    return _Permuted(first.group, axis, first.block)


def _pooling(node, state, graph_module) -> _Permuted:
    if state.axis != 1 or state.block != 1 or len(_shape(node.args[0])) < 3:
        raise ValueError(
            f"Cannot align: {_describe(node, graph_module)} pools a batch whose "
            "channel axis is not axis 1."
        )
    return state


def _reshape(node, state, graph_module):
    """Flatten, view, reshape, (un)squeeze: follow the units' axis by shapes."""
    shape_in, shape_out = _shape(node.args[0]), _shape(node)
    axis = state.axis
    if shape_in == shape_out:
        return state
    n_trailing = len(shape_in) - axis
    if len(shape_out) >= n_trailing and shape_out[-n_trailing:] == shape_in[axis:]:
        return _Permuted(state.group, len(shape_out) - n_trailing, state.block)
    if len(shape_out) == axis + 1 and shape_out[:axis] == shape_in[:axis]:
        block = state.block * int(np.prod(shape_in[axis + 1 :], dtype=np.int64))
        return _Permuted(state.group, axis, block)
    raise ValueError(
        f"Cannot align: {_describe(node, graph_module)} reshapes {shape_in} to "
        f"{shape_out}, which mixes hidden units (on axis {axis}) with other axes."
    )


def _reduction(node, state, graph_module):
    """mean, sum, amax, amin over some axes."""
    ndim = len(_shape(node.args[0]))
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return None
    dims = {d % ndim for d in (dim if isinstance(dim, list | tuple) else [dim])}
    if state.axis in dims:
        return None  # reducing over all units of a group forgets their order
    axis = state.axis if keepdim else state.axis - sum(d < state.axis for d in dims)
    return _Permuted(state.group, axis, state.block)


def _describe(node: fx.Node, graph_module) -> str:
    if node.op == "call_module":
        kind = type(graph_module.get_submodule(node.target)).__name__
        return f"module {node.target!r} ({kind})"
    target = node.target if isinstance(node.target, str) else node.target.__name__
    stack = node.meta.get("nn_module_stack")
    if stack:
        owner, kind = list(stack.values())[-1]
        kind = getattr(kind, "__name__", kind)
        return f"operation {target!r} in module {owner!r} ({kind})"
    return f"operation {target!r} in the top-level forward"


def permute_state(
    state_dict: dict[str, torch.Tensor],
    groups: Sequence[PermutationGroup],
    permutations: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Apply one permutation per group to a state dict.

    Unit ``i`` of the result is unit ``permutations[g][i]`` of the input.

    Parameters
    ----------
    state_dict : dict of str to torch.Tensor
        Parameters and buffers of a module.
    groups : sequence of PermutationGroup
        From :func:`permutation_spec`.
    permutations : sequence of torch.Tensor
        One permutation (a long tensor of length ``group.size``) per group.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        A new dict; tensors that no group reaches are the input's own.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._spec import permutation_spec, permute_state
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Linear(3, 1))
    >>> groups = permutation_spec(net, torch.zeros(2, 1))
    >>> state = {k: torch.arange(3.0).reshape(v.shape) if v.numel() == 3 else v
    ...          for k, v in net.state_dict().items()}
    >>> permute_state(state, groups, [torch.tensor([2, 0, 1])])["0.bias"]
    tensor([2., 0., 1.])
    """
    result = dict(state_dict)
    for group, permutation in zip(groups, permutations, strict=True):
        for axis in group.axes:
            result[axis.tensor] = _permute_axis(
                result[axis.tensor], axis.axis, axis.block, permutation
            )
    return result


def _permute_axis(tensor, axis, block, permutation):
    permutation = permutation.to(tensor.device)
    if block > 1:
        offsets = torch.arange(block, device=tensor.device)
        permutation = (permutation[:, None] * block + offsets).reshape(-1)
    return tensor.index_select(axis, permutation)
