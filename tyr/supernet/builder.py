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

from tyr import dist
from tyr.artifacts import fault_point
from tyr.layerwise.driver import LayerCallback, run_layers
from tyr.modeling.adapter import get_adapter
from tyr.pruning.local import LocalPruner
from tyr.pruning.problem import ModuleProblem, Variant
from tyr.pruning.sequential import prune_layer
from tyr.supernet.grid import ModuleGrid, SupernetGrid
from tyr.supernet.store import SupernetError, SupernetStore

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


def full_weight(
    problem: ModuleProblem, variants: list[Variant], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    local = [
        (i, Variant(v.keep, v.out_weight.cpu(), None if v.out_bias is None else v.out_bias.cpu(), v.rel_error, v.info))
        for i, v in enumerate(part)
        if v is not None
    ]
    out: list[Variant | None] = [None] * len(keep)
    dev = problem.out_weight.device
    for items in dist.all_gather_object(local):
        for i, v in items:
            bias = None if v.out_bias is None else v.out_bias.to(dev)
            out[i] = Variant(v.keep, v.out_weight.to(dev), bias, v.rel_error, v.info)
    return out


class _StoreCheckpoint:
    """The driver's resume point: this rank's activation checkpoint in the store, used only if the
    layers before it are all stored, and the same next layer on every rank."""

    def __init__(self, store: SupernetStore):
        self.store = store

    def load(self):
        ck = self.store.load_checkpoint(dist.rank(), dist.world())
        if ck is not None and ck[0] > len(self.store.completed_layers()):
            ck = None
        if ck is not None:
            log.info("resuming the supernet build at layer %d (%s)", ck[0], self.store.root)
        if dist.world() > 1 and len(set(dist.all_gather_object(0 if ck is None else ck[0]))) != 1:
            raise SupernetError(
                "the ranks' activation checkpoints disagree on the next layer; delete "
                f"{self.store.root}/activations*.safetensors to rebuild from the last common point"
            )
        return ck

    def save(self, next_layer: int, hidden: torch.Tensor) -> None:
        self.store.save_checkpoint(next_layer, hidden, dist.rank(), dist.world())


class SupernetBuild(LayerCallback):
    """The driver callback of :func:`build_supernet`: every level of both modules of a layer, the
    next layer's inputs under the EEA mode, the layer's shard written by rank 0."""

    def __init__(
        self,
        model,
        pruner: LocalPruner,
        grid: SupernetGrid,
        store: SupernetStore,
        eea: str,
        taylor: dict | None,
        path: dict[str, list[int]] | None,
        on_layer=None,
    ):
        self.adapter, self.pruner, self.grid, self.store = get_adapter(model), pruner, grid, store
        self.eea, self.taylor, self.path, self.on_layer = eea, taylor, path, on_layer
        self.dtype = None
        self.t0 = time.time()
        self.seconds_before = float(store.manifest.get("build_seconds_total", 0.0))  # earlier sessions of this build

    def process(self, li, layer, inputs):
        self.t_layer = time.time()
        g = {k: self.grid.modules[k][li] for k in ("attn", "mlp")}
        attn, mlp = self.adapter.attention(layer), self.adapter.mlp(layer)
        if self.dtype is None:
            self.dtype = attn.o_proj.weight.dtype

        def solve(kind):
            return lambda prob: prune_levels(self.pruner, prob, list(g[kind].keep), g[kind].centre)

        def swap(kind, parent, name):
            level = self.path[kind][li] if self.path else None
            return lambda prob, variants: _maybe_swapped(parent, name, _mode_weight(prob, variants, g[kind], self.eea, level))

        t = self.taylor[li] if self.taylor is not None else None
        self.va, self.vm, out = prune_layer(
            self.adapter,
            li,
            layer,
            inputs,
            t,
            solve("attn"),
            swap("attn", attn, "o_proj"),
            solve("mlp"),
            swap("mlp", mlp, "down_proj"),
        )
        return out

    def on_layer_end(self, li, outputs):
        va, vm = self.va, self.vm
        self.info = {
            "seconds": time.time() - self.t_layer,
            "attn": va[self.grid.modules["attn"][li].centre].info,
            "mlp": vm[self.grid.modules["mlp"][li].centre].info,
        }
        if dist.is_main():
            self.store.manifest["build_seconds_total"] = self.seconds_before + time.time() - self.t0  # survives a kill
            self.store.write_layer(li, {"attn": va, "mlp": vm}, self.dtype, self.info)
        fault_point("build.layer")

    def on_layer_done(self, li):
        if self.on_layer is not None and dist.is_main():
            self.on_layer(
                {
                    "layer": li,
                    "attn_errors": [v.rel_error for v in self.va],
                    "mlp_errors": [v.rel_error for v in self.vm],
                    **self.info,
                }
            )
        del self.va, self.vm


def build_supernet(
    model,
    pruner: LocalPruner,
    calib_ids: torch.Tensor,
    grid: SupernetGrid,
    store: SupernetStore,
    eea: str = "expectation",
    taylor: dict | None = None,
    path: dict[str, list[int]] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_layer=None,
) -> dict:
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
    if grid.num_layers != adapter.num_layers(model):
        raise SupernetError(f"grid has {grid.num_layers} layers, model {adapter.num_layers(model)}")
    t0 = time.time()
    if len(dist.shard(calib_ids.shape[0])) == 0:
        raise ValueError(f"{calib_ids.shape[0]} calibration sequences cannot be split over {dist.world()} ranks")
    cb = SupernetBuild(model, pruner, grid, store, eea, taylor, path, on_layer)
    run_layers(
        model,
        cb,
        calib_ids,
        batch_size=batch_size,
        shard=True,
        checkpoint=_StoreCheckpoint(store),
        desc=f"supernet {store.root.parent.name} layer",
        progress=progress and dist.is_main(),
        progress_every=10.0,
    )
    # Every rank must have written its last activation checkpoint before rank 0 marks the build complete
    # and deletes them all; otherwise a slower rank's final checkpoint outlives the build.
    dist.barrier()
    if dist.is_main():
        store.mark_complete(
            {"build_seconds_last_session": time.time() - t0, "build_seconds_total": cb.seconds_before + time.time() - t0}
        )
    dist.barrier()
    store.reload()
    return store.manifest
