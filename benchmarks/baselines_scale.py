"""Time and peak memory of the data-aware baselines at 1M and 10M weights.

Run from the project root::

    OMP_NUM_THREADS=2 python benchmarks/baselines_scale.py

Five forks of an MLP 40-w-w-10 of about 1M (w = 1000) or 10M (w = 3140)
weights, as in ``speed.py``'s memory-scale section, merged on 2,000 random
samples by RegMean, Fisher merging, the learned soup and, for reference, the
default SoftMerge. Peak memory is the peak of live torch CPU allocations during
``fit`` (``torch.profiler`` memory events, as in ``speed.py``), against one
stack of the members' weights (4 bytes x K x weights). Prints one line each.
"""

import time
import warnings

from speed import SCALE_SAMPLES, SCALE_WIDTHS, peak_bytes, scale_fit

from sk_softmerge import SoftMergeClassifier
from sk_softmerge.baselines import (
    FisherMergeClassifier,
    LearnedSoupClassifier,
    RegMeanClassifier,
)

N_MEMBERS = 5
METHODS = {
    "RegMean": RegMeanClassifier,
    "Fisher merge": FisherMergeClassifier,
    "learned soup": LearnedSoupClassifier,
    "SoftMerge": SoftMergeClassifier,
}


def main():
    warnings.simplefilter("ignore", UserWarning)
    for label in SCALE_WIDTHS:
        _, n_weights, members, (X, y) = scale_fit(label, N_MEMBERS, with_members=True)
        stack = 4 * N_MEMBERS * n_weights
        for name, Method in METHODS.items():
            model = Method(members)
            start = time.perf_counter()
            peak = peak_bytes(lambda model=model, X=X, y=y: model.fit(X, y))
            print(
                f"{label} ({n_weights:,} weights), K={N_MEMBERS}, {SCALE_SAMPLES} "
                f"samples, {name}: {time.perf_counter() - start:.1f} s, peak "
                f"{peak / 2**20:.0f} MiB = {peak / stack:.2f} stacks",
                flush=True,
            )


if __name__ == "__main__":
    main()
