"""Save and reload an in-memory pruned model (dense layers sliced in place, :mod:`tyr.modeling.slicing`).

The file is one safetensors (shared tensors such as tied embeddings stored once) whose metadata holds
the per-layer structure: the original head of every attention slot (-1 = zero padding head), the
kept MLP width, which blocks are empty, which carry a fitted bias. :func:`load_sliced` slices a copy
of the dense model to that structure and loads the tensors strictly, so every shape is checked.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from tyr.modeling.adapter import get_adapter
from tyr.modeling.slicing import EmptyAttention, EmptyMLP, slice_attention, slice_mlp

FORMAT = "tyr_sliced/1"


def structure(model) -> list[dict]:
    """Per layer: ``heads`` (original head per slot, or None when the attention is untouched),
    ``mlp`` (kept channels), and whether the output projections carry a bias."""
    a = get_adapter(model)
    out = []
    for layer in a.layers(model):
        attn, mlp = a.attention(layer), a.mlp(layer)
        if isinstance(attn, EmptyAttention):
            heads, o_bias = [], attn.bias is not None
        else:
            ids = getattr(attn, "tyr_head_ids", None)
            heads, o_bias = (None if ids is None else [int(h) for h in ids]), attn.o_proj.bias is not None
        if isinstance(mlp, EmptyMLP):
            width, d_bias = 0, mlp.bias is not None
        else:
            width, d_bias = mlp.gate_proj.out_features, mlp.down_proj.bias is not None
        out.append({"heads": heads, "o_bias": o_bias, "mlp": width, "down_bias": d_bias})
    return out


def save_sliced(model, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``model`` (weights + structure) to ``path`` atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_model(
        model, str(tmp), metadata={"format": FORMAT, "structure": json.dumps(structure(model)), "meta": json.dumps(meta or {})}
    )
    os.replace(tmp, path)
    return path


def read_meta(path: str | Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def load_sliced(dense, path: str | Path):
    """A pruned copy of the in-memory ``dense`` model with the structure and weights saved in ``path``."""
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
    if md.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    model = copy.deepcopy(dense)
    a = get_adapter(model)
    for layer, st in zip(a.layers(model), json.loads(md["structure"])):
        hidden = a.attention(layer).o_proj.out_features
        zero = torch.zeros(hidden, dtype=a.attention(layer).o_proj.weight.dtype)
        if st["heads"] is not None:
            slice_attention(a, layer, [h for h in st["heads"] if h >= 0], o_bias=zero if st["o_bias"] else None)
        if st["mlp"] != a.mlp(layer).gate_proj.out_features or st["down_bias"]:
            slice_mlp(a, layer, range(st["mlp"]), down_bias=zero if st["down_bias"] else None)
    load_model(model, str(path), strict=True)
    return model
