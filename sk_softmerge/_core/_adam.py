"""Adam on one tensor, for the gates' log-alphas.

``torch.optim.Adam`` spends longer on its Python bookkeeping than on the update
of a few thousand log-alphas; :class:`Adam` is the same update in a few tensor
operations, with steps that can be skipped without a host synchronisation.
"""

import math

import torch


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
    >>> from sk_softmerge._core._adam import Adam
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
