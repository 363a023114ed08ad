"""Slicing heads / channels equals masking them, including uneven GQA groups and empty blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from tyr.layerwise.engine import capture_layer_inputs, run_layer
from tyr.modeling.adapter import get_adapter
from tyr.modeling.params import layer_counts, parameter_counts
from tyr.modeling.slicing import EmptyAttention, EmptyMLP, head_layout, slice_attention, slice_mlp


def _mask(adapter, layer, keep_heads, keep_channels):
    m = copy.deepcopy(layer)
    hd = adapter.geometry(m).head_dim
    with torch.no_grad():
        for h in range(adapter.geometry(m).num_heads):
            if h not in keep_heads:
                adapter.attention(m).o_proj.weight[:, h * hd : (h + 1) * hd] = 0
        drop = torch.ones(adapter.intermediate_size(m), dtype=torch.bool)
        drop[list(keep_channels)] = False
        adapter.mlp(m).down_proj.weight[:, drop] = 0
    return m


@pytest.fixture(scope="module")
def inputs(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (3, 24))
    return capture_layer_inputs(tiny.model, ids, batch_size=2)


@pytest.mark.parametrize("keep_heads", [[0, 1, 2], [3], [1, 3], [0, 2, 3], [0, 1, 2, 3]])
def test_slice_equals_mask(tiny, inputs, keep_heads):
    a = get_adapter(tiny.model)
    x, kw = inputs
    layer = a.layers(tiny.model)[2]
    keep_ch = list(range(1, 128, 5))
    masked = _mask(a, layer, keep_heads, keep_ch)
    sliced = copy.deepcopy(layer)
    slice_attention(a, sliced, keep_heads)
    slice_mlp(a, sliced, keep_ch)
    geo = a.geometry(sliced)
    assert geo.num_heads % geo.num_kv_heads == 0  # padded to even groups
    assert sorted(h for h in sliced.self_attn.tyr_head_ids if h >= 0) == keep_heads
    assert a.intermediate_size(sliced) == len(keep_ch)
    torch.testing.assert_close(run_layer(sliced, x, kw[2]), run_layer(masked, x, kw[2]), atol=1e-5, rtol=1e-5)


def test_uneven_groups_are_padded():
    slots, kept_kv, group = head_layout((0, 0, 0, 1, 1, 1, 2, 2, 2), [0, 1, 2, 4, 8])
    assert kept_kv == [0, 1, 2] and group == 3
    assert slots == [0, 1, 2, 4, -1, -1, 8, -1, -1]


def test_empty_blocks(tiny, inputs):
    a = get_adapter(tiny.model)
    x, kw = inputs
    layer = copy.deepcopy(a.layers(tiny.model)[0])
    slice_attention(a, layer, [])
    slice_mlp(a, layer, [])
    assert isinstance(a.attention(layer), EmptyAttention) and isinstance(a.mlp(layer), EmptyMLP)
    torch.testing.assert_close(run_layer(layer, x, kw[0]), x)  # residual only
    assert layer_counts(a, layer)["attention"] == 0 and layer_counts(a, layer)["mlp"] == 0


def test_whole_model_with_different_widths_runs_and_counts(tiny):
    model = copy.deepcopy(tiny.model)
    a = get_adapter(model)
    masked = copy.deepcopy(model)
    plan = [([0, 1, 2], range(0, 128, 2)), ([3], range(100)), ([0, 1, 2, 3], range(128)), ([1, 2], range(7))]
    for i, (h, c) in enumerate(plan):
        a.layers(masked)[i] = _mask(a, a.layers(masked)[i], h, list(c))
        slice_attention(a, a.layers(model)[i], h)
        slice_mlp(a, a.layers(model)[i], list(c))
    ids = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, atol=1e-4, rtol=1e-4)
    per_head = 2 * 64 * 16
    per_kv = 2 * 64 * 16
    heads = sum(len(h) for h, _ in plan)
    kv = 2 + 1 + 2 + 2  # KV heads read by the kept heads of each layer
    channels = sum(len(list(c)) for _, c in plan)
    assert parameter_counts(model)["prunable"] == heads * per_head + kv * per_kv + channels * 3 * 64


def test_bad_keep_indices(tiny):
    a = get_adapter(tiny.model)
    layer = copy.deepcopy(a.layers(tiny.model)[0])
    with pytest.raises(ValueError):
        slice_attention(a, layer, [7])
    with pytest.raises(ValueError):
        slice_mlp(a, layer, [500])


def _with_output_biases(a, layer, seed: int):
    """A copy of ``layer`` whose o_proj and down_proj carry a (random) bias of their own."""
    lay = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(seed)
    for parent, name in ((a.attention(lay), "o_proj"), (a.mlp(lay), "down_proj")):
        old = getattr(parent, name)
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(torch.randn(old.out_features, generator=g))
        setattr(parent, name, new)
    return lay


@pytest.mark.parametrize(
    "kind,keep", [("attn", [0, 2, 3]), ("attn", [1]), ("attn", []), ("mlp", list(range(0, 128, 3))), ("mlp", [])]
)
def test_bias_compensation_adds_to_an_existing_bias(tiny, inputs, kind, keep):
    """Slicing a block whose output projection has a bias b₀, with compensation c = W₀[:, R]·mean(X_R),
    gives the dense block output minus the removed units' contribution X_R W₀[:, R]ᵀ plus c, all
    computed here from the captured activations. The pruner's compensation is that same c."""
    from tyr.layerwise.engine import InputStats
    from tyr.pruning.local import LocalPruner
    from tyr.pruning.problem import attention_problem, mlp_problem
    from tyr.pruning.scorers import Magnitude

    a = get_adapter(tiny.model)
    x, kw = inputs
    layer = _with_output_biases(a, a.layers(tiny.model)[1], seed=len(keep))
    block = (lambda lay: a.attention(lay)) if kind == "attn" else (lambda lay: a.mlp(lay))
    out_proj = a.attention(layer).o_proj if kind == "attn" else a.mlp(layer).down_proj
    width = a.geometry(layer).head_dim if kind == "attn" else 1

    def block_io(lay, proj=None):  # (input of the output projection, output of the block), one batch
        seen = {}

        def out_hook(m, i, o):  # returns None: the block's output is left as it is
            seen["y"] = o[0] if isinstance(o, tuple) else o

        def in_hook(m, args):
            seen["x"] = args[0]

        hooks = [block(lay).register_forward_hook(out_hook)]
        if proj is not None:
            hooks.append(proj.register_forward_pre_hook(in_hook))
        try:
            run_layer(lay, x, kw[1], batch_size=len(x))
        finally:
            for h in hooks:
                h.remove()
        return seen.get("x"), seen["y"]

    X, Y = block_io(layer, out_proj)
    X, Y = X.double(), Y.double()
    W0, b0 = out_proj.weight.detach().double(), out_proj.bias.detach().double()
    torch.testing.assert_close(Y, X @ W0.T + b0, rtol=1e-5, atol=1e-5)  # the hook sees what the block computes
    removed = [c for c in range(W0.shape[1]) if c // width not in keep]
    XR = X[..., removed]
    comp = XR.reshape(-1, len(removed)).mean(0) @ W0[:, removed].T
    want = Y - XR @ W0[:, removed].T + comp

    sliced = copy.deepcopy(layer)
    (slice_attention if kind == "attn" else slice_mlp)(a, sliced, keep, None, comp.float())
    _, got = block_io(sliced)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    # the pruner's compensation (FLAP-style, no refit) is c, and its variant slices to the same block
    st = InputStats(X.shape[-1])
    st.add(X.float())
    p = (attention_problem if kind == "attn" else mlp_problem)(a, layer, 1, st)
    (v,) = LocalPruner(Magnitude(), reconstruction="none", bias=True).prune(p, [len(keep)])
    keep_v = v.keep
    removed_v = [c for c in range(W0.shape[1]) if c // width not in keep_v]
    comp_v = X[..., removed_v].reshape(-1, len(removed_v)).mean(0) @ W0[:, removed_v].T
    torch.testing.assert_close(v.out_bias.double(), comp_v, rtol=1e-4, atol=1e-5)
    sliced = copy.deepcopy(layer)
    (slice_attention if kind == "attn" else slice_mlp)(a, sliced, v.keep, v.out_weight, v.out_bias)
    _, got = block_io(sliced)
    torch.testing.assert_close(got.double(), Y - X[..., removed_v] @ W0[:, removed_v].T + comp_v, rtol=1e-4, atol=1e-4)
