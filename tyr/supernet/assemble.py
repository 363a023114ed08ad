"""Materialise pruned models from the dense weights and a supernet, one allocation after another."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from tyr import streaming
from tyr.modeling.adapter import get_adapter
from tyr.modeling.slicing import slice_attention, slice_mlp
from tyr.supernet.grid import KINDS
from tyr.supernet.store import SupernetError, SupernetStore


class Assembler:
    """Turns ``model`` into the pruned model of any allocation of ``store``'s grid.

    Keeps a pristine copy of every dense layer; :meth:`assemble` rebuilds only the layers whose
    levels changed since the previous call, so consecutive candidates of a search are cheap.

    A streamed model (:mod:`tyr.streaming`) keeps no copy: :meth:`assemble` only records the
    levels, and :meth:`layer` reads the dense layer from the checkpoint and slices it when a layer
    loop asks for it. Layer loops use :meth:`layer` in both cases.
    """

    def __init__(self, model, store: SupernetStore):
        self.model, self.store = model, store
        self.adapter = get_adapter(model)
        layers = self.adapter.layers(model)
        if len(layers) != store.num_layers:
            raise SupernetError(f"supernet has {store.num_layers} layers, the model {len(layers)}")
        self.streaming = streaming.is_streaming(model)
        self.dense = None if self.streaming else [copy.deepcopy(layer) for layer in layers]
        self.current: list[tuple[int | None, int | None] | None] = [None] * len(layers)  # None = dense

    def layer_for(self, li: int, attn_level: int | None, mlp_level: int | None, dense=None):
        """A pruned copy of dense layer ``li`` (default: the kept pristine copy). A level of ``None``
        leaves that module dense (single-module sensitivity studies)."""
        layer = copy.deepcopy(self.dense[li] if dense is None else dense)
        grid = self.store.grid
        for kind, level in (("attn", attn_level), ("mlp", mlp_level)):
            if level is None:
                continue
            g = grid.modules[kind][li]
            if not 0 <= level < len(g.keep):
                raise SupernetError(f"layer {li} {kind} level {level} outside 0..{len(g.keep) - 1}")
            v = self.store.variant(li, kind, level)
            if len(v.keep) == g.n_units and v.bias is None:
                continue  # the dense module
            if kind == "attn":
                slice_attention(self.adapter, layer, v.keep, v.weight, v.bias)
            else:
                slice_mlp(self.adapter, layer, v.keep, v.weight, v.bias)
        return layer

    def assemble(self, levels: dict[str, list[int | None]]) -> list[int]:
        """Make the model the pruned model of ``levels`` (``None``: that module dense); returns the
        indices of rebuilt layers."""
        if any(len(levels[k]) != len(self.current) for k in KINDS):
            raise SupernetError("allocation does not match the number of layers")
        layers = self.adapter.layers(self.model)
        changed = []
        for li in range(len(layers)):
            want = tuple(None if levels[k][li] is None else int(levels[k][li]) for k in KINDS)
            if self.current[li] != want:
                if not self.streaming:
                    layers[li] = self.layer_for(li, *want)
                self.current[li] = want
                changed.append(li)
        return changed

    @contextmanager
    def layer(self, li: int) -> Iterator:
        """Layer ``li`` of the current allocation, ready to compute (see :func:`tyr.streaming.layer`)."""
        if not self.streaming or self.current[li] is None:
            with streaming.layer(self.model, li) as layer:
                yield layer
            return
        with streaming.layer(self.model, li) as dense:
            pruned = self.layer_for(li, *self.current[li], dense=dense)
        try:
            yield pruned
        finally:
            del pruned

    def restore_dense(self) -> None:
        if self.streaming:
            self.current = [None] * len(self.current)
            return
        layers = self.adapter.layers(self.model)
        for li, layer in enumerate(self.dense):
            layers[li] = copy.deepcopy(layer)
            self.current[li] = None
