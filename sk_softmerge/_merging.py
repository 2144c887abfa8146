"""Merging: gates and stacked member weights in, merged weights out.

The members' merged parameters are copied once into one flat buffer of shape
``(n_members, n_weights)``. Every weight belongs to one merge unit; a unit's
merged value is the convex combination of the members' values with weights
``z_ku / sum_k z_ku``. One reduction over the buffer forms every merged tensor
at once, and a template module runs with them in place of its own parameters
(as :func:`torch.func.functional_call` would run it), so a training step does
no arithmetic per member or per parameter in Python.

The reduction reads the buffer in blocks of ``BLOCK_SIZES`` consecutive weights.
A block whose weights all belong to one unit is weighted and summed as one row,
and its gradient is one dot product; only the few weights in blocks that
straddle two units are gathered and scattered one by one. Scattering every
weight, which a plain gather costs in its backward pass, was the slowest part
of a training step on CPU. Every parameter starts at a multiple of
``ALIGNMENT`` weights in the buffer (zero padding between them), so with one
gate per layer or tensor no block straddles two units.

From gates (or gate noise) to merged parameters is one autograd node with a
hand-written backward (:class:`_Merge`, :class:`_SampledMerge`): on small
nets a training step's cost is the number of operations, not their size.
"""

import copy
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._batchnorm import (
    has_batchnorm,
    recompute_batchnorm_statistics,
    use_batch_statistics,
)
from ._evaluation import member_forward
from ._gates import deterministic_z, expected_l0, hard_concrete_with_slope, sample_z

GRANULARITIES = ("layer", "tensor", "neuron")

BLOCK_SIZES = (64, 32, 16, 8)
"""Block lengths the reduction chooses from, for each merger."""

ALIGNMENT = 64
"""Every parameter starts at a multiple of this many weights in the flat stack,
so that blocks of any of ``BLOCK_SIZES`` never straddle two parameters."""

LOOSE_COST = 4
"""Cost of a weight reduced on its own, in blocks; measured on CPU, where a
scatter-add costs several times a contiguous sum per element."""

LOOSE_OVERHEAD = 1024
"""Cost, in blocks, of the eight extra operations that any loose weight brings."""

_ZERO = torch.tensor(0.0)  # zero-dimensional: see _gates._BETA


@dataclass(frozen=True)
class MergeUnit:
    """One group of weights that shares a gate per member.

    Parameters
    ----------
    name : str
        Module name (``"layer"``), parameter name (``"tensor"``) or module name
        with the output index (``"neuron"``, e.g. ``"0[3]"``).
    parameters : tuple of str
        Names of the parameters the unit's weights belong to.
    """

    name: str
    parameters: tuple[str, ...]


def select_parameters(module: torch.nn.Module, merge=None) -> list[str]:
    """Names of the parameters of ``module`` that ``merge`` selects.

    A pattern selects a parameter when it matches, in the sense of
    :func:`fnmatch.fnmatchcase`, the parameter's name or the name of a module
    that holds it: ``"0"`` selects ``"0.weight"`` and ``"0.bias"``, and
    ``"*.weight"`` every weight.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture shared by the members.
    merge : None, str or list of str, default=None
        Name patterns; ``None`` selects every parameter.

    Returns
    -------
    names : list of str
        Selected parameter names, in the module's order.

    Raises
    ------
    ValueError
        If a pattern selects nothing.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._merging import select_parameters
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    >>> select_parameters(net, "1")
    ['1.weight', '1.bias']
    """
    names = [name for name, _ in module.named_parameters()]
    if merge is None:
        return names
    patterns = [merge] if isinstance(merge, str) else list(merge)
    selected = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"merge patterns must be strings; got {type(pattern).__name__}."
            )
        hits = {name for name in names if _matches(name, pattern)}
        if not hits:
            modules = sorted({name.rpartition(".")[0] for name in names})
            raise ValueError(
                f"merge pattern {pattern!r} matches no parameter or module. "
                f"Modules holding parameters: {modules}; parameters: {names}."
            )
        selected |= hits
    return [name for name in names if name in selected]


def _matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)


def find_units(
    module: torch.nn.Module, parameters: Sequence[str], granularity: str = "layer"
) -> list[MergeUnit]:
    """Group parameters into merge units.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture shared by the members.
    parameters : sequence of str
        Names of the parameters to merge.
    granularity : {"layer", "tensor", "neuron"}, default="layer"
        ``"layer"``: the parameters of one module share a gate per member.
        ``"tensor"``: each parameter has its own gate. ``"neuron"``: each output
        unit or channel of a module (its weight row or filter and its bias) has
        its own gate; a module whose parameters disagree on their first
        dimension gets one gate, as with ``"layer"``.

    Returns
    -------
    units : list of MergeUnit
        In the module's parameter order.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._merging import find_units
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    >>> [u.name for u in find_units(net, ["0.weight", "0.bias", "1.weight"])]
    ['0', '1']
    """
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {GRANULARITIES}; got {granularity!r}."
        )
    if granularity == "tensor":
        return [MergeUnit(name, (name,)) for name in parameters]
    by_module: dict[str, list[str]] = {}
    for name in parameters:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    units = []
    for owner, names in by_module.items():
        rows = {module.get_parameter(n).shape[:1] for n in names}
        if granularity == "neuron" and len(rows) == 1 and rows != {()}:
            (n_rows,) = rows.pop()
            units.extend(
                MergeUnit(f"{owner}[{row}]", tuple(names)) for row in range(n_rows)
            )
        else:
            units.append(MergeUnit(owner, tuple(names)))
    return units


def _convex(z, log_alpha):
    """Mixing weights, and what their backward pass needs."""
    best = log_alpha == log_alpha.amax(0, keepdim=True)
    is_open = torch.gt(z.sum(0, keepdim=True), _ZERO)
    carried = torch.where(is_open, z, best)
    total = carried.sum(0, keepdim=True)
    return carried / total, total, is_open


def _convex_grad(grad_weights, weights, total, is_open):
    grad_carried = grad_weights - (grad_weights * weights).sum(0, keepdim=True)
    # Closed units do not depend on z; a mask is cheaper than torch.where.
    return grad_carried.div_(total).mul_(is_open)


def mixing_weights(z: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """Convex weights ``z_ku / sum_k z_ku`` for every unit.

    A unit whose gates are all closed is carried by the member with the largest
    log-alpha (shared equally on ties), so no unit ever collapses to zero.

    Parameters
    ----------
    z : torch.Tensor of shape (n_members, n_units)
        Gate values in ``[0, 1]``.
    log_alpha : torch.Tensor of shape (n_members, n_units)
        Gate parameters, used to choose who carries a closed unit.

    Returns
    -------
    weights : torch.Tensor of shape (n_members, n_units)
        Non-negative weights summing to one over members, differentiable in
        ``z``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._merging import mixing_weights
    >>> z = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    >>> mixing_weights(z, torch.tensor([[0.0, -1.0], [0.0, 2.0]]))
    tensor([[0.6667, 0.0000],
            [0.3333, 1.0000]])
    """
    return _convex(z, log_alpha)[0]


@dataclass(frozen=True)
class BlockPlan:
    """How the reduction splits the flat buffer into blocks.

    Parameters
    ----------
    size : int
        Weights per block; the first ``n_blocks * size`` weights form blocks.
    block_unit : torch.Tensor of shape (n_blocks,)
        Unit of every block; ``n_units`` for a block that straddles two units.
    loose_index : torch.Tensor of shape (n_loose,)
        Positions of the weights outside single-unit blocks.
    loose_unit : torch.Tensor of shape (n_loose,)
        Unit of each of those weights.
    has_loose : bool
        Whether there are such weights; when not, the reduction skips the
        operations that handle them.
    """

    size: int
    block_unit: torch.Tensor
    loose_index: torch.Tensor
    loose_unit: torch.Tensor
    has_loose: bool


def plan_blocks(unit_index: torch.Tensor, n_units: int) -> BlockPlan:
    """Choose the block length that makes the reduction cheapest.

    Parameters
    ----------
    unit_index : torch.Tensor of shape (n_weights,)
        Unit of every weight of the flat buffer.
    n_units : int
        Number of units.

    Returns
    -------
    plan : BlockPlan
        On ``unit_index``'s device.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._merging import plan_blocks
    >>> plan = plan_blocks(torch.tensor([0] * 64 + [1] * 66), 2)
    >>> plan.size, plan.block_unit.tolist(), plan.loose_index.tolist()
    (64, [0, 1], [128, 129])
    """
    n_weights = unit_index.shape[0]
    boundaries = torch.nonzero(unit_index[1:] != unit_index[:-1]).flatten() + 1
    # A block length that divides every boundary between units leaves no
    # weight to reduce on its own.
    common = math.gcd(n_weights, *boundaries.tolist())
    sizes = {*BLOCK_SIZES, common} if common >= min(BLOCK_SIZES) else BLOCK_SIZES
    plans = []
    for size in sorted(sizes, reverse=True):
        n_blocks = n_weights // size
        blocks = unit_index[: n_blocks * size].view(n_blocks, size)
        pure = (blocks == blocks[:, :1]).all(1)
        loose = torch.ones(n_weights, dtype=torch.bool, device=unit_index.device)
        loose[: n_blocks * size] = ~pure.repeat_interleave(size)
        (loose_index,) = torch.nonzero(loose, as_tuple=True)
        n_loose = loose_index.shape[0]
        cost = n_blocks + LOOSE_COST * n_loose + LOOSE_OVERHEAD * (n_loose > 0)
        block_unit = torch.where(pure, blocks[:, 0], n_units)
        plan = BlockPlan(
            size, block_unit, loose_index, unit_index[loose_index], n_loose > 0
        )
        plans.append((cost, -size, plan))
    return min(plans, key=lambda entry: entry[:2])[2]


def _blocks(theta: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """The stack's whole blocks, shape (n_members, n_blocks, size), a view."""
    n_members, n_weights = theta.shape
    n_blocked = plan.block_unit.shape[0] * plan.size
    if n_blocked < n_weights:
        theta = theta[:, :n_blocked]
    return theta.view(n_members, -1, plan.size)


def _mix(weights: torch.Tensor, theta: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Flat merged weights: each weight's convex combination over members."""
    blocks = _blocks(theta, plan)
    if plan.has_loose:
        # Straddling blocks read a zero column and are overwritten below.
        weights = torch.nn.functional.pad(weights, (0, 1))
    block_weights = weights.index_select(1, plan.block_unit).unsqueeze(-1)
    flat = (blocks * block_weights).sum(0).view(-1)
    if plan.has_loose:
        if flat.shape[0] < theta.shape[1]:
            flat = torch.nn.functional.pad(flat, (0, theta.shape[1] - flat.shape[0]))
        loose = weights.index_select(1, plan.loose_unit)
        loose = loose * theta.index_select(1, plan.loose_index)
        flat.index_copy_(0, plan.loose_index, loose.sum(0))
    return flat


def _mix_grad(
    grad_flat: torch.Tensor, theta: torch.Tensor, plan: BlockPlan, n_units: int
) -> torch.Tensor:
    """Gradient of :func:`_mix` in the weights: one dot product per block."""
    blocks = _blocks(theta, plan)
    grad_blocks = grad_flat[: blocks.shape[1] * plan.size].view(-1, plan.size)
    # With loose weights, straddling blocks add into a spare last column.
    grad = theta.new_zeros(theta.shape[0], n_units + plan.has_loose)
    grad.index_add_(1, plan.block_unit, (blocks * grad_blocks).sum(-1))
    if plan.has_loose:
        loose = theta.index_select(1, plan.loose_index) * grad_flat[plan.loose_index]
        grad.index_add_(1, plan.loose_unit, loose)
        grad = grad[:, :n_units]
    return grad


def _unflatten(flat: torch.Tensor, layout) -> tuple[torch.Tensor, ...]:
    """The parameters held in a flat, padded buffer, as views of it."""
    split_sizes, shapes = layout
    parts = flat.split(split_sizes)[::2]
    # A vector needs no view, and a view costs an operation and a backward node.
    return tuple(
        part if len(shape) == 1 else part.view(shape)
        for part, shape in zip(parts, shapes, strict=True)
    )


class _Merge(torch.autograd.Function):
    # Gates in, flat merged buffer out, in one autograd node with a hand-written
    # backward: autograd of a gather would scatter-add every weight, and would
    # keep the (n_members, n_weights) gathered weights alive. Only small tensors
    # and the stack are saved, so a step holds no stack-sized temporary. The
    # buffer is split into parameters outside the node: autograd's own split
    # backward gathers their gradients faster than Python could.

    @staticmethod
    def forward(ctx, z, log_alpha, theta, plan):
        weights, total, is_open = _convex(z, log_alpha)
        ctx.save_for_backward(theta, weights, total, is_open)
        ctx.plan = plan
        return _mix(weights.to(theta.dtype), theta, plan)

    @staticmethod
    def backward(ctx, grad_flat):
        theta, weights, total, is_open = ctx.saved_tensors
        grad = _mix_grad(grad_flat, theta, ctx.plan, weights.shape[1])
        grad_z = _convex_grad(grad.to(weights.dtype), weights, total, is_open)
        return grad_z, None, None, None


class _SampledMerge(torch.autograd.Function):
    # As _Merge, with the hard-concrete sample inside the node: a training
    # step's whole path from log-alphas to the merged buffer is one node, since
    # per-operation overhead, not arithmetic, dominates a step on small nets.

    @staticmethod
    def forward(ctx, log_alpha, noise, theta, plan):
        z, slope = hard_concrete_with_slope(log_alpha, noise)
        weights, total, is_open = _convex(z, log_alpha)
        ctx.save_for_backward(theta, weights, total, is_open, slope)
        ctx.plan = plan
        return _mix(weights.to(theta.dtype), theta, plan)

    @staticmethod
    def backward(ctx, grad_flat):
        theta, weights, total, is_open, slope = ctx.saved_tensors
        grad = _mix_grad(grad_flat, theta, ctx.plan, weights.shape[1])
        grad_z = _convex_grad(grad.to(weights.dtype), weights, total, is_open)
        return grad_z * slope, None, None, None


class SoftMerge(torch.nn.Module):
    """Merge modules of one architecture through learnable hard-concrete gates.

    Holds one flat, detached copy of the members' merged parameters, one
    log-alpha per (member, unit) and a template module: a copy of the first
    member that supplies the architecture, the parameters that are not merged
    and the buffers. The members themselves are never modified.

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        Modules with identical parameter names and shapes. The first one is the
        reference for everything that is not merged, until
        :meth:`set_reference` names another.
    granularity : {"layer", "tensor", "neuron"}, default="layer"
        How weights are grouped into units that share a gate; see
        :func:`find_units`.
    merge : None, str or list of str, default=None
        Name patterns of the parameters to merge (see :func:`select_parameters`);
        ``None`` merges all of them.
    init_log_alpha : float, default=3.0
        Initial log-alpha of every gate; large values start with open gates,
        that is from the uniform average of the members.
    device : str or torch.device, default=None
        Where the stack, the gates and the template live; ``None`` keeps the
        first module's device.

    Attributes
    ----------
    log_alpha : torch.nn.Parameter of shape (n_members, n_units)
        The only trainable tensor.
    units : list of MergeUnit
        The merge units, in order.
    template : torch.nn.Module
        The copy of the first member that merged forward passes run through.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import SoftMerge
    >>> members = [torch.nn.Linear(3, 2) for _ in range(4)]
    >>> merger = SoftMerge(members)
    >>> merger(torch.ones(5, 3)).shape
    torch.Size([5, 2])
    >>> merger.gates().shape
    torch.Size([4, 1])
    """

    def __init__(
        self,
        modules: Sequence[torch.nn.Module],
        *,
        granularity: str = "layer",
        merge=None,
        init_log_alpha: float = 3.0,
        device=None,
    ):
        super().__init__()
        if len(modules) < 1:
            raise ValueError("Merging needs at least 1 module; got 0.")
        reference = modules[0]
        device = torch.device(device) if device is not None else _device_of(reference)
        self.template = copy.deepcopy(reference).to(device).requires_grad_(False)
        names = select_parameters(self.template, merge)
        self.units = find_units(self.template, names, granularity)
        self._names = names
        self._shapes = [self.template.get_parameter(n).shape for n in names]
        numels = [shape.numel() for shape in self._shapes]
        padded = [-(-n // ALIGNMENT) * ALIGNMENT for n in numels]
        # Parameters, each followed by the zero padding up to the next aligned
        # offset: splitting the flat buffer by these sizes gives them back.
        self._split_sizes = [
            size for n, p in zip(numels, padded, strict=True) for size in (n, p - n)
        ]
        self._layout = (self._split_sizes, self._shapes)
        self._aliases = _tied_aliases(self.template, names)
        self._slots = (None, [])
        self._evaluation = (None, None)

        theta, unit_index = self._stack(modules, device)
        self.register_buffer("theta", theta, persistent=False)
        self.register_buffer("unit_index", unit_index, persistent=False)
        plan = plan_blocks(unit_index, len(self.units))
        self._block_size = plan.size
        self.register_buffer("_block_unit", plan.block_unit, persistent=False)
        self.register_buffer("_loose_index", plan.loose_index, persistent=False)
        self.register_buffer("_loose_unit", plan.loose_unit, persistent=False)
        self._has_loose = plan.has_loose
        self.log_alpha = torch.nn.Parameter(
            torch.full(
                (len(modules), len(self.units)),
                float(init_log_alpha),
                device=device,
                dtype=torch.float32,
            )
        )

    def _stack(self, modules, device):
        dtype = self.template.get_parameter(self._names[0]).dtype
        n_weights = sum(self._split_sizes)
        theta = torch.zeros(len(modules), n_weights, device=device, dtype=dtype)
        for k, member in enumerate(modules):
            parts = theta[k].split(self._split_sizes)[::2]
            for name, part in zip(self._names, parts, strict=True):
                part.copy_(member.get_parameter(name).detach().reshape(-1))

        unit_of = {}
        for u, unit in enumerate(self.units):
            for name in unit.parameters:
                unit_of.setdefault(name, []).append(u)
        pieces = []
        for name, shape, padding in zip(
            self._names, self._shapes, self._split_sizes[1::2], strict=True
        ):
            units = torch.tensor(unit_of[name], dtype=torch.long)
            if len(units) == 1:
                pieces.append(units.expand(shape.numel()))
            else:  # neuron units: one per row of the parameter
                pieces.append(units.repeat_interleave(shape[1:].numel()))
            # Padding belongs to the last unit before it: it keeps blocks whole,
            # and its zeros add nothing to any sum.
            pieces.append(units[-1:].expand(padding))
        return theta, torch.cat(pieces).to(device)

    def set_reference(self, module: torch.nn.Module) -> None:
        """Take the unmerged parameters and the buffers from ``module``.

        Parameters
        ----------
        module : torch.nn.Module
            A module of the members' architecture, copied, not modified.
        """
        training = self.template.training
        template = copy.deepcopy(module).to(self.theta.device).requires_grad_(False)
        self.template = template.train(training)

    @torch.no_grad()
    def start_from(self, gates: torch.Tensor, magnitude: float = 3.0) -> None:
        """Set every log-alpha to ``magnitude`` where ``gates`` is open, else
        to ``-magnitude``: the deterministic gates become those 0/1 gates.

        Parameters
        ----------
        gates : torch.Tensor of shape (n_members, n_units)
            Gates to start from; open where positive.
        magnitude : float, default=3.0
            Size of the log-alphas; 3 gives deterministic gates of exactly 0
            and 1 that training can still move.

        Examples
        --------
        >>> import torch
        >>> from sk_softmerge import SoftMerge
        >>> merger = SoftMerge([torch.nn.Linear(2, 1) for _ in range(2)])
        >>> merger.start_from(torch.tensor([[0.0], [1.0]]))
        >>> merger.gates()
        tensor([[0.],
                [1.]], grad_fn=<ClampBackward1>)
        """
        magnitude = torch.tensor(magnitude, dtype=self.log_alpha.dtype)
        self.set_log_alpha(torch.where(gates > 0, magnitude, -magnitude))

    @torch.no_grad()
    def set_log_alpha(self, log_alpha: torch.Tensor) -> None:
        """Copy ``log_alpha`` into the gates' parameters, e.g. to restore the
        gates of an earlier epoch.

        Parameters
        ----------
        log_alpha : torch.Tensor of shape (n_members, n_units)

        Examples
        --------
        >>> import torch
        >>> from sk_softmerge import SoftMerge
        >>> merger = SoftMerge([torch.nn.Linear(2, 1) for _ in range(2)])
        >>> merger.set_log_alpha(torch.tensor([[-9.0], [9.0]]))
        >>> merger.gates().detach()
        tensor([[0.],
                [1.]])
        """
        self.log_alpha.copy_(log_alpha)

    def use_batch_statistics(self) -> "SoftMerge":
        """Evaluation mode, except for batch-norm layers, which normalise with
        each batch's statistics: no stored statistics fit merged weights that
        change with the gates. Returns the merger."""
        use_batch_statistics(self.eval().template)
        return self

    def member_forward(self, module: torch.nn.Module):
        """Forward function of ``module``'s own weights and buffers, run in an
        evaluation-mode copy of the template, as the member predicts.

        Parameters
        ----------
        module : torch.nn.Module
            A member; it is neither run nor modified.

        Returns
        -------
        forward : callable
        """
        template, evaluation = self._evaluation
        if template is not self.template:  # a new reference since last call
            evaluation = copy.deepcopy(self.template).eval()
            self._evaluation = (self.template, evaluation)
        return member_forward(evaluation, module)

    @property
    def unit_names(self) -> list[str]:
        """Names of the merge units, in order."""
        return [unit.name for unit in self.units]

    def sample_gates(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one hard-concrete gate per (member, unit), differentiably."""
        return sample_z(self.log_alpha, generator)

    def gates(self) -> torch.Tensor:
        """Deterministic gates, shape (n_members, n_units)."""
        return deterministic_z(self.log_alpha)

    def penalty(self) -> torch.Tensor:
        """Mean expected L0 norm over all gates, in ``[0, 1]``."""
        return expected_l0(self.log_alpha).mean()

    def merged_parameters(
        self, gates: torch.Tensor | None = None, *, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Merged values of the merged parameters.

        Parameters
        ----------
        gates : torch.Tensor of shape (n_members, n_units), default=None
            Gate values in ``[0, 1]``; ``None`` uses the deterministic gates,
            unless ``noise`` is given.
        noise : torch.Tensor of shape (n_members, n_units), default=None
            Logistic noise (:func:`~sk_softmerge._gates.logistic_noise`): the
            gates are then the hard-concrete sample it gives, computed in the
            same autograd node as the merge. Not with ``gates``.

        Returns
        -------
        parameters : dict of str to torch.Tensor
            One tensor per merged parameter, differentiable in ``gates``, or in
            ``log_alpha`` when the gates are sampled or deterministic.
        """
        return dict(zip(self._names, self._merged(gates, noise), strict=True))

    def _merged(self, gates, noise) -> tuple[torch.Tensor, ...]:
        """The merged parameters, in the order of ``self._names``."""
        plan = BlockPlan(
            self._block_size,
            self._block_unit,
            self._loose_index,
            self._loose_unit,
            self._has_loose,
        )
        if noise is not None:
            if gates is not None:
                raise ValueError("Pass gates or noise, not both.")
            flat = _SampledMerge.apply(self.log_alpha, noise, self.theta, plan)
        else:
            if gates is None:
                gates = self.gates()
            flat = _Merge.apply(gates, self.log_alpha, self.theta, plan)
        return _unflatten(flat, self._layout)

    def forward(
        self,
        *args,
        gates: torch.Tensor | None = None,
        gate_noise: torch.Tensor | None = None,
        **kwargs,
    ):
        """Run the template with merged parameters.

        Parameters
        ----------
        *args, **kwargs
            Inputs of the members' ``forward``.
        gates : torch.Tensor of shape (n_members, n_units), default=None
            Gate values; ``None`` uses the deterministic gates, unless
            ``gate_noise`` is given.
        gate_noise : torch.Tensor of shape (n_members, n_units), default=None
            Logistic noise for a hard-concrete sample of the gates, the fast
            path of a training step (see :meth:`merged_parameters`).
        """
        merged = self._merged(gates, gate_noise)
        # What torch.func.functional_call does, without its per-call search of
        # the module and checks: the merged tensors take the parameters' places
        # in their owners' parameter dictionaries for the call, then the
        # template's own parameters return.
        slots = self._template_slots()
        originals = [owner[name] for owner, name, _ in slots]
        try:
            for owner, name, position in slots:
                owner[name] = merged[position]
            return self.template(*args, **kwargs)
        finally:
            for (owner, name, _), original in zip(slots, originals, strict=True):
                owner[name] = original

    def _template_slots(self) -> list[tuple[dict, str, int]]:
        """``(dictionary, key, position in _merged)`` of every name under which
        the template holds a merged tensor, its tied aliases included."""
        template, slots = self._slots
        if template is not self.template:  # a new reference since last call
            positions = {name: i for i, name in enumerate(self._names)}
            holders = [(name, positions[name]) for name in self._names]
            holders += [(alias, positions[name]) for alias, name in self._aliases]
            slots = []
            for name, position in holders:
                path, _, key = name.rpartition(".")
                owner = self.template.get_submodule(path)
                store = (
                    owner._parameters if key in owner._parameters else owner._buffers
                )
                slots.append((store, key, position))
            # A tuple, so that nn.Module does not register the template twice.
            self._slots = (self.template, slots)
        return slots

    def _with_aliases(self, parameters: dict) -> dict:
        if self._aliases:
            parameters.update(
                {alias: parameters[name] for alias, name in self._aliases}
            )
        return parameters

    @torch.no_grad()
    def merged_state_dict(
        self, gates: torch.Tensor | None = None, *, statistics_from=None
    ) -> dict[str, torch.Tensor]:
        """State dict of the merged module.

        Parameters
        ----------
        gates : torch.Tensor of shape (n_members, n_units), default=None
            Gate values; ``None`` uses the deterministic gates.
        statistics_from : torch.Tensor, default=None
            Inputs to recompute batch-norm running statistics on, since the
            reference's do not fit the merged weights; ``None`` keeps the
            reference's buffers.

        Returns
        -------
        state_dict : dict of str to torch.Tensor
            Detached tensors on the merger's device, for ``load_state_dict`` on
            a module of the members' architecture.
        """
        state = {k: v.detach().clone() for k, v in self.template.state_dict().items()}
        if gates is None:
            gates = self.gates()
        state.update(self._with_aliases(self.merged_parameters(gates)))
        if statistics_from is None or not has_batchnorm(self.template):
            return state
        merged = recompute_batchnorm_statistics(
            self.template, statistics_from, state_dict=state
        )
        return merged.state_dict()


def _tied_aliases(
    module: torch.nn.Module, names: Sequence[str]
) -> list[tuple[str, str]]:
    """Pairs ``(alias, name)``: other names under which a merged tensor is held."""
    names_of: dict[int, list[str]] = {}
    for kind in (module.named_parameters, module.named_buffers):
        for name, tensor in kind(remove_duplicate=False):
            names_of.setdefault(id(tensor), []).append(name)
    return [
        (alias, name)
        for name in names
        for alias in names_of[id(module.get_parameter(name))]
        if alias != name
    ]


def _device_of(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
