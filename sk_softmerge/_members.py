"""Checking the members handed to a merge and reading what they share.

Members arrive as fitted skorch classifiers or regressors, possibly wrapped in
:class:`sklearn.frozen.FrozenEstimator`. This module unwraps them, checks that
they are fitted, of the task the merge expects, and share one architecture (and,
for classifiers, one set of classes), and reads their modules without touching
them.
"""

from collections.abc import Sequence

import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.frozen import FrozenEstimator
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNet

from ._core._merger import check_same_parameters

TASKS = {
    "classification": (
        ClassifierMixin,
        "classifier (NeuralNetClassifier or NeuralNetBinaryClassifier)",
    ),
    "regression": (RegressorMixin, "regressor (NeuralNetRegressor)"),
}
"""Task name: the mixin its skorch nets carry, and how messages name them."""


def unwrap_member(member, index: int, task: str = "classification") -> NeuralNet:
    """Return the skorch net inside ``member``, checking that it is fitted.

    Parameters
    ----------
    member : skorch.NeuralNet or sklearn.frozen.FrozenEstimator
        A fitted skorch net, or one wrapped in ``FrozenEstimator``.
    index : int
        Position of the member in ``estimators``, used in error messages.
    task : {"classification", "regression"}, default="classification"
        The task the member must be a skorch net for.

    Returns
    -------
    net : skorch.NeuralNet
        The fitted skorch net itself (not a copy).

    Raises
    ------
    TypeError
        If ``member`` is not a skorch net, or not one for ``task``.
    ValueError
        If the net is not fitted.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge._members import unwrap_member
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...                           module__out_features=2)
    >>> unwrap_member(net, 0)
    Traceback (most recent call last):
        ...
    ValueError: estimators[0] is not fitted: fit each member before merging.
    """
    net = member.estimator if isinstance(member, FrozenEstimator) else member
    if not isinstance(net, NeuralNet):
        raise TypeError(
            f"estimators[{index}] must be a fitted skorch net (or one wrapped in "
            f"FrozenEstimator); got {type(member).__name__}."
        )
    mixin, expected = TASKS[task]
    if not isinstance(net, mixin):
        raise TypeError(
            f"estimators[{index}] is a {type(net).__name__}, but a merge for "
            f"{task} takes skorch {expected} members."
        )
    try:
        check_is_fitted(net)
        if task == "classification":
            net.classes_  # noqa: B018 (classes_ exists only once the net saw y)
    except Exception as exc:
        raise ValueError(
            f"estimators[{index}] is not fitted: fit each member before merging."
        ) from exc
    return net


RESERVED_NAMES = ("uniform average", "greedy soup", "soft merge")
"""Names of the candidates that are not one member: no member may take them."""


def split_names(estimators) -> tuple[list, list[str]]:
    """The members and their names, from a list of members or of pairs.

    ``estimators`` is a list of members, named ``"member 0"``, ``"member 1"``,
    ..., or a list of ``(name, member)`` pairs, as ``VotingClassifier`` takes.

    Parameters
    ----------
    estimators : sequence
        Members, or ``(name, member)`` pairs.

    Returns
    -------
    members : list
        The members, in order.
    names : list of str
        Their names.

    Raises
    ------
    TypeError
        If pairs and members are mixed, or a name is not a string.
    ValueError
        If two names are equal or a name is that of a candidate that is not a
        member (``"uniform average"``, ``"greedy soup"``, ``"soft merge"``).

    Examples
    --------
    >>> from sk_softmerge._members import split_names
    >>> split_names([("small", "net a"), ("large", "net b")])
    (['net a', 'net b'], ['small', 'large'])
    >>> split_names(["net a", "net b"])
    (['net a', 'net b'], ['member 0', 'member 1'])
    """
    estimators = list(estimators)
    pairs = [
        isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)
        for item in estimators
    ]
    if not any(pairs):
        return estimators, [f"member {i}" for i in range(len(estimators))]
    if not all(pairs):
        position = pairs.index(False)
        raise TypeError(
            "estimators must be a list of fitted nets or a list of (name, net) "
            f"pairs; estimators[{position}] is a {type(estimators[position]).__name__} "
            "among pairs."
        )
    names = [name for name, _ in estimators]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Names of estimators must be unique; {repeated} repeat.")
    reserved = [name for name in names if name in RESERVED_NAMES]
    if reserved:
        raise ValueError(
            f"Names {reserved} name candidates that are not one member; choose "
            "other names for the estimators."
        )
    return [member for _, member in estimators], names


def check_members(estimators, task: str = "classification") -> list[NeuralNet]:
    """Unwrap the members and check that they can be merged.

    Members can be merged when there are at least two, all fitted skorch nets
    for ``task``, with the same parameter names, shapes and dtypes, and, for
    classification, the same classes.

    Parameters
    ----------
    estimators : sequence of skorch nets or of (str, skorch net) pairs
        The members, each a fitted skorch net or one wrapped in
        ``FrozenEstimator``, named or not (see :func:`split_names`).
    task : {"classification", "regression"}, default="classification"
        The task the members must be skorch nets for.

    Returns
    -------
    nets : list of skorch.NeuralNet
        The unwrapped nets, in order.

    Raises
    ------
    TypeError
        If ``estimators`` is not a sequence, or a member is not a skorch net
        for ``task``.
    ValueError
        If fewer than two members are given, or a member is unfitted or differs
        from the first one.

    Examples
    --------
    >>> from sk_softmerge._members import check_members
    >>> check_members([])
    Traceback (most recent call last):
        ...
    ValueError: estimators must hold at least 2 fitted nets to merge; got 0.
    """
    if not isinstance(estimators, Sequence) or isinstance(estimators, str):
        raise TypeError(
            "estimators must be a list of fitted skorch nets; got "
            f"{type(estimators).__name__}."
        )
    if len(estimators) < 2:
        raise ValueError(
            "estimators must hold at least 2 fitted nets to merge; got "
            f"{len(estimators)}."
        )
    members, _ = split_names(estimators)
    nets = [unwrap_member(member, i, task) for i, member in enumerate(members)]
    first = nets[0]
    for i, net in enumerate(nets[1:], start=1):
        if type(net) is not type(first):
            raise ValueError(
                f"estimators[{i}] is a {type(net).__name__}, but estimators[0] is a "
                f"{type(first).__name__}: members must be nets of one skorch class."
            )
        if task == "classification" and not np.array_equal(
            net.classes_, first.classes_
        ):
            classes, expected = (np.asarray(n.classes_).tolist() for n in (net, first))
            raise ValueError(
                f"estimators[{i}] has classes {classes}, but estimators[0] has "
                f"{expected}: members must share their classes."
            )
    check_same_parameters([net.module_ for net in nets], name="estimators")
    return nets
