"""A Llama-family decoder whose layers each have their own widths (structured pruning export).

Self-contained (imports only ``torch`` and ``transformers``): this file and
``configuration_tyr_llama.py`` are copied into an exported model folder, which loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

Tensor names are the plain Llama ones (``model.layers.{i}.self_attn.q_proj.weight`` ...). Per layer:

- attention with ``layer_num_heads[i]`` query head slots and ``layer_num_kv_heads[i]`` KV heads.
  Default (padded) layout: groups are even, uneven GQA groups having been padded with zero query
  heads (zero ``q_proj`` rows and ``o_proj`` columns), so the stock even-group GQA path runs.
  Index-map layout (``layer_kv_of_head[i]`` given): no padding, K/V are expanded per query head
  with ``index_select`` (exact, but slower at decode time);
- 0 heads: :class:`TyrEmptyAttention` (adds only an optional bias, ``self_attn.bias``), and the
  layer keeps no KV cache;
- an MLP with ``layer_intermediate_size[i]`` channels, or :class:`TyrEmptyMLP` (``mlp.bias``) for 0;
- ``o_proj`` / ``down_proj`` biases where ``layer_o_bias`` / ``layer_down_bias`` say so.

KV cache: a layer without attention never writes to the cache, but transformers reads the past
length (position ids, causal mask) from cache layer 0 by default. Before each forward, the cache
entries of attention-less layers are replaced by ``DummyLayer``\\ s, which ``Cache.get_seq_length``
and the mask code skip, so they read the first layer that has attention.
"""

import inspect
from collections.abc import Callable

import torch
from torch import nn

from .configuration_tyr_llama import TyrTransformersVersionError, guard_transformers_version, transformers_version_hint

try:
    from transformers.activations import ACT2FN
    from transformers.cache_utils import Cache, DummyLayer, DynamicCache
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaDecoderLayer,
        LlamaForCausalLM,
        LlamaMLP,
        LlamaModel,
        LlamaPreTrainedModel,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )
except ImportError as _exc:
    _hint = transformers_version_hint(_exc)
    if _hint is None:
        raise
    raise TyrTransformersVersionError(_hint) from None

# The KV cache keyword: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24 (the old name is
# deprecated there). Every call below passes it by keyword under the name this release uses.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def _pop_cache(kwargs: dict) -> "Cache | None":
    """Remove the KV cache from ``kwargs`` under either name and return it."""
    new, old = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return new if new is not None else old


def prepare_cache(cache: "Cache | None", config) -> None:
    """Give attention-less layers (``config.layer_num_heads[i] == 0``) a ``DummyLayer`` cache entry, so
    the past length and the masks are read from a layer that has attention.

    Without this, a model whose layer 0 has no attention would see a past length of 0 at every
    decoding step (wrong position ids and causal mask). If no layer has attention, positions
    and masks are unused and the cache is left alone.
    """
    if not isinstance(cache, Cache):
        return
    n = config.num_hidden_layers
    empty = [i for i in range(n) if config.layer_num_heads[i] == 0]
    if not empty or len(empty) == n:
        return
    layers = cache.layers
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate is not None:  # lazily grown cache: create the entries now
        while len(layers) < n:
            layers.append(replicate())
    for i in empty:
        if i < len(layers) and not isinstance(layers[i], DummyLayer):
            layers[i] = DummyLayer()


from .configuration_tyr_llama import TyrLlamaConfig  # noqa: E402


class TyrEmptyAttention(nn.Module):
    """An attention block with every head removed: returns zeros plus an optional bias."""

    def __init__(self, config: TyrLlamaConfig, layer_idx: int, bias: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if bias else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias
        return out, None


class TyrEmptyMLP(nn.Module):
    """An MLP block with every channel removed: returns zeros plus an optional bias."""

    def __init__(self, config: TyrLlamaConfig, bias: bool = False):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        return out + self.bias if self.bias is not None else out


class TyrLlamaAttention(LlamaAttention):
    """Llama attention with this layer's own number of query / KV heads.

    With ``kv_of_head`` (index-map layout) query head ``i`` reads KV head ``kv_of_head[i]``; K/V are
    expanded with ``index_select`` after the cache update. Otherwise groups are even (stock path).
    """

    def __init__(self, config: TyrLlamaConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        num_heads = config.layer_num_heads[layer_idx]
        num_kv = config.layer_num_kv_heads[layer_idx]
        kv_map = config.layer_kv_of_head[layer_idx] if config.layer_kv_of_head is not None else None
        self.kv_of_head: tuple[int, ...] | None = tuple(int(k) for k in kv_map) if kv_map is not None else None
        self._kv_index: dict[torch.device, torch.Tensor] = {}
        self.num_heads = num_heads
        self.num_key_value_heads = num_kv
        self.num_key_value_groups = 1 if self.kv_of_head is not None else num_heads // num_kv
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        qkv_bias = bool(config.attention_qkv_bias)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden, bias=bool(config.layer_o_bias[layer_idx]))
        if config.layer_head_ids is not None and config.layer_head_ids[layer_idx] is not None:
            # Plain attributes read by tyr if the model is loaded back (-1 marks a zero padding head).
            self.tyr_head_ids = tuple(int(h) for h in config.layer_head_ids[layer_idx])
        if self.kv_of_head is not None:
            self.tyr_kv_of_head = self.kv_of_head  # uneven grouping, for tyr's geometry

    def _kv_index_on(self, device: torch.device) -> torch.Tensor:
        idx = self._kv_index.get(device)
        if idx is None:
            idx = torch.tensor(self.kv_of_head, dtype=torch.long, device=device)
            self._kv_index[device] = idx
        return idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kv_of_head is None:
            return super().forward(
                hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        cache = _pop_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        index = self._kv_index_on(key_states.device)
        key_states = key_states.index_select(1, index)
        value_states = value_states.index_select(1, index)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class TyrLlamaMLP(LlamaMLP):
    """Llama MLP with this layer's own number of channels and an optional ``down_proj`` bias."""

    def __init__(self, config: TyrLlamaConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.layer_intermediate_size[layer_idx]
        gu_bias = bool(config.mlp_gate_up_bias)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=gu_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=gu_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bool(config.layer_down_bias[layer_idx]))
        self.act_fn = ACT2FN[config.hidden_act]


class TyrLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer built with this layer's widths (forward is Llama's)."""

    def __init__(self, config: TyrLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        if config.layer_num_heads[layer_idx] > 0:
            self.self_attn = TyrLlamaAttention(config, layer_idx)
        else:
            self.self_attn = TyrEmptyAttention(config, layer_idx, bias=bool(config.layer_o_bias[layer_idx]))
        if config.layer_intermediate_size[layer_idx] > 0:
            self.mlp = TyrLlamaMLP(config, layer_idx)
        else:
            self.mlp = TyrEmptyMLP(config, bias=bool(config.layer_down_bias[layer_idx]))
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class TyrLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = TyrLlamaConfig
    config: TyrLlamaConfig
    _no_split_modules = ["TyrLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrLlamaDecoderLayer, "attentions": TyrLlamaAttention}


class TyrLlamaModel(TyrLlamaPreTrainedModel, LlamaModel):
    """The decoder stack; forward is Llama's, after fixing up the KV cache for attention-less layers."""

    def __init__(self, config: TyrLlamaConfig):
        TyrLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TyrLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def prepare_cache(self, cache: "Cache | None") -> None:
        prepare_cache(cache, self.config)

    @guard_transformers_version
    def forward(self, input_ids: torch.LongTensor | None = None, **kwargs):
        cache = _pop_cache(kwargs)
        use_cache = kwargs.pop("use_cache", None)
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = DynamicCache(config=self.config)
        self.prepare_cache(cache)
        return super().forward(input_ids=input_ids, use_cache=use_cache, **{CACHE_KWARG: cache}, **kwargs)


class TyrLlamaForCausalLM(TyrLlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM head over :class:`TyrLlamaModel` (forward and generation are Llama's)."""

    @guard_transformers_version
    def __init__(self, config: TyrLlamaConfig):
        TyrLlamaPreTrainedModel.__init__(self, config)
        self.model = TyrLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # Llama's forward, its signature kept (generation inspects it), behind the version guard.
    forward = guard_transformers_version(LlamaForCausalLM.forward)


__all__ = [
    "CACHE_KWARG",
    "prepare_cache",
    "TyrLlamaForCausalLM",
    "TyrLlamaModel",
    "TyrLlamaPreTrainedModel",
    "TyrTransformersVersionError",
]
