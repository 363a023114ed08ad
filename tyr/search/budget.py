"""Fit a start allocation to a parameter budget, greedily by the supernet's error estimates.

The evolution's level switches move the total cost little and never above the budget
(:mod:`tyr.search.space`), so the start decides how much of the budget the search can use. With real
costs (:mod:`tyr.supernet.costs`) the grid centre is not exactly on the budget: it falls below it when
kept heads leave key / value groups empty, and a later iteration's centre can land above it when its
variants keep other heads. :func:`fit_to_budget` first prunes one level at a time where that costs the
least error per parameter saved, until the allocation fits; then gives levels back where they buy the
most error per parameter added, while they fit. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def allocation_cost(costs: Mapping[str, Sequence[Sequence[int]]], levels: Mapping[str, Sequence[int]]) -> int:
    return sum(costs[k][l][lvl] for k in costs for l, lvl in enumerate(levels[k]))


def fit_to_budget(
    costs: Mapping[str, Sequence[Sequence[int]]],
    errors: Mapping[str, Sequence[Sequence[float]]],
    levels: Mapping[str, Sequence[int]],
    budget: int,
) -> dict[str, list[int]]:
    """``levels`` moved to the budget: the result costs at most ``budget`` and no single module can
    move one level towards less pruning without exceeding it. Level 0 is the least pruned;
    ``errors[k][l][lvl]`` the variant's error estimate (non-decreasing in the level)."""
    out = {k: list(v) for k, v in levels.items()}
    total = allocation_cost(costs, out)
    while total > budget:  # prune where the error grows least per parameter saved
        moves = [
            ((errors[k][l][lvl + 1] - errors[k][l][lvl]) / saved, k, l)
            for k in costs
            for l, lvl in enumerate(out[k])
            if lvl + 1 < len(costs[k][l]) and (saved := costs[k][l][lvl] - costs[k][l][lvl + 1]) > 0
        ]
        if not moves:
            raise ValueError(f"no allocation of the grid fits the budget of {budget:,} parameters")
        _, k, l = min(moves)
        total -= costs[k][l][out[k][l]] - costs[k][l][out[k][l] + 1]
        out[k][l] += 1
    while True:  # give back where the error falls most per parameter added, while it fits
        moves = [
            ((errors[k][l][lvl] - errors[k][l][lvl - 1]) / added, k, l)
            for k in costs
            for l, lvl in enumerate(out[k])
            if lvl > 0 and 0 < (added := costs[k][l][lvl - 1] - costs[k][l][lvl]) <= budget - total
        ]
        if not moves:
            return out
        _, k, l = max(moves)
        total += costs[k][l][out[k][l] - 1] - costs[k][l][out[k][l]]
        out[k][l] -= 1
