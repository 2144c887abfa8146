"""Batch-norm statistics of a merged network.

A merged network's weights are an average of its members'; the running mean
and variance that its batch-norm layers inherit belong to one member's weights,
not to the average, and averaging the members' statistics does not fix that.
The statistics are recomputed instead, from data passed through the merged
network itself.
"""

import copy

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .._inputs import call


def has_batchnorm(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a batch-norm layer that tracks running statistics.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._batchnorm import has_batchnorm
    >>> has_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2),
    ...                                   torch.nn.BatchNorm1d(2)))
    True
    """
    return any(_tracks_statistics(layer) for layer in module.modules())


def use_batch_statistics(module: torch.nn.Module) -> torch.nn.Module:
    """Put the batch-norm layers of ``module`` in training mode, in place.

    While gates learn, the merged weights change at every step and no stored
    statistics fit them; normalising with each batch's own statistics makes the
    objective that of the merged net whose statistics are recomputed after fit.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._batchnorm import use_batch_statistics
    >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Dropout()).eval()
    >>> [layer.training for layer in use_batch_statistics(net)]
    [True, False]
    """
    for layer in module.modules():
        if _tracks_statistics(layer):
            layer.train()
    return module


def _tracks_statistics(layer: torch.nn.Module) -> bool:
    return isinstance(layer, _BatchNorm) and layer.track_running_stats


def recompute_batchnorm_statistics(
    module: torch.nn.Module,
    X: torch.Tensor,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    batch_size: int = 512,
) -> torch.nn.Module:
    """A copy of ``module`` whose batch-norm statistics are those of ``X``.

    Every batch-norm layer's running statistics are reset, then ``X`` is passed
    through the copy in batches, without gradients, with the batch-norm layers
    in training mode and every other layer, dropout included, in evaluation
    mode. Each batch's statistics enter a cumulative average weighted by the
    batch's size, so the running mean of a layer whose inputs do not depend on
    other batch-norm layers is the exact mean of its inputs over ``X``; the
    running variance is the average of the batches' unbiased variances, exact
    when one batch holds all of ``X``.

    Parameters
    ----------
    module : torch.nn.Module
        The network; it is not modified.
    X : torch.Tensor
        Inputs, on the module's device.
    state_dict : dict of str to torch.Tensor, default=None
        Weights to load into the copy first; ``None`` keeps the module's.
    batch_size : int, default=512
        Samples per forward pass.

    Returns
    -------
    module : torch.nn.Module
        The copy, in evaluation mode, with each layer's momentum as it was.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import recompute_batchnorm_statistics
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    >>> X = torch.randn(100, 3)
    >>> fresh = recompute_batchnorm_statistics(net, X, batch_size=100)
    >>> torch.allclose(fresh[1].running_mean, net[0](X).mean(0))
    True
    >>> net[1].running_mean
    tensor([0., 0.])
    """
    module = copy.deepcopy(module)
    if state_dict is not None:
        if any(p.is_meta for p in module.parameters()):
            # Placeholders (a merger's template) take the given tensors; the
            # buffers, which batches update, are copies.
            buffers = {name for name, _ in module.named_buffers()}
            state_dict = {
                k: v.clone() if k in buffers else v for k, v in state_dict.items()
            }
            module.load_state_dict(state_dict, assign=True)
        else:
            module.load_state_dict(state_dict)
    layers = [layer for layer in module.modules() if _tracks_statistics(layer)]
    momenta = [layer.momentum for layer in layers]
    module.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.train()
    n_seen = 0
    with torch.no_grad():
        for batch in _batches(X, batch_size):
            n_seen += len(batch)
            for layer in layers:
                layer.momentum = len(batch) / n_seen
            call(module, batch)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return module.eval()


def _batches(X, batch_size: int) -> list:
    """``X`` in batches of ``batch_size``, a last batch of one sample joined to
    the one before (batch norm cannot take a single sample in training)."""
    batches = list(X.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [X[len(X) - len(batches[-2]) - 1 :]]
    return batches
