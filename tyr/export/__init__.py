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

Modules: :mod:`~tyr.export.config` (per-layer widths, the exported config), :mod:`~tyr.export.surgery`
(state-dict surgery, the export model, the widths record), :mod:`~tyr.export.folder` (the atomic folder
write, :func:`export_model`), :mod:`~tyr.export.streamed` (:func:`export_streamed`, one layer at a time),
:mod:`~tyr.export.verify` and :mod:`~tyr.export.verify_child` (the check in a fresh process).

The names below are loaded on first use: ``python -m tyr.export.verify_child`` must start without
importing tyr's model code (the folder it checks has to load without tyr).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tyr.export.config import LAYOUTS, ExportError, ExportVerificationError, layer_widths, pruned_config
    from tyr.export.folder import ALLOCATION_FILE, check_out_dir, export_model
    from tyr.export.streamed import export_streamed
    from tyr.export.surgery import index_layout_from_padded, to_export_model, widths_record
    from tyr.export.verify import verify_export

__all__ = [
    "ALLOCATION_FILE",
    "LAYOUTS",
    "ExportError",
    "ExportVerificationError",
    "check_out_dir",
    "export_model",
    "export_streamed",
    "index_layout_from_padded",
    "layer_widths",
    "pruned_config",
    "to_export_model",
    "verify_export",
    "widths_record",
]

_MODULES = {  # name -> the module that defines it
    "LAYOUTS": "tyr.export.config",
    "ExportError": "tyr.export.config",
    "ExportVerificationError": "tyr.export.config",
    "layer_widths": "tyr.export.config",
    "pruned_config": "tyr.export.config",
    "index_layout_from_padded": "tyr.export.surgery",
    "to_export_model": "tyr.export.surgery",
    "widths_record": "tyr.export.surgery",
    "ALLOCATION_FILE": "tyr.export.folder",
    "check_out_dir": "tyr.export.folder",
    "export_model": "tyr.export.folder",
    "export_streamed": "tyr.export.streamed",
    "verify_export": "tyr.export.verify",
}


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value
