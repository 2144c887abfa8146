"""The torch merging core: members' weights stacked, gates, merged weights.

Works on plain ``torch.nn.Module``s and tensors, without scikit-learn:

- ``_gates``: the hard-concrete mathematics (Louizos et al., 2018).
- ``_units``: which parameters a gate covers (layer, tensor, neuron).
- ``_fastpath``: stacking the members into one flat buffer and the fused,
  hand-differentiated merge of a training step (the fenced fast path).
- ``_merger``: :class:`SoftMerge`, the merger that owns the gates.
- ``_screening``: members' weights far from the others'.
- ``_batchnorm``: batch-norm statistics of a merged net.
- ``_evaluation``: forward functions of states, per-sample errors, the paired
  significance test.
- ``_adam`` and ``_training``: learning the gates.
- ``_average``, ``_regmean``, ``_fisher``, ``_learned_soup``: the published
  data-aware merges that the baselines offer (RegMean, Fisher merging, the
  learned soup by layer).

Imports go one way: the core imports only itself and the package's leaf
modules (``_inputs``, ``_devices``, ``_nets``), never alignment, export or the
estimators.
"""
