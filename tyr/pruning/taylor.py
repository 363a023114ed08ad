"""Per-unit Taylor statistics of every layer, from one layer-at-a-time gradient pass."""

from __future__ import annotations

import torch

from tyr import dist
from tyr.layerwise.gradients import layerwise_gradients
from tyr.modeling.adapter import get_adapter
from tyr.pruning.scorers.taylor import taylor_reductions

ATTN_MEMBERS = {"q_proj": "rows", "o_proj": "cols"}
MLP_MEMBERS = {"gate_proj": "rows", "up_proj": "rows", "down_proj": "cols"}


def collect_taylor(
    model, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """``{layer: {"attn": {key: [heads]}, "mlp": {key: [channels]}}}`` (keys: scorers.taylor.TAYLOR_KEYS)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    out: dict[int, dict] = {}

    def on_layer(li: int, grads: dict) -> None:  # layer li is loaded while this runs
        proj = adapter.projections(layers[li])
        geo = adapter.geometry(layers[li])
        members = {n: (proj[n].weight.detach().float(), how) for n, how in ATTN_MEMBERS.items()}
        attn = taylor_reductions(members, grads, geo.num_heads, geo.head_dim)
        members = {n: (proj[n].weight.detach().float(), how) for n, how in MLP_MEMBERS.items()}
        mlp = taylor_reductions(members, grads, adapter.intermediate_size(layers[li]), 1)
        out[li] = {"attn": {k: v.cpu() for k, v in attn.items()}, "mlp": {k: v.cpu() for k, v in mlp.items()}}

    layerwise_gradients(model, input_ids, on_layer, batch_size=batch_size, progress=progress)
    return out


def load_or_collect_taylor(
    model, input_ids: torch.Tensor, cache_file: str | None, batch_size: int = 8, progress: bool = True
) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """:func:`collect_taylor`, cached in a verified safetensors file (the caller keys it by model and
    tokens); a corrupt cache is logged and collected again."""
    import logging

    from tyr.artifacts import load_cache, write_verified

    flat = load_cache(cache_file, log=logging.getLogger(__name__)) if cache_file else None
    if flat is not None:
        out: dict[int, dict] = {}
        for key, t in flat.items():
            li, kind, name = key.split(".")
            out.setdefault(int(li), {}).setdefault(kind, {})[name] = t
        return out
    out = collect_taylor(model, input_ids, batch_size, progress)
    if cache_file and dist.is_main():
        write_verified(
            cache_file, {f"{li}.{kind}.{name}": t for li, d in out.items() for kind, dd in d.items() for name, t in dd.items()}
        )
    return out
