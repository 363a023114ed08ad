"""Heuristic per-layer allocations to compare the search against.

- ``uniform``: every module at its grid's centre level.
- ``owl``: OWL (Yin et al., 2023, "Outlier Weighed Layerwise sparsity"). Each layer's outlier ratio
  D_l is the fraction of its Wanda scores |W_ij|·‖X_j‖ (over all seven projections) above M times
  the layer mean. D is mapped linearly onto [−λ, +λ] around the target, so layers with more outliers
  are pruned less. Both modules of a layer then take the grid level nearest that sparsity, and the
  global budget is restored by single-level moves.
"""

from __future__ import annotations

import torch

from tyr.layerwise.driver import LayerCallback, run_layers
from tyr.modeling.adapter import get_adapter
from tyr.supernet.grid import KINDS, SupernetGrid


class OutlierRatios(LayerCallback):
    """The driver callback of :func:`outlier_ratios`: squared input norms of every projection over
    the layer's pass, then the share of the layer's Wanda scores above ``m`` × their mean."""

    def __init__(self, model, m: float):
        self.a, self.m = get_adapter(model), m
        self.ratios: list[float] = []

    def process(self, li, layer, inputs):
        proj = self.a.projections(layer)
        sq = {n: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device) for n, lin in proj.items()}

        def hook(name):
            def fn(module, args):
                sq[name] += args[0].detach().float().pow(2).reshape(-1, args[0].shape[-1]).sum(0)

            return fn

        out = inputs.forward(layer, [(lin, "forward_pre", hook(n)) for n, lin in proj.items()])
        scores = torch.cat([(lin.weight.detach().float().abs() * sq[n].sqrt()[None, :]).reshape(-1) for n, lin in proj.items()])
        self.ratios.append(float((scores > self.m * scores.mean()).float().mean()))
        return out


@torch.no_grad()
def outlier_ratios(model, calib_ids: torch.Tensor, m: float = 5.0, batch_size: int = 8) -> list[float]:
    """D_l: share of the layer's Wanda scores above ``m`` × their mean (dense model, dense inputs;
    a streamed model holds one layer at a time)."""
    cb = OutlierRatios(model, m)
    run_layers(model, cb, calib_ids, batch_size=batch_size)
    return cb.ratios


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-layer target sparsities: mean ``target``, spread ±``lam``, fewer cuts where more outliers."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo < 1e-12:
        return [target] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [min(1.0, max(0.0, target + mean - s)) for s in scaled]


def nearest_levels(grid: SupernetGrid, layer_sparsity: list[float]) -> dict[str, list[int]]:
    """The grid level of each module nearest the layer's sparsity, then repaired to the grid's
    centre budget (never above it) by moving the modules furthest from their targets."""
    levels = {
        k: [
            min(range(len(g.keep)), key=lambda i: (abs(g.sparsity(i) - layer_sparsity[l]), i))
            for l, g in enumerate(grid.modules[k])
        ]
        for k in KINDS
    }
    budget = grid.allocation_params(grid.centre_levels())

    def gap(k, l, lvl):  # how much more pruned than wanted the module would be at lvl
        return grid.modules[k][l].sparsity(lvl) - layer_sparsity[l]

    for _ in range(10_000):
        cost = grid.allocation_params(levels)
        if cost > budget:  # prune one more level where the module is least pruned relative to its target
            cands = [
                (gap(k, l, levels[k][l] + 1), k, l)
                for k in KINDS
                for l in range(grid.num_layers)
                if levels[k][l] + 1 < len(grid.modules[k][l].keep)
            ]
            if not cands:
                break
            _, k, l = min(cands)
            levels[k][l] += 1
            continue
        # un-prune one level where it helps most, if it still fits
        cands = [
            (gap(k, l, levels[k][l]), k, l)
            for k in KINDS
            for l in range(grid.num_layers)
            if levels[k][l] > 0
            and cost + grid.modules[k][l].params(levels[k][l] - 1) - grid.modules[k][l].params(levels[k][l]) <= budget
        ]
        if not cands:
            break
        g, k, l = max(cands)
        if g <= 0 and gap(k, l, levels[k][l] - 1) < -g:
            break  # moving would overshoot the target more than it fixes
        levels[k][l] -= 1
    return levels
