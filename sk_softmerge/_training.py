"""Learning the gates of a :class:`SoftMerge` by minibatch gradient descent."""

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

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
    L0 norm of the gates. The loss is read back from the device once per epoch.

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
    optimizer = torch.optim.Adam([merger.log_alpha], lr=lr)
    n_samples = X.shape[0]
    loss_curve = []
    epochs = tqdm(
        range(max_epochs), desc="learning gates", unit="epoch", disable=verbose <= 0
    )
    for _ in epochs:
        order = torch.randperm(n_samples, generator=generator, device=X.device)
        total = torch.zeros((), device=X.device)
        for batch in order.split(batch_size):
            output = merger(X[batch], gates=merger.sample_gates(generator))
            loss = loss_fn(output, y[batch]) + l0_weight * merger.penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # A sampled merge that overflows (a malicious member's gate drawn
            # open) gives no usable gradient; skip its step without a sync.
            torch.nan_to_num_(merger.log_alpha.grad, nan=0.0, posinf=0.0, neginf=0.0)
            optimizer.step()
            total += (
                torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0) * batch.shape[0]
            )
        loss_curve.append(total.item() / n_samples)
        if verbose > 0:
            n_open = int((merger.gates() > 0).sum())
            epochs.set_postfix(
                loss=f"{loss_curve[-1]:.4f}",
                open_gates=f"{n_open}/{merger.log_alpha.numel()}",
            )
    return loss_curve
