"""Cost planner: parameters, supernet disk size, memory, FLOPs and time of a tyr run, from the
model's ``arch:`` block alone (no weights).

Pure functions on typed arguments; the Hydra entry point is :mod:`tyr.recipes.plan`. By concern:
:mod:`~tyr.planner.settings` (the inputs), :mod:`~tyr.planner.sizes` (bytes on disk),
:mod:`~tyr.planner.flops`, :mod:`~tyr.planner.costs` (the whole plan) and :mod:`~tyr.planner.report`
(the text). Only the standard library and torch-free parts of tyr are imported (the level grid
of :mod:`tyr.supernet.grid`, the search settings of :mod:`tyr.search.settings`), and the supernet's
level grid comes from tyr's own :func:`~tyr.supernet.grid.make_grid`, so the predicted shard bytes
are those :meth:`tyr.supernet.store.SupernetStore.write_layer` writes (tested on tiny-llama, where
they agree to the byte). Memory and FLOPs are estimates of what the code in ``tyr/`` does today;
``docs/planner.md`` lists every term.

Units: bytes in decimal GB / TB (1 GB = 10⁹ bytes), parameters in M / B, FLOPs in TFLOP / PFLOP /
EFLOP. "Týr" is the paper (Týr-the-Pruner, NeurIPS 2025); its supernet layout is our assumption,
not its code (:func:`~tyr.planner.sizes.tyr_paper_layout_bytes`).
"""

from tyr.planner.costs import plan
from tyr.planner.flops import (
    BUILD_LAYER_FORWARDS,
    GRAD_LAYER_FORWARDS,
    forward_flops_per_token,
    solve_calls,
    solve_flops,
    stage_candidates,
)
from tyr.planner.report import format_plan
from tyr.planner.settings import ArchFacts, DataSizes, GridSettings, PrunerSettings, Throughput
from tyr.planner.sizes import (
    SHARD_SCHEMA_VERSION,
    safetensors_file_bytes,
    supernet_bytes,
    teacher_cache_bytes,
    tyr_paper_layout_bytes,
)

__all__ = [
    "plan",
    "format_plan",
    "ArchFacts",
    "DataSizes",
    "GridSettings",
    "PrunerSettings",
    "Throughput",
    "BUILD_LAYER_FORWARDS",
    "GRAD_LAYER_FORWARDS",
    "SHARD_SCHEMA_VERSION",
    "forward_flops_per_token",
    "solve_calls",
    "solve_flops",
    "stage_candidates",
    "safetensors_file_bytes",
    "supernet_bytes",
    "teacher_cache_bytes",
    "tyr_paper_layout_bytes",
]
