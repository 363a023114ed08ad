"""OWL-style allocation: outlier ratios, sparsity spread, and a budget-respecting nearest-level map."""

from __future__ import annotations

import pytest

from tyr.allocation import nearest_levels, outlier_ratios, owl_sparsities
from tyr.data import TokenSetSpec, build_token_set
from tyr.supernet.grid import LayerShape, make_grid


def test_owl_sparsities_mean_and_order():
    s = owl_sparsities([0.01, 0.05, 0.03, 0.02], 0.5, lam=0.08)
    assert abs(sum(s) / 4 - 0.5) < 1e-9 and max(s) - min(s) == pytest.approx(0.16)
    assert s[1] == min(s) and s[0] == max(s)  # most outliers -> least pruned
    assert owl_sparsities([0.1] * 3, 0.4) == [0.4] * 3


def test_nearest_levels_keeps_budget():
    shapes = [LayerShape(32, 1000.0, 4096, 30.0)] * 8
    grid = make_grid(shapes, 0.5)
    budget = grid.allocation_params(grid.centre_levels())
    for spread in (0.0, 0.05, 0.2):
        target = [0.5 + spread * (i - 3.5) / 3.5 for i in range(8)]
        lv = nearest_levels(grid, target)
        assert grid.allocation_params(lv) <= budget
        step = max(g.params(0) - g.params(1) for k in ("attn", "mlp") for g in grid.modules[k])
        assert grid.allocation_params(lv) >= budget - step
        if spread > 0:  # the allocation follows the targets' order
            assert lv["mlp"][0] <= lv["mlp"][-1]


def test_outlier_ratios_on_tiny(tiny):
    ids = build_token_set(TokenSetSpec("c4[0:50]", 32, 4, seed=0), tiny.tokenizer).input_ids
    r = outlier_ratios(tiny.model, ids)
    assert len(r) == 4 and all(0.0 <= x < 0.2 for x in r)
