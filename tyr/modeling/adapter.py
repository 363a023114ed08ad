"""Model-family knowledge: the one module that knows decoder structure and checks ``model_type``.

Every other part of tyr asks an adapter for the layers, the prunable projections of a layer, the
attention geometry (heads, KV heads, head_dim, GQA grouping), the final norm and the LM head; the
cost planner (which runs without torch or weights) asks it for the parameter facts of a family
(norms per layer, which projections carry a bias). Adding a family means adding an adapter here
and nothing else. The module imports no torch, so the torch-free planner can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
PRUNABLE_PROJ = ATTN_PROJ + MLP_PROJ


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose family tyr has no adapter for."""


@dataclass(frozen=True)
class AttentionGeometry:
    """Attention shape of one decoder layer.

    ``kv_of_head[i]`` is the KV head read by query head ``i``. For a dense layer it is
    ``i // (num_heads // num_kv_heads)``; a pruned layer may have uneven groups.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_of_head: tuple[int, ...]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class DecoderAdapter:
    """Structure of a Llama-like decoder (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text).

    ``export_type``: the ``model_type`` of the architecture a pruned model of this family is exported
    as (:mod:`tyr.modeling.hf_pruned`). Qwen3 and Gemma-3 have per-head ``q_norm`` / ``k_norm`` over
    ``head_dim`` channels, shared by all heads: slicing heads leaves them as they are.
    """

    family: str
    model_types: tuple[str, ...]
    export_type: str
    attn_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    # parameter facts (the planner counts parameters from them, without building the model)
    hidden_norms: int = 2  # RMSNorms over hidden_size per decoder layer
    head_norms: bool = False  # q_norm / k_norm over head_dim (shared by every head)
    o_bias_with_attention_bias: bool = True  # config.attention_bias also gives o_proj a bias
    # GGUF export (llama.cpp's per-layer ``deci`` architecture, :mod:`tyr.export.gguf`): why this family
    # cannot be written as one, or None when it can (Llama-style blocks: RMSNorm, SwiGLU, RoPE, no q/k/v bias).
    gguf_refusal: str | None = None

    def norm_params_per_layer(self, hidden_size: int, head_dim: int) -> int:
        return self.hidden_norms * hidden_size + (2 * head_dim if self.head_norms else 0)

    # --- model level -------------------------------------------------------------------------
    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (``model.model`` for ``*ForCausalLM``)."""
        return model.model if hasattr(model, "lm_head") else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base_model(model).layers

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def head_dim(self, config) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    # --- layer level -------------------------------------------------------------------------
    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn_attr)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_attr)

    def projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The seven prunable projections of a layer, by their canonical names."""
        attn, mlp = self.attention(layer), self.mlp(layer)
        out = {n: getattr(attn, n) for n in ATTN_PROJ}
        out.update({n: getattr(mlp, n) for n in MLP_PROJ})
        return out

    def geometry(self, layer: nn.Module) -> AttentionGeometry:
        """Current attention geometry of a (possibly pruned) layer."""
        attn = self.attention(layer)
        hd = int(attn.head_dim)
        nh = attn.q_proj.out_features // hd
        nkv = attn.k_proj.out_features // hd
        kv_of_head = getattr(attn, "tyr_kv_of_head", None)
        if kv_of_head is None:
            g = max(1, nh // max(1, nkv))
            kv_of_head = tuple(i // g for i in range(nh))
        return AttentionGeometry(nh, nkv, hd, tuple(kv_of_head))

    def intermediate_size(self, layer: nn.Module) -> int:
        return self.mlp(layer).gate_proj.out_features

    def set_attention_groups(self, layer: nn.Module, group_size: int, kv_of_head: tuple[int, ...]) -> None:
        """Record the GQA grouping after a layer's heads were sliced (and padded to even groups)."""
        attn = self.attention(layer)
        attn.num_key_value_groups = int(group_size)
        attn.tyr_kv_of_head = tuple(int(k) for k in kv_of_head)

    def layer_output(self, out) -> torch.Tensor:
        """Decoder layers return a tensor in transformers 5; older ones a tuple."""
        return out[0] if isinstance(out, tuple) else out


_ADAPTERS: tuple[DecoderAdapter, ...] = (
    # tyr_*: exported pruned checkpoints, loaded back
    DecoderAdapter("llama", ("llama", "tyr_llama"), "tyr_llama"),
    DecoderAdapter("mistral", ("mistral", "tyr_mistral"), "tyr_mistral"),
    DecoderAdapter(
        "qwen2",
        ("qwen2", "tyr_qwen2"),
        "tyr_qwen2",
        o_bias_with_attention_bias=False,  # q/k/v bias only
        gguf_refusal="its q/k/v biases: llama.cpp's per-layer deci architecture reads them only in recent builds, "
        "and tyr does not map Qwen2 (nor its tokenizer) to deci (docs/gguf.md)",
    ),
    DecoderAdapter(
        "qwen3",
        ("qwen3", "tyr_qwen3"),
        "tyr_qwen3",
        head_norms=True,
        gguf_refusal="its per-head q/k norms have no place in llama.cpp's per-layer deci architecture",
    ),
    # input / post-attention / pre- and post-feed-forward norms
    DecoderAdapter(
        "gemma3",
        ("gemma3_text", "tyr_gemma3_text"),
        "tyr_gemma3_text",
        hidden_norms=4,
        head_norms=True,
        gguf_refusal="its blocks (q/k norms, four norms per layer, scaled embeddings, sliding-window layers) are not "
        "llama.cpp's per-layer deci blocks, and llama.cpp's gemma3 architecture has one width for every layer",
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in _ADAPTERS for t in a.model_types)


# Checkpoint model types whose causal-LM model is one of the families above.
_ALIASES = {"gemma3": "gemma3_text"}  # Gemma 3 multimodal checkpoints: the text decoder is pruned


def adapter_for_model_type(model_type: str) -> DecoderAdapter:
    model_type = _ALIASES.get(model_type, model_type)
    for a in _ADAPTERS:
        if model_type in a.model_types:
            return a
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported by tyr; supported model types: " + ", ".join(supported_model_types())
    )


def get_adapter(model_or_config) -> DecoderAdapter:
    """The adapter for a model, a config, or a model_type string."""
    if isinstance(model_or_config, str):
        return adapter_for_model_type(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_for_model_type(getattr(config, "model_type", type(config).__name__))
