"""Mistral, Qwen2, Qwen3 and Gemma-3 (text) decoders whose layers each have their own widths.

One exported architecture per family, built from that family's own transformers classes: the
model is the family's ``*ForCausalLM``, constructed at the dense widths (on the meta device when
loaded with ``from_pretrained``), whose decoder layers then get this checkpoint's widths
(:func:`resize_layers`). Everything else — norms (Qwen3 / Gemma-3 q_norm and k_norm act per head on
``head_dim`` channels, so they are shared by whichever heads a layer keeps), sliding-window and full
layers, Gemma's scaled embeddings, pre/post feed-forward norms and soft-capping — is the family's
code, unchanged. Tensor names are the family's own.

Per layer (lists in ``config.json``): ``layer_num_heads[i]`` query head slots (zero padding heads
included), ``layer_num_kv_heads[i]`` KV heads, ``layer_intermediate_size[i]`` MLP channels; 0 heads or
channels give an empty block (``TyrEmptyAttention`` / ``TyrEmptyMLP``) holding only an optional bias;
``layer_o_bias`` / ``layer_down_bias`` say where bias compensation added one. Attention-less layers get
a ``DummyLayer`` KV-cache entry before each forward, as in ``modeling_tyr_llama``.

Self-contained: imports only ``torch``, ``transformers`` and the sibling tyr_llama files (copied along
by ``save_pretrained``). Every call into transformers passes arguments by keyword; the KV cache goes
under the name the installed release uses (``past_key_values`` up to 5.23, ``cache`` from 5.24).
"""

import functools
import inspect

from torch import nn

from .configuration_tyr_family import TyrGemma3TextConfig, TyrMistralConfig, TyrQwen2Config, TyrQwen3Config
from .configuration_tyr_llama import TyrTransformersVersionError, guard_transformers_version, transformers_version_hint
from .modeling_tyr_llama import TyrEmptyAttention, TyrEmptyMLP, _pop_cache, prepare_cache

try:
    from transformers.cache_utils import DynamicCache
    from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM
    from transformers.models.mistral.modeling_mistral import MistralForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM
except ImportError as _exc:
    _hint = transformers_version_hint(_exc)
    if _hint is None:
        raise
    raise TyrTransformersVersionError(_hint) from None


def resize_layers(model: nn.Module, config) -> None:
    """Give the decoder layers of ``model`` (a family's base model built at the dense widths) the
    per-layer widths of ``config``. q/k/v keep the family's bias setting; o_proj / down_proj get a bias
    where ``layer_o_bias`` / ``layer_down_bias`` say so."""
    hidden = config.hidden_size
    for i, layer in enumerate(model.layers):
        nh, nkv, ni = config.layer_num_heads[i], config.layer_num_kv_heads[i], config.layer_intermediate_size[i]
        if nh == 0:
            layer.self_attn = TyrEmptyAttention(config, i, bias=bool(config.layer_o_bias[i]))
        else:
            attn = layer.self_attn
            hd, qkv_bias = int(attn.head_dim), attn.q_proj.bias is not None
            attn.q_proj = nn.Linear(hidden, nh * hd, bias=qkv_bias)
            attn.k_proj = nn.Linear(hidden, nkv * hd, bias=qkv_bias)
            attn.v_proj = nn.Linear(hidden, nkv * hd, bias=qkv_bias)
            attn.o_proj = nn.Linear(nh * hd, hidden, bias=bool(config.layer_o_bias[i]))
            attn.num_key_value_groups = nh // nkv
            if config.layer_head_ids is not None and config.layer_head_ids[i] is not None:
                attn.tyr_head_ids = tuple(int(h) for h in config.layer_head_ids[i])  # read by tyr (-1: padding)
        if ni == 0:
            layer.mlp = TyrEmptyMLP(config, bias=bool(config.layer_down_bias[i]))
        else:
            mlp = layer.mlp
            gate_up_bias = mlp.gate_proj.bias is not None
            mlp.gate_proj = nn.Linear(hidden, ni, bias=gate_up_bias)
            mlp.up_proj = nn.Linear(hidden, ni, bias=gate_up_bias)
            mlp.down_proj = nn.Linear(ni, hidden, bias=bool(config.layer_down_bias[i]))
            mlp.intermediate_size = ni


def _forward_of(family_cls):
    """The family's ``forward`` (its signature kept: generation inspects it), behind the version guard,
    after the KV cache was given ``DummyLayer`` entries for attention-less layers."""
    base = family_cls.forward
    cache_kwarg = "cache" if "cache" in inspect.signature(base).parameters else "past_key_values"

    @functools.wraps(base)
    def forward(self, *args, **kwargs):
        cache = _pop_cache(kwargs)
        heads = self.config.layer_num_heads
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and 0 in heads and any(heads):
            cache = DynamicCache(config=self.config)
        prepare_cache(cache, self.config)
        if cache is not None:
            kwargs[cache_kwarg] = cache
        return base(self, *args, **kwargs)

    return guard_transformers_version(forward)


class _PerLayerWidths:
    """Built as the family's ``*ForCausalLM`` at the dense widths, then given the per-layer widths."""

    @guard_transformers_version
    def __init__(self, config):
        super().__init__(config)
        resize_layers(self.model, config)


class TyrMistralForCausalLM(_PerLayerWidths, MistralForCausalLM):
    config_class = TyrMistralConfig
    forward = _forward_of(MistralForCausalLM)


class TyrQwen2ForCausalLM(_PerLayerWidths, Qwen2ForCausalLM):
    config_class = TyrQwen2Config
    forward = _forward_of(Qwen2ForCausalLM)


class TyrQwen3ForCausalLM(_PerLayerWidths, Qwen3ForCausalLM):
    config_class = TyrQwen3Config
    forward = _forward_of(Qwen3ForCausalLM)


class TyrGemma3ForCausalLM(_PerLayerWidths, Gemma3ForCausalLM):
    config_class = TyrGemma3TextConfig
    forward = _forward_of(Gemma3ForCausalLM)


__all__ = ["TyrGemma3ForCausalLM", "TyrMistralForCausalLM", "TyrQwen2ForCausalLM", "TyrQwen3ForCausalLM", "resize_layers"]
