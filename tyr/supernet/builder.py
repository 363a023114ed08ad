"""Build the supernet layer by layer, with expectation error accumulation (Týr Eq. 5).

For layer l: gather the statistics of ``o_proj``'s input on the current inputs, prune the attention
at every level; gather ``down_proj``'s input statistics with the attention the EEA mode prescribes,
prune the MLP at every level; store the layer's variants; compute the next layer's input.

EEA modes (what layer l+1 is pruned on):
- ``none``: the dense layer's output (every layer sees dense inputs, as in EvoPress);
- ``expectation`` (default): the density-weighted expectation of the variants' outputs,
  w_e = (1 − S_e) / Σ (1 − S_e'). Only the output projection differs between variants (a removed
  unit is a zero column), so this is *one* forward with the w-weighted average of the variants'
  full-size ``o_proj`` / ``down_proj`` weights (and biases);
- ``uniform``: the same with equal weights;
- ``path``: the output along one allocation (e.g. the previous search's best).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tyr import dist, streaming
from tyr.artifacts import fault_point
from tyr.layerwise.engine import capture_layer_inputs, collect_input_stats, run_layer
from tyr.modeling.adapter import get_adapter
from tyr.pruning.local import LocalPruner
from tyr.pruning.problem import ModuleProblem, Variant, attention_problem, mlp_problem
from tyr.supernet.grid import ModuleGrid, SupernetGrid
from tyr.supernet.store import SupernetError, SupernetStore
from tyr.utils import Progress

log = logging.getLogger(__name__)

EEA_MODES = ("none", "expectation", "uniform", "path")


def eea_weights(grid: ModuleGrid, mode: str) -> list[float]:
    """Mixing weights of a module's variants (``expectation``: proportional to density)."""
    n = len(grid.keep)
    if mode == "uniform":
        return [1.0 / n] * n
    if mode == "expectation":
        dens = [k / grid.n_units if grid.n_units else 0.0 for k in grid.keep]
        tot = sum(dens)
        return [d / tot for d in dens] if tot > 0 else [1.0 / n] * n
    raise ValueError(f"no mixing weights for EEA mode {mode!r}")


def full_weight(problem: ModuleProblem, variants: list[Variant],
                weights: list[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_e w_e · (variant e's output projection at full input width, zero columns where removed)."""
    W = torch.zeros_like(problem.out_weight)
    has_bias = any(v.out_bias is not None for v in variants)
    b = torch.zeros(W.shape[0], device=W.device) if has_bias else None
    for v, w in zip(variants, weights):
        if w == 0.0:
            continue
        W[:, problem.columns(v.keep)] += w * v.out_weight.float()
        if v.out_bias is not None:
            b += w * v.out_bias.float()
    return W, b


@contextmanager
def swapped_linear(parent: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Iterator[None]:
    """Temporarily replace ``parent.<name>`` by a Linear with the given weight; ``bias`` (a
    compensation) is added to the module's own bias, which a pruned module keeps."""
    old = getattr(parent, name)
    if old.bias is not None:
        bias = old.bias.detach().float() + (0.0 if bias is None else bias.float())
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    setattr(parent, name, new)
    try:
        yield
    finally:
        setattr(parent, name, old)


def _mode_weight(problem, variants, grid: ModuleGrid, mode: str, path_level: int | None):
    if mode == "none":
        return None
    if mode == "path":
        w = [0.0] * len(variants)
        w[path_level] = 1.0
        return full_weight(problem, variants, w)
    return full_weight(problem, variants, eea_weights(grid, mode))


@contextmanager
def _maybe_swapped(parent, name, wb) -> Iterator[None]:
    if wb is None:
        yield
    else:
        with swapped_linear(parent, name, *wb):
            yield


def prune_levels(pruner: LocalPruner, problem: ModuleProblem, keep: list[int], centre: int) -> list[Variant]:
    """``pruner.prune`` with the per-level solves spread over the ranks (each rank refits its block
    of levels, then every rank receives all variants); the plain call in one process."""
    if dist.world() == 1:
        return pruner.prune(problem, keep, centre)
    mine = dist.shard(len(keep))
    part = pruner.prune(problem, keep, centre, only=mine)
    local = [(i, Variant(v.keep, v.out_weight.cpu(), None if v.out_bias is None else v.out_bias.cpu(), v.rel_error, v.info))
             for i, v in enumerate(part) if v is not None]
    out: list[Variant | None] = [None] * len(keep)
    dev = problem.out_weight.device
    for items in dist.all_gather_object(local):
        for i, v in items:
            bias = None if v.out_bias is None else v.out_bias.to(dev)
            out[i] = Variant(v.keep, v.out_weight.to(dev), bias, v.rel_error, v.info)
    return out


def build_supernet(model, pruner: LocalPruner, calib_ids: torch.Tensor, grid: SupernetGrid, store: SupernetStore,
                   eea: str = "expectation", taylor: dict | None = None, path: dict[str, list[int]] | None = None,
                   batch_size: int = 8, progress: bool = True, on_layer=None) -> dict:
    """Build (or resume) the supernet in ``store``. The model's weights are not modified.

    The model may be streamed (:mod:`tyr.streaming`: one layer in memory at a time) and the run
    distributed (:mod:`tyr.dist`): each rank holds a block of the calibration sequences, the input
    statistics are summed over ranks, the per-level solves are spread over ranks, and rank 0 writes
    the shards and manifest (each rank keeps its own activation checkpoint for resuming)."""
    if eea not in EEA_MODES:
        raise ValueError(f"eea must be one of {EEA_MODES}, got {eea!r}")
    if eea == "path" and path is None:
        raise ValueError("eea='path' needs a path allocation (levels per module)")
    if pruner.needs_gradients and taylor is None:
        raise ValueError("this pruner needs Taylor statistics (gradients)")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if grid.num_layers != len(layers):
        raise SupernetError(f"grid has {grid.num_layers} layers, model {len(layers)}")
    t0 = time.time()
    rows = dist.shard(calib_ids.shape[0])
    local_ids = calib_ids[rows.start : rows.stop]
    if len(local_ids) == 0:
        raise ValueError(f"{calib_ids.shape[0]} calibration sequences cannot be split over {dist.world()} ranks")
    ck = store.load_checkpoint(dist.rank(), dist.world())
    if ck is not None and ck[0] <= len(store.completed_layers()):
        start, x = ck
        _, kwargs = capture_layer_inputs(model, local_ids[:1], batch_size)
        log.info("resuming the supernet build at layer %d (%s)", start, store.root)
    else:
        start = 0
        x, kwargs = capture_layer_inputs(model, local_ids, batch_size)
    if dist.world() > 1 and len(set(dist.all_gather_object(start))) != 1:
        raise SupernetError("the ranks' activation checkpoints disagree on the next layer; delete "
                            f"{store.root}/activations*.safetensors to rebuild from the last common point")
    dtype = adapter.projections(layers[0])["o_proj"].weight.dtype
    bar = Progress(len(layers), f"supernet {store.root.parent.name} layer", initial=start, every=10.0,
                   enabled=progress and dist.is_main())
    seconds_before = float(store.manifest.get("build_seconds_total", 0.0))  # earlier sessions of this build
    for li in range(start, len(layers)):
        t_layer = time.time()
        t = taylor[li] if taylor is not None else {"attn": None, "mlp": None}
        g_attn, g_mlp = grid.modules["attn"][li], grid.modules["mlp"][li]
        with streaming.layer(model, li) as layer:
            attn, mlp = adapter.attention(layer), adapter.mlp(layer)
            st, _ = collect_input_stats(layer, x, kwargs[li], {"o": attn.o_proj}, batch_size)
            pa = attention_problem(adapter, layer, li, st["o"], t["attn"])
            va = prune_levels(pruner, pa, list(g_attn.keep), g_attn.centre)
            wa = _mode_weight(pa, va, g_attn, eea, path["attn"][li] if path else None)
            with _maybe_swapped(attn, "o_proj", wa):
                st, _ = collect_input_stats(layer, x, kwargs[li], {"d": mlp.down_proj}, batch_size)
                pm = mlp_problem(adapter, layer, li, st["d"], t["mlp"])
                vm = prune_levels(pruner, pm, list(g_mlp.keep), g_mlp.centre)
                wm = _mode_weight(pm, vm, g_mlp, eea, path["mlp"][li] if path else None)
                with _maybe_swapped(mlp, "down_proj", wm):
                    x_next = run_layer(layer, x, kwargs[li], batch_size, out=streaming.empty_like_activations(model, x))
            del pa, pm, wa, wm, st
        info = {"seconds": time.time() - t_layer, "attn": va[g_attn.centre].info, "mlp": vm[g_mlp.centre].info}
        if dist.is_main():
            store.manifest["build_seconds_total"] = seconds_before + time.time() - t0  # survives a kill
            store.write_layer(li, {"attn": va, "mlp": vm}, dtype, info)
        fault_point("build.layer")
        x = x_next
        store.save_checkpoint(li + 1, x, dist.rank(), dist.world())
        if on_layer is not None and dist.is_main():
            on_layer({"layer": li, "attn_errors": [v.rel_error for v in va], "mlp_errors": [v.rel_error for v in vm], **info})
        del va, vm
        bar.update()
    bar.close()
    # Every rank must have written its last activation checkpoint before rank 0 marks the build complete
    # and deletes them all; otherwise a slower rank's final checkpoint outlives the build.
    dist.barrier()
    if dist.is_main():
        store.mark_complete({"build_seconds_last_session": time.time() - t0,
                             "build_seconds_total": seconds_before + time.time() - t0})
    dist.barrier()
    store.reload()
    return store.manifest
