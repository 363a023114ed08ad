"""The planner's inputs: the model's ``arch:`` block and the sizes of a run (no weights, no torch).
The search settings are :class:`tyr.search.settings.SearchSettings` (Týr's settings by default)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tyr.modeling.adapter import get_adapter
from tyr.supernet.grid import LayerShape


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
    def from_dict(cls, d: Mapping[str, Any]) -> ArchFacts:
        known = {f for f in cls.__dataclass_fields__}
        missing = [
            f
            for f in (
                "model_type",
                "num_layers",
                "hidden_size",
                "intermediate_size",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "vocab_size",
            )
            if f not in d
        ]
        if missing:
            raise ValueError(f"arch block lacks {missing}")
        kw = {k: v for k, v in d.items() if k in known}
        ints = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
        return cls(
            **{
                k: (int(v) if k in ints else bool(v) if k in ("tie_word_embeddings", "attention_bias") else str(v))
                for k, v in kw.items()
            }
        )

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
        # Llama's attention_bias also gives o_proj a bias; Qwen2's only q/k/v (the family adapter says)
        return self.attention_bias and get_adapter(self.model_type).o_bias_with_attention_bias

    def norm_params_per_layer(self) -> int:
        return get_adapter(self.model_type).norm_params_per_layer(self.hidden_size, self.head_dim)

    def layer_params(self) -> dict[str, int]:
        """Parameters of one decoder layer, by projection (weights + biases)."""
        H, I, b = self.hidden_size, self.intermediate_size, self.attention_bias
        p = {
            "q_proj": H * self.q_dim + (self.q_dim if b else 0),
            "k_proj": H * self.kv_dim + (self.kv_dim if b else 0),
            "v_proj": H * self.kv_dim + (self.kv_dim if b else 0),
            "o_proj": self.q_dim * H + (H if self.o_bias else 0),
            "gate_proj": H * I,
            "up_proj": H * I,
            "down_proj": I * H,
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
        out = {
            "embeddings": V * H,
            "lm_head": 0 if self.tie_word_embeddings else V * H,
            "norms": L * lp["norms"] + H,
            "attention": L * lp["attention"],
            "mlp": L * lp["mlp"],
            "prunable": L * lp["prunable"],
        }
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
class Throughput:
    tflops: float = 100.0  # device matmul throughput in the model dtype, TFLOP/s
    fp64_tflops: float | None = None  # float64 solves (None: the same as tflops)
    cpu_tflops: float = 0.05  # this 2-core CPU, measured
