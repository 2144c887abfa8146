"""Grid search on a Dask cluster through joblib's dask backend."""

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV

from sk_softmerge import SoftMergeClassifier

distributed = pytest.importorskip("distributed")

GRID = {"l0_weight": [0.0, 0.1], "granularity": ["layer", "neuron"]}


def search(members, n_jobs):
    return GridSearchCV(
        SoftMergeClassifier(members, max_epochs=2, random_state=0),
        GRID,
        cv=2,
        n_jobs=n_jobs,
    )


def test_grid_search_on_local_cluster_matches_local_run(members, digits):
    local = search(members, n_jobs=1).fit(*digits)
    # Processes, not threads: members and estimator travel to the workers by pickle.
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        with distributed.get_task_stream(client) as tasks:
            with joblib.parallel_backend("dask"):
                remote = search(members, n_jobs=-1).fit(*digits)
    assert len(tasks.data) > 0, "no fit ran on the cluster"
    assert remote.best_params_ == local.best_params_
    np.testing.assert_array_equal(
        remote.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"]
    )
    np.testing.assert_array_equal(
        remote.predict_proba(digits[0]), local.predict_proba(digits[0])
    )
