"""How many samples the fixed rules' soups pass during a default fit.

A default fit (``SoftMergeClassifier(members, random_state=0)``, two folds)
chooses its start and greedy soup three times (on each fold's training part
and on all the data), each time on at most ``MAX_START_SAMPLES`` samples, and
scores the rules out of fold on every sample. This counts the calls of the
rule book's soup evaluation (the uniform average, the greedy soup and its
trials, as merges of the members' weights), the samples they pass and their
seconds, against the fit's seconds, on the members of ``quality.py``'s
scenarios (seed 0, or the first of ``--seeds``) and on the members of (g)
given their training data ten times over with noise (40,000 samples)::

    cd benchmarks && OMP_NUM_THREADS=1 python rule_book.py --scenarios k h
"""

import time
import warnings
from unittest import mock

import numpy as np
import torch
from schedules import members_of, scenario_parser

import sk_softmerge._rules as rules
from sk_softmerge import SoftMergeClassifier


def soup_evaluations(members, X, y):
    """Seconds of a default fit, and the calls, samples and seconds of its
    soup evaluations."""
    counted = {"calls": 0, "samples": 0, "seconds": 0.0}
    book = rules.RuleBook.__init__

    def counting_book(self, average, members, member_errors, soup_errors, *args):
        # Before 2026-12-03 the book took no n_samples and evaluated every
        # soup on every sample, with soup_errors(gates).
        indexed = len(args) > 1 and isinstance(args[1], int)

        def evaluate(gates, index=None):
            start = time.perf_counter()
            found = soup_errors(gates, index) if indexed else soup_errors(gates)
            counted["seconds"] += time.perf_counter() - start
            counted["calls"] += 1
            counted["samples"] += len(y) if index is None else len(index)
            return found

        book(self, average, members, member_errors, evaluate, *args)

    with mock.patch.object(rules.RuleBook, "__init__", counting_book):
        start = time.perf_counter()
        SoftMergeClassifier(members, random_state=0).fit(X, y)
        fit_seconds = time.perf_counter() - start
    return fit_seconds, counted


def main():
    args = scenario_parser(__doc__, ["k", "h"], seeds=(0,)).parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    X, _, y, _, members = members_of("g", args.seeds[0], args.cache)
    rng = np.random.default_rng(0)
    noisy = [X + 0.05 * rng.standard_normal(X.shape).astype(X.dtype) for _ in range(10)]
    cases = [(s, members_of(s, args.seeds[0], args.cache)) for s in args.scenarios]
    cases.append(
        ("g, x10", (np.concatenate(noisy), None, np.tile(y, 10), None, members))
    )
    print("| scenario | samples | fit s | soup calls | samples passed | soup s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (X, _, y, _, members) in cases:
        SoftMergeClassifier(members, max_epochs=1).fit(X[:300], y[:300])  # warm up
        seconds, counted = soup_evaluations(members, X, y)
        print(
            f"| ({name}) | {len(y):,} | {seconds:.2f} | {counted['calls']} | "
            f"{counted['samples']:,} | {counted['seconds']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
