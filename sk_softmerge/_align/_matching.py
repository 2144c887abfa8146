"""Choosing the permutations that align members' hidden units.

Given the permutation groups of an architecture
(:func:`~sk_softmerge._align._spec.permutation_spec`), each member other than a
reference gets one permutation per group, so that its units line up with the
others'. Two measures of a match are offered: the members' weights (weight
matching, Ainsworth, Hayase and Srinivasa, "Git Re-Basin", ICLR 2023) and the
correlation of their hidden units' activations on data (activation matching,
as in Git Re-Basin and REPAIR).

With more than two members, matching each one to the reference alone leaves
the others' mutual mismatches in the average. :func:`align_modules` therefore
starts from that, then matches each non-reference member in turn to all the
others together (the MergeMany procedure of Git Re-Basin's appendix), until a
round changes nothing or ``MATCHING_ROUNDS`` rounds have run.
"""

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .._inputs import check_one_input
from ._activations import unit_correlations
from ._spec import (
    PermutationGroup,
    PermutedAxis,
    _permute_axis,
    permutation_spec,
    permute_state,
)

ALIGNMENTS = ("weight_matching", "activation_matching")

MATCHING_ROUNDS = 5
"""Most rounds in which every non-reference member is matched to all others."""


def _units(tensor, axis, size):
    """One row per unit of the axis (a unit's block is contiguous once moved first)."""
    return tensor.movedim(axis, 0).reshape(size, -1)


def weight_matching(
    reference: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    groups: Sequence[PermutationGroup],
    *,
    max_iter: int = 100,
    random_state: int | None = 0,
) -> list[torch.Tensor]:
    """Permutations of ``other``'s units that best match ``reference``'s weights.

    Maximises the sum, over every parameter, of the inner product between the
    reference's and the permuted other's values, by coordinate descent: each
    group in turn is solved exactly as a linear assignment problem with the
    other groups held fixed, until no group improves (Ainsworth et al., 2023,
    algorithm 1).

    Parameters
    ----------
    reference, other : dict of str to torch.Tensor
        State dicts of two modules of one architecture.
    groups : sequence of PermutationGroup
        From :func:`permutation_spec`.
    max_iter : int, default=100
        Most passes over the groups.
    random_state : int or None, default=0
        Seeds the order in which groups are visited in each pass.

    Returns
    -------
    permutations : list of torch.Tensor
        One long tensor per group, to pass to :func:`permute_state` with
        ``other``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._spec import permutation_spec, permute_state
    >>> from sk_softmerge._align._matching import weight_matching
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(),
    ...                           torch.nn.Linear(5, 2))
    >>> groups = permutation_spec(net, torch.zeros(2, 3))
    >>> shuffled = permute_state(net.state_dict(), groups,
    ...                          [torch.tensor([4, 2, 0, 1, 3])])
    >>> weight_matching(net.state_dict(), shuffled, groups)
    [tensor([2, 3, 1, 4, 0])]
    """
    rng = np.random.default_rng(random_state)
    on_tensor: dict[str, list[tuple[int, PermutedAxis]]] = {}
    for g, group in enumerate(groups):
        for axis in group.axes:
            on_tensor.setdefault(axis.tensor, []).append((g, axis))
    device = next(iter(other.values())).device
    permutations = [torch.arange(group.size, device=device) for group in groups]
    for _ in range(max_iter):
        improved = False
        for g in rng.permutation(len(groups)):
            group = groups[g]
            similarity = torch.zeros(
                group.size, group.size, dtype=torch.float64, device=device
            )
            for axis in group.axes:
                if not axis.parameter:
                    continue
                moved = other[axis.tensor]
                for h, other_axis in on_tensor[axis.tensor]:
                    if other_axis.axis != axis.axis:
                        moved = _permute_axis(
                            moved, other_axis.axis, other_axis.block, permutations[h]
                        )
                a = _units(reference[axis.tensor], axis.axis, group.size)
                b = _units(moved, axis.axis, group.size)
                similarity += a.double().to(device) @ b.double().T
            similarity = similarity.cpu().numpy()
            _, best = linear_sum_assignment(similarity, maximize=True)
            current = permutations[g].cpu().numpy()
            rows = np.arange(group.size)
            gain = similarity[rows, best].sum() - similarity[rows, current].sum()
            if gain > 1e-12 * max(1.0, abs(similarity[rows, current].sum())):
                permutations[g] = torch.as_tensor(best, device=device)
                improved = True
        if not improved:
            break
    return permutations


def activation_matching(
    module: torch.nn.Module,
    states: Sequence[dict[str, torch.Tensor]],
    groups: Sequence[PermutationGroup],
    X,
    *,
    reference: int = 0,
    max_rounds: int = MATCHING_ROUNDS,
    random_state: int | None = 0,
) -> list[list[torch.Tensor]]:
    """Permutations that best match the members' activations on ``X``.

    Every unit of every member is correlated with every unit of every other
    member where its group's units can be observed
    (:attr:`~sk_softmerge._align._spec.PermutationGroup.sites`): at the outputs
    of the layers that create them, before the activation function, and at the
    inputs of the layers that consume them, after it. The permutations
    maximise the sum, over pairs of members and sites, of the matched units'
    correlations: each member is first matched to the reference alone, then,
    in rounds, to all other members together, each group solved exactly as a
    linear assignment problem. Groups are independent: permuting one group
    does not change another's activations.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture of the state dicts; not modified.
    states : sequence of dict of str to torch.Tensor
        The members' state dicts.
    groups : sequence of PermutationGroup
        From :func:`~sk_softmerge._align._spec.permutation_spec`.
    X : array-like or torch.Tensor
        Inputs to measure the activations on, passed in batches.
    reference : int, default=0
        The member whose units keep their order.
    max_rounds : int, default=5
        Most rounds of matching each member to all the others.
    random_state : int or None, default=0
        Seeds the order in which members are visited in each round.

    Returns
    -------
    permutations : list of list of torch.Tensor
        Per member, one long tensor per group, to pass to
        :func:`~sk_softmerge._align._spec.permute_state` with its state dict.

    Notes
    -----
    Memory: one float64 ``(size, size)`` matrix per pair of members and per
    observed site of every group.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._align._spec import permutation_spec, permute_state
    >>> from sk_softmerge._align._matching import activation_matching
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(),
    ...                           torch.nn.Linear(5, 2))
    >>> groups = permutation_spec(net, torch.zeros(2, 3))
    >>> shuffled = permute_state(net.state_dict(), groups,
    ...                          [torch.tensor([4, 2, 0, 1, 3])])
    >>> activation_matching(net, [net.state_dict(), shuffled], groups,
    ...                     torch.randn(100, 3))[1]
    [tensor([2, 3, 1, 4, 0])]
    """
    sites = [site for group in groups for site in group.sites]
    sizes = [group.size for group in groups for _ in group.sites]
    pairs = unit_correlations(module, states, sites, sizes, X)
    # Per group, the correlations of every pair of members' units, summed
    # over the group's sites.
    summed: list[dict[tuple[int, int], np.ndarray]] = []
    position = 0
    for group in groups:
        summed.append({})
        for site_pairs in pairs[position : position + len(group.sites)]:
            for key, correlation in site_pairs.items():
                summed[-1][key] = summed[-1].get(key, 0.0) + correlation
        position += len(group.sites)

    def correlation(g, j, k):  # rows: units of member j; columns: of member k
        return summed[g][j, k] if j < k else summed[g][k, j].T

    def match(k, permutations, others):
        matched = []
        for g, group in enumerate(groups):
            similarity = np.zeros((group.size, group.size))
            for j in others:
                similarity += correlation(g, j, k)[np.asarray(permutations[j][g])]
            matched.append(linear_sum_assignment(similarity, maximize=True)[1])
        return matched

    device = next(iter(states[0].values())).device
    sizes = [group.size for group in groups]
    permutations = _match_many(
        sizes, len(states), reference, match, max_rounds, random_state
    )
    return [
        [torch.as_tensor(p, device=device) for p in member] for member in permutations
    ]


def _match_many(
    sizes: Sequence[int],
    n_members: int,
    reference: int,
    match: Callable,
    max_rounds: int,
    random_state: int | None,
) -> list[list[np.ndarray]]:
    """Permutations of every member (identity for ``reference``): each matched
    to the reference alone, then, in rounds, to all the others together.

    ``sizes`` are the groups' sizes; ``match(k, permutations, others)``
    returns member ``k``'s permutations (arrays or tensors) that best match the
    members ``others`` under their current ``permutations``.
    """
    permutations = [[np.arange(size) for size in sizes]] * n_members
    others = [i for i in range(n_members) if i != reference]
    for k in others:
        permutations[k] = match(k, permutations, [reference])
    rng = np.random.default_rng(random_state)
    for _ in range(max_rounds if n_members > 2 else 0):
        changed = False
        for k in rng.permutation(others):
            rest = [j for j in range(n_members) if j != k]
            new = match(k, permutations, rest)
            changed |= any(
                not np.array_equal(a, b)
                for a, b in zip(new, permutations[k], strict=True)
            )
            permutations[k] = new
        if not changed:
            break
    return permutations


def align_modules(
    modules: Sequence[torch.nn.Module],
    example_input,
    *,
    method: str = "weight_matching",
    reference: int = 0,
    max_iter: int = 100,
    random_state: int | None = 0,
) -> list[torch.nn.Module]:
    """Copies of ``modules`` with hidden units permuted to match one of them.

    Every member is matched to the reference member, by its weights or by its
    activations on ``example_input`` (Git Re-Basin); its copy then holds the
    same function with its hidden units in the reference's order, so that
    averaging the copies weight by weight averages matching units. The given
    modules are never changed.

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        Modules of one architecture; see :func:`permutation_spec` for the
        supported layers.
    example_input : array-like or torch.Tensor
        Valid inputs. Two are used to trace the shapes; activation matching
        measures the activations on all of them (the fit data, say).
    method : {"weight_matching", "activation_matching"}, default="weight_matching"
        ``"weight_matching"`` (:func:`weight_matching`) compares the members'
        weights; ``"activation_matching"`` (:func:`activation_matching`) the
        correlations of their hidden units on ``example_input``, which aligns
        independently trained members better when there are enough inputs.
    reference : int, default=0
        Index of the member the others are matched to; its copy is unchanged.
    max_iter : int, default=100
        Most coordinate-descent passes of weight matching per member.
    random_state : int or None, default=0
        Seeds the order in which weight matching visits the groups.

    Returns
    -------
    aligned : list of torch.nn.Module
        Deep copies, in the order of ``modules``.

    Raises
    ------
    ValueError
        If the architecture cannot be aligned (the message names the module),
        or the modules do not share one architecture. Nothing is copied or
        changed then.

    References
    ----------
    .. [1] S. K. Ainsworth, J. Hayase and S. Srinivasa, "Git Re-Basin: Merging
       Models modulo Permutation Symmetries", ICLR 2023, arXiv:2209.04836.
    .. [2] K. Jordan, H. Sedghi, O. Saukh, R. Entezari and B. Neyshabur,
       "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
       ICLR 2023, arXiv:2211.08403.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge import align_modules
    >>> def mlp(seed):
    ...     torch.manual_seed(seed)
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                                torch.nn.Linear(16, 3))
    >>> members = [mlp(0), mlp(1)]
    >>> aligned = align_modules(members, torch.randn(2, 4))
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(aligned[1](x), members[1](x), atol=1e-6)
    True
    >>> torch.equal(aligned[0][0].weight, members[0][0].weight)
    True
    >>> by_activations = align_modules(members, torch.randn(200, 4),
    ...                                method="activation_matching")
    >>> torch.allclose(by_activations[1](x), members[1](x), atol=1e-6)
    True
    """
    if method not in ALIGNMENTS:
        raise ValueError(f"method must be one of {ALIGNMENTS}; got {method!r}.")
    check_one_input(example_input, "Alignment")
    modules = list(modules)
    if not -len(modules) <= reference < len(modules):
        raise ValueError(
            f"reference={reference} is not the index of one of the "
            f"{len(modules)} modules."
        )
    example = torch.as_tensor(example_input[:2])
    groups = permutation_spec(modules[reference], example)
    states = [module.state_dict() for module in modules]
    layout = {name: tensor.shape for name, tensor in states[reference].items()}
    for i, state in enumerate(states):
        if {name: tensor.shape for name, tensor in state.items()} != layout:
            raise ValueError(
                f"modules[{i}] does not have the parameters and buffers of "
                f"modules[{reference}]: the modules must share one architecture."
            )
    reference %= len(modules)
    if not groups:
        return [copy.deepcopy(module) for module in modules]
    if method == "activation_matching":
        permutations = activation_matching(
            modules[reference],
            states,
            groups,
            example_input,
            reference=reference,
            random_state=random_state,
        )
    else:
        permutations = _weight_matching_many(
            states, groups, reference, max_iter, random_state
        )
    aligned = []
    for i, (module, state) in enumerate(zip(modules, states, strict=True)):
        module_copy = copy.deepcopy(module)
        if i != reference:
            module_copy.load_state_dict(permute_state(state, groups, permutations[i]))
        aligned.append(module_copy)
    return aligned


def _weight_matching_many(states, groups, reference, max_iter, random_state):
    """Per member, the permutations of weight matching to the reference, then
    to the average of the other members' permuted weights, in rounds."""

    def match(k, permutations, others):
        permuted = [
            permute_state(
                states[j], groups, [torch.as_tensor(p) for p in permutations[j]]
            )
            for j in others
        ]
        target = {
            name: torch.stack([state[name] for state in permuted]).mean(0)
            for name in states[k]
            if states[k][name].is_floating_point()
        }
        found = weight_matching(
            target, states[k], groups, max_iter=max_iter, random_state=random_state
        )
        return [p.cpu().numpy() for p in found]

    sizes = [group.size for group in groups]
    found = _match_many(
        sizes, len(states), reference, match, MATCHING_ROUNDS, random_state
    )
    device = next(iter(states[0].values())).device
    return [[torch.as_tensor(p, device=device) for p in member] for member in found]
