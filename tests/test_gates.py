"""The hard-concrete gate mathematics against its closed forms."""

import math

import pytest
import torch

from sk_softmerge._core._gates import (
    BETA,
    GAMMA,
    ZETA,
    deterministic_z,
    expected_l0,
    hard_concrete,
    hard_concrete_with_slope,
    logistic_noise,
    sample_z,
)

LOG_ALPHAS = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])


def stretched_concrete(u, log_alpha):
    """The paper's stretched binary concrete sample for uniform noise ``u``,
    before clamping: the reference the library's sample is checked against."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return s * (ZETA - GAMMA) + GAMMA


def cdf_qz(x, log_alpha):
    """The paper's closed-form CDF of the stretched variable, ``P(s_bar <= x)``;
    ``P(z = 0) = cdf_qz(0)`` and ``P(z = 1) = 1 - cdf_qz(1)``."""
    xn = (torch.as_tensor(x) - GAMMA) / (ZETA - GAMMA)
    return torch.sigmoid((torch.log(xn) - torch.log1p(-xn)) * BETA - log_alpha)


def logit(u):
    return torch.log(u) - torch.log1p(-u)


def test_constants_are_the_papers():
    assert (BETA, GAMMA, ZETA) == (2.0 / 3.0, -0.1, 1.1)


def test_cdf_reference_at_the_middle():
    assert float(cdf_qz(0.5, torch.tensor([0.0]))) == pytest.approx(0.5)


def test_hard_concrete_closed_form():
    """The sample for the noise of uniform ``u`` is the paper's closed form."""
    u = torch.tensor([0.1, 0.5, 0.9])
    log_alpha = torch.tensor([0.3, -1.0, 2.0])
    s = 1 / (1 + torch.exp(-(torch.log(u / (1 - u)) + log_alpha) / BETA))
    closed_form = (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    torch.testing.assert_close(hard_concrete(log_alpha, logit(u)), closed_form)
    z, _ = hard_concrete_with_slope(log_alpha, logit(u))
    torch.testing.assert_close(z, closed_form)


def test_sample_is_the_quantile_of_the_cdf():
    """The sample for the noise of uniform ``u`` is the distribution's
    ``u``-quantile: ``cdf(z) = u`` between the atoms, and ``z`` is at an atom
    exactly when ``u`` falls in its mass."""
    u = torch.linspace(0.05, 0.95, 19)
    log_alpha = torch.full_like(u, 0.7)
    z = hard_concrete(log_alpha, logit(u))
    at_zero, at_one = z == 0, z == 1
    torch.testing.assert_close(at_zero, u <= cdf_qz(0.0, log_alpha))
    torch.testing.assert_close(at_one, u >= cdf_qz(1.0, log_alpha))
    inside = ~(at_zero | at_one)
    assert at_zero.any() and at_one.any() and inside.sum() > 10
    torch.testing.assert_close(
        cdf_qz(z[inside], log_alpha[inside]), u[inside], atol=1e-5, rtol=0
    )


def test_expected_l0_is_probability_of_nonzero_gate():
    torch.testing.assert_close(expected_l0(LOG_ALPHAS), 1 - cdf_qz(0.0, LOG_ALPHAS))
    closed_form = torch.sigmoid(LOG_ALPHAS - BETA * math.log(-GAMMA / ZETA))
    torch.testing.assert_close(expected_l0(LOG_ALPHAS), closed_form)


def test_deterministic_gate_closed_form():
    expected = torch.clamp(torch.sigmoid(LOG_ALPHAS) * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(deterministic_z(LOG_ALPHAS), expected)
    assert deterministic_z(torch.tensor(-20.0)) == 0
    assert deterministic_z(torch.tensor(20.0)) == 1


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_sampled_atoms_match_cdf(log_alpha):
    """Monte-Carlo P(z = 0) and P(z = 1) agree with the distribution's CDF."""
    n = 200_000
    la = torch.full((n,), log_alpha)
    z = sample_z(la, torch.Generator().manual_seed(0))
    p_zero = float(cdf_qz(0.0, torch.tensor(log_alpha)))
    p_one = float(1 - cdf_qz(1.0, torch.tensor(log_alpha)))
    tolerance = 5 * math.sqrt(0.25 / n)
    assert abs(float((z == 0).double().mean()) - p_zero) < tolerance
    assert abs(float((z == 1).double().mean()) - p_one) < tolerance
    assert abs(float((z > 0).double().mean()) - float(expected_l0(la[0]))) < tolerance


def test_samples_in_unit_interval_and_differentiable():
    log_alpha = torch.zeros(1000, requires_grad=True)
    z = sample_z(log_alpha, torch.Generator().manual_seed(1))
    assert ((z >= 0) & (z <= 1)).all()
    z.sum().backward()
    assert log_alpha.grad is not None
    assert (log_alpha.grad >= 0).all() and (log_alpha.grad > 0).any()


def test_sampling_repeatable_with_generator():
    log_alpha = torch.zeros(50)
    a = sample_z(log_alpha, torch.Generator().manual_seed(3))
    b = sample_z(log_alpha, torch.Generator().manual_seed(3))
    c = sample_z(log_alpha, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


class TestHardConcrete:
    def test_matches_quantile_of_the_same_noise(self):
        u = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 0.98 + 0.01
        log_alpha = torch.randn(200)
        noise = torch.log(u) - torch.log1p(-u)
        torch.testing.assert_close(
            hard_concrete(log_alpha, noise),
            stretched_concrete(u, log_alpha).clamp(0, 1),
        )

    def test_gradient_matches_autograd_of_closed_form(self):
        generator = torch.Generator().manual_seed(1)
        log_alpha = torch.randn(500, dtype=torch.float64, generator=generator)
        noise = logistic_noise((500,), generator, dtype=torch.float64)
        weights = torch.randn(500, dtype=torch.float64, generator=generator)
        fast = log_alpha.clone().requires_grad_()
        (hard_concrete(fast, noise) * weights).sum().backward()
        slow = log_alpha.clone().requires_grad_()
        s = torch.sigmoid((noise + slow) / BETA)
        ((s * (ZETA - GAMMA) + GAMMA).clamp(0, 1) * weights).sum().backward()
        torch.testing.assert_close(fast.grad, slow.grad)
        assert (fast.grad == 0).any() and (fast.grad != 0).any()

    def test_gradcheck(self):
        log_alpha = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        noise = logistic_noise((4, 3), torch.Generator().manual_seed(2))
        assert torch.autograd.gradcheck(
            hard_concrete, (log_alpha, noise.double()), eps=1e-6
        )


def test_logistic_noise_is_finite_and_logistic():
    noise = logistic_noise((100_000,), torch.Generator().manual_seed(0))
    assert torch.isfinite(noise).all()
    assert abs(float(noise.mean())) < 0.05
    assert abs(float(noise.var()) - math.pi**2 / 3) < 0.1
