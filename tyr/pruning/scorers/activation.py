"""Activation-aware scores of the output projection's columns: Wanda-sp and FLAP (FLAP paper)."""

from __future__ import annotations

import torch

from tyr.pruning.scorers.base import Scorer


class WandaSP(Scorer):
    """Wanda-sp (FLAP paper): Σ over the unit's output-projection columns j of |W₀[:, j]|·‖X_j‖."""

    def score(self, p):
        norms = torch.diagonal(p.stats.H).clamp_min(0).sqrt()
        return p.unit_sum(p.out_weight.abs() * norms[None, :], "cols")


class FLAP(Scorer):
    """FLAP fluctuation: Σ over the unit's columns j of Var(X_j)·‖W₀[:, j]‖² (pair it with bias=true)."""

    def score(self, p):
        return p.unit_sum(p.out_weight.pow(2) * p.stats.var[None, :], "cols")
