"""Parameter counts: whole model and the prunable projections (the budget's denominator)."""

from __future__ import annotations

from torch import nn

from tyr.modeling.adapter import ATTN_PROJ, MLP_PROJ, get_adapter


def _numel(lin: nn.Linear) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Counts of the whole model (tied weights once), the prunable attention / MLP projections."""
    adapter = get_adapter(model)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    attn = mlp = 0
    for layer in adapter.layers(model):
        proj = adapter.projections(layer)
        attn += sum(_numel(proj[n]) for n in ATTN_PROJ)
        mlp += sum(_numel(proj[n]) for n in MLP_PROJ)
    return {"total": total, "prunable": attn + mlp, "attention": attn, "mlp": mlp}
