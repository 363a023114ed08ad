"""Parameter counts: whole model and the prunable projections (the budget's denominator).

Zero padding heads (see :mod:`tyr.modeling.slicing`) are stored but are not parameters of the
pruned model: they are counted in ``stored`` only.
"""

from __future__ import annotations

from torch import nn

from tyr.modeling.adapter import get_adapter


def _numel(lin: nn.Linear) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


def layer_counts(adapter, layer: nn.Module) -> dict[str, int]:
    """Prunable parameters of one layer: attention (real heads only) and MLP."""
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    if hasattr(attn, "q_proj"):
        hd = int(attn.head_dim)
        slots = attn.q_proj.out_features // hd
        pad = sum(1 for h in getattr(attn, "tyr_head_ids", ()) if h < 0)
        per_slot_q = attn.q_proj.in_features * hd + (hd if attn.q_proj.bias is not None else 0)
        per_slot_o = attn.o_proj.out_features * hd
        a = _numel(attn.q_proj) + _numel(attn.k_proj) + _numel(attn.v_proj) + _numel(attn.o_proj)
        a_real = a - pad * (per_slot_q + per_slot_o)
        heads = slots - pad
    else:
        a = a_real = sum(p.numel() for p in attn.parameters())
        heads = 0
    if hasattr(mlp, "gate_proj"):
        m = _numel(mlp.gate_proj) + _numel(mlp.up_proj) + _numel(mlp.down_proj)
        channels = mlp.gate_proj.out_features
    else:
        m = sum(p.numel() for p in mlp.parameters())
        channels = 0
    return {"attention": a_real, "mlp": m, "stored_attention": a, "heads": heads, "channels": channels}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Counts of the whole model (tied weights once, padding excluded) and the prunable projections."""
    adapter = get_adapter(model)
    seen, stored = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            stored += p.numel()
    attn = mlp = pad = 0
    for layer in adapter.layers(model):
        c = layer_counts(adapter, layer)
        attn += c["attention"]
        mlp += c["mlp"]
        pad += c["stored_attention"] - c["attention"]
    return {"total": stored - pad, "prunable": attn + mlp, "attention": attn, "mlp": mlp, "stored": stored}
