"""Where the out-of-fold evidence of a default fit comes from: the samples the
members were trained on, or the samples none of them saw.

In scenarios (f), (g), (h) and (k) of ``quality.py`` the members see a
stratified 70% of the training data, and SoftMerge cross-fits its gates on all
of it. For a default fit (``SoftMergeClassifier(members, random_state=seed)``)
this prints, per seed, the epochs kept and, separately on the samples the
members saw and on the 30% they did not: the pooled out-of-fold accuracy of
the learned merge (the gates of the epochs kept, each fold's on its left-out
samples) and of the uniform average, and the out-of-fold task loss of the
folds' gates at the start and at the epochs kept. Then the test accuracy of
the fit, of the uniform soup, and of the learned soup (``LearnedSoupClassifier``
at its defaults) fit on all the training data, as SoftMerge is::

    cd benchmarks && OMP_NUM_THREADS=1 python evidence.py --scenarios k h --seeds 0 1 2

``--cache DIR`` keeps every scenario's members between runs (as in
``schedules.py``). Accuracies in %, losses the members' criterion (mean
cross-entropy).
"""

import warnings

import numpy as np
import torch
from schedules import members_of, recording_cross_fit, scenario_parser
from sklearn.model_selection import train_test_split

from sk_softmerge import SoftMergeClassifier
from sk_softmerge.baselines import LearnedSoupClassifier, UniformSoupClassifier


def seen_by_members(y_train, seed):
    """Mask of the training samples the members of (f), (g), (h) and (k) were
    trained on: the 70% that ``quality.members_on_70_percent`` keeps."""
    positions = np.arange(len(y_train))
    seen, _ = train_test_split(
        positions, test_size=0.3, stratify=y_train, random_state=seed
    )
    mask = np.zeros(len(y_train), dtype=bool)
    mask[seen] = True
    return mask


def evidence(X_train, X_test, y_train, y_test, members, seed):
    """One row: the out-of-fold evidence split by what the members saw, and
    the test accuracies."""
    found = {}
    merge = SoftMergeClassifier(members, random_state=seed)
    with recording_cross_fit(found):
        merge.fit(X_train, y_train)
    result = found["result"]
    order = np.concatenate([fold.test for fold in result.folds])
    seen = seen_by_members(y_train, seed)[order]
    best = result.best_epoch
    start, kept = (
        np.concatenate([fold.losses[epoch] for fold in result.folds])
        for epoch in (0, best)
    )

    def accuracy(name, mask):
        return 100 * (1 - result.errors[name][mask].mean())

    soup = LearnedSoupClassifier(members, random_state=seed).fit(X_train, y_train)
    uniform = UniformSoupClassifier(members).fit(X_train, y_train)
    cells = [best]
    for mask in (seen, ~seen):
        cells += [accuracy("soft merge", mask), accuracy("uniform average", mask)]
        cells += [start[mask].mean(), kept[mask].mean()]
    cells += [100 * m.score(X_test, y_test) for m in (merge, uniform, soup)]
    return cells


def main():
    parser = scenario_parser(__doc__, ["k", "h"])
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    print(
        "| scenario | seed | epochs kept "
        "| seen: learned, uniform accuracy | seen: loss at start, kept "
        "| unseen: learned, uniform accuracy | unseen: loss at start, kept "
        "| test: SoftMerge, uniform soup, learned soup on all |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for scenario in args.scenarios:
        if scenario not in "fghk":
            parser.error(f"members see all the data in ({scenario}); use f, g, h, k")
        for seed in args.seeds:
            data = members_of(scenario, seed, args.cache)
            best, *cells = evidence(*data, seed)
            pairs = [cells[i : i + 2] for i in range(0, 8, 2)]
            text = [
                f"{a:.1f}, {b:.1f}" if i % 2 == 0 else f"{a:.3f}, {b:.3f}"
                for i, (a, b) in enumerate(pairs)
            ]
            test = ", ".join(f"{value:.1f}" for value in cells[8:])
            row = [f"({scenario})", str(seed), str(best), *text, test]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
