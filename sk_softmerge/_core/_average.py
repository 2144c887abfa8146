"""Weighted averages of members' parameters, for the data-aware baselines.

RegMean, Fisher merging and the learned soup each end in a weighted average of
the members' values of every parameter (RegMean only for the layers it does
not solve for). It is computed here in float64 as the plain average plus the
weighted average of the members' differences from it, so that members that
agree on a value give exactly that value, whatever their weights. It is
accumulated one member at a time: a parameter's average costs a few float64
copies of that parameter, never a stack of every member's.
"""

from collections.abc import Iterable, Sequence

import torch

from ._merger import tied_aliases


def member_values(modules, name: str) -> list[torch.Tensor]:
    """Every member's value of the parameter ``name``, detached (no copies).

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._average import member_values
    >>> [v.shape for v in member_values([torch.nn.Linear(3, 2)] * 2, "weight")]
    [torch.Size([2, 3]), torch.Size([2, 3])]
    """
    return [module.get_parameter(name).detach() for module in modules]


def weighted_average(
    values: Sequence[torch.Tensor], weights: Iterable[torch.Tensor] | None = None
) -> torch.Tensor:
    """``sum_k w_k theta_k / sum_k w_k`` over the members' ``values``, computed
    as ``mean + sum_k w_k (theta_k - mean) / sum_k w_k`` in float64.

    Parameters
    ----------
    values : sequence of torch.Tensor
        Each member's value, of one shape, on one device.
    weights : iterable of torch.Tensor, default=None
        Each member's non-negative weights, broadcastable to a value, read
        once, one member at a time; where they sum to zero, the plain
        average. ``None`` gives the plain average.

    Returns
    -------
    average : torch.Tensor
        Of the values' shape, float64.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._average import weighted_average
    >>> values = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])]
    >>> weighted_average(values, [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])])
    tensor([1.5000, 2.0000], dtype=torch.float64)
    >>> weighted_average(values)
    tensor([2., 2.], dtype=torch.float64)
    """
    mean = torch.zeros_like(values[0], dtype=torch.float64)
    for value in values:
        mean += value
    mean /= len(values)
    if weights is None:
        return mean
    shift, total = torch.zeros_like(mean), torch.zeros_like(mean)
    for value, weight in zip(values, weights, strict=True):
        weight = weight.to(mean)
        shift += weight * (value.to(mean) - mean)
        total += weight
    return mean + shift / torch.where(total > 0, total, 1.0)


def merged_state(modules, parameters: dict[str, torch.Tensor]) -> dict:
    """The first member's state dict with ``parameters`` (float64 tensors)
    put in, each cast to the dtype of the value it replaces, under every name
    of a tied parameter.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._average import merged_state
    >>> state = merged_state([torch.nn.Linear(1, 1)], {"bias": torch.ones(1)})
    >>> state["bias"]
    tensor([1.])
    """
    state = {k: v.detach().clone() for k, v in modules[0].state_dict().items()}
    for name, value in parameters.items():
        state[name] = value.to(state[name].dtype)
    for alias, name in tied_aliases(modules[0], list(parameters)):
        state[alias] = state[name]
    return state
