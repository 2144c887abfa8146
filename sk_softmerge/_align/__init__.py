"""Alignment of independently trained members, and REPAIR.

- ``_activations``: hidden units' activations and their statistics.
- ``_spec``: the permutation spec of an architecture.
- ``_matching``: weight and activation matching (Git Re-Basin),
  :func:`~sk_softmerge.align_modules`.
- ``_repair``: the correction of merged units' statistics (REPAIR) that
  :meth:`SoftMerge.set_repair` takes.

Imports go one way: alignment imports the core and the package's leaf modules
(``_inputs``, ``_devices``, ``_nets``), never export or the estimators.
"""
