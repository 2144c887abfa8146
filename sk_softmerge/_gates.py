"""Hard-concrete gates (Louizos, Welling and Kingma, 2018).

Each gate is a random variable ``z`` in ``[0, 1]`` with an atom at 0 and at 1,
obtained by stretching a binary concrete variable ``s`` to ``(GAMMA, ZETA)`` and
clamping. The functions are named after the paper's quantities and work
element-wise on a tensor of log-alphas of any shape.

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


def quantile_concrete(u: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """Stretched binary concrete sample for uniform noise ``u``.

    Parameters
    ----------
    u : torch.Tensor
        Uniform noise in ``(0, 1)``, broadcastable with ``log_alpha``.
    log_alpha : torch.Tensor
        Location parameters of the gates.

    Returns
    -------
    s_bar : torch.Tensor
        ``sigmoid((log u - log(1 - u) + log_alpha) / BETA) * (ZETA - GAMMA) + GAMMA``,
        before clamping to ``[0, 1]``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._gates import quantile_concrete
    >>> quantile_concrete(torch.tensor([0.5]), torch.tensor([0.0]))
    tensor([0.5000])
    """
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return s * (ZETA - GAMMA) + GAMMA


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
    >>> from sk_softmerge._gates import sample_z
    >>> z = sample_z(torch.zeros(3), torch.Generator().manual_seed(0))
    >>> bool(((z >= 0) & (z <= 1)).all())
    True
    """
    u = torch.rand(
        log_alpha.shape,
        generator=generator,
        device=log_alpha.device,
        dtype=log_alpha.dtype,
    )
    u = u * (1.0 - 2.0 * EPS) + EPS
    return quantile_concrete(u, log_alpha).clamp(0.0, 1.0)


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
    >>> from sk_softmerge._gates import deterministic_z
    >>> deterministic_z(torch.tensor([-10.0, 0.0, 10.0]))
    tensor([0.0000, 0.5000, 1.0000])
    """
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def cdf_qz(x: float, log_alpha: torch.Tensor) -> torch.Tensor:
    """Cumulative distribution of the stretched concrete variable at ``x``.

    ``P(z = 0) = cdf_qz(0)`` and ``P(z = 1) = 1 - cdf_qz(1)``.

    Parameters
    ----------
    x : float
        Point in ``(GAMMA, ZETA)``.
    log_alpha : torch.Tensor
        Location parameters of the gates.

    Returns
    -------
    cdf : torch.Tensor
        ``P(s_bar <= x)``, same shape as ``log_alpha``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._gates import cdf_qz
    >>> cdf_qz(0.5, torch.tensor([0.0]))
    tensor([0.5000])
    """
    xn = (x - GAMMA) / (ZETA - GAMMA)
    logits = math.log(xn) - math.log1p(-xn)
    return torch.sigmoid(logits * BETA - log_alpha)


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
    >>> from sk_softmerge._gates import expected_l0
    >>> expected_l0(torch.tensor([20.0, -20.0]))
    tensor([1.0000e+00, 1.0195e-08])
    """
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))
