"""REPAIR: the statistics correction of merged hidden units."""

import copy

import numpy as np
import pytest
import torch

import sk_softmerge._softmerge
from sk_softmerge import SoftMerge, SoftMergeClassifier, align_modules
from sk_softmerge._align._activations import unit_moments
from sk_softmerge._align._repair import member_moments, repair_of, repair_sites
from sk_softmerge._core._training import learn_gates

from conftest import independent_members as train_independent

N_FEATURES = 6


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 12),
        torch.nn.ReLU(),
        torch.nn.Linear(12, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    )


def conv():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, N_FEATURES)),
        torch.nn.Conv1d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Conv1d(4, 5, 3, padding=1),
        torch.nn.BatchNorm1d(5),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 4, 3),
    )


def members(architecture, n=3):
    modules = []
    for seed in range(n):
        torch.manual_seed(seed)
        modules.append(architecture().eval())
    return modules


@pytest.fixture
def X():
    return torch.randn(300, N_FEATURES, generator=torch.Generator().manual_seed(0))


def repaired_merger(modules, X, granularity="neuron"):
    merger = SoftMerge(modules, granularity=granularity)
    sites = repair_sites(modules[0], X)
    states = [m.state_dict() for m in modules]
    repair, kept = repair_of(
        merger, sites, member_moments(modules[0], states, sites, X)
    )
    merger.set_repair(repair)
    return merger.use_batch_statistics(), kept


def site_moments(module, sites, X):
    """Mean and std of each site's units in ``module`` on X."""
    return unit_moments(
        module,
        [module.state_dict()],
        [s.site for s in sites],
        [s.size for s in sites],
        X,
    )


class TestSites:
    def test_hidden_layers_of_an_mlp(self, X):
        assert [(s.layer, s.size) for s in repair_sites(mlp(), X)] == [
            ("0", 12),
            ("2", 8),
        ]

    def test_units_that_pass_through_batch_norm_are_left_to_it(self, X):
        assert [(s.layer, s.axis, s.size) for s in repair_sites(conv(), X)] == [
            ("1", 1, 4)
        ]

    def test_untraceable_module_refused(self, X):
        class DataDependent(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(N_FEATURES, 2)

            def forward(self, x):
                return self.fc(x) if x.sum() > 0 else -self.fc(x)

        with pytest.raises(ValueError, match="repair corrects hidden units"):
            repair_sites(DataDependent(), X)


class TestFold:
    @pytest.mark.parametrize("architecture", [mlp, conv])
    def test_identical_members_unchanged(self, architecture, X):
        modules = [architecture().eval()] * 3
        merger, _ = repaired_merger(modules, X)
        gates = torch.rand(merger.gates().shape) * 0.9 + 0.1
        state = merger.merged_state_dict(gates, statistics_from=X)
        for name, value in modules[0].state_dict().items():
            if "running" in name or "num_batches" in name:
                continue  # recomputed batch-norm statistics
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("granularity", ["neuron", "layer", "tensor"])
    def test_corrected_statistics_match_their_targets(self, granularity, X):
        modules = members(mlp)
        merger, sites = repaired_merger(modules, X, granularity)
        gates = torch.rand(
            merger.gates().shape, generator=torch.Generator().manual_seed(1)
        )
        state = merger.merged_state_dict(gates, statistics_from=X)
        merged = copy.deepcopy(modules[0])
        merged.load_state_dict(state)
        got = site_moments(merged, sites, X)
        for site, (mean, std) in zip(sites, got, strict=True):
            # The gate-weighted average of the members' statistics, written
            # out with the gates of each of the site's units.
            columns = [
                u
                for u, unit in enumerate(merger.units)
                if f"{site.layer}.weight" in unit.parameters
            ]
            if len(columns) == 1:
                columns = columns * site.size
            weights = gates[:, columns].double().numpy()
            weights /= weights.sum(0)
            ((member_mean, member_std),) = member_moments(
                modules[0], [m.state_dict() for m in modules], [site], X
            )
            np.testing.assert_allclose(
                mean[0], (weights * member_mean).sum(0), atol=1e-4
            )
            np.testing.assert_allclose(
                std[0], (weights * member_std).sum(0), rtol=1e-3, atol=1e-4
            )

    def test_merged_net_keeps_the_architecture(self, X):
        modules = members(mlp)
        merger, _ = repaired_merger(modules, X)
        state = merger.merged_state_dict(statistics_from=X)
        assert {k: v.shape for k, v in state.items()} == {
            k: v.shape for k, v in modules[0].state_dict().items()
        }

    def test_statistics_data_required(self, X):
        merger, _ = repaired_merger(members(mlp), X)
        with pytest.raises(ValueError, match="pass statistics_from"):
            merger.merged_state_dict()

    def test_members_untouched(self, X):
        modules = members(mlp)
        before = [copy.deepcopy(m.state_dict()) for m in modules]
        merger, _ = repaired_merger(modules, X)
        merger.merged_state_dict(statistics_from=X)
        for module, state in zip(modules, before, strict=True):
            for name, value in module.state_dict().items():
                assert torch.equal(value, state[name])


class TestForward:
    def test_one_batch_forward_is_the_folded_net(self, X):
        # Batch statistics of a batch holding all of X are those of X.
        modules = members(mlp)
        merger, _ = repaired_merger(modules, X)
        gates = torch.rand(merger.gates().shape)
        merged = copy.deepcopy(modules[0])
        merged.load_state_dict(merger.merged_state_dict(gates, statistics_from=X))
        with torch.no_grad():
            torch.testing.assert_close(
                merger(X, gates=gates), merged(X), rtol=1e-3, atol=1e-4
            )

    def test_batch_of_one_sample(self, X):
        # The last batch of an epoch can hold one sample: no spread to measure.
        merger, _ = repaired_merger(members(mlp), X)
        y = torch.randint(0, 3, (129,))
        result = learn_gates(
            merger, torch.nn.functional.cross_entropy, X[:129], y, batch_size=128
        )
        assert np.isfinite(result.loss_curve).all()
        assert torch.isfinite(merger.log_alpha).all()

    def test_gates_learn_through_the_correction(self, X):
        modules = members(mlp)
        merger, _ = repaired_merger(modules, X)
        start = merger.log_alpha.detach().clone()
        y = torch.randint(0, 3, (X.shape[0],))
        result = learn_gates(
            merger, torch.nn.functional.cross_entropy, X, y, max_epochs=2
        )
        assert np.isfinite(result.loss_curve).all()
        assert not torch.equal(merger.log_alpha.detach(), start)


def digits_mlp(n_features, n_classes):
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, n_classes),
    )


@pytest.fixture(scope="module")
def independent(digits):
    return train_independent(*digits, digits_mlp, max_epochs=4)


class TestEstimator:
    @pytest.mark.parametrize(
        "align, repair, expected",
        [
            (None, "auto", []),
            ("activation_matching", "auto", ["0"]),
            ("weight_matching", False, []),
            (None, True, ["0"]),
        ],
    )
    def test_repair_parameter(self, independent, digits, align, repair, expected):
        X, y = digits
        merge = SoftMergeClassifier(
            independent, align=align, repair=repair, max_epochs=2, random_state=0
        ).fit(X, y)
        assert merge.repaired_layers_ == expected
        assert merge.predict(X).shape == y.shape

    def test_repair_restores_the_spread_of_averaged_units(
        self, independent, digits, monkeypatch
    ):
        X, y = digits
        # From the average: a start from one member alone needs no repair.
        monkeypatch.setattr(sk_softmerge._softmerge, "choose_start", lambda c, e: c[0])
        params = dict(
            align="activation_matching",
            max_epochs=1,
            lr=0.05,  # one small epoch: gates still near the average's
            cv=None,
            validation_fraction=0,
            random_state=0,
        )
        spreads = {}
        for repair in (False, True):
            merge = SoftMergeClassifier(independent, repair=repair, **params)
            module = merge.fit(X, y).merged_net_.module_
            with torch.no_grad():
                spreads[repair] = module[0](torch.as_tensor(X)).std(0)
        modules = [net.module_ for net in independent]
        aligned = align_modules(modules, X, method="activation_matching")
        [(_, member_std)] = member_moments(
            aligned[0],
            [m.state_dict() for m in aligned],
            repair_sites(aligned[0], X),
            X,
        )
        torch.testing.assert_close(
            spreads[True].double(),
            torch.as_tensor(member_std.mean(0)),
            rtol=1e-2,
            atol=1e-3,
        )
        assert (spreads[False] < spreads[True]).float().mean() > 0.9

    def test_nonfinite_member_excluded(self, independent, digits):
        X, y = digits
        broken = copy.deepcopy(independent[0])
        with torch.no_grad():
            broken.module_[0].weight[0, 0] = float("nan")
        with pytest.warns(UserWarning, match="non-finite"):
            merge = SoftMergeClassifier(
                [broken, *independent[1:]],
                align="activation_matching",
                max_epochs=2,
                random_state=0,
            ).fit(X, y)
        assert np.isfinite(merge.predict_proba(X)).all()
        assert merge.score(X, y) > 0.8
