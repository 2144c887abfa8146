"""Fixed rules as starts and fallbacks: uniform average, members, greedy soup."""

import numpy as np
import pytest
import torch
from skorch import NeuralNetRegressor

import sk_softmerge._softmerge
from sk_softmerge import SoftMergeRegressor
from sk_softmerge._rules import (
    Candidate,
    RuleBook,
    choose_start,
    fixed_rules,
    greedy_soup,
)


def linear_member(weight):
    """A fitted skorch regressor computing ``weight * x``."""
    net = NeuralNetRegressor(
        torch.nn.Linear, module__in_features=1, module__out_features=1, verbose=0
    )
    net.initialize()
    with torch.no_grad():
        net.module_.weight.fill_(weight)
        net.module_.bias.zero_()
    return net


@pytest.fixture(scope="module")
def line():
    X = np.linspace(-1, 1, 400, dtype=np.float32)[:, None]
    return X, X.copy()


@pytest.fixture(scope="module")
def two_halves_and_an_outsider():
    # Each of the first two members is off by 10%, their average is exact; the
    # third drags every average that holds it (but is no outlier to screen).
    return [linear_member(1.1), linear_member(0.9), linear_member(-0.5)]


class TestGreedySoup:
    def test_adds_in_order_of_score_while_the_score_does_not_drop(self):
        calls = []

        def score(ingredients):
            calls.append(list(ingredients))
            return {1: 0.5, 2: 0.8}.get(len(ingredients), 0.1)

        ingredients, best = greedy_soup([0.2, 0.9, 0.4, 0.6], score)
        assert calls == [[1], [1, 3], [1, 3, 2], [1, 3, 0]]
        assert ingredients == [1, 3] and best == 0.8

    def test_equal_scores_in_the_members_order_and_equal_soups_kept(self):
        ingredients, _ = greedy_soup([0.3, 0.5, 0.3], lambda ingredients: 0.5)
        assert ingredients == [1, 0, 2]


class TestFixedRules:
    def test_greedy_soup_left_out_when_it_is_one_member_or_the_average(self):
        average = torch.ones(3, 2)
        one = fixed_rules(average, [0, 1, 2], [0.1, 0.9, 0.2], lambda g: -g.sum())
        every = fixed_rules(average, [0, 1, 2], [0.1, 0.9, 0.2], lambda g: g.sum())
        names = ["uniform average", "member 0", "member 1", "member 2"]
        assert [c.name for c in one] == [c.name for c in every] == names

    def test_screened_weights_stay_closed_in_every_soup(self):
        average = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        rules = fixed_rules(
            average, [0, 2, 5], [0.9, 0.8, 0.1], lambda g: float(g[2].sum() == 0)
        )
        soup = rules[-1]
        assert soup.name == "greedy soup"
        torch.testing.assert_close(
            soup.gates, torch.tensor([[1.0, 1.0], [1, 0], [0, 0]])
        )
        assert [c.member for c in rules] == [None, 0, 2, 5, None]

    def test_start_is_the_average_unless_significantly_beaten(self):
        rules = [
            Candidate("uniform average", torch.ones(2, 1)),
            Candidate("greedy soup", torch.tensor([[1.0], [0.0]])),
        ]
        errors = np.zeros(50)
        errors[:3] = 1.0  # three errors more: within the noise
        losses = {"uniform average": errors, "greedy soup": np.zeros(50)}
        assert choose_start(rules, losses).name == "uniform average"
        errors[:20] = 1.0
        assert choose_start(rules, losses).name == "greedy soup"


class TestRuleBook:
    """Soups are evaluated on the samples asked for, each sample once."""

    @pytest.fixture
    def book(self):
        asked = []

        def soup_errors(gates, index):
            asked.append((gates[:, 0].tolist(), index))
            if gates[2, 0] == 1:  # member 2 breaks every soup it joins
                return None
            positions = np.arange(100) if index is None else index
            if gates[1, 0] == 1:  # member 1 errs everywhere in a soup
                return np.ones(len(positions))
            return (positions % 2).astype(float)

        members = [np.zeros(100), np.ones(100), np.zeros(100)]
        book = RuleBook(torch.ones(3, 1), [0, 1, 2], members, soup_errors, _score, 100)
        return book, asked

    def test_trial_soups_pass_only_the_choosing_samples(self, book):
        book, asked = book
        choosing = np.array([3, 10, 11])
        _, errors, soup = book.rules(choosing)
        assert soup.name == "member 0"  # member 1 worsens it, member 2 breaks it
        assert asked and all(np.array_equal(index, choosing) for _, index in asked)
        np.testing.assert_array_equal(errors["member 1"], [1.0, 1.0, 1.0])
        assert errors["uniform average"] is None

    def test_each_sample_evaluated_once(self, book):
        book, asked = book
        soup_of_0 = Candidate("soup", torch.tensor([[1.0], [0.0], [0.0]]))
        np.testing.assert_array_equal(book.errors(soup_of_0, np.array([4, 5])), [0, 1])
        np.testing.assert_array_equal(book.errors(soup_of_0, np.array([5, 7])), [1, 1])
        full = book.errors(soup_of_0)
        np.testing.assert_array_equal(full, np.arange(100) % 2)
        indices = [index for _, index in asked]
        np.testing.assert_array_equal(indices[0], [4, 5])
        np.testing.assert_array_equal(indices[1], [7])
        assert len(indices[2]) == 97 and not {4, 5, 7} & set(indices[2])
        book.errors(soup_of_0)
        assert len(asked) == 3

    def test_a_soup_that_does_not_predict_is_asked_once(self, book):
        book, asked = book
        average = book.data_free_rules()[0]
        assert book.errors(average, np.array([0])) is None
        assert book.errors(average, np.array([1])) is None
        assert book.errors(average) is None
        assert len(asked) == 1
        assert asked[0][1] is not None


def _score(errors):
    return -np.inf if errors is None else 1 - errors.mean()


class TestEstimator:
    def test_starts_from_the_greedy_soup(self, two_halves_and_an_outsider, line):
        merge = SoftMergeRegressor(
            two_halves_and_an_outsider, max_epochs=1, lr=1e-6, random_state=0
        ).fit(*line)
        assert merge.start_ == "greedy soup"
        assert merge.selected_ == "soft merge"
        assert set(merge.validation_scores_) == {
            "soft merge",
            "uniform average",
            "member 0",
            "member 1",
            "member 2",
            "greedy soup",
        }
        # The greedy soup's members open with equal gates, the outsider closed.
        gates = merge.gates_[:, 0]
        assert gates[0] == gates[1] > 0 and gates[2] == 0
        X, y = line
        np.testing.assert_allclose(merge.predict(X), y, atol=1e-6)

    def test_falls_back_to_the_greedy_soup(
        self, two_halves_and_an_outsider, line, monkeypatch
    ):
        monkeypatch.setattr(
            sk_softmerge._softmerge, "choose_start", lambda rules, losses: rules[0]
        )
        merge = SoftMergeRegressor(
            two_halves_and_an_outsider, max_epochs=1, lr=1e-6, random_state=0
        )
        with pytest.warns(UserWarning, match="falling back to greedy soup"):
            merge.fit(*line)
        assert merge.start_ == "uniform average"
        assert merge.selected_ == "greedy soup"
        np.testing.assert_array_equal(merge.gates_[:, 0], [1.0, 1.0, 0.0])
        X, y = line
        np.testing.assert_allclose(merge.predict(X), y, atol=1e-6)


@pytest.fixture(scope="module")
def pair():
    """Members off by +20% and -40%: the average is off by 10%, and gates
    weighting them 2:1 are exact."""
    return [linear_member(1.2), linear_member(0.6)]


class TestRefit:
    """Relearning on all the data, on ``pair``."""

    def _recorded_fit(self, members, line, monkeypatch, **params):
        calls = []
        learn_gates = sk_softmerge._softmerge.learn_gates

        def recording(merger, loss, X, y, **kwargs):
            samples = kwargs.get("samples")
            n = len(X) if samples is None else len(samples)
            calls.append((n, kwargs["max_epochs"], merger.gates().detach()))
            return learn_gates(merger, loss, X, y, **kwargs)

        monkeypatch.setattr(sk_softmerge._softmerge, "learn_gates", recording)
        params = {"cv": None, **params}
        merge = SoftMergeRegressor(
            members, max_epochs=10, lr=0.2, batch_size=32, random_state=0, **params
        )
        return merge.fit(*line), calls

    def test_cross_fitting_learns_every_fold_then_all_data_from_the_start(
        self, pair, line, monkeypatch
    ):
        merge, calls = self._recorded_fit(pair, line, monkeypatch, cv=5)
        assert merge.selected_ == "soft merge" and merge.best_epoch_ > 0
        *folds, (n_all, final_epochs, final_start) = calls
        assert [(n, epochs) for n, epochs, _ in folds] == [(320, 10)] * 5
        # As many epochs as the folds chose, on all samples.
        assert (n_all, final_epochs) == (400, merge.best_epoch_)
        torch.testing.assert_close(final_start, folds[0][2])
        scores = merge.validation_scores_
        assert scores["soft merge"] > scores["uniform average"]
        assert merge.score(*line) >= 0.99

    def test_kept_epochs_are_relearned_on_all_data_from_the_start(
        self, pair, line, monkeypatch
    ):
        merge, calls = self._recorded_fit(pair, line, monkeypatch)
        assert merge.selected_ == "soft merge" and merge.best_epoch_ > 0
        (n_train, epochs, start), (n_all, refit_epochs, refit_start) = calls
        assert merge.start_ == "uniform average"
        assert (n_train, epochs) == (320, 10)
        assert (n_all, refit_epochs) == (400, merge.best_epoch_)
        torch.testing.assert_close(refit_start, start)
        assert merge.gates_[0, 0] > merge.gates_[1, 0]
        assert merge.score(*line) > 0.99

    def test_without_refit_the_checked_gates_are_kept(self, pair, line, monkeypatch):
        merge, calls = self._recorded_fit(pair, line, monkeypatch, refit=False)
        assert len(calls) == 1 and merge.best_epoch_ > 0
        assert merge.score(*line) > 0.99
