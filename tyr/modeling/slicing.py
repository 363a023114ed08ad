"""Physically remove attention query heads and MLP channels from a decoder layer.

Coupled structures (DESIGN.md section 1):
- a query head ``h`` is rows ``h*hd:(h+1)*hd`` of ``q_proj`` and the same columns of ``o_proj``;
  a KV head is dropped once no kept query head reads it;
- an MLP channel ``c`` is row ``c`` of ``gate_proj`` and ``up_proj`` and column ``c`` of ``down_proj``.

Uneven GQA groups (e.g. KV head 0 keeps 3 query heads, KV head 1 keeps 1) are made even by padding
each group with zero query heads (zero ``q_proj`` rows, zero ``o_proj`` columns): a zero head's
output is multiplied by zero columns, so the layer is exact, and attention stays on the fast
even-group GQA path of the stock attention module. ``attn.tyr_head_ids`` records, per head slot,
the original head index or -1 for padding. A block pruned to nothing is replaced by an
:class:`EmptyAttention` / :class:`EmptyMLP` that returns zeros (plus a bias if one was fitted).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tyr.modeling.adapter import DecoderAdapter


class EmptyAttention(nn.Module):
    """An attention block with every head removed: contributes only an optional constant bias."""

    def __init__(self, hidden_size: int, bias: torch.Tensor | None = None, dtype=torch.float32):
        super().__init__()
        self.hidden_size = hidden_size
        self.bias = nn.Parameter(bias.to(dtype).clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias
        return out, None


class EmptyMLP(nn.Module):
    """An MLP block with every channel removed."""

    def __init__(self, hidden_size: int, bias: torch.Tensor | None = None, dtype=torch.float32):
        super().__init__()
        self.hidden_size = hidden_size
        self.bias = nn.Parameter(bias.to(dtype).clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        return out + self.bias if self.bias is not None else out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias.to(weight.dtype))
    return lin


def _bias_or_none(lin: nn.Linear, rows=None):
    if lin.bias is None:
        return None
    return lin.bias.detach() if rows is None else lin.bias.detach()[rows]


def _output_bias(lin: nn.Linear, extra: torch.Tensor | None) -> torch.Tensor | None:
    """The output projection's bias after slicing: its own bias (kept: it does not depend on the
    removed units) plus the compensation ``extra``, when there is one."""
    own = _bias_or_none(lin)
    if extra is None:
        return own
    extra = extra.to(lin.weight.device, torch.float32)
    return extra if own is None else own.float() + extra


def head_layout(kv_of_head: Sequence[int], keep: Sequence[int]) -> tuple[list[int], list[int], int]:
    """Order kept query heads by KV group and pad groups to equal size.

    Returns ``(slots, kept_kv, group)``: ``slots`` lists, per new head slot, the original query head
    index or -1 for a zero padding head; ``kept_kv`` the original KV heads kept (new KV index = position);
    ``group`` the (even) number of query slots per kept KV head.
    """
    keep = sorted(set(int(h) for h in keep))
    kept_kv = sorted({int(kv_of_head[h]) for h in keep})
    groups = [[h for h in keep if kv_of_head[h] == kv] for kv in kept_kv]
    group = max((len(g) for g in groups), default=0)
    slots = [h for g in groups for h in g + [-1] * (group - len(g))]
    return slots, kept_kv, group


def slice_attention(
    adapter: DecoderAdapter,
    layer: nn.Module,
    keep_heads: Sequence[int],
    o_weight: torch.Tensor | None = None,
    o_bias: torch.Tensor | None = None,
) -> None:
    """Keep only ``keep_heads`` (indices into the layer's current heads) in place.

    ``o_weight`` optionally replaces the kept ``o_proj`` columns: shape [hidden, len(keep)*head_dim],
    columns ordered by ascending kept head index (a least-squares refit). ``o_bias`` is added to
    ``o_proj``'s bias (bias compensation; an existing bias is kept and the compensation added to it).
    """
    attn = adapter.attention(layer)
    if isinstance(attn, EmptyAttention):
        raise ValueError("this layer's attention was already pruned to nothing")
    geo = adapter.geometry(layer)
    hd = geo.head_dim
    old_ids = getattr(attn, "tyr_head_ids", tuple(range(geo.num_heads)))
    keep = sorted(set(int(h) for h in keep_heads))
    if any(h < 0 or h >= geo.num_heads or old_ids[h] < 0 for h in keep):
        raise ValueError(f"keep_heads {keep} out of range for {geo.num_heads} heads (or names a padding head)")
    if o_weight is not None and o_weight.shape[1] != len(keep) * hd:
        raise ValueError(f"o_weight has {o_weight.shape[1]} columns, expected {len(keep) * hd}")
    hidden = attn.o_proj.out_features
    dtype = attn.o_proj.weight.dtype
    bias = _output_bias(attn.o_proj, o_bias)
    if not keep:
        setattr(layer, adapter.attn_attr, EmptyAttention(hidden, bias, dtype))
        return
    slots, kept_kv, group = head_layout(geo.kv_of_head, keep)

    def rows(heads: Sequence[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

    q_w, dev = attn.q_proj.weight.detach(), attn.q_proj.weight.device
    new_q = torch.zeros(len(slots) * hd, q_w.shape[1], dtype=q_w.dtype, device=dev)
    new_o = torch.zeros(hidden, len(slots) * hd, dtype=dtype, device=dev)
    o_src = attn.o_proj.weight.detach() if o_weight is None else o_weight.to(dtype)
    pos_in_keep = {h: i for i, h in enumerate(keep)}
    q_b = None if attn.q_proj.bias is None else torch.zeros(len(slots) * hd, dtype=q_w.dtype, device=dev)
    for s, h in enumerate(slots):
        if h < 0:
            continue
        new_q[s * hd : (s + 1) * hd] = q_w[h * hd : (h + 1) * hd]
        src = h if o_weight is None else pos_in_keep[h]
        new_o[:, s * hd : (s + 1) * hd] = o_src[:, src * hd : (src + 1) * hd]
        if q_b is not None:
            q_b[s * hd : (s + 1) * hd] = attn.q_proj.bias.detach()[h * hd : (h + 1) * hd]
    kv_rows = rows(kept_kv)
    attn.q_proj = _linear(new_q, q_b)
    attn.k_proj = _linear(attn.k_proj.weight.detach()[kv_rows], _bias_or_none(attn.k_proj, kv_rows))
    attn.v_proj = _linear(attn.v_proj.weight.detach()[kv_rows], _bias_or_none(attn.v_proj, kv_rows))
    attn.o_proj = _linear(new_o, bias)
    kv_index = {kv: j for j, kv in enumerate(kept_kv)}
    kv_of_slot = [j for j in range(len(kept_kv)) for _ in range(group)]
    assert all(h < 0 or kv_index[geo.kv_of_head[h]] == kv_of_slot[s] for s, h in enumerate(slots))
    adapter.set_attention_groups(layer, group, tuple(kv_of_slot))
    attn.tyr_head_ids = tuple(old_ids[h] if h >= 0 else -1 for h in slots)


def slice_mlp(
    adapter: DecoderAdapter,
    layer: nn.Module,
    keep_channels: Sequence[int],
    down_weight: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> None:
    """Keep only ``keep_channels`` of the MLP in place (``down_weight``: refit kept columns;
    ``down_bias`` is added to ``down_proj``'s bias, as ``o_bias`` in :func:`slice_attention`)."""
    mlp = adapter.mlp(layer)
    if isinstance(mlp, EmptyMLP):
        raise ValueError("this layer's MLP was already pruned to nothing")
    keep = torch.as_tensor(sorted(set(int(c) for c in keep_channels)), dtype=torch.long)
    n = mlp.gate_proj.out_features
    if len(keep) and (keep[0] < 0 or keep[-1] >= n):
        raise ValueError(f"keep_channels out of range for {n} channels")
    if down_weight is not None and down_weight.shape[1] != len(keep):
        raise ValueError(f"down_weight has {down_weight.shape[1]} columns, expected {len(keep)}")
    hidden = mlp.down_proj.out_features
    dtype = mlp.down_proj.weight.dtype
    bias = _output_bias(mlp.down_proj, down_bias)
    if len(keep) == 0:
        setattr(layer, adapter.mlp_attr, EmptyMLP(hidden, bias, dtype))
        return
    mlp.gate_proj = _linear(mlp.gate_proj.weight.detach()[keep], _bias_or_none(mlp.gate_proj, keep))
    mlp.up_proj = _linear(mlp.up_proj.weight.detach()[keep], _bias_or_none(mlp.up_proj, keep))
    w = mlp.down_proj.weight.detach()[:, keep] if down_weight is None else down_weight.to(mlp.down_proj.weight.device, dtype)
    mlp.down_proj = _linear(w, bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)
