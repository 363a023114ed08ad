"""Uniform pruning: every layer to the same parameter sparsity, sequentially (sparsegpt loop).

Layer l is pruned on the inputs produced by the already-pruned layers 0..l-1. Within a layer the
attention heads are pruned first; the MLP is then pruned on the inputs that the pruned attention
gives, and takes as many channels as needed to bring the layer's removed parameters to the
requested sparsity (heads are coarse: a SmolLM2 head is 1/9 of its attention), within one channel.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from tyr.layerwise.engine import capture_layer_inputs, collect_input_stats, run_layer
from tyr.modeling.adapter import get_adapter
from tyr.modeling.params import layer_counts, parameter_counts
from tyr.modeling.slicing import slice_attention, slice_mlp
from tyr.pruning.local import LocalPruner
from tyr.pruning.problem import attention_problem, mlp_problem
from tyr.utils import track

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    layer: int
    heads_kept: int
    heads: int
    channels_kept: int
    channels: int
    attn_error: float
    mlp_error: float
    params_before: int
    params_after: int
    attn_info: dict = field(default_factory=dict)
    mlp_info: dict = field(default_factory=dict)


def mlp_channels_to_remove(before: dict, after_attn: dict, sparsity: float, per_channel: int, channels: int) -> int:
    """Channels to remove so that the layer loses ``sparsity`` of its prunable parameters."""
    need = sparsity * (before["attention"] + before["mlp"]) - (before["attention"] - after_attn["attention"])
    return int(min(channels, max(0, round(need / per_channel))))


def prune_uniform(model, pruner: LocalPruner, calib_ids: torch.Tensor, sparsity: float,
                  taylor: dict | None = None, batch_size: int = 8, progress: bool = True,
                  on_layer=None) -> dict:
    """Prune ``model`` in place; returns a JSON-ready report (per-layer errors, budget achieved)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if pruner.needs_gradients and taylor is None:
        raise ValueError(f"pruner {pruner.name or type(pruner.scorer).__name__} needs Taylor statistics (gradients)")
    adapter = get_adapter(model)
    dense = parameter_counts(model)
    t0 = time.time()
    x, kwargs = capture_layer_inputs(model, calib_ids, batch_size)
    reports = []
    for li, layer in enumerate(track(adapter.layers(model), f"prune {sparsity:.0%}: layer", enabled=progress)):
        before = layer_counts(adapter, layer)
        t = taylor[li] if taylor is not None else {"attn": None, "mlp": None}
        # attention heads
        stats, _ = collect_input_stats(layer, x, kwargs[li], {"o": adapter.attention(layer).o_proj}, batch_size)
        prob = attention_problem(adapter, layer, li, stats["o"], t["attn"])
        k_heads = int(round(prob.n_units * (1.0 - sparsity)))
        (va,) = pruner.prune(prob, [k_heads])
        if k_heads < prob.n_units:
            slice_attention(adapter, layer, va.keep, va.out_weight, va.out_bias)
        after_attn = layer_counts(adapter, layer)
        # MLP channels, on the inputs given by the pruned attention
        mlp = adapter.mlp(layer)
        stats, _ = collect_input_stats(layer, x, kwargs[li], {"d": mlp.down_proj}, batch_size)
        prob = mlp_problem(adapter, layer, li, stats["d"], t["mlp"])
        per_channel = mlp.gate_proj.in_features * 2 + mlp.down_proj.out_features
        remove = mlp_channels_to_remove(before, after_attn, sparsity, per_channel, prob.n_units)
        (vm,) = pruner.prune(prob, [prob.n_units - remove])
        if remove:
            slice_mlp(adapter, layer, vm.keep, vm.out_weight, vm.out_bias)
        after = layer_counts(adapter, layer)
        x = run_layer(layer, x, kwargs[li], batch_size)
        rep = LayerReport(li, len(va.keep), before["heads"], len(vm.keep), before["channels"], va.rel_error, vm.rel_error,
                          before["attention"] + before["mlp"], after["attention"] + after["mlp"], va.info, vm.info)
        reports.append(rep)
        if on_layer is not None:
            on_layer(asdict(rep))
        log.debug("layer %d: heads %d/%d err %.4f, channels %d/%d err %.4f", li, rep.heads_kept, rep.heads,
                  rep.attn_error, rep.channels_kept, rep.channels, rep.mlp_error)
    pruned = parameter_counts(model)
    return {
        "target_sparsity": sparsity,
        "achieved_sparsity": 1.0 - pruned["prunable"] / dense["prunable"],
        "params_dense": dense,
        "params_pruned": pruned,
        "seconds": time.time() - t0,
        "layers": [asdict(r) for r in reports],
    }
