"""The local pruner: one module (heads or channels) of one layer at a time.

- :mod:`~tyr.pruning.problem`: the module as the local pruner sees it (weights, input statistics);
- :mod:`~tyr.pruning.scorers`: which units to keep, one file per family of scorers;
- :mod:`~tyr.pruning.obs_math`: optimal-brain-surgeon costs and updates from H⁻¹;
- :mod:`~tyr.pruning.reconstruction`: least-squares refit, compensating bias, exact output error;
- :mod:`~tyr.pruning.local`: :class:`~tyr.pruning.local.LocalPruner` = a scorer + a reconstruction;
- :mod:`~tyr.pruning.taylor`: per-unit Taylor statistics from a gradient pass;
- :mod:`~tyr.pruning.sequential`: one decoder layer pruned on its inputs (attention, then MLP), the
  step the uniform prune and the supernet build share on the layer driver;
- :mod:`~tyr.pruning.uniform`: the whole model to one sparsity, layer by layer.

Imports only go downwards in that list's dependency order (problem ← obs_math, reconstruction ←
scorers ← local ← uniform, problem ← sequential ← uniform); tests/test_imports.py fails on any import cycle in tyr/.
"""
