"""``tyr_llama``: a Llama-family architecture with per-layer widths, for exporting pruned models.

``configuration_tyr_llama.py`` and ``modeling_tyr_llama.py`` import only ``torch`` / ``transformers``
(never ``tyr``): ``save_pretrained`` copies them into the exported folder (``auto_map``), which then
loads anywhere with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
Importing this package also registers the classes with the Auto classes for in-process use.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from tyr.modeling.hf_pruned.configuration_tyr_llama import TyrLlamaConfig
from tyr.modeling.hf_pruned.modeling_tyr_llama import (
    TyrEmptyAttention,
    TyrEmptyMLP,
    TyrLlamaForCausalLM,
    TyrLlamaModel,
)

# save_pretrained writes auto_map and copies the two .py files next to the weights.
TyrLlamaConfig.register_for_auto_class()
TyrLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(TyrLlamaConfig.model_type, TyrLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(TyrLlamaConfig, TyrLlamaForCausalLM, exist_ok=True)

__all__ = ["TyrLlamaConfig", "TyrLlamaForCausalLM", "TyrLlamaModel", "TyrEmptyAttention", "TyrEmptyMLP"]
