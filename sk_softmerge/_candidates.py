"""The fixed merge rules a fit starts from and falls back to.

A *candidate* is a fixed rule expressed as gates: the uniform average (every
gate open), one member alone (its gates open, all others closed), or a greedy
soup (the gates of its ingredients open). Gate learning starts from the best
candidate on held-out data, and the learned merge is checked against all of
them, so that a fit never returns less than the best fixed rule by more than
the noise of that data.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._evaluation import choose_lowest_loss


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
    >>> from sk_softmerge._candidates import Candidate
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
    >>> from sk_softmerge._candidates import greedy_soup
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
    >>> from sk_softmerge._candidates import fixed_rules
    >>> values = [0.5, 0.9, 0.8]
    >>> def score(gates):  # a soup without member 0 scores 0.95
    ...     return 0.95 if gates[0].sum() == 0 else 0.7
    >>> rules = fixed_rules(torch.ones(3, 2), [0, 1, 2], values, score)
    >>> [rule.name for rule in rules]
    ['uniform average', 'member 0', 'member 1', 'member 2', 'greedy soup']
    >>> rules[-1].gates[:, 0]
    tensor([0., 1., 1.])
    """
    candidates = [Candidate("uniform average", average)]
    for row, member in enumerate(members):
        # One column, expanded: n_members values, not n_members x n_units.
        alone = torch.zeros_like(average[:, :1])
        alone[row] = 1.0
        name = f"member {member}" if names is None else names[member]
        candidates.append(Candidate(name, alone.expand_as(average), member=member))

    def ingredients_gates(ingredients):
        mask = torch.zeros_like(average[:, :1])
        mask[ingredients] = 1.0
        return average * mask

    ingredients, _ = greedy_soup(
        member_scores, lambda ingredients: soup_score(ingredients_gates(ingredients))
    )
    soup = ingredients_gates(ingredients)
    # One ingredient is a member alone; the average's gates are the average.
    if len(ingredients) > 1 and not torch.equal(soup, average):
        candidates.append(Candidate("greedy soup", soup))
    return candidates


def choose_start(
    candidates: Sequence[Candidate], losses: dict[str, np.ndarray | None]
) -> Candidate:
    """The uniform average, unless another rule is significantly better.

    The greedy soup's score is the best of many tries on the same samples, and
    a member's lead over the average is often noise: the one-sided paired test
    of :func:`~sk_softmerge._evaluation.choose_lowest_loss` keeps the average
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
    >>> from sk_softmerge._candidates import Candidate, choose_start
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
