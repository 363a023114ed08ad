"""Týr's local pruner ordering: progressive optimal-brain-surgeon removal."""

from __future__ import annotations

import math

from tyr.pruning.obs_math import damped_inverse, obs_costs, obs_remove
from tyr.pruning.scorers.base import Scorer


class OBS(Scorer):
    """Progressive removal by the optimal-brain-surgeon group score.

    The cost of removing unit u (columns C) with optimal compensation of the rest is
    tr(W_C [(H⁻¹)_CC]⁻¹ W_Cᵀ). Units are removed in ``rounds`` rounds (Týr: MLP 16, attention 1);
    after each round W and H⁻¹ get the OBS update, so later choices see the compensated layer. The
    removal order gives nested kept sets for every requested count.
    """

    def __init__(self, rounds_attn: int = 1, rounds_mlp: int = 16, damp: float = 0.001):
        self.rounds = {"attn": int(rounds_attn), "mlp": int(rounds_mlp)}
        self.damp = float(damp)

    def select(self, p, keep_counts, probe=None):
        Hinv = damped_inverse(p.stats.H, self.damp)
        W = p.out_weight.double().clone()
        alive = list(range(p.n_units))
        stops = sorted({k for k in keep_counts if k < p.n_units}, reverse=True)
        if not stops:
            return [list(range(p.n_units)) for _ in keep_counts], {}
        k_min = stops[-1]
        per_round = max(1, math.ceil((p.n_units - k_min) / max(1, self.rounds[p.kind])))
        kept_at: dict[int, list[int]] = {p.n_units: list(alive)}
        while len(alive) > k_min:
            next_stop = next(k for k in stops if k < len(alive))
            n_remove = min(per_round, len(alive) - next_stop)
            costs = obs_costs(p, W, Hinv, alive)
            order = sorted(range(len(alive)), key=lambda i: (costs[i], alive[i]))
            removed = sorted(alive[i] for i in order[:n_remove])
            obs_remove(W, Hinv, p.columns(removed))
            alive = [u for u in alive if u not in set(removed)]
            kept_at[len(alive)] = list(alive)
        return [sorted(kept_at[k]) if k in kept_at else list(range(p.n_units)) for k in keep_counts], {}
