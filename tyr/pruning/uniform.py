"""Uniform pruning: every layer to the same parameter sparsity, sequentially (sparsegpt loop).

Layer l is pruned on the inputs produced by the already-pruned layers 0..l-1. Within a layer the
attention heads are pruned first; the MLP is then pruned on the inputs that the pruned attention
gives, and takes as many channels as needed to bring the layer's removed parameters to the
requested sparsity (heads are coarse: a SmolLM2 head is 1/9 of its attention), within one channel.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from tyr import streaming
from tyr.layerwise.driver import LayerCallback, run_layers
from tyr.modeling.adapter import get_adapter
from tyr.modeling.params import layer_counts, parameter_counts
from tyr.modeling.slicing import slice_attention, slice_mlp
from tyr.pruning.local import LocalPruner
from tyr.pruning.sequential import prune_layer

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


class UniformPrune(LayerCallback):
    """The driver callback of :func:`prune_uniform`: prunes each layer in place (slicing). With
    ``in_place=False`` it prunes a copy of each layer and passes the copy's outputs on, so the model
    stays dense (:func:`uniform_widths`)."""

    def __init__(self, model, pruner: LocalPruner, sparsity: float, taylor: dict | None, on_layer=None, in_place: bool = True):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if pruner.needs_gradients and taylor is None:
            raise ValueError(f"pruner {pruner.name or type(pruner.scorer).__name__} needs Taylor statistics (gradients)")
        self.model, self.adapter, self.pruner, self.sparsity, self.taylor = model, get_adapter(model), pruner, sparsity, taylor
        self.on_layer, self.in_place = on_layer, in_place
        self.reports: list[LayerReport] = []

    def process(self, li, layer, inputs):
        adapter, sparsity = self.adapter, self.sparsity
        # a copy: left out of the model, or (streamed) kept resident in its place while the streamed layer is released
        if not self.in_place or streaming.is_streaming(self.model):
            layer = copy.deepcopy(layer)
            if self.in_place:
                adapter.layers(self.model)[li] = layer
        before = layer_counts(adapter, layer)
        k_heads = {}

        def solve_attn(prob):
            k_heads["k"] = int(round(prob.n_units * (1.0 - sparsity)))
            return self.pruner.prune(prob, [k_heads["k"]])

        def solve_mlp(prob):  # as many channels as bring the layer to the sparsity, given the pruned attention
            mlp = adapter.mlp(layer)
            per_channel = mlp.gate_proj.in_features * 2 + mlp.down_proj.out_features
            remove = mlp_channels_to_remove(before, layer_counts(adapter, layer), sparsity, per_channel, prob.n_units)
            return self.pruner.prune(prob, [prob.n_units - remove])

        @contextmanager
        def slice_attn(prob, variants):
            if k_heads["k"] < prob.n_units:
                slice_attention(adapter, layer, variants[0].keep, variants[0].out_weight, variants[0].out_bias)
            yield

        @contextmanager
        def slice_channels(prob, variants):
            if len(variants[0].keep) < prob.n_units:
                slice_mlp(adapter, layer, variants[0].keep, variants[0].out_weight, variants[0].out_bias)
            yield

        t = self.taylor[li] if self.taylor is not None else None
        (va,), (vm,), out = prune_layer(adapter, li, layer, inputs, t, solve_attn, slice_attn, solve_mlp, slice_channels)
        after = layer_counts(adapter, layer)
        rep = LayerReport(
            li,
            len(va.keep),
            before["heads"],
            len(vm.keep),
            before["channels"],
            va.rel_error,
            vm.rel_error,
            before["attention"] + before["mlp"],
            after["attention"] + after["mlp"],
            va.info,
            vm.info,
        )
        self.reports.append(rep)
        if self.on_layer is not None:
            self.on_layer(asdict(rep))
        log.debug(
            "layer %d: heads %d/%d err %.4f, channels %d/%d err %.4f",
            li,
            rep.heads_kept,
            rep.heads,
            rep.attn_error,
            rep.channels_kept,
            rep.channels,
            rep.mlp_error,
        )
        return out


def prune_uniform(
    model,
    pruner: LocalPruner,
    calib_ids: torch.Tensor,
    sparsity: float,
    taylor: dict | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_layer=None,
) -> dict:
    """Prune ``model`` in place; returns a JSON-ready report (per-layer errors, budget achieved).

    A one-level path build (:func:`tyr.supernet.path.build_path_supernet` computes the same at these
    widths) that slices the layers in place. A streamed model holds one dense layer at a time: each
    pruned layer stays resident in its place, so the result is the pruned model in memory.
    Distributed, each rank passes its block of ``calib_ids``; the input statistics are summed over
    ranks."""
    cb = UniformPrune(model, pruner, sparsity, taylor, on_layer)
    dense = parameter_counts(model)
    t0 = time.time()
    run_layers(model, cb, calib_ids, batch_size=batch_size, desc=f"prune {sparsity:.0%}: layer", progress=progress)
    pruned = parameter_counts(model)
    return {
        "target_sparsity": sparsity,
        "achieved_sparsity": 1.0 - pruned["prunable"] / dense["prunable"],
        "params_dense": dense,
        "params_pruned": pruned,
        "seconds": time.time() - t0,
        "layers": [asdict(r) for r in cb.reports],
    }


def uniform_widths(
    model, pruner: LocalPruner, calib_ids: torch.Tensor, sparsity: float, taylor: dict | None = None, batch_size: int = 8
) -> dict[str, list[int]]:
    """The kept heads and channels per layer of :func:`prune_uniform`'s model, leaving ``model`` dense:
    the same sequential pass, each layer pruned as a copy (one layer's copy in memory at a time).
    ``calib_ids`` are all the sequences; distributed, each rank takes its block (the statistics are
    summed over ranks, so every rank finds the same widths)."""
    cb = UniformPrune(model, pruner, sparsity, taylor, in_place=False)
    desc = f"uniform widths {sparsity:.0%}: layer"
    run_layers(model, cb, calib_ids, batch_size=batch_size, shard=True, desc=desc, progress=True)
    return kept_widths([asdict(r) for r in cb.reports])


def kept_widths(layers: list[dict]) -> dict[str, list[int]]:
    """The kept heads and channels per layer of a prune report's ``layers``: a grid centre's ``keep``."""
    return {"attn": [r["heads_kept"] for r in layers], "mlp": [r["channels_kept"] for r in layers]}
