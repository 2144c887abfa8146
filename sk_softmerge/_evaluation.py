"""Scoring candidate merges on held-out data and choosing among them."""

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch.func import functional_call

SIGNIFICANCE = 2.0
"""Standard deviations by which a candidate must beat the merge to replace it."""


@torch.no_grad()
def correct_predictions(
    forward: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    nonlinearity: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1024,
) -> np.ndarray | None:
    """Which samples a model, given as a forward function, classifies correctly.

    Parameters
    ----------
    forward : callable
        Maps a batch of inputs to the module's output.
    X : torch.Tensor of shape (n_samples, ...)
        Inputs, on the model's device.
    y : torch.Tensor of shape (n_samples,)
        Class indices, on the model's device.
    nonlinearity : callable
        Turns the module's output into class probabilities.
    batch_size : int, default=1024
        Samples per forward pass.

    Returns
    -------
    correct : ndarray of shape (n_samples,), dtype bool, or None
        ``None`` when some probability is not finite: such a model does not
        predict.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._evaluation import correct_predictions
    >>> X, y = torch.eye(3), torch.tensor([0, 1, 1])
    >>> correct_predictions(lambda x: x, X, y, lambda out: out.softmax(-1))
    array([ True,  True, False])
    """
    correct, finite = [], torch.ones((), device=X.device, dtype=torch.bool)
    for batch in torch.arange(X.shape[0], device=X.device).split(batch_size):
        proba = nonlinearity(forward(X[batch]))
        finite &= torch.isfinite(proba).all()
        correct.append(proba.argmax(-1) == y[batch])
    return torch.cat(correct).cpu().numpy() if finite.item() else None


def member_forward(
    template: torch.nn.Module, module: torch.nn.Module
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Forward function of ``module``'s weights and buffers run in ``template``.

    The member itself is never run: running a skorch net's module through
    skorch switches it to eval mode, and the user's nets must not change.

    Parameters
    ----------
    template : torch.nn.Module
        A module of the same architecture, in the mode to evaluate in.
    module : torch.nn.Module
        The member whose state is used; its tensors are copied to the
        template's device.

    Returns
    -------
    forward : callable

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._evaluation import member_forward
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> x = torch.ones(1, 2)
    >>> torch.equal(member_forward(a, b)(x), b(x))
    True
    """
    device = next(template.parameters()).device
    # Copies: a template in training mode updates batch-norm buffers in place,
    # and the member's own must not change.
    state = {
        k: v.detach().to(device, copy=True) for k, v in module.state_dict().items()
    }
    return partial(functional_call, template, state)


def choose(correct: dict[str, np.ndarray | None], default: str) -> str:
    """Keep ``default`` unless another candidate is significantly more accurate.

    On the same samples, a candidate beats ``default`` when the samples only it
    gets right outnumber those only ``default`` gets right by more than
    ``SIGNIFICANCE`` standard deviations of that difference under equal
    accuracy (a one-sided McNemar test), so that the noise of a small
    validation set, searched over several candidates, does not trade a merge
    for a member that is no better. A ``default`` that does not predict loses to
    the most accurate candidate that does.

    Parameters
    ----------
    correct : dict of str to ndarray of bool or None
        Per-sample correctness of every candidate (``None``: no prediction).
    default : str
        The candidate to keep unless beaten.

    Returns
    -------
    name : str
        The chosen candidate: the one that beats ``default`` by the widest
        margin, or ``default``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._evaluation import choose
    >>> merge = np.arange(100) < 80                     # 80% right
    >>> slightly = (np.arange(100) >= 10) & (np.arange(100) < 92)  # 82%, mostly
    >>> clearly = np.arange(100) < 95                   # 95%, 15 more right
    >>> choose({"merge": merge, "a": slightly}, "merge")
    'merge'
    >>> choose({"merge": merge, "a": slightly, "b": clearly}, "merge")
    'b'
    """
    base = correct[default]
    if base is None:
        usable = {k: v.mean() for k, v in correct.items() if v is not None}
        return max(usable, key=usable.get) if usable else default
    chosen, widest = default, 0
    for name, other in correct.items():
        if other is None or name == default:
            continue
        wins = int(np.sum(other & ~base))
        losses = int(np.sum(base & ~other))
        margin = wins - losses
        if margin > SIGNIFICANCE * math.sqrt(wins + losses) and margin > widest:
            chosen, widest = name, margin
    return chosen
