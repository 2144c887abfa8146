"""Learning the gates of a :class:`SoftMerge` by minibatch gradient descent."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ._gates import hard_concrete, logistic_noise
from ._merging import SoftMerge


@dataclass
class GateTraining:
    """What :func:`learn_gates` measured.

    Attributes
    ----------
    loss_curve : list of float
        Mean training objective per epoch.
    validation_loss_curve : list of float
        Task loss of the deterministic merge on the validation data, before
        training (first entry) and after every epoch; empty without validation.
    best_epoch : int
        Epoch whose gates were kept (0: the initial gates).
    """

    loss_curve: list[float] = field(default_factory=list)
    validation_loss_curve: list[float] = field(default_factory=list)
    best_epoch: int = 0


def learn_gates(
    merger: SoftMerge,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    l0_weight: float = 1e-2,
    max_epochs: int = 20,
    lr: float = 5e-2,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    verbose: int = 0,
) -> GateTraining:
    """Train the merger's log-alphas; nothing else changes.

    Each step draws every gate at once, forms every merged tensor with one
    reduction, runs one forward pass and updates the log-alphas with Adam. The
    objective is the mean task loss plus ``l0_weight`` times the mean expected
    L0 norm of the gates. Once per epoch, the data are shuffled with one gather,
    so that batches are views, and the gates' noise for every step is drawn in
    one call; the loss is read back from the device once per epoch.

    With ``validation`` data, the task loss of the deterministic merge on it is
    measured before training and after every epoch, and the log-alphas of the
    best epoch are restored at the end (early stopping without stopping): gates
    that only fit the training data, which the members have seen, are dropped.

    Parameters
    ----------
    merger : SoftMerge
        The merger to train, on the same device as ``X`` and ``y``.
    loss_fn : callable
        ``loss_fn(output, y_batch)`` returning the mean task loss.
    X, y : torch.Tensor
        Training inputs and targets, on the merger's device.
    l0_weight : float, default=1e-2
        Weight of the mean expected L0 penalty.
    max_epochs : int, default=20
        Number of passes over the data.
    lr : float, default=5e-2
        Adam learning rate on the log-alphas.
    batch_size : int, default=128
        Samples per step.
    generator : torch.Generator, default=None
        Source of shuffling and gate noise, on the merger's device.
    validation : tuple of torch.Tensor, default=None
        Held-out ``(X, y)`` on the merger's device, to keep the best epoch.
    verbose : int, default=0
        Above zero, a progress bar shows epoch, loss and open gates.

    Returns
    -------
    result : GateTraining
        Loss curves and the epoch kept.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import SoftMerge
    >>> from sk_softmerge._training import learn_gates
    >>> merger = SoftMerge([torch.nn.Linear(3, 2) for _ in range(3)])
    >>> X, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> result = learn_gates(merger, torch.nn.functional.cross_entropy, X, y,
    ...                      max_epochs=2)
    >>> len(result.loss_curve)
    2
    """
    log_alpha = merger.log_alpha
    optimizer = _adam(log_alpha, lr)
    n_samples = X.shape[0]
    n_batches = math.ceil(n_samples / batch_size)
    batch_sizes = torch.full((n_batches,), float(batch_size), device=X.device)
    batch_sizes[-1] = n_samples - (n_batches - 1) * batch_size
    result = GateTraining()
    if validation is not None:
        best_log_alpha = log_alpha.detach().clone()
        result.validation_loss_curve.append(_task_loss(merger, loss_fn, *validation))
    epochs = tqdm(
        range(max_epochs), desc="learning gates", unit="epoch", disable=verbose <= 0
    )
    for epoch in epochs:
        order = torch.randperm(n_samples, generator=generator, device=X.device)
        noise = logistic_noise(
            (n_batches, *log_alpha.shape),
            generator,
            device=log_alpha.device,
            dtype=log_alpha.dtype,
        )
        losses = torch.empty(n_batches, device=X.device)
        batches = zip(
            X[order].split(batch_size), y[order].split(batch_size), strict=True
        )
        for step, (X_batch, y_batch) in enumerate(batches):
            output = merger(X_batch, gates=hard_concrete(log_alpha, noise[step]))
            loss = loss_fn(output, y_batch)
            if l0_weight:
                loss = loss + l0_weight * merger.penalty()
            # autograd.grad spares zero_grad and the accumulation into .grad.
            (grad,) = torch.autograd.grad(loss, log_alpha)
            # A sampled merge that overflows (a malicious member's gate drawn
            # open) gives no usable gradient; skip its step without a sync.
            log_alpha.grad = torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
            optimizer.step()
            losses[step] = loss.detach()
        losses = torch.nan_to_num_(losses, nan=0.0, posinf=0.0)
        result.loss_curve.append(float(losses @ batch_sizes) / n_samples)
        postfix = {"loss": f"{result.loss_curve[-1]:.4f}"}
        if validation is not None:
            result.validation_loss_curve.append(
                _task_loss(merger, loss_fn, *validation)
            )
            if result.validation_loss_curve[-1] < min(
                result.validation_loss_curve[:-1]
            ):
                best_log_alpha.copy_(log_alpha.detach())
                result.best_epoch = epoch + 1
            postfix["val_loss"] = f"{result.validation_loss_curve[-1]:.4f}"
        if verbose > 0:
            n_open = int((merger.gates() > 0).sum())
            postfix["open_gates"] = f"{n_open}/{log_alpha.numel()}"
            epochs.set_postfix(postfix)
    if validation is None:
        result.best_epoch = len(result.loss_curve)
    else:
        with torch.no_grad():
            log_alpha.copy_(best_log_alpha)
    return result


@torch.no_grad()
def _task_loss(merger, loss_fn, X, y, batch_size=1024):
    """Mean task loss of the deterministic merge; inf when it is not finite."""
    gates = merger.gates()
    total = torch.zeros((), device=X.device)
    for batch in torch.arange(X.shape[0], device=X.device).split(batch_size):
        total += loss_fn(merger(X[batch], gates=gates), y[batch]) * batch.shape[0]
    loss = total.item() / X.shape[0]
    return loss if math.isfinite(loss) else math.inf


def _adam(parameter: torch.nn.Parameter, lr: float) -> torch.optim.Adam:
    # The fused kernel updates the log-alphas in one call instead of about ten;
    # torch builds before 2.4 have it only for CUDA.
    try:
        return torch.optim.Adam([parameter], lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam([parameter], lr=lr)
