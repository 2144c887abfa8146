"""Adam on one tensor: torch.optim.Adam's steps, and skipped steps that change
nothing."""

import pytest
import torch

from sk_softmerge._core._adam import Adam


@pytest.mark.parametrize("masked", [False, True])
def test_adam_matches_torch_adam(masked):
    generator = torch.Generator().manual_seed(0)
    ours = torch.randn(4, 3, generator=generator)
    theirs = torch.nn.Parameter(ours.clone())
    optimizer = Adam(ours, lr=0.05, masked=masked)
    reference = torch.optim.Adam([theirs], lr=0.05)
    for _ in range(20):
        grad = torch.randn(4, 3, generator=generator)
        optimizer.step(grad)
        theirs.grad = grad.clone()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach())


@pytest.mark.parametrize("masked", [False, True])
def test_adam_skipped_steps_change_nothing(masked):
    """A skipped step, whatever its gradient, leaves the parameter, moments and
    step count exactly as they were: the steps taken are torch.optim.Adam's."""
    generator = torch.Generator().manual_seed(0)
    ours = torch.randn(4, 3, generator=generator)
    theirs = torch.nn.Parameter(ours.clone())
    optimizer = Adam(ours, lr=0.05, masked=masked)
    reference = torch.optim.Adam([theirs], lr=0.05)
    # The first step skipped too: no bias correction exists before a step.
    skips = [True, False, False, True, True, False, True, False]
    for step, skip in enumerate(skips):
        grad = torch.randn(4, 3, generator=generator)
        if skip:
            grad[step % 4, 0] = (float("nan"), float("inf"), -float("inf"), 1.0)[
                step % 4
            ]
            before = [
                t.clone() for t in (ours, optimizer.exp_avg, optimizer.exp_avg_sq)
            ]
            n_steps = optimizer.n_steps
        optimizer.step(grad, skip=torch.tensor(skip))
        if skip:
            after = (ours, optimizer.exp_avg, optimizer.exp_avg_sq)
            assert all(map(torch.equal, before, after))
            assert optimizer.n_steps == n_steps
        else:
            theirs.grad = grad.clone()
            reference.step()
    assert optimizer.n_steps == skips.count(False)
    torch.testing.assert_close(ours, theirs.detach())
    state = reference.state[theirs]
    torch.testing.assert_close(optimizer.exp_avg, state["exp_avg"])
    torch.testing.assert_close(optimizer.exp_avg_sq, state["exp_avg_sq"])


def test_adam_masked_step_grows_its_table_of_bias_corrections():
    ours, theirs = torch.zeros(2), torch.nn.Parameter(torch.zeros(2))
    optimizer = Adam(ours, lr=0.01, masked=True)
    reference = torch.optim.Adam([theirs], lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1500):
        grad = torch.randn(2, generator=generator)
        optimizer.step(grad)
        theirs.grad = grad
        reference.step()
    assert optimizer.n_steps == 1500
    torch.testing.assert_close(ours, theirs.detach())
