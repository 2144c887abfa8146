"""Learning the gates of a :class:`SoftMerge` by minibatch gradient descent."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .._inputs import call, is_dict
from ._adam import Adam
from ._evaluation import EVALUATION_BATCHES, choose_lowest_loss
from ._gates import deterministic_z, expected_l0_with_slope, logistic_noise
from ._merger import SoftMerge


@dataclass
class GateTraining:
    """What :func:`learn_gates` measured.

    Attributes
    ----------
    loss_curve : list of float
        Mean training objective per epoch, over the steps that were not
        skipped, weighted by their batch sizes; ``nan`` for an epoch whose
        every step was skipped.
    validation_loss_curve : list of float
        Task loss of the deterministic merge on the validation data, before
        training (first entry) and after every epoch; empty without validation.
    best_epoch : int
        Epoch whose gates were kept (0: the initial gates, also when no epoch
        was significantly better on the validation data).
    n_skipped_steps : int
        Steps skipped because their loss or gradient was not finite: they
        changed neither the log-alphas nor Adam's moments and step count.
    """

    loss_curve: list[float] = field(default_factory=list)
    validation_loss_curve: list[float] = field(default_factory=list)
    best_epoch: int = 0
    n_skipped_steps: int = 0


STEP_CHUNK_ELEMENTS = 2**14
"""Shuffled samples, or gate noise, prepared at once during an epoch: a few
steps' worth, not the epoch's, so that neither doubles the memory of a large
data set or of many gates."""


def learn_gates(
    merger: SoftMerge,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    l0_weight: float = 0.0,
    max_epochs: int = 12,
    lr: float = 0.2,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    validation: tuple | None = None,
    n_iter_no_change: int | None = None,
    sample_weight: torch.Tensor | None = None,
    samples: torch.Tensor | None = None,
    after_epoch: Callable[[int], None] | None = None,
    verbose: int = 0,
) -> GateTraining:
    """Train the merger's log-alphas; nothing else changes.

    Each step draws every gate at once, forms every merged tensor with one
    reduction, runs one forward pass and updates the log-alphas with Adam. The
    objective is the mean task loss plus ``l0_weight`` times the mean expected
    L0 norm of the gates. The data are shuffled, and the gates' noise drawn,
    a few steps at a time (``STEP_CHUNK_ELEMENTS``) with one gather and one
    draw, so that batches are views and neither the data nor the noise is
    copied whole; the loss is read back from the device once per epoch.

    A step whose loss or gradient is not finite (a sampled merge that
    overflows, such as a malicious member's gate drawn open) is skipped: Adam
    leaves the log-alphas, its moments and its step count as they were,
    without a host-device synchronisation per step (see :class:`Adam`).
    Skipped steps are counted, and left out of the epoch's mean loss.

    With ``validation`` data, the task loss of the deterministic merge on it is
    measured before training and after every epoch, and the log-alphas of the
    best epoch are restored at the end (early stopping without stopping): gates
    that only fit the training data, which the members have seen, are dropped.
    The best epoch is kept only if its per-sample validation losses are
    significantly lower than those of the start (a one-sided paired test at
    ``SIGNIFICANCE`` standard deviations); otherwise the start is restored.
    Training stops early once ``n_iter_no_change`` epochs in a row brought no
    new lowest validation loss.

    Parameters
    ----------
    merger : SoftMerge
        The merger to train, on the same device as ``X`` and ``y``.
    loss_fn : callable
        ``loss_fn(output, y_batch)`` returning the mean task loss.
    X, y : torch.Tensor
        Training inputs and targets, on the merger's device.
    l0_weight : float, default=0.0
        Weight of the mean expected L0 penalty.
    max_epochs : int, default=12
        Number of passes over the data.
    lr : float, default=0.2
        Adam learning rate on the log-alphas.
    batch_size : int, default=128
        Samples per step.
    generator : torch.Generator, default=None
        Source of shuffling and gate noise, on the merger's device.
    validation : tuple of torch.Tensor, default=None
        Held-out ``(X, y)`` or ``(X, y, sample_weight)`` on the merger's device,
        to keep the best epoch; evaluated ``EVALUATION_BATCHES`` batches at a
        time.
    n_iter_no_change : int, default=None
        With ``validation``, stop after this many epochs without a new lowest
        validation loss; ``None`` runs every epoch.
    sample_weight : torch.Tensor of shape (n_samples,), default=None
        Weight of every sample of ``X`` in the task loss, which is then the
        mean over a batch of each sample's loss times its weight (weights of
        mean 1 keep the loss's scale); ``None`` weighs samples equally.
    samples : torch.Tensor of int, default=None
        Positions of the samples of ``X`` (and ``y``, ``sample_weight``) to
        learn on, gathered a few steps at a time rather than copied (a fold of
        cross-fitting); ``None`` learns on all.
    after_epoch : callable, default=None
        ``after_epoch(epoch)``, called after every epoch (``epoch`` counts
        from 1) with the merger holding that epoch's log-alphas: cross-fitting
        scores every epoch's gates on the samples left out of ``X``.
    verbose : int, default=0
        Above zero, a progress bar shows epoch, loss and open gates.

    Returns
    -------
    result : GateTraining
        Loss curves, the epoch kept and the number of skipped steps.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import SoftMerge
    >>> from sk_softmerge._core._training import learn_gates
    >>> merger = SoftMerge([torch.nn.Linear(3, 2) for _ in range(3)])
    >>> X, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> result = learn_gates(merger, torch.nn.functional.cross_entropy, X, y,
    ...                      max_epochs=2)
    >>> len(result.loss_curve)
    2
    """
    log_alpha = merger.log_alpha
    n_samples = X.shape[0] if samples is None else samples.shape[0]
    held_out = None
    if validation is not None:
        held_out = _HeldOut(merger, loss_fn, validation, batch_size, n_iter_no_change)
    step = _Step(merger, loss_fn, Adam(log_alpha, lr), l0_weight)
    batch_sizes = _batch_sizes(n_samples, batch_size, X.device)
    chunk = _steps_per_chunk(X, batch_size, log_alpha.numel()) * batch_size
    data, result = (X, y, sample_weight, samples), GateTraining()
    epochs = range(1, max_epochs + 1)
    epochs = tqdm(epochs, "learning gates", unit="epoch", disable=verbose <= 0)
    for epoch in epochs:
        batches = _shuffled_batches(data, log_alpha, batch_size, chunk, generator)
        mean_loss, n_skipped = step.epoch(batches, batch_sizes)
        result.loss_curve.append(mean_loss)
        result.n_skipped_steps += n_skipped
        if after_epoch is not None:
            after_epoch(epoch)
        if held_out is not None:
            held_out.record(epoch)
        if verbose > 0:
            epochs.set_postfix(_progress(merger, mean_loss, held_out))
        if held_out is not None and held_out.patience_spent(epoch):
            break
    result.best_epoch = len(result.loss_curve)
    if held_out is not None:
        result.best_epoch = held_out.keep_best()
        result.validation_loss_curve = held_out.curve
    return result


class _Step:
    """One gradient step of the gates, and an epoch of them.

    A step draws every gate at once (the noise comes with the batch), forms
    the merged tensors, runs one forward pass, adds the L0 penalty's gradient
    in closed form and updates the log-alphas with Adam, skipping a step whose
    loss or gradient is not finite without reading anything back.
    """

    def __init__(self, merger, loss_fn, optimizer, l0_weight):
        self.merger, self.loss_fn, self.optimizer = merger, loss_fn, optimizer
        self.l0_weight = l0_weight
        # The penalty's gradient, l0_weight * mean(l0)', is added in closed form.
        self.penalty_scale = l0_weight / merger.log_alpha.numel()

    def epoch(self, batches, batch_sizes) -> tuple[float, int]:
        """Run a step on each ``(X, y, w, noise)`` of ``batches``; returns the
        epoch's mean objective and the number of skipped steps."""
        losses, penalties, skipped = [], [], []
        for batch in batches:
            loss, penalty, skip = self(*batch)
            losses.append(loss)
            skipped.append(skip)
            if penalty is not None:
                penalties.append(penalty)
        return _epoch_summary(
            losses,
            self.penalty_scale * torch.stack(penalties) if self.l0_weight else None,
            torch.stack(skipped),
            batch_sizes,
        )

    def __call__(self, X_batch, y_batch, w_batch, noise):
        """One step; returns the task loss, the summed expected L0 (``None``
        without penalty) and whether the step was skipped, all on the device."""
        log_alpha = self.merger.log_alpha
        output = call(self.merger, X_batch, gate_noise=noise)
        loss = task_loss(self.loss_fn, output, y_batch, w_batch)
        # autograd.grad spares zero_grad and the accumulation into .grad.
        (grad,) = torch.autograd.grad(loss, log_alpha)
        # Not held through the next step's backward pass.
        del output
        penalty = None
        if self.l0_weight:
            l0, l0_slope = expected_l0_with_slope(log_alpha.detach())
            grad.add_(l0_slope, alpha=self.penalty_scale)
            penalty = l0.sum()
        # A sampled merge that overflows (a malicious member's gate drawn
        # open) gives no usable step: Adam skips it, without a sync.
        loss = loss.detach()
        skip = _not_finite(loss, grad)
        self.optimizer.step(grad, skip=skip)
        return loss, penalty, skip


class _HeldOut:
    """What ``learn_gates`` does with validation data: the task loss of the
    deterministic merge on them before learning and after every epoch, the
    log-alphas of the epoch of lowest loss, and early stopping."""

    def __init__(self, merger, loss_fn, validation, batch_size, n_iter_no_change):
        self.merger, self.loss_fn = merger, loss_fn
        self.data = validation if len(validation) == 3 else (*validation, None)
        self.batch_size = EVALUATION_BATCHES * batch_size
        self.n_iter_no_change = n_iter_no_change
        self.start = merger.log_alpha.detach().clone()
        self.best = self.start.clone()
        self.best_epoch = 0
        self.curve = [self._loss()]

    def _loss(self) -> float:
        return _mean_task_loss(
            self.merger, self.loss_fn, *self.data, batch_size=self.batch_size
        )

    def record(self, epoch: int) -> None:
        """Measure the loss after ``epoch``; keep its gates if it is the lowest."""
        self.curve.append(self._loss())
        if self.curve[-1] < min(self.curve[:-1]):
            self.best.copy_(self.merger.log_alpha.detach())
            self.best_epoch = epoch

    def patience_spent(self, epoch: int) -> bool:
        """Whether ``n_iter_no_change`` epochs in a row brought no new lowest
        loss."""
        if self.n_iter_no_change is None:
            return False
        return epoch - self.best_epoch >= self.n_iter_no_change

    def keep_best(self) -> int:
        """Set the merger's log-alphas to the best epoch's if they beat the
        start significantly, else to the start's; returns the epoch kept."""
        if self.best_epoch > 0 and not _significantly_better(
            self.merger,
            self.loss_fn,
            *self.data,
            self.best,
            self.start,
            self.batch_size,
        ):
            self.best, self.best_epoch = self.start, 0
        self.merger.set_log_alpha(self.best)
        return self.best_epoch


def _batch_sizes(n_samples: int, batch_size: int, device) -> torch.Tensor:
    """The size of every step's batch in an epoch of ``n_samples``."""
    n_batches = math.ceil(n_samples / batch_size)
    sizes = torch.full((n_batches,), float(batch_size), device=device)
    sizes[-1] = n_samples - (n_batches - 1) * batch_size
    return sizes


def _progress(merger, mean_loss: float, held_out) -> dict:
    """The progress bar's postfix: the loss, the held-out loss, open gates."""
    postfix = {"loss": f"{mean_loss:.4f}"}
    if held_out is not None:
        postfix["val_loss"] = f"{held_out.curve[-1]:.4f}"
    n_open = int((merger.gates() > 0).sum())
    postfix["open_gates"] = f"{n_open}/{merger.log_alpha.numel()}"
    return postfix


def _steps_per_chunk(X, batch_size: int, n_gates: int) -> int:
    """Steps whose shuffled batches and gate noise are prepared together: as
    many as fit in ``STEP_CHUNK_ELEMENTS`` elements of either, at least one."""
    sample = sum(v[0].numel() for v in X.values()) if is_dict(X) else X[0].numel()
    per_step = max(batch_size * sample, n_gates)
    return max(1, STEP_CHUNK_ELEMENTS // per_step)


def _shuffled_batches(data, log_alpha, batch_size, chunk_size, generator):
    """One epoch's ``(X, y, w, noise)`` per step, of ``data = (X, y, w,
    samples)``: the samples (those at ``samples`` when given) in a random
    order, ``w`` ``None`` when ``w`` is, and logistic noise of ``log_alpha``'s
    shape.

    A chunk of ``chunk_size`` samples (whole steps) is gathered, and its noise
    drawn, in one call each, so that batches are views; the draws follow one
    another from ``generator`` as if the whole epoch's were drawn at once.
    """
    X, y, w, samples = data
    n_samples = X.shape[0] if samples is None else samples.shape[0]
    order = torch.randperm(n_samples, generator=generator, device=X.device)
    if samples is not None:
        order = samples[order]
    for chunk in order.split(chunk_size):
        n_steps = -(-chunk.shape[0] // batch_size)
        noise = logistic_noise(
            (n_steps, *log_alpha.shape),
            generator,
            device=log_alpha.device,
            dtype=log_alpha.dtype,
        )
        weights = [None] * n_steps if w is None else w[chunk].split(batch_size)
        yield from zip(
            X[chunk].split(batch_size),
            y[chunk].split(batch_size),
            weights,
            noise,
            strict=True,
        )


def _not_finite(loss, grad):
    """Whether ``loss`` or some entry of ``grad`` is not finite: a boolean
    tensor on their device, computed without reading anything back."""
    # x - x is 0 for a finite x, NaN for NaN and inf: cheaper than isfinite,
    # which costs several operations per tensor on the CPU.
    return ((loss - loss) + (grad - grad).sum()).isnan()


def _epoch_summary(losses, penalties, skipped, batch_sizes):
    """The epoch's mean objective over the steps not ``skipped``, weighted by
    their ``batch_sizes`` (``nan`` when all were), and the number of skipped
    steps, read back from the device together."""
    losses = torch.stack(losses)
    if penalties is not None:
        losses = losses + penalties
    # where, not a product: the loss of a skipped step may be NaN or inf.
    total = torch.where(skipped, 0.0, losses) @ batch_sizes
    weight = batch_sizes @ (~skipped).to(batch_sizes.dtype)
    n_skipped = skipped.sum().to(total.dtype)
    mean, n_skipped = torch.stack([total / weight, n_skipped]).tolist()
    return mean, int(n_skipped)


@torch.no_grad()
def _significantly_better(
    merger, loss_fn, X, y, w, log_alpha, start_log_alpha, batch_size
):
    """Whether gates ``log_alpha`` beat the start significantly on ``(X, y)``
    (samples weighted by ``w``, when not ``None``).

    The one-sided paired test of
    :func:`~sk_softmerge._core._evaluation.choose_lowest_loss` on per-sample
    task losses: a validation loss lower by less than the noise
    of the validation sample is no reason to leave the start.
    """
    losses = {}
    for name, value in (("start", start_log_alpha), ("trained", log_alpha)):
        losses[name] = per_sample_task_losses(
            merger, loss_fn, X, y, w, deterministic_z(value), batch_size
        )
    return choose_lowest_loss(losses, "start") == "trained"


@torch.no_grad()
def per_sample_task_losses(
    merger, loss_fn, X, y, w, gates, batch_size=1024, samples=None
):
    """Task loss of every sample (``loss_fn`` on a batch of one, vectorised),
    times its weight ``w`` (when not ``None``), of all of ``X`` or of the
    samples at the positions ``samples``; ``None`` when some loss is not
    finite."""
    if samples is None:
        samples = torch.arange(X.shape[0], device=X.device)
    losses = torch.cat(
        [
            losses_of_batch(loss_fn, call(merger, X[batch], gates=gates), y[batch])
            for batch in samples.split(batch_size)
        ]
    )
    if w is not None:
        losses = losses * w[samples]
    return losses.cpu().numpy() if torch.isfinite(losses).all() else None


def task_loss(loss_fn, output, y, w):
    """The mean task loss of a batch, each sample's loss weighted by ``w``."""
    if w is None:
        return loss_fn(output, y)
    return (losses_of_batch(loss_fn, output, y) * w).mean()


def losses_of_batch(loss_fn, output, y):
    try:
        return torch.func.vmap(lambda out, t: loss_fn(out[None], t[None]))(output, y)
    except Exception:
        # A criterion that vmap cannot trace (data-dependent Python control
        # flow, .item()): the same values, one sample at a time.
        return torch.stack(
            [loss_fn(output[i : i + 1], y[i : i + 1]) for i in range(len(y))]
        )


@torch.no_grad()
def _mean_task_loss(merger, loss_fn, X, y, w=None, gates=None, batch_size=1024):
    """Mean task loss of a merge, deterministic by default, samples weighted by
    ``w`` (of mean 1) when given; inf when not finite."""
    if gates is None:
        gates = merger.gates()
    total = torch.zeros((), device=X.device)
    for batch in torch.arange(X.shape[0], device=X.device).split(batch_size):
        output = call(merger, X[batch], gates=gates)
        weights = None if w is None else w[batch]
        total += task_loss(loss_fn, output, y[batch], weights) * batch.shape[0]
    loss = total.item() / X.shape[0]
    return loss if math.isfinite(loss) else math.inf
