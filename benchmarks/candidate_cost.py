"""What RegMean and Fisher merging would cost as SoftMerge candidates.

As fallback candidates of the default cross-fitting (``cv=2``) they would be
fit on each fold's training half and on all the data, then scored out of fold:
about two fits on all the training data each. This script times one fit of
each on all the training data of a scenario, against the default SoftMerge
fit, in one process::

    cd benchmarks && OMP_NUM_THREADS=1 python candidate_cost.py --scenarios e h

Prints one line per scenario and seed.
"""

import argparse
import time
import warnings

from quality import SCENARIOS, members_for

from sk_softmerge import SoftMergeClassifier
from sk_softmerge.baselines import FisherMergeClassifier, RegMeanClassifier


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scenarios", nargs="+", default=["a", "e", "h"])
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    for seed in args.seeds:
        for scenario in args.scenarios:
            X, _, y, _, members = members_for(scenario, seed, {})
            seconds = {}
            for name, model in (
                ("SoftMerge", SoftMergeClassifier(members, random_state=seed)),
                ("RegMean", RegMeanClassifier(members)),
                ("Fisher merge", FisherMergeClassifier(members, random_state=seed)),
            ):
                start = time.perf_counter()
                model.fit(X, y)
                seconds[name] = time.perf_counter() - start
            ratios = ", ".join(
                f"{name} {s:.2f} s ({2 * s / seconds['SoftMerge']:.2f} x SoftMerge "
                "for two fits)"
                for name, s in seconds.items()
                if name != "SoftMerge"
            )
            print(
                f"({scenario}) {SCENARIOS[scenario]}, seed {seed}: SoftMerge "
                f"{seconds['SoftMerge']:.2f} s; {ratios}",
                flush=True,
            )


if __name__ == "__main__":
    main()
