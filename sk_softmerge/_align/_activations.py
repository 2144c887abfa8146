"""Hidden activations of a network, measured on data.

Activation matching and the correction of merged units' statistics both need
what a network's hidden units compute on the fit data: the values entering or
leaving one layer, one column per unit. A :class:`Site` names such a place;
:func:`recorded` runs a module with one set of weights over data in batches and
yields those columns at every site. The module runs as a copy in evaluation
mode, with hooks that live only for the call: the members are never run or
changed.
"""

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .._core._evaluation import state_forward
from .._inputs import call, to_device

BATCH_SIZE = 512
"""Samples per forward pass when activations are measured."""


@dataclass(frozen=True)
class Site:
    """Where a group of hidden units can be observed: the input or the output
    of one submodule.

    Parameters
    ----------
    module : str
        Name of the submodule, as in ``named_modules``.
    where : {"input", "output"}
        Its first positional input, or its output.
    axis : int
        The axis of that tensor that holds the units.
    block : int
        Consecutive entries of the axis per unit: 1, or the number of spatial
        positions per channel once a convolution's output is flattened.
    """

    module: str
    where: str
    axis: int
    block: int = 1


def unit_columns(value: torch.Tensor, site: Site, n_units: int) -> torch.Tensor:
    """The values of ``n_units`` units observed at ``site``, one column per unit.

    Every other axis (samples, spatial positions, a unit's block) becomes rows.

    Parameters
    ----------
    value : torch.Tensor
        The tensor seen at the site.
    site : Site
        Where the units lie in it.
    n_units : int
        Number of units.

    Returns
    -------
    columns : torch.Tensor of shape (n_observations, n_units)

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._activations import Site, unit_columns
    >>> conv_output = torch.arange(12.0).reshape(1, 3, 4)  # 3 channels of 4
    >>> unit_columns(conv_output, Site("conv", "output", axis=1), 3)[:, 0]
    tensor([0., 1., 2., 3.])
    >>> flat = conv_output.reshape(1, 12)  # flattened: blocks of 4 per channel
    >>> unit_columns(flat, Site("fc", "input", axis=1, block=4), 3)[:, 0]
    tensor([0., 1., 2., 3.])
    """
    moved = value.movedim(site.axis, -1)
    if site.block > 1:
        moved = moved.unflatten(-1, (n_units, site.block)).movedim(-2, -1)
    return moved.reshape(-1, n_units)


class Recorder:
    """An evaluation-mode copy of a module that records values at sites.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture; copied, never run or changed.
    sites : sequence of Site
        Where to record.
    device : torch.device, default=None
        Where the copy runs; ``None`` keeps the module's device.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._activations import Recorder, Site
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> recorder = Recorder(net, [Site("0", "output", axis=1)])
    >>> (values,) = recorder(net.state_dict(), torch.ones(4, 2))
    >>> values.shape
    torch.Size([4, 3])
    """

    def __init__(self, module, sites: Sequence[Site], device=None):
        self.template = copy.deepcopy(module).eval().requires_grad_(False)
        placeholders = any(p.is_meta for p in self.template.parameters())
        if device is not None and not placeholders:
            self.template.to(device)
        # A merger's template holds placeholders for the merged weights: runs
        # replace every parameter, and the device is the one given.
        self._device = torch.device(device) if device is not None else None
        self.sites = list(sites)

    @contextmanager
    def _hooks(self, captured: dict):
        handles = []
        for site in dict.fromkeys(site.module for site in self.sites):
            layer = self.template.get_submodule(site)
            handles.append(
                layer.register_forward_pre_hook(
                    lambda _, args, site=site: captured.__setitem__(
                        (site, "input"), args[0]
                    )
                )
            )
            handles.append(
                layer.register_forward_hook(
                    lambda _, __, output, site=site: captured.__setitem__(
                        (site, "output"), output
                    )
                )
            )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        return next(self.template.parameters()).device

    def on_device(self, state_dict: dict) -> dict:
        """``state_dict`` with its tensors on the copy's device."""
        return {name: value.to(self.device) for name, value in state_dict.items()}

    @torch.no_grad()
    def __call__(self, state_dict, X: torch.Tensor) -> list[torch.Tensor]:
        """The values at every site for one batch ``X`` run with ``state_dict``
        (on the copy's device)."""
        captured: dict = {}
        with self._hooks(captured):
            call(state_forward(self.template, state_dict), X)
        return [captured[(site.module, site.where)] for site in self.sites]

    def batches(self, X, batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
        """``X`` (array or tensor) in batches on the copy's device."""
        for start in range(0, len(X), batch_size):
            yield to_device(X[start : start + batch_size], self.device)


def unit_moments(
    module: torch.nn.Module,
    states: Sequence[dict],
    sites: Sequence[Site],
    sizes: Sequence[int],
    X,
    *,
    device=None,
    batch_size: int = BATCH_SIZE,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mean and standard deviation of every unit at every site, per state.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture shared by the states; not modified.
    states : sequence of dict
        State dicts to measure, e.g. the members'.
    sites : sequence of Site
        Where the units lie.
    sizes : sequence of int
        Number of units at each site.
    X : array-like or torch.Tensor
        Inputs, passed in batches.
    device : torch.device, default=None
        Where to run; ``None`` runs on the module's device. One state at a time
        is copied there.
    batch_size : int, default=512
        Samples per forward pass.

    Returns
    -------
    moments : list of (ndarray, ndarray)
        Per site, the means and the standard deviations (population, float64),
        each of shape ``(len(states), n_units)``; non-finite values (a broken
        member's) are replaced by zero.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._activations import Site, unit_moments
    >>> net = torch.nn.Linear(2, 1)
    >>> state = {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.tensor([1.0])}
    >>> X = torch.tensor([[0.0, 5.0], [2.0, 5.0]])
    >>> [(mean, std)] = unit_moments(net, [state], [Site("", "output", 1)], [1], X)
    >>> mean, std
    (array([[2.]]), array([[1.]]))
    """
    recorder = Recorder(module, sites, device)
    n_states = len(states)
    sums = [np.zeros((n_states, size)) for size in sizes]
    squares = [np.zeros((n_states, size)) for size in sizes]
    counts = np.zeros(len(sites))
    for k, state in enumerate(states):
        state = recorder.on_device(state)
        for batch in recorder.batches(X, batch_size):
            values = recorder(state, batch)
            for s, (site, size, value) in enumerate(
                zip(sites, sizes, values, strict=True)
            ):
                columns = unit_columns(value, site, size).double()
                sums[s][k] += columns.sum(0).cpu().numpy()
                squares[s][k] += columns.square().sum(0).cpu().numpy()
                if k == 0:
                    counts[s] += columns.shape[0]
    moments = []
    for total, square, count in zip(sums, squares, counts, strict=True):
        mean, std = _mean_and_std(total, square, count)
        moments.append(
            (
                np.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0),
                np.nan_to_num(std, nan=0.0, posinf=0.0, neginf=0.0),
            )
        )
    return moments


def unit_correlations(
    module: torch.nn.Module,
    states: Sequence[dict],
    sites: Sequence[Site],
    sizes: Sequence[int],
    X,
    *,
    batch_size: int = BATCH_SIZE,
) -> list[dict[tuple[int, int], np.ndarray]]:
    """Correlation of every unit of every state with every unit of every other.

    One pass over ``X``: each batch runs every state.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture of the state dicts; not modified.
    states : sequence of dict
        State dicts, e.g. the members'.
    sites : sequence of Site
        Where the units lie.
    sizes : sequence of int
        Number of units at each site.
    X : array-like or torch.Tensor
        Inputs, passed in batches.
    batch_size : int, default=512
        Samples per forward pass.

    Returns
    -------
    correlations : list of dict
        Per site, for every pair ``(j, k)`` with ``j < k``, an ndarray of
        shape ``(n_units, n_units)`` whose entry ``[u, v]`` is the Pearson
        correlation, over the observations, of unit ``u`` of state ``j`` with
        unit ``v`` of state ``k``; zero where either unit is constant.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._activations import Site, unit_correlations
    >>> net = torch.nn.Linear(1, 2)
    >>> a = {"weight": torch.tensor([[1.0], [-1.0]]), "bias": torch.zeros(2)}
    >>> b = {"weight": torch.tensor([[-2.0], [3.0]]), "bias": torch.ones(2)}
    >>> X = torch.randn(50, 1)
    >>> [pairs] = unit_correlations(net, [a, b], [Site("", "output", 1)], [2], X)
    >>> pairs[0, 1].round(6)
    array([[-1.,  1.],
           [ 1., -1.]])
    """
    recorder = Recorder(module, sites)
    states = [recorder.on_device(state) for state in states]
    n_states = len(states)
    pairs = [(j, k) for j in range(n_states) for k in range(j + 1, n_states)]
    cross = [{pair: np.zeros((size, size)) for pair in pairs} for size in sizes]
    sums = [np.zeros((n_states, size)) for size in sizes]
    squares = [np.zeros((n_states, size)) for size in sizes]
    counts = np.zeros(len(sites))
    for batch in recorder.batches(X, batch_size):
        values = [recorder(state, batch) for state in states]
        for s, (site, size) in enumerate(zip(sites, sizes, strict=True)):
            columns = [unit_columns(v[s], site, size).double() for v in values]
            for j, k in pairs:
                cross[s][j, k] += (columns[j].T @ columns[k]).cpu().numpy()
            stacked = torch.stack([c.sum(0) for c in columns])
            sums[s] += stacked.cpu().numpy()
            squares[s] += (
                torch.stack([c.square().sum(0) for c in columns]).cpu().numpy()
            )
            counts[s] += columns[0].shape[0]
    correlations = []
    for products, total, square, count in zip(
        cross, sums, squares, counts, strict=True
    ):
        mean, std = _mean_and_std(total, square, count)
        site_correlations = {}
        for (j, k), product in products.items():
            covariance = product / count - np.outer(mean[j], mean[k])
            scale = np.outer(std[j], std[k])
            with np.errstate(invalid="ignore", divide="ignore"):
                correlation = np.where(scale > 0, covariance / scale, 0.0)
            site_correlations[j, k] = np.nan_to_num(
                correlation, nan=0.0, posinf=0.0, neginf=0.0
            )
        correlations.append(site_correlations)
    return correlations


def _mean_and_std(total, square, count):
    """Means and population standard deviations from sums and sums of squares
    over ``count`` observations (non-finite where the sums overflowed)."""
    with np.errstate(invalid="ignore", over="ignore"):
        mean = total / count
        return mean, np.sqrt(np.maximum(square / count - mean**2, 0.0))
