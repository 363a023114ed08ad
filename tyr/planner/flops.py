"""FLOPs of the local pruner's solves, of a forward pass, and the search's candidates per stage."""

from __future__ import annotations

from collections.abc import Sequence

from tyr.planner.settings import ArchFacts, PrunerSettings
from tyr.search.settings import SearchSettings
from tyr.supernet.grid import KINDS, SupernetGrid

# tyr.supernet.builder: per layer, statistics of o_proj's input (one forward), of down_proj's input
# with the EEA attention (one forward), and the next layer's input (one forward).
BUILD_LAYER_FORWARDS = 3
# tyr.layerwise.gradients: the forward pass, the recomputed forward of each layer (both counted in
# tests/test_planner.py), and the backward through the layer (input and weight gradients, ~2 forwards).
GRAD_LAYER_FORWARDS = 2
GRAD_FORWARD_EQUIVALENTS = GRAD_LAYER_FORWARDS + 2


def _refit_flops(kept: int, d: int, o: int) -> float:
    """refit(): B = Z_K,: H W₀ᵀ (2·k·d·o), Cholesky of the kept block (k³/3), two triangular solves
    with o right-hand sides (2·k²·o)."""
    return 2.0 * kept * d * o + kept**3 / 3.0 + 2.0 * kept**2 * o


def _error_flops(d: int, o: int) -> float:
    """relative_error(): one quadratic form Δ H Δᵀ over the full input width (the dense energy
    W₀ H W₀ᵀ is computed once per module and cached, so it is negligible per call)."""
    return 2.0 * o * (d + 1) ** 2


def solve_calls(grid: SupernetGrid, arch: ArchFacts, pruner: PrunerSettings) -> list[tuple[str, str, int, int]]:
    """Every least-squares call of one build, as ``(op, kind, kept_columns, input_width)`` with op
    ``refit`` or ``error`` (tyr.pruning.local.LocalPruner.prune and HyWIA's probes): per module, the
    probes (refit + error at the centre count, per granularity), then per level that removes something
    the error of the plain slice and, with lstsq, a refit and its error. The dense level costs nothing."""
    width = {"attn": arch.head_dim, "mlp": 1}
    calls = []
    for kind in KINDS:
        w = width[kind]
        for g in grid.modules[kind]:
            d = g.n_units * w
            centre = g.keep[g.centre]
            inner = sorted(k for k in g.keep if 0 < k < g.n_units)
            probe = centre if 0 < centre < g.n_units else (inner[len(inner) // 2] if inner else max(1, g.n_units // 2))
            for _ in range(pruner.probe_solves):
                calls += [("refit", kind, probe * w, d), ("error", kind, 0, d)]
            for k in g.keep:
                if k == g.n_units:
                    continue
                calls.append(("error", kind, 0, d))
                if pruner.reconstruction == "lstsq":
                    calls += [("refit", kind, k * w, d), ("error", kind, 0, d)]
    return calls


def solve_flops(grid: SupernetGrid, arch: ArchFacts, pruner: PrunerSettings) -> dict[str, float]:
    """Float64 FLOPs of the local pruner over all layers of one build (see :func:`solve_calls`)."""
    o = arch.hidden_size
    tot = {"refit": 0.0, "error": 0.0}
    for op, _kind, kept, d in solve_calls(grid, arch, pruner):
        if op == "refit":
            tot["refit"] += _refit_flops(kept + (1 if pruner.bias and kept else 0), d, o)
        else:
            tot["error"] += _error_flops(d, o)
    tot["total"] = tot["refit"] + tot["error"]
    return tot


def forward_flops_per_token(arch: ArchFacts, linear_params: float, q_dims: Sequence[int], seq_len: int, with_head: bool) -> float:
    """One forward, per token: 2 FLOPs per linear weight, plus causal attention (QKᵀ and AV, average
    context seq_len/2: 2·seq_len·q_dim per layer), plus the LM head if used."""
    f = 2.0 * linear_params + sum(2.0 * seq_len * q for q in q_dims)
    if with_head:
        f += 2.0 * arch.vocab_size * arch.hidden_size
    return f


def stage_candidates(search: SearchSettings) -> list[int]:
    """Candidates evaluated per stage of one generation (tyr.search.evolution: n_0 offspring or the
    prescreen's keep, then min(survivors, n); the parent is re-entered at every stage)."""
    n = search.offspring if search.prescreen_keep is None else min(search.offspring, search.prescreen_keep)
    out = []
    for _tokens, survivors in search.stages:
        out.append(n + 1)
        n = min(survivors, n)
    return out
