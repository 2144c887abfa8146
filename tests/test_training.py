import copy
import warnings

import numpy as np
import pytest
import torch

from sk_softmerge import SoftMerge
from sk_softmerge._core import _training
from sk_softmerge._core._gates import logistic_noise
from sk_softmerge._core._training import learn_gates, per_sample_task_losses


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


@pytest.mark.parametrize(
    "l0_weight, chunk_elements", [(0.0, 2**16), (0.3, 2**16), (0.0, 1), (0.3, 100)]
)
def test_learn_gates_is_adam_on_the_documented_objective(
    l0_weight, chunk_elements, monkeypatch
):
    """Each step: Adam on mean task loss + l0_weight * penalty, autograd's way;
    data and noise prepared a step, two steps or an epoch at a time give the
    epoch's noise drawn at once."""
    monkeypatch.setattr(_training, "STEP_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    modules = [
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        for _ in range(2)
    ]
    X, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    merger, result, reference, curve, n_skipped = _learned_and_reference(
        lambda: SoftMerge(modules, granularity="neuron", init_log_alpha=0.5),
        torch.nn.functional.cross_entropy,
        X,
        y,
        l0_weight,
        max_epochs=2,
    )
    assert n_skipped == 0
    torch.testing.assert_close(merger.log_alpha, reference.log_alpha)
    np.testing.assert_allclose(result.loss_curve, curve, rtol=1e-5)


def _learned_and_reference(
    make_merger, loss_fn, X, y, l0_weight, *, max_epochs, lr=0.1, batch_size=16
):
    """``learn_gates`` on one merger from ``make_merger``, and on another the
    documented objective learned with torch.optim.Adam, autograd's way, over
    the steps whose loss and gradient are finite: the same shuffles and gate
    noise (the reference draws an epoch's at once), from generators seeded
    alike. Returns the learned merger, its result, the reference, the
    reference's loss curve (means over the steps taken) and the number of
    steps it left out."""
    merger = make_merger()
    result = learn_gates(
        merger,
        loss_fn,
        X,
        y,
        l0_weight=l0_weight,
        max_epochs=max_epochs,
        lr=lr,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(1),
    )
    reference = make_merger()
    optimizer = torch.optim.Adam([reference.log_alpha], lr=lr)
    generator = torch.Generator().manual_seed(1)
    n_batches = -(-X.shape[0] // batch_size)
    curve, n_skipped = [], 0
    for _ in range(max_epochs):
        order = torch.randperm(X.shape[0], generator=generator)
        noise = logistic_noise((n_batches, *reference.log_alpha.shape), generator)
        total, n_seen = 0.0, 0
        for step, batch in enumerate(order.split(batch_size)):
            output = reference(X[batch], gate_noise=noise[step])
            loss = loss_fn(output, y[batch]) + l0_weight * reference.penalty()
            optimizer.zero_grad()
            loss.backward()
            grad = reference.log_alpha.grad
            if not (torch.isfinite(loss) and torch.isfinite(grad).all()):
                n_skipped += 1
                continue
            optimizer.step()
            total += loss.item() * len(batch)
            n_seen += len(batch)
        curve.append(total / n_seen)
    return merger, result, reference, curve, n_skipped


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


def testper_sample_task_losses_of_a_criterion_vmap_cannot_trace():
    def loss(output, target):
        # .item() breaks vmap; the loop fallback must give the same values.
        scale = 2.0 if float(target.float().mean().item()) >= 0 else 1.0
        return scale * torch.nn.functional.mse_loss(output, target)

    merger = SoftMerge([_linear(1.0), _linear(0.5)])
    X = torch.linspace(-1, 1, 7).unsqueeze(1)
    y = torch.zeros(7, 1)
    losses = per_sample_task_losses(merger, loss, X, y, None, gates=merger.gates())
    expected = 2.0 * (0.75 * X.squeeze(1)) ** 2
    np.testing.assert_allclose(losses, expected.numpy(), rtol=1e-6)


def _overflowing_merger():
    """Two sound members and one whose weight is huge: its gate, started
    closed, is sometimes drawn open, and the sampled merge then overflows."""
    merger = SoftMerge([_linear(1.0), _linear(0.5), _linear(1e30)])
    merger.start_from(torch.tensor([[1.0], [1.0], [0.0]]))
    return merger


@pytest.mark.parametrize("l0_weight", [0.0, 0.3])
def test_non_finite_steps_are_skipped(l0_weight):
    """learn_gates is torch.optim.Adam on the documented objective, over the
    steps whose loss and gradient are finite; the others leave no trace."""
    X = torch.randn(100, 1, generator=torch.Generator().manual_seed(0))
    y = 0.8 * X
    merger, result, reference, curve, n_skipped = _learned_and_reference(
        _overflowing_merger, torch.nn.functional.mse_loss, X, y, l0_weight, max_epochs=3
    )
    assert 0 < n_skipped < 21
    assert result.n_skipped_steps == n_skipped
    torch.testing.assert_close(merger.log_alpha, reference.log_alpha)
    # Means over the steps taken: no zero, nor any other trace, of the others.
    np.testing.assert_allclose(result.loss_curve, curve, rtol=1e-5)
    assert all(np.isfinite(result.loss_curve))


def test_epoch_whose_every_step_is_skipped_records_nan():
    merger = SoftMerge([_linear(1e30), _linear(2e30)])
    start = merger.log_alpha.detach().clone()
    X = torch.randn(40, 1, generator=torch.Generator().manual_seed(0))
    result = learn_gates(
        merger,
        torch.nn.functional.mse_loss,
        X,
        X.clone(),
        max_epochs=2,
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.n_skipped_steps == 6
    assert np.isnan(result.loss_curve).all()
    assert torch.equal(merger.log_alpha.detach(), start)


def test_estimators_count_skipped_steps(digits, diabetes, members, regressors):
    from sk_softmerge import SoftMergeClassifier, SoftMergeRegressor

    def huge(member):
        member = copy.deepcopy(member)
        with torch.no_grad():
            for p in member.module_.parameters():
                p.fill_(1e30)
        return member

    fit = dict(max_epochs=3, random_state=0, cv=None, validation_fraction=0)
    for Merge, nets, (X, y) in [
        (SoftMergeClassifier, members, digits),
        (SoftMergeRegressor, regressors, diabetes),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            clean = Merge(nets, **fit).fit(X, y)
            broken = Merge([*nets, huge(nets[0])], **fit).fit(X, y)
        assert clean.n_skipped_steps_ == 0
        assert broken.n_skipped_steps_ > 0
        # An epoch whose every step overflowed records NaN, never 0 or inf.
        curve = np.asarray(broken.loss_curve_)
        assert not (curve == 0).any() and not np.isinf(curve).any()
        assert (broken.gates_[-1] == 0).all()
        assert np.isfinite(broken.predict(X)).all()


def test_fit_evaluates_at_most_evaluation_batches_at_once(digits, members):
    """A large held-out part costs evaluation batches of EVALUATION_BATCHES
    training batches, never one forward pass over all of it."""
    from sk_softmerge import SoftMergeClassifier
    from sk_softmerge._core._evaluation import EVALUATION_BATCHES

    X, y = digits
    sizes = []
    nets = [copy.deepcopy(net) for net in members]
    for net in nets:
        net.module_.register_forward_pre_hook(
            lambda _, args: sizes.append(args[0].shape[0])
        )
    SoftMergeClassifier(nets, batch_size=8, max_epochs=1, random_state=0).fit(X, y)
    assert max(sizes) == EVALUATION_BATCHES * 8
