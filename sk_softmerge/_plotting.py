"""Plotting learned gates (matplotlib is an optional extra: ``sk_softmerge[plot]``)."""

import numpy as np
from sklearn.exceptions import NotFittedError


def plot_gates(estimator, ax=None):
    """Heatmap of a fitted merge's gates: members by units, with values.

    Parameters
    ----------
    estimator : SoftMergeClassifier
        A fitted merge (anything with ``gates_`` and ``unit_names_``).
    ax : matplotlib.axes.Axes, default=None
        Where to draw; a new figure is made when ``None``.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes holding the heatmap, with a colorbar beside it.

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    sklearn.exceptions.NotFittedError
        If ``estimator`` has no gates yet.

    Examples
    --------
    >>> import numpy as np
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from types import SimpleNamespace
    >>> from sk_softmerge import plot_gates
    >>> merge = SimpleNamespace(gates_=np.array([[1.0, 0.2], [0.0, 0.9]]),
    ...                         unit_names_=["0", "2"])
    >>> ax = plot_gates(merge)
    >>> ax.get_xlabel()
    'merge unit'
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "plot_gates needs matplotlib; install it with "
            "`pip install sk_softmerge[plot]` (or `pip install matplotlib`)."
        ) from exc
    if not (hasattr(estimator, "gates_") and hasattr(estimator, "unit_names_")):
        raise NotFittedError(
            f"plot_gates needs a fitted merge with gates_ and unit_names_; got an "
            f"unfitted {type(estimator).__name__}: call fit first."
        )
    gates = np.asarray(estimator.gates_)
    n_members, n_units = gates.shape
    if ax is None:
        width = min(2 + 0.6 * n_units, 16)
        _, ax = plt.subplots(figsize=(width, 1 + 0.5 * n_members))
    image = ax.imshow(gates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="gate")
    crowded = sum(len(name) for name in estimator.unit_names_) > 6 * n_units
    ax.set_xticks(
        range(n_units), estimator.unit_names_, rotation=90 * (n_units > 8 or crowded)
    )
    names = getattr(estimator, "named_estimators_", None)
    labels = list(names) if names else [f"member {k}" for k in range(n_members)]
    ax.set_yticks(range(n_members), labels)
    ax.set_xlabel("merge unit")
    if n_units * n_members <= 200:
        for (k, u), value in np.ndenumerate(gates):
            color = "black" if value > 0.5 else "white"
            ax.text(u, k, f"{value:.2f}", ha="center", va="center", color=color)
    return ax
