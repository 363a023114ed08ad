"""Exported architectures with per-layer widths: ``tyr_llama`` (Llama) and one per other family
(``tyr_mistral``, ``tyr_qwen2``, ``tyr_qwen3``, ``tyr_gemma3_text``), for exporting pruned models.

The ``configuration_*`` / ``modeling_*`` files import only ``torch`` / ``transformers`` (never
``tyr``): ``save_pretrained`` copies them into the exported folder (``auto_map``), which then loads
anywhere with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
Importing this package also registers the classes with the Auto classes for in-process use.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from tyr.modeling.hf_pruned.configuration_tyr_family import TyrGemma3TextConfig, TyrMistralConfig, TyrQwen2Config, TyrQwen3Config
from tyr.modeling.hf_pruned.configuration_tyr_llama import TyrLlamaConfig
from tyr.modeling.hf_pruned.modeling_tyr_family import (
    TyrGemma3ForCausalLM,
    TyrMistralForCausalLM,
    TyrQwen2ForCausalLM,
    TyrQwen3ForCausalLM,
)
from tyr.modeling.hf_pruned.modeling_tyr_llama import TyrEmptyAttention, TyrEmptyMLP, TyrLlamaForCausalLM, TyrLlamaModel

# model_type of the exported architecture -> (config class, causal-LM class)
ARCHITECTURES = {
    cfg.model_type: (cfg, lm)
    for cfg, lm in (
        (TyrLlamaConfig, TyrLlamaForCausalLM),
        (TyrMistralConfig, TyrMistralForCausalLM),
        (TyrQwen2Config, TyrQwen2ForCausalLM),
        (TyrQwen3Config, TyrQwen3ForCausalLM),
        (TyrGemma3TextConfig, TyrGemma3ForCausalLM),
    )
}

# save_pretrained writes auto_map and copies the .py files (and their relative imports) next to the weights.
for _cfg, _lm in ARCHITECTURES.values():
    _cfg.register_for_auto_class()
    _lm.register_for_auto_class("AutoModelForCausalLM")
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _lm, exist_ok=True)

__all__ = ["ARCHITECTURES", "TyrLlamaConfig", "TyrLlamaForCausalLM", "TyrLlamaModel", "TyrEmptyAttention", "TyrEmptyMLP"]
