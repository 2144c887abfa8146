"""Cross-fitting: every sample both teaches the gates and checks them.

The fit of the gates is a procedure: choose the fixed rule to start from on
the training samples, then learn the gates for some number of epochs. On each
fold of a cross-validation split, :func:`cross_fit` runs that procedure on the
other folds and scores the gates of every epoch, and every fixed rule, on the
fold left out. Each sample is then scored once by a merge that did not learn
from it: the pooled out-of-fold losses choose the number of epochs, and the
pooled out-of-fold errors tell whether the learned merge beats the best fixed
rule, on all the samples rather than on a held-out fifth. The final gates then
learn on every sample, by the same procedure, for the chosen number of epochs.

This is sound for the same reason as cross-validated model selection: what is
checked is the procedure, not one set of gates, and the final gates come from
that procedure on more data (one fold more) than each check saw.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._core._evaluation import choose_lowest_loss
from ._core._gates import deterministic_z
from ._rules import GREEDY_SOUP, Candidate, RuleBook


@dataclass
class Fold:
    """One fold of :func:`cross_fit`.

    Attributes
    ----------
    test : ndarray of int
        Positions of the samples left out of learning.
    start : Candidate
        The fixed rule the fold's gates started from.
    soup : Candidate
        What the greedy soup amounts to on the fold's training samples.
    log_alphas : list of torch.Tensor
        The gates' log-alphas before learning and after every epoch.
    losses : list of ndarray or None
        Per-sample task losses on ``test`` of the deterministic merge before
        learning and after every epoch (``None`` where not finite).
    """

    test: np.ndarray
    start: Candidate
    soup: Candidate
    log_alphas: list[torch.Tensor]
    losses: list[np.ndarray | None]


@dataclass
class CrossFit:
    """What :func:`cross_fit` found.

    Attributes
    ----------
    best_epoch : int
        Epochs of learning whose out-of-fold task loss is lowest, if
        significantly lower than the start's, else 0.
    validation_loss_curve : list of float
        Pooled out-of-fold mean task loss before learning and after every
        epoch (``inf`` where some loss is not finite).
    errors : dict of str to ndarray or None
        Pooled out-of-fold per-sample errors of ``"soft merge"`` (the gates
        of ``best_epoch``), the uniform average, every member and the greedy
        soup, all on the samples of the folds' ``test`` in turn.
    folds : list of Fold
    n_skipped_steps : int
        Steps of learning skipped, over every fold (see
        :func:`~sk_softmerge._core._training.learn_gates`).
    """

    best_epoch: int
    validation_loss_curve: list[float]
    errors: dict[str, np.ndarray | None]
    folds: list[Fold]
    n_skipped_steps: int = 0


def cross_fit(
    merger,
    book: RuleBook,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    choose_start: Callable,
    learn: Callable,
    held_out_losses: Callable[[np.ndarray], np.ndarray | None],
    merge_errors: Callable[[torch.Tensor, np.ndarray], np.ndarray | None],
    max_epochs: int,
    open_log_alpha: float,
    choosing: Callable[[np.ndarray], np.ndarray] | None = None,
    name: str = "soft merge",
) -> CrossFit:
    """Learn the gates on every fold's training samples; score them out of fold.

    Parameters
    ----------
    merger : SoftMerge
        The merger whose gates learn; they hold the last fold's at the end.
    book : RuleBook
        The fixed rules' errors on every sample.
    splits : sequence of (ndarray, ndarray)
        Training and left-out positions of every fold.
    choose_start : callable
        ``choose_start(candidates, errors)``: the rule to start from
        (:func:`~sk_softmerge._rules.choose_start`).
    learn : callable
        ``learn(index, max_epochs, after_epoch)``: learn the gates on the
        samples ``index``; returns a
        :class:`~sk_softmerge._core._training.GateTraining`.
    held_out_losses : callable
        ``held_out_losses(index)``: per-sample task losses of the merger's
        deterministic gates on the samples ``index``, or ``None``.
    merge_errors : callable
        ``merge_errors(gates, index)``: per-sample errors of the merge with
        ``gates`` on the samples ``index``, or ``None``.
    max_epochs : int
        Epochs of learning on every fold.
    open_log_alpha : float
        Starting log-alpha of the open gates (:meth:`SoftMerge.start_from`).
    choosing : callable, default=None
        ``choosing(train)``: the samples of a fold's training part that choose
        its fixed rules (the start and the greedy soup's ingredients); ``None``
        takes them all.
    name : str, default="soft merge"
        The learned merge's name in ``errors``.

    Returns
    -------
    result : CrossFit

    Examples
    --------
    See :class:`~sk_softmerge.SoftMergeClassifier` (its ``cv`` parameter),
    which builds every argument from its members and data.
    """
    folds, n_skipped = [], 0
    for train, test in splits:
        candidates, errors, soup = book.rules(
            train if choosing is None else choosing(train)
        )
        start = choose_start(candidates, errors)
        merger.start_from(start.gates, open_log_alpha)
        fold = Fold(test, start, soup, [], [])

        def record(epoch, fold=fold):
            fold.log_alphas.append(merger.log_alpha.detach().clone())
            fold.losses.append(held_out_losses(fold.test))

        record(0)
        n_skipped += learn(train, max_epochs, record).n_skipped_steps
        folds.append(fold)
    losses = [
        pooled([fold.losses[epoch] for fold in folds])
        for epoch in range(max_epochs + 1)
    ]
    curve = [_mean(epoch_losses) for epoch_losses in losses]
    best = _best_epoch(losses, curve)
    learned = [
        merge_errors(deterministic_z(fold.log_alphas[best]), fold.test)
        for fold in folds
    ]
    errors = {name: pooled(learned)}
    for candidate in book.data_free_rules():
        errors[candidate.name] = pooled(
            [book.errors(candidate, fold.test) for fold in folds]
        )
    if any(fold.soup.name == GREEDY_SOUP for fold in folds):
        errors[GREEDY_SOUP] = pooled(
            [book.errors(fold.soup, fold.test) for fold in folds]
        )
    return CrossFit(best, curve, errors, folds, n_skipped)


def _best_epoch(losses, curve) -> int:
    """The epoch of lowest pooled loss (``curve``), if its per-sample
    ``losses`` beat the start's significantly; else 0."""
    best = int(np.argmin(curve))
    if best == 0:
        return 0
    pair = {"start": losses[0], "trained": losses[best]}
    return best if choose_lowest_loss(pair, "start") == "trained" else 0


def pooled(parts: list[np.ndarray | None]) -> np.ndarray | None:
    """The parts end to end; ``None`` if any is.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._crossfit import pooled
    >>> pooled([np.array([1.0]), np.array([2.0, 3.0])])
    array([1., 2., 3.])
    >>> pooled([np.array([1.0]), None]) is None
    True
    """
    if any(part is None for part in parts):
        return None
    return np.concatenate(parts)


def _mean(values: np.ndarray | None) -> float:
    return np.inf if values is None else float(values.mean())


def fold_summary(
    result: CrossFit, score: Callable, weights: np.ndarray | None = None
) -> dict:
    """Per fold: the start, the out-of-fold loss curve and every score.

    Parameters
    ----------
    result : CrossFit
    score : callable
        ``score(errors)``: the score that errors of samples weighted by
        weights of mean 1 amount to.
    weights : ndarray of shape (n_samples,), default=None
        The samples' weights, of mean 1, that multiply the errors.

    Returns
    -------
    summary : dict
        ``"start"``: the rule each fold started from; ``"validation_loss_curve"``:
        array of shape (n_folds, max_epochs + 1), each fold's mean task loss
        left out; ``"scores"``: for ``"soft merge"`` (at ``best_epoch``) and
        every fixed rule, an array of each fold's score on its left-out
        samples.
    """
    folds = result.folds
    bounds = np.cumsum([len(fold.test) for fold in folds])[:-1]
    scores = {}
    for name, errors in result.errors.items():
        parts = [None] * len(folds) if errors is None else np.split(errors, bounds)
        scores[name] = np.array(
            [
                score(_per_fold_weights(part, fold.test, weights))
                for part, fold in zip(parts, folds, strict=True)
            ]
        )
    return {
        "start": [fold.start.name for fold in folds],
        "validation_loss_curve": np.array(
            [[_mean(losses) for losses in fold.losses] for fold in folds]
        ),
        "scores": scores,
    }


def _per_fold_weights(errors, test, weights):
    """Errors weighted by weights of mean 1 over the fold, not over all."""
    if errors is None or weights is None:
        return errors
    return errors / weights[test].mean()
