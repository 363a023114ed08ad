"""HyWIA: hybrid-grained weight importance (AAAI 2025) with a data-driven fusion."""

from __future__ import annotations

import math

import torch

from tyr.pruning.obs_math import damped_inverse, obs_costs
from tyr.pruning.problem import ModuleProblem
from tyr.pruning.reconstruction import refit, relative_error
from tyr.pruning.scorers.base import Scorer, nested_top, probe_count


class HyWIA(Scorer):
    """Fine = Σ|s²|, coarse = |Σ s²| per unit (:mod:`tyr.pruning.scorers.taylor`), each normalised to
    sum 1 within the module. The fusion weights are an attention-style softmax over the granularities
    whose logits measure how well each granularity's ranking preserves *this* layer's output: keep the
    probe count of units by that ranking, refit by least squares, and take
    logit_k = −log(relative output error_k) / temperature. The error comes exactly from the
    calibration statistics (no extra forward pass).

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
                raw = torch.tensor(
                    obs_costs(p, p.out_weight.double(), damped_inverse(p.stats.H, self.damp), units), dtype=torch.float64
                )
            else:
                raw = p.taylor["element2" if name == "fine" else "vector2"].double()
            out[name] = raw / raw.sum().clamp_min(1e-30)
        return out

    def weights(
        self, p: ModuleProblem, probe: int, comps: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[float]]:
        errs = []
        for comp in (comps or self.components(p)).values():
            keep = nested_top(comp, [probe])[0]
            W, _ = refit(p, keep, damp=self.damp)
            errs.append(max(relative_error(p, keep, W, None), 1e-12))
        logits = torch.tensor([-math.log(e) / self.temperature for e in errs], dtype=torch.float64)
        return torch.softmax(logits, 0), errs

    def select(self, p, keep_counts, probe=None):
        comps = self.components(p)
        probe = probe_count(keep_counts, p.n_units) if probe is None or not 0 < probe < p.n_units else probe
        alpha, errs = self.weights(p, probe, comps)
        fused = sum(a * c for a, c in zip(alpha, comps.values()))
        info = {"probe_keep": probe}
        for name, a, e in zip(comps, alpha, errs):
            info[f"alpha_{name}"], info[f"err_{name}"] = float(a), e
        return nested_top(fused, keep_counts), info
