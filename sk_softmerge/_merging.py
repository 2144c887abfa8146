"""Merging: a torch module that merges modules of one architecture through
learnable gates.

:class:`SoftMerge` copies the members' merged parameters once into one flat
stack of shape ``(n_members, n_weights)``. Every weight belongs to one merge
unit (:func:`find_units`): a layer, a tensor or a neuron, whose merged value is
the convex combination of the members' values with weights ``z_ku / sum_k
z_ku``, where ``z`` are the hard-concrete gates of :mod:`sk_softmerge._gates`.
The reduction, and running the template with its results, is the fast path of
:mod:`sk_softmerge._fastmerge`, whose docstring states what it computes.
"""

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._fastmerge import BlockPlan, FlatLayout, TemplateBinding, merge, plan_blocks
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
    theta : torch.Tensor of shape (n_members, n_weights)
        The flat stack of the members' merged parameters (see
        :class:`~sk_softmerge._fastmerge.FlatLayout`).
    unit_index : torch.Tensor of shape (n_weights,)
        The unit of every weight of ``theta``.

    Raises
    ------
    ValueError
        If there is no module, or the modules' parameters differ in name,
        shape or dtype.

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
        _check_same_parameters(modules)
        device = torch.device(device) if device is not None else _device_of(modules[0])
        self.template = copy.deepcopy(modules[0]).to(device).requires_grad_(False)
        names = select_parameters(self.template, merge)
        self.units = find_units(self.template, names, granularity)
        self._names = names
        self._aliases = _tied_aliases(self.template, names)
        self._binding = TemplateBinding(self.template, names, self._aliases)
        self._layout = FlatLayout([self.template.get_parameter(n).shape for n in names])

        theta = self._layout.stack(
            [[member.get_parameter(name) for name in names] for member in modules],
            device=device,
            dtype=self.template.get_parameter(names[0]).dtype,
        )
        rows: dict[str, list[int]] = {}  # for each parameter, the unit of each row
        for u, unit in enumerate(self.units):
            for name in unit.parameters:
                rows.setdefault(name, []).append(u)
        unit_index = self._layout.unit_index([torch.tensor(rows[n]) for n in names])
        self.register_buffer("theta", theta, persistent=False)
        self.register_buffer("unit_index", unit_index.to(device), persistent=False)
        # The plan's tensors are buffers, so that they follow the merger's device.
        plan = plan_blocks(self.unit_index, len(self.units))
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
        self.log_alpha.copy_(torch.where(gates > 0, magnitude, -magnitude))

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
        merged = self._merged(gates, gate_noise)
        if self._binding.template is not self.template:  # a new reference
            self._binding = TemplateBinding(self.template, self._names, self._aliases)
        return self._binding(merged, args, kwargs)

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
        if gates is None:
            gates = self.gates()
        merged = self.merged_parameters(gates)
        merged.update({alias: merged[name] for alias, name in self._aliases})
        return state | merged


def _check_same_parameters(modules: Sequence[torch.nn.Module]) -> None:
    """Raise a ValueError naming the parameter and the modules that differ from
    the first module in parameter names, shapes or dtypes."""
    expected = dict(modules[0].named_parameters())
    for i, module in enumerate(modules[1:], start=1):
        found = dict(module.named_parameters())
        if found.keys() != expected.keys():
            missing = [name for name in expected if name not in found]
            extra = [name for name in found if name not in expected]
            raise ValueError(
                f"Expected the parameter names of modules[0] in every module; got "
                f"modules[{i}] with missing {missing} and unexpected {extra}: "
                "members must share one architecture."
            )
        for name, first in expected.items():
            for what in ("shape", "dtype"):
                want, got = getattr(first, what), getattr(found[name], what)
                if want != got:
                    show = tuple if what == "shape" else str
                    raise ValueError(
                        f"Expected parameter {name!r} to have {what} {show(want)} "
                        f"in every module, as in modules[0]; got {show(got)} in "
                        f"modules[{i}]: members must share one architecture."
                    )


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
