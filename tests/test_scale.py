"""Scale (issue #8): streamed weights (one decoder layer in memory), memory-mapped activations, and
distributed build and search under torchrun, on tiny-llama and on synthetic sharded checkpoints."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, pruner_from_conf
from tyr import dist, streaming
from tyr.fitness import KLFitness, TeacherCache
from tyr.layerwise.engine import capture_layer_inputs, run_layer
from tyr.modeling.adapter import get_adapter
from tyr.pruning.taylor import collect_taylor
from tyr.supernet.assemble import Assembler
from tyr.supernet.builder import build_supernet
from tyr.supernet.grid import layer_shapes, make_grid
from tyr.supernet.store import SupernetStore

MODEL = {"name": "tiny-llama", "revision": "random-seed:0", "dtype": "float32"}
PY = sys.executable


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    """tiny-llama saved as a sharded safetensors checkpoint (index file + several shards)."""
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    tiny.model.save_pretrained(folder, max_shard_size="2MB")
    assert (folder / streaming.INDEX_FILE).exists()
    return folder


def test_shard_covers_every_item_once():
    for n in (0, 1, 5, 8, 13):
        for w in (1, 2, 3, 4):
            blocks = [list(dist.shard(n, r, w)) for r in range(w)]
            assert sum(blocks, []) == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert dist.world() == 1 and dist.is_main() and dist.all_reduce_sum(2.5) == 2.5  # one process: no group


def test_streamed_model_loads_one_layer_at_a_time(tiny, tiny_folder, calib):
    model = streaming.load_streaming(tiny_folder)
    a = get_adapter(model)
    assert all(p.is_meta for layer in a.layers(model) for p in layer.parameters())
    assert a.lm_head(model).weight is a.embed_tokens(model).weight  # tied, as in the checkpoint
    x, kw = capture_layer_inputs(model, calib[:3])
    ref, kw_ref = capture_layer_inputs(tiny.model, calib[:3])
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    for li in range(a.num_layers(model)):
        with streaming.layer(model, li) as layer:
            assert not any(p.is_meta for p in layer.parameters())
            loaded = sum(p.numel() for p in layer.parameters())
            x = run_layer(layer, x, kw[li])
        assert all(p.is_meta for p in a.layers(model)[li].parameters())  # released again
        ref = run_layer(a.layers(tiny.model)[li], ref, kw_ref[li])
    assert loaded == sum(p.numel() for p in a.layers(tiny.model)[0].parameters())
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_offloaded_activations_are_memory_mapped(tiny, calib, tmp_path):
    model = copy.deepcopy(tiny.model)
    streaming.configure(model, "cpu", activations_max_mb=0.0, activations_dir=tmp_path)
    x, _ = capture_layer_inputs(model, calib[:2])
    assert x.untyped_storage().filename is not None and Path(x.untyped_storage().filename).parent == tmp_path
    assert not list(tmp_path.iterdir())  # unlinked at once: the disk space goes with the tensor
    ref, _ = capture_layer_inputs(tiny.model, calib[:2])
    assert ref.untyped_storage().filename is None
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


def _shards(root: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {int(p.stem.split("_")[1]): load_file(str(p)) for p in sorted(root.glob("layer_*.safetensors"))}


def assert_same_supernet(a: Path, b: Path, atol: float = 1e-5) -> None:
    sa, sb = _shards(a), _shards(b)
    assert sa.keys() == sb.keys() and len(sa) > 0
    for layer in sa:
        assert sa[layer].keys() == sb[layer].keys()
        for k, t in sa[layer].items():
            if k.endswith(".keep"):
                assert torch.equal(t, sb[layer][k]), (layer, k)
            else:
                torch.testing.assert_close(t, sb[layer][k], atol=atol, rtol=1e-4, msg=f"layer {layer} {k}")
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["config_hash"] == mb["config_hash"] and ma["complete"] and mb["complete"]
    for layer, entry in ma["layers"].items():
        for kind, errs in entry["errors"].items():
            assert errs == pytest.approx(mb["layers"][layer]["errors"][kind], abs=1e-5)


def test_streaming_build_gradients_teacher_and_fitness_equal_in_memory(tiny, tiny_folder, calib, tmp_path):
    streamed = streaming.load_streaming(tiny_folder, activations_max_mb=0.0, activations_dir=tmp_path / "act")
    # gradients (Taylor statistics) with one layer at a time
    t_mem = collect_taylor(tiny.model, calib[:4], progress=False)
    t_str = collect_taylor(streamed, calib[:4], progress=False)
    for li in t_mem:
        for kind in ("attn", "mlp"):
            for key, v in t_mem[li][kind].items():
                torch.testing.assert_close(t_str[li][kind][key], v, rtol=1e-4, atol=1e-6)
    # the supernet build
    grid = make_grid(layer_shapes(tiny.model), 0.5, interval=0.25, n_levels=5, min_channels=8)
    stores = {}
    for name, model, taylor in (("mem", tiny.model, t_mem), ("stream", streamed, t_str)):
        store = SupernetStore.create_or_resume(tmp_path / name, model=MODEL, grid=grid, eea="expectation", config={"t": 1})
        build_supernet(model, pruner_from_conf(), calib, grid, store, eea="expectation", taylor=taylor, progress=False)
        stores[name] = SupernetStore.open(store.root)
    assert all(p.is_meta for layer in get_adapter(streamed).layers(streamed) for p in layer.parameters())
    assert_same_supernet(tmp_path / "mem", tmp_path / "stream")
    # teacher cache (layer by layer) and KL fitness of assembled candidates
    search = calib[4:8]
    teacher = TeacherCache.build(tiny.model, search, k=64)
    teacher_s = TeacherCache.build(streamed, search, k=64)
    assert torch.equal(teacher.topk_ids, teacher_s.topk_ids)
    torch.testing.assert_close(teacher.topk_logp, teacher_s.topk_logp, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the layer-by-layer teacher is the model's own forward
        ref = torch.log_softmax(tiny.model(search).logits[:, :-1].float(), -1).topk(64, -1)
    torch.testing.assert_close(teacher.topk_logp, ref.values, rtol=1e-4, atol=1e-5)
    centre = grid.centre_levels()
    other = {
        k: [min(len(g.keep) - 1, lvl + (li % 2)) for li, (g, lvl) in enumerate(zip(grid.modules[k], centre[k]))] for k in centre
    }
    fits = {}
    for name, model in (("mem", copy.deepcopy(tiny.model)), ("stream", streamed)):
        fit = KLFitness(model, Assembler(model, stores[name]), teacher, batch_size=2)
        fits[name] = fit([other, centre], 0, 4 * 47)
        assert fits[name][1] > 0
    assert fits["stream"] == pytest.approx(fits["mem"], rel=1e-4)


SYNTH = textwrap.dedent(
    """
    import json, os, sys, torch
    from safetensors.torch import save_file

    folder, layers, hidden, inter, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    heads, head_dim = hidden // 128, 128
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
               head_dim=head_dim, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
               torch_dtype="float32", rope_theta=10000.0)
    os.makedirs(folder, exist_ok=True)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    g = torch.Generator().manual_seed(0)
    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5
    weight_map = {}
    def shard(name, tensors):
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    shard("model-embed.safetensors", {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden),
                                       "lm_head.weight": w(vocab, hidden)})
    kv = heads // 2 * head_dim
    for i in range(layers):  # one shard per layer, written one at a time
        p = f"model.layers.{i}."
        shard(f"model-layer{i:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv, hidden),
            p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter)})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    """
)

STREAM_BUILD = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    torch.set_num_threads(1)
    from tyr.pruning.local import LocalPruner
    from tyr.pruning.scorers import Magnitude
    from tyr.streaming import load_streaming
    from tyr.supernet.builder import build_supernet
    from tyr.supernet.grid import layer_shapes, make_grid
    from tyr.supernet.store import SupernetStore
    from tyr.utils import proc_status_mb

    folder, out = sys.argv[1], sys.argv[2]
    t0 = time.time()
    model = load_streaming(folder)
    loaded = proc_status_mb("VmRSS")  # interpreter, torch, embedding and head
    grid = make_grid(layer_shapes(model), 0.5, interval=0.25, n_levels=3, min_heads=1, min_channels=32)
    store = SupernetStore.create_or_resume(out, model={"name": "synthetic", "revision": folder}, grid=grid, eea="expectation",
                                           config={})
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    build_supernet(model, LocalPruner(Magnitude(), reconstruction="lstsq"), ids, grid, store, progress=False)
    print(json.dumps({"peak_rss_mb": proc_status_mb("VmHWM"),
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "loaded_rss_mb": loaded,
                      "seconds": time.time() - t0, "layers": len(store.completed_layers())}))
    """
)


@pytest.mark.slow  # ~90 s on 2 shared cores (mostly the 24-layer build)
def test_streaming_peak_memory_does_not_grow_with_depth(tmp_path):
    """Synthetic Llama (hidden 1024, 8 heads of 128 on 4 KV heads, MLP 2048, vocab 2048, float32) as
    one safetensors shard per layer, 6 and 24 layers: the streamed build's peak RSS is flat in depth
    and well under the checkpoint. (About 380 MB of the peak is the interpreter with torch.)

    The peak is the child's ``VmHWM``: ``ru_maxrss`` survives ``execve``, so a child of pytest
    reports at least pytest's own peak (measured: 1073 MB for both depths late in the full suite);
    it is printed too, and equals ``VmHWM`` when the parent is small."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TYR_THREADS": "1", "OMP_NUM_THREADS": "1"}
    res, sizes = {}, {}
    for layers in (6, 24):
        folder = tmp_path / f"synthetic-{layers}"
        subprocess.run([PY, "-c", SYNTH, str(folder), str(layers), "1024", "2048", "2048"], check=True, env=env)
        sizes[layers] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        p = subprocess.run(
            [PY, "-c", STREAM_BUILD, str(folder), str(tmp_path / f"supernet-{layers}")],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        res[layers] = json.loads(p.stdout.strip().splitlines()[-1])
        assert res[layers]["layers"] == layers
        for f in folder.glob("*.safetensors"):
            f.unlink()  # keep the test's disk footprint small
    for n in (6, 24):
        print(
            f"\n{n} layers: peak RSS {res[n]['peak_rss_mb']:.0f} MB (ru_maxrss {res[n]['ru_maxrss_mb']:.0f} MB; "
            f"after loading the skeleton "
            f"{res[n]['loaded_rss_mb']:.0f} MB), checkpoint {sizes[n]:.0f} MB, {res[n]['seconds']:.0f} s"
        )
    assert sizes[24] > 3.5 * sizes[6]
    assert res[24]["peak_rss_mb"] <= 1.2 * res[6]["peak_rss_mb"]
    assert res[24]["peak_rss_mb"] < 0.75 * sizes[24]
    # above the interpreter + skeleton: about one layer's weights and solves, not the model
    assert res[24]["peak_rss_mb"] - res[24]["loaded_rss_mb"] < 0.3 * sizes[24]


def _torchrun(nproc: int, module: str, *overrides: str, env: dict) -> subprocess.CompletedProcess:
    cmd = (
        [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *overrides]
        if nproc > 1
        else [PY, "-m", module, *overrides]
    )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_torchrun_build_and_search_equal_one_process(tmp_path, token_cache):
    """The pipeline's build and one search generation on tiny-llama, 1 process vs torchrun with 2
    (gloo on CPU): same shards (float tolerance), same allocation."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TYR_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [
        "model=tiny-llama",
        "pruner=magnitude",
        "search=fast",
        "search.intervals=[0.25]",
        "search.n_levels=5",
        "search.min_channels=8",
        "search.generations=1",
        "search.offspring=6",
        "search.stages=[[188,2],[288,1]]",
        "search.surrogate_check=0",
        "search.topk=64",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=48",
        "data.search.num_sequences=8",
        "data.search.seq_len=48",
        "compare=[]",
        "export=false",
        "eval=smoke",
        "eval.perplexity=[]",
        "eval.tasks=[]",
        "batch_size=2",
        "recover=none",
    ]
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"np{n}"
        p = _torchrun(n, "tyr.recipes.pipeline", *common, f"hydra.run.dir={run_dir}", env=env)
        assert p.returncode == 0, p.stderr[-4000:]
        runs[n] = run_dir
    # All-reduced statistics sum the same numbers in another order; the refits amplify that to a few
    # 1e-5 on weights of magnitude ~0.1 (measured: at most 4e-4 of the largest weight).
    assert_same_supernet(runs[1] / "iter0" / "supernet", runs[2] / "iter0" / "supernet", atol=1e-4)
    a1, a2 = (json.loads((r / "allocation.json").read_text()) for r in runs.values())
    assert a1["levels"] == a2["levels"]
    assert a1["fitness"] == pytest.approx(a2["fitness"], rel=1e-4)
    h1, h2 = ((r / "history.jsonl").read_text().splitlines() for r in runs.values())
    assert len(h1) == len(h2) == 1  # one generation, written once (by rank 0)
    assert not list(runs[2].glob("iter0/supernet/activations*"))


def test_streamed_build_recipe_under_torchrun_equals_in_memory(tiny, tiny_folder, tmp_path):
    """``runtime.streaming=true`` with memory-mapped activations, 2 ranks, vs the plain in-memory
    build of the same checkpoint folder, both through the build recipe."""
    tiny.tokenizer.save_pretrained(tiny_folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TYR_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [
        "model=hf_folder",
        f"model.source.path={tiny_folder}",
        "pruner=magnitude",
        "supernet.min_channels=8",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=48",
        "batch_size=2",
    ]
    p = _torchrun(1, "tyr.recipes.build", *common, f"hydra.run.dir={tmp_path / 'mem'}", env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    p = _torchrun(
        2,
        "tyr.recipes.build",
        *common,
        "runtime.streaming=true",
        "runtime.activations_max_mb=0",
        f"hydra.run.dir={tmp_path / 'stream'}",
        env=env,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert_same_supernet(tmp_path / "mem" / "supernet", tmp_path / "stream" / "supernet", atol=1e-4)
    m = json.loads((tmp_path / "stream" / "supernet" / "manifest.json").read_text())
    assert m["streaming"] and m["world_size"] == 2 and len(m["peak_rss_mb_per_rank"]) == 2
    assert not any(f.is_file() for f in (tmp_path / "stream" / "activations").rglob("*"))  # mapped files unlinked


@pytest.mark.parametrize("layout", ["padded", "index"])
def test_streamed_export_writes_the_in_memory_export(tiny, tiny_folder, calib, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    from tyr.export import export_model, export_streamed

    grid = make_grid(layer_shapes(tiny.model), 0.5, interval=0.25, n_levels=5, min_channels=8)
    store = SupernetStore.create_or_resume(tmp_path / "s", model=MODEL, grid=grid, eea="expectation", config={})
    build_supernet(tiny.model, pruner_from_conf("magnitude"), calib, grid, store, progress=False)
    store = SupernetStore.open(store.root)
    levels = grid.centre_levels()
    levels["attn"][1], levels["mlp"][2] = len(grid.modules["attn"][1].keep) - 1, 0  # uneven: heads and channels differ
    model = copy.deepcopy(tiny.model)
    Assembler(model, store).assemble(levels)
    export_model(model, None, tmp_path / "mem", allocation={"levels": levels}, layout=layout)
    streamed = streaming.load_streaming(tiny_folder)
    asm = Assembler(streamed, store)
    asm.assemble(levels)
    export_streamed(streamed, asm, None, tmp_path / "stream", allocation={"levels": levels}, layout=layout)
    assert all(p.is_meta for layer in get_adapter(streamed).layers(streamed) for p in layer.parameters())
    a, b = tmp_path / "mem", tmp_path / "stream"
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca == cb
    assert json.loads((a / "tyr_allocation.json").read_text()) == json.loads((b / "tyr_allocation.json").read_text())
    assert (b / "modeling_tyr_llama.py").exists() and (b / "configuration_tyr_llama.py").exists()
    ta = {k: v for f in a.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    tb = {k: v for f in b.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert ta.keys() == tb.keys() and len(list(b.glob("*.safetensors"))) == 5  # embedding shard + one per layer
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    loaded = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib[:2]).logits, model(calib[:2]).logits, atol=1e-4, rtol=1e-4)
