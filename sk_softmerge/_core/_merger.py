"""Merging: a torch module that merges modules of one architecture through
learnable gates.

:class:`SoftMerge` copies the members' merged parameters once into one flat
stack of shape ``(n_members, n_weights)``. Every weight belongs to one merge
unit (:func:`find_units`): a layer, a tensor or a neuron, whose merged value is
the convex combination of the members' values with weights ``z_ku / sum_k
z_ku``, where ``z`` are the hard-concrete gates of :mod:`sk_softmerge._core._gates`.
The reduction, and running the template with its results, is the fast path of
:mod:`sk_softmerge._core._fastpath`, whose docstring states what it computes.
"""

import copy
from collections.abc import Sequence
from typing import Protocol

import torch

from .._inputs import to_device
from ._batchnorm import (
    has_batchnorm,
    recompute_batchnorm_statistics,
    use_batch_statistics,
)
from ._evaluation import member_forward
from ._fastpath import (
    BlockPlan,
    FlatLayout,
    TemplateBinding,
    merge,
    mixing_weights,
    plan_blocks,
)
from ._gates import deterministic_z, expected_l0, hard_concrete, sample_z
from ._units import find_units, select_parameters

INIT_LOG_ALPHA = 3.0
"""Magnitude of starting log-alphas: an open gate starts at this value
(deterministic gate exactly 1), a closed one at minus it (exactly 0), both
still within reach of training."""

OPEN_START_LOG_ALPHA = 1.5
"""Log-alpha of the open gates where cross-fitting starts from a fixed rule:
equal open gates give the same merge at any value (a unit's mixing weights are
its gates over their sum; this one gives deterministic gates of 0.88), but a
gate drawn during training is clamped at 1, where it has no gradient, in 48%
of draws at 1.5 against 80% at ``INIT_LOG_ALPHA``, so the gates learn from
more of their draws (chosen by measurement: ``benchmarks/RESULTS.md``,
"Three random states, and the new default")."""


class UnitCorrection(Protocol):
    """What :meth:`SoftMerge.set_repair` takes: a correction of merged units'
    statistics (REPAIR, built by the alignment subsystem), which the merger
    only calls, never builds."""

    def applied(self, template: torch.nn.Module, weights: torch.Tensor):
        """A context in which ``template``'s forward passes are corrected,
        ``weights`` the members' mixing weights of every unit."""

    def fold(self, template, state, weights, X, device) -> dict:
        """``state`` with the correction measured on ``X`` folded into it."""


class SoftMerge(torch.nn.Module):
    """Merge modules of one architecture through learnable hard-concrete gates.

    Holds one flat, detached copy of the members' merged parameters, one
    log-alpha per (member, unit) and a template module: a copy of the first
    member that supplies the architecture, the parameters that are not merged
    and the buffers. The members themselves are never modified.

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        Modules with identical parameter names, shapes and dtypes. The first
        one is the reference for everything that is not merged, until
        :meth:`set_reference` names another.
    granularity : {"neuron", "layer", "tensor"}, default="neuron"
        How weights are grouped into units that share a gate; see
        :func:`find_units`.
    merge : None, str or list of str, default=None
        Name patterns of the parameters to merge (see :func:`select_parameters`);
        ``None`` merges all of them.
    init_log_alpha : float, default=INIT_LOG_ALPHA
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
    theta : torch.Tensor of shape (n_members, n_weights)
        The flat stack of the members' merged parameters (see
        :class:`~sk_softmerge._core._fastpath.FlatLayout`).
    unit_index : torch.Tensor of shape (n_weights,)
        The unit of every weight of ``theta`` (int32, computed on access).

    Raises
    ------
    ValueError
        If there is no module, or the modules' parameters differ in name,
        shape or dtype.

    Notes
    -----
    Memory: the stack ``theta`` holds every member's merged weights once
    (``n_members`` members' worth); nothing else of that size is kept. A
    training step adds the merged weights and then their gradient, and the
    reduction's temporaries, which ``CHUNK_ELEMENTS`` of
    :mod:`sk_softmerge._core._fastpath` bounds by half a member's worth. The merged
    weights live until the last layer that needs them has formed its input's
    gradient; a large ``nn.Linear`` lets go of its merged weight at that point,
    before it forms the weight's gradient (``LET_GO_ELEMENTS``), so that for an
    MLP the merged weights and the gradient of its largest layer never coexist.
    The step's peak is then the gradient of every merged weight, gathered into
    one buffer beside the largest weight's own: about two members' worth
    (three where other layers hold the merged weights). A default fit of
    ``SoftMergeClassifier`` of 1M weights and five members peaked at the stack
    plus 2.2 members' worth, with one training batch's activations (measured
    in ``benchmarks/RESULTS.md``). The number of samples adds little: training
    prepares its shuffled data and gate noise a few steps at a time, and
    evaluations run a few training batches at once.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import SoftMerge
    >>> members = [torch.nn.Linear(3, 2) for _ in range(4)]
    >>> merger = SoftMerge(members)
    >>> merger(torch.ones(5, 3)).shape
    torch.Size([5, 2])
    >>> merger.gates().shape   # one gate per member and output unit
    torch.Size([4, 2])
    >>> merger.unit_names
    ['[0]', '[1]']
    """

    def __init__(
        self,
        modules: Sequence[torch.nn.Module],
        *,
        granularity: str = "neuron",
        merge=None,
        init_log_alpha: float = INIT_LOG_ALPHA,
        device=None,
    ):
        super().__init__()
        if len(modules) < 1:
            raise ValueError("Merging needs at least 1 module; got 0.")
        check_same_parameters(modules)
        device = torch.device(device) if device is not None else _device_of(modules[0])
        self.template = copy.deepcopy(modules[0]).to(device).requires_grad_(False)
        names = select_parameters(self.template, merge)
        self.units = find_units(self.template, names, granularity)
        self._names = names
        self._aliases = tied_aliases(self.template, names)
        self._binding = TemplateBinding(self.template, names, self._aliases)
        self._layout = FlatLayout([self.template.get_parameter(n).shape for n in names])
        self._repair: UnitCorrection | None = None

        theta = self._layout.stack(
            [[member.get_parameter(name) for name in names] for member in modules],
            device=device,
            dtype=self.template.get_parameter(names[0]).dtype,
        )
        _release(self.template, names)
        rows: dict[str, list[int]] = {}  # for each parameter, the unit of each row
        for u, unit in enumerate(self.units):
            for name in unit.parameters:
                rows.setdefault(name, []).append(u)
        # The unit of every row of every parameter; the unit of every weight
        # (two members' worth of int64) is computed when needed, not kept.
        self._unit_rows = [torch.tensor(rows[n], dtype=torch.int32) for n in names]
        self.register_buffer("theta", theta, persistent=False)
        # The plan's tensors are buffers, so that they follow the merger's device.
        plan = plan_blocks(self.unit_index, len(self.units), len(modules))
        self._block_size = plan.size
        for field in ("block_unit", "loose_index", "loose_unit"):
            self.register_buffer(f"_{field}", getattr(plan, field), persistent=False)
        self.log_alpha = torch.nn.Parameter(
            torch.full(
                (len(modules), len(self.units)),
                float(init_log_alpha),
                device=device,
                dtype=torch.float32,
            )
        )

    def set_reference(self, module: torch.nn.Module) -> None:
        """Take the unmerged parameters and the buffers from ``module``.

        Parameters
        ----------
        module : torch.nn.Module
            A module of the members' architecture, copied, not modified.
        """
        training = self.template.training
        template = copy.deepcopy(module).to(self.theta.device).requires_grad_(False)
        _release(template, self._names)
        self.template = template.train(training)

    @torch.no_grad()
    def start_from(
        self, gates: torch.Tensor, open_log_alpha: float = INIT_LOG_ALPHA
    ) -> None:
        """Set every log-alpha to ``open_log_alpha`` where ``gates`` is open,
        else to ``-INIT_LOG_ALPHA``: the merge becomes that of those 0/1 gates.

        Parameters
        ----------
        gates : torch.Tensor of shape (n_members, n_units)
            Gates to start from; open where positive.
        open_log_alpha : float, default=INIT_LOG_ALPHA
            Log-alpha of the open gates, above ``-INIT_LOG_ALPHA``; the
            default gives deterministic gates of exactly 1, and every value
            the same merge (a unit's mixing weights are its gates over their
            sum). Closed gates start at ``-INIT_LOG_ALPHA``, exactly 0.

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
        dtype = self.log_alpha.dtype
        opened = torch.tensor(open_log_alpha, dtype=dtype)
        closed = torch.tensor(-INIT_LOG_ALPHA, dtype=dtype)
        self.set_log_alpha(torch.where(gates > 0, opened, closed))

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

    def set_repair(self, correction: "UnitCorrection | None") -> None:
        """Correct the statistics of merged hidden units (REPAIR), or stop.

        From now on, a forward pass runs inside ``correction.applied`` (which
        renormalises the corrected units with each batch's statistics) and
        :meth:`merged_state_dict` folds the correction, measured on its
        ``statistics_from`` data, into the merged weights. Build one with
        :func:`sk_softmerge._align._repair.repair_of`.

        Parameters
        ----------
        correction : UnitCorrection or None
            ``None`` removes a correction.
        """
        self._repair = correction

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
        # A fresh copy each time: a copy kept would hold a member's worth of
        # memory for the whole fit.
        return member_forward(
            copy.deepcopy(self.template).eval(), module, device=self.theta.device
        )

    @property
    def unit_index(self) -> torch.Tensor:
        """The unit (int32) of every weight of ``theta``, shape ``(n_weights,)``, on the
        merger's device (computed on each access, not stored)."""
        return self._layout.unit_index(self._unit_rows).to(self.theta.device)

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
            Logistic noise (:func:`~sk_softmerge._core._gates.logistic_noise`): the
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
        if noise is not None and gates is not None:
            raise ValueError("Pass gates or noise, not both.")
        if noise is None and gates is None:
            gates = self.gates()
        plan = BlockPlan(
            self._block_size, self._block_unit, self._loose_index, self._loose_unit
        )
        flat = merge(self.log_alpha, self.theta, plan, gates=gates, noise=noise)
        return self._layout.parameters(flat)

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
        if self._binding.template is not self.template:  # a new reference
            self._binding = TemplateBinding(self.template, self._names, self._aliases)
        if self._repair is None:
            return self._binding(self._merged(gates, gate_noise), args, kwargs)
        # The targets need the gates themselves: draw the sample outside the
        # merge's node.
        if gate_noise is not None:
            gates = hard_concrete(self.log_alpha, gate_noise)
        elif gates is None:
            gates = self.gates()
        merged = self._merged(gates, None)
        with self._repair.applied(self.template, mixing_weights(gates, self.log_alpha)):
            return self._binding(merged, args, kwargs)

    @torch.no_grad()
    def merged_state_dict(
        self, gates: torch.Tensor | None = None, *, statistics_from=None
    ) -> dict[str, torch.Tensor]:
        """State dict of the merged module.

        Parameters
        ----------
        gates : torch.Tensor of shape (n_members, n_units), default=None
            Gate values; ``None`` uses the deterministic gates.
        statistics_from : array-like or torch.Tensor, default=None
            Inputs to recompute batch-norm running statistics on, since the
            reference's do not fit the merged weights, moved to the merger's
            device in batches, and to measure the corrected units on after
            :meth:`set_repair`; ``None`` keeps the reference's buffers (and is
            refused after :meth:`set_repair`).

        Returns
        -------
        state_dict : dict of str to torch.Tensor
            Detached tensors on the merger's device, for ``load_state_dict`` on
            a module of the members' architecture.
        """
        if gates is None:
            gates = self.gates()
        merged = self.merged_parameters(gates)
        merged.update({alias: merged[name] for alias, name in self._aliases})
        # The template's own values of the merged tensors are not copied: the
        # merge replaces them.
        state = {
            k: v.detach().clone()
            for k, v in self.template.state_dict().items()
            if k not in merged
        }
        state |= merged
        if self._repair is not None and statistics_from is None:
            raise ValueError(
                "The merge corrects its units' statistics (set_repair): pass "
                "statistics_from, the data to measure them on."
            )
        if statistics_from is None:
            return state
        batchnorm = has_batchnorm(self.template)
        if batchnorm:
            state = self._recompute_batchnorm(state, statistics_from)
        if self._repair is not None:
            weights = mixing_weights(gates, self.log_alpha)
            state = self._repair.fold(
                self.template, state, weights, statistics_from, self.theta.device
            )
            for alias, name in self._aliases:
                state[alias] = state[name]
            if batchnorm:  # the corrected units feed later batch norms
                state = self._recompute_batchnorm(state, statistics_from)
        return state

    def _recompute_batchnorm(self, state, X) -> dict:
        X = to_device(X, self.theta.device)
        merged = recompute_batchnorm_statistics(self.template, X, state_dict=state)
        return merged.state_dict()


def check_same_parameters(
    modules: Sequence[torch.nn.Module], name: str = "modules"
) -> None:
    """Raise a ValueError unless every module has the first one's parameter
    names, shapes and dtypes, in order.

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        The members; only read.
    name : str, default="modules"
        What the messages call the sequence (``"estimators"`` for skorch
        members).

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._merger import check_same_parameters
    >>> check_same_parameters([torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)])
    Traceback (most recent call last):
        ...
    ValueError: Parameter 'weight' of modules[1] has shape (2, 4), but modules[0] \
has shape (2, 3): members must share one architecture.
    """
    reference = _signature(modules[0])
    for index, module in enumerate(modules[1:], start=1):
        other = _signature(module)
        for (name0, shape0, dtype0), (key, shape, dtype) in zip(
            reference, other, strict=False
        ):
            if key != name0:
                raise ValueError(
                    f"{name}[{index}] has parameter {key!r} where {name}[0] has "
                    f"{name0!r}: members must share one architecture."
                )
            for what, got, want in (("shape", shape, shape0), ("dtype", dtype, dtype0)):
                if got != want:
                    raise ValueError(
                        f"Parameter {key!r} of {name}[{index}] has {what} {got}, but "
                        f"{name}[0] has {what} {want}: members must share one "
                        "architecture."
                    )
        if len(other) != len(reference):
            n_common = min(len(other), len(reference))
            owner, extra = (
                (f"{name}[{index}]", other[n_common][0])
                if len(other) > n_common
                else (f"{name}[0]", reference[n_common][0])
            )
            raise ValueError(
                f"Parameter {extra!r} exists only in {owner}: {name}[{index}] has "
                f"{len(other)} parameters, {name}[0] has {len(reference)}; members "
                "must share one architecture."
            )


def _signature(module: torch.nn.Module) -> list[tuple]:
    return [(key, tuple(p.shape), p.dtype) for key, p in module.named_parameters()]


def tied_aliases(
    module: torch.nn.Module, names: Sequence[str]
) -> list[tuple[str, str]]:
    """Pairs ``(alias, name)``: the other names under which ``module`` holds
    each parameter of ``names`` (tied weights, a module registered twice).

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._merger import tied_aliases
    >>> net = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5))
    >>> net[1].weight = net[0].weight
    >>> tied_aliases(net, ["0.weight"])
    [('1.weight', '0.weight')]
    """
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


def untied_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The submodules with a ``weight`` parameter that ``module`` holds under
    that one name (no tied weight, no module registered twice), by name.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._merger import untied_layers
    >>> net = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5),
    ...                           torch.nn.Linear(5, 1))
    >>> net[1].weight = net[0].weight
    >>> list(untied_layers(net))
    ['2']
    """
    names = [name for name, _ in module.named_parameters()]
    held_twice = {name for pair in tied_aliases(module, names) for name in pair}
    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(getattr(layer, "weight", None), torch.nn.Parameter)
        and (f"{name}.weight" if name else "weight") not in held_twice
    }


def _release(template: torch.nn.Module, names) -> None:
    """Put storage-free (meta) placeholders of the same shapes in the template's
    place for its merged parameters, tied ones included: every call puts the
    merged tensors there (:class:`~sk_softmerge._core._fastpath.TemplateBinding`),
    and the template's own values would hold a member's worth of memory."""
    placeholders = {
        id(parameter): torch.nn.Parameter(
            torch.empty_like(parameter, device="meta"), requires_grad=False
        )
        for parameter in (template.get_parameter(name) for name in names)
    }
    for owner in template.modules():
        for key, value in list(owner._parameters.items()):
            if value is not None and id(value) in placeholders:
                owner._parameters[key] = placeholders[id(value)]
        if isinstance(owner, torch.nn.RNNBase):  # it keeps a list of its weights
            owner._init_flat_weights()


def _device_of(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
