"""Learning the gates of a :class:`SoftMerge` by minibatch gradient descent."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ._evaluation import EVALUATION_BATCHES, choose_lowest_loss
from ._gates import deterministic_z, expected_l0_with_slope, logistic_noise
from ._inputs import call, is_dict
from ._merging import SoftMerge


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
    l0_weight: float = 1e-2,
    max_epochs: int = 20,
    lr: float = 5e-2,
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
    >>> from sk_softmerge._training import learn_gates
    >>> merger = SoftMerge([torch.nn.Linear(3, 2) for _ in range(3)])
    >>> X, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> result = learn_gates(merger, torch.nn.functional.cross_entropy, X, y,
    ...                      max_epochs=2)
    >>> len(result.loss_curve)
    2
    """
    log_alpha = merger.log_alpha
    optimizer = Adam(log_alpha, lr)
    if validation is not None and len(validation) == 2:
        validation = (*validation, None)
    n_samples = X.shape[0] if samples is None else samples.shape[0]
    n_batches = math.ceil(n_samples / batch_size)
    batch_sizes = torch.full((n_batches,), float(batch_size), device=X.device)
    batch_sizes[-1] = n_samples - (n_batches - 1) * batch_size
    result = GateTraining()
    eval_batch = EVALUATION_BATCHES * batch_size
    if validation is not None:
        start_log_alpha = log_alpha.detach().clone()
        best_log_alpha = start_log_alpha.clone()
        result.validation_loss_curve.append(
            _mean_task_loss(merger, loss_fn, *validation, batch_size=eval_batch)
        )
    epochs = tqdm(
        range(max_epochs), desc="learning gates", unit="epoch", disable=verbose <= 0
    )
    # The penalty's gradient, l0_weight * mean(l0)', is added in closed form.
    penalty_scale = l0_weight / log_alpha.numel()
    steps_per_chunk = _steps_per_chunk(X, batch_size, log_alpha.numel())
    for epoch in epochs:
        losses, penalties, skipped = [], [], []
        batches = _shuffled_batches(
            X,
            y,
            sample_weight,
            log_alpha,
            batch_size,
            steps_per_chunk,
            generator,
            samples,
        )
        for X_batch, y_batch, w_batch, noise in batches:
            output = call(merger, X_batch, gate_noise=noise)
            loss = _task_loss(loss_fn, output, y_batch, w_batch)
            # autograd.grad spares zero_grad and the accumulation into .grad.
            (grad,) = torch.autograd.grad(loss, log_alpha)
            if l0_weight:
                l0, l0_slope = expected_l0_with_slope(log_alpha.detach())
                grad.add_(l0_slope, alpha=penalty_scale)
                penalties.append(l0.sum())
                del l0, l0_slope
            # A sampled merge that overflows (a malicious member's gate drawn
            # open) gives no usable step: Adam skips it, without a sync.
            loss = loss.detach()
            skip = _not_finite(loss, grad)
            optimizer.step(grad, skip=skip)
            # Not held through the next step's backward pass.
            del output, grad
            losses.append(loss)
            skipped.append(skip)
        mean_loss, n_skipped = _epoch_summary(
            losses,
            penalty_scale * torch.stack(penalties) if l0_weight else None,
            torch.stack(skipped),
            batch_sizes,
        )
        result.loss_curve.append(mean_loss)
        result.n_skipped_steps += n_skipped
        if after_epoch is not None:
            after_epoch(epoch + 1)
        postfix = {"loss": f"{result.loss_curve[-1]:.4f}"}
        if validation is not None:
            result.validation_loss_curve.append(
                _mean_task_loss(merger, loss_fn, *validation, batch_size=eval_batch)
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
        if (
            validation is not None
            and n_iter_no_change is not None
            and epoch + 1 - result.best_epoch >= n_iter_no_change
        ):
            break
    if validation is None:
        result.best_epoch = len(result.loss_curve)
        return result
    if result.best_epoch > 0 and not _significantly_better(
        merger, loss_fn, *validation, best_log_alpha, start_log_alpha, eval_batch
    ):
        best_log_alpha, result.best_epoch = start_log_alpha, 0
    merger.set_log_alpha(best_log_alpha)
    return result


def _steps_per_chunk(X, batch_size: int, n_gates: int) -> int:
    """Steps whose shuffled batches and gate noise are prepared together: as
    many as fit in ``STEP_CHUNK_ELEMENTS`` elements of either, at least one."""
    sample = sum(v[0].numel() for v in X.values()) if is_dict(X) else X[0].numel()
    per_step = max(batch_size * sample, n_gates)
    return max(1, STEP_CHUNK_ELEMENTS // per_step)


def _shuffled_batches(
    X, y, w, log_alpha, batch_size, steps_per_chunk, generator, samples=None
):
    """One epoch's ``(X, y, w, noise)`` per step: the samples (those at
    ``samples`` when given) in a random order, ``w`` ``None`` when ``w`` is,
    and logistic noise of ``log_alpha``'s shape.

    A chunk of ``steps_per_chunk`` steps is gathered, and its noise drawn, in
    one call each, so that batches are views; the draws follow one another
    from ``generator`` as if the whole epoch's were drawn at once.
    """
    n_samples = X.shape[0] if samples is None else samples.shape[0]
    order = torch.randperm(n_samples, generator=generator, device=X.device)
    if samples is not None:
        order = samples[order]
    for chunk in order.split(steps_per_chunk * batch_size):
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

    The one-sided paired test of :func:`~sk_softmerge._evaluation.choose_lowest_loss`
    on per-sample task losses: a validation loss lower by less than the noise
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
            _losses_of_batch(loss_fn, call(merger, X[batch], gates=gates), y[batch])
            for batch in samples.split(batch_size)
        ]
    )
    if w is not None:
        losses = losses * w[samples]
    return losses.cpu().numpy() if torch.isfinite(losses).all() else None


def _task_loss(loss_fn, output, y, w):
    """The mean task loss of a batch, each sample's loss weighted by ``w``."""
    if w is None:
        return loss_fn(output, y)
    return (_losses_of_batch(loss_fn, output, y) * w).mean()


def _losses_of_batch(loss_fn, output, y):
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
        total += _task_loss(loss_fn, output, y[batch], weights) * batch.shape[0]
    loss = total.item() / X.shape[0]
    return loss if math.isfinite(loss) else math.inf


class Adam:
    """Adam on one tensor, updated in place, as :class:`torch.optim.Adam` does.

    ``torch.optim.Adam`` spends longer on its Python bookkeeping than on the
    update of a few dozen log-alphas: about 80 us a step, a tenth of a whole
    step on a small net. The same update in six tensor operations costs a
    third of that.

    A step can be skipped: :meth:`step` takes a boolean tensor ``skip`` and,
    when it is true, leaves the parameter, both moments and the step count
    exactly as they were. On the CPU the flag is simply read, as there is no
    device to wait for. Elsewhere it is never read back: the update is masked
    on the device, where the step count lives and picks the step's bias
    corrections from a table of them; that costs a dozen operations.

    Parameters
    ----------
    parameter : torch.Tensor
        The tensor to update.
    lr : float
        Learning rate.
    betas : tuple of float, default=(0.9, 0.999)
        Decay rates of the first and second moment estimates.
    eps : float, default=1e-8
        Added to the root of the second moment.
    masked : bool, default=None
        Whether to skip steps by masking the update on the device rather than
        by reading ``skip``; ``None`` masks unless the parameter is on the CPU.

    Attributes
    ----------
    exp_avg, exp_avg_sq : torch.Tensor
        First and second moment estimates, of the parameter's shape.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._training import Adam
    >>> x = torch.zeros(2)
    >>> optimizer = Adam(x, lr=0.1)
    >>> optimizer.step(torch.tensor([1.0, -2.0]))
    >>> x
    tensor([-0.1000,  0.1000])
    >>> optimizer.step(torch.tensor([float("nan"), 1.0]), skip=torch.tensor(True))
    >>> x, optimizer.n_steps
    (tensor([-0.1000,  0.1000]), 1)
    """

    def __init__(self, parameter, lr, betas=(0.9, 0.999), eps=1e-8, masked=None):
        self.parameter = parameter
        self.lr, self.betas, self.eps = lr, betas, eps
        self.masked = parameter.device.type != "cpu" if masked is None else masked
        like = {"dtype": parameter.dtype, "device": parameter.device}
        # Both moments in one tensor, so that one operation decays both.
        self._moments = torch.zeros((2, *parameter.shape), **like)
        self.exp_avg, self.exp_avg_sq = self._moments.unbind()
        # Zero-dimensional, so that no Python number is wrapped per step.
        self._eps = torch.tensor(eps, dtype=torch.float64)
        self._beta2 = torch.tensor(betas[1], dtype=torch.float64)
        self._n_steps = 0  # a Python number unless masked
        if self.masked:
            self._n_steps = torch.zeros(1, dtype=torch.int64, device=like["device"])
            self._betas = torch.tensor(betas, **like).view(2, *[1] * parameter.dim())
            self._no_skip = torch.zeros((), dtype=torch.bool, device=like["device"])
            # An upper bound on the steps taken, known without reading them.
            self._n_calls = 0
            self._scales = self._bias_corrections(1024)

    @property
    def n_steps(self) -> int:
        """The number of steps taken, skipped ones excluded (read back from
        the device when masked)."""
        return int(self._n_steps)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """Update the parameter with ``grad``, unless ``skip`` is true.

        Parameters
        ----------
        grad : torch.Tensor
            Gradient, of the parameter's shape.
        skip : torch.Tensor of dtype bool and shape (), default=None
            On the parameter's device. True skips the step: the parameter, the
            moments and the step count are left exactly as they were, whatever
            ``grad`` holds (NaN included). ``None`` takes the step.
        """
        if self.masked:
            self._masked_step(grad, self._no_skip if skip is None else skip)
        elif skip is None or not skip:
            self._step(grad)

    def _step(self, grad):
        beta1, beta2 = self.betas
        self._n_steps += 1
        self.exp_avg.lerp_(grad, 1.0 - beta1)
        # Not lerp_: from an infinite moment it would give inf - inf = NaN.
        self.exp_avg_sq.mul_(self._beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**self._n_steps
        bias_correction2 = 1.0 - beta2**self._n_steps
        # eps + sqrt(v / bias_correction2), as torch.optim.Adam computes it.
        denom = torch.add(
            self._eps, self.exp_avg_sq.sqrt(), alpha=1.0 / math.sqrt(bias_correction2)
        )
        self.parameter.addcdiv_(self.exp_avg, denom, value=-self.lr / bias_correction1)

    def _masked_step(self, grad, skip):
        self._n_calls += 1
        if self._n_calls >= len(self._scales):
            self._scales = self._bias_corrections(2 * len(self._scales))
        beta1, beta2 = self.betas
        take = ~skip
        # Zeros for a skipped step, whose gradient may hold NaN (0 * NaN is
        # NaN), and moments decayed by (1, 1): both kept exactly.
        grad = torch.where(take, grad, 0.0)
        self._moments.mul_(torch.where(take, self._betas, 1.0))
        self.exp_avg.add_(grad, alpha=1.0 - beta1)
        self.exp_avg_sq.addcmul_(grad, grad, value=1.0 - beta2)
        self._n_steps.add_(take)
        # index_select, not indexing: a tensor index would be read back.
        scale, offset = self._scales.index_select(0, self._n_steps * take)[0]
        denom = self.exp_avg_sq.sqrt().add_(offset)
        self.parameter.addcdiv_(self.exp_avg * scale, denom)

    def _bias_corrections(self, n_rows: int) -> torch.Tensor:
        """Row ``n``: the scales ``(a, b)`` of step ``n``, whose update is
        ``a * exp_avg / (sqrt(exp_avg_sq) + b)``; row 0, of a skipped step,
        moves nothing over a denominator that is never zero.

        With ``c1 = 1 - beta1**n`` and ``c2 = 1 - beta2**n``, ``a = -lr *
        sqrt(c2) / c1`` and ``b = eps * sqrt(c2)``: torch.optim.Adam's
        ``-lr / c1 * exp_avg / (sqrt(exp_avg_sq / c2) + eps)``, with the
        corrections in float64 as it computes them.
        """
        beta1, beta2 = self.betas
        device = self.parameter.device
        n = torch.arange(1, n_rows, dtype=torch.float64, device=device)
        root2 = (1.0 - beta2**n).sqrt()
        steps = torch.stack([-self.lr * root2 / (1.0 - beta1**n), self.eps * root2], 1)
        skipped = torch.tensor([[0.0, 1.0]], dtype=torch.float64, device=device)
        return torch.cat([skipped, steps]).to(self.parameter.dtype)
