"""Write a tyr-exported Hugging Face folder as a GGUF file that llama.cpp (and so Ollama) runs.

llama.cpp's ``deci`` architecture (Nemotron-51B) is the one that builds every layer with its own
query heads, KV heads and MLP width (``deci.attention.head_count``, ``deci.attention.head_count_kv``,
``deci.feed_forward_length`` as per-layer arrays); its blocks are Llama's (RMSNorm, RoPE of type NORM,
SwiGLU). How each layer of a pruned model maps onto it (docs/gguf.md):

- attention with padded GQA groups (tyr's padded layout: zero query heads make every group even): the
  heads as stored, Q/K rows permuted as the converter's ``LlamaModel.permute`` does (rope type NORM);
- attention removed: ``head_count = 0`` (deci skips the block), except where that is wrong: in layer 0,
  from which llama.cpp takes the head size and the RoPE size, and where the removed block keeps a bias
  (bias compensation). There one zero head is written (zero q/k/v/o: its output is exactly zero);
- MLP removed: deci drops the whole end of a layer with ``feed_forward_length = 0``, the attention
  output included, and in the last layer it would also skip the selection of the output rows. So an
  MLP is left out only in a layer that writes no attention and is not the last; elsewhere a zero MLP
  of :data:`ZERO_MLP` channels stands in (zero gate/up/down: its output is exactly zero);
- each MLP is padded with zero channels to a multiple of :data:`MLP_ALIGN` (32, also the block size of
  ``q8_0`` / ``q4_0``, so ``ffn_down``, whose rows are the MLP's channels, quantizes too). In f32 / f16 the
  padding is for speed: llama.cpp's tiled CPU matmul (llamafile's sgemm) needs the inner dimension in
  multiples of 16 and otherwise falls back to a dot-product loop, which made prompt processing of a 25 %
  model with 1,109 channels per layer 0.79x the dense model's speed (docs/gguf.md, Speed); a tensor
  whose rows still do not fit falls back to f16, as the converter does. Norms, biases and other 1-D
  tensors stay in f32; in ``q4_0`` the embeddings / output head are written in ``q8_0`` (llama-quantize
  keeps the output head at a higher precision too: Q6_K, which numpy cannot write);
- tied embeddings: no ``output.weight`` (llama.cpp then reuses ``token_embd``); Llama-3 RoPE scaling:
  the ``rope_freqs`` tensor computed as the converter computes it.

:func:`write_gguf` returns the record of what it wrote; :func:`check_gguf_family` is the check made
before anything loads. Families: those whose adapter has no ``gguf_refusal`` (Llama, Mistral).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tyr.export.gguf_vocab import GGUFExportError, add_tokenizer
from tyr.modeling.adapter import UnsupportedArchitectureError, adapter_for_model_type

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
GGUF_DTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
GGUF_FILE = "model.gguf"
ZERO_MLP = 32  # channels of the zero MLP standing in for a removed one: one quantization block
MLP_ALIGN = 32  # MLP widths are padded to a multiple of this in every dtype (the module docstring)
WRITER_VERSION = 2  # artifact key: bump when a folder would be written differently (2: MLPs padded to 32 in every dtype)


@dataclass(frozen=True)
class BlockPlan:
    """What the GGUF holds for one decoder layer, and why."""

    layer: int
    n_head: int  # query heads written (zero padding heads included; 1 for a zero dummy head)
    n_head_kv: int
    n_ff: int  # MLP channels written (zero channels included)
    heads: int  # query head slots in the folder (0: attention removed)
    channels: int  # MLP channels in the folder (0: MLP removed)
    dummy_head: bool  # a zero head stands in for removed attention
    zero_mlp: bool  # a zero MLP stands in for a removed one


def check_gguf_family(model_type: str) -> None:
    """Refuse, in one line, a family that cannot be written as a deci GGUF (before anything loads)."""
    try:
        adapter = adapter_for_model_type(model_type)
    except UnsupportedArchitectureError as e:
        raise GGUFExportError(str(e)) from None
    if adapter.gguf_refusal:
        raise GGUFExportError(f"{adapter.family} models cannot be written as a GGUF: {adapter.gguf_refusal}")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, checked for what the deci architecture can hold."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.exists():
        raise GGUFExportError(f"{folder} holds no config.json: give a Hugging Face folder exported by tyr")
    cfg = json.loads(cfg_file.read_text())
    check_gguf_family(str(cfg.get("model_type")))
    n = int(cfg["num_hidden_layers"])
    if cfg.get("hidden_act", "silu") != "silu":
        raise GGUFExportError(f"hidden_act={cfg['hidden_act']}: llama.cpp's deci MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias", "attention_qkv_bias", "mlp_gate_up_bias"):
        if cfg.get(flag):
            raise GGUFExportError(f"{flag}=true: q/k/v and gate/up biases are not written to a deci GGUF")
    if any(m is not None for m in cfg.get("layer_kv_of_head") or []):
        raise GGUFExportError("the index layout (uneven GQA groups through an index map): export with layout=padded")
    if float(cfg.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise GGUFExportError("partial_rotary_factor != 1: deci rotates the whole head")
    heads, kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    cfg.setdefault("layer_num_heads", [heads] * n)
    cfg.setdefault("layer_num_kv_heads", [kv] * n)
    cfg.setdefault("layer_intermediate_size", [int(cfg["intermediate_size"])] * n)
    cfg["layer_o_bias"] = cfg.get("layer_o_bias") or [False] * n
    cfg["layer_down_bias"] = cfg.get("layer_down_bias") or [False] * n
    cfg["head_dim"] = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    for i, (h, k) in enumerate(zip(cfg["layer_num_heads"], cfg["layer_num_kv_heads"])):
        if (h == 0) != (k == 0) or (h and h % k):
            raise GGUFExportError(f"layer {i}: {h} query heads over {k} KV heads do not form even groups")
    rope_type(cfg)
    return cfg


def rope_params(cfg: dict) -> dict:
    """RoPE settings: ``rope_parameters`` (transformers 5) or the older ``rope_theta`` / ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_type(cfg: dict) -> str:
    kind = rope_params(cfg)["rope_type"]
    if kind not in ("default", "llama3"):
        raise GGUFExportError(f"RoPE scaling {kind!r}: only the default RoPE and Llama-3 scaling are written")
    return kind


def llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama-3 RoPE scaling, as llama.cpp's converter computes ``rope_freqs``."""
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_len = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def block_plans(cfg: dict, block: int = 1) -> list[BlockPlan]:
    """Each layer's GGUF widths (module docstring); ``block``: MLP widths are padded to a multiple of it."""
    n = int(cfg["num_hidden_layers"])
    plans = []
    for i in range(n):
        heads, kv, ff = (int(cfg[k][i]) for k in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size"))
        dummy = heads == 0 and (i == 0 or bool(cfg["layer_o_bias"][i]))
        n_head, n_kv = (1, 1) if dummy else (heads, kv)
        zero_mlp = ff == 0 and (n_head > 0 or bool(cfg["layer_down_bias"][i]) or i == n - 1)
        n_ff = ZERO_MLP if zero_mlp else -(-ff // block) * block
        plans.append(BlockPlan(i, n_head, n_kv, n_ff, heads, ff, dummy, zero_mlp))
    return plans


class _Weights:
    """The folder's safetensors tensors by name, read one at a time as float32 numpy arrays."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(f, "pt") as st:
                    self.files.update({k: f for k in st.keys()})
        if not self.files:
            raise GGUFExportError(f"{folder} holds no safetensors weights")

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise GGUFExportError(f"tensor {name} is missing from the folder's weights")
        with self._open(self.files[name], "pt") as st:
            return st.get_tensor(name).float().numpy()


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from Hugging Face's rotate-half order to llama.cpp's rope type NORM (converter's ``permute``)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([w, np.zeros((rows - w.shape[0], *w.shape[1:]), w.dtype)]) if rows > w.shape[0] else w


class _Tensors:
    """Adds tensors in the target dtype: 1-D in f32, f16 where a row does not fit the quantization block."""

    def __init__(self, writer: gguf.GGUFWriter, dtype: str):
        self.writer, self.qtype = writer, GGUF_DTYPES[dtype]
        self.types: Counter = Counter()
        self.fallback: list[str] = []
        self.params = 0

    def add(self, name: str, arr: np.ndarray, qtype: Q | None = None) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = Q.F32 if arr.ndim == 1 else (qtype or self.qtype)
        block = gguf.GGML_QUANT_SIZES[t][0]
        if arr.shape[-1] % block:
            t = Q.F16
            self.fallback.append(name)
        self.writer.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
        self.types[t.name] += 1
        self.params += arr.size


def _write_blocks(t: _Tensors, w: _Weights, cfg: dict, plans: list[BlockPlan]) -> None:
    hd, hidden = cfg["head_dim"], int(cfg["hidden_size"])
    for p in plans:
        hf, blk = f"model.layers.{p.layer}.", f"blk.{p.layer}."
        if p.dummy_head:
            t.add(blk + "attn_norm.weight", np.ones(hidden))
            for name, shape in (("attn_q", (hd, hidden)), ("attn_k", (hd, hidden)), ("attn_v", (hd, hidden))):
                t.add(blk + name + ".weight", np.zeros(shape))
            t.add(blk + "attn_output.weight", np.zeros((hidden, hd)))
        elif p.n_head:
            t.add(blk + "attn_norm.weight", w.get(hf + "input_layernorm.weight"))
            t.add(blk + "attn_q.weight", permute_rope_rows(w.get(hf + "self_attn.q_proj.weight"), p.n_head))
            t.add(blk + "attn_k.weight", permute_rope_rows(w.get(hf + "self_attn.k_proj.weight"), p.n_head_kv))
            t.add(blk + "attn_v.weight", w.get(hf + "self_attn.v_proj.weight"))
            t.add(blk + "attn_output.weight", w.get(hf + "self_attn.o_proj.weight"))
        if cfg["layer_o_bias"][p.layer]:  # o_proj's bias, or the bias of an empty attention block
            t.add(blk + "attn_output.bias", w.get(hf + ("self_attn.o_proj.bias" if p.heads else "self_attn.bias")))
        if p.zero_mlp:
            t.add(blk + "ffn_norm.weight", np.ones(hidden))
            t.add(blk + "ffn_gate.weight", np.zeros((p.n_ff, hidden)))
            t.add(blk + "ffn_up.weight", np.zeros((p.n_ff, hidden)))
            t.add(blk + "ffn_down.weight", np.zeros((hidden, p.n_ff)))
        elif p.n_ff:
            t.add(blk + "ffn_norm.weight", w.get(hf + "post_attention_layernorm.weight"))
            t.add(blk + "ffn_gate.weight", _pad_rows(w.get(hf + "mlp.gate_proj.weight"), p.n_ff))
            t.add(blk + "ffn_up.weight", _pad_rows(w.get(hf + "mlp.up_proj.weight"), p.n_ff))
            t.add(blk + "ffn_down.weight", _pad_rows(w.get(hf + "mlp.down_proj.weight").T, p.n_ff).T)
        if cfg["layer_down_bias"][p.layer]:
            t.add(blk + "ffn_down.bias", w.get(hf + ("mlp.down_proj.bias" if p.channels else "mlp.bias")))


def write_gguf(
    folder: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32", tokenizer_gguf: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Write the Hugging Face folder ``folder`` (a tyr export, or a plain Llama / Mistral checkpoint) as
    the GGUF file ``out`` in ``dtype`` (one of :data:`GGUF_DTYPES`), atomically. The tokenizer comes
    from ``tokenizer_gguf``, else from the GGUF the model was converted from (the folder's
    ``tyr_source.json``), else from the folder's tokenizer (:mod:`tyr.export.gguf_vocab`).
    Returns the record: per-layer plan, tensor types, tokenizer, size and sha256."""
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"gguf dtype {dtype!r} must be one of {', '.join(GGUF_DTYPES)}")
    folder, out = Path(folder), Path(out)
    t0 = time.time()
    cfg = read_config(folder)
    weights = _Weights(folder)
    hidden, hd, n = int(cfg["hidden_size"]), cfg["head_dim"], int(cfg["num_hidden_layers"])
    block = max(gguf.GGML_QUANT_SIZES[GGUF_DTYPES[dtype]][0], MLP_ALIGN)
    plans = block_plans(cfg, block)
    params = rope_params(cfg)
    warnings = []
    if cfg.get("sliding_window"):
        warnings.append(
            f"sliding_window={cfg['sliding_window']}: llama.cpp's deci attends to the whole context, so outputs "
            f"equal the model's for sequences up to {cfg['sliding_window']} tokens (as llama.cpp's own Mistral conversion)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "deci")
    try:
        name = folder.resolve()
        writer.add_name(f"{name.parent.name}/{name.name}" if name.name == "hf_model" else name.name)  # e.g. demo-s0.5/hf_model
        writer.add_block_count(n)
        writer.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length([p.n_ff for p in plans])
        writer.add_head_count([p.n_head for p in plans])
        writer.add_head_count_kv([p.n_head_kv for p in plans])
        writer.add_key_length(hd)
        writer.add_value_length(hd)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(float(params["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(int(cfg["vocab_size"]))
        writer.add_file_type(_FILE_TYPES[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer = add_tokenizer(writer, folder, int(cfg["vocab_size"]), tokenizer_gguf)
        tensors = _Tensors(writer, dtype)
        head_type = Q.Q8_0 if dtype == "q4_0" else None
        tensors.add("token_embd.weight", weights.get("model.embed_tokens.weight"), head_type)
        tensors.add("output_norm.weight", weights.get("model.norm.weight"))
        tied = bool(cfg.get("tie_word_embeddings", False)) or not weights.has("lm_head.weight")  # no head stored: tied
        if not tied:
            tensors.add("output.weight", weights.get("lm_head.weight"), head_type)
        if rope_type(cfg) == "llama3":
            tensors.add("rope_freqs.weight", llama3_rope_factors(params, hd))
        _write_blocks(tensors, weights, cfg, plans)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    from tyr.artifacts import file_sha256

    for msg in warnings:
        log.warning("%s: %s", out, msg)
    record = {
        "format": "gguf",
        "architecture": "deci",
        "dtype": dtype,
        "out": str(out),
        "bytes": out.stat().st_size,
        "sha256": file_sha256(out),
        "writer_version": WRITER_VERSION,
        "tokenizer": tokenizer,
        "tied_embeddings": tied,
        "rope": {"type": rope_type(cfg), "theta": float(params["rope_theta"])},
        "tensor_types": dict(tensors.types),
        "f16_fallback": tensors.fallback,
        "stored_params": tensors.params,
        "layers": [asdict(p) for p in plans],
        "warnings": warnings,
        "seconds": time.time() - t0,
    }
    log.info("wrote %s (%s, %.1f MB, %.1f s)", out, dtype, record["bytes"] / 1e6, record["seconds"])
    return record
