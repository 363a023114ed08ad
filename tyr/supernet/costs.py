"""Real parameter costs of a built supernet's levels: what the assembled (sliced) model keeps.

The grid counts a query head as its q and o rows and the key / value heads as a fixed cost of the
attention (:class:`tyr.supernet.grid.LayerShape`). Slicing drops a key / value head whose whole group
of query heads is pruned (:func:`tyr.modeling.slicing.head_layout`), so a level whose kept heads leave
a group empty keeps fewer parameters than the grid says. On SmolLM2-135M at 50 % (9 query heads in 3
groups, 4 kept) the nominal allocation keeps 1.3M fewer parameters than its nominal count, 1.3 % of the
model. These costs count the kept key / value heads of each stored variant, so a budget on them is a
budget on the real model. MLP channels have no shared part: their nominal cost is their real cost.
"""

from __future__ import annotations

import logging

from tyr.modeling.adapter import get_adapter
from tyr.search.budget import allocation_cost, fit_to_budget
from tyr.supernet.store import SupernetStore

log = logging.getLogger("tyr.search")


def real_costs(store: SupernetStore, model) -> dict[str, list[list[int]]]:
    """Kept parameters per module and level (the search space's cost table), counted as the sliced
    model holds them. ``model`` gives each layer's attention geometry (the dense model, or a streamed
    one: only shapes are read)."""
    a = get_adapter(model)
    grid = store.grid
    costs = grid.costs()
    for l, layer in enumerate(a.layers(model)):
        geo = a.geometry(layer)
        g = grid.modules["attn"][l]
        o_bias = a.projections(layer)["o_proj"].bias
        shared = o_bias.numel() if o_bias is not None else 0  # kept whatever the heads
        kv_unit = (g.fixed_params - shared) / geo.num_kv_heads
        costs["attn"][l] = [
            int(round(shared + len(keep) * g.unit_params + len({geo.kv_of_head[h] for h in keep}) * kv_unit))
            for keep in store.kept_sets(l, "attn")
        ]
    return costs


def search_costs(model, store: SupernetStore, errors: dict, target_sparsity: float, budget: str) -> tuple[dict, int, dict]:
    """The search space's cost table, its budget and the start allocation. ``real``: the parameters the
    sliced model keeps (:func:`real_costs`) under the target's share of the dense ones, from the grid
    centre fitted to that budget by ``errors`` (``store.errors()``); ``nominal``: the grid's counts, the
    centre and its cost."""
    grid = store.grid
    centre = grid.centre_levels()
    if budget == "nominal":
        return grid.costs(), grid.allocation_params(centre), centre
    costs = real_costs(store, model)
    target = int(round((1.0 - target_sparsity) * grid.dense_params()))
    start = fit_to_budget(costs, errors, centre, target)
    log.info(
        "budget %s parameters (real); the grid centre keeps %s, the fitted start %s",
        f"{target:,}",
        f"{allocation_cost(costs, centre):,}",
        f"{allocation_cost(costs, start):,}",
    )
    return costs, target, start


def refill(costs: dict, errors: dict, levels: dict, budget: int, mode: str) -> tuple[dict, int]:
    """``levels`` given back levels up to the budget (``real`` budgets only; :func:`fit_to_budget`), and
    how many. The evolution's level switches keep an allocation at or under the budget, but with uneven
    real costs (a switch that empties a key / value group saves more than the other side adds) its best
    can drift under it; on tiny-gemma3 by 3 % of the prunable parameters."""
    if mode == "nominal" or allocation_cost(costs, levels) >= budget:
        return levels, 0
    out = fit_to_budget(costs, errors, levels, budget)
    moved = sum(abs(a - b) for k in out for a, b in zip(out[k], levels[k]))
    if moved:
        log.info(
            "best allocation %s parameters under the budget: %d levels given back",
            f"{budget - allocation_cost(costs, levels):,}",
            moved,
        )
    return out, moved
