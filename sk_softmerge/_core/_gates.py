"""Hard-concrete gates (Louizos, Welling and Kingma, 2018).

Each gate is a random variable ``z`` in ``[0, 1]`` with an atom at 0 and at 1,
obtained by stretching a binary concrete variable ``s`` to ``(GAMMA, ZETA)`` and
clamping::

    s = sigmoid((log u - log(1 - u) + log_alpha) / BETA),   u ~ U(0, 1)
    z = clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1)

:func:`hard_concrete_with_slope` is the one implementation of that sample and
of its derivative in ``log_alpha``: :func:`hard_concrete` (and so
:func:`sample_z`) wraps it in an autograd node, and the merge's fused node
(:mod:`sk_softmerge._core._fastpath`) calls it inside its own. The functions are
named after the paper's quantities and work element-wise on a tensor of
log-alphas of any shape.

References
----------
.. [1] C. Louizos, M. Welling and D. P. Kingma, "Learning Sparse Neural Networks
   through L0 Regularization", ICLR 2018, arXiv:1712.01312.
"""

import math

import torch

BETA = 2.0 / 3.0
"""Temperature of the binary concrete distribution."""

GAMMA = -0.1
"""Lower end of the stretched interval."""

ZETA = 1.1
"""Upper end of the stretched interval."""

EPS = 1e-6
"""Margin that keeps uniform noise away from 0 and 1."""


def logistic_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logistic noise ``log u - log(1 - u)`` with ``u ~ U(EPS, 1 - EPS)``.

    It is the part of a hard-concrete sample that does not depend on the gates'
    parameters, so a training loop can draw it for many steps in one call.

    Parameters
    ----------
    shape : tuple of int
        Shape of the noise.
    generator : torch.Generator, default=None
        Source of the uniform noise; it must live on ``device``.
    device : str or torch.device, default=None
        Where the noise is drawn; ``None`` is the default device.
    dtype : torch.dtype, default=torch.float32
        Floating dtype of the noise.

    Returns
    -------
    noise : torch.Tensor
        Noise of the given shape, finite and symmetric around zero.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._gates import logistic_noise
    >>> logistic_noise((2, 3), torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3])
    """
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    u = u * (1.0 - 2.0 * EPS) + EPS
    return torch.log(u) - torch.log1p(-u)


def hard_concrete_with_slope(
    log_alpha: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard-concrete gates and their derivative in ``log_alpha``, without autograd.

    Autograd functions that fuse the gates into a larger computation call this
    and multiply incoming gradients by the slope.

    Parameters
    ----------
    log_alpha : torch.Tensor
        Location parameters of the gates.
    noise : torch.Tensor
        Logistic noise from :func:`logistic_noise`, same shape as ``log_alpha``.

    Returns
    -------
    z : torch.Tensor
        The gates, as :func:`hard_concrete` gives them.
    slope : torch.Tensor
        ``dz / dlog_alpha``; zero where the clamp is active, as ``torch.clamp``
        passes the gradient on the closed interval only.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._gates import hard_concrete_with_slope
    >>> z, slope = hard_concrete_with_slope(torch.tensor([0.0, 10.0]), torch.zeros(2))
    >>> z, slope
    (tensor([0.5000, 1.0000]), tensor([0.4500, 0.0000]))
    """
    # Few operations, in place where possible: a training step calls this once,
    # on a few dozen gates, so per-operation overhead, not arithmetic, is the cost.
    s = torch.add(noise, log_alpha).div_(BETA).sigmoid_()
    s_bar = torch.add(GAMMA, s, alpha=ZETA - GAMMA)
    z = s_bar.clamp(0.0, 1.0)
    # ds_bar / dlog_alpha = (ZETA - GAMMA) / BETA * s * (1 - s)
    slope = torch.addcmul(s, s, s, value=-1.0).mul_((ZETA - GAMMA) / BETA)
    return z, slope.mul_(z == s_bar)


class _HardConcrete(torch.autograd.Function):
    # Makes hard_concrete_with_slope differentiable: its slope is the backward,
    # so the sample is written once.

    @staticmethod
    def forward(ctx, log_alpha, noise):
        z, slope = hard_concrete_with_slope(log_alpha, noise)
        ctx.save_for_backward(slope)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        (slope,) = ctx.saved_tensors
        return grad_z * slope, None


def hard_concrete(log_alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Hard-concrete gate for given logistic noise, differentiable in ``log_alpha``.

    Parameters
    ----------
    log_alpha : torch.Tensor
        Location parameters of the gates.
    noise : torch.Tensor
        Logistic noise from :func:`logistic_noise`, same shape as ``log_alpha``.

    Returns
    -------
    z : torch.Tensor
        ``clamp(sigmoid((noise + log_alpha) / BETA) * (ZETA - GAMMA) + GAMMA, 0, 1)``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._gates import hard_concrete
    >>> hard_concrete(torch.tensor([0.0, 10.0]), torch.zeros(2))
    tensor([0.5000, 1.0000])
    """
    return _HardConcrete.apply(log_alpha, noise)


def sample_z(
    log_alpha: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one hard-concrete gate per log-alpha, differentiable in ``log_alpha``.

    Parameters
    ----------
    log_alpha : torch.Tensor
        Location parameters of the gates.
    generator : torch.Generator, default=None
        Source of the uniform noise; it must live on ``log_alpha``'s device.

    Returns
    -------
    z : torch.Tensor
        Gates in ``[0, 1]``, same shape as ``log_alpha``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._gates import sample_z
    >>> z = sample_z(torch.zeros(3), torch.Generator().manual_seed(0))
    >>> bool(((z >= 0) & (z <= 1)).all())
    True
    """
    noise = logistic_noise(
        log_alpha.shape, generator, device=log_alpha.device, dtype=log_alpha.dtype
    )
    return hard_concrete(log_alpha, noise)


def deterministic_z(log_alpha: torch.Tensor) -> torch.Tensor:
    """Gate used after training: the noise-free hard-concrete value.

    Parameters
    ----------
    log_alpha : torch.Tensor
        Location parameters of the gates.

    Returns
    -------
    z : torch.Tensor
        ``clamp(sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._gates import deterministic_z
    >>> deterministic_z(torch.tensor([-10.0, 0.0, 10.0]))
    tensor([0.0000, 0.5000, 1.0000])
    """
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """Probability that each gate is non-zero, the expected L0 norm per gate.

    Parameters
    ----------
    log_alpha : torch.Tensor
        Location parameters of the gates.

    Returns
    -------
    l0 : torch.Tensor
        ``sigmoid(log_alpha - BETA * log(-GAMMA / ZETA))``, same shape as
        ``log_alpha``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._gates import expected_l0
    >>> expected_l0(torch.tensor([20.0, -20.0]))
    tensor([1.0000e+00, 1.0195e-08])
    """
    return torch.sub(log_alpha, BETA * math.log(-GAMMA / ZETA)).sigmoid_()


def expected_l0_with_slope(
    log_alpha: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected L0 norm of each gate and its derivative in ``log_alpha``.

    A training step adds the penalty's gradient to the task loss's in closed
    form, which spares autograd a forward and a backward pass through it.

    Parameters
    ----------
    log_alpha : torch.Tensor
        Location parameters of the gates.

    Returns
    -------
    l0 : torch.Tensor
        :func:`expected_l0` of ``log_alpha``.
    slope : torch.Tensor
        ``d l0 / d log_alpha``, that is ``l0 * (1 - l0)``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._gates import expected_l0, expected_l0_with_slope
    >>> log_alpha = torch.tensor([-2.0, 0.0, 2.0])
    >>> l0, slope = expected_l0_with_slope(log_alpha)
    >>> autograd = torch.func.grad(lambda a: expected_l0(a).sum())(log_alpha)
    >>> torch.allclose(slope, autograd)
    True
    """
    l0 = expected_l0(log_alpha)
    return l0, torch.addcmul(l0, l0, l0, value=-1.0)
