"""Merge trained neural networks into one by learning L0 gates over their weights."""

from ._alignment import align_modules
from ._batchnorm import recompute_batchnorm_statistics
from ._classifier import SoftMergeClassifier
from ._merging import SoftMerge

__version__ = "0.1.0"

__all__ = [
    "SoftMerge",
    "SoftMergeClassifier",
    "__version__",
    "align_modules",
    "recompute_batchnorm_statistics",
]
