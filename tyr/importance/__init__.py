"""Unit importance: which heads / channels a local pruner keeps.

Every scorer implements ``select(problem, keep_counts) -> (kept-unit lists, info)`` returning
nested kept sets (one per requested count, larger counts ⊇ smaller ones), so one call serves every
level of the supernet. Ranking scorers only define ``score``; HyWIA and OBS override ``select``.
Scorers are chosen from Hydra by ``_target_`` (``conf/pruner/*.yaml``).

Taylor-family scores use per-weight salience from the language-model loss gradient g and the
diagonal empirical Fisher F (LLM-Pruner, HyWIA):
  first order  s¹ = W⊙g,    second order  s² = W⊙g − ½·W⊙F⊙W,
  element-wise (fine)  Σ_unit |s|,    vector-wise (coarse)  |Σ_unit s|  (per member projection,
  summed over the unit's coupled projections).
"""

from __future__ import annotations

import logging
import math

import torch

from tyr.pruning.problem import ModuleProblem, refit, relative_error, unit_sum

log = logging.getLogger(__name__)

TAYLOR_KEYS = ("element1", "vector1", "element2", "vector2")


def taylor_reductions(problem_members: dict[str, tuple[torch.Tensor, str]], grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      n_units: int, unit_width: int) -> dict[str, torch.Tensor]:
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


class Scorer:
    """Base: rank units by ``score`` (higher = more important) and keep the top ones."""

    needs_gradients = False

    def score(self, problem: ModuleProblem) -> torch.Tensor:
        raise NotImplementedError

    def select(self, problem: ModuleProblem, keep_counts: list[int], probe: int | None = None) -> tuple[list[list[int]], dict]:
        """Nested kept sets for ``keep_counts``; ``probe`` is the count that matters most (the
        supernet's centre level), used by scorers that calibrate themselves on one count."""
        return nested_top(self.score(problem), keep_counts), {}


def nested_top(scores: torch.Tensor, keep_counts: list[int]) -> list[list[int]]:
    """Top-k units by score for every k (ties broken by lower index): nested by construction."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [sorted(order[:k]) for k in keep_counts]


class Magnitude(Scorer):
    """L2 norm of all of a unit's weights across its coupled projections."""

    def score(self, p):
        return sum(p.unit_sum(W * W, how) for W, how in p.members.values()).sqrt()


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


class WandaSP(Scorer):
    """Wanda-sp (FLAP paper): Σ over the unit's output-projection columns j of |W₀[:, j]|·‖X_j‖."""

    def score(self, p):
        norms = torch.diagonal(p.stats.H).clamp_min(0).sqrt()
        return p.unit_sum(p.out_weight.abs() * norms[None, :], "cols")


class FLAP(Scorer):
    """FLAP fluctuation: Σ over the unit's columns j of Var(X_j)·‖W₀[:, j]‖² (pair it with bias=true)."""

    def score(self, p):
        return p.unit_sum(p.out_weight.pow(2) * p.stats.var[None, :], "cols")


def _probe_count(keep_counts: list[int], n_units: int) -> int:
    inner = sorted(k for k in keep_counts if 0 < k < n_units)
    return inner[len(inner) // 2] if inner else max(1, n_units // 2)


def obs_costs(p: ModuleProblem, W: torch.Tensor, Hinv: torch.Tensor, alive: list[int]) -> list[float]:
    """Optimal-brain-surgeon group cost of removing each unit of ``alive`` (columns C) from the output
    projection ``W`` with optimal compensation by the others: tr(W_C [(H⁻¹)_CC]⁻¹ W_Cᵀ)."""
    if p.unit_width == 1:  # ‖W[:, j]‖² / (H⁻¹)_jj, vectorised
        idx = torch.as_tensor(alive)
        return (W[:, idx].pow(2).sum(0) / torch.diagonal(Hinv)[idx]).tolist()
    costs = []
    for u in alive:
        C = p.columns([u])
        Wc = W[:, C]
        costs.append(float(torch.einsum("oi,ij,oj->", Wc, torch.linalg.inv(Hinv[C][:, C]), Wc)))
    return costs


def damped_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double().clone()
    H.diagonal().add_(damp * torch.diagonal(H).mean().clamp_min(1e-12))
    return torch.linalg.inv(H)


class HyWIA(Scorer):
    """Hybrid-grained weight importance (HyWIA, AAAI 2025) with a data-driven fusion.

    Fine = Σ|s²|, coarse = |Σ s²| per unit, each normalised to sum 1 within the module. The fusion
    weights are an attention-style softmax over the granularities whose logits measure how well
    each granularity's ranking preserves *this* layer's output: keep the probe count of units by that
    ranking, refit by least squares, and take logit_k = −log(relative output error_k) / temperature.
    The error comes exactly from the calibration statistics (no extra forward pass).

    ``components`` may add ``compensated``: the one-shot OBS group cost of each unit (what removing
    it costs after the other units are optimally refit, from H⁻¹), a third candidate of the fusion
    that accounts for the reconstruction (docs/design.md, "HyWIA with a compensated component").
    """

    needs_gradients = True
    COMPONENTS = ("fine", "coarse", "compensated")

    def __init__(self, temperature: float = 0.25, damp: float = 0.001, components=("fine", "coarse")):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        components = tuple(str(c) for c in components)
        bad = [c for c in components if c not in self.COMPONENTS]
        if bad or not components or len(set(components)) != len(components):
            raise ValueError(f"HyWIA components must be distinct names from {self.COMPONENTS}, got {list(components)}")
        self.temperature, self.damp, self.names = float(temperature), float(damp), components

    def components(self, p: ModuleProblem) -> dict[str, torch.Tensor]:
        """Every component's unit scores, normalised to sum 1 within the module."""
        if p.taylor is None:
            raise ValueError("HyWIA needs gradients (problem.taylor is None)")
        out = {}
        for name in self.names:
            if name == "compensated":
                units = list(range(p.n_units))
                raw = torch.tensor(obs_costs(p, p.out_weight.double(), damped_inverse(p.stats.H, self.damp), units),
                                   dtype=torch.float64)
            else:
                raw = p.taylor["element2" if name == "fine" else "vector2"].double()
            out[name] = raw / raw.sum().clamp_min(1e-30)
        return out

    def weights(self, p: ModuleProblem, probe: int, comps: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[float]]:
        errs = []
        for comp in (comps or self.components(p)).values():
            keep = nested_top(comp, [probe])[0]
            W, _ = refit(p, keep, damp=self.damp)
            errs.append(max(relative_error(p, keep, W, None), 1e-12))
        logits = torch.tensor([-math.log(e) / self.temperature for e in errs], dtype=torch.float64)
        return torch.softmax(logits, 0), errs

    def select(self, p, keep_counts, probe=None):
        comps = self.components(p)
        probe = _probe_count(keep_counts, p.n_units) if probe is None or not 0 < probe < p.n_units else probe
        alpha, errs = self.weights(p, probe, comps)
        fused = sum(a * c for a, c in zip(alpha, comps.values()))
        info = {"probe_keep": probe}
        for name, a, e in zip(comps, alpha, errs):
            info[f"alpha_{name}"], info[f"err_{name}"] = float(a), e
        return nested_top(fused, keep_counts), info


class OBS(Scorer):
    """Týr's local pruner ordering: progressive removal by the optimal-brain-surgeon group score.

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
            C = p.columns(removed)
            inv_cc = torch.linalg.inv(Hinv[C][:, C])
            W -= W[:, C] @ inv_cc @ Hinv[C, :]
            Hinv -= Hinv[:, C] @ inv_cc @ Hinv[C, :]
            W[:, C] = 0
            Hinv[C, :] = 0
            Hinv[:, C] = 0
            Hinv[C, C] = 1.0  # keep it invertible on the removed block; never read again
            alive = [u for u in alive if u not in set(removed)]
            kept_at[len(alive)] = list(alive)
        return [sorted(kept_at[k]) if k in kept_at else list(range(p.n_units)) for k in keep_counts], {}
