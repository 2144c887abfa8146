"""Screening members for broken or malicious weights before gate learning.

Two screens run on what the members hold, before any gate is trained:

- a member holding a non-finite value (NaN or inf) in a parameter or floating
  buffer cannot take part in any weighted average (``0 * nan`` is ``nan``), so it
  is excluded outright;
- a member whose weights on a unit lie far from the members' coordinate-wise
  median, both compared with how far members usually lie from it and compared
  with the size of the median itself, is suspicious on that unit. Its gate there
  starts closed instead of open: gate learning can still open it if it helps.
"""

from collections.abc import Sequence

import torch

from ._fastpath import CHUNK_ELEMENTS

OUTLIER_FACTOR = 10.0
"""How many typical member-to-median distances make a member suspicious."""


def nonfinite_members(modules: Sequence[torch.nn.Module]) -> list[int]:
    """Indices of the modules holding NaN or inf in a parameter or float buffer.

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        The members' modules; they are only read.

    Returns
    -------
    indices : list of int
        Positions of the broken modules, in order.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._screening import nonfinite_members
    >>> good, bad = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = bad.bias.fill_(float("nan"))
    >>> nonfinite_members([good, bad])
    [1]
    """
    broken = []
    for index, module in enumerate(modules):
        tensors = [*module.parameters(), *module.buffers()]
        if not all(
            bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()
        ):
            broken.append(index)
    return broken


def extreme_units(
    theta: torch.Tensor, unit_index: torch.Tensor, n_units: int
) -> torch.Tensor:
    """Flag the (member, unit) pairs whose weights are far from all others.

    For every unit, the distance of each member's weights to the members'
    coordinate-wise median is compared with the median of those distances and
    with the norm of the median: a member farther than ``OUTLIER_FACTOR`` times
    the first and farther than the second is flagged. Members scaled by a large
    factor or replaced by large noise are flagged; members that merely differ,
    as independently trained members do, are not. Fewer than three members give
    no majority to compare with, and nothing is flagged.

    Parameters
    ----------
    theta : torch.Tensor of shape (n_members, n_weights)
        The members' stacked, finite weights.
    unit_index : torch.Tensor of shape (n_weights,)
        Unit of every weight.
    n_units : int
        Number of units.

    Returns
    -------
    flagged : torch.Tensor of shape (n_members, n_units), dtype bool

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._screening import extreme_units
    >>> theta = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    >>> theta[2, :3] *= 1000
    >>> extreme_units(theta, torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    tensor([[False, False],
            [False, False],
            [ True, False],
            [False, False]])
    """
    n_members, n_weights = theta.shape
    flagged = torch.zeros(n_members, n_units, dtype=torch.bool, device=theta.device)
    if n_members < 3:
        return flagged
    # Squared distances to the median and squared norms of the median, summed
    # per unit, a chunk of weights at a time: the temporaries of the median
    # and the differences stay within a member's worth of elements.
    distance = theta.new_zeros(n_members, n_units)
    median_norm = theta.new_zeros(1, n_units)
    step = max(1, max(CHUNK_ELEMENTS, n_weights) // (2 * n_members))
    for start in range(0, n_weights, step):
        columns, units = (
            theta[:, start : start + step],
            unit_index[start : start + step],
        )
        median = columns.median(dim=0).values
        distance.index_add_(1, units, (columns - median).square_())
        median_norm.index_add_(1, units, median.square_()[None])
    distance.sqrt_()
    median_norm.sqrt_()
    typical = distance.median(dim=0).values
    return (distance > OUTLIER_FACTOR * typical) & (distance > median_norm)


def screen(merger) -> torch.Tensor:
    """:func:`extreme_units` of the members stacked in a merger.

    Parameters
    ----------
    merger : SoftMerge
        The merger, whose stacked weights are only read.

    Returns
    -------
    flagged : torch.Tensor of shape (n_members, n_units), dtype bool

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import SoftMerge
    >>> from sk_softmerge._core._screening import screen
    >>> members = [torch.nn.Linear(2, 2) for _ in range(3)]
    >>> with torch.no_grad():
    ...     _ = members[1].weight.mul_(1e3)
    >>> screen(SoftMerge(members, granularity="layer")).flatten().tolist()
    [False, True, False]
    """
    return extreme_units(merger.theta, merger.unit_index, len(merger.units))
