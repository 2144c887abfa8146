"""Scoring candidate merges on held-out data and choosing among them."""

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.func import functional_call

from .._inputs import call

SIGNIFICANCE = 2.0
"""Standard deviations by which a candidate must beat the merge to replace it."""

EVALUATION_BATCHES = 4
"""Evaluations during ``fit`` (no gradients) run this many training batches at
once: they hold about two layers' activations where a training step holds
every layer's and their gradients, so that they need no more memory than a
step, whatever the size of the held-out part."""


def weighted(
    errors: Callable[[Callable], np.ndarray | None], weights: np.ndarray | None
) -> Callable[[Callable], np.ndarray | None]:
    """``errors`` (per-sample errors of a forward function, or ``None``) times
    the samples' ``weights``; ``errors`` itself for ``weights=None``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._core._evaluation import weighted
    >>> errors = weighted(lambda forward: np.array([1.0, 0.0, 1.0]),
    ...                   np.array([0.5, 1.0, 1.5]))
    >>> errors(None)
    array([0.5, 0. , 1.5])
    """
    if weights is None:
        return errors

    def weighted_errors(forward):
        found = errors(forward)
        return None if found is None else found * weights

    return weighted_errors


@torch.no_grad()
def correct_predictions(
    forward: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    nonlinearity: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1024,
    threshold: float | None = None,
) -> np.ndarray | None:
    """Which samples a model, given as a forward function, classifies correctly.

    The predicted class is the one of highest probability or, given a
    ``threshold``, class 1 where its probability exceeds the threshold and
    class 0 elsewhere, as a :class:`skorch.NeuralNetBinaryClassifier` predicts.

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
    threshold : float, default=None
        For two classes: predict class 1 where its probability is above
        ``threshold``. ``None`` predicts the class of highest probability.

    Returns
    -------
    correct : ndarray of shape (n_samples,), dtype bool, or None
        ``None`` when some probability is not finite: such a model does not
        predict.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._evaluation import correct_predictions
    >>> X, y = torch.eye(3), torch.tensor([0, 1, 1])
    >>> correct_predictions(lambda x: x, X, y, lambda out: out.softmax(-1))
    array([ True,  True, False])
    >>> proba = torch.tensor([[0.4, 0.6], [0.05, 0.95], [0.2, 0.8]])
    >>> y = torch.tensor([1, 1, 0])
    >>> correct_predictions(lambda x: x, proba, y, lambda out: out)
    array([ True,  True, False])
    >>> correct_predictions(lambda x: x, proba, y, lambda out: out, threshold=0.9)
    array([False,  True,  True])
    """
    correct, finite = [], torch.ones((), device=X.device, dtype=torch.bool)
    for batch in torch.arange(X.shape[0], device=X.device).split(batch_size):
        proba = nonlinearity(call(forward, X[batch]))
        finite &= torch.isfinite(proba).all()
        if threshold is None:
            predicted = proba.argmax(-1)
        else:
            predicted = (proba[:, 1] > threshold).long()
        correct.append(predicted == y[batch])
    return torch.cat(correct).cpu().numpy() if finite.item() else None


def member_forward(
    template: torch.nn.Module, module: torch.nn.Module, device=None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Forward function of ``module``'s weights and buffers run in ``template``.

    The member itself is never run: running a skorch net's module through
    skorch switches it to eval mode, and the user's nets must not change.

    Parameters
    ----------
    template : torch.nn.Module
        A module of the same architecture, in the mode to evaluate in.
    module : torch.nn.Module
        The member whose state is used; its tensors are copied to ``device``.
    device : torch.device, default=None
        Where to run; ``None`` takes the template's device (give it for a
        template whose parameters are placeholders).

    Returns
    -------
    forward : callable

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._evaluation import member_forward
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> x = torch.ones(1, 2)
    >>> torch.equal(member_forward(a, b)(x), b(x))
    True
    """
    device = device if device is not None else next(template.parameters()).device
    # Copies: a template in training mode updates batch-norm buffers in place,
    # and the member's own must not change.
    state = {
        k: v.detach().to(device, copy=True) for k, v in module.state_dict().items()
    }
    return state_forward(template, state)


def state_forward(
    template: torch.nn.Module, state: dict[str, torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """Forward function of the weights and buffers ``state`` run in
    ``template`` (:func:`torch.func.functional_call`); it takes the module's
    positional and keyword inputs.

    Parameters
    ----------
    template : torch.nn.Module
        A module of the architecture, in the mode to evaluate in.
    state : dict of str to torch.Tensor
        A state dict of that architecture, on the template's device; buffers
        that a template in training mode updates are updated in it.

    Returns
    -------
    forward : callable

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._evaluation import state_forward
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> x = torch.ones(1, 2)
    >>> torch.equal(state_forward(a, b.state_dict())(x), b(x))
    True
    """

    def forward(*args, **kwargs):
        return functional_call(template, state, args, kwargs)

    return forward


@torch.no_grad()
def scaled_squared_errors(
    forward: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    nonlinearity: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1024,
    variance: torch.Tensor | None = None,
) -> np.ndarray | None:
    """Per-sample squared errors of a regression model, scaled to give R^2.

    Each output's squared error is divided by the variance of that output's
    targets in ``y``, and the result is averaged over outputs, so that one
    minus the mean over samples is the coefficient of determination R^2
    (averaged uniformly over outputs, as :func:`sklearn.metrics.r2_score`
    does). An output whose targets are constant is not scaled.

    Parameters
    ----------
    forward : callable
        Maps a batch of inputs to the module's output.
    X : torch.Tensor of shape (n_samples, ...)
        Inputs, on the model's device.
    y : torch.Tensor of shape (n_samples, n_outputs)
        Targets, on the model's device.
    nonlinearity : callable
        Turns the module's output into predictions.
    batch_size : int, default=1024
        Samples per forward pass.
    variance : torch.Tensor of shape (n_outputs,), default=None
        The variance of every output's targets to divide by; ``None`` takes
        that of ``y`` (give it to score parts of a data set alike).

    Returns
    -------
    errors : ndarray of shape (n_samples,), or None
        ``None`` when some prediction is not finite.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._evaluation import scaled_squared_errors
    >>> X = torch.tensor([[1.0], [2.0], [3.0]])
    >>> y = torch.tensor([[1.0], [2.0], [4.0]])
    >>> errors = scaled_squared_errors(lambda x: x, X, y, lambda out: out)
    >>> errors.round(4)
    array([0.    , 0.    , 0.6429])
    >>> float(1 - errors.mean())   # R^2, as sklearn.metrics.r2_score gives
    0.7857...
    """
    if variance is None:
        variance = y.to(torch.float64).var(dim=0, unbiased=False)
    variance = variance.to(y.device)
    scale = torch.where(variance > 0, variance, torch.ones_like(variance))
    errors, finite = [], torch.ones((), device=X.device, dtype=torch.bool)
    for batch in torch.arange(X.shape[0], device=X.device).split(batch_size):
        predicted = nonlinearity(call(forward, X[batch])).reshape(y[batch].shape)
        finite &= torch.isfinite(predicted).all()
        squared = (predicted.to(torch.float64) - y[batch]) ** 2
        errors.append((squared / scale).mean(dim=-1))
    return torch.cat(errors).cpu().numpy() if finite.item() else None


def choose_lowest_loss(losses: dict[str, np.ndarray | None], default: str) -> str:
    """Keep ``default`` unless another candidate has a significantly lower loss.

    On the same samples, with ``d`` the per-sample loss of ``default`` minus
    that of a candidate, the candidate beats ``default`` when ``sum(d)``
    exceeds ``SIGNIFICANCE`` times ``sqrt(sum(d ** 2))``: a one-sided paired
    test of the differences, whose statistic is approximately standard normal
    when the differences are symmetric about zero. For 0/1 losses
    (misclassifications) it is the one-sided McNemar test. A ``default``
    without losses (it does not predict) loses to the candidate with the lowest
    mean loss.

    Parameters
    ----------
    losses : dict of str to ndarray or None
        Per-sample loss of every candidate, on the same samples (``None``: no
        prediction).
    default : str
        The candidate to keep unless beaten.

    Returns
    -------
    name : str
        The chosen candidate: the one that beats ``default`` by the largest
        total loss difference, or ``default``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._core._evaluation import choose_lowest_loss
    >>> rng = np.random.default_rng(0)
    >>> merge = rng.exponential(1.0, 200)
    >>> noisy = merge + rng.normal(0, 1, 200)           # no better on average
    >>> halved = merge / 2                              # clearly better
    >>> choose_lowest_loss({"merge": merge, "a": noisy}, "merge")
    'merge'
    >>> choose_lowest_loss({"merge": merge, "a": noisy, "b": halved}, "merge")
    'b'
    """
    base = losses[default]
    if base is None:
        usable = {k: v.mean() for k, v in losses.items() if v is not None}
        return min(usable, key=usable.get) if usable else default
    base = base.astype(np.float64)
    chosen, widest = default, 0.0
    for name, other in losses.items():
        if other is None or name == default:
            continue
        difference = base - other.astype(np.float64)
        margin = float(difference.sum())
        spread = math.sqrt(float(difference @ difference))
        if margin > SIGNIFICANCE * spread and margin > widest:
            chosen, widest = name, margin
    return chosen
