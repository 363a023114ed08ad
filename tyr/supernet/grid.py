"""Level grids: for every layer and module type, the numbers of kept units at each level.

Level 0 is the least pruned. Levels step by an equal number of units (so by equal *parameter*
counts within a module type), centred on the centre keep count, clipped to [0, n_units]; levels that
clipping makes identical are merged, so a module may have fewer levels than asked (its centre index
is recorded). Minimum step: one head / ``min_channels`` channels.

Parameter costs are *nominal*: a query head owns its ``q_proj`` rows and ``o_proj`` columns; the K/V
projections are a fixed cost of the attention module; a channel owns its gate / up rows and its down
column. The nominal cost of a module is linear in its kept units, so level moves are exact in the
budget, and it equals the real count unless a whole KV group (or block) is dropped, in which case the
real model is smaller than accounted (conservative). Real counts are measured and reported too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class ModuleGrid:
    kind: str
    n_units: int
    unit_params: float  # nominal parameters per unit
    keep: tuple[int, ...]  # kept units per level, descending (level 0 = least pruned)
    centre: int  # index of the centre level
    fixed_params: float = 0.0  # parameters the module keeps whatever its level (K/V projections)

    def params(self, level: int) -> int:
        return int(round(self.fixed_params + self.keep[level] * self.unit_params))

    @property
    def dense_params(self) -> int:
        return int(round(self.fixed_params + self.n_units * self.unit_params))

    def sparsity(self, level: int) -> float:
        return 1.0 - self.keep[level] / self.n_units if self.n_units else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ModuleGrid:
        return cls(
            d["kind"],
            int(d["n_units"]),
            float(d["unit_params"]),
            tuple(int(k) for k in d["keep"]),
            int(d["centre"]),
            float(d.get("fixed_params", 0.0)),
        )


def module_levels(n_units: int, centre_keep: int, interval: float, n_levels: int, min_step: int) -> tuple[tuple[int, ...], int]:
    """Kept-unit counts per level (descending, distinct) and the centre's index."""
    if n_levels < 1 or n_levels % 2 == 0:
        raise ValueError(f"n_levels must be odd and positive, got {n_levels}")
    if not 0 <= centre_keep <= n_units:
        raise ValueError(f"centre keep {centre_keep} outside 0..{n_units}")
    step = max(min_step, int(round(interval * n_units / min_step)) * min_step)
    half = n_levels // 2
    raw = [min(n_units, max(0, centre_keep + (half - k) * step)) for k in range(n_levels)]
    keep = tuple(sorted(set(raw), reverse=True))
    return keep, keep.index(centre_keep)


@dataclass(frozen=True)
class SupernetGrid:
    """Per-layer module grids for a whole model."""

    modules: dict[str, tuple[ModuleGrid, ...]]

    @property
    def num_layers(self) -> int:
        return len(self.modules["attn"])

    def centre_levels(self) -> dict[str, list[int]]:
        return {k: [g.centre for g in self.modules[k]] for k in KINDS}

    def costs(self) -> dict[str, list[list[int]]]:
        """Kept nominal parameters per level: the search space's cost table."""
        return {k: [[g.params(i) for i in range(len(g.keep))] for g in self.modules[k]] for k in KINDS}

    def dense_params(self) -> int:
        return sum(g.dense_params for k in KINDS for g in self.modules[k])

    def allocation_params(self, levels: dict[str, list[int]]) -> int:
        return sum(self.modules[k][l].params(levels[k][l]) for k in KINDS for l in range(self.num_layers))

    def to_json(self) -> dict:
        return {k: [g.to_json() for g in self.modules[k]] for k in KINDS}

    @classmethod
    def from_json(cls, d: dict) -> SupernetGrid:
        return cls({k: tuple(ModuleGrid.from_json(g) for g in d[k]) for k in KINDS})


@dataclass(frozen=True)
class LayerShape:
    """Dense widths of one layer and its nominal parameters per unit."""

    heads: int
    head_unit_params: float
    channels: int
    channel_unit_params: float
    attn_fixed_params: float = 0.0


def make_grid(
    shapes: list[LayerShape],
    target_sparsity: float,
    interval: float = 0.125,
    n_levels: int = 9,
    min_heads: int = 1,
    min_channels: int = 32,
    centre: dict[str, list[int]] | None = None,
) -> SupernetGrid:
    """Grid centred on ``target_sparsity`` of the prunable parameters (or on explicit ``centre`` keep
    counts). Heads are coarse, so the attention centre is the rounded uniform head count and the MLP
    centre takes up the rest of the budget."""
    if not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1], got {target_sparsity}")
    if centre is None:
        heads_c = [int(round(s.heads * (1 - target_sparsity))) for s in shapes]
        total = sum(s.attn_fixed_params + s.heads * s.head_unit_params + s.channels * s.channel_unit_params for s in shapes)
        attn_kept = sum(s.attn_fixed_params + h * s.head_unit_params for h, s in zip(heads_c, shapes))
        mlp_budget = (1 - target_sparsity) * total - attn_kept
        mlp_total = sum(s.channels * s.channel_unit_params for s in shapes)
        frac = min(1.0, max(0.0, mlp_budget / mlp_total)) if mlp_total else 0.0
        ch_c = [int(round(s.channels * frac)) for s in shapes]
        centre = {"attn": heads_c, "mlp": ch_c}
    mods: dict[str, list[ModuleGrid]] = {"attn": [], "mlp": []}
    for l, s in enumerate(shapes):
        keep, c = module_levels(s.heads, centre["attn"][l], interval, n_levels, min_heads)
        mods["attn"].append(ModuleGrid("attn", s.heads, float(s.head_unit_params), keep, c, float(s.attn_fixed_params)))
        keep, c = module_levels(s.channels, centre["mlp"][l], interval, n_levels, min_channels)
        mods["mlp"].append(ModuleGrid("mlp", s.channels, float(s.channel_unit_params), keep, c))
    return SupernetGrid({k: tuple(v) for k, v in mods.items()})


def layer_shapes(model) -> list[LayerShape]:
    """Dense widths and nominal unit costs of every layer of a (dense) model."""
    from tyr.modeling.adapter import get_adapter

    a = get_adapter(model)
    out = []
    for layer in a.layers(model):
        geo = a.geometry(layer)
        p = a.projections(layer)
        hidden = p["q_proj"].in_features
        qb = geo.head_dim if p["q_proj"].bias is not None else 0
        kvb = 2 * geo.head_dim if p["k_proj"].bias is not None else 0
        head = 2 * hidden * geo.head_dim + qb
        fixed = geo.num_kv_heads * (2 * hidden * geo.head_dim + kvb) + (hidden if p["o_proj"].bias is not None else 0)
        ch = 2 * hidden + p["down_proj"].out_features
        out.append(LayerShape(geo.num_heads, head, a.intermediate_size(layer), ch, fixed))
    return out
