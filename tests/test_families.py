"""Every family end to end on a tiny random model (conf/model/tiny-*.yaml): Llama, Mistral (sliding
window), Qwen2 (q/k/v bias), Qwen3 (per-head q/k norms) and Gemma-3 (sliding and full layers, q/k
norms, scaled embeddings, pre/post feed-forward norms).

- slicing: the sliced model equals the dense model with the removed heads' o_proj columns and the
  removed channels' down_proj columns zeroed (an independent oracle: no slicing code involved);
- export: the exported architecture reproduces the sliced model, through the KV cache too;
- the pipeline recipe (prune, build, search, re-prune, export, reload in a fresh process, generate)
  for each family in float32, and for Llama and Gemma-3 in bfloat16.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from test_export import _greedy, _stepwise_logits
from test_recipes import run_recipe

from tyr.export import pruned_config, to_export_model
from tyr.modeling.adapter import get_adapter
from tyr.modeling.slicing import slice_attention, slice_mlp

from conftest import TINY_DATA

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]
EXPORTED = {
    "tiny-llama": "TyrLlamaForCausalLM",
    "tiny-mistral": "TyrMistralForCausalLM",
    "tiny-qwen2": "TyrQwen2ForCausalLM",
    "tiny-qwen3": "TyrQwen3ForCausalLM",
    "tiny-gemma3": "TyrGemma3ForCausalLM",
}
# per layer: kept query heads (of 4, KV head = head // 2), kept MLP channels (of 128)
PLANS = {
    "uneven": [([0, 1, 2], range(0, 128, 2)), ([3], range(100)), ([0, 1, 2, 3], []), ([], range(7))],
    "layer0_without_attention": [([], range(50)), ([1, 2], range(128)), ([0], range(9)), ([0, 3], range(3))],
    # only layer 2 has attention: in tiny-gemma3 the full layer, every sliding layer without a cache entry
    "one_layer_attends": [([], range(50)), ([], range(128)), ([0, 1], range(9)), ([], range(3))],
}


@functools.cache
def _family(name: str, dtype: str = "float32"):
    """The tiny model with its norm weights perturbed (random init leaves them at one: a norm applied to
    the wrong channels would go unnoticed)."""
    from hydra.utils import instantiate

    from tyr.models import load_model

    from conftest import compose

    cfg = compose("evaluate", [f"model={name}", f"model.dtype={dtype}"])
    lm = load_model(cfg.model.name, instantiate(cfg.model.source), dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return lm


def _sliced_and_masked(model, plan):
    a = get_adapter(model)
    sliced, masked = copy.deepcopy(model), copy.deepcopy(model)
    for i, (heads, channels) in enumerate(plan):
        slice_attention(a, a.layers(sliced)[i], heads)
        slice_mlp(a, a.layers(sliced)[i], list(channels))
        attn, mlp = a.attention(a.layers(masked)[i]), a.mlp(a.layers(masked)[i])
        hd = a.geometry(a.layers(masked)[i]).head_dim
        with torch.no_grad():
            for h in set(range(4)) - set(heads):
                attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
            mlp.down_proj.weight[:, sorted(set(range(128)) - set(channels))] = 0
    return sliced, masked


def _ids(n=40):
    return torch.randint(0, 49152, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", FAMILIES)
def test_sliced_equals_masked_dense(name, plan):
    model = _family(name).model
    sliced, masked = _sliced_and_masked(model, PLANS[plan])
    ids = _ids()
    with torch.no_grad():
        dense, got, want = model(ids).logits, sliced(ids).logits, masked(ids).logits
    assert want.abs().max() > 0.5 and (dense - want).abs().max() > 0.1  # logits of order 1; the masks matter
    assert (got - want).abs().max() <= 1e-4
    # q_norm / k_norm (Qwen3, Gemma-3) act on head_dim channels and are shared by the kept heads
    for layer in get_adapter(sliced).layers(sliced):
        for norm in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, norm):
                assert getattr(layer.self_attn, norm).weight.shape == (16,)


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", FAMILIES)
def test_exported_architecture_reproduces_the_sliced_model(name, plan):
    sliced, _ = _sliced_and_masked(_family(name).model, PLANS[plan])
    ex = to_export_model(sliced)
    assert type(ex).__name__ == EXPORTED[name]
    ids = _ids()
    with torch.no_grad():
        ref = sliced(ids).logits
        assert (ex(ids).logits - ref).abs().max() <= 1e-4
    assert (_stepwise_logits(ex, ids, 17) - ref).abs().max() <= 1e-4  # prefill past the 16-token window, then step
    assert torch.equal(_greedy(ex, ids, True), _greedy(ex, ids, False))


def test_gemma3_window_matters_and_is_exported():
    """At the test length (40 tokens) the 16-token window changes the logits, and the export keeps the
    layer types, window, query scalar and embedding scale of the family's config."""
    model = _family("tiny-gemma3").model
    full = copy.deepcopy(model)
    full.config.sliding_window = 4096
    for layer in full.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = 4096
    ids = _ids()
    with torch.no_grad():
        assert (model(ids).logits - full(ids).logits).abs().max() > 1e-2
    cfg = pruned_config(model)
    assert cfg.model_type == "tyr_gemma3_text" and cfg.sliding_window == 16 and cfg.query_pre_attn_scalar == 16
    assert cfg.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    ex = to_export_model(model)
    assert float(ex.model.embed_tokens.embed_scale) == pytest.approx(8.0)  # sqrt(hidden_size)


PIPELINE_ARGS = [
    "eval=smoke",
    "eval.tasks=[]",
    "eval.ppl_windows=1",
    "compare=[dense]",
    *TINY_DATA,
    "search.min_channels=8",
    "search.generations=2",
    "search.offspring=4",
    "search.stages=[[64,2],[256,1]]",
    "search.surrogate_check=6",
    "recover=none",
]


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("tiny-mistral", "float32"),
        ("tiny-qwen2", "float32"),
        ("tiny-qwen3", "float32"),
        ("tiny-gemma3", "float32"),
        ("tiny-llama", "bfloat16"),
        ("tiny-gemma3", "bfloat16"),
    ],
)
def test_pipeline_family(name, dtype, tmp_path):
    """prune → build → search → re-prune → export → reload in a fresh process → generate.
    (tiny-llama in float32: tests/test_recipes.py::test_pipeline_recipe_tiny_end_to_end.)

    Tolerances of the fresh-process check (tyr.export.verify_export): logits of the reloaded folder
    within 1e-4 of the in-memory pruned model in both dtypes (the same kernels run: measured 0);
    logits through the KV cache within max(1e-3, 1e-4 max|logits|) of the full forward in float32 and
    0.05 max|logits| in bfloat16 (rounding; measured ~2e-2 on logits of order 1); greedy generation
    with the cache equal to without it (checked here in both dtypes)."""
    gguf = name == "tiny-mistral"  # the pipeline's GGUF export (tests/test_gguf.py has the rest)
    formats = ["export_formats=[hf,gguf]", "gguf_dtype=q8_0"] if gguf else []
    p = run_recipe(
        "tyr.recipes.pipeline", f"model={name}", f"model.dtype={dtype}", *PIPELINE_ARGS, *formats, f"paths.output_dir={tmp_path}"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "pipeline" / name / "hywia_comp-s0.5-medium"
    if gguf:
        from test_gguf import DTYPE_BOUND, reference, rel_error, run_llama
        from transformers import AutoModelForCausalLM

        assert json.loads((run / "results.json").read_text())["exported"]["searched (gguf)"] == str(run / "gguf" / "model.gguf")
        assert json.loads((run / "gguf" / "model.gguf.json").read_text())["dtype"] == "q8_0"
        folder = AutoModelForCausalLM.from_pretrained(run / "hf_model", trust_remote_code=True).eval()
        ids = _ids(16)[0].tolist()  # within the 16-token window, which llama.cpp's deci does not apply
        assert rel_error(run_llama(run / "gguf" / "model.gguf", ids), reference(folder, ids)) <= DTYPE_BOUND["q8_0"]
    alloc = json.loads((run / "allocation.json").read_text())
    assert abs(alloc["budget"]["sparsity"] - 0.5) < 0.02  # real parameters (search.budget=real)
    assert alloc["source"] == "reprune" and "reprune" in json.loads((run / "search_state.json").read_text())
    v = json.loads((run / "export.json").read_text())["verify"]
    assert v["model_class"] == EXPORTED[name] and not v["tyr_imported"] and v["config_widths_match"]
    assert v["max_abs_logit_diff"] <= 1e-4
    assert v["max_abs_cache_logit_diff"] <= (1e-4 if dtype == "float32" else v["cache_atol"])  # measured: 5e-6 / 2.3e-2
    assert dtype == "float32" or v["cache_atol"] <= 0.3
    assert v["generate_cache_equals_no_cache"] and v["generated_tokens"] == 8
    cfg = json.loads((run / "hf_model" / "config.json").read_text())
    assert cfg["dtype"] == dtype and cfg["model_type"] == get_adapter(cfg["pruned_from_model_type"]).export_type
    assert sum(cfg["layer_num_heads"]) < 16 or sum(cfg["layer_intermediate_size"]) < 4 * 128  # something was pruned


def test_prune_recipe_exports_a_checked_folder(tmp_path):
    """The uniform prune recipe with export=true writes hf_model/ and checks it in a fresh process."""
    p = run_recipe(
        "tyr.recipes.prune",
        "model=tiny-qwen3",
        "eval=smoke",
        "eval.tasks=[]",
        "eval.ppl_windows=1",
        "pruner=magnitude",
        "target_sparsity=0.5",
        "export=true",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=64",
        f"hydra.run.dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    v = json.loads((tmp_path / "export.json").read_text())["verify"]
    assert v["model_class"] == "TyrQwen3ForCausalLM" and v["max_abs_logit_diff"] <= 1e-4
    assert v["max_abs_cache_logit_diff"] <= 1e-4 and v["generate_cache_equals_no_cache"]
    rec = json.loads((tmp_path / "hf_model" / "tyr_allocation.json").read_text())
    res = json.loads((tmp_path / "results.json").read_text())
    assert rec["allocation"]["recipe"] == "prune" and rec["parameters"]["total"] == res["params"]["total"]
    assert abs(rec["allocation"]["achieved_sparsity"] - 0.5) < 0.01


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-qwen2", "tiny-qwen3"])
def test_bf16_export_reloads_and_generates(name, tmp_path):
    """The families whose pipeline runs above in float32 only: a bf16 pruned model (uneven plan, layer
    without attention, empty MLP) exported, reloaded in a fresh process in bf16 and generating. Tolerances
    as in test_pipeline_family: reloaded logits within 1e-4 of the in-memory model, the KV cache path
    within 0.05 max|logits|, greedy generation with the cache equal to without."""
    from tyr.export import export_model, verify_export

    lm = _family(name, "bfloat16")  # built in bf16 as a user loads it (rotary frequencies stay float32)
    sliced, _ = _sliced_and_masked(lm.model, PLANS["uneven"])
    out = export_model(sliced, lm.tokenizer, tmp_path / "m")
    v = verify_export(out, sliced, _ids(32), strict_generation=True)
    assert v["max_abs_logit_diff"] <= 1e-4 and v["max_abs_cache_logit_diff"] <= v["cache_atol"] <= 0.3
    assert v["generate_cache_equals_no_cache"] and v["model_class"] == EXPORTED[name]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_untested_transformers_failure_is_one_line(monkeypatch):
    """A failure inside the exported family code under a transformers outside the tested range becomes
    one line naming the range and what to install; inside the range the error is left as it is."""
    import tyr.modeling.hf_pruned.configuration_tyr_llama as tyr_config

    ex = to_export_model(_family("tiny-qwen3").model)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ex(input_ids=None)
    monkeypatch.setattr(tyr_config, "TESTED_TRANSFORMERS", ("5.0.0", "5.1.0"))  # the installed one is now untested
    with pytest.raises(tyr_config.TyrTransformersVersionError) as e:
        ex(input_ids=None)
    assert "\n" not in str(e.value) and "pip install 'transformers>=5.0.0,<=5.1.0'" in str(e.value)
