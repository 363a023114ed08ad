"""State-dict surgery: the in-memory pruned model's tensors adopted by the exported architecture
(padded or index-map layout), and the record of its per-layer widths and parameter counts."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tyr.export.config import ExportError, index_maps, layer_widths, pruned_config
from tyr.modeling.adapter import get_adapter
from tyr.modeling.hf_pruned import ARCHITECTURES, TyrLlamaConfig, TyrLlamaForCausalLM
from tyr.modeling.params import layer_counts, parameter_counts


def cloned_state_dict(model: nn.Module, clone: bool = True) -> dict[str, torch.Tensor]:
    """``state_dict`` with every tensor cloned once (tied weights stay tied); ``clone=False`` shares them."""
    memo: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in memo:
            memo[key] = t.detach().clone() if clone else t.detach().contiguous()
        out[k] = memo[key]
    return out


def build_export(config, state: dict[str, torch.Tensor], source: nn.Module, generation_config=None) -> nn.Module:
    """Construct on the meta device (no random init), adopt ``state``'s tensors and take the
    non-persistent buffers (rotary frequencies, Gemma's embedding scale) from ``source``."""
    with torch.device("meta"):
        out = ARCHITECTURES[config.model_type][1](config)
    missing, unexpected = out.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(f"state dict does not match the {config.model_type} layout: missing={missing} unexpected={unexpected}")
    buffers = dict(source.named_buffers())
    for name, buf in list(out.named_buffers()):
        if buf.is_meta and name in buffers:  # non-persistent buffers were left on meta
            owner, _, attr = name.rpartition(".")
            module = out.get_submodule(owner)
            persistent = attr not in module._non_persistent_buffers_set
            module.register_buffer(attr, buffers[name].detach().clone(), persistent=persistent)
    if config.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    meta = [n for n, t in list(out.named_parameters()) + list(out.named_buffers()) if t.is_meta]
    if meta:
        raise ExportError(f"tensors left on the meta device: {meta}")
    if generation_config is not None:
        out.generation_config = copy.deepcopy(generation_config)
    return out.eval()


def index_state(state: dict[str, torch.Tensor], widths: list[dict[str, Any]], hd: int) -> dict[str, torch.Tensor]:
    """Drop padding head slots from q_proj rows / o_proj columns (index-map layout)."""
    state = dict(state)
    for w in widths:
        real = [s for s, h in enumerate(w["head_ids"]) if h >= 0]
        if w["num_head_slots"] == 0 or len(real) == w["num_head_slots"]:
            continue
        rows = torch.cat([torch.arange(s * hd, (s + 1) * hd) for s in real])
        p = f"model.layers.{w['layer']}.self_attn."
        state[p + "q_proj.weight"] = state[p + "q_proj.weight"][rows].clone()
        if p + "q_proj.bias" in state:
            state[p + "q_proj.bias"] = state[p + "q_proj.bias"][rows].clone()
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, rows].contiguous()
    return state


def to_export_model(model: nn.Module, layout: str = "padded", copy_weights: bool = True) -> nn.Module:
    """The exported architecture (``TyrLlamaForCausalLM``, ``TyrQwen3ForCausalLM``, ...) holding a copy
    of the in-memory pruned model's weights.

    ``layout="padded"`` (default, fast) keeps zero padding heads as stored zeros; ``"index"`` drops
    them and uses per-layer KV index maps where groups are uneven. ``copy_weights=False`` shares
    the tensors with ``model`` instead (no extra memory; used by :func:`export_model`).
    """
    config = pruned_config(model, layout)
    state = cloned_state_dict(model, clone=copy_weights)
    if layout == "index":
        state = index_state(state, layer_widths(model), config.head_dim)
    out = build_export(config, state, model, getattr(model, "generation_config", None))
    out.config._attn_implementation = model.config._attn_implementation
    return out


def index_layout_from_padded(model: nn.Module) -> TyrLlamaForCausalLM:
    """Convert a padded ``tyr_llama`` model (e.g. loaded from an export) to the index-map layout.

    Needs ``config.layer_head_ids`` (written by :func:`export_model`) to find the padding heads.
    """
    cfg = model.config
    if getattr(cfg, "model_type", None) != TyrLlamaConfig.model_type or cfg.layer_head_ids is None:
        raise ExportError("expected a tyr_llama model whose config has layer_head_ids")
    if cfg.layer_kv_of_head is not None and any(m is not None for m in cfg.layer_kv_of_head):
        raise ExportError("model is already in the index-map layout")
    widths = []
    for i in range(cfg.num_hidden_layers):
        slots, nkv = cfg.layer_num_heads[i], cfg.layer_num_kv_heads[i]
        group = slots // nkv if nkv else 0
        widths.append(
            {
                "layer": i,
                "num_head_slots": slots,
                "head_ids": list(cfg.layer_head_ids[i]),
                "kv_of_head": [s // group for s in range(slots)] if group else [],
            }
        )
    heads, kv_maps, head_ids = index_maps(widths)
    d = cfg.to_dict()
    for k in ("model_type", "transformers_version", "auto_map", "architectures"):
        d.pop(k, None)
    d.update(layer_num_heads=heads, layer_kv_of_head=kv_maps, layer_head_ids=head_ids)
    new_cfg = TyrLlamaConfig(**d)
    state = index_state(cloned_state_dict(model), widths, cfg.head_dim)
    out = build_export(new_cfg, state, model, getattr(model, "generation_config", None))
    out.config._attn_implementation = cfg._attn_implementation
    return out


def unique_numel(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def widths_record(
    model: nn.Module, export: nn.Module | None = None, allocation: dict | None = None, layout: str = "padded"
) -> dict[str, Any]:
    """The content of an exported folder's ``tyr_allocation.json``: the allocation it was made from
    (as given), the per-layer widths and the parameter counts. Not the pipeline's ``allocation.json``
    (levels and budget of a searched allocation: :func:`tyr.stages.evaluate.allocation_summary`)."""
    adapter = get_adapter(model)
    widths = layer_widths(model)
    for w, layer in zip(widths, adapter.layers(model)):
        c = layer_counts(adapter, layer)
        w["attention_params"] = c["attention"]
        w["mlp_params"] = c["mlp"]
        w["stored_attention_params"] = c["stored_attention"]
        del w["kv_of_head"]
    counts = parameter_counts(model)
    record: dict[str, Any] = {
        "format": "tyr_allocation/1",
        "layout": layout,
        "base_model_type": str(model.config.model_type),
        "allocation": allocation,
        "parameters": {
            "total": counts["total"],
            "prunable": counts["prunable"],
            "attention": counts["attention"],
            "mlp": counts["mlp"],
            "stored_in_memory": counts["stored"],
            "stored_in_export": unique_numel(export) if export is not None else None,
            "note": "total/prunable exclude zero padding heads; stored_* count every stored tensor once",
        },
        "layers": widths,
    }
    return record
