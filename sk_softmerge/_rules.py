"""The fixed merge rules a fit starts from and falls back to.

A *candidate* is a fixed rule expressed as gates: the uniform average (every
gate open), one member alone (its gates open, all others closed), or a greedy
soup (the gates of its ingredients open). Gate learning starts from the best
candidate, and the learned merge is checked against all of them on data the
gates did not learn on (out of fold, or a held-out part), so that a fit never
returns less than the best fixed rule by more than the noise of that data.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._core._evaluation import choose_lowest_loss

GREEDY_SOUP = "greedy soup"


@dataclass(frozen=True)
class Candidate:
    """A fixed merge rule, as gates over the members' units.

    Parameters
    ----------
    name : str
        ``"uniform average"``, ``"greedy soup"`` or ``"member i"`` (``i`` the
        member's position in the user's ``estimators``).
    gates : torch.Tensor of shape (n_members, n_units)
        0/1 gates; a member alone has exactly one open row.
    member : int or None, default=None
        Position of the member in ``estimators`` for a member alone, whose
        own net (its batch-norm statistics included) is what it predicts with.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._rules import Candidate
    >>> Candidate("member 1", torch.tensor([[0.0], [1.0]]), member=1).member
    1
    """

    name: str
    gates: torch.Tensor
    member: int | None = None


def greedy_soup(
    member_scores: Sequence[float], soup_score: Callable[[list[int]], float]
) -> tuple[list[int], float]:
    """Ingredients of a greedy soup (Wortsman et al., 2022).

    Members are tried in decreasing order of their own score (members of
    equal score in their order); each is added to the soup when the soup's
    score with it is not lower than without.

    Parameters
    ----------
    member_scores : sequence of float
        Score of every member alone (higher is better).
    soup_score : callable
        ``soup_score(ingredients)``: score of the average of the members at
        the positions ``ingredients``.

    Returns
    -------
    ingredients : list of int
        Positions of the members in the soup, best member first.
    score : float
        The soup's score.

    Examples
    --------
    >>> from sk_softmerge._rules import greedy_soup
    >>> values = [0.5, 0.9, 0.6]
    >>> def score(ingredients):  # a soup is as good as its best ingredient,
    ...     return max(values[i] for i in ingredients) - 0.1 * (2 in ingredients)
    >>> greedy_soup(values, score)
    ([1, 0], 0.9)
    """
    # Decreasing score; equal scores in the members' order.
    order = sorted(range(len(member_scores)), key=lambda i: -member_scores[i])
    ingredients = [order[0]]
    best = soup_score(ingredients)
    for candidate in order[1:]:
        trial = soup_score([*ingredients, candidate])
        if trial >= best:
            ingredients, best = [*ingredients, candidate], trial
    return ingredients, best


def fixed_rules(
    average: torch.Tensor,
    members: Sequence[int],
    member_scores: Sequence[float],
    soup_score: Callable[[torch.Tensor], float],
    names: Sequence[str] | None = None,
) -> list[Candidate]:
    """The uniform average, every member alone and the greedy soup.

    Parameters
    ----------
    average : torch.Tensor of shape (n_members, n_units)
        Gates of the uniform average: 1, except where a member's weights on a
        unit were screened out (0).
    members : sequence of int
        Position in ``estimators`` of every row of ``average``.
    member_scores : sequence of float
        Score of every member alone, in the order of the rows.
    soup_score : callable
        ``soup_score(gates)``: score of the merge with the given gates.
    names : sequence of str, default=None
        Name of every estimator (indexed by position in ``estimators``);
        ``None`` names them ``"member i"``.

    Returns
    -------
    candidates : list of Candidate
        The uniform average, each member, then the greedy soup unless it is
        one of them (one ingredient, or every member).

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._rules import fixed_rules
    >>> values = [0.5, 0.9, 0.8]
    >>> def score(gates):  # a soup without member 0 scores 0.95
    ...     return 0.95 if gates[0].sum() == 0 else 0.7
    >>> rules = fixed_rules(torch.ones(3, 2), [0, 1, 2], values, score)
    >>> [rule.name for rule in rules]
    ['uniform average', 'member 0', 'member 1', 'member 2', 'greedy soup']
    >>> rules[-1].gates[:, 0]
    tensor([0., 1., 1.])
    """
    return _rules_and_soup(average, members, member_scores, soup_score, names)[0]


def _rules_and_soup(average, members, member_scores, soup_score, names):
    """:func:`fixed_rules`, and the candidate the greedy soup amounts to."""
    candidates = _data_free_rules(average, members, names)
    soup = greedy_soup_rule(candidates, member_scores, soup_score)
    if soup.name == GREEDY_SOUP:
        candidates.append(soup)
    return candidates, soup


def _data_free_rules(average, members, names) -> list[Candidate]:
    """The uniform average and every member alone: the rules that no data
    choose."""
    candidates = [Candidate("uniform average", average)]
    for row, member in enumerate(members):
        # One column, expanded: n_members values, not n_members x n_units.
        alone = torch.zeros_like(average[:, :1])
        alone[row] = 1.0
        name = f"member {member}" if names is None else names[member]
        candidates.append(Candidate(name, alone.expand_as(average), member=member))
    return candidates


def greedy_soup_rule(
    candidates: Sequence[Candidate],
    member_scores: Sequence[float],
    soup_score: Callable[[torch.Tensor], float],
) -> Candidate:
    """The greedy soup over the members of ``candidates``, as a candidate.

    Parameters
    ----------
    candidates : sequence of Candidate
        The uniform average, then every member alone, in the order of the
        rows (as :func:`fixed_rules` lists them).
    member_scores : sequence of float
        Score of every member alone, in the order of the rows.
    soup_score : callable
        ``soup_score(gates)``: score of the merge with the given gates.

    Returns
    -------
    soup : Candidate
        ``"greedy soup"``, or the candidate it amounts to: the member alone
        when no other joined it, the uniform average when every member did.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._rules import fixed_rules, greedy_soup_rule
    >>> rules = fixed_rules(torch.ones(2, 1), [0, 1], [0.5, 0.9], lambda g: 0.1)
    >>> greedy_soup_rule(rules, [0.5, 0.9], lambda g: -g.sum()).name
    'member 1'
    """
    average = candidates[0].gates

    def ingredients_gates(ingredients):
        mask = torch.zeros_like(average[:, :1])
        mask[ingredients] = 1.0
        return average * mask

    ingredients, _ = greedy_soup(
        member_scores, lambda ingredients: soup_score(ingredients_gates(ingredients))
    )
    if len(ingredients) == 1:
        return candidates[1 + ingredients[0]]
    soup = ingredients_gates(ingredients)
    if torch.equal(soup, average):
        return candidates[0]
    return Candidate(GREEDY_SOUP, soup)


def choose_start(
    candidates: Sequence[Candidate], losses: dict[str, np.ndarray | None]
) -> Candidate:
    """The uniform average, unless another rule is significantly better.

    The greedy soup's score is the best of many tries on the same samples, and
    a member's lead over the average is often noise: the one-sided paired test
    of :func:`~sk_softmerge._core._evaluation.choose_lowest_loss` keeps the average
    unless a rule beats it by more than that noise.

    Parameters
    ----------
    candidates : sequence of Candidate
        The rules of :func:`fixed_rules`, the uniform average first.
    losses : dict of str to ndarray or None
        Per-sample held-out loss of every candidate, by name.

    Returns
    -------
    start : Candidate

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sk_softmerge._rules import Candidate, choose_start
    >>> rules = [Candidate("uniform average", torch.ones(2, 1)),
    ...          Candidate("member 0", torch.tensor([[1.0], [0.0]]), member=0)]
    >>> errors = np.zeros(100)
    >>> choose_start(rules, {"uniform average": errors + 1, "member 0": errors}).name
    'member 0'
    >>> choose_start(rules, {"uniform average": errors, "member 0": errors}).name
    'uniform average'
    """
    name = choose_lowest_loss(
        {c.name: losses[c.name] for c in candidates}, candidates[0].name
    )
    return next(candidate for candidate in candidates if candidate.name == name)


class RuleBook:
    """Every fixed rule's per-sample errors on one set of samples, and the
    rules that any subset of those samples chooses.

    Members' and soups' errors do not depend on which samples choose among
    them: a member's are computed once, on every sample, and a soup's on the
    samples it is first asked for, then on those it has not yet seen, so
    that every fold and the final fit share one evaluation of each sample
    and the greedy soup's trials pass only the samples that choose among
    them, not every sample.

    Parameters
    ----------
    average : torch.Tensor of shape (n_members, n_units)
        Gates of the uniform average.
    members : sequence of int
        Position in ``estimators`` of every row of ``average``.
    member_errors : sequence of ndarray or None
        Per-sample errors of every member alone, in the order of the rows
        (``None``: the member does not predict).
    soup_errors : callable
        ``soup_errors(gates, index)``: per-sample errors of the merge with the
        given gates on the samples at the positions ``index`` (ndarray of
        int, in increasing order; ``None`` for all), or ``None`` when it does
        not predict.
    score : callable
        ``score(errors)``: the score that errors amount to (higher is better).
    n_samples : int
        Number of samples.
    names : sequence of str, default=None
        Name of every estimator; ``None`` names them ``"member i"``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sk_softmerge._rules import RuleBook
    >>> def soup_errors(gates, index):  # two members err on sample 2
    ...     print("soup of", gates[:, 0].tolist(), "on samples", index)
    ...     return ((index == 2) & bool(gates.sum() > 1)).astype(float)
    >>> book = RuleBook(torch.ones(2, 1), [0, 1],
    ...                 [np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 1.0])],
    ...                 soup_errors, lambda errors: 1 - errors.mean(), 3)
    >>> candidates, errors, soup = book.rules(np.array([1, 2]))
    soup of [1.0, 0.0] on samples [1 2]
    soup of [1.0, 1.0] on samples [1 2]
    >>> [c.name for c in candidates], soup.name
    (['uniform average', 'member 0', 'member 1'], 'member 0')
    >>> errors["member 1"]
    array([1., 1.])
    >>> book.errors(candidates[0])  # the uniform average: sample 0 is new
    soup of [1.0, 1.0] on samples [0]
    array([0., 0., 1.])
    """

    def __init__(
        self, average, members, member_errors, soup_errors, score, n_samples, names=None
    ):
        self._average, self._members, self._names = average, members, names
        self._member_errors = list(member_errors)
        self._soup_errors, self._score = soup_errors, score
        self._n_samples = n_samples
        # Per soup: its errors, and which of them are known (None: no
        # prediction).
        self._soups: dict[bytes, tuple[np.ndarray, np.ndarray] | None] = {}

    def data_free_rules(self) -> list[Candidate]:
        """The uniform average and every member alone: the rules whose errors
        do not depend on the samples that choose among the rules."""
        return _data_free_rules(self._average, self._members, self._names)

    def errors(self, candidate: Candidate, index=None) -> np.ndarray | None:
        """Per-sample errors of ``candidate`` on the samples ``index`` (all
        when ``None``); ``None`` when it does not predict."""
        if candidate.member is not None:
            found = self._member_errors[self._members.index(candidate.member)]
            return _subset(found, index)
        return self._soup(candidate.gates, index)

    def _soup(self, gates, index) -> np.ndarray | None:
        """A soup's errors on ``index``, evaluated on those samples not yet
        evaluated."""
        key = gates.cpu().numpy().tobytes()
        n = self._n_samples
        if key not in self._soups:
            self._soups[key] = (np.zeros(n), np.zeros(n, dtype=bool))
        if self._soups[key] is None:
            return None
        values, known = self._soups[key]
        wanted = np.arange(n) if index is None else np.unique(index)
        missing = wanted[~known[wanted]]
        if len(missing):
            everything = len(missing) == n
            found = self._soup_errors(gates, None if everything else missing)
            if found is None:
                self._soups[key] = None
                return None
            values[missing], known[missing] = found, True
        return _subset(values, index)

    def rules(self, index=None) -> tuple[list[Candidate], dict, Candidate]:
        """The fixed rules chosen on the samples ``index`` (all when
        ``None``), as :func:`fixed_rules` gives them, every rule's errors on
        those samples by name, and the candidate the greedy soup amounts to."""

        def score(candidate):
            return self._score(self.errors(candidate, index))

        def soup_score(gates):
            return score(Candidate(GREEDY_SOUP, gates))

        member_scores = [self._score(_subset(e, index)) for e in self._member_errors]
        candidates, soup = _rules_and_soup(
            self._average, self._members, member_scores, soup_score, self._names
        )
        errors = {c.name: self.errors(c, index) for c in candidates}
        return candidates, errors, soup


def _subset(errors: np.ndarray | None, index) -> np.ndarray | None:
    return errors if errors is None or index is None else errors[index]
