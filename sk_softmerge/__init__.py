"""Merge trained neural networks into one by learning L0 gates over their weights."""

from ._align._matching import align_modules
from ._core._batchnorm import recompute_batchnorm_statistics
from ._core._merger import SoftMerge
from ._export import load_merged
from ._plotting import plot_gates
from ._softmerge import SoftMergeClassifier, SoftMergeRegressor

__version__ = "0.1.0"

__all__ = [
    "SoftMerge",
    "SoftMergeClassifier",
    "SoftMergeRegressor",
    "__version__",
    "align_modules",
    "load_merged",
    "plot_gates",
    "recompute_batchnorm_statistics",
]
