import numpy as np
import pytest
import torch

from sk_softmerge import SoftMerge
from sk_softmerge._gates import logistic_noise
from sk_softmerge._training import Adam, _per_sample_task_losses, learn_gates


def test_adam_matches_torch_adam():
    generator = torch.Generator().manual_seed(0)
    ours = torch.randn(4, 3, generator=generator)
    theirs = torch.nn.Parameter(ours.clone())
    optimizer = Adam(ours, lr=0.05)
    reference = torch.optim.Adam([theirs], lr=0.05)
    for _ in range(20):
        grad = torch.randn(4, 3, generator=generator)
        optimizer.step(grad)
        theirs.grad = grad.clone()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach())


@pytest.mark.parametrize("l0_weight", [0.0, 1e-2])
def test_learn_gates_changes_only_log_alpha_and_is_repeatable(l0_weight):
    torch.manual_seed(0)
    modules = [torch.nn.Linear(3, 2) for _ in range(3)]
    X, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    results = []
    for _ in range(2):
        merger = SoftMerge(modules)
        theta = merger.theta.clone()
        learn_gates(
            merger,
            torch.nn.functional.cross_entropy,
            X,
            y,
            l0_weight=l0_weight,
            max_epochs=3,
            generator=torch.Generator().manual_seed(1),
        )
        assert torch.equal(merger.theta, theta)
        results.append(merger.log_alpha.detach())
    assert not torch.equal(results[0], torch.full_like(results[0], 3.0))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("l0_weight", [0.0, 0.3])
def test_learn_gates_is_adam_on_the_documented_objective(l0_weight):
    """Each step: Adam on mean task loss + l0_weight * penalty, autograd's way."""
    torch.manual_seed(0)
    modules = [
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        for _ in range(2)
    ]
    X, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    loss_fn = torch.nn.functional.cross_entropy
    merger = SoftMerge(modules, granularity="neuron", init_log_alpha=0.5)
    result = learn_gates(
        merger,
        loss_fn,
        X,
        y,
        l0_weight=l0_weight,
        max_epochs=2,
        lr=0.1,
        batch_size=16,
        generator=torch.Generator().manual_seed(1),
    )

    reference = SoftMerge(modules, granularity="neuron", init_log_alpha=0.5)
    optimizer = torch.optim.Adam([reference.log_alpha], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    curve = []
    for _ in range(2):
        order = torch.randperm(50, generator=generator)
        noise = logistic_noise((4, *reference.log_alpha.shape), generator)
        total = 0.0
        for step, batch in enumerate(order.split(16)):
            output = reference(X[batch], gate_noise=noise[step])
            loss = loss_fn(output, y[batch]) + l0_weight * reference.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        curve.append(total / 50)
    torch.testing.assert_close(merger.log_alpha, reference.log_alpha)
    np.testing.assert_allclose(result.loss_curve, curve, rtol=1e-5)


def _linear(weight):
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(weight)
    return module


class TestValidationKeepsSignificantGainsOnly:
    @pytest.fixture
    def task(self):
        torch.manual_seed(0)
        X = torch.randn(400, 1)
        good, bad = _linear(1.0), _linear(-1.0)
        return [bad, good], X, X.clone()

    def _learn(self, members, X, y, n_validation):
        merger = SoftMerge(members)
        start = merger.log_alpha.detach().clone()
        result = learn_gates(
            merger,
            torch.nn.functional.mse_loss,
            X,
            y,
            l0_weight=0.0,
            max_epochs=5,
            lr=0.2,
            generator=torch.Generator().manual_seed(0),
            validation=(X[:n_validation], y[:n_validation]),
        )
        return merger, start, result

    def test_clear_gain_is_kept(self, task):
        members, X, y = task
        merger, _, result = self._learn(members, X, y, n_validation=200)
        assert result.best_epoch > 0
        assert merger.gates()[0, 0] < merger.gates()[1, 0]

    def test_gain_too_small_to_tell_restores_the_start(self, task):
        # On one validation sample no difference is significant.
        members, X, y = task
        merger, start, result = self._learn(members, X, y, n_validation=1)
        assert result.best_epoch == 0
        assert torch.equal(merger.log_alpha.detach(), start)
        assert min(result.validation_loss_curve[1:]) < result.validation_loss_curve[0]


@pytest.mark.parametrize("n_iter_no_change", [1, 3])
def test_learning_stops_after_epochs_without_a_better_validation_loss(
    n_iter_no_change,
):
    # Identical members: no gate changes the merge, so no epoch improves on
    # the validation loss of the start.
    merger = SoftMerge([_linear(1.0), _linear(1.0)])
    X = torch.linspace(-1, 1, 64).unsqueeze(1)
    result = learn_gates(
        merger,
        torch.nn.functional.mse_loss,
        X,
        X.clone(),
        max_epochs=10,
        generator=torch.Generator().manual_seed(0),
        validation=(X, X.clone()),
        n_iter_no_change=n_iter_no_change,
    )
    assert len(result.loss_curve) == n_iter_no_change
    assert len(result.validation_loss_curve) == n_iter_no_change + 1
    assert result.best_epoch == 0


def test_learning_stops_n_epochs_after_the_best_one():
    # From the average of a good and a bad member, the validation loss falls
    # while the bad member's gate closes, then stays.
    merger = SoftMerge([_linear(1.0), _linear(-1.0)])
    X = torch.randn(400, 1, generator=torch.Generator().manual_seed(0))
    result = learn_gates(
        merger,
        torch.nn.functional.mse_loss,
        X,
        X.clone(),
        l0_weight=0.0,
        max_epochs=40,
        lr=0.2,
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
        validation=(X[:200], X[:200].clone()),
        n_iter_no_change=2,
    )
    assert result.best_epoch > 0
    assert len(result.loss_curve) == min(40, result.best_epoch + 2)
    curve = result.validation_loss_curve
    assert (
        min(curve[result.best_epoch + 1 :], default=np.inf) >= curve[result.best_epoch]
    )


def test_per_sample_task_losses_of_a_criterion_vmap_cannot_trace():
    def loss(output, target):
        # .item() breaks vmap; the loop fallback must give the same values.
        scale = 2.0 if float(target.float().mean().item()) >= 0 else 1.0
        return scale * torch.nn.functional.mse_loss(output, target)

    merger = SoftMerge([_linear(1.0), _linear(0.5)])
    X = torch.linspace(-1, 1, 7).unsqueeze(1)
    y = torch.zeros(7, 1)
    losses = _per_sample_task_losses(merger, loss, X, y, None, gates=merger.gates())
    expected = 2.0 * (0.75 * X.squeeze(1)) ** 2
    np.testing.assert_allclose(losses, expected.numpy(), rtol=1e-6)
