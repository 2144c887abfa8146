"""Repairing the statistics of merged hidden units (REPAIR).

Averaging aligned members shrinks the variance of the hidden units: matched
units are correlated, not identical, and the average of imperfectly correlated
signals varies less than each of them. Deeper layers then see inputs of the
wrong scale, and the average loses accuracy even where the members agree
(Jordan et al., 2022). REPAIR brings each merged unit's pre-activation mean and
standard deviation back to those of the members it averages.

Here the target of a merged unit is the gate-weighted average of the members'
statistics on the fit data: with mixing weights ``c_k`` (the gates' convex
weights of the unit in :mod:`sk_softmerge._core._fastpath`), the unit's target mean
is ``sum_k c_k mean_k`` and its target standard deviation ``sum_k c_k std_k``.
While gates learn, :meth:`Repair.applied` renormalises every corrected layer's
output with the batch's statistics and rescales it to the targets, as batch
norm does in training; after learning, :meth:`Repair.fold` measures the merged
net's statistics on the fit data, layer after layer in the order they run, and
folds the correction into each layer's weight and bias, so that the merged net
keeps the members' architecture. The fold is exact whatever the activation
function that follows, since it acts before it.

Corrected: the outputs of the ``Linear`` and ``Conv`` layers (with a bias) that
create hidden units, as :func:`~sk_softmerge._align._spec.permutation_spec` finds
them. Units that pass through a batch-norm layer are left to the recomputation
of its statistics, which does the same job; units that reach the network's
output are never changed.
"""

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .._inputs import check_one_input
from ._activations import Site, unit_moments
from ._spec import permutation_spec

EPS = 1e-5
"""Added to a batch's variance of a unit before dividing by its square root
while gates learn, as batch norm does, so that gradients stay finite."""

CONSTANT = 1e-6
"""A merged unit whose standard deviation on the fit data is at most this is
constant there: the fold shifts it to its target mean but does not scale it."""


@dataclass(frozen=True)
class RepairSite:
    """A layer whose output units are corrected.

    Parameters
    ----------
    layer : str
        Name of the ``Linear`` or ``Conv`` layer.
    axis : int
        The axis of its output that holds the units.
    size : int
        Number of units (output features or channels).
    """

    layer: str
    axis: int
    size: int

    @property
    def site(self) -> Site:
        """Where the units are observed, for :mod:`sk_softmerge._align._activations`."""
        return Site(self.layer, "output", self.axis)


def repair_sites(module: torch.nn.Module, example_input) -> list[RepairSite]:
    """The layers whose hidden units REPAIR corrects, in the order they run.

    Parameters
    ----------
    module : torch.nn.Module
        The members' architecture; not modified.
    example_input : array-like or torch.Tensor
        Valid inputs; two are used.

    Returns
    -------
    sites : list of RepairSite
        Empty when every hidden unit passes through batch norm.

    Raises
    ------
    ValueError
        If the module's hidden units cannot be found (see
        :func:`~sk_softmerge._align._spec.permutation_spec`).

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._repair import repair_sites
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 2))
    >>> repair_sites(net, torch.zeros(2, 4))
    [RepairSite(layer='0', axis=1, size=8)]
    """
    check_one_input(example_input, "repair")
    example = torch.as_tensor(example_input[:2])
    try:
        groups = permutation_spec(module, example)
    except ValueError as exc:
        raise ValueError(
            f"repair corrects hidden units, found as for alignment: {exc}"
        ) from exc
    sites = []
    for group in groups:
        if any(_in_batchnorm(module, axis.tensor) for axis in group.axes):
            continue
        for site in group.sites:
            layer = module.get_submodule(site.module)
            if site.where == "output" and getattr(layer, "bias", None) is not None:
                sites.append(RepairSite(site.module, site.axis, group.size))
    order = _execution_order(module, example)
    return sorted(sites, key=lambda site: order.index(site.layer))


def _in_batchnorm(module: torch.nn.Module, tensor: str) -> bool:
    return isinstance(module.get_submodule(tensor.rpartition(".")[0]), _BatchNorm)


def _execution_order(module: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the submodules in the order a forward pass calls them."""
    module = copy.deepcopy(module).eval()
    device = next((t.device for t in module.parameters()), example.device)
    called: list[str] = []
    handles = [
        layer.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, layer in module.named_modules()
    ]
    try:
        with torch.no_grad():
            module(example.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return called


def member_moments(
    module: torch.nn.Module,
    states: Sequence[dict],
    sites: Sequence[RepairSite],
    X,
    *,
    device=None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mean and standard deviation of every corrected unit, per member.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture; not modified.
    states : sequence of dict
        The members' state dicts (aligned, when they are).
    sites : sequence of RepairSite
        From :func:`repair_sites`.
    X : array-like or torch.Tensor
        The fit data.
    device : torch.device, default=None
        Where to run; ``None`` runs on the module's device.

    Returns
    -------
    moments : list of (ndarray, ndarray)
        Per site, means and standard deviations of shape ``(n_members,
        n_units)``; see :func:`~sk_softmerge._align._activations.unit_moments`.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._repair import member_moments, repair_sites
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 2))
    >>> X = torch.randn(100, 4)
    >>> [(mean, std)] = member_moments(net, [net.state_dict()] * 3,
    ...                                repair_sites(net, X), X)
    >>> mean.shape
    (3, 8)
    """
    return unit_moments(
        module,
        states,
        [site.site for site in sites],
        [site.size for site in sites],
        X,
        device=device,
    )


def repair_of(merger, sites, moments) -> tuple["Repair | None", list]:
    """The correction of ``merger``'s units at ``sites``, for
    :meth:`SoftMerge.set_repair`, and the sites it corrects.

    Sites whose layer weight the merger does not merge are left out; a layer
    under one gate (``granularity="layer"``) has every unit in that gate's
    column.

    Parameters
    ----------
    merger : SoftMerge
    sites : sequence of RepairSite
        From :func:`repair_sites`.
    moments : sequence of (array-like, array-like)
        Per site, the members' unit means and standard deviations, of shape
        ``(n_members, n_units)``, in the order of the merger's members
        (:func:`member_moments`).

    Returns
    -------
    repair : Repair or None
        ``None`` when no site is merged.
    sites : list of RepairSite
        The sites corrected.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import SoftMerge
    >>> from sk_softmerge._align._repair import member_moments, repair_of, repair_sites
    >>> members = [torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(),
    ...                                torch.nn.Linear(8, 2)) for _ in range(2)]
    >>> X = torch.randn(100, 3)
    >>> sites = repair_sites(members[0], X)
    >>> moments = member_moments(members[0], [m.state_dict() for m in members],
    ...                          sites, X)
    >>> merger = SoftMerge(members)
    >>> repair, kept = repair_of(merger, sites, moments)
    >>> merger.set_repair(repair)
    >>> [site.layer for site in kept]
    ['0']
    >>> sorted(merger.merged_state_dict(statistics_from=X))
    ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    kept, kept_moments, units = [], [], []
    for site, site_moments in zip(sites, moments, strict=True):
        weight = f"{site.layer}.weight"
        columns = [
            u for u, unit in enumerate(merger.units) if weight in unit.parameters
        ]
        if not columns:
            continue
        if len(columns) != site.size:  # one gate for the whole layer
            columns = columns[:1] * site.size
        kept.append(site)
        kept_moments.append(site_moments)
        units.append(torch.tensor(columns))
    if not kept:
        return None, []
    theta = merger.theta
    repair = Repair(kept, kept_moments, units, device=theta.device, dtype=theta.dtype)
    return repair, kept


class Repair:
    """The targets of the corrected units, and how to bring a merge to them.

    Parameters
    ----------
    sites : sequence of RepairSite
        The corrected layers, in the order they run.
    moments : sequence of (array-like, array-like)
        Per site, the members' means and standard deviations, each of shape
        ``(n_members, site.size)`` (:func:`member_moments`).
    units : sequence of torch.Tensor
        Per site, the merge unit (column of the gates) of each of its units.
    device, dtype
        Where and in which dtype the targets are computed.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._repair import Repair, RepairSite
    >>> repair = Repair([RepairSite("0", 1, 2)],
    ...                 [(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.ones(2, 2))],
    ...                 [torch.tensor([0, 0])])
    >>> means, stds = repair.targets(torch.tensor([[0.5], [0.5]]))
    >>> means[0]
    tensor([1., 2.])
    """

    def __init__(self, sites, moments, units, *, device=None, dtype=torch.float32):
        self.sites = list(sites)
        self.sizes = [site.size for site in self.sites]
        # (2, n_members, n_corrected_units): means, then standard deviations.
        self.moments = torch.stack(
            [
                torch.cat([torch.as_tensor(m[i], dtype=dtype) for m in moments], 1)
                for i in (0, 1)
            ]
        ).to(device)
        self.unit = torch.cat([torch.as_tensor(u) for u in units]).to(device)

    def targets(self, weights: torch.Tensor):
        """Target means and standard deviations of every site's units.

        Parameters
        ----------
        weights : torch.Tensor of shape (n_members, n_units)
            The gates' mixing weights (each column sums to 1), differentiably.

        Returns
        -------
        means, stds : tuple of torch.Tensor
            One tensor of shape ``(site.size,)`` per site.
        """
        mixing = weights.to(self.moments.dtype).index_select(1, self.unit)
        means, stds = (mixing * self.moments).sum(1)
        return means.split(self.sizes), stds.split(self.sizes)

    @contextmanager
    def applied(self, template: torch.nn.Module, weights: torch.Tensor):
        """Within the block, ``template``'s corrected layers renormalise their
        outputs with each batch's statistics to the targets of ``weights``."""
        means, stds = self.targets(weights)
        handles = [
            template.get_submodule(site.layer).register_forward_hook(
                partial(_renormalise, site.axis, mean, std)
            )
            for site, mean, std in zip(self.sites, means, stds, strict=True)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def fold(
        self,
        module: torch.nn.Module,
        state: dict,
        weights: torch.Tensor,
        X,
        device=None,
    ) -> dict:
        """``state`` with every site's units brought to their targets on ``X``.

        Layer after layer, in the order they run, the merged net's unit
        statistics are measured on ``X`` (with the layers before already
        corrected) and the correction is folded into the layer's weight and
        bias: ``w * s`` and ``(b - mean) * s + target_mean`` with ``s =
        target_std / sqrt(var + EPS)``.

        Parameters
        ----------
        module : torch.nn.Module
            The architecture; not modified.
        state : dict of str to torch.Tensor
            The merged state dict; not modified.
        weights : torch.Tensor of shape (n_members, n_units)
            The gates' mixing weights of the merge.
        X : array-like or torch.Tensor
            The fit data.
        device : torch.device, default=None
            Where to run; ``None`` takes the module's device.

        Returns
        -------
        state : dict of str to torch.Tensor
            A new dict; the corrected layers' weights and biases are new tensors.
        """
        means, stds = self.targets(weights)
        state = dict(state)
        for site, mean, std in zip(self.sites, means, stds, strict=True):
            [(now, spread)] = unit_moments(
                module, [state], [site.site], [site.size], X, device=device
            )
            weight, bias = f"{site.layer}.weight", f"{site.layer}.bias"
            dtype, device = state[weight].dtype, state[weight].device
            spread = torch.as_tensor(spread[0], dtype=dtype, device=device)
            current = torch.as_tensor(now[0], dtype=dtype, device=device)
            varies = spread > CONSTANT
            scale = torch.where(
                varies, std.to(dtype) / torch.where(varies, spread, 1), 1
            )
            shape = (-1,) + (1,) * (state[weight].dim() - 1)
            state[weight] = state[weight] * scale.view(shape)
            state[bias] = (state[bias] - current) * scale + mean.to(dtype)
        return state


def _renormalise(axis, mean, std, module, args, output):
    """Forward hook: ``output``'s units to ``mean`` and ``std``, by batch: batch
    norm in training mode, with the targets as its affine parameters."""
    if output.dim() == 1:  # a Linear layer run on one unbatched sample
        return output
    moved = output.movedim(axis, 1)
    if moved.numel() == moved.shape[1]:  # one observation per unit: no spread
        shape = (1, -1) + (1,) * (moved.dim() - 2)
        return (moved * 0 + mean.view(shape)).movedim(1, axis)
    renormalised = F.batch_norm(
        moved, None, None, weight=std, bias=mean, training=True, eps=EPS
    )
    return renormalised.movedim(1, axis)
