"""Merging: gates and stacked member weights in, merged weights out.

The members' merged parameters are copied once into one flat buffer of shape
``(n_members, n_weights)``. Every weight belongs to one merge unit; a unit's
merged value is the convex combination of the members' values with weights
``z_ku / sum_k z_ku``. One gather and one reduction over the buffer form every
merged tensor at once, and :func:`torch.func.functional_call` runs a template
module with them, so a training step has no Python loop over members or
parameters.
"""

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ._gates import deterministic_z, expected_l0, sample_z

GRANULARITIES = ("layer", "tensor", "neuron")


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
        Non-negative weights summing to one over members.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._merging import mixing_weights
    >>> z = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    >>> mixing_weights(z, torch.tensor([[0.0, -1.0], [0.0, 2.0]]))
    tensor([[0.6667, 0.0000],
            [0.3333, 1.0000]])
    """
    best = (log_alpha == log_alpha.amax(0, keepdim=True)).to(z.dtype)
    z = torch.where(z.sum(0, keepdim=True) > 0, z, best)
    return z / z.sum(0, keepdim=True)


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

        theta, unit_index = self._stack(modules, device)
        self.register_buffer("theta", theta, persistent=False)
        self.register_buffer("unit_index", unit_index, persistent=False)
        self.log_alpha = torch.nn.Parameter(
            torch.full(
                (len(modules), len(self.units)),
                float(init_log_alpha),
                device=device,
                dtype=torch.float32,
            )
        )

    def _stack(self, modules, device):
        sizes = [shape.numel() for shape in self._shapes]
        dtype = self.template.get_parameter(self._names[0]).dtype
        theta = torch.empty(len(modules), sum(sizes), device=device, dtype=dtype)
        for k, member in enumerate(modules):
            for name, part in zip(self._names, theta[k].split(sizes), strict=True):
                part.copy_(member.get_parameter(name).detach().reshape(-1))

        unit_of = {}
        for u, unit in enumerate(self.units):
            for name in unit.parameters:
                unit_of.setdefault(name, []).append(u)
        pieces = []
        for name, shape in zip(self._names, self._shapes, strict=True):
            units = torch.tensor(unit_of[name], dtype=torch.long)
            if len(units) == 1:
                pieces.append(units.expand(shape.numel()))
            else:  # neuron units: one per row of the parameter
                pieces.append(units.repeat_interleave(shape[1:].numel()))
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

    def merged_parameters(self, gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged values of the merged parameters for the given gates.

        Parameters
        ----------
        gates : torch.Tensor of shape (n_members, n_units)
            Gate values in ``[0, 1]``.

        Returns
        -------
        parameters : dict of str to torch.Tensor
            One tensor per merged parameter, differentiable in ``gates``.
        """
        weights = mixing_weights(gates, self.log_alpha).to(self.theta.dtype)
        flat = torch.linalg.vecdot(weights[:, self.unit_index], self.theta, dim=0)
        parts = flat.split([shape.numel() for shape in self._shapes])
        return {
            name: part.view(shape)
            for name, part, shape in zip(self._names, parts, self._shapes, strict=True)
        }

    def forward(self, *args, gates: torch.Tensor | None = None, **kwargs):
        """Run the template with merged parameters.

        Parameters
        ----------
        *args, **kwargs
            Inputs of the members' ``forward``.
        gates : torch.Tensor of shape (n_members, n_units), default=None
            Gate values; ``None`` uses the deterministic gates.
        """
        if gates is None:
            gates = self.gates()
        parameters = self.merged_parameters(gates)
        return functional_call(self.template, parameters, args, kwargs)

    @torch.no_grad()
    def merged_state_dict(
        self, gates: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """State dict of the merged module.

        Parameters
        ----------
        gates : torch.Tensor of shape (n_members, n_units), default=None
            Gate values; ``None`` uses the deterministic gates.

        Returns
        -------
        state_dict : dict of str to torch.Tensor
            Detached tensors on the merger's device, for ``load_state_dict`` on
            a module of the members' architecture.
        """
        state = {k: v.detach().clone() for k, v in self.template.state_dict().items()}
        state.update(self.merged_parameters(self.gates() if gates is None else gates))
        return state


def _device_of(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
