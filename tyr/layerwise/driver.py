"""The one sequential layer driver (the sparsegpt / gptq loop, shaped like llm-compressor's
``pipelines/sequential``): capture the inputs of layer 0, then for l = start .. L-1 run layer l over
the cached inputs in batches, let a callback process it, and feed its outputs to layer l + 1.

Every pass over the decoder layers in tyr goes through :func:`run_layers`, which owns:

- **input capture**: the embedding output and each layer's keyword arguments, recorded by
  pass-through stand-ins that a context manager always removes (:func:`capture_layer_inputs`);
- **streaming**: layer l is reached through ``layer_source(l)`` (default :func:`tyr.streaming.layer`:
  a streamed model holds one decoder layer in memory, a resident one is used as it is);
- **activation offload**: every layer's outputs are allocated by
  :func:`tyr.streaming.empty_activations` (RAM, or memory-mapped above ``activations_max_mb``);
- **distribution**: with ``shard=True`` each rank takes its block of the sequences
  (:func:`tyr.dist.shard`); statistics are summed over ranks by the callbacks' collectives;
- **resume**: with a :class:`Checkpoint`, the pass restarts from the saved inputs of the first
  unfinished layer (only the layers' keyword arguments are captured again), and the next layer's
  inputs are saved after every layer.

The users are callbacks (:class:`LayerCallback`): the gradient pass's forward, the supernet build,
the uniform prune, the OWL statistics, the teacher and the fitness.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from tyr import dist, streaming
from tyr.layerwise.engine import InputStats, capture_layer_inputs, collect_input_stats, hooks, run_layer
from tyr.modeling.adapter import get_adapter
from tyr.utils import Progress

LayerSource = Callable[[int], AbstractContextManager[nn.Module]]


@dataclass
class LayerInputs:
    """The inputs of one decoder layer for this rank's sequences: hidden states [N, T, H] (host
    RAM or memory-mapped) and the keyword arguments the layer is called with."""

    model: nn.Module
    hidden: torch.Tensor
    kwargs: dict
    batch_size: int

    def forward(self, layer: nn.Module, registrations: list | None = None) -> torch.Tensor:
        """The layer's outputs (no grad) in a new activation buffer, with the ``(module, kind, fn)``
        hooks in ``registrations`` active during the pass (see :func:`tyr.layerwise.engine.hooks`)."""
        with hooks(registrations or []):
            return run_layer(
                layer, self.hidden, self.kwargs, self.batch_size, out=streaming.empty_like_activations(self.model, self.hidden)
            )

    def input_stats(self, layer: nn.Module, modules: dict[str, nn.Linear]) -> dict[str, InputStats]:
        """Float32 input statistics of each named module over one pass of the layer (summed over ranks)."""
        return collect_input_stats(layer, self.hidden, self.kwargs, modules, self.batch_size)[0]


class LayerCallback:
    """What one pass of :func:`run_layers` does at each layer; override what you need.

    ``on_layer_start`` and ``process`` run while layer l is loaded. ``process`` returns the layer's
    outputs (or None: the driver runs the layer itself) and may change the layer in place (slicing)
    or temporarily (swapped weights). ``on_layer_end`` runs after the layer is released, before the
    driver checkpoints the next layer's inputs; ``on_layer_done`` after that checkpoint."""

    def on_layer_start(self, l: int, layer: nn.Module, inputs: LayerInputs) -> None:
        pass

    def process(self, l: int, layer: nn.Module, inputs: LayerInputs) -> torch.Tensor | None:
        return None

    def on_layer_end(self, l: int, outputs: torch.Tensor) -> None:
        pass

    def on_layer_done(self, l: int) -> None:
        pass


class Checkpoint(Protocol):
    """Where a resumable pass keeps the inputs of its next layer."""

    def load(self) -> tuple[int, torch.Tensor] | None:
        """(next layer, its inputs for this rank's sequences) or None: start from layer 0."""

    def save(self, next_layer: int, hidden: torch.Tensor) -> None: ...


def run_layers(
    model: nn.Module,
    callback: LayerCallback,
    input_ids: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    shard: bool = False,
    start: int = 0,
    hidden: torch.Tensor | None = None,
    layer_kwargs: list[dict] | None = None,
    layer_source: LayerSource | None = None,
    checkpoint: Checkpoint | None = None,
    desc: str | None = None,
    progress: bool = False,
    progress_every: float = 30.0,
) -> torch.Tensor | None:
    """Run decoder layers ``start`` .. L-1 through ``callback``; returns the last layer's outputs
    (None when this rank has no sequences).

    The inputs of layer ``start`` are ``hidden`` if given (with ``layer_kwargs``, or kwargs captured
    from the first of ``input_ids``), else captured from ``input_ids`` (this rank's block of them
    with ``shard``; layer 0). A ``checkpoint`` that holds saved inputs overrides both."""
    L = get_adapter(model).num_layers(model)
    if input_ids is not None and shard:
        rows = dist.shard(input_ids.shape[0])
        input_ids = input_ids[rows.start : rows.stop]
    ck = checkpoint.load() if checkpoint is not None else None
    if ck is not None:
        start, hidden = ck
    if hidden is None:
        if input_ids is None or len(input_ids) == 0:
            return None
        if start != 0:
            raise ValueError(f"the inputs of layer {start} are needed to start there")
        hidden, kwargs = capture_layer_inputs(model, input_ids, batch_size)
    elif layer_kwargs is None:
        if input_ids is None or len(input_ids) == 0:
            raise ValueError("input_ids (one sequence suffices) are needed to capture the layers' keyword arguments")
        _, kwargs = capture_layer_inputs(model, input_ids[:1], batch_size)
    else:
        kwargs = layer_kwargs
    source = layer_source or (lambda l: streaming.layer(model, l))
    bar = Progress(L, desc, initial=start, every=progress_every, enabled=progress) if desc else None
    x = hidden
    try:
        for l in range(start, L):
            with source(l) as layer:
                inputs = LayerInputs(model, x, kwargs[l], batch_size)
                callback.on_layer_start(l, layer, inputs)
                out = callback.process(l, layer, inputs)
                if out is None:
                    out = inputs.forward(layer)
                del inputs
            callback.on_layer_end(l, out)
            x = out
            if checkpoint is not None:
                checkpoint.save(l + 1, x)
            callback.on_layer_done(l)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return x


class KeepInputs(LayerCallback):
    """Counts the layers run and, with ``keep``, keeps their inputs (hidden states and keyword
    arguments): activation checkpoints of the gradient pass, the fitness's prefix cache."""

    def __init__(self, keep: bool = True):
        self.keep, self.count = keep, 0
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict] = []

    def on_layer_start(self, l, layer, inputs):
        self.count += 1
        if self.keep:
            self.inputs.append(inputs.hidden)
            self.kwargs.append(inputs.kwargs)


def forward_layers(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, **kw) -> torch.Tensor | None:
    """The last decoder layer's outputs (pre-norm hidden states) of ``input_ids``, layer by layer."""
    return run_layers(model, LayerCallback(), input_ids, batch_size=batch_size, **kw)
