"""Streamed export: a streamed model's (:mod:`tyr.streaming`) pruned form written one decoder layer
at a time, one safetensors shard per layer, so memory holds one layer."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyr.export.config import check_supported, layer_widths, pruned_config
from tyr.export.folder import check_out_dir, with_source, write_folder
from tyr.export.surgery import index_state, widths_record
from tyr.modeling.adapter import get_adapter
from tyr.modeling.hf_pruned import ARCHITECTURES

log = logging.getLogger(__name__)


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

    out_dir = check_out_dir(out_dir, overwrite)
    t0 = time.time()
    check_supported(model, layout)
    with _meta_pruned_layers(model, assembler):
        config = pruned_config(model, layout)
        widths = layer_widths(model)
        with torch.device("meta"):
            meta_export = ARCHITECTURES[config.model_type][1](config)
        record = widths_record(model, meta_export, allocation, layout)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = streaming.execution(model).layer_names
    prefixes = tuple(n + "." for n in names)
    skip = set(getattr(meta_export, "_tied_weights_keys", None) or ()) if tied else set()
    resident = {
        k: t.detach().cpu().contiguous()
        for k, t in model.state_dict().items()
        if not k.startswith(prefixes) and not t.is_meta and not (tied and k == "lm_head.weight")
    }
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
                sd = index_state(sd, [widths[li]], config.head_dim)
            shard(li + 1, sd)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
        )
        custom_object_save(meta_export, tmp, config=config)  # modeling file + auto_map, as save_pretrained does
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)

    write_folder(out_dir, write, tokenizer, record, with_source(model, extra_files))
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    log.info("exported %s layer by layer (%s layout, %.1f MB, %.1fs)", out_dir, layout, size / 2**20, time.time() - t0)
    return out_dir
