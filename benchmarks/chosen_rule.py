"""The fixed rule a user could have chosen without the test set.

The quality benchmark's "best fixed rule" is, in each seed, the best of six
rules (best member, uniform soup, greedy soup, RegMean, Fisher merge, learned
soup) on the test set: a bound that no choice made without the test set can
promise. This fits the same six rules as ``quality.py`` does (on the same
stratified 20% of the training data, seeded alike), chooses the one that
scores best on the other 80% of the training data, and reports its test score
beside the bound and the default SoftMerge (``random_state=seed``, fit on all
the training data, as ``quality.py`` fits it). Means over the seeds, in
points (R^2 x 100 for (i) and (j))::

    cd benchmarks && OMP_NUM_THREADS=1 python chosen_rule.py --seeds 0 1 2

Where ``quality.json`` or ``regression.json`` hold the seed's row, every test
score is checked against it, so that the rows describe the same fits.
"""

import json
import warnings

import numpy as np
import torch
from quality import FIXED_RULES, REGRESSION, rules_split
from schedules import HERE, members_of, scenario_parser

from sk_softmerge import SoftMergeClassifier, SoftMergeRegressor, baselines

RULES = {
    "best member": "BestMember",
    "uniform soup": "UniformSoup",
    "greedy soup": "GreedySoup",
    "RegMean": "RegMean",
    "Fisher merge": "FisherMerge",
    "learned soup": "LearnedSoup",
}


def chosen_rule(scenario, seed, cache):
    """Test score of every rule and of the default SoftMerge, and the name of
    the rule that scores best on the 80% of the training data it was not fit
    on."""
    X_train, X_test, y_train, y_test, members = members_of(scenario, seed, cache)
    regression = scenario in REGRESSION
    X_rest, X_val, y_rest, y_val = rules_split(scenario, seed, X_train, y_train)
    kind = "Regressor" if regression else "Classifier"
    test, rest = {}, {}
    for name, prefix in RULES.items():
        model = getattr(baselines, prefix + kind)(members)
        if "random_state" in model.get_params():
            model.set_params(random_state=seed)
        model.fit(X_val, y_val)
        test[name] = model.score(X_test, y_test)
        rest[name] = model.score(X_rest, y_rest)
    SoftMerge = SoftMergeRegressor if regression else SoftMergeClassifier
    merge = SoftMerge(members, random_state=seed).fit(X_train, y_train)
    test["SoftMerge"] = merge.score(X_test, y_test)
    return test, max(rest, key=rest.get)


def main():
    args = scenario_parser(__doc__, list("abcdefghijk")).parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    rows = {}
    for path in ["quality.json", "regression.json"]:
        for scenario, found in json.loads((HERE / path).read_text()).items():
            rows.update({(scenario, row["seed"]): row for row in found})
    print(
        "| scenario | best fixed rule (test-set bound) | rule chosen on the other "
        "80% | SoftMerge | SoftMerge - bound | SoftMerge - chosen rule | chosen, "
        "per seed |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for scenario in args.scenarios:
        bound, chosen, merge, names = [], [], [], []
        for seed in args.seeds:
            test, name = chosen_rule(scenario, seed, args.cache)
            _check(test, rows.get((scenario, seed)), scenario, seed)
            bound.append(max(test[rule] for rule in FIXED_RULES))
            chosen.append(test[name])
            merge.append(test["SoftMerge"])
            names.append(name)
        b, c, m = (100 * np.mean(values) for values in (bound, chosen, merge))
        print(
            f"| ({scenario}) | {b:.2f} | {c:.2f} | {m:.2f} | {m - b:+.2f} | "
            f"{m - c:+.2f} | {', '.join(names)} |",
            flush=True,
        )


def _check(test, row, scenario, seed):
    """Raise if a test score differs from the benchmark's row (if any)."""
    for name in [*FIXED_RULES, "SoftMerge"] if row else []:
        if not np.isclose(test[name], row[name], rtol=0, atol=1e-9):
            raise RuntimeError(
                f"({scenario}) seed {seed}: {name} scores {test[name]} here, "
                f"{row[name]} in the benchmark's row"
            )


if __name__ == "__main__":
    main()
