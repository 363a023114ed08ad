"""Export of pruned models as loadable Hugging Face folders (tyr_llama, per-layer widths)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from tyr.export import (
    ALLOCATION_FILE,
    ExportError,
    ExportVerificationError,
    export_model,
    index_layout_from_padded,
    pruned_config,
    to_export_model,
    verify_export,
)
from tyr.modeling.adapter import get_adapter
from tyr.modeling.hf_pruned.modeling_tyr_llama import CACHE_KWARG
from tyr.modeling.params import layer_counts, parameter_counts
from tyr.modeling.slicing import slice_attention, slice_mlp

# layer: (kept heads, kept MLP channels, bias on o_proj / down_proj)
PLAN = [
    ([0, 1, 2], range(0, 128, 2), False),  # uneven GQA: KV 0 keeps 2 heads, KV 1 keeps 1 (padded)
    ([3], range(100), True),  # one head, bias compensation on o_proj and down_proj
    ([0, 1, 2, 3], [], False),  # all heads, MLP pruned to nothing
    ([], range(7), True),  # attention pruned to nothing (an empty block with a bias)
]
PLAN_L0 = [([], range(50), False), ([1, 2], range(128), False), ([0], range(9), False), ([0, 1, 2, 3], range(3), False)]


def _prune(model, plan):
    a = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    for i, (heads, channels, bias) in enumerate(plan):
        layer = a.layers(model)[i]
        o_bias = 0.05 * torch.randn(64, generator=g) if bias else None
        d_bias = 0.05 * torch.randn(64, generator=g) if bias else None
        slice_attention(a, layer, heads, o_bias=o_bias)
        slice_mlp(a, layer, list(channels), down_bias=d_bias)
    return model


def _stepwise_logits(model, ids, split):
    """Prefill ``ids[:, :split]`` then feed one token at a time through the KV cache (no position ids)."""
    with torch.no_grad():
        out = model(ids[:, :split], use_cache=True)
        pkv, steps = out[CACHE_KWARG], [out.logits]
        for t in range(split, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: pkv}).logits)
    return torch.cat(steps, dim=1)


def _greedy(model, ids, use_cache, n=6):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pruned(tiny):
    return _prune(copy.deepcopy(tiny.model), PLAN)


@pytest.fixture(scope="module")
def pruned_l0(tiny):
    return _prune(copy.deepcopy(tiny.model), PLAN_L0)


@pytest.fixture(scope="module")
def folder(pruned, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-pruned"
    export_model(
        pruned,
        tiny.tokenizer,
        out,
        allocation={"budget": 0.5, "note": "test"},
        max_shard_size="4MB",
        extra_files={"README.md": "# pruned tiny\n"},
    )
    return out


def test_in_process_round_trip(pruned, ids):
    ex = to_export_model(pruned)
    with torch.no_grad():
        ref = pruned(ids).logits
        assert (ex(ids).logits - ref).abs().max() <= 1e-4
    assert (_stepwise_logits(ex, ids, 5) - ref).abs().max() <= 1e-4
    assert torch.equal(_greedy(ex, ids, True), _greedy(ex, ids, False))
    # a copy: changing the export does not touch the in-memory model
    with torch.no_grad():
        ex.model.layers[0].self_attn.q_proj.weight.add_(1.0)
        assert torch.equal(pruned(ids).logits, ref)


def test_config_widths(pruned, folder):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert cfg.model_type == "tyr_llama"
    assert cfg.layer_num_heads == [4, 1, 4, 0]  # layer 0: 3 real heads + 1 zero padding head
    assert cfg.layer_num_kv_heads == [2, 1, 2, 0]
    assert cfg.layer_intermediate_size == [64, 100, 0, 7]
    assert cfg.layer_o_bias == [False, True, False, True]
    assert cfg.layer_down_bias == [False, True, False, True]
    assert cfg.layer_head_ids == [[0, 1, 2, -1], [3], [0, 1, 2, 3], []]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)  # dense values
    assert pruned_config(pruned).layer_num_heads == cfg.layer_num_heads


def test_folder_contents(folder):
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "configuration_tyr_llama.py",
        "modeling_tyr_llama.py",
        "generation_config.json",
        "model.safetensors.index.json",
        ALLOCATION_FILE,
        "tokenizer.json",
        "README.md",
    } <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_tyr_llama.TyrLlamaConfig",
        "AutoModelForCausalLM": "modeling_tyr_llama.TyrLlamaForCausalLM",
    }
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= names
    # plain Llama tensor names; biases only where they were fitted
    assert "model.layers.1.self_attn.o_proj.bias" in index["weight_map"]
    assert "model.layers.3.self_attn.bias" in index["weight_map"]  # empty attention block's bias
    assert "model.layers.0.self_attn.o_proj.bias" not in index["weight_map"]
    for f in ("configuration_tyr_llama.py", "modeling_tyr_llama.py"):
        code = (folder / f).read_text()
        assert "import tyr" not in code and "from tyr" not in code
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_allocation_counts(pruned, folder):
    rec = json.loads((folder / ALLOCATION_FILE).read_text())
    counts = parameter_counts(pruned)
    p = rec["parameters"]
    assert (p["total"], p["prunable"], p["attention"], p["mlp"]) == (
        counts["total"],
        counts["prunable"],
        counts["attention"],
        counts["mlp"],
    )
    assert rec["allocation"] == {"budget": 0.5, "note": "test"}
    a = get_adapter(pruned)
    for layer, entry in zip(a.layers(pruned), rec["layers"]):
        c = layer_counts(a, layer)
        assert (entry["attention_params"], entry["mlp_params"], entry["num_heads"]) == (c["attention"], c["mlp"], c["heads"])
    assert [e["num_heads"] for e in rec["layers"]] == [3, 1, 4, 0]
    # what is stored on disk: every tensor once (tied lm_head not saved), padding heads included
    stored = 0
    for shard in set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()):
        with safe_open(folder / shard, "pt") as f:
            stored += sum(f.get_tensor(k).numel() for k in f.keys())
    assert stored == p["stored_in_export"] == counts["stored"]
    padding = 64 * 16 * 2  # one zero head in layer 0: 16 q_proj rows and 16 o_proj columns
    assert stored - padding == counts["total"]


def test_fresh_process_round_trip(pruned, folder, ids):
    report = verify_export(folder, pruned, ids, atol=1e-4, cache_atol=1e-4)
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["max_abs_cache_logit_diff"] <= 1e-4
    assert report["generate_cache_equals_no_cache"] and report["matches_reference_generation"]
    assert report["config_widths_match"] and not report["tyr_imported"]
    assert report["model_class"] == "TyrLlamaForCausalLM"


def test_layer0_without_attention(pruned_l0, tiny, ids, tmp_path, monkeypatch):
    ex = to_export_model(pruned_l0)
    with torch.no_grad():
        ref = pruned_l0(ids).logits
    assert (ex(ids).logits - ref).abs().max() <= 1e-4
    assert (_stepwise_logits(ex, ids, 5) - ref).abs().max() <= 1e-4
    assert torch.equal(_greedy(ex, ids, True), _greedy(ex, ids, False))
    # the cache fix is what makes it right: layer 0's empty cache would give past length 0
    monkeypatch.setattr(ex.model, "prepare_cache", lambda cache: None)
    assert (_stepwise_logits(ex, ids, 5) - ref).abs().max() > 1e-3
    out = export_model(pruned_l0, tiny.tokenizer, tmp_path / "l0")
    report = verify_export(out, pruned_l0, ids, atol=1e-4, cache_atol=1e-4)
    assert report["generate_cache_equals_no_cache"] and report["max_abs_cache_logit_diff"] <= 1e-4


def test_dense_round_trip(tiny, ids, tmp_path):
    out = export_model(tiny.model, tiny.tokenizer, tmp_path / "dense")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_num_heads"] == [4] * 4 and cfg["layer_intermediate_size"] == [128] * 4
    report = verify_export(out, tiny.model, ids, atol=1e-4)
    assert report["max_abs_logit_diff"] <= 1e-4 and report["generate_cache_equals_no_cache"]
    rec = json.loads((out / ALLOCATION_FILE).read_text())
    assert rec["parameters"]["total"] == parameter_counts(tiny.model)["total"] == rec["parameters"]["stored_in_export"]


def test_verify_detects_a_wrong_reference(tiny, folder, ids):
    other = copy.deepcopy(tiny.model)  # the unpruned model is not what the folder holds
    with pytest.raises(ExportVerificationError, match="logits"):
        verify_export(folder, other, ids)


def test_index_layout(pruned, ids):
    ex = to_export_model(pruned, layout="index")
    assert ex.config.layer_num_heads == [3, 1, 4, 0]
    assert ex.config.layer_kv_of_head == [[0, 0, 1], None, None, None]
    with torch.no_grad():
        ref = pruned(ids).logits
        assert (ex(ids).logits - ref).abs().max() <= 1e-4
    assert (_stepwise_logits(ex, ids, 5) - ref).abs().max() <= 1e-4
    assert torch.equal(_greedy(ex, ids, True), _greedy(ex, ids, False))
    assert sum(p.numel() for p in ex.parameters()) == parameter_counts(pruned)["total"]  # no padding stored
    conv = index_layout_from_padded(to_export_model(pruned))
    assert conv.config.layer_kv_of_head == ex.config.layer_kv_of_head
    with torch.no_grad():
        assert (conv(ids).logits - ref).abs().max() <= 1e-4


def test_export_is_atomic_and_refuses_to_overwrite(pruned, tiny, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(ValueError, match="relative path"):
        export_model(pruned, tiny.tokenizer, out, extra_files={"../escape.txt": "x"})
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temp folder is left
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_model(pruned, None, out)
    export_model(pruned, None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unsupported_layouts_and_families_are_refused():
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    from tyr.modeling.adapter import UnsupportedArchitectureError

    cfg = MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=32,
    )
    mistral = MistralForCausalLM(cfg)
    assert pruned_config(mistral).model_type == "tyr_mistral"  # sliding windows are the family's own code now
    with pytest.raises(ExportError, match="Llama models only"):
        pruned_config(mistral, layout="index")
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        pruned_config(gpt2)


def test_folder_records_the_tested_transformers(folder):
    import transformers

    from tyr.modeling.hf_pruned.configuration_tyr_llama import TESTED_TRANSFORMERS

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tyr_transformers_tested"] == list(TESTED_TRANSFORMERS)
    assert cfg["tyr_exported_with_transformers"] == transformers.__version__


def test_untested_transformers_failure_is_one_line(pruned, ids, monkeypatch):
    """Outside the tested range a failing forward names the versions and what to install; inside it, the
    original error is raised unchanged (a real bug must not hide behind a version message)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaModel

    import tyr.modeling.hf_pruned.configuration_tyr_llama as tyr_config

    ex = to_export_model(pruned)

    def changed_api(self, *args, **kwargs):
        raise TypeError("forward() got multiple values for argument 'cache'")

    monkeypatch.setattr(LlamaModel, "forward", changed_api)
    with pytest.raises(TypeError, match="multiple values"):
        ex(ids)
    monkeypatch.setattr(tyr_config, "TESTED_TRANSFORMERS", ("5.0.0", "5.1.0"))  # the installed one is now untested
    with pytest.raises(tyr_config.TyrTransformersVersionError) as err:
        ex(ids)
    msg = str(err.value)
    assert "\n" not in msg and transformers.__version__ in msg and "pip install 'transformers>=5.0.0,<=5.1.0'" in msg
    assert msg.count("tested with") == 1 and "multiple values for argument 'cache'" in msg
