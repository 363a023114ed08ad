"""GGUF export (tyr.export.gguf) against an independent oracle: llama.cpp itself (llama-cpp-python, whose
bundled llama.cpp builds the deci architecture) runs the written file, and its logits are compared with
the PyTorch pruned model's.

Tolerances, as max |Δ logits| / max |logits| (measured values in docs/gguf.md):
- f32: 1e-3 (llama.cpp run with an f32 KV cache: measured <= 7.5e-7 here, 3.7e-6 on the real model;
  with llama.cpp's default f16 KV cache 8.9e-4 here, 2.3e-3 on the real model);
- f16 and bf16 round the weights, q8_0 / q4_0 quantize weights and llama.cpp quantizes activations: the
  bounds in DTYPE_BOUND are about twice the largest error measured on these tiny models.
"""

from __future__ import annotations

import copy
import functools
import json

import gguf
import numpy as np
import pytest
import torch
from test_export import PLAN as BIAS_PLAN
from test_export import _prune
from test_families import PLANS, _family, _sliced_and_masked

import tyr.export.gguf as tg
from tyr.artifacts import SettingsError, file_sha256
from tyr.export import export_model
from tyr.export.gguf import GGUFExportError, block_plans, check_gguf_family, write_gguf
from tyr.export.llamacpp import cpu_has_amx, open_llama
from tyr.recipes.checks import validate

from conftest import compose

F32_KV = dict(type_k=0, type_v=0)  # GGML_TYPE_F32: the f32 file is compared without the default f16 KV cache
F32_BOUND = 1e-3
# of max|logits|, about twice the largest measured over the 12 tiny cases of test_f32_logits_equal_the_pruned_model
# (f16 2.1e-3, bf16 1.6e-2, q8_0 3.9e-2, q4_0 0.38; the real SmolLM2 at 50 %: docs/gguf.md)
DTYPE_BOUND = {"f16": 4e-3, "bf16": 3e-2, "q8_0": 8e-2, "q4_0": 0.8}
PLANS = {
    **PLANS,
    # attention without an MLP in layer 0, a layer with neither in the middle and at the end
    "empty_layers": [([0, 1, 2, 3], []), ([], []), ([1], range(40)), ([], [])],
}


def run_llama(path, ids, logits_all: bool = True, **kw) -> np.ndarray:
    """llama.cpp's logits for ``ids`` (every position, or the last one only as in generation)."""
    llm = open_llama(path, logits_all=logits_all, n_ctx=128, n_threads=torch.get_num_threads(), verbose=False, **kw)
    try:
        llm.eval(list(map(int, ids)))
        if logits_all:
            return np.array(llm.scores[: len(ids)])
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()


def reference(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0].float().numpy()


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _ids(n: int = 40, seed: int = 0) -> list[int]:
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@functools.cache
def _exported(name: str, plan: str, tmp) -> tuple:
    """The pruned tiny model and its exported folder (cached per model and plan)."""
    lm = _family(name)
    if plan == "bias":
        model = _prune(copy.deepcopy(lm.model), BIAS_PLAN)
    else:
        model, _ = _sliced_and_masked(lm.model, PLANS[plan])
    return model, export_model(model, lm.tokenizer, tmp / f"{name}-{plan}")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("plan", [*sorted(PLANS), "bias"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_f32_logits_equal_the_pruned_model(name, plan, tmp):
    """Every layer case: uneven GQA (padded), attention removed (layer 0 too), MLP removed under attention,
    both removed (middle and last layer), biases of bias compensation (also on an empty attention block)."""
    model, folder = _exported(name, plan, tmp)
    rec = write_gguf(folder, tmp / f"{name}-{plan}.gguf", "f32")
    ids = _ids(16 if name == "tiny-mistral" else 40)  # tiny-mistral's window is 16 tokens; deci has none
    want = reference(model, ids)
    assert np.abs(want).max() > 0.3
    assert rel_error(run_llama(rec["out"], ids, **F32_KV), want) <= F32_BOUND
    # generation reads only the last position: the path that selects output rows in the last layer
    assert rel_error(run_llama(rec["out"], ids, logits_all=False, **F32_KV), want[-1]) <= F32_BOUND
    assert rec["tensor_types"] == {"F32": sum(rec["tensor_types"].values())}
    # every MLP padded with zero channels to a multiple of 32 (llama.cpp's tiled matmul), and still exact
    assert all(p["n_ff"] % 32 == 0 and p["n_ff"] >= p["channels"] for p in rec["layers"]), rec["layers"]
    assert bool(rec["warnings"]) == (name == "tiny-mistral")  # the sliding window is named


def test_layer_plans_of_the_traps(tmp):
    """The cases llama.cpp's deci gets wrong when written naively get a zero head / zero MLP."""
    _, folder = _exported("tiny-llama", "empty_layers", tmp)
    cfg = tg.read_config(folder)
    plans = block_plans(cfg)
    assert [(p.n_head, p.n_head_kv, p.n_ff, p.zero_mlp) for p in plans] == [
        (4, 2, 32, True),  # attention without an MLP: a zero MLP keeps the attention output
        (0, 0, 0, False),  # neither, in the middle: deci skips the layer (exact)
        (1, 1, 40, False),
        (0, 0, 32, True),  # neither, in the last layer: a zero MLP keeps the output-row selection
    ]
    _, folder = _exported("tiny-llama", "layer0_without_attention", tmp)
    first = block_plans(tg.read_config(folder))[0]
    assert (first.n_head, first.dummy_head) == (1, True)  # llama.cpp takes the head size from layer 0
    assert [p.n_ff for p in block_plans(tg.read_config(folder), 32)][2:] == [32, 32]  # 9 and 3 channels padded


def _naive_plans(cfg, block=1):
    return [
        tg.BlockPlan(i, h, k, f, h, f, False, False)
        for i, (h, k, f) in enumerate(zip(cfg["layer_num_heads"], cfg["layer_num_kv_heads"], cfg["layer_intermediate_size"]))
    ]


def test_naive_mapping_is_wrong(tmp, monkeypatch):
    """Without the zero MLP llama.cpp drops the attention output of a layer without MLP; without the dummy
    head it cannot load a model whose layer 0 has no attention (so the plans above are needed)."""
    monkeypatch.setattr(tg, "block_plans", _naive_plans)
    model, folder = _exported("tiny-llama", "uneven", tmp)  # layer 2 keeps attention, loses its MLP
    ids = _ids()
    rec = write_gguf(folder, tmp / "naive-uneven.gguf", "f32")
    assert rel_error(run_llama(rec["out"], ids, **F32_KV), reference(model, ids)) > 0.05
    _, folder = _exported("tiny-llama", "layer0_without_attention", tmp)
    rec = write_gguf(folder, tmp / "naive-l0.gguf", "f32")
    with pytest.raises(ValueError, match="Failed to load"):
        run_llama(rec["out"], ids)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_other_dtypes_within_their_bound(dtype, tmp):
    model, folder = _exported("tiny-llama", "bias", tmp)
    rec = write_gguf(folder, tmp / f"bias-{dtype}.gguf", dtype)
    ids = _ids()
    err = rel_error(run_llama(rec["out"], ids), reference(model, ids))
    assert err <= DTYPE_BOUND[dtype], err
    qtype = tg.GGUF_DTYPES[dtype].name
    assert rec["tensor_types"].get(qtype, 0) >= 9  # the 2-D weights (head size 16 rows fall back to f16)
    reader = gguf.GGUFReader(rec["out"])
    for t in reader.tensors:  # norms and biases stay f32; anything else is the dtype, or f16 where rows do not fit
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        elif t.name in rec["f16_fallback"]:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and t.shape[0] % 32, t.name
        elif t.name == "token_embd.weight" and dtype == "q4_0":
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        else:
            assert t.tensor_type.name == qtype, t.name


def test_extra_buffer_types_are_off_only_on_a_cpu_with_amx(tmp):
    # llama.cpp 0.3.36's AMX matmul segfaults on quantized files (tyr.export.llamacpp): only the flags line counts
    info = {
        "amx": "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_int8\n",
        "no_amx": "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile\nbugs\t\t: amx_int8\n",
    }
    for name, text in info.items():
        (tmp / name).write_text(text)
    assert cpu_has_amx(tmp / "amx") and not cpu_has_amx(tmp / "no_amx") and not cpu_has_amx(tmp / "missing")
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params
    assert default().use_extra_bufts  # llama.cpp's own default
    _, folder = _exported("tiny-llama", "bias", tmp)
    llm = open_llama(write_gguf(folder, tmp / "bias-q8.gguf", "q8_0")["out"], n_ctx=64, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts == (not cpu_has_amx())
        llm.eval(_ids(8))  # a matrix product in q8_0 runs (the AMX path would have ended the process)
    finally:
        llm.close()
    assert lc.llama_model_default_params is default


def _llama3_model(**changes):
    """A tiny Llama with an untied head, Llama-3 RoPE scaling (scaled at test lengths: original context 16),
    a RoPE base of 500000 and an RMSNorm epsilon of 1e-2 (so a wrong epsilon shows); ``changes`` to its
    config leave the weights as they are."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = _family("tiny-llama").model.config.to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    settings = dict(
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-2,
        initializer_range=0.1,
        rope_parameters={**rope, "original_max_position_embeddings": 16},
    )
    cfg = AutoConfig.for_model("llama", **{k: base[k] for k in keep}, **{**settings, **changes})
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_llama3_rope_scaling_untied_head_eps(tmp):
    lm = _family("tiny-llama")
    dense = _llama3_model()
    model, _ = _sliced_and_masked(dense, PLANS["uneven"])
    folder = export_model(model, lm.tokenizer, tmp / "llama3")
    rec = write_gguf(folder, tmp / "llama3.gguf", "f32")
    assert not rec["tied_embeddings"] and rec["rope"] == {"type": "llama3", "theta": 500000.0}
    names = {t.name for t in gguf.GGUFReader(rec["out"]).tensors}
    assert {"output.weight", "rope_freqs.weight"} <= names
    ids = _ids(48)
    assert rel_error(run_llama(rec["out"], ids, **F32_KV), reference(model, ids)) <= F32_BOUND
    # the scaling, the base and the epsilon each change the logits at this length: the check can fail
    want = reference(dense, ids)
    for change in (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        {"rms_norm_eps": 1e-5},
    ):
        assert rel_error(reference(_llama3_model(**change), ids), want) > 20 * F32_BOUND, change


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3", "tiny-gemma3"])
def test_other_families_are_refused_in_one_line(name, tmp):
    model, folder = _exported(name, "uneven", tmp)
    with pytest.raises(GGUFExportError) as e:
        write_gguf(folder, tmp / f"{name}.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "cannot be written as a GGUF" in msg and ("q/k" in msg or "bias" in msg)
    assert not (tmp / f"{name}.gguf").exists()
    check_gguf_family("llama")  # and the supported ones pass the check made before loading
    check_gguf_family("tyr_mistral")


def test_wrong_settings_are_refused(tmp):
    _, folder = _exported("tiny-llama", "uneven", tmp)
    with pytest.raises(GGUFExportError, match="must be one of"):
        write_gguf(folder, tmp / "x.gguf", "q5_k")
    with pytest.raises(GGUFExportError, match="no config.json"):
        write_gguf(tmp, tmp / "x.gguf")
    assert not list(tmp.glob("*x.gguf*"))


def llama_greedy(path, prompt_ids: list[int], n: int, **kw) -> list[int]:
    """Greedy decoding in llama.cpp: the prompt, then one token at a time through its KV cache."""
    llm = open_llama(path, logits_all=True, n_ctx=256, n_threads=torch.get_num_threads(), verbose=False, **kw)
    try:
        llm.eval(prompt_ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out
    finally:
        llm.close()


@pytest.mark.real_model
def test_real_smollm2_half_pruned_answers_as_the_hf_folder(smollm2, tmp):
    """SmolLM2-135M pruned uniformly to 50 % (FLAP scores, least-squares refit: uneven GQA groups), exported,
    written as an f32 GGUF whose tokenizer is copied from the package's GGUF: llama.cpp tokenizes the prompt
    as transformers does, its logits match, and its 32 greedy tokens equal the Hugging Face folder's."""
    from transformers import AutoModelForCausalLM

    from tyr.data import TokenSetSpec, build_token_set
    from tyr.pruning.uniform import prune_uniform

    from conftest import pruner_from_conf

    calib = build_token_set(TokenSetSpec("c4[0:200]", 128, 16, seed=0), smollm2.tokenizer).input_ids
    model = copy.deepcopy(smollm2.model)
    report = prune_uniform(model, pruner_from_conf("flap"), calib, 0.5, None, progress=False)
    assert abs(report["achieved_sparsity"] - 0.5) < 0.01
    folder = export_model(model, smollm2.tokenizer, tmp / "smollm2-50")
    del model
    rec = write_gguf(folder, tmp / "smollm2-50.gguf", "f32")
    assert rec["tokenizer"].startswith("copied from SmolLM2-135M-Instruct.Q4_1.gguf")  # via the folder's tyr_source.json
    assert any(p["n_head"] != 9 for p in rec["layers"]) and any(p["n_ff"] != 1536 for p in rec["layers"])
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = smollm2.tokenizer(prompt, add_special_tokens=False).input_ids
    llm = open_llama(rec["out"], vocab_only=True, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    llm.close()
    want = reference(hf, calib[0, :64].tolist())
    assert rel_error(run_llama(rec["out"], calib[0, :64].tolist(), **F32_KV), want) <= F32_BOUND  # measured 3.7e-6
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, num_beams=1)
    hf_new = hf_out[0, len(ids) :].tolist()
    assert llama_greedy(rec["out"], ids, 32, **F32_KV) == hf_new, smollm2.tokenizer.decode(hf_new)


def test_export_recipe_writes_keeps_and_redoes(tmp):
    """``python -m tyr.recipes.export folder=...``: written, kept on a rerun with the same settings (same
    file, not rewritten), rewritten for another dtype or a changed file; a mistake is one line, exit 2."""
    from test_recipes import run_recipe

    _, folder = _exported("tiny-llama", "uneven", tmp)
    out = folder.parent / "gguf" / "model.gguf"
    p = run_recipe("tyr.recipes.export", f"folder={folder}", "gguf_dtype=q8_0")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"GGUF {out} (q8_0" in p.stdout and "written" in p.stdout
    record = json.loads((out.parent / "model.gguf.json").read_text())
    assert record["dtype"] == "q8_0" and record["sha256"] == file_sha256(out) and not record["out"].startswith("/")
    mtime = out.stat().st_mtime_ns
    p = run_recipe("tyr.recipes.export", f"folder={folder}", "gguf_dtype=q8_0")
    assert "up to date" in p.stdout and out.stat().st_mtime_ns == mtime
    with open(out, "r+b") as f:  # a damaged file is rewritten
        f.seek(out.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    p = run_recipe("tyr.recipes.export", f"folder={folder}", "gguf_dtype=q8_0")
    assert "written" in p.stdout and file_sha256(out) == record["sha256"]
    p = run_recipe("tyr.recipes.export", f"folder={folder}", "gguf_dtype=f16")
    assert "written" in p.stdout and json.loads((out.parent / "model.gguf.json").read_text())["dtype"] == "f16"
    p = run_recipe("tyr.recipes.export", f"folder={folder}", "gguf_dtype=q4_k")
    assert p.returncode == 2 and p.stderr.strip() == "tyr: gguf_dtype=q4_k must be one of f32, f16, bf16, q8_0, q4_0"
    for args, msg in (
        ([f"folder={tmp}"], "holds no config.json"),
        ([f"folder={_exported('tiny-gemma3', 'uneven', tmp)[1]}"], "gemma3 models cannot be written as a GGUF"),
        ([f"folder={folder}", f"run={tmp}"], "not both"),
    ):
        with pytest.raises(SettingsError, match=msg):
            validate(compose("export", args), "export")


def test_prune_recipe_writes_a_gguf(tmp_path):
    """The prune recipe with export=true export_formats=[hf,gguf]: gguf/model.gguf beside hf_model, and
    llama.cpp's logits equal those of the exported folder (loaded as a user would)."""
    from test_recipes import run_recipe
    from transformers import AutoModelForCausalLM

    p = run_recipe(
        "tyr.recipes.prune",
        "model=tiny-llama",
        "eval=smoke",
        "eval.tasks=[]",
        "eval.ppl_windows=1",
        "pruner=magnitude",
        "target_sparsity=0.5",
        "export=true",
        "export_formats=[hf,gguf]",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=64",
        f"hydra.run.dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["export"]["gguf"]["dtype"] == "f32" and (tmp_path / "gguf" / "model.gguf").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model", trust_remote_code=True).eval()
    ids = _ids()
    assert rel_error(run_llama(tmp_path / "gguf" / "model.gguf", ids, **F32_KV), reference(model, ids)) <= F32_BOUND
    p = run_recipe("tyr.recipes.prune", "model=tiny-qwen2", "export=true", "export_formats=[hf,gguf]")
    assert p.returncode == 2 and "qwen2 models cannot be written as a GGUF" in p.stderr
