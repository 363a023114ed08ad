"""Cost planner: parameters, supernet disk size, memory, FLOPs and time of a tyr run, from the
model's ``arch:`` block alone (no weights).

Pure functions on typed arguments; the Hydra entry point is :mod:`tyr.recipes.plan`. Only the
standard library and :mod:`tyr.supernet.grid` (itself torch-free) are imported, and the supernet's
level grid comes from tyr's own :func:`~tyr.supernet.grid.make_grid`, so the predicted shard bytes
are those :meth:`tyr.supernet.store.SupernetStore.write_layer` writes (tested on tiny-llama, where
they agree to the byte). Memory and FLOPs are estimates of what the code in ``tyr/`` does today;
``docs/planner.md`` lists every term.

Units: bytes in decimal GB / TB (1 GB = 10⁹ bytes), parameters in M / B, FLOPs in TFLOP / PFLOP /
EFLOP. "Týr" is the paper (Týr-the-Pruner, NeurIPS 2025); its supernet layout below is our
assumption, not its code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from tyr.supernet.grid import KINDS, LayerShape, SupernetGrid, make_grid

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32"}
# safetensors (>= 0.4) orders a file's tensors by dtype, largest enum value first, then by name; the
# order changes the digits of the offsets in the header, so we mirror it to predict the header length.
_SAFETENSORS_DTYPE_RANK = {"F16": 11, "BF16": 12, "I32": 13, "F32": 15}
SHARD_SCHEMA_VERSION = 1  # mirrors tyr.supernet.store.SCHEMA_VERSION (checked by tests/test_planner.py)

PAPER_INTERVALS = (0.125, 0.0625, 0.03125, 0.015625)  # Týr's 4 coarse-to-fine iterations
# Týr's reported supernet sizes (DESIGN.md section 3), keyed by (layers, hidden, intermediate, heads):
# Llama-3.1-8B 39.6 GB and Llama-3.1-70B 414.7 GB (Llama-3 has the same shapes).
TYR_REPORTED_BYTES = {(32, 4096, 14336, 32): 39.6e9, (80, 8192, 28672, 64): 414.7e9}

KL_CHUNK = 1024  # positions per LM-head chunk in tyr.fitness.kl_sum / TeacherCache.build
# tyr.supernet.builder: per layer, statistics of o_proj's input (one forward), of down_proj's input
# with the EEA attention (one forward), and the next layer's input (one forward).
BUILD_LAYER_FORWARDS = 3
# tyr.layerwise.gradients: the forward pass, the recomputed forward of each layer (both counted in
# tests/test_planner.py), and the backward through the layer (input and weight gradients, ~2 forwards).
GRAD_LAYER_FORWARDS = 2
GRAD_FORWARD_EQUIVALENTS = GRAD_LAYER_FORWARDS + 2


# ------------------------------------------------------------------------------------------------
# architecture
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchFacts:
    """The ``arch:`` block of ``conf/model/<name>.yaml``."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"arch.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"arch.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ArchFacts":
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("model_type", "num_layers", "hidden_size", "intermediate_size", "num_heads",
                               "num_kv_heads", "head_dim", "vocab_size") if f not in d]
        if missing:
            raise ValueError(f"arch block lacks {missing}")
        kw = {k: v for k, v in d.items() if k in known}
        ints = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
        return cls(**{k: (int(v) if k in ints else bool(v) if k in ("tie_word_embeddings", "attention_bias") else str(v))
                      for k, v in kw.items()})

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def o_bias(self) -> bool:
        # Llama's attention_bias also gives o_proj a bias; Qwen2's only q/k/v.
        return self.attention_bias and self.model_type == "llama"

    def norm_params_per_layer(self) -> int:
        if self.model_type.startswith("gemma3"):  # 4 RMSNorms per layer + q_norm / k_norm over head_dim
            return 4 * self.hidden_size + 2 * self.head_dim
        return 2 * self.hidden_size  # input_layernorm + post_attention_layernorm

    def layer_params(self) -> dict[str, int]:
        """Parameters of one decoder layer, by projection (weights + biases)."""
        H, I, b = self.hidden_size, self.intermediate_size, self.attention_bias
        p = {
            "q_proj": H * self.q_dim + (self.q_dim if b else 0),
            "k_proj": H * self.kv_dim + (self.kv_dim if b else 0),
            "v_proj": H * self.kv_dim + (self.kv_dim if b else 0),
            "o_proj": self.q_dim * H + (H if self.o_bias else 0),
            "gate_proj": H * I, "up_proj": H * I, "down_proj": I * H,
        }
        p["attention"] = p["q_proj"] + p["k_proj"] + p["v_proj"] + p["o_proj"]
        p["mlp"] = p["gate_proj"] + p["up_proj"] + p["down_proj"]
        p["prunable"] = p["attention"] + p["mlp"]
        p["norms"] = self.norm_params_per_layer()
        p["total"] = p["prunable"] + p["norms"]
        return p

    def model_params(self) -> dict[str, int]:
        """Whole-model counts (tied embeddings counted once), as tyr.modeling.params.parameter_counts."""
        lp = self.layer_params()
        L, H, V = self.num_layers, self.hidden_size, self.vocab_size
        out = {"embeddings": V * H, "lm_head": 0 if self.tie_word_embeddings else V * H,
               "norms": L * lp["norms"] + H, "attention": L * lp["attention"], "mlp": L * lp["mlp"],
               "prunable": L * lp["prunable"]}
        out["decoder"] = L * lp["total"]
        out["total"] = out["embeddings"] + out["lm_head"] + out["prunable"] + out["norms"]
        return out

    def layer_shapes(self) -> list[LayerShape]:
        """The nominal unit costs :func:`tyr.supernet.grid.layer_shapes` computes from a model (a head:
        its q rows and o columns; K/V and an o bias: fixed; a channel: gate/up rows and down column).
        Kept equal to it by tests/test_planner.py for every model config."""
        H, hd = self.hidden_size, self.head_dim
        qb = hd if self.attention_bias else 0
        kvb = 2 * hd if self.attention_bias else 0
        head = 2 * H * hd + qb
        fixed = self.num_kv_heads * (2 * H * hd + kvb) + (H if self.o_bias else 0)
        ch = 2 * H + H
        return [LayerShape(self.num_heads, head, self.intermediate_size, ch, fixed) for _ in range(self.num_layers)]


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridSettings:
    """A supernet grid (``conf/supernet``; the search config has its own for each iteration)."""

    n_levels: int = 9
    interval: float = 0.125
    min_heads: int = 1
    min_channels: int = 32
    eea: str = "expectation"


@dataclass(frozen=True)
class PrunerSettings:
    """What of the local pruner changes sizes and solve counts."""

    reconstruction: str = "lstsq"  # lstsq | none
    bias: bool = False  # a stored bias per non-dense variant
    probe_solves: int = 2  # HyWIA: one refit + error per granularity at the probe count; 0 for the others


@dataclass(frozen=True)
class DataSizes:
    calib_tokens: int  # calibration tokens of one supernet build
    grad_tokens: int  # tokens of the gradient pass (Taylor / HyWIA scores); 0 = no gradients
    seq_len: int  # sequence length of every token set
    search_set_tokens: int | None = None  # tokens of data.search (the pipeline's teacher set), for a warning
    batch_size: int = 8

    def sequences(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.seq_len)) if tokens > 0 else 0


@dataclass(frozen=True)
class SearchPlanSettings:
    name: str = "paper"
    intervals: tuple[float, ...] = PAPER_INTERVALS
    n_levels: int = 9
    min_heads: int = 1
    min_channels: int = 32
    generations: int = 50
    offspring: int = 128
    stages: tuple[tuple[int, int], ...] = ((2048, 16), (16384, 4), (131072, 1))
    prescreen_keep: int | None = None
    topk: int = 8192
    prefix_cache: bool = True
    prefix_cache_max_mb: float = 16384.0
    surrogate_check: int = 0


@dataclass(frozen=True)
class Throughput:
    tflops: float = 100.0  # device matmul throughput in the model dtype, TFLOP/s
    fp64_tflops: float | None = None  # float64 solves (None: the same as tflops)
    cpu_tflops: float = 0.05  # this 2-core CPU, measured


# ------------------------------------------------------------------------------------------------
# supernet bytes
# ------------------------------------------------------------------------------------------------
def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def safetensors_file_bytes(entries: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None) -> dict[str, int]:
    """Size of a safetensors file holding tensors ``(name, dtype, shape)`` (dtype as ``F32``, ``BF16``,
    ``I32``...): 8-byte header length + JSON header padded with spaces to a multiple of 8 + data."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "F64": 8}
    ordered = sorted(entries, key=lambda e: (-_SAFETENSORS_DTYPE_RANK.get(e[1], 0), e[0]))
    parts, offset = [], 0
    if metadata:
        parts.append('"__metadata__":' + json.dumps(dict(metadata), separators=(",", ":")))
    for name, dt, shape in ordered:
        n = itemsize[dt] * math.prod(shape)
        parts.append(json.dumps(name) + ":" + json.dumps({"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]},
                                                         separators=(",", ":")))
        offset += n
    header = len(("{" + ",".join(parts) + "}").encode())
    header += (-header) % 8
    return {"data": offset, "header": 8 + header, "total": 8 + header + offset}


def shard_entries(grid: SupernetGrid, layer: int, arch: ArchFacts, dtype: str, bias: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors :meth:`SupernetStore.write_layer` stores for one layer: per module and level the kept
    unit indices (int32), the kept output-projection columns [hidden, kept * unit_width] (model dtype)
    and, with a bias-fitting pruner, a bias [hidden] for every level that removes something."""
    dt = SAFETENSORS_DTYPE[dtype]
    width = {"attn": arch.head_dim, "mlp": 1}
    out = []
    for kind in KINDS:
        g = grid.modules[kind][layer]
        for lvl, k in enumerate(g.keep):
            out.append((f"{kind}.{lvl}.keep", "I32", (k,)))
            out.append((f"{kind}.{lvl}.weight", dt, (arch.hidden_size, k * width[kind])))
            if bias and k < g.n_units:
                out.append((f"{kind}.{lvl}.bias", dt, (arch.hidden_size,)))
    return out


def shard_metadata(layer: int) -> dict[str, str]:
    return {"tyr": json.dumps({"layer": layer, "schema_version": SHARD_SCHEMA_VERSION}, sort_keys=True)}


def supernet_bytes(grid: SupernetGrid, arch: ArchFacts, dtype: str, bias: bool = False) -> dict[str, Any]:
    """Exact shard bytes of tyr's supernet for ``grid`` (the manifest, a few hundred KB, not counted)."""
    per_layer = [safetensors_file_bytes(shard_entries(grid, l, arch, dtype, bias), shard_metadata(l))
                 for l in range(grid.num_layers)]
    b = dtype_bytes(dtype)
    attn = sum(arch.hidden_size * k * arch.head_dim * b + 4 * k for g in grid.modules["attn"] for k in g.keep)
    mlp = sum(arch.hidden_size * k * b + 4 * k for g in grid.modules["mlp"] for k in g.keep)
    return {"total": sum(p["total"] for p in per_layer), "data": sum(p["data"] for p in per_layer),
            "header": sum(p["header"] for p in per_layer), "per_layer": [p["total"] for p in per_layer],
            "attn_data": attn, "mlp_data": mlp}


def tyr_paper_layout_bytes(grid: SupernetGrid, arch: ArchFacts, dtype: str) -> dict[str, int]:
    """Týr's zero-padded layout for the same grid — OUR ASSUMPTION, not Týr's code: every variant
    stores full-size (zero-padded) tensors in the model dtype, either of all its module's
    projections (attention q,k,v,o; MLP gate,up,down) or only of the output projection."""
    lp, b = arch.layer_params(), dtype_bytes(dtype)
    all_proj = sum(len(g.keep) * lp["attention"] for g in grid.modules["attn"]) + \
        sum(len(g.keep) * lp["mlp"] for g in grid.modules["mlp"])
    out_only = sum(len(g.keep) * lp["o_proj"] for g in grid.modules["attn"]) + \
        sum(len(g.keep) * lp["down_proj"] for g in grid.modules["mlp"])
    return {"all_projections": all_proj * b, "output_projection_only": out_only * b}


def teacher_cache_bytes(num_sequences: int, seq_len: int, k: int) -> int:
    """Exactly :attr:`tyr.fitness.TeacherCache.nbytes`: int64 input ids per token, and per predicted
    position (seq_len - 1 per sequence) k int32 ids + k float32 log-probabilities + a float32 tail.
    (:meth:`TeacherCache.estimate_bytes` rounds this up to tokens x (8k + 12).)"""
    return num_sequences * seq_len * 8 + num_sequences * (seq_len - 1) * (8 * k + 4)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
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


def forward_flops_per_token(arch: ArchFacts, linear_params: float, q_dims: Sequence[int], seq_len: int,
                            with_head: bool) -> float:
    """One forward, per token: 2 FLOPs per linear weight, plus causal attention (QKᵀ and AV, average
    context seq_len/2: 2·seq_len·q_dim per layer), plus the LM head if used."""
    f = 2.0 * linear_params + sum(2.0 * seq_len * q for q in q_dims)
    if with_head:
        f += 2.0 * arch.vocab_size * arch.hidden_size
    return f


def stage_candidates(search: SearchPlanSettings) -> list[int]:
    """Candidates evaluated per stage of one generation (tyr.search.evolution: n_0 offspring or the
    prescreen's keep, then min(survivors, n); the parent is re-entered at every stage)."""
    n = search.offspring if search.prescreen_keep is None else min(search.offspring, search.prescreen_keep)
    out = []
    for tokens, survivors in search.stages:
        out.append(n + 1)
        n = min(survivors, n)
    return out


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------
def _grid(arch: ArchFacts, target: float, interval: float, n_levels: int, min_heads: int, min_channels: int) -> SupernetGrid:
    return make_grid(arch.layer_shapes(), target, interval, n_levels, min_heads, min_channels)


def _levels_summary(grid: SupernetGrid) -> dict[str, list[int]]:
    return {k: list(grid.modules[k][0].keep) for k in KINDS}


def plan(arch: ArchFacts, dtype: str, target_sparsity: float, supernet: GridSettings = GridSettings(),
         data: DataSizes = DataSizes(131072, 32768, 4096), search: SearchPlanSettings = SearchPlanSettings(),
         pruner: PrunerSettings = PrunerSettings(), throughput: Throughput = Throughput(),
         model_name: str = "", streaming: bool = False) -> dict[str, Any]:
    """The whole plan as a JSON-serialisable dict (see :func:`format_plan`). With ``streaming``
    (``runtime.streaming=true``), host memory holds one decoder layer plus the embedding, final norm
    and LM head instead of the whole model, and the search keeps no dense copies of the layers."""
    b = dtype_bytes(dtype)
    act = b  # hidden states are kept in the model dtype (embedding output and every layer output)
    L, H, I, V, T = arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.vocab_size, data.seq_len
    lp, mp = arch.layer_params(), arch.model_params()
    fp64 = throughput.fp64_tflops or throughput.tflops

    # --- supernet: one build with conf/supernet, and every coarse-to-fine iteration ----------------
    grid = _grid(arch, target_sparsity, supernet.interval, supernet.n_levels, supernet.min_heads, supernet.min_channels)
    sn = supernet_bytes(grid, arch, dtype, pruner.bias)
    tyr_layout = tyr_paper_layout_bytes(grid, arch, dtype)
    reported = TYR_REPORTED_BYTES.get((L, H, I, arch.num_heads))
    centre = grid.centre_levels()
    kept = grid.allocation_params(centre)
    kept_heads = [g.keep[g.centre] for g in grid.modules["attn"]]

    def iteration_grids(intervals, n_levels, min_heads, min_channels):
        return [_grid(arch, target_sparsity, iv, n_levels, min_heads, min_channels) for iv in intervals]

    it_grids = iteration_grids(search.intervals, search.n_levels, search.min_heads, search.min_channels)
    iterations = [{"interval": iv, "levels": _levels_summary(g), "bytes": supernet_bytes(g, arch, dtype, pruner.bias)["total"],
                   "tyr_layout_bytes": tyr_paper_layout_bytes(g, arch, dtype)["all_projections"]}
                  for iv, g in zip(search.intervals, it_grids)]
    paper_grids = iteration_grids(PAPER_INTERVALS, 9, 1, 32)
    paper_total = sum(supernet_bytes(g, arch, dtype, pruner.bias)["total"] for g in paper_grids)

    # --- token counts ------------------------------------------------------------------------------
    n_cal, n_grad = data.sequences(data.calib_tokens), data.sequences(data.grad_tokens)
    C, G = n_cal * T, n_grad * T
    stage_seqs = [data.sequences(t) for t, _ in search.stages]
    n_teacher = max(stage_seqs)
    k = min(search.topk, V)
    teacher = teacher_cache_bytes(n_teacher, T, k)
    n_search_set = data.sequences(data.search_set_tokens) if data.search_set_tokens else n_teacher
    teacher_pipeline = teacher_cache_bytes(n_search_set, T, k)  # the pipeline caches all of data.search
    # KLFitness rotates the teacher rows per generation: fresh tokens every generation need this many
    teacher_fresh = teacher_cache_bytes(n_teacher * search.generations, T, k)
    S = n_teacher * T  # tokens of the largest (last) stage
    warnings = []
    if data.search_set_tokens is not None and data.search_set_tokens < S:
        warnings.append(f"data.search holds {data.search_set_tokens} tokens but the last stage wants {S}: the "
                        f"pipeline's teacher cache covers data.search only, so larger stages are capped at "
                        f"{data.search_set_tokens} tokens (raise data.search.num_sequences)")

    # --- memory: gradient pass ---------------------------------------------------------------------
    w_layer = lp["total"] * b
    # resident weights on the host: the whole model, or (streamed) one layer + embedding / norm / head
    w_model = (w_layer + (mp["total"] - L * lp["total"]) * b) if streaming else mp["total"] * b
    largest_proj = max(lp[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    seq_autograd = T * (4 * H + 3 * arch.q_dim + 2 * arch.kv_dim + 4 * I) * act  # saved activations, one sequence
    grad_dev = {
        "layer_weights": w_layer,
        "weight_grads": lp["prunable"] * b,
        "fisher_accumulators_fp32": 2 * lp["prunable"] * 4,
        "taylor_temporaries_fp32": 4 * largest_proj * 4,
        "one_sequence_activations": seq_autograd,
        "loss_logits_fp32": 3 * T * V * 4 + T * V * b,
        "lm_head_and_norm": (V * H + H) * b,
    }
    grad_host = {"model_weights": w_model, "layer_input_checkpoints": (L + 2) * G * H * act,
                 **{k_: v for k_, v in grad_dev.items() if k_ not in ("layer_weights", "lm_head_and_norm")}}
    if not G:  # the pruner needs no gradients: no gradient pass
        grad_dev, grad_host = {}, {}

    # --- memory: build -----------------------------------------------------------------------------
    def f32_copies(params: int) -> int:
        return 0 if dtype == "float32" else params * 4  # ModuleProblem's .float() copies the weights

    width = {"attn": arch.head_dim, "mlp": 1}

    def workspace(g_, kind):
        d = g_.n_units * width[kind]
        inner = [k_ * width[kind] for k_ in g_.keep if k_ < g_.n_units] or [0]
        kk = max(inner) + (1 if pruner.bias else 0)
        # refit(): augmented H and W₀ in float64 for the whole call; on top, at its worst statement,
        # the row gather H[K] plus the kept block and its copy, or the block, its Cholesky factor,
        # the right-hand side and the solution. relative_error(): H, W₀, Δ, [Δ b] and Δ·H.
        refit_peak = (d + 1) ** 2 + H * d + max(kk * (d + 1) + 2 * kk * kk, 2 * kk * kk + 2 * kk * H)
        err_peak = (d + 1) ** 2 + 2 * H * d + 2 * H * (d + 1)
        return 8 * max(refit_peak, err_peak)

    def build_memory(g):
        variants = sum(H * k_ * width[kind] * 4 for kind in KINDS for k_ in g.modules[kind][0].keep)
        eea = 0 if supernet.eea == "none" else (H * arch.q_dim + H * I) * (4 + b)
        dev = {
            "layer_weights": w_layer,
            "batch_activations": data.batch_size * T * (2 * H + 2 * arch.q_dim + 2 * arch.kv_dim + 3 * I) * act,
            "statistics_fp32": 4 * (arch.q_dim ** 2 + arch.q_dim + I * I + I),
            "module_problems_fp32": f32_copies(3 * H * arch.q_dim) + f32_copies(4 * H * I),
            "variants_fp32": variants,
            "eea_expected_weights": eea,
            "solve_workspace_fp64": max(workspace(g.modules["attn"][0], "attn"), workspace(g.modules["mlp"][0], "mlp")),
        }
        host = {"model_weights": w_model, "calibration_activations_x3": 3 * C * H * act,
                "shard_serialisation": 2 * max(supernet_bytes(g, arch, dtype, pruner.bias)["per_layer"]),
                **{k_: v for k_, v in dev.items() if k_ != "layer_weights"}}
        return dev, host

    build_dev, build_host = build_memory(grid)

    # --- memory: search ----------------------------------------------------------------------------
    stage_act = S * H * act
    prefix_on = search.prefix_cache and L * stage_act <= search.prefix_cache_max_mb * 2**20
    pruned_weights = (kept + L * lp["norms"] + H + mp["embeddings"] + mp["lm_head"]) * b
    search_dev = {
        # streamed: the candidate's layers pass through one at a time (plus embedding / norm / head)
        "pruned_model": w_model if streaming else pruned_weights,
        "teacher_topk_cache": teacher,
        "prefix_cache": L * stage_act if prefix_on else 0,
        "stage_activations_x3": 3 * stage_act,
        "kl_chunk": KL_CHUNK * V * (3 * 4 + b),
        "batch_activations": data.batch_size * T * (2 * H + 2 * arch.q_dim + 2 * arch.kv_dim + 3 * I) * act,
    }
    search_host = {"model_weights": w_model, "assembler_dense_layers": 0 if streaming else L * w_layer,
                   "supernet_shard_cache": max(sn["per_layer"]),
                   **{k_: v for k_, v in search_dev.items() if k_ != "pruned_model"},
                   "teacher_topk_cache": teacher_pipeline}

    # --- FLOPs -------------------------------------------------------------------------------------
    dense_lin = L * lp["prunable"]
    dense_q = [arch.q_dim] * L
    fwd_dense = forward_flops_per_token(arch, dense_lin, dense_q, T, with_head=False)
    # LM head: forward + gradient w.r.t. its input (its weight needs no gradient); g and g² summed per sequence
    grad_flops = G * (GRAD_FORWARD_EQUIVALENTS * fwd_dense + 4 * V * H) + 3 * mp["prunable"] * n_grad if G else 0.0
    # the pipeline runs the dense model over all of data.search to fill its teacher cache
    teacher_flops = n_search_set * T * forward_flops_per_token(arch, dense_lin, dense_q, T, with_head=True)

    def build_flops(g):
        fwd = BUILD_LAYER_FORWARDS * C * fwd_dense
        stats = L * 2.0 * C * (arch.q_dim ** 2 + I ** 2)
        solves = solve_flops(g, arch, pruner)
        return {"layer_forwards": fwd, "statistics": stats, "solves_fp64": solves["total"], "solves_detail": solves,
                "seconds": (fwd + stats) / (throughput.tflops * 1e12) + solves["total"] / (fp64 * 1e12),
                "cpu_seconds": (fwd + stats + solves["total"]) / (throughput.cpu_tflops * 1e12)}

    pruned_q = [h * arch.head_dim for h in kept_heads]
    fwd_pruned = forward_flops_per_token(arch, kept, pruned_q, T, with_head=True)
    cands = stage_candidates(search)
    stage_tokens = [min(s, n_teacher) * T for s in stage_seqs]
    gen_flops = sum(c * t for c, t in zip(cands, stage_tokens)) * fwd_pruned
    surrogate = (search.surrogate_check + 1) * stage_tokens[0] * fwd_pruned if search.surrogate_check else 0.0
    search_iter = search.generations * gen_flops + surrogate
    builds = [build_flops(g) for g in it_grids]
    build_one = build_flops(grid)
    main_total = grad_flops + teacher_flops + sum(bf["layer_forwards"] + bf["statistics"] for bf in builds) \
        + len(it_grids) * search_iter
    fp64_total = sum(bf["solves_fp64"] for bf in builds)

    def secs(f, f64=0.0):
        return {"device": f / (throughput.tflops * 1e12) + f64 / (fp64 * 1e12),
                "cpu": (f + f64) / (throughput.cpu_tflops * 1e12)}

    return {
        "model": model_name, "arch": asdict(arch), "dtype": dtype, "target_sparsity": target_sparsity,
        "settings": {"supernet": asdict(supernet), "data": asdict(data), "search": asdict(search),
                     "pruner": asdict(pruner), "throughput": asdict(throughput)},
        "params": {"layer": lp, "model": mp, "kept_at_budget": kept,
                   "kept_heads_centre": kept_heads[0], "kept_channels_centre": grid.modules["mlp"][0].keep[grid.modules["mlp"][0].centre]},
        "supernet": {"levels": _levels_summary(grid), "bytes": sn["total"], "data_bytes": sn["data"],
                     "header_bytes": sn["header"], "per_layer_bytes": sn["per_layer"][0], "attn_data_bytes": sn["attn_data"],
                     "mlp_data_bytes": sn["mlp_data"],
                     "tyr_layout_bytes": tyr_layout["all_projections"],
                     "tyr_layout_out_proj_only_bytes": tyr_layout["output_projection_only"],
                     "ratio": tyr_layout["all_projections"] / sn["total"],
                     "tyr_reported_bytes": reported,
                     "iterations": iterations, "iterations_total_bytes": sum(i["bytes"] for i in iterations),
                     "paper_4_iterations_total_bytes": paper_total},
        "tokens": {"calibration": C, "calibration_sequences": n_cal, "gradient": G, "gradient_sequences": n_grad,
                   "seq_len": T, "stages": stage_tokens, "teacher": S, "teacher_sequences": n_teacher, "topk": k},
        "teacher_cache_bytes": teacher, "teacher_cache_pipeline_bytes": teacher_pipeline,
        "teacher_cache_fresh_bytes": teacher_fresh,
        "search_set_tokens": n_search_set * T,
        "disk": {"supernet_all_iterations": sum(i["bytes"] for i in iterations), "build_checkpoint": C * H * act,
                 "teacher_cache_file": teacher_pipeline - n_search_set * T * 4},  # ids saved as int32
        "memory": {
            "streaming": streaming,
            "gradient": {"device": sum(grad_dev.values()), "host": sum(grad_host.values()),
                         "device_parts": grad_dev, "host_parts": grad_host},
            "build": {"device": sum(build_dev.values()), "host": sum(build_host.values()),
                      "device_parts": build_dev, "host_parts": build_host},
            "search": {"device": sum(search_dev.values()), "host": sum(search_host.values()),
                       "device_parts": search_dev, "host_parts": search_host, "prefix_cache_on": prefix_on},
        },
        "flops": {
            "gradient": grad_flops, "teacher": teacher_flops, "build": build_one,
            "build_per_iteration": [{k_: v for k_, v in bf.items() if k_ != "solves_detail"} for bf in builds],
            "forward_per_token_dense": fwd_dense, "forward_per_token_pruned": fwd_pruned,
            "search_generation": gen_flops, "stage_candidates": cands, "search_iteration": search_iter,
            "total": main_total + fp64_total, "total_fp64": fp64_total,
        },
        "time_seconds": {
            "gradient": secs(grad_flops), "teacher": secs(teacher_flops),
            "build": {"device": build_one["seconds"], "cpu": build_one["cpu_seconds"]},
            "search_generation": secs(gen_flops), "search_iteration": secs(search_iter),
            "total": secs(main_total, fp64_total),
        },
        "warnings": warnings,
    }


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}" if abs(n) < 10 * s else f"{n / s:.1f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, s in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}"
    return f"{int(n)}"


def fmt_flops(f: float) -> str:
    for unit, s in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(f) >= s:
            return f"{f / s:.3g} {unit}"
    return f"{f:.3g} FLOP"


def fmt_time(s: float) -> str:
    for unit, d in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= d:
            return f"{s / d:.3g} {unit}"
    return f"{s:.3g} s"


def _parts(d: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in d.items() if v)


def format_plan(p: dict[str, Any]) -> str:
    a, pr, sn, tk, fl, tm, mem = p["arch"], p["params"], p["supernet"], p["tokens"], p["flops"], p["time_seconds"], p["memory"]
    st = p["settings"]
    lp, mp = pr["layer"], pr["model"]
    thr = st["throughput"]
    sv, se = st["supernet"], st["search"]
    out = [f"Cost plan: {p['model'] or a['model_type']} ({a['model_type']}, {a['num_layers']} layers, {p['dtype']}) "
           f"at {p['target_sparsity']:.0%} sparsity — from the config alone; GB = 1e9 bytes",
           "",
           "Parameters",
           f"  per layer: attention {fmt_count(lp['attention'])} (q {fmt_count(lp['q_proj'])}, k {fmt_count(lp['k_proj'])}, "
           f"v {fmt_count(lp['v_proj'])}, o {fmt_count(lp['o_proj'])}), MLP {fmt_count(lp['mlp'])} (gate {fmt_count(lp['gate_proj'])}, "
           f"up {fmt_count(lp['up_proj'])}, down {fmt_count(lp['down_proj'])}), norms {fmt_count(lp['norms'])}",
           f"  prunable: {fmt_count(mp['prunable'])} ({a['num_layers']} x {fmt_count(lp['prunable'])}); kept at the budget "
           f"(grid centre, nominal): {fmt_count(pr['kept_at_budget'])} ({pr['kept_heads_centre']}/{a['num_heads']} heads, "
           f"{pr['kept_channels_centre']}/{a['intermediate_size']} channels per layer)",
           f"  whole model: {fmt_count(mp['total'])} = embeddings {fmt_count(mp['embeddings'])} + LM head "
           f"{fmt_count(mp['lm_head']) if mp['lm_head'] else '0 (tied)'} + prunable {fmt_count(mp['prunable'])} + norms {fmt_count(mp['norms'])}",
           "",
           f"Supernet ({sv['n_levels']} levels, interval {sv['interval']:.4g}, min {sv['min_heads']} head / {sv['min_channels']} channels; "
           f"kept heads {sn['levels']['attn']}, kept channels {sn['levels']['mlp']})",
           f"  tyr (kept indices int32 + kept o_proj/down_proj columns, {p['dtype']}): {fmt_bytes(sn['bytes'])} "
           f"({fmt_bytes(sn['per_layer_bytes'])} per layer: attention {fmt_bytes(sn['attn_data_bytes'] / a['num_layers'])}, "
           f"MLP {fmt_bytes(sn['mlp_data_bytes'] / a['num_layers'])}; headers {fmt_bytes(sn['header_bytes'])})",
           f"  Týr's zero-padded layout, our assumption (q,k,v,o / gate,up,down at full size for every level): "
           f"{fmt_bytes(sn['tyr_layout_bytes'])} = {sn['ratio']:.2f}x tyr",
           f"    (assumption B: only o_proj / down_proj at full size for every level: {fmt_bytes(sn['tyr_layout_out_proj_only_bytes'])})"]
    if sn["tyr_reported_bytes"]:
        out.append(f"  Týr reported for this architecture: {fmt_bytes(sn['tyr_reported_bytes'])} "
                   f"= {sn['tyr_reported_bytes'] / sn['bytes']:.2f}x tyr")
    its = ", ".join(f"{i['interval']:.4g}: {fmt_bytes(i['bytes'])}" for i in sn["iterations"])
    out += [f"  coarse-to-fine (search={se['name']}, {len(sn['iterations'])} iterations, each centred here on the uniform "
            f"allocation): {its}; all kept: {fmt_bytes(sn['iterations_total_bytes'])}",
            f"  Týr's 4 iterations (12.5 -> 1.5625 %), all kept: {fmt_bytes(sn['paper_4_iterations_total_bytes'])}",
            "",
            f"Tokens: calibration {tk['calibration']} ({tk['calibration_sequences']} x {tk['seq_len']}), gradient {tk['gradient']}, "
            f"search stages {tk['stages']} (candidates {fl['stage_candidates']})",
            f"Teacher top-k cache: {tk['teacher']} tokens x (k={tk['topk']}: {tk['topk']} x (4+4) + 4 + 8 bytes) = "
            f"{fmt_bytes(p['teacher_cache_bytes'])} (the pipeline caches all of data.search, {p['search_set_tokens']} tokens: "
            f"{fmt_bytes(p['teacher_cache_pipeline_bytes'])}; fresh tokens for each of the {se['generations']} generations "
            f"(the fitness rotates the teacher rows): {fmt_bytes(p['teacher_cache_fresh_bytes'])})",
            f"Disk besides the supernet: build checkpoint {fmt_bytes(p['disk']['build_checkpoint'])}, teacher file "
            f"{fmt_bytes(p['disk']['teacher_cache_file'])}",
            "",
            "Peak memory (device = working set of one accelerator; host = "
            + ("streamed weights: one decoder layer + embedding / head in RAM)" if mem["streaming"]
               else "whole model in RAM; runtime.streaming=true keeps one layer)")]
    for phase, what in (("gradient", f"gradient pass, {tk['gradient']} tokens"), ("build", f"build, {tk['calibration']} tokens"),
                        ("search", f"search, last stage {tk['teacher']} tokens")):
        m = mem[phase]
        if phase == "gradient" and not tk["gradient"]:
            out.append("  gradient pass: none (the pruner needs no gradients)")
            continue
        extra = "" if phase != "search" else f" (prefix cache {'on' if m['prefix_cache_on'] else 'off: over prefix_cache_max_mb'})"
        out += [f"  {what}: device {fmt_bytes(m['device'])}, host {fmt_bytes(m['host'])}{extra}",
                f"    device: {_parts(m['device_parts'])}",
                f"    host:   {_parts(m['host_parts'])}"]
    b1 = fl["build"]
    dev_name = f"{thr['tflops']:g} TFLOP/s"
    fp64 = thr["fp64_tflops"] or thr["tflops"]
    out += ["",
            f"FLOPs and time (device {dev_name}, float64 solves at {fp64:g} TFLOP/s; this CPU {thr['cpu_tflops']:g} TFLOP/s)",
            f"  forward per token: dense {fmt_flops(fl['forward_per_token_dense'])} (decoder), pruned "
            f"{fmt_flops(fl['forward_per_token_pruned'])} (decoder + LM head)",
            f"  gradient pass (once): {fmt_flops(fl['gradient'])} -> {fmt_time(tm['gradient']['device'])} / CPU {fmt_time(tm['gradient']['cpu'])}",
            f"  teacher cache (once, {p['search_set_tokens']} tokens): {fmt_flops(fl['teacher'])} -> {fmt_time(tm['teacher']['device'])} / CPU {fmt_time(tm['teacher']['cpu'])}",
            f"  one build: 3 layer forwards {fmt_flops(b1['layer_forwards'])} + statistics {fmt_flops(b1['statistics'])} + "
            f"solves (fp64) {fmt_flops(b1['solves_fp64'])} -> {fmt_time(tm['build']['device'])} / CPU {fmt_time(tm['build']['cpu'])}",
            f"  one search generation: {fmt_flops(fl['search_generation'])} -> {fmt_time(tm['search_generation']['device'])} / "
            f"CPU {fmt_time(tm['search_generation']['cpu'])}",
            f"  one search iteration ({se['generations']} generations): {fmt_flops(fl['search_iteration'])} -> "
            f"{fmt_time(tm['search_iteration']['device'])} / CPU {fmt_time(tm['search_iteration']['cpu'])}",
            f"  whole run (gradient + teacher + {len(sn['iterations'])} x (build + search)): {fmt_flops(fl['total'])} "
            f"(fp64 {fmt_flops(fl['total_fp64'])}) -> {fmt_time(tm['total']['device'])} / CPU {fmt_time(tm['total']['cpu'])}"]
    for w in p["warnings"]:
        out.append(f"WARNING: {w}")
    return "\n".join(out)
