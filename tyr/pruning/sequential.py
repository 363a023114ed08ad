"""Pruning one decoder layer on its inputs: the step that the uniform prune and the supernet build
(:mod:`tyr.supernet.builder`) share, run by the layer driver (:mod:`tyr.layerwise.driver`).

Attention heads are pruned on the input statistics of ``o_proj``; the MLP is then pruned on the
input statistics of ``down_proj`` gathered *with the attention as the caller applied it*, and the
layer's outputs are computed with both applied. The callers differ only in what they solve (one
kept count, or every level of a grid) and how they apply the result: the uniform prune slices the
layer for good, the build swaps in a mixed or chosen output projection for the duration of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from tyr.layerwise.driver import LayerInputs
from tyr.modeling.adapter import DecoderAdapter
from tyr.pruning.problem import ModuleProblem, Variant, attention_problem, mlp_problem

Solve = Callable[[ModuleProblem], list[Variant]]
Apply = Callable[[ModuleProblem, list[Variant]], AbstractContextManager[None]]


def prune_layer(
    adapter: DecoderAdapter,
    l: int,
    layer: nn.Module,
    inputs: LayerInputs,
    taylor: dict | None,
    solve_attn: Solve,
    apply_attn: Apply,
    solve_mlp: Solve,
    apply_mlp: Apply,
) -> tuple[list[Variant], list[Variant], torch.Tensor]:
    """Variants of layer ``l``'s attention and MLP (``taylor``: the layer's per-unit Taylor
    statistics, or None) and the layer's outputs with both applied."""
    t = taylor if taylor is not None else {"attn": None, "mlp": None}
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    st = inputs.input_stats(layer, {"o": attn.o_proj})
    pa = attention_problem(adapter, layer, l, st["o"], t["attn"])
    va = solve_attn(pa)
    with apply_attn(pa, va):
        st = inputs.input_stats(layer, {"d": mlp.down_proj})
        pm = mlp_problem(adapter, layer, l, st["d"], t["mlp"])
        vm = solve_mlp(pm)
        with apply_mlp(pm, vm):
            out = inputs.forward(layer)
    return va, vm, out
