"""The family adapter on tiny-llama, tiny random Mistral / Qwen2 / Qwen3 / Gemma-3, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tyr.modeling.adapter import UnsupportedArchitectureError, get_adapter, supported_model_types
from tyr.modeling.params import parameter_counts


def _expected_prunable(h, inter, nh, nkv, hd, layers, bias=False):
    attn = 2 * h * nh * hd + 2 * h * nkv * hd + (bias * (nh + 2 * nkv) * hd)
    return layers * (attn + 3 * h * inter)


def test_tiny_llama_structure(tiny):
    m = tiny.model
    a = get_adapter(m)
    assert a.family == "llama" and a.num_layers(m) == 4
    layer = a.layers(m)[0]
    g = a.geometry(layer)
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.group_size) == (4, 2, 16, 2)
    assert g.kv_of_head == (0, 0, 1, 1)
    p = a.projections(layer)
    assert p["q_proj"].weight.shape == (64, 64) and p["k_proj"].weight.shape == (32, 64)
    assert p["o_proj"].weight.shape == (64, 64) and p["down_proj"].weight.shape == (64, 128)
    assert a.intermediate_size(layer) == 128
    c = parameter_counts(m)
    assert c["prunable"] == _expected_prunable(64, 128, 4, 2, 16, 4)
    assert c["total"] == c["prunable"] + 49152 * 64 + (2 * 4 + 1) * 64  # tied embedding + norms


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("mistral", {"sliding_window": None}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("gemma3_text", {"sliding_window": 16, "query_pre_attn_scalar": 16}),
    ],
)
def test_other_families(model_type, extra):
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        **extra,
    )
    m = AutoModelForCausalLM.from_config(cfg)
    a = get_adapter(m)
    layer = a.layers(m)[1]
    assert a.geometry(layer).num_heads == 4 and a.geometry(layer).num_kv_heads == 2
    assert a.intermediate_size(layer) == 96
    bias = model_type == "qwen2"
    assert parameter_counts(m)["prunable"] == _expected_prunable(64, 96, 4, 2, 16, 2, bias)
    x = torch.randint(0, 128, (1, 8))
    h = a.base_model(m)(input_ids=x).last_hidden_state
    assert torch.allclose(a.lm_head(m)(h), m(x).logits, atol=1e-5)


def test_unsupported_architecture_lists_supported():
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(cfg)
    for t in supported_model_types():
        assert t in str(e.value)
    assert "gpt2" in str(e.value)


@pytest.mark.real_model
def test_real_smollm2_structure(smollm2):
    m = smollm2.model
    a = get_adapter(m)
    assert a.num_layers(m) == 30
    g = a.geometry(a.layers(m)[0])
    assert (g.num_heads, g.num_kv_heads, g.head_dim) == (9, 3, 64)
    assert g.kv_of_head == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    c = parameter_counts(m)
    assert c["total"] == 134_515_008
    assert c["prunable"] == _expected_prunable(576, 1536, 9, 3, 64, 30)
    assert smollm2.revision.startswith("gguf-sha256:")


def test_layer_loop_reproduces_gemma3_with_sliding_window_layers():
    from tyr.layerwise.engine import capture_layer_inputs, run_layer

    cfg = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    a = get_adapter(m)
    ids = torch.randint(0, 128, (3, 40))  # longer than the window: sliding and full masks differ
    x, kw = capture_layer_inputs(m, ids, batch_size=2)
    for i, layer in enumerate(a.layers(m)):
        x = run_layer(layer, x, kw[i], batch_size=2)
    with torch.no_grad():
        ref = a.base_model(m)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a.final_norm(m)(x), ref, atol=1e-5, rtol=1e-5)
