"""The pieces of the sequential layer loop (sparsegpt / gptq style); the loop itself is
:func:`tyr.layerwise.driver.run_layers`.

Catch the inputs of every decoder layer once (the embedding output for layer 0, plus the keyword
arguments each layer is called with: rotary embeddings, masks, per-layer-type variants), then run
one layer at a time over the whole calibration batch. Statistics are gathered through hooks that
:func:`hooks` always removes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tyr import dist
from tyr.modeling.adapter import DecoderAdapter, get_adapter
from tyr.streaming import empty_activations, execution

_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache", "cache_position", "output_attentions")


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``idx``: records its call and passes hidden states through."""

    def __init__(self, idx: int, store: dict, stop_after: int | None):
        super().__init__()
        self.idx, self.store, self.stop_after = idx, store, stop_after
        # Some base models read attributes of their layers (e.g. attention_type) while building masks.

    def forward(self, hidden_states, *args, **kwargs):
        self.store.setdefault("kwargs", {})[self.idx] = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        if self.idx == 0:
            self.store.setdefault("hidden", []).append(hidden_states.detach())
        if self.stop_after is not None and self.idx >= self.stop_after:
            raise _StopForward
        return hidden_states


@contextmanager
def _swapped_layers(model: nn.Module, adapter: DecoderAdapter, store: dict, stop_after: int | None):
    layers = adapter.layers(model)
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            rec = _Recorder(i, store, stop_after)
            for attr in ("attention_type", "layer_type"):
                if hasattr(layer, attr):
                    setattr(rec, attr, getattr(layer, attr))
            layers[i] = rec
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, list[dict]]:
    """Inputs of layer 0 for all sequences [N, T, H] and the keyword arguments of every layer.

    Layers are swapped for pass-through recorders, so this costs the embedding and mask set-up only
    (decoder layers are never touched: this works on a streamed model's meta skeleton). The keyword
    arguments are recorded from a batch of one sequence and broadcast over any batch; they live on
    the compute device, the hidden states in host memory (RAM or memory-mapped, see
    :func:`tyr.streaming.empty_activations`).
    """
    adapter = get_adapter(model)
    base = adapter.base_model(model)
    device = execution(model).device
    store: dict = {}
    with _swapped_layers(model, adapter, store, stop_after=None):
        base(input_ids=input_ids[:1].to(device), use_cache=False)
        kwargs = [store["kwargs"][i] for i in range(adapter.num_layers(model))]
        store.pop("hidden", None)
    out = None
    with _swapped_layers(model, adapter, store, stop_after=0):
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                base(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            h = store.pop("hidden")[0]
            if out is None:
                out = empty_activations(model, (input_ids.shape[0], *h.shape[1:]), h.dtype)
            out[i : i + h.shape[0]] = h.to(out.device)
    return out, kwargs


def run_layer(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int = 8, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Outputs of one decoder layer for every sequence of ``hidden`` [N, T, H] (no grad), written
    into ``out`` (default: a new tensor like ``hidden``). Batches move to the layer's device and
    back, so ``hidden`` and ``out`` may live in host memory or be memory-mapped."""
    out = torch.empty_like(hidden) if out is None else out
    p = next(iter(layer.parameters()), None)
    device = p.device if p is not None else hidden.device
    with torch.no_grad():
        for i in range(0, hidden.shape[0], batch_size):
            y = layer(hidden[i : i + batch_size].to(device), **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            out[i : i + batch_size] = y.to(out.device)
    return out


@contextmanager
def hooks(registrations: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Register ``(module, kind, fn)`` hooks (kind: 'forward_pre' or 'forward'); always removed."""
    handles = []
    try:
        for module, kind, fn in registrations:
            if kind == "forward_pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "forward":
                handles.append(module.register_forward_hook(fn))
            else:
                raise ValueError(f"unknown hook kind {kind!r}")
        yield
    finally:
        for h in handles:
            h.remove()


class InputStats:
    """Float32 statistics of a linear layer's input over all calibration tokens:
    H = Σ xᵀx, Σ x and the token count (means and variances follow)."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.H = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.H.addmm_(x.T, x)
        self.sum += x.sum(0)
        self.count += x.shape[0]

    def pre_hook(self):
        def fn(module, args):
            self.add(args[0])

        return fn

    def all_reduce_(self) -> InputStats:
        """Sum the statistics over all ranks (data-parallel calibration); no-op in one process."""
        if dist.world() > 1:
            dist.all_reduce_(self.H)
            dist.all_reduce_(self.sum)
            self.count = int(dist.all_reduce_sum(float(self.count)))
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.count)

    @property
    def var(self) -> torch.Tensor:
        return (torch.diagonal(self.H) / max(1, self.count) - self.mean**2).clamp_min(0)


def collect_input_stats(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, modules: dict[str, nn.Linear], batch_size: int = 8
) -> tuple[dict[str, InputStats], torch.Tensor]:
    """Run ``layer`` over ``hidden`` once, accumulating :class:`InputStats` of each named module's
    input (on the module's device, summed over ranks when distributed); returns the stats and the
    layer output (this rank's sequences)."""
    stats = {name: InputStats(m.in_features, m.weight.device) for name, m in modules.items()}
    with hooks([(m, "forward_pre", stats[name].pre_hook()) for name, m in modules.items()]):
        out = run_layer(layer, hidden, kwargs, batch_size)
    for s in stats.values():
        s.all_reduce_()
    return stats, out
