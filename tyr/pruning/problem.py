"""One module (attention heads or MLP channels) of one layer, as the local pruner sees it.

Notation: the output projection (``o_proj`` / ``down_proj``) has dense weight W₀ [out, in] and input
X [tokens, in] with H = XᵀX, s = Σx, n tokens (float32). A unit owns ``unit_width`` consecutive input
columns (head_dim for a head, 1 for a channel). The reconstruction (refit, errors) is in
:mod:`tyr.pruning.reconstruction`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tyr.layerwise.engine import InputStats
from tyr.modeling.adapter import DecoderAdapter


def unit_sum(per_weight: torch.Tensor, how: str, n_units: int, unit_width: int) -> torch.Tensor:
    """Sum a per-weight tensor of one member projection over each unit's weights → [n_units]
    (``how``: the unit owns ``rows`` or input ``cols`` of that projection)."""
    if how == "rows":
        return per_weight.reshape(n_units, -1).sum(1)
    return per_weight.reshape(per_weight.shape[0], n_units, unit_width).sum((0, 2))


@dataclass
class ModuleProblem:
    kind: str  # "attn" or "mlp"
    layer: int
    unit_width: int
    n_units: int
    out_weight: torch.Tensor  # W₀ [out, in], float32
    members: dict[str, tuple[torch.Tensor, str]]  # projection -> (float32 weight, "rows" | "cols")
    stats: InputStats  # input statistics of the output projection
    taylor: dict[str, torch.Tensor] | None = None  # per-unit Taylor reductions (see pruning.scorers.taylor)
    _aug: torch.Tensor | None = field(default=None, repr=False)  # cached float64 augmented H
    _energy: float | None = field(default=None, repr=False)  # cached ‖X W₀ᵀ‖²

    def augmented(self) -> torch.Tensor:
        """[[H, Σx], [Σxᵀ, n]] in float64 (built once per problem)."""
        if self._aug is None:
            self._aug = _augmented(self.stats)
        return self._aug

    def dense_energy(self) -> float:
        """‖X W₀ᵀ‖² = tr(W₀ H W₀ᵀ), the denominator of every relative error (computed once)."""
        if self._energy is None:
            W0 = self.out_weight.double()
            self._energy = float(((W0 @ self.augmented()[:-1, :-1]) * W0).sum())
        return self._energy

    def columns(self, units) -> torch.Tensor:
        units = torch.as_tensor(list(units), dtype=torch.long)
        if self.unit_width == 1:
            return units
        return (units[:, None] * self.unit_width + torch.arange(self.unit_width)).reshape(-1)

    def unit_sum(self, per_weight: torch.Tensor, how: str) -> torch.Tensor:
        return unit_sum(per_weight, how, self.n_units, self.unit_width)


def attention_problem(adapter: DecoderAdapter, layer, index: int, stats: InputStats, taylor: dict | None = None) -> ModuleProblem:
    attn = adapter.attention(layer)
    geo = adapter.geometry(layer)
    return ModuleProblem(
        "attn",
        index,
        geo.head_dim,
        geo.num_heads,
        attn.o_proj.weight.detach().float(),
        {"q_proj": (attn.q_proj.weight.detach().float(), "rows"), "o_proj": (attn.o_proj.weight.detach().float(), "cols")},
        stats,
        taylor,
    )


def mlp_problem(adapter: DecoderAdapter, layer, index: int, stats: InputStats, taylor: dict | None = None) -> ModuleProblem:
    mlp = adapter.mlp(layer)
    return ModuleProblem(
        "mlp",
        index,
        1,
        mlp.gate_proj.out_features,
        mlp.down_proj.weight.detach().float(),
        {
            "gate_proj": (mlp.gate_proj.weight.detach().float(), "rows"),
            "up_proj": (mlp.up_proj.weight.detach().float(), "rows"),
            "down_proj": (mlp.down_proj.weight.detach().float(), "cols"),
        },
        stats,
        taylor,
    )


@dataclass
class Variant:
    """A pruned module: kept units, the kept output-projection columns (refit or sliced) and bias."""

    keep: list[int]
    out_weight: torch.Tensor  # [out, len(keep) * unit_width], float32
    out_bias: torch.Tensor | None
    rel_error: float  # ‖ΔY‖² / ‖Y‖² on the calibration inputs
    info: dict = field(default_factory=dict)


def _augmented(stats: InputStats) -> torch.Tensor:
    H, s, n = stats.H.double(), stats.sum.double(), float(stats.count)
    d = H.shape[0]
    Ha = torch.empty(d + 1, d + 1, dtype=torch.float64, device=H.device)
    Ha[:d, :d], Ha[:d, d], Ha[d, :d], Ha[d, d] = H, s, s, n
    return Ha
