"""Scorers: which heads / channels a local pruner keeps, one file per family.

Every scorer implements ``select(problem, keep_counts) -> (kept-unit lists, info)`` returning
nested kept sets (one per requested count, larger counts ⊇ smaller ones), so one call serves every
level of the supernet. Ranking scorers only define ``score``; HyWIA and OBS override ``select``.
Scorers are chosen from Hydra by ``_target_`` (``conf/pruner/*.yaml``). To add one: a class
deriving from :class:`~tyr.pruning.scorers.base.Scorer` in a file of its family, its name here,
and a ``conf/pruner/<name>.yaml``.
"""

from tyr.pruning.scorers.activation import FLAP, WandaSP
from tyr.pruning.scorers.base import Scorer, nested_top
from tyr.pruning.scorers.hywia import HyWIA
from tyr.pruning.scorers.magnitude import Magnitude
from tyr.pruning.scorers.obs import OBS
from tyr.pruning.scorers.taylor import TAYLOR_KEYS, TaylorElement1, TaylorElement2, TaylorVector, taylor_reductions

__all__ = [
    "Scorer",
    "nested_top",
    "Magnitude",
    "TaylorVector",
    "TaylorElement1",
    "TaylorElement2",
    "TAYLOR_KEYS",
    "taylor_reductions",
    "WandaSP",
    "FLAP",
    "HyWIA",
    "OBS",
]
