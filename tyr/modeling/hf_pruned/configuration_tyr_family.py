"""Configurations of structurally pruned Mistral, Qwen2, Qwen3 and Gemma-3 (text) decoders.

One exported architecture per family: each config is the family's own transformers config (every
field it has: sliding windows, layer types, q/k norms, Gemma's scalars and rope settings) plus the
per-layer lists of ``configuration_tyr_llama`` (``layer_num_heads``, ``layer_num_kv_heads``,
``layer_intermediate_size``, ``layer_o_bias``, ``layer_down_bias``, ``layer_head_ids``; see there).
The global sizes keep the dense values; the per-layer lists give each layer's shapes. Only the
padded layout exists here (uneven GQA groups padded with zero query heads).

Self-contained (imports only ``transformers``, ``huggingface_hub`` and its sibling
``configuration_tyr_llama.py``, which ``save_pretrained`` copies along): an exported folder loads
with ``trust_remote_code=True`` without tyr installed.
"""

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict

from .configuration_tyr_llama import (
    TESTED_TRANSFORMERS,
    TyrTransformersVersionError,
    check_layer_lists,
    fill_layer_defaults,
    transformers_version_hint,
)

try:
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.mistral.configuration_mistral import MistralConfig
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
    from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
except ImportError as _exc:  # an untested transformers: say what to install
    _hint = transformers_version_hint(_exc)
    if _hint is None:
        raise
    raise TyrTransformersVersionError(_hint) from None


@dataclass
class _PerLayer:
    """The per-layer fields (defaults: dense) and checks every family's tyr config adds to the family's config."""

    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_o_bias: list[bool] | None = None
    layer_down_bias: list[bool] | None = None
    layer_head_ids: list[list[int]] | None = None
    pruned_from_model_type: str | None = None
    tyr_transformers_tested: list[str] | None = None
    tyr_exported_with_transformers: str | None = None

    def __post_init__(self, **kwargs):
        fill_layer_defaults(self)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: per-layer lists are consistent (no ``hidden % heads`` rule)."""
        check_layer_lists(self)


@strict
class TyrMistralConfig(_PerLayer, MistralConfig):
    model_type = "tyr_mistral"


@strict
class TyrQwen2Config(_PerLayer, Qwen2Config):
    model_type = "tyr_qwen2"


@strict
class TyrQwen3Config(_PerLayer, Qwen3Config):
    model_type = "tyr_qwen3"


@strict
class TyrGemma3TextConfig(_PerLayer, Gemma3TextConfig):
    model_type = "tyr_gemma3_text"


__all__ = ["TESTED_TRANSFORMERS", "TyrGemma3TextConfig", "TyrMistralConfig", "TyrQwen2Config", "TyrQwen3Config"]
