"""A one-level supernet built along one allocation: the sequential (sparsegpt-style) prune of the model to
given widths, stored like any supernet. The search's re-prune, the finalists and the fidelity study use it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tyr.pruning.local import LocalPruner
from tyr.search.settings import SearchSettings
from tyr.supernet.builder import build_supernet
from tyr.supernet.grid import KINDS, SupernetGrid, layer_shapes, make_grid
from tyr.supernet.store import SupernetStore

log = logging.getLogger("tyr.coarse_to_fine")


def keep_counts(grid: SupernetGrid, levels: dict[str, list[int]]) -> dict[str, list[int]]:
    return {k: [grid.modules[k][l].keep[levels[k][l]] for l in range(grid.num_layers)] for k in KINDS}


def build_path_supernet(
    model,
    model_id: dict,
    pruner: LocalPruner,
    calib_ids: torch.Tensor,
    taylor: dict | None,
    keep: dict[str, list[int]],
    root: str | Path,
    settings: SearchSettings,
    store_config: dict | None = None,
) -> SupernetStore:
    """A one-level supernet at the kept-unit counts ``keep``, built along that allocation (EEA
    ``path``): the sparsegpt-style sequential prune of the model to these widths, stored (and
    resumable, and exportable) like any supernet. Level 0 of every module is the allocation."""
    grid = make_grid(layer_shapes(model), 0.0, 1.0, 1, settings.min_heads, settings.min_channels, centre=keep)
    store = SupernetStore.create_or_resume(
        root, model=model_id, grid=grid, eea="path", config={**(store_config or {}), "path_keep": keep}
    )
    if not store.manifest["complete"]:
        log.info("pruning sequentially along the allocation into %s", store.root)
        build_supernet(
            model,
            pruner,
            calib_ids,
            grid,
            store,
            eea="path",
            taylor=taylor,
            path=grid.centre_levels(),
            batch_size=settings.batch_size,
        )
    return SupernetStore.open(store.root, expect_model=model_id)
