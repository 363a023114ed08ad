"""LLM-Pruner's Taylor scores from the language-model loss gradient (DESIGN.md section 2).

Per-weight salience from the gradient g and the diagonal empirical Fisher F:
  first order  s¹ = W⊙g,    second order  s² = W⊙g − ½·W⊙F⊙W,
  element-wise (fine)  Σ_unit |s|,    vector-wise (coarse)  |Σ_unit s|  (per member projection,
  summed over the unit's coupled projections).
"""

from __future__ import annotations

import torch

from tyr.pruning.problem import unit_sum
from tyr.pruning.scorers.base import Scorer

TAYLOR_KEYS = ("element1", "vector1", "element2", "vector2")


def taylor_reductions(
    problem_members: dict[str, tuple[torch.Tensor, str]],
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
    n_units: int,
    unit_width: int,
) -> dict[str, torch.Tensor]:
    """Per-unit Taylor scores of one module from its members' weights, gradient means and Fisher."""
    device = next(iter(problem_members.values()))[0].device
    out = {k: torch.zeros(n_units, dtype=torch.float64, device=device) for k in TAYLOR_KEYS}
    for name, (W, how) in problem_members.items():
        g, fisher = grads[name]
        s1 = W * g
        s2 = s1 - 0.5 * W * fisher * W
        out["element1"] += unit_sum(s1.abs(), how, n_units, unit_width).double()
        out["vector1"] += unit_sum(s1, how, n_units, unit_width).double().abs()
        out["element2"] += unit_sum(s2.abs(), how, n_units, unit_width).double()
        out["vector2"] += unit_sum(s2, how, n_units, unit_width).double().abs()
    return {k: v.float() for k, v in out.items()}


class _Taylor(Scorer):
    needs_gradients = True
    key = ""

    def score(self, p):
        if p.taylor is None:
            raise ValueError(f"{type(self).__name__} needs gradients (problem.taylor is None)")
        return p.taylor[self.key]


class TaylorVector(_Taylor):
    """LLM-Pruner 'vector': |Σ_unit W⊙g| per projection, summed over the unit's projections."""

    key = "vector1"


class TaylorElement1(_Taylor):
    """LLM-Pruner 'element¹': Σ_unit |W⊙g|."""

    key = "element1"


class TaylorElement2(_Taylor):
    """LLM-Pruner 'element²': Σ_unit |W⊙g − ½ W⊙F⊙W| (HyWIA's fine-grained score alone)."""

    key = "element2"
