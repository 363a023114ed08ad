"""Configuration of a structurally pruned Llama-family decoder with per-layer widths.

This file is self-contained (it imports only ``transformers`` and ``huggingface_hub``): it is copied
into exported model folders and loaded with ``trust_remote_code=True``.

The global ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` keep the values
of the dense model the checkpoint was pruned from (so ``LlamaConfig``'s checks and any code that
reads them still see a valid dense geometry); the actual shapes of every layer come from the
per-layer lists:

- ``layer_num_heads[i]``: query head slots of layer ``i`` (0 = no attention block). With the default
  padded layout, uneven GQA groups are padded with zero query heads, so this is
  ``layer_num_kv_heads[i] * group_i`` and includes the zero heads;
- ``layer_num_kv_heads[i]``: key/value heads of layer ``i``;
- ``layer_intermediate_size[i]``: MLP channels of layer ``i`` (0 = no MLP block);
- ``layer_o_bias[i]`` / ``layer_down_bias[i]``: whether ``o_proj`` / ``down_proj`` (or the empty
  block standing in for them) has a bias (bias compensation after pruning);
- ``layer_kv_of_head[i]`` (optional, index-map layout): the KV head read by each query head; when
  given, groups may be uneven and K/V are expanded with ``index_select`` instead of zero padding;
- ``layer_head_ids[i]`` (optional, informational): the original query head of each slot, -1 for a
  zero padding head.

``attention_qkv_bias`` (Qwen2: q/k/v have a bias, o has none) and ``mlp_gate_up_bias`` replace
``LlamaConfig.attention_bias`` / ``mlp_bias``, which the pruned modeling code ignores (they are kept
False). Sliding-window attention is not supported.
"""

import functools

import transformers
from packaging.version import Version

# The transformers releases this architecture code was tested with (experiments/compat.sh; the lock pins one).
# Recorded in every exported config.json; outside this range a failure names the range and what to install.
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0")


class TyrTransformersVersionError(RuntimeError):
    """The installed transformers is outside the range this folder was tested with, and it failed."""


def transformers_version_hint(exc: BaseException) -> str | None:
    """One line naming the versions and what to install, when the installed transformers is untested."""
    lo, hi = TESTED_TRANSFORMERS
    now = Version(transformers.__version__)
    if Version(lo) <= now <= Version(hi):
        return None
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return (
        f"this tyr model (pruned export) was tested with transformers {lo} to {hi}, but transformers "
        f"{transformers.__version__} is installed and failed ({reason}); "
        f"run: pip install 'transformers>={lo},<={hi}'"
    )


def guard_transformers_version(fn):
    """Turn a failure under an untested transformers release into one line saying what to install."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TyrTransformersVersionError:
            raise  # already one line (an inner guarded call)
        except Exception as exc:  # noqa: BLE001 - re-raised unchanged inside the tested range
            hint = transformers_version_hint(exc)
            if hint is None:
                raise
            raise TyrTransformersVersionError(hint) from None

    return wrapper


try:
    from huggingface_hub.dataclasses import strict
    from transformers.models.llama.configuration_llama import LlamaConfig
except ImportError as _exc:
    _hint = transformers_version_hint(_exc)
    if _hint is None:
        raise
    raise TyrTransformersVersionError(_hint) from None


def fill_layer_defaults(cfg) -> None:
    """Unset per-layer lists mean "dense": every layer has the global sizes (shared by every tyr_* config)."""
    n = cfg.num_hidden_layers
    if cfg.layer_num_heads is None:
        cfg.layer_num_heads = [int(cfg.num_attention_heads)] * n
    if cfg.layer_num_kv_heads is None:
        cfg.layer_num_kv_heads = [int(cfg.num_key_value_heads or cfg.num_attention_heads)] * n
    if cfg.layer_intermediate_size is None:
        cfg.layer_intermediate_size = [int(cfg.intermediate_size)] * n
    if cfg.layer_o_bias is None:
        cfg.layer_o_bias = [False] * n
    if cfg.layer_down_bias is None:
        cfg.layer_down_bias = [False] * n
    if cfg.tyr_transformers_tested is None:
        cfg.tyr_transformers_tested = list(TESTED_TRANSFORMERS)
    if cfg.tyr_exported_with_transformers is None:
        cfg.tyr_exported_with_transformers = transformers.__version__


def check_layer_lists(cfg) -> None:
    """The per-layer lists of a tyr_* config are consistent with each other."""
    if cfg.head_dim is None or cfg.head_dim <= 0:
        raise ValueError("a tyr config needs an explicit positive head_dim")
    n = cfg.num_hidden_layers
    for name in (
        "layer_num_heads",
        "layer_num_kv_heads",
        "layer_intermediate_size",
        "layer_o_bias",
        "layer_down_bias",
        "layer_kv_of_head",
        "layer_head_ids",
    ):
        value = getattr(cfg, name, None)
        if value is not None and len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, expected num_hidden_layers={n}")
    if cfg.layer_num_heads is None or cfg.layer_num_kv_heads is None:
        return
    for i, (nh, nkv) in enumerate(zip(cfg.layer_num_heads, cfg.layer_num_kv_heads)):
        if nh < 0 or nkv < 0 or (nh == 0) != (nkv == 0):
            raise ValueError(f"layer {i}: {nh} query heads and {nkv} KV heads (both or neither must be 0)")
        kv_maps = getattr(cfg, "layer_kv_of_head", None)
        kv_map = kv_maps[i] if kv_maps is not None else None
        if kv_map is not None:
            if len(kv_map) != nh or any(k < 0 or k >= nkv for k in kv_map):
                raise ValueError(f"layer {i}: layer_kv_of_head {kv_map} does not fit {nh} heads / {nkv} KV heads")
        elif nh and nh % nkv:
            raise ValueError(
                f"layer {i}: {nh} query heads is not a multiple of {nkv} KV heads "
                "(pad groups with zero heads or give layer_kv_of_head)"
            )
    if cfg.layer_intermediate_size is not None and any(c < 0 for c in cfg.layer_intermediate_size):
        raise ValueError("layer_intermediate_size entries must be >= 0")


class TyrLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus per-layer attention heads, KV heads, MLP widths and bias flags."""

    model_type = "tyr_llama"

    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_o_bias: list[bool] | None = None
    layer_down_bias: list[bool] | None = None
    layer_kv_of_head: list[list[int] | None] | None = None
    layer_head_ids: list[list[int]] | None = None
    attention_qkv_bias: bool = False
    mlp_gate_up_bias: bool = False
    pruned_from_model_type: str | None = None
    tyr_transformers_tested: list[str] | None = None
    tyr_exported_with_transformers: str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        fill_layer_defaults(self)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: per-layer lists are consistent (no ``hidden % heads`` rule)."""
        check_layer_lists(self)

    def layer_has_attention(self, layer_idx: int) -> bool:
        return self.layer_num_heads[layer_idx] > 0


try:  # validators are bound when the decorator runs; before transformers 5.23 configs are no dataclasses
    TyrLlamaConfig = strict(TyrLlamaConfig)
except Exception as _exc:  # noqa: BLE001 - re-raised unchanged inside the tested range
    _hint = transformers_version_hint(_exc)
    if _hint is None:
        raise
    raise TyrTransformersVersionError(_hint) from None

__all__ = [
    "TESTED_TRANSFORMERS",
    "TyrLlamaConfig",
    "TyrTransformersVersionError",
    "check_layer_lists",
    "fill_layer_defaults",
    "guard_transformers_version",
    "transformers_version_hint",
]
