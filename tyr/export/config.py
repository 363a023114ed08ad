"""The exported config of an in-memory pruned model: per-layer widths read from the sliced layers,
then the family's tyr config (``TyrLlamaConfig`` for Llama, the family's own for the others)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tyr.modeling.adapter import get_adapter
from tyr.modeling.hf_pruned import ARCHITECTURES, TyrLlamaConfig

LAYOUTS = ("padded", "index")

# Fields copied from the base config (shared by Llama, Mistral and Qwen2 configs).
_BASE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_dropout",
)


class ExportError(ValueError):
    """The model cannot be exported (unsupported family or feature, inconsistent layout)."""


class ExportVerificationError(RuntimeError):
    """An exported folder does not reproduce the in-memory model."""


def check_supported(model: nn.Module, layout: str = "padded") -> str:
    """The exported architecture's model_type for ``model`` (its family adapter says which)."""
    export_type = get_adapter(model).export_type
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "padded" and export_type != TyrLlamaConfig.model_type:
        raise ExportError(f"the {layout!r} layout exists for Llama models only; this model exports as {export_type}")
    return export_type


def _bias(module: nn.Module, attr: str | None = None) -> torch.Tensor | None:
    """Bias of ``module.attr`` (a Linear) or of ``module`` itself (an empty block)."""
    target = getattr(module, attr) if attr else module
    return getattr(target, "bias", None)


def layer_widths(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer geometry of an in-memory (possibly pruned) model, in the padded layout.

    Each entry: ``num_heads`` (real query heads), ``num_head_slots`` (with zero padding heads),
    ``num_kv_heads``, ``head_ids`` (original head per slot, -1 = padding), ``kv_of_head`` (KV head
    per slot), ``intermediate_size``, ``o_bias``, ``down_bias``, ``qkv_bias``, ``gate_up_bias``
    (None for an empty block).
    """
    adapter = get_adapter(model)
    hd_cfg = adapter.head_dim(model.config)
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        w: dict[str, Any] = {"layer": i}
        if hasattr(attn, "q_proj"):
            geo = adapter.geometry(layer)
            if geo.head_dim != hd_cfg:
                raise ExportError(f"layer {i}: head_dim {geo.head_dim} differs from the config's {hd_cfg}")
            if geo.num_kv_heads == 0 or geo.num_heads % geo.num_kv_heads:
                raise ExportError(f"layer {i}: {geo.num_heads} head slots over {geo.num_kv_heads} KV heads is not even")
            group = geo.num_heads // geo.num_kv_heads
            if int(getattr(attn, "num_key_value_groups", group)) != group:
                raise ExportError(f"layer {i}: num_key_value_groups={attn.num_key_value_groups}, expected {group}")
            if tuple(geo.kv_of_head) != tuple(s // group for s in range(geo.num_heads)):
                raise ExportError(f"layer {i}: query heads are not sorted by KV head ({geo.kv_of_head})")
            head_ids = [int(h) for h in getattr(attn, "tyr_head_ids", range(geo.num_heads))]
            w.update(
                num_heads=sum(h >= 0 for h in head_ids),
                num_head_slots=geo.num_heads,
                num_kv_heads=geo.num_kv_heads,
                head_ids=head_ids,
                kv_of_head=list(geo.kv_of_head),
                o_bias=_bias(attn, "o_proj") is not None,
                qkv_bias=_bias(attn, "q_proj") is not None,
            )
            if (_bias(attn, "k_proj") is not None) != w["qkv_bias"] or (_bias(attn, "v_proj") is not None) != w["qkv_bias"]:
                raise ExportError(f"layer {i}: q/k/v projections disagree on having a bias")
        else:
            w.update(
                num_heads=0,
                num_head_slots=0,
                num_kv_heads=0,
                head_ids=[],
                kv_of_head=[],
                o_bias=_bias(attn) is not None,
                qkv_bias=None,
            )
        if hasattr(mlp, "gate_proj"):
            gu = _bias(mlp, "gate_proj") is not None
            if (_bias(mlp, "up_proj") is not None) != gu:
                raise ExportError(f"layer {i}: gate/up projections disagree on having a bias")
            w.update(
                intermediate_size=int(mlp.gate_proj.out_features), down_bias=_bias(mlp, "down_proj") is not None, gate_up_bias=gu
            )
        else:
            w.update(intermediate_size=0, down_bias=_bias(mlp) is not None, gate_up_bias=None)
        out.append(w)
    return out


def _common_flag(widths: list[dict[str, Any]], key: str) -> bool:
    values = {w[key] for w in widths if w[key] is not None}
    if len(values) > 1:
        raise ExportError(f"layers disagree on {key}: a tyr_llama config holds one value for all layers")
    return bool(values.pop()) if values else False


def index_maps(widths: list[dict[str, Any]]) -> tuple[list[int], list[list[int] | None] | None, list[list[int]]]:
    """Index-map layout of padded layers: (heads per layer, KV head per real head or None, head ids).

    Only layers that hold padding get a map; the others keep their even groups (stock path).
    """
    heads, kv_maps, head_ids = [], [], []
    for w in widths:
        real = [s for s, h in enumerate(w["head_ids"]) if h >= 0]
        padded = len(real) != w["num_head_slots"]
        heads.append(len(real))
        kv_maps.append([w["kv_of_head"][s] for s in real] if padded else None)
        head_ids.append([w["head_ids"][s] for s in real])
    return heads, (kv_maps if any(m is not None for m in kv_maps) else None), head_ids


def _family_config(model: nn.Module, export_type: str, widths: list[dict[str, Any]]):
    """A non-Llama family's tyr config: every field of the family's own config plus per-layer lists."""
    base = model.config
    fields = base.to_dict()
    for k in (
        "model_type",
        "architectures",
        "auto_map",
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
        "layer_kv_of_head",
    ):
        fields.pop(k, None)
    config_class, lm_class = ARCHITECTURES[export_type]
    cfg = config_class(
        **{
            **fields,
            "layer_num_heads": [w["num_head_slots"] for w in widths],
            "layer_num_kv_heads": [w["num_kv_heads"] for w in widths],
            "layer_intermediate_size": [w["intermediate_size"] for w in widths],
            "layer_o_bias": [w["o_bias"] for w in widths],
            "layer_down_bias": [w["down_bias"] for w in widths],
            "layer_head_ids": [w["head_ids"] for w in widths],
            "pruned_from_model_type": fields.get("pruned_from_model_type") or str(base.model_type),
            "tyr_transformers_tested": None,
            "tyr_exported_with_transformers": None,
            "architectures": [lm_class.__name__],
        }
    )
    cfg.dtype = next(model.parameters()).dtype
    return cfg


def pruned_config(model: nn.Module, layout: str = "padded"):
    """The tyr config describing an in-memory pruned model (per-layer widths and biases): a
    ``TyrLlamaConfig`` for Llama, the family's own tyr config for the other families.

    Global sizes (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) keep the
    dense values of the base config; the per-layer lists give the actual shapes.
    """
    export_type = check_supported(model, layout)
    widths = layer_widths(model)
    if export_type != TyrLlamaConfig.model_type:
        return _family_config(model, export_type, widths)
    adapter = get_adapter(model)
    base = model.config
    kwargs: dict[str, Any] = {k: getattr(base, k) for k in _BASE_FIELDS if hasattr(base, k)}
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    rope = getattr(base, "rope_parameters", None)
    if rope is not None:
        kwargs["rope_parameters"] = copy.deepcopy(dict(rope))
    dtype = next(model.parameters()).dtype
    if layout == "padded":
        heads = [w["num_head_slots"] for w in widths]
        kv_maps = None
        head_ids = [w["head_ids"] for w in widths]
    else:
        heads, kv_maps, head_ids = index_maps(widths)
    cfg = TyrLlamaConfig(
        **kwargs,
        head_dim=adapter.head_dim(base),
        layer_num_heads=heads,
        layer_num_kv_heads=[w["num_kv_heads"] for w in widths],
        layer_intermediate_size=[w["intermediate_size"] for w in widths],
        layer_o_bias=[w["o_bias"] for w in widths],
        layer_down_bias=[w["down_bias"] for w in widths],
        layer_kv_of_head=kv_maps,
        layer_head_ids=head_ids,
        attention_qkv_bias=_common_flag(widths, "qkv_bias"),
        mlp_gate_up_bias=_common_flag(widths, "gate_up_bias"),
        pruned_from_model_type=str(base.model_type),
        attention_bias=False,
        mlp_bias=False,
        architectures=["TyrLlamaForCausalLM"],
    )
    cfg.dtype = dtype
    return cfg
