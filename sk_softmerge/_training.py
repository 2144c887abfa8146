"""Learning the gates of a :class:`SoftMerge` by minibatch gradient descent."""

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ._gates import hard_concrete, logistic_noise
from ._merging import SoftMerge


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
    verbose: int = 0,
) -> list[float]:
    """Train the merger's log-alphas; nothing else changes.

    Each step draws every gate at once, forms every merged tensor with one
    reduction, runs one forward pass and updates the log-alphas with Adam. The
    objective is the mean task loss plus ``l0_weight`` times the mean expected
    L0 norm of the gates. Once per epoch, the data are shuffled with one gather,
    so that batches are views, and the gates' noise for every step is drawn in
    one call; the loss is read back from the device once per epoch.

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
    verbose : int, default=0
        Above zero, a progress bar shows epoch, loss and open gates.

    Returns
    -------
    loss_curve : list of float
        Mean objective per epoch.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import SoftMerge
    >>> from sk_softmerge._training import learn_gates
    >>> merger = SoftMerge([torch.nn.Linear(3, 2) for _ in range(3)])
    >>> X, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> curve = learn_gates(merger, torch.nn.functional.cross_entropy, X, y,
    ...                     max_epochs=2)
    >>> len(curve)
    2
    """
    log_alpha = merger.log_alpha
    optimizer = _adam(log_alpha, lr)
    n_samples = X.shape[0]
    n_batches = math.ceil(n_samples / batch_size)
    batch_sizes = torch.full((n_batches,), float(batch_size), device=X.device)
    batch_sizes[-1] = n_samples - (n_batches - 1) * batch_size
    loss_curve = []
    epochs = tqdm(
        range(max_epochs), desc="learning gates", unit="epoch", disable=verbose <= 0
    )
    for _ in epochs:
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
            (log_alpha.grad,) = torch.autograd.grad(loss, log_alpha)
            optimizer.step()
            losses[step] = loss.detach()
        loss_curve.append(float(losses @ batch_sizes) / n_samples)
        if verbose > 0:
            n_open = int((merger.gates() > 0).sum())
            epochs.set_postfix(
                loss=f"{loss_curve[-1]:.4f}",
                open_gates=f"{n_open}/{log_alpha.numel()}",
            )
    return loss_curve


def _adam(parameter: torch.nn.Parameter, lr: float) -> torch.optim.Adam:
    # The fused kernel updates the log-alphas in one call instead of about ten;
    # torch builds before 2.4 have it only for CUDA.
    try:
        return torch.optim.Adam([parameter], lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam([parameter], lr=lr)
