"""What is trained: LoRA adapters through ``peft`` or every weight; and the zero padding heads of a
sliced attention (:mod:`tyr.modeling.slicing`) kept exactly zero while training.

A padding head is a zero ``q_proj`` row block meeting zero ``o_proj`` columns. Its output is not
zero (zero queries attend uniformly), so the gradient of those ``o_proj`` columns is not zero either:
unmasked, training would turn padding into real heads that the parameter count does not know about.
:func:`keep_padding_zero` zeroes those rows / columns (of the weights in full training, of
``lora_B`` / ``lora_A`` with LoRA, so the merged weights keep them) and masks their gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tyr.modeling.adapter import get_adapter
from tyr.recovery.data import RecoveryError


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


def add_lora(model: nn.Module, s: LoraSettings):
    """``model`` with LoRA adapters on ``s.target_modules`` (every other weight frozen); returns the
    ``peft`` model. The modules are replaced in ``model`` itself, so ``model`` computes with them."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules), bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. no module of that name (every block pruned to nothing, a typo)
        raise RecoveryError(f"LoRA target modules {list(s.target_modules)}: {e}") from e


def merge_lora(peft_model) -> nn.Module:
    """The plain model with the adapters merged into its weights (W + alpha/r · B A)."""
    return peft_model.merge_and_unload()


def set_full_training(model: nn.Module, embeddings: bool) -> None:
    """Every weight trainable, except the token embedding and output head unless ``embeddings``."""
    for p in model.parameters():
        p.requires_grad_(True)
    if not embeddings:
        for m in (model.get_input_embeddings(), get_adapter(model).lm_head(model)):
            for p in m.parameters():
                p.requires_grad_(False)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name (a tied weight once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _padding_masks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, boolean mask of its padding entries) for every trainable parameter that touches
    a padding head: ``q_proj`` rows (weight, bias, ``lora_B``) and ``o_proj`` columns (weight, ``lora_A``)."""
    a = get_adapter(model)
    out = []
    for layer in a.layers(model):
        attn = a.attention(layer)
        ids = getattr(attn, "tyr_head_ids", None)
        if ids is None or -1 not in ids:
            continue
        hd = (
            attn.o_proj.in_features // len(ids)
            if not hasattr(attn.o_proj, "base_layer")
            else attn.o_proj.base_layer.in_features // len(ids)
        )
        pad = torch.tensor([h < 0 for h in ids]).repeat_interleave(hd)
        for proj, axis in ((attn.q_proj, 0), (attn.o_proj, 1)):
            base = getattr(proj, "base_layer", proj)
            params = [base.weight] + ([base.bias] if axis == 0 and base.bias is not None else [])
            if hasattr(proj, "lora_A"):  # the LoRA factor on the padded side: B (out) for q, A (in) for o
                params += [f.weight for f in (proj.lora_B if axis == 0 else proj.lora_A).values()]
            for p in params:
                if not p.requires_grad:
                    continue
                m = (
                    pad[:, None].expand(-1, p.shape[1])
                    if axis == 0 and p.dim() == 2
                    else pad
                    if axis == 0
                    else pad[None, :].expand(p.shape[0], -1)
                )
                out.append((p, m.to(p.device)))
    return out


@contextmanager
def keep_padding_zero(model: nn.Module) -> Iterator[int]:
    """Zero the trainable padding entries and mask their gradients while inside; yields how many
    parameters are masked. The gradient hooks are always removed on exit."""
    handles = []
    try:
        for p, m in _padding_masks(model):
            with torch.no_grad():
                p.masked_fill_(m, 0)
            handles.append(p.register_hook(lambda g, m=m: g.masked_fill(m, 0)))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
