"""Bytes on disk: supernet shards (exactly what :meth:`tyr.supernet.store.SupernetStore.write_layer`
writes), Týr's zero-padded layout (our assumption), the teacher top-k cache."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from tyr.planner.settings import ArchFacts
from tyr.supernet.grid import KINDS, SupernetGrid

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32"}
# safetensors (>= 0.4) orders a file's tensors by dtype, largest enum value first, then by name; the
# order changes the digits of the offsets in the header, so we mirror it to predict the header length.
_SAFETENSORS_DTYPE_RANK = {"F16": 11, "BF16": 12, "I32": 13, "F32": 15}
SHARD_SCHEMA_VERSION = 1  # mirrors tyr.supernet.store.SCHEMA_VERSION (checked by tests/test_planner.py)
# Týr's reported supernet sizes (DESIGN.md section 3), keyed by (layers, hidden, intermediate, heads):
# Llama-3.1-8B 39.6 GB and Llama-3.1-70B 414.7 GB (Llama-3 has the same shapes).
TYR_REPORTED_BYTES = {(32, 4096, 14336, 32): 39.6e9, (80, 8192, 28672, 64): 414.7e9}


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def safetensors_file_bytes(
    entries: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Size of a safetensors file holding tensors ``(name, dtype, shape)`` (dtype as ``F32``, ``BF16``,
    ``I32``...): 8-byte header length + JSON header padded with spaces to a multiple of 8 + data."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "F64": 8}
    ordered = sorted(entries, key=lambda e: (-_SAFETENSORS_DTYPE_RANK.get(e[1], 0), e[0]))
    parts, offset = [], 0
    if metadata:
        parts.append('"__metadata__":' + json.dumps(dict(metadata), separators=(",", ":")))
    for name, dt, shape in ordered:
        n = itemsize[dt] * math.prod(shape)
        info = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        parts.append(json.dumps(name) + ":" + json.dumps(info, separators=(",", ":")))
        offset += n
    header = len(("{" + ",".join(parts) + "}").encode())
    header += (-header) % 8
    return {"data": offset, "header": 8 + header, "total": 8 + header + offset}


def shard_entries(
    grid: SupernetGrid, layer: int, arch: ArchFacts, dtype: str, bias: bool
) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors :meth:`SupernetStore.write_layer` stores for one layer: per module and level the kept
    unit indices (int32), the kept output-projection columns [hidden, kept * unit_width] (model dtype)
    and, with a bias-fitting pruner, a bias [hidden] for every level that removes something."""
    dt = SAFETENSORS_DTYPE[dtype]
    width = {"attn": arch.head_dim, "mlp": 1}
    out = []
    for kind in KINDS:
        g = grid.modules[kind][layer]
        for lvl, k in enumerate(g.keep):
            out.append((f"{kind}.{lvl}.keep", "I32", (k,)))
            out.append((f"{kind}.{lvl}.weight", dt, (arch.hidden_size, k * width[kind])))
            if bias and k < g.n_units:
                out.append((f"{kind}.{lvl}.bias", dt, (arch.hidden_size,)))
    return out


def shard_metadata(layer: int) -> dict[str, str]:
    return {"tyr": json.dumps({"layer": layer, "schema_version": SHARD_SCHEMA_VERSION}, sort_keys=True)}


def supernet_bytes(grid: SupernetGrid, arch: ArchFacts, dtype: str, bias: bool = False) -> dict[str, Any]:
    """Exact shard bytes of tyr's supernet for ``grid`` (the manifest, a few hundred KB, not counted)."""
    per_layer = [
        safetensors_file_bytes(shard_entries(grid, l, arch, dtype, bias), shard_metadata(l)) for l in range(grid.num_layers)
    ]
    b = dtype_bytes(dtype)
    attn = sum(arch.hidden_size * k * arch.head_dim * b + 4 * k for g in grid.modules["attn"] for k in g.keep)
    mlp = sum(arch.hidden_size * k * b + 4 * k for g in grid.modules["mlp"] for k in g.keep)
    return {
        "total": sum(p["total"] for p in per_layer),
        "data": sum(p["data"] for p in per_layer),
        "header": sum(p["header"] for p in per_layer),
        "per_layer": [p["total"] for p in per_layer],
        "attn_data": attn,
        "mlp_data": mlp,
    }


def tyr_paper_layout_bytes(grid: SupernetGrid, arch: ArchFacts, dtype: str) -> dict[str, int]:
    """Týr's zero-padded layout for the same grid — OUR ASSUMPTION, not Týr's code: every variant
    stores full-size (zero-padded) tensors in the model dtype, either of all its module's
    projections (attention q,k,v,o; MLP gate,up,down) or only of the output projection."""
    lp, b = arch.layer_params(), dtype_bytes(dtype)
    all_proj = sum(len(g.keep) * lp["attention"] for g in grid.modules["attn"]) + sum(
        len(g.keep) * lp["mlp"] for g in grid.modules["mlp"]
    )
    out_only = sum(len(g.keep) * lp["o_proj"] for g in grid.modules["attn"]) + sum(
        len(g.keep) * lp["down_proj"] for g in grid.modules["mlp"]
    )
    return {"all_projections": all_proj * b, "output_projection_only": out_only * b}


def teacher_cache_bytes(num_sequences: int, seq_len: int, k: int) -> int:
    """Exactly :attr:`tyr.fitness.TeacherCache.nbytes`: int64 input ids per token, and per predicted
    position (seq_len - 1 per sequence) k int32 ids + k float32 log-probabilities + a float32 tail.
    (:meth:`TeacherCache.estimate_bytes` rounds this up to tokens x (8k + 12).)"""
    return num_sequences * seq_len * 8 + num_sequences * (seq_len - 1) * (8 * k + 4)
