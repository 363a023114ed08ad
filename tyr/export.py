"""Export a pruned model as a Hugging Face folder that loads with ``AutoModelForCausalLM``.

A pruned model in memory is a stock ``LlamaForCausalLM`` (or Mistral / Qwen2 / Qwen3 / Gemma-3)
whose layers were sliced in place (:mod:`tyr.modeling.slicing`). No built-in transformers
architecture holds per-layer query heads, KV heads and MLP widths together, so the export uses a
small custom architecture per family from :mod:`tyr.modeling.hf_pruned` (the family adapter's
``export_type``: ``tyr_llama``, ``tyr_mistral``, ``tyr_qwen2``, ``tyr_qwen3``, ``tyr_gemma3_text``;
the family's tensor names, per-layer width lists in ``config.json``). Its ``.py`` files are copied
into the folder (``auto_map``) and it loads with ``trust_remote_code=True`` without tyr installed.

Layouts:

- ``"padded"`` (default): zero padding heads are stored as zeros so every layer's GQA groups are
  even and attention runs on the stock fast path (exact: a zero head meets zero ``o_proj`` columns);
- ``"index"``: padding heads are dropped and each query head reads its KV head through an index
  map (``index_select`` of K/V); fewer stored weights, slower decode. For speed comparisons
  (``tyr_llama`` only).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from tyr.modeling.adapter import get_adapter
from tyr.modeling.hf_pruned import ARCHITECTURES, TyrLlamaConfig, TyrLlamaForCausalLM
from tyr.modeling.params import layer_counts, parameter_counts

log = logging.getLogger(__name__)

LAYOUTS = ("padded", "index")
ALLOCATION_FILE = "tyr_allocation.json"

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


# ------------------------------------------------------------------------------------------------
# Reading per-layer widths from an in-memory pruned model
# ------------------------------------------------------------------------------------------------


def _check_supported(model: nn.Module, layout: str = "padded") -> str:
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
            w.update(num_heads=0, num_head_slots=0, num_kv_heads=0, head_ids=[], kv_of_head=[],
                     o_bias=_bias(attn) is not None, qkv_bias=None)
        if hasattr(mlp, "gate_proj"):
            gu = _bias(mlp, "gate_proj") is not None
            if (_bias(mlp, "up_proj") is not None) != gu:
                raise ExportError(f"layer {i}: gate/up projections disagree on having a bias")
            w.update(intermediate_size=int(mlp.gate_proj.out_features), down_bias=_bias(mlp, "down_proj") is not None,
                     gate_up_bias=gu)
        else:
            w.update(intermediate_size=0, down_bias=_bias(mlp) is not None, gate_up_bias=None)
        out.append(w)
    return out


def _common_flag(widths: list[dict[str, Any]], key: str) -> bool:
    values = {w[key] for w in widths if w[key] is not None}
    if len(values) > 1:
        raise ExportError(f"layers disagree on {key}: a tyr_llama config holds one value for all layers")
    return bool(values.pop()) if values else False


def _index_maps(widths: list[dict[str, Any]]) -> tuple[list[int], list[list[int] | None] | None, list[list[int]]]:
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
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
              "torch_dtype", "layer_kv_of_head"):
        fields.pop(k, None)
    config_class, lm_class = ARCHITECTURES[export_type]
    cfg = config_class(**{
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
    })
    cfg.dtype = next(model.parameters()).dtype
    return cfg


def pruned_config(model: nn.Module, layout: str = "padded"):
    """The tyr config describing an in-memory pruned model (per-layer widths and biases): a
    ``TyrLlamaConfig`` for Llama, the family's own tyr config for the other families.

    Global sizes (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) keep the
    dense values of the base config; the per-layer lists give the actual shapes.
    """
    export_type = _check_supported(model, layout)
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
        heads, kv_maps, head_ids = _index_maps(widths)
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


# ------------------------------------------------------------------------------------------------
# Building the export model
# ------------------------------------------------------------------------------------------------


def _cloned_state_dict(model: nn.Module, clone: bool = True) -> dict[str, torch.Tensor]:
    """``state_dict`` with every tensor cloned once (tied weights stay tied); ``clone=False`` shares them."""
    memo: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in memo:
            memo[key] = t.detach().clone() if clone else t.detach().contiguous()
        out[k] = memo[key]
    return out


def _build(config, state: dict[str, torch.Tensor], source: nn.Module, generation_config=None) -> nn.Module:
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
            module.register_buffer(attr, buffers[name].detach().clone(), persistent=attr not in module._non_persistent_buffers_set)
    if config.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    meta = [n for n, t in list(out.named_parameters()) + list(out.named_buffers()) if t.is_meta]
    if meta:
        raise ExportError(f"tensors left on the meta device: {meta}")
    if generation_config is not None:
        out.generation_config = copy.deepcopy(generation_config)
    return out.eval()


def _index_state(state: dict[str, torch.Tensor], widths: list[dict[str, Any]], hd: int) -> dict[str, torch.Tensor]:
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
    state = _cloned_state_dict(model, clone=copy_weights)
    if layout == "index":
        state = _index_state(state, layer_widths(model), config.head_dim)
    out = _build(config, state, model, getattr(model, "generation_config", None))
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
        widths.append({"layer": i, "num_head_slots": slots, "head_ids": list(cfg.layer_head_ids[i]),
                       "kv_of_head": [s // group for s in range(slots)] if group else []})
    heads, kv_maps, head_ids = _index_maps(widths)
    d = cfg.to_dict()
    for k in ("model_type", "transformers_version", "auto_map", "architectures"):
        d.pop(k, None)
    d.update(layer_num_heads=heads, layer_kv_of_head=kv_maps, layer_head_ids=head_ids)
    new_cfg = TyrLlamaConfig(**d)
    state = _index_state(_cloned_state_dict(model), widths, cfg.head_dim)
    out = _build(new_cfg, state, model, getattr(model, "generation_config", None))
    out.config._attn_implementation = cfg._attn_implementation
    return out


def _unique_numel(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def allocation_record(model: nn.Module, export: nn.Module | None = None, allocation: dict | None = None,
                      layout: str = "padded") -> dict[str, Any]:
    """The content of ``tyr_allocation.json``: the allocation, per-layer widths and parameter counts."""
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
            "stored_in_export": _unique_numel(export) if export is not None else None,
            "note": "total/prunable exclude zero padding heads; stored_* count every stored tensor once",
        },
        "layers": widths,
    }
    return record


def _write_extra(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, Path):
        shutil.copyfile(content, path)
    else:
        path.write_text(json.dumps(content, indent=2, default=str) + "\n")


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    allocation: dict | None = None,
    max_shard_size: int | str = "2GB",
    extra_files: dict[str, Any] | None = None,
    layout: str = "padded",
    overwrite: bool = False,
) -> Path:
    """Write a loadable Hugging Face folder for an in-memory pruned model and return its path.

    Contents: ``config.json`` (per-layer widths, ``auto_map``), ``configuration_tyr_llama.py`` and
    ``modeling_tyr_llama.py``, safetensors shards (an index when there is more than one shard),
    ``generation_config.json``, the tokenizer (if given), ``tyr_allocation.json`` and
    ``extra_files`` (name -> str / bytes / Path to copy / JSON-serialisable object).
    Everything is written to a temporary sibling folder that is renamed into place at the end,
    so an interrupted export leaves no half-written ``out_dir``.
    """
    out_dir = _check_out_dir(out_dir, overwrite)
    t0 = time.time()
    export = to_export_model(model, layout, copy_weights=False)  # only read by save_pretrained
    record = allocation_record(model, export, allocation, layout)

    def write(tmp: Path) -> None:
        export.save_pretrained(tmp, max_shard_size=max_shard_size)

    _write_folder(out_dir, write, tokenizer, record, extra_files)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    log.info("exported %s (%s layout, %.1f MB, %.1fs)", out_dir, layout, size / 2**20, time.time() - t0)
    return out_dir


def _check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir


def _write_folder(out_dir: Path, write, tokenizer: Any, record: dict, extra_files: dict[str, Any] | None) -> None:
    """``write(tmp)`` the config and weights into a temporary sibling folder, add the tokenizer, the
    allocation record and ``extra_files``, check the custom code is there, then rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_extra(tmp / ALLOCATION_FILE, record)
        for name, content in (extra_files or {}).items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"extra file name {name!r} must be a relative path inside the folder")
            _write_extra(tmp / name, content)
        cfg = json.loads((tmp / "config.json").read_text())
        code = {ref.split(".")[0] + ".py" for ref in cfg.get("auto_map", {}).values()}
        missing = sorted(f for f in code | {"configuration_tyr_llama.py", "modeling_tyr_llama.py"} if not (tmp / f).exists())
        if "auto_map" not in cfg or missing:
            raise ExportError(f"save_pretrained did not write auto_map / custom code (missing {missing})")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _meta_pruned_layers(model: nn.Module, assembler) -> Iterator[None]:
    """A streamed model's (meta) layers temporarily replaced by meta copies sliced to the
    assembler's allocation: the shapes of the pruned model, no weights."""
    layers = get_adapter(model).layers(model)
    originals = list(layers)
    try:
        for li, levels in enumerate(assembler.current):
            if levels is not None:
                layers[li] = assembler.layer_for(li, *levels, dense=originals[li])
        yield
    finally:
        for li, layer in enumerate(originals):
            layers[li] = layer


def export_streamed(
    model: nn.Module,
    assembler,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    allocation: dict | None = None,
    extra_files: dict[str, Any] | None = None,
    layout: str = "padded",
    overwrite: bool = False,
) -> Path:
    """:func:`export_model` for a streamed model (:mod:`tyr.streaming`): the pruned model of
    ``assembler``'s current allocation is written one decoder layer at a time (one safetensors shard
    per layer plus one for the embedding / norm / head, with an index), so memory holds one layer.
    The folder has the same config, tensor names and values as :func:`export_model` writes."""
    from safetensors.torch import save_file
    from transformers.dynamic_module_utils import custom_object_save

    from tyr import streaming

    out_dir = _check_out_dir(out_dir, overwrite)
    t0 = time.time()
    _check_supported(model, layout)
    with _meta_pruned_layers(model, assembler):
        config = pruned_config(model, layout)
        widths = layer_widths(model)
        with torch.device("meta"):
            meta_export = ARCHITECTURES[config.model_type][1](config)
        record = allocation_record(model, meta_export, allocation, layout)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = streaming.execution(model).layer_names
    prefixes = tuple(n + "." for n in names)
    skip = set(getattr(meta_export, "_tied_weights_keys", None) or ()) if tied else set()
    resident = {k: t.detach().cpu().contiguous() for k, t in model.state_dict().items()
                if not k.startswith(prefixes) and not t.is_meta and not (tied and k == "lm_head.weight")}
    resident = {k: v for k, v in resident.items() if k not in skip}
    n_files = len(names) + 1

    def write(tmp: Path) -> None:
        weight_map, total = {}, 0

        def shard(i: int, tensors: dict[str, torch.Tensor]) -> None:
            nonlocal total
            name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        shard(0, resident)
        for li, prefix in enumerate(prefixes):
            with assembler.layer(li) as layer:
                sd = {prefix + k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
            if layout == "index":
                sd = _index_state(sd, [widths[li]], config.head_dim)
            shard(li + 1, sd)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        custom_object_save(meta_export, tmp, config=config)  # modeling file + auto_map, as save_pretrained does
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)

    _write_folder(out_dir, write, tokenizer, record, extra_files)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    log.info("exported %s layer by layer (%s layout, %.1f MB, %.1fs)", out_dir, layout, size / 2**20, time.time() - t0)
    return out_dir


# ------------------------------------------------------------------------------------------------
# Verification in a fresh process
# ------------------------------------------------------------------------------------------------

_VERIFY_SCRIPT = textwrap.dedent(
    """
    import inspect, json, sys, time
    sys.modules["tyr"] = None  # an exported folder must load without tyr
    import torch
    from transformers import AutoModelForCausalLM

    args = json.load(open(sys.argv[1]))
    torch.set_num_threads(args["threads"])
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args["path"], trust_remote_code=True, dtype=getattr(torch, args["dtype"]))
    model.eval()
    load_s = time.time() - t0
    ids = torch.load(args["input_ids"])
    n_new, split = args["max_new_tokens"], args["split"]
    gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
               pad_token_id=args["pad_token_id"], attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
        # Prefill then one token at a time through the KV cache, no position ids given.
        # The cache keyword is `past_key_values` up to transformers 5.23 and `cache` from 5.24.
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(ids[:, :split], use_cache=True)
        pkv, steps = out[kw], [out.logits.float()]
        for t in range(split, ids.shape[1]):
            o = model(ids[:, t : t + 1], use_cache=True, **{kw: pkv})
            steps.append(o.logits.float())
        stepwise = torch.cat(steps, dim=1)
        with_cache = model.generate(ids, use_cache=True, **gen)
        without_cache = model.generate(ids, use_cache=False, **gen)
    c = model.config
    torch.save({
        "logits": logits, "stepwise": stepwise, "with_cache": with_cache, "without_cache": without_cache,
        "load_seconds": load_s, "model_class": type(model).__name__, "config_class": type(c).__name__,
        "module": type(model).__module__,
        "widths": {k: getattr(c, k, None) for k in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size")},
        "tyr_imported": any(m == "tyr" or m.startswith("tyr.") for m in sys.modules if sys.modules[m] is not None),
    }, args["out"])
    """
)


def verify_export(
    out_dir: str | os.PathLike,
    reference_model: nn.Module,
    input_ids: torch.Tensor,
    atol: float = 1e-4,
    max_new_tokens: int = 8,
    cache_atol: float | None = None,
    strict_generation: bool | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """Load ``out_dir`` in a fresh process (offline, ``trust_remote_code=True``) and check it.

    Checks: max |Δ logits| against ``reference_model`` on ``input_ids`` <= ``atol``; logits computed
    token by token through the KV cache match the full forward (<= ``cache_atol``, default
    ``max(10 * atol, 1e-3 * max|logits|)`` in float32, where Gemma-3's large hidden states make rounding
    visible, ``0.05 * max|logits|`` in 16-bit dtypes, where rounding alone reaches a few percent); greedy ``generate`` with ``use_cache=True`` equals ``use_cache=False``
    for ``max_new_tokens`` tokens; the per-layer widths in the config match the reference.
    Returns the numbers; raises :class:`ExportVerificationError` listing what failed. A generation
    mismatch only warns when ``strict_generation`` is False (default: strict in float32 only, since
    16-bit rounding can flip a near-tie between cached and uncached greedy decoding).
    """
    out_dir = Path(out_dir).resolve()
    input_ids = input_ids.detach().cpu().long()
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] < 2:
        raise ValueError("input_ids needs at least 2 tokens")
    dtype = next(reference_model.parameters()).dtype
    cfg = reference_model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0)
    with torch.no_grad():
        ref_logits = reference_model(input_ids, use_cache=False).logits.float()
        ref_gen = reference_model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=False, pad_token_id=pad,
        )
    layout = "padded"
    if (out_dir / ALLOCATION_FILE).exists():
        layout = json.loads((out_dir / ALLOCATION_FILE).read_text()).get("layout", "padded")
    expected = pruned_config(reference_model, layout)
    if cache_atol is None:  # cached vs full forward differ by rounding, relative to the logits' scale
        scale = float(ref_logits.abs().max())
        # float32: 1e-3 of the logits' scale. Gemma-3's hidden states reach 1e5 while its logits stay below
        # ~50, so summation order alone moved a pruned Gemma-3-270M's logits by 6.6e-3 (max 37; in float64
        # the two paths agree to 1e-14); a wrong position or mask moves them by a good fraction of the scale.
        cache_atol = max(10 * atol, 1e-3 * scale) if dtype == torch.float32 else 0.05 * scale
    with tempfile.TemporaryDirectory(prefix="tyr-verify-") as tmp:
        tmp = Path(tmp)
        torch.save(input_ids, tmp / "ids.pt")
        args = {
            "path": str(out_dir), "dtype": str(dtype).removeprefix("torch."), "input_ids": str(tmp / "ids.pt"),
            "out": str(tmp / "result.pt"), "max_new_tokens": max_new_tokens, "split": max(1, input_ids.shape[1] // 2),
            "threads": torch.get_num_threads(), "pad_token_id": pad,
        }
        (tmp / "args.json").write_text(json.dumps(args))
        (tmp / "verify.py").write_text(_VERIFY_SCRIPT)
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_MODULES_CACHE=str(tmp / "modules"), OMP_NUM_THREADS=str(torch.get_num_threads()))
        env.pop("PYTHONPATH", None)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(tmp / "verify.py"), str(tmp / "args.json")], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ExportVerificationError(
                f"loading {out_dir} in a fresh process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        res = torch.load(tmp / "result.pt")
    report = {
        "max_abs_logit_diff": float((res["logits"] - ref_logits).abs().max()),
        "max_abs_cache_logit_diff": float((res["stepwise"] - res["logits"]).abs().max()),
        "generate_cache_equals_no_cache": bool(torch.equal(res["with_cache"], res["without_cache"])),
        "matches_reference_generation": bool(torch.equal(res["without_cache"], ref_gen)),
        "generated_tokens": int(res["with_cache"].shape[1] - input_ids.shape[1]),
        "config_widths_match": res["widths"] == {
            "layer_num_heads": expected.layer_num_heads,
            "layer_num_kv_heads": expected.layer_num_kv_heads,
            "layer_intermediate_size": expected.layer_intermediate_size,
        },
        "cache_atol": float(cache_atol),
        "tyr_imported": bool(res["tyr_imported"]),
        "model_class": res["model_class"],
        "config_class": res["config_class"],
        "load_seconds": float(res["load_seconds"]),
        "subprocess_seconds": time.time() - t0,
    }
    problems = []
    if not report["max_abs_logit_diff"] <= atol:
        problems.append(f"max |Δ logits| vs the in-memory model is {report['max_abs_logit_diff']:.3g} > atol {atol:g}")
    if not report["max_abs_cache_logit_diff"] <= report["cache_atol"]:
        problems.append(
            f"logits through the KV cache differ from the full forward by {report['max_abs_cache_logit_diff']:.3g} "
            f"> {cache_atol:g}"
        )
    if strict_generation is None:
        strict_generation = dtype == torch.float32
    if not report["generate_cache_equals_no_cache"]:
        msg = "greedy generate with use_cache=True differs from use_cache=False"
        if strict_generation:
            problems.append(msg)
        else:
            log.warning("%s (%s; not treated as a failure in %s)", msg, out_dir, dtype)
    if not report["config_widths_match"]:
        problems.append(f"per-layer widths in the exported config {res['widths']} do not match the model")
    if report["tyr_imported"]:
        problems.append("the exported folder imported tyr")
    if problems:
        raise ExportVerificationError(f"export {out_dir} failed verification: " + "; ".join(problems) + f" ({report})")
    log.info("verified %s: max|Δ logits| %.2e, cache %.2e, generation ok", out_dir,
             report["max_abs_logit_diff"], report["max_abs_cache_logit_diff"])
    return report
