"""The learned soup by layer (Wortsman et al., 2022, appendix I).

One mixing logit per member and parameter tensor: each tensor of the soup is
the average of the members' values weighted by the softmax of its logits over
the members, which start equal (the uniform soup). The logits, and for
classifiers a temperature ``beta`` multiplying the soup's logits, are learned
by Adam on the task loss of the fit data, as the paper's code does (5 epochs,
learning rate 0.05, batches of 256). The soup runs through
:class:`~sk_softmerge._core._merger.SoftMerge` with one unit per tensor and
the softmax weights as its gates, so a step merges every tensor in one fused
operation.

Memory: the members' stacked weights (as :class:`SoftMerge` holds them), one
training step's activations and the fused merge's buffers; the soup's weights
are then averaged one parameter at a time.
"""

from dataclasses import dataclass

import torch

from .._inputs import call
from ._average import member_values, weighted_average
from ._merger import SoftMerge
from ._training import task_loss


@dataclass
class LearnedMixing:
    """What :func:`learn_soup` learned.

    Attributes
    ----------
    weights : torch.Tensor of shape (n_members, n_tensors)
        Softmax mixing weights of every member in every parameter tensor.
    tensor_names : list of str
        The parameter tensors, in the order of ``weights``' columns.
    temperature : float
        The learned ``beta`` (1.0 when not learned).
    loss_curve : list of float
        Mean training loss of every epoch, over its steps of finite loss
        (``nan`` when none was).
    """

    weights: torch.Tensor
    tensor_names: list[str]
    temperature: float
    loss_curve: list[float]


def learn_soup(
    modules,
    loss_fn,
    X,
    y,
    *,
    sample_weight: torch.Tensor | None = None,
    temperature: bool = True,
    max_epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> LearnedMixing:
    """Learn the mixing weights of a soup by layer on ``(X, y)``.

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        Members of one architecture; not changed.
    loss_fn : callable
        ``loss_fn(output, y)``, the members' mean task loss.
    X : torch.Tensor or InputDict
        Inputs, on the members' device.
    y : torch.Tensor
        Targets of ``X``.
    sample_weight : torch.Tensor of shape (n_samples,), default=None
        Weights (of mean 1) of the samples' losses; ``None`` weighs them
        equally.
    temperature : bool, default=True
        Whether the output is multiplied by a learned ``beta`` in the loss
        (for outputs that are logits).
    max_epochs : int, default=5
    lr : float, default=0.05
    batch_size : int, default=256
    generator : torch.Generator, default=None
        Draws the order of the samples in every epoch.

    Returns
    -------
    mixing : LearnedMixing

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._learned_soup import learn_soup
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> X = torch.randn(64, 2)
    >>> y = X[:, 0:1]
    >>> good, bad = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = good.weight.copy_(torch.tensor([[1.0, 0.0]])), good.bias.zero_()
    >>> loss = torch.nn.functional.mse_loss
    >>> mixing = learn_soup([good, bad], loss, X, y, temperature=False,
    ...                     max_epochs=40, batch_size=16)
    >>> bool((mixing.weights[0] > 0.8).all())
    True
    """
    merger = SoftMerge(modules, granularity="tensor")
    device = merger.theta.device
    logits = torch.zeros_like(merger.log_alpha, requires_grad=True)
    beta = torch.ones((), device=device, requires_grad=temperature)
    optimizer = torch.optim.Adam([logits, beta] if temperature else [logits], lr=lr)
    loss_curve = []
    for _ in range(max_epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        total, n_seen = torch.zeros((), device=device), 0
        for batch in order.split(batch_size):
            output = call(merger, X[batch], gates=torch.softmax(logits, dim=0))
            output = output * beta if temperature else output
            w = None if sample_weight is None else sample_weight[batch]
            loss = task_loss(loss_fn, output, y[batch], w)
            optimizer.zero_grad()
            loss.backward()
            # A step whose loss is not finite (a member holding NaN) is skipped.
            if bool(torch.isfinite(loss)):
                optimizer.step()
                total += loss.detach() * len(batch)
                n_seen += len(batch)
        loss_curve.append(float(total) / n_seen if n_seen else float("nan"))
    return LearnedMixing(
        weights=torch.softmax(logits.detach(), dim=0),
        tensor_names=merger.unit_names,
        temperature=float(beta.detach()),
        loss_curve=loss_curve,
    )


def soup_parameters(modules, mixing: LearnedMixing) -> dict[str, torch.Tensor]:
    """The soup's parameters (float64): each tensor the average of the
    members' values weighted by its column of ``mixing.weights``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._learned_soup import LearnedMixing, soup_parameters
    >>> a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = a.weight.fill_(0.0), b.weight.fill_(4.0)
    >>> mixing = LearnedMixing(torch.tensor([[0.75], [0.25]]), ["weight"], 1.0, [])
    >>> soup_parameters([a, b], mixing)["weight"]
    tensor([[1.]], dtype=torch.float64)
    """
    weights = mixing.weights.to(torch.float64)
    return {
        name: weighted_average(member_values(modules, name), weights[:, i])
        for i, name in enumerate(mixing.tensor_names)
    }
