"""plot_gates draws the gates of a fitted merge."""

import builtins

import matplotlib
import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from sk_softmerge import SoftMergeClassifier, plot_gates

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@pytest.fixture(scope="module")
def merge(members, digits):
    return SoftMergeClassifier(
        members, max_epochs=2, random_state=0, cv=None, validation_fraction=0
    ).fit(*digits)


def test_heatmap_of_gates(merge):
    ax = plot_gates(merge)
    image = ax.get_images()[0]
    np.testing.assert_array_equal(image.get_array(), merge.gates_)
    assert [t.get_text() for t in ax.get_xticklabels()] == merge.unit_names_
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "member 0",
        "member 1",
        "member 2",
    ]
    assert len(ax.texts) == merge.gates_.size
    assert ax.texts[0].get_text() == f"{merge.gates_[0, 0]:.2f}"
    plt.close(ax.figure)


def test_draws_on_given_axes(merge):
    fig, ax = plt.subplots()
    assert plot_gates(merge, ax=ax) is ax
    plt.close(fig)


def test_unfitted(members):
    with pytest.raises(NotFittedError, match="unfitted SoftMergeClassifier"):
        plot_gates(SoftMergeClassifier(members))


def test_without_matplotlib(merge, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"sk_softmerge\[plot\]"):
        plot_gates(merge)
