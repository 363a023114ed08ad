"""Gradients of the language-model loss, one decoder layer at a time.

The forward pass keeps only each layer's *input* hidden states (checkpoints). The backward pass
walks the layers from the top: it recomputes one layer's forward from its checkpoint with autograd
on, back-propagates the incoming gradient through that layer alone, and hands the gradient of the
layer's input down. Only one layer's parameters ever hold gradients, so the same code serves models
whose full autograd graph would not fit.

Per sequence ``s`` the loss is ℓ_s = mean token cross-entropy; the reported statistics of every
prunable weight are g = mean_s ∂ℓ_s/∂W (the gradient of the mean loss) and the diagonal empirical
Fisher F = mean_s (∂ℓ_s/∂W)². Each sequence is back-propagated on its own (batch of one) so that F is
a true per-sample Fisher. Statistics are float32 whatever the model's dtype.

Layers are reached through :func:`tyr.streaming.layer` (a streamed model has one layer in memory;
the layer checkpoints may be memory-mapped). When distributed, each rank back-propagates its block
of sequences and the sums of g and g² are all-reduced before ``on_layer`` sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tyr import dist, streaming
from tyr.layerwise.driver import KeepInputs, run_layers
from tyr.modeling.adapter import get_adapter
from tyr.utils import track

log = logging.getLogger(__name__)

GradCallback = Callable[[int, dict[str, tuple[torch.Tensor, torch.Tensor]]], None]


def _sequence_loss(hidden: torch.Tensor, norm, head, targets: torch.Tensor) -> torch.Tensor:
    logits = head(norm(hidden)[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))


def layerwise_gradients(
    model, input_ids: torch.Tensor, on_layer: GradCallback, batch_size: int = 8, progress: bool = True
) -> None:
    """Call ``on_layer(l, {proj_name: (g, F)})`` for l = L-1 .. 0 with the float32 gradient mean and
    Fisher diagonal of each prunable projection weight of layer l (while layer l is loaded, so
    ``on_layer`` may read its weights)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    req = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    n = input_ids.shape[0]
    rows = dist.shard(n)
    ids = input_ids[rows.start : rows.stop]
    device = streaming.execution(model).device
    try:
        keep = KeepInputs()  # the input of every layer: the backward pass's activation checkpoints
        last = run_layers(
            model, keep, ids, batch_size=batch_size, desc="gradients: forward layer", progress=progress and dist.is_main()
        )
        checkpoints, kwargs = keep.inputs + [last], keep.kwargs
        del keep, last  # the backward walk frees each checkpoint once used
        x0 = checkpoints[0]
        # gradient of each sequence's loss w.r.t. the last layer's output
        d_out = streaming.empty_like_activations(model, x0)
        for s in range(len(ids)):
            x = checkpoints[-1][s : s + 1].to(device).detach().requires_grad_(True)
            _sequence_loss(x, norm, head, ids[s : s + 1].to(device)).backward()
            d_out[s : s + 1] = x.grad.to(d_out.device)
        checkpoints.pop()
        for li in track(range(len(layers) - 1, -1, -1), "gradients: backward layer", enabled=progress and dist.is_main()):
            with streaming.layer(model, li) as layer:
                proj = adapter.projections(layer)
                params = {name: lin.weight for name, lin in proj.items()}
                acc = {
                    name: (
                        torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                        torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                    )
                    for name, p in params.items()
                }
                for p in params.values():
                    p.requires_grad_(True)
                x_in = checkpoints.pop()
                d_in = streaming.empty_like_activations(model, x_in)
                for s in range(len(ids)):
                    x = x_in[s : s + 1].to(device).detach().requires_grad_(True)
                    y = layer(x, **kwargs[li])
                    y = y[0] if isinstance(y, tuple) else y
                    y.backward(d_out[s : s + 1].to(device))
                    for name, p in params.items():
                        g = p.grad.float()
                        acc[name][0].add_(g)
                        acc[name][1].addcmul_(g, g)
                        p.grad = None
                    d_in[s : s + 1] = x.grad.to(d_in.device)
                for p in params.values():
                    p.requires_grad_(False)
                for g_sum, g2_sum in acc.values():
                    dist.all_reduce_(g_sum)
                    dist.all_reduce_(g2_sum)
                on_layer(li, {name: (g_sum / n, g2_sum / n) for name, (g_sum, g2_sum) in acc.items()})
            d_out = d_in
    finally:
        for p in model.parameters():
            p.requires_grad_(req.get(id(p), False))
