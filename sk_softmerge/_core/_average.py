"""Weighted averages of members' parameters, for the data-aware baselines.

RegMean, Fisher merging and the learned soup each end in a weighted average of
the members' values of every parameter (RegMean only for the layers it does
not solve for). It is computed here in float64 as the plain average plus the
weighted average of the members' differences from it, so that members that
agree on a value give exactly that value, whatever their weights.
"""

import torch


def stack_parameters(modules, names) -> dict[str, torch.Tensor]:
    """Every member's value of each parameter in ``names``, stacked on a first
    axis of length ``len(modules)``, in float64 on the first member's device.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._average import stack_parameters
    >>> stack = stack_parameters([torch.nn.Linear(3, 2)] * 4, ["weight"])
    >>> stack["weight"].shape, stack["weight"].dtype
    (torch.Size([4, 2, 3]), torch.float64)
    """
    device = next(modules[0].parameters()).device
    return {
        name: torch.stack(
            [m.get_parameter(name).detach().to(device, torch.float64) for m in modules]
        )
        for name in names
    }


def weighted_average(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k theta_k / sum_k w_k`` over the first axis of ``stack``,
    computed as ``mean + sum_k w_k (theta_k - mean) / sum_k w_k``.

    Parameters
    ----------
    stack : torch.Tensor of shape (n_members, ...)
        The members' values, float64.
    weights : torch.Tensor
        Non-negative weights, broadcastable to ``stack``; where they sum to
        zero over the members, the plain average.

    Returns
    -------
    average : torch.Tensor of shape stack.shape[1:]

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._average import weighted_average
    >>> stack = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)
    >>> weighted_average(stack, torch.tensor([[3.0, 0.0], [1.0, 0.0]]))
    tensor([1.5000, 2.0000], dtype=torch.float64)
    """
    mean = stack.mean(0)
    weights = torch.broadcast_to(weights.to(stack), stack.shape)
    total = weights.sum(0)
    shift = (weights * (stack - mean)).sum(0) / torch.where(total > 0, total, 1.0)
    return mean + shift


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
    tensors = modules[0].state_dict(keep_vars=True)
    state = {k: v.detach().clone() for k, v in tensors.items()}
    for name, value in parameters.items():
        parameter = modules[0].get_parameter(name)
        for key in [k for k, v in tensors.items() if v is parameter]:  # tied names
            state[key] = value.to(parameter.dtype)
    return state
