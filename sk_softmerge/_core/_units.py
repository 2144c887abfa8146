"""Merge units: which of a module's weights share one gate per member.

A unit is a whole module (``"layer"``), one parameter tensor (``"tensor"``) or
one output unit or channel of a module with its bias (``"neuron"``); ``merge``
patterns choose which parameters are merged at all.
"""

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
        If a pattern selects nothing; for the name of one unit of neuron gates
        (``"2[1]"``, as ``unit_names_`` lists them) the message names the layer
        to write instead.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._units import select_parameters
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
            _refuse_unit_name(pattern, modules)
            raise ValueError(
                f"merge pattern {pattern!r} matches no parameter or module. "
                f"Modules holding parameters: {modules}; parameters: {names}."
            )
        selected |= hits
    return [name for name in names if name in selected]


def _refuse_unit_name(pattern: str, modules: list[str]) -> None:
    """Raise, saying what to write instead, when ``pattern`` is the name of one
    unit of neuron gates (``"body.4[9]"``, as ``unit_names_`` lists them):
    ``merge`` selects whole layers, whose every unit then has its own gates."""
    found = re.fullmatch(r"(.*)\[(\d+)\]", pattern)
    if found and found[1] in modules:
        raise ValueError(
            f"merge pattern {pattern!r} names one output unit of layer "
            f"{found[1]!r}, as unit_names_ does; merge selects whole layers or "
            f"parameters. Write {found[1]!r} to merge that layer: with "
            f'granularity="neuron" each of its units still gets its own gates.'
        )


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
    >>> from sk_softmerge._core._units import find_units
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
