"""Recovery (tyr.recovery, tyr.recipes.recover) on tiny-llama: the loss against a brute-force formula,
LoRA merged against unmerged and against W + (alpha/r) B A, the loss going down, bit-identical resume,
micro-batch accumulation against one batch, the learning rate against hand values, the budget and
disjointness errors, and the recipe end to end (prune run -> recover -> export checked)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from tyr.modeling.adapter import get_adapter
from tyr.modeling.slicing import EmptyAttention, EmptyMLP, slice_attention, slice_mlp
from tyr.recovery.data import RecoveryBudgetError, RecoveryError, check_disjoint, mix_windows, schedule
from tyr.recovery.lora import LoraSettings, add_lora, keep_padding_zero, merge_lora
from tyr.recovery.loss import distill_loss, teacher_targets
from tyr.recovery.student import load_sliced, save_sliced
from tyr.recovery.trainer import RecoverySettings, train

from conftest import compose

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def settings(**kw) -> RecoverySettings:
    base = dict(
        mode="lora",
        tokens=6 * 4 * 32,
        sources=(("c4[0:100]", 1.0),),
        seq_len=32,
        batch_size=4,
        micro_batch_size=2,
        lr=1e-2,
        min_lr_ratio=0.1,
        warmup=0.2,
        weight_decay=0.01,
        max_grad_norm=1.0,
        topk=64,
        ce_weight=0.5,
        bf16=False,
        lora=LoraSettings(4, 8.0, 0.1, ALL),
        train_embeddings=False,
        seed=0,
        checkpoint_every=2,
        log_every=1,
        keep_checkpoints=2,
        device="cpu",
    )
    return RecoverySettings(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(tiny):
    """tiny-llama with a sharp output distribution (a random model's is nearly uniform, so the KL
    between it and anything would be ~0)."""
    t = copy.deepcopy(tiny.model)
    with torch.no_grad():
        get_adapter(t).final_norm(t).weight.mul_(10.0)
    return t


def pruned(teacher):
    """A pruned copy with every kind of layer: uneven GQA groups (a zero padding head), no attention,
    no MLP, a narrow MLP."""
    s = copy.deepcopy(teacher)
    a = get_adapter(s)
    L = a.layers(s)
    slice_attention(a, L[0], [0, 1, 2])
    slice_attention(a, L[1], [])
    slice_mlp(a, L[2], [])
    slice_mlp(a, L[3], range(0, 128, 3))
    slice_attention(a, L[3], [1, 3])
    return s


@pytest.fixture(scope="module")
def windows(tiny):
    from tyr.data import TokenSetSpec, build_token_set

    return build_token_set(TokenSetSpec("c4[0:200]", 32, 24, seed=3), tiny.tokenizer).input_ids


def test_loss_matches_brute_force(teacher, windows):
    """Top-k KL with a tail bucket and the next-token CE, against float64 numpy on full logits."""
    student = pruned(teacher)
    x = windows[:2]
    k = 50
    with torch.no_grad():
        got = distill_loss(student, x, teacher_targets(teacher, x, k), ce_weight=0.3)
        t = teacher(x).logits[:, :-1].double().reshape(-1, 49152).numpy()
        s = student(x).logits[:, :-1].double().reshape(-1, 49152).numpy()
    kl = ce = 0.0
    nxt = x[:, 1:].reshape(-1).numpy()
    for i in range(t.shape[0]):
        p = np.exp(t[i] - t[i].max())
        p /= p.sum()
        q = np.exp(s[i] - s[i].max())
        q /= q.sum()
        top = np.argsort(-p)[:k]
        kl += float(np.sum(p[top] * np.log(p[top] / q[top])))
        pt, qt = 1 - p[top].sum(), 1 - q[top].sum()
        kl += pt * math.log(pt / qt)
        ce -= math.log(q[nxt[i]])
    assert kl > 1.0  # a real gap between teacher and student
    assert float(got["kl"]) == pytest.approx(kl, rel=1e-4)
    assert float(got["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(got["loss"]) == pytest.approx(kl + 0.3 * ce, rel=1e-4)


def test_lora_on_sliced_layers_merges_to_the_same_forward(teacher, windows):
    student = pruned(teacher)
    peft_model = add_lora(student, LoraSettings(4, 8.0, 0.0, ALL))
    a = get_adapter(student)
    L = a.layers(student)
    assert isinstance(a.attention(L[1]), EmptyAttention) and isinstance(a.mlp(L[2]), EmptyMLP)
    assert hasattr(a.attention(L[0]).q_proj, "lora_A") and hasattr(a.mlp(L[3]).down_proj, "lora_A")
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)  # lora_B starts at zero: make the adapters do something
    with keep_padding_zero(student) as n_masked:
        assert n_masked == 2  # layer 0's padding head: q_proj lora_B rows, o_proj lora_A columns
        with torch.no_grad():
            unmerged = student(windows[:2]).logits
    q = a.attention(L[0]).q_proj  # the merge, by the LoRA formula: W + (alpha / r) B A
    expected = (q.base_layer.weight + (8.0 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight).detach().clone()
    merged = merge_lora(peft_model)
    with torch.no_grad():
        after = merged(windows[:2]).logits
    torch.testing.assert_close(a.attention(L[0]).q_proj.weight, expected, atol=1e-6, rtol=1e-5)
    assert (unmerged - teacher(windows[:2]).logits).abs().max() > 1e-2
    torch.testing.assert_close(after, unmerged, atol=1e-4, rtol=1e-4)
    attn = get_adapter(merged).attention(get_adapter(merged).layers(merged)[0])
    pad = [s for s, h in enumerate(attn.tyr_head_ids) if h < 0]
    assert pad and all(not attn.q_proj.weight[s * 16 : (s + 1) * 16].any() for s in pad)
    assert all(not attn.o_proj.weight[:, s * 16 : (s + 1) * 16].any() for s in pad)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def _kl(teacher, student, x) -> float:
    with torch.no_grad():
        return float(distill_loss(student, x, teacher_targets(teacher, x, 64))["kl"]) / (x.shape[0] * (x.shape[1] - 1))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_goes_down(teacher, windows, tmp_path, mode):
    s = settings(mode=mode, tokens=12 * 4 * 32, lr=1e-2 if mode == "lora" else 3e-3, ce_weight=0.0)
    student = pruned(teacher)
    before = _kl(teacher, student, windows[:8])
    out, summary = train(teacher, student, windows.repeat(2, 1), s, tmp_path, progress=False)
    after = _kl(teacher, out, windows[:8])
    assert summary["finished"] and summary["tokens"] == 12 * 4 * 32
    assert after < 0.7 * before, (before, after)
    metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and metrics[-1]["kl"] < metrics[0]["kl"]
    attn = get_adapter(out).attention(get_adapter(out).layers(out)[0])  # the padding head is still zero
    assert not attn.o_proj.weight[:, 3 * 16 :].any() and attn.tyr_head_ids[3] == -1


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_is_bit_identical(teacher, windows, tmp_path, mode):
    s = settings(mode=mode)
    whole, _ = train(teacher, pruned(teacher), windows, s, tmp_path / "whole", progress=False)
    first, summary = train(teacher, pruned(teacher), windows, s, tmp_path / "cut", stop_after=3, progress=False)
    assert not summary["finished"] and summary["steps_done"] == 3
    # a checkpoint being written when the process died is a leftover temporary folder: ignored
    shutil.copytree(tmp_path / "cut" / "checkpoints" / "step-000003", tmp_path / "cut" / "checkpoints" / ".tmp-step-000004-1")
    (tmp_path / "cut" / "metrics.jsonl").open("a").write('{"step": 4, "loss": 99}\n')  # the dead run's tail
    resumed, summary = train(teacher, pruned(teacher), windows, s, tmp_path / "cut", progress=False)
    assert summary["finished"] and summary["steps_done"] == 6
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], teacher.state_dict()["model.layers.0.mlp.up_proj.weight"])
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_damaged_checkpoint_is_skipped(teacher, windows, tmp_path):
    from tyr.recovery import checkpoint

    s = settings(mode="full")
    train(teacher, pruned(teacher), windows, s, tmp_path, stop_after=4, progress=False)
    root = tmp_path / "checkpoints"
    assert [p.name for p in sorted(root.glob("step-*"))] == ["step-000002", "step-000004"]
    with open(root / "step-000004" / "optimizer.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage")
    assert checkpoint.latest(root).name == "step-000002"


def test_budget_larger_than_text_is_one_error(windows):
    order = schedule(12, [1.0, 1.0, 2.0])
    assert [order.count(i) for i in range(3)] == [3, 3, 6] and order[:4].count(2) == 2  # every prefix in proportion
    out = mix_windows([windows[:10], windows[10:20]], [1.0, 1.0], 20, seed=0)
    assert out.shape == (20, 32)
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, windows[:20].tolist()))  # all of the first 20
    assert torch.equal(mix_windows([windows[:10], windows[10:20]], [1.0, 1.0], 8, seed=0), out[:8])  # nested budgets
    assert not torch.equal(mix_windows([windows[:10], windows[10:20]], [1.0, 1.0], 8, seed=1), out[:8])
    with pytest.raises(RecoveryBudgetError, match="larger than the text.*wiki gets 15 windows but holds 10"):
        mix_windows([windows[:10], windows[10:20]], [1.0, 1.0], 30, seed=0, names=["wiki", "c4"])


def test_recovery_text_is_disjoint_from_calibration_search_and_evaluation():
    from tyr.recipes.checks import used_text

    for data in ("default", "fineweb_edu"):
        cfg = compose("pipeline", [f"data={data}", "data.root=/d"] if data != "default" else [])
        used = used_text(cfg.data, cfg.eval)
        assert {"calibration", "search", "gradient"} <= set(used) and "evaluation (wikitext2_test)" in used
        check_disjoint([s.source for s in cfg.recover.data], used)  # the shipped mix: no error
        bad = "general_search" if data == "default" else "parquet:/d/*.parquet[9000:12000]"
        with pytest.raises(RecoveryError, match="overlaps the (calibration|search) text"):
            check_disjoint([bad], used)
        check_disjoint(["parquet:/d/*.parquet[10000:20000]", "wikitext2_train"], used)
    with pytest.raises(RecoveryError, match="evaluation text"):
        check_disjoint(["wikitext2_test"], {})
    for name in ("lora", "full"):
        r = compose("recover", [f"recover={name}", "run=x"]).recover
        assert all(s.source in ("general_recovery",) or s.source.startswith(("jsonl:", "parquet:")) for s in r.data)


def test_sliced_model_saves_and_loads(teacher, windows, tmp_path):
    student = pruned(teacher)
    path = save_sliced(student, tmp_path / "s.safetensors", {"x": 1})
    back = load_sliced(teacher, path)
    with torch.no_grad():
        assert torch.equal(back(windows[:2]).logits, student(windows[:2]).logits)
    assert isinstance(get_adapter(back).attention(get_adapter(back).layers(back)[1]), EmptyAttention)


def test_settings_are_checked_and_keyed():
    with pytest.raises(RecoveryError, match="recover.mode"):
        settings(mode="qlora").validate()
    with pytest.raises(RecoveryError, match="less than one step"):
        settings(tokens=10).validate()
    s = settings()
    assert s.key("a", "t") == replace(s, checkpoint_every=7, device="cuda").key("a", "t")  # runtime only
    assert len({s.key("a", "t"), replace(s, lr=1e-3).key("a", "t"), s.key("b", "t"), s.key("a", "u")}) == 4


def test_recipe_recovers_a_prune_run_and_exports(tmp_path):
    """prune (tiny, uniform) -> recover (LoRA): before/after evaluation, loss plot, verified export;
    a rerun reuses it; other settings get another directory; bad settings and a budget beyond the
    text are one line on stderr with exit 2."""
    from test_recipes import run_recipe

    prune = tmp_path / "prune"
    p = run_recipe(
        "tyr.recipes.prune",
        "model=tiny-llama",
        "eval=smoke",
        "pruner=magnitude",
        "target_sparsity=0.5",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=64",
        f"hydra.run.dir={prune}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    args = [
        f"run={prune}",
        "eval=smoke",
        "eval.tasks=[]",
        "recover.tokens=1536",
        "recover.seq_len=64",
        "recover.batch_size=4",
        "recover.micro_batch_size=2",
        "recover.checkpoint_every=2",
        "recover.data=[{source:wikitext2_train,weight:1.0}]",
    ]
    # a budget beyond the text fails once the tokenizer is loaded: before the pruned model is rebuilt
    # (pruned_model.safetensors) and before a recovery directory is made (recover/ holds the recipe's log)
    p = run_recipe("tyr.recipes.recover", *args, "recover.tokens=100000000")
    assert p.returncode == 2 and "larger than the text" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (prune / "pruned_model.safetensors").exists() and not list((prune / "recover").glob("lora-*"))
    p = run_recipe("tyr.recipes.recover", f"run={prune}", "eval=smoke", "recover=none")
    assert p.returncode == 2 and "recover=none leaves nothing to do" in p.stderr and "Traceback" not in p.stderr
    p = run_recipe("tyr.recipes.recover", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    (out,) = (prune / "recover").glob("lora-*")
    res = json.loads((out / "results.json").read_text())
    assert res["recovery"]["tokens"] == 1536 and res["recovery"]["finished"] and res["recovery"]["steps"] == 6
    assert res["verify"]["max_abs_logit_diff"] <= 1e-4 and res["verify"]["generate_cache_equals_no_cache"]
    assert res["before"]["perplexity"]["wikitext2"]["ppl"] != res["after"]["perplexity"]["wikitext2"]["ppl"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6 and (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "hf_model" / "tyr_recovery.json").read_text())["recovery"]["mode"] == "lora"
    assert (prune / "pruned_model.safetensors").exists() and "wikitext2 perplexity" in p.stdout
    before = (out / "results.json").read_text()
    p = run_recipe("tyr.recipes.recover", *args)
    assert p.returncode == 0 and "already done" in p.stdout + p.stderr and (out / "results.json").read_text() == before
    p = run_recipe("tyr.recipes.recover", *args, "recover=full", "stop_after=1")
    assert p.returncode == 0, p.stderr[-3000:]
    (full,) = (prune / "recover").glob("full-*")
    assert not (full / "results.json").exists() and [c.name for c in (full / "checkpoints").iterdir()] == ["step-000001"]
    for bad, msg in (
        ("recover.tokens=100000000", "larger than the text"),
        ("recover.mode=qlora", "recover.mode"),
        ("recover.data=[{source:general_calibration,weight:1.0}]", "overlaps the calibration text"),
        ("recover.data=[{source:general_test,weight:1.0}]", "evaluation text"),
    ):
        p = run_recipe("tyr.recipes.recover", *args, bad)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr[-2000:])
    p = run_recipe("tyr.recipes.recover", "--help")
    assert p.returncode == 0 and "Examples" in p.stdout and "recover: full, lora" in p.stdout


def test_micro_batches_accumulate_to_the_full_batch(teacher, windows, tmp_path):
    """Two steps on batches of 4 windows, taken as micro-batches of 4, 2 and 1: the same weights (float64,
    so only a dropped or double-counted micro-batch could tell them apart)."""
    outs = []
    for micro in (4, 2, 1):
        s = settings(mode="full", tokens=2 * 4 * 32, micro_batch_size=micro, warmup=0.0, ce_weight=0.5)
        student, t = pruned(teacher).double(), copy.deepcopy(teacher).double()
        out, summary = train(t, student, windows, s, tmp_path / f"micro{micro}", progress=False)
        assert summary["steps"] == 2
        outs.append({k: v.clone() for k, v in out.state_dict().items()})
    moved = [k for k in outs[0] if not torch.equal(outs[0][k], pruned(teacher).double().state_dict()[k])]
    assert len(moved) > 10  # the steps changed the weights
    for other in outs[1:]:
        for k in outs[0]:
            torch.testing.assert_close(other[k], outs[0][k], atol=1e-10, rtol=1e-9)


def test_learning_rate_warms_up_then_decays_by_the_cosine():
    """Hand values: 10 steps, 20 % warm-up (2 steps), lr 1e-2, floor 0.1 x lr."""
    from tyr.recovery.trainer import learning_rate

    s = settings(tokens=10 * 4 * 32, lr=1e-2, warmup=0.2, min_lr_ratio=0.1)
    got = [learning_rate(s, k) for k in range(10)]
    assert got[0] == pytest.approx(0.5e-2) and got[1] == pytest.approx(1e-2) and got[2] == pytest.approx(1e-2)
    # the cosine over the remaining 8 steps: halfway (step 6) is halfway between lr and the floor
    assert got[6] == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert all(a > b for a, b in zip(got[2:], got[3:])) and got[-1] > 1e-3
