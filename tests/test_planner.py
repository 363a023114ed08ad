"""The cost planner against measurements and independent counts: supernet shard bytes, parameter
counts (transformers models on the meta device), the teacher cache, the number of least-squares
solves and layer forwards of a real build on tiny-llama, forward FLOPs (torch's flop counter), the
search's candidates per stage; closed-form counts for every model config; the recipe runs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra.utils import instantiate

from tyr.fitness import TeacherCache
from tyr.modeling.adapter import get_adapter
from tyr.modeling.params import parameter_counts
from tyr.planner import (
    BUILD_LAYER_FORWARDS,
    GRAD_LAYER_FORWARDS,
    SHARD_SCHEMA_VERSION,
    ArchFacts,
    PrunerSettings,
    safetensors_file_bytes,
    solve_calls,
    stage_candidates,
    supernet_bytes,
    teacher_cache_bytes,
)
from tyr.search.settings import SearchSettings
from tyr.supernet import store as store_mod
from tyr.supernet.builder import build_supernet
from tyr.supernet.grid import layer_shapes, make_grid
from tyr.supernet.store import SupernetStore

from conftest import CONF, ROOT, compose

# Configs with an arch: block (model=hf_folder reads its architecture from the folder when loaded).
MODELS = sorted(f.stem for f in (CONF / "model").glob("*.yaml") if "arch: null" not in f.read_text())
TINY_ID = {"name": "tiny-llama", "revision": "random-seed:0", "dtype": "float32"}


def _arch(model: str) -> ArchFacts:
    return ArchFacts.from_dict(yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())["arch"])


def _shard_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.glob("layer_*.safetensors"))


def _header_bytes(root) -> int:
    return sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in root.glob("layer_*.safetensors"))


def _count_layer_tokens(model) -> tuple[Counter, list]:
    """Tokens entering each decoder layer's forward (hooks to remove by the caller)."""
    tokens = Counter()

    def hook(i):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            tokens[i] += x.shape[0] * x.shape[1]

        return fn

    layers = get_adapter(model).layers(model)
    return tokens, [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]


def _meta_model(a: ArchFacts, layers: int | None = None):
    """The transformers model of an arch block on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        num_hidden_layers=layers or a.num_layers,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim,
        vocab_size=a.vocab_size,
        tie_word_embeddings=a.tie_word_embeddings,
    )
    if a.model_type in ("llama", "gemma3_text"):
        kw["attention_bias"] = a.attention_bias
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(a.model_type, **kw))


# --- parameters ---------------------------------------------------------------------------------
def test_tiny_counts_and_unit_costs_match_the_model(tiny):
    arch = _arch("tiny-llama")
    c, mp = parameter_counts(tiny.model), arch.model_params()
    assert (mp["total"], mp["prunable"], mp["attention"], mp["mlp"]) == (c["total"], c["prunable"], c["attention"], c["mlp"])
    assert arch.layer_shapes() == layer_shapes(tiny.model)


@pytest.mark.parametrize("model", MODELS)
def test_counts_match_the_same_architecture_on_the_meta_device(model):
    """The planner's formulas for every family (Llama, Mistral, Qwen2 biases, Gemma-3 norms, tied
    heads) equal the parameters of the transformers model built from the arch block (no weights)."""
    a = _arch(model)
    m = _meta_model(a)
    c, mp = parameter_counts(m), a.model_params()
    assert (mp["total"], mp["prunable"], mp["attention"], mp["mlp"]) == (c["total"], c["prunable"], c["attention"], c["mlp"])
    assert a.layer_shapes()[0] == layer_shapes(m)[0]


# --- supernet bytes -----------------------------------------------------------------------------
@pytest.mark.parametrize("pruner_name,bias", [("hywia", False), ("flap", True)])
def test_supernet_bytes_and_solves_match_a_real_build(tiny, calib, request, tmp_path, monkeypatch, pruner_name, bias):
    """Build a real supernet on tiny-llama; the planner predicts its shard bytes (data exactly, the
    header to within a few bytes), its least-squares calls and its layer forwards."""
    import tyr.pruning.local as local
    import tyr.pruning.scorers.hywia as hywia

    arch = _arch("tiny-llama")
    grid = make_grid(arch.layer_shapes(), 0.5, interval=0.25, n_levels=5, min_heads=1, min_channels=8)
    assert grid == make_grid(layer_shapes(tiny.model), 0.5, interval=0.25, n_levels=5, min_channels=8)
    pcfg = compose("plan", [f"pruner={pruner_name}"]).pruner
    assert bool(pcfg.bias) is bias
    pruner = instantiate(pcfg)
    taylor = request.getfixturevalue("taylor") if pruner.needs_gradients else None  # conftest: calib[:4]

    calls: list[tuple[str, str, int, int]] = []

    def counting(op, fn, mod):
        def wrapped(problem, keep, *args, **kw):
            kept = len(problem.columns(keep)) if op == "refit" else 0
            calls.append((op, problem.kind, kept, problem.out_weight.shape[1]))
            return fn(problem, keep, *args, **kw)

        return wrapped

    for mod in (local, hywia):
        monkeypatch.setattr(mod, "refit", counting("refit", mod.refit, mod))
        monkeypatch.setattr(mod, "relative_error", counting("error", mod.relative_error, mod))
    tokens, handles = _count_layer_tokens(tiny.model)
    try:
        store = SupernetStore.create_or_resume(tmp_path / "sn", model=TINY_ID, grid=grid, eea="expectation", config={})
        build_supernet(tiny.model, pruner, calib, grid, store, taylor=taylor, progress=False)
    finally:
        for h in handles:
            h.remove()

    predicted = supernet_bytes(grid, arch, "float32", bias=bias)
    measured, measured_header = _shard_bytes(store.root), _header_bytes(store.root)
    assert predicted["data"] == measured - measured_header
    assert abs(predicted["total"] - measured) <= 8 * grid.num_layers  # header padding granularity
    assert abs(predicted["total"] - measured) / measured < 0.01
    assert predicted["per_layer"] == [store.manifest["layers"][str(l)]["bytes"] for l in range(4)]
    assert store.manifest["disk_bytes"] == measured

    psettings = PrunerSettings(str(pcfg.reconstruction), bias, 2 if pruner_name == "hywia" else 0)
    assert Counter(solve_calls(grid, arch, psettings)) == Counter(calls)
    C = calib.numel()
    assert all(tokens[i] == BUILD_LAYER_FORWARDS * C for i in range(4)), tokens


def test_bfloat16_shards_match_write_layer(tmp_path):
    """Shard layout in bfloat16 (the 70B case: BF16 tensors sort after I32 in the header) and an
    uneven grid, written by the real store from synthetic variants."""
    arch = ArchFacts("llama", 3, 96, 200, 6, 2, 16, 1000)
    grid = make_grid(arch.layer_shapes(), 0.4, interval=0.2, n_levels=5, min_heads=1, min_channels=8)
    store = SupernetStore.create_or_resume(tmp_path, model={"name": "x", "revision": "y"}, grid=grid, eea="none", config={})
    for l in range(3):
        variants = {}
        for kind, w in (("attn", arch.head_dim), ("mlp", 1)):
            g = grid.modules[kind][l]
            variants[kind] = [
                SimpleNamespace(
                    keep=list(range(k)),
                    out_weight=torch.randn(arch.hidden_size, k * w),
                    out_bias=torch.randn(arch.hidden_size) if k < g.n_units else None,
                    rel_error=0.0,
                )
                for k in g.keep
            ]
        store.write_layer(l, variants, torch.bfloat16)
    assert supernet_bytes(grid, arch, "bfloat16", bias=True)["total"] == _shard_bytes(tmp_path)
    assert store_mod.SCHEMA_VERSION == SHARD_SCHEMA_VERSION


def test_safetensors_header_estimate_is_exact(tmp_path):
    from safetensors.torch import save_file

    t = {
        "b.0.weight": torch.zeros(3, 5, dtype=torch.bfloat16),
        "a.1.keep": torch.zeros(7, dtype=torch.int32),
        "a.0.bias": torch.zeros(11),
        "z.empty": torch.zeros(4, 0),
    }
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"tyr": '{"layer": 3}'})
    names = {torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32"}
    est = safetensors_file_bytes([(k, names[v.dtype], tuple(v.shape)) for k, v in t.items()], {"tyr": '{"layer": 3}'})
    assert est["total"] == (tmp_path / "x.safetensors").stat().st_size


# --- teacher cache, search ----------------------------------------------------------------------
def test_teacher_cache_bytes(tiny, calib):
    ids = calib[:3, :32]
    t = TeacherCache.build(tiny.model, ids, k=16)
    assert teacher_cache_bytes(3, 32, 16) == t.nbytes
    assert TeacherCache.estimate_bytes(ids.numel(), 16) >= t.nbytes


def test_stage_candidates_match_the_evolution():
    from tyr.search import EvolutionConfig, SearchSpace, evolve

    arch = _arch("llama3-8b")
    grid = make_grid(arch.layer_shapes(), 0.5)
    space = SearchSpace.from_costs(grid.costs())
    seen = []

    def fitness(allocs, stage, tokens):
        seen.append(len(allocs))
        return [float(sum(a.flat())) for a in allocs]

    for offspring, stages, prescreen in ((16, ((64, 4), (128, 2), (256, 1)), None), (8, ((64, 1),), 3)):
        seen.clear()
        evolve(
            space,
            fitness,
            EvolutionConfig(generations=2, offspring=offspring, stages=list(stages), prescreen_keep=prescreen),
            prescreen=(lambda allocs: [0.0] * len(allocs)) if prescreen else None,
        )
        want = stage_candidates(SearchSettings(offspring=offspring, stages=list(stages), prescreen_keep=prescreen))
        assert seen == want * 2


def test_gradient_pass_runs_two_forwards_per_layer(tiny, calib):
    from tyr.layerwise.gradients import layerwise_gradients

    tokens, handles = _count_layer_tokens(tiny.model)
    try:
        layerwise_gradients(tiny.model, calib[:2], lambda l, g: None, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert all(tokens[i] == GRAD_LAYER_FORWARDS * calib[:2].numel() for i in range(4)), tokens


# --- every config, the recipe -------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_plans_closed_form_counts(model):
    """For every model config, the plan's kept parameters, supernet data bytes, teacher cache and
    dense forward FLOPs equal closed forms computed here from the arch block and the plan's own level
    lists: a head costs its q rows and o columns (2·H·hd, + hd of q bias), the K/V heads and an o bias
    are fixed, a channel costs 3·H; a stored level is its int32 indices plus H x kept·width weights;
    a teacher position k·(4+4) + 4 bytes plus 8 per input id; a token 2 FLOPs per decoder weight plus
    2·T·q_dim per layer of causal attention."""
    from tyr.recipes.plan import plan_from_config

    cfg = compose("plan", [f"model={model}", "target_sparsity=0.5"])
    p = plan_from_config(cfg)
    json.dumps(p)
    a = _arch(model)
    H, hd, L, b = a.hidden_size, a.head_dim, a.num_layers, {"float32": 4, "bfloat16": 2, "float16": 2}[str(cfg.model.dtype)]
    head = 2 * H * hd + (hd if a.attention_bias else 0)
    fixed = a.num_kv_heads * (2 * H * hd + (2 * hd if a.attention_bias else 0)) + (H if a.o_bias else 0)
    kh, kc = p["params"]["kept_heads_centre"], p["params"]["kept_channels_centre"]
    assert p["params"]["kept_at_budget"] == L * (kh * head + (fixed if kh else 0) + kc * 3 * H)
    assert abs(p["params"]["kept_at_budget"] / p["params"]["model"]["prunable"] - 0.5) < 0.02
    heads, channels = p["supernet"]["levels"]["attn"], p["supernet"]["levels"]["mlp"]
    per_layer = sum(H * k * hd * b + 4 * k for k in heads) + sum(H * k * b + 4 * k for k in channels)
    assert p["supernet"]["data_bytes"] == L * per_layer
    tk = p["tokens"]
    k = min(int(cfg.search.topk), a.vocab_size)
    assert p["teacher_cache_bytes"] == tk["teacher_sequences"] * (tk["seq_len"] * 8 + (tk["seq_len"] - 1) * (8 * k + 4))
    linear = L * (a.num_heads * head + fixed + a.intermediate_size * 3 * H)
    assert p["flops"]["forward_per_token_dense"] == 2 * linear + L * 2 * tk["seq_len"] * a.num_heads * hd


def test_forward_flops_match_a_flop_counter(tiny):
    """Measured with torch's FlopCounterMode on tiny-llama (eager attention, so the attention
    matmuls are counted), dense and pruned: 2 FLOPs per projection weight and token, the LM head
    2·V·H, and the attention matmuls, which the planner counts at half the square (the causal mask
    leaves half of QKᵀ and AV useful, about T/2 positions per query) and eager attention computes whole."""
    from torch.utils.flop_counter import FlopCounterMode

    from tyr.modeling.slicing import slice_attention, slice_mlp
    from tyr.planner import forward_flops_per_token

    arch = _arch("tiny-llama")
    N, T = 2, 24
    ids = torch.randint(0, arch.vocab_size, (N, T), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(tiny.model)
    model.set_attn_implementation("eager")
    a = get_adapter(model)
    for step in ("dense", "pruned"):
        if step == "pruned":  # even GQA groups (no padding slots) and uneven channel counts
            for li, (h, c) in enumerate([([0, 1], 100), ([0, 1, 2, 3], 7), ([2, 3], 128), ([], 64)]):
                layer = a.layers(model)[li]
                slice_attention(a, layer, h)
                slice_mlp(a, layer, list(range(c)))
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(ids)
        counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
        q_dims = [
            a.geometry(layer).num_heads * arch.head_dim if hasattr(a.attention(layer), "q_proj") else 0
            for layer in a.layers(model)
        ]
        linear = parameter_counts(model)["prunable"]
        head_flops = 2 * arch.vocab_size * arch.hidden_size
        want = forward_flops_per_token(arch, linear, q_dims, T, with_head=True)
        attention = sum(2.0 * T * q for q in q_dims)
        assert counts["aten.mm"] / (N * T) == 2 * linear + head_flops == want - attention
        assert counts.get("aten.bmm", 0) / (N * T) / 2 == attention


def test_planner_imports_nothing_heavy():
    code = "import sys, tyr.planner, tyr.recipes.plan; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_plan_recipe_llama3_70b(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TYR_OUTPUT=str(tmp_path))
    p = subprocess.run(
        [sys.executable, "-m", "tyr.recipes.plan", "model=llama3-70b", "target_sparsity=0.5", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    plan_json = json.loads((tmp_path / "plan.json").read_text())
    assert plan_json["model"] == "llama3-70b"
    assert plan_json["params"]["model"]["total"] == 70_553_706_496  # Llama-3-70B's published parameter count


def test_streaming_plan_holds_one_layer_on_the_host():
    """runtime.streaming=true: host weights drop from the whole model to one layer + embedding/head
    (the difference is exactly L-1 layers), the search keeps no dense layer copies, build and gradient
    device memory are unchanged and the search's device memory no longer holds the pruned model."""
    from tyr.recipes.plan import plan_from_config

    full = plan_from_config(compose("plan", ["model=llama3-70b", "target_sparsity=0.5"]))
    strm = plan_from_config(compose("plan", ["model=llama3-70b", "target_sparsity=0.5", "runtime.streaming=true"]))
    a = _arch("llama3-70b")
    layer_bytes = sum(t.numel() for t in _meta_model(a, layers=1).model.layers[0].parameters()) * 2  # bfloat16
    for phase in ("gradient", "build"):
        drop = full["memory"][phase]["host"] - strm["memory"][phase]["host"]
        assert drop == (a.num_layers - 1) * layer_bytes
        assert strm["memory"][phase]["device"] == full["memory"][phase]["device"]
    assert strm["memory"]["search"]["host_parts"]["assembler_dense_layers"] == 0
    assert strm["memory"]["search"]["device"] < full["memory"]["search"]["device"] / 4
    # a streamed 70B build needs less host memory than the checkpoint itself (141 GB in bf16)
    assert strm["memory"]["build"]["host"] < 70_553_706_496 * 2 < full["memory"]["build"]["host"]
    assert strm["memory"]["streaming"] and not full["memory"]["streaming"]
