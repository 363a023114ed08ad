"""The evaluate recipe end to end on tiny-llama (subprocess, as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_DATA


def run_recipe(module: str, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_evaluate_recipe_writes_results(tmp_path):
    p = run_recipe("tyr.recipes.evaluate", "model=tiny-llama", "eval=smoke", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["perplexity"]) == {"general", "wikitext2", "ptb"}
    for r in res["perplexity"].values():
        assert r["windows"] == 2 and r["seq_len"] == 128 and r["ppl"] > 1
    assert set(res["zero_shot"]["scores"]) == {"arc_easy", "boolq"}
    assert res["model"] == "tiny-llama" and res["params"]["total"] > 0
    assert "| tiny-llama (dense)" in p.stdout


def test_evaluate_recipe_bad_model_name(tmp_path):
    p = run_recipe("tyr.recipes.evaluate", "model=nope", f"hydra.run.dir={tmp_path}")
    assert p.returncode != 0
    assert "model/nope" in p.stderr and "smollm2-135m" in p.stderr


def test_prune_recipe_tiny(tmp_path):
    (tmp_path / "layers.jsonl").write_text('{"layer": 0, "stale": "an interrupted earlier attempt"}\n')
    p = run_recipe(
        "tyr.recipes.prune",
        "model=tiny-llama",
        "eval=smoke",
        "pruner=hywia",
        "target_sparsity=0.5",
        "measure_dense_pass=true",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=64",
        "data.gradient.num_sequences=4",
        "data.gradient.seq_len=64",
        f"hydra.run.dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert abs(res["achieved_sparsity"] - 0.5) < 0.01 and res["pruner"] == "hywia"
    assert res["timings"]["prune_total_over_dense_fwd_bwd"] > 0
    lines = (tmp_path / "layers.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "alpha_fine" in json.loads(lines[0])["mlp_info"]  # the stale line is gone
    assert (tmp_path / "fusion_weights.png").stat().st_size > 1000


def test_build_recipe_reruns_resume(tmp_path):
    args = [
        "model=tiny-llama",
        "eval=smoke",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=64",
        "data.gradient.num_sequences=4",
        "data.gradient.seq_len=64",
        "supernet.min_channels=8",
        f"paths.output_dir={tmp_path}",
    ]
    p = run_recipe("tyr.recipes.build", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = tmp_path / "build" / "tiny-llama" / "hywia_comp-s0.5-expectation" / "supernet" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["complete"] and len(m["layers"]) == 4 and m["schema_version"] == 1
    before = manifest.read_text()
    p = run_recipe("tyr.recipes.build", *args, "evaluate_centre=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already complete" in p.stdout + p.stderr and manifest.read_text() == before
    assert json.loads((manifest.parent.parent / "results.json").read_text())["allocation"] == "centre"
    # another calibration set in the same directory is refused, naming the manifest
    p = run_recipe("tyr.recipes.build", *args, "data.calibration.seed=5")
    assert p.returncode != 0 and "manifest.json" in p.stderr and "another configuration" in p.stdout + p.stderr


def test_pipeline_recipe_tiny_end_to_end(tmp_path, monkeypatch, tiny):
    args = [
        "model=tiny-llama",
        "eval=smoke",
        *TINY_DATA,
        "search.min_channels=8",
        "search.generations=2",
        "search.offspring=4",
        "search.stages=[[64,2],[256,1]]",
        "search.surrogate_check=6",
        f"paths.output_dir={tmp_path}",
        "recover.tokens=512",
        "recover.seq_len=64",
        "recover.batch_size=4",
        "recover.data=[{source:wikitext2_train,weight:1.0}]",
    ]
    p = run_recipe("tyr.recipes.pipeline", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "pipeline" / "tiny-llama" / "hywia_comp-s0.5-medium"
    alloc = json.loads((run / "allocation.json").read_text())
    assert abs(alloc["budget"]["sparsity"] - 0.5) < 0.02  # real parameters (search.budget=real)
    assert len(alloc["modules"]["attn"]) == 4 and "kept_units" in alloc["modules"]["mlp"][0]
    res = json.loads((run / "results.json").read_text())
    rp = json.loads((run / "search_state.json").read_text())["reprune"]
    other = "searched_supernet"
    assert alloc["source"] == "reprune" and alloc["fitness"] == rp["kl_reprune"]  # choose_form's default
    assert len(res["iterations"]) == 2 and set(k.split()[1] for k in res["rows"]) == {
        "dense",
        "searched",
        other,
        "uniform",
        "uniform_reprune",
        "owl",
    }
    assert any(k.endswith("+ recovery (lora, 512 tokens)") for k in res["rows"])  # the recovery stage (tyr.recipes.recover)
    (recovered,) = (run / "recover").glob("lora-*/hf_model")  # the recovered model ships as its own folder, named
    assert res["exported"] == {"searched": str(run / "hf_model"), "searched + recovery": str(recovered)}
    assert f"exported (searched + recovery): {recovered}" in p.stdout
    verify = json.loads((recovered.parent / "results.json").read_text())["verify"]  # checked in a fresh process
    assert verify["max_abs_logit_diff"] <= 1e-4 and verify["generate_cache_equals_no_cache"]
    # the budget is the real target (half the dense prunable parameters) and every iteration keeps to it
    state = json.loads((run / "search_state.json").read_text())
    prunable_dense = alloc["budget"]["prunable_dense"]
    assert all(it["budget"] == round(0.5 * prunable_dense) >= it["cost"] for it in state["iterations"])
    # uniform_reprune is the prune recipe's model: every layer at the target within one MLP channel
    uni = json.loads((run / "results_uniform_reprune.json").read_text())
    assert abs(uni["budget"]["sparsity"] - 0.5) <= 4 * 3 * 64 / prunable_dense
    assert json.loads((run / f"results_{other}.json").read_text())["budget"]["prunable_kept"] == alloc["budget"]["prunable_kept"]
    assert (run / "hf_model" / "config.json").exists()
    assert json.loads((run / "export.json").read_text())["verify"]["max_abs_logit_diff"] <= 1e-4
    for f in ("history.jsonl", "search_fitness.png", "allocation.png", "teacher.safetensors"):
        assert (run / f).exists(), f
    # rerun: every stage is skipped, results unchanged
    before = (run / "results_searched.json").read_text()
    p = run_recipe("tyr.recipes.pipeline", *args)
    assert p.returncode == 0 and (run / "results_searched.json").read_text() == before
    # the recover recipe on this run takes the pipeline's evaluation of its searched model as "before"
    # when the protocol is the same (batching aside), and evaluates again when it is not
    from tyr.recipes.recover import pipeline_before

    searched = json.loads(before)
    p = run_recipe(
        "tyr.recipes.recover", f"run={run}", "eval=smoke", *[a for a in args if a.startswith("recover.")], "recover.tokens=1024"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the pipeline's own evaluation of its searched model" in p.stdout + p.stderr
    (rec,) = [
        d for d in (run / "recover").glob("lora-*") if json.loads((d / "results.json").read_text())["recovery"]["tokens"] == 1024
    ]
    assert json.loads((rec / "results.json").read_text())["before"]["perplexity"] == searched["perplexity"]
    smoke = searched["config"]["eval"]
    assert pipeline_before(run, {**smoke, "batch_size": 3}) is not None
    assert pipeline_before(run, {**smoke, "ppl_windows": smoke["ppl_windows"] + 1}) is None
    # without searched_other in compare, the form that did not ship is not a row
    p = run_recipe("tyr.recipes.pipeline", *args, "compare=[dense,uniform_reprune]")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert {k.split()[1] for k in rows if "recovery" not in k} == {"dense", "searched", "uniform_reprune"}
    # another task limit redoes the zero-shot part only: the perplexity windows are read back
    p = run_recipe("tyr.recipes.pipeline", *args, "compare=[dense,uniform_reprune]", "eval.limit=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "results_searched.json was evaluated with other settings" in p.stdout + p.stderr
    assert "re-evaluating all but its perplexity" in p.stdout + p.stderr
    again = json.loads((run / "results_searched.json").read_text())
    assert again["perplexity"] == searched["perplexity"] and again["zero_shot"]["limit"] == 2
    assert set(again["zero_shot"]["samples"].values()) == {2} and searched["zero_shot"]["limit"] == 4
    # an export whose check fails leaves the verified folder as it was, and no staging folder behind
    import tyr.pipeline.export as px
    import tyr.recipes.export as rx
    from tyr.export import ExportVerificationError

    def failing_check(*args, **kwargs):
        raise ExportVerificationError("injected")

    shipped = {f.name: f.read_bytes() for f in (run / "hf_model").iterdir()}
    monkeypatch.setattr(px, "verify_export", failing_check)
    with pytest.raises(ExportVerificationError):
        rx.export_run(run, overwrite=True)
    assert {f.name: f.read_bytes() for f in (run / "hf_model").iterdir()} == shipped
    assert not [f.name for f in run.iterdir() if f.name.startswith(".hf_model")]
    # the fidelity study's allocations (experiments/fidelity.py) all have the searched model's real size:
    # each fits the budget, and the ones fitted to it (uniform, OWL) leave less than one level's step free
    from experiments.fidelity import allocations
    from tyr.search.budget import allocation_cost
    from tyr.search_state import resolved
    from tyr.supernet.costs import real_costs
    from tyr.supernet.store import SupernetStore

    state = resolved(state, run)
    owl = {k: [1] * len(v) for k, v in state["iterations"][0]["levels"].items()}  # any levels: fitted
    allocs = allocations(state, tiny.model, True, owl=owl, uniform_keep=uni["kept"])
    assert {a["name"] for a in allocs} >= {"uniform", "searched", "owl", "uniform_recipe", "searched+32#1", "uniform+16#1"}
    budget = state["iterations"][0]["budget"]
    for a in allocs:
        if "levels" not in a:
            continue
        costs = real_costs(SupernetStore.open(a["supernet"]), tiny.model)
        cost = allocation_cost(costs, a["levels"])
        assert cost <= budget, a["name"]
        if a["name"] in ("uniform", "owl"):
            step = max(c[i] - c[i + 1] for k in costs for c in costs[k] for i in range(len(c) - 1))
            assert budget - cost < step, a["name"]


def test_multirun_records_a_failed_job_and_goes_on(tmp_path):
    p = run_recipe(
        "tyr.recipes.evaluate",
        "-m",
        "model=tiny-llama",
        "eval=smoke",
        "eval.tasks=[]",
        "eval.seq_len=64,100000000",
        f"paths.output_dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "multirun" / "evaluate").glob("*/*") if p.is_dir())
    assert len(jobs) == 2
    ok = [j for j in jobs if (j / "results.json").exists()]
    failed = [j for j in jobs if (j / "failed.json").exists()]
    assert len(ok) == 1 and len(failed) == 1 and "eval.seq_len=100000000" in failed[0].name
    assert "TextTooShortError" in json.loads((failed[0] / "failed.json").read_text())["error"]


def test_sweep_2x2_and_summary(tmp_path):
    p = run_recipe(
        "tyr.recipes.prune",
        "-m",
        "model=tiny-llama",
        "eval=smoke",
        "pruner=magnitude,wanda_sp",
        "target_sparsity=0.25,0.5",
        "data.calibration.num_sequences=8",
        "data.calibration.seq_len=64",
        f"paths.output_dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "prune").iterdir()
    jobs = [d for d in sweep.iterdir() if d.is_dir()]
    assert len(jobs) == 4 and all("pruner=" in d.name and "target_sparsity=" in d.name for d in jobs)
    s = subprocess.run([sys.executable, "-m", "experiments.summarize", str(sweep)], cwd=ROOT, capture_output=True, text=True)
    assert s.returncode == 0, s.stderr[-2000:]
    side_by_side, long = (sweep / "summary.md").read_text().split("\n\n", 1)
    for m in ("magnitude / lstsq", "wanda_sp / lstsq"):  # one line with both sparsities; one row per job
        assert side_by_side.count(m) == 1 and long.count(m) == 2
    assert "WikiText-2 @25% | PTB @25% | avg @25% | avg w/o BoolQ @25% | WikiText-2 @50%" in side_by_side
    rows = list(__import__("csv").DictReader(open(sweep / "summary.csv")))
    assert sorted(float(r["sparsity"]) for r in rows) == [0.25, 0.25, 0.5, 0.5]
    assert all(abs(float(r["achieved"]) - float(r["sparsity"])) < 0.01 for r in rows)
    assert (sweep / "ppl_vs_sparsity.png").exists() and (sweep / "acc_vs_sparsity.png").exists()


def test_missing_weights_is_one_clear_message_not_a_traceback(tmp_path):
    p = run_recipe("tyr.recipes.pipeline", "model=llama3-70b", f"paths.output_dir={tmp_path}")
    assert p.returncode == 2
    assert "no weights found" in p.stderr and "model.source.path=" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_pipeline_recovery_budget_beyond_the_text_fails_before_the_search(tmp_path):
    """The recovery stage comes last, but its budget is checked against its text as soon as the
    tokenizer is loaded: one line, exit 2, nothing built."""
    p = run_recipe(
        "tyr.recipes.pipeline",
        "model=tiny-llama",
        "eval=smoke",
        *TINY_DATA,
        "search.stages=[[64,2],[256,1]]",
        f"paths.output_dir={tmp_path}",
        "recover.tokens=100000000",
        "recover.seq_len=64",
        "recover.data=[{source:wikitext2_train,weight:1.0}]",
    )
    assert p.returncode == 2 and "larger than the text" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    assert not list(tmp_path.rglob("*.safetensors"))  # no statistics, supernet or model written


def test_summarize_merges_roots_dedups_dense_and_writes_report(tmp_path):
    """Two sweep roots (a uniform prune job and a pipeline run, each with a dense row of the same
    protocol): one dense row, the searched row first at its sparsity, the allocation plot, a report page."""
    from experiments.summarize import allocation_plot, collect_all, report_page

    zs = {"scores": {"arc_easy": 0.5}, "average": 0.5, "limit": 100}
    dense = {"model": "m", "params": {"total": 100}, "perplexity": {"wikitext2": {"ppl": 10.0}}, "zero_shot": zs}
    a, b = tmp_path / "sweep" / "job0", tmp_path / "pipe" / "run"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (a / "results.json").write_text(
        json.dumps(
            {
                **dense,
                "pruner": "magnitude",
                "reconstruction": "none",
                "target_sparsity": 0.5,
                "achieved_sparsity": 0.5,
                "perplexity": {"wikitext2": {"ppl": 99.0}},
            }
        )
    )
    (tmp_path / "sweep" / "dense").mkdir()
    (tmp_path / "sweep" / "dense" / "results.json").write_text(json.dumps(dense))
    rows = {
        "m dense": {**dense, "allocation": "dense"},
        "m searched 50%": {
            **dense,
            "allocation": "searched",
            "perplexity": {"wikitext2": {"ppl": 50.0}},
            "config": {"target_sparsity": 0.5, "pruner": {"name": "hywia"}},
        },
    }
    (b / "results.json").write_text(json.dumps({"rows": rows}))
    (b.parent / "rerun").mkdir()
    (b.parent / "rerun" / "results.json").write_text(json.dumps({"rows": rows}))  # same results again
    mods = {k: [{"layer": l, "kept": 2, "units": 4} for l in range(3)] for k in ("attn", "mlp")}
    (b / "allocation.json").write_text(json.dumps({"modules": mods, "budget": {"nominal_sparsity": 0.5}}))
    got, failed = collect_all([tmp_path / "sweep", tmp_path / "pipe"])
    assert [r["method"] for r in got] == ["dense (m)", "tyr search (hywia)", "magnitude / none"] and not failed
    assert [r["wikitext2"] for r in got] == [10.0, 50.0, 99.0]
    assert got[0]["avg_no_boolq"] == 0.5  # ARC-e alone here
    img = allocation_plot([tmp_path / "pipe"], tmp_path)
    assert img is not None and img.stat().st_size > 1000
    page = report_page(got, failed, [tmp_path / "sweep"], tmp_path / "report", [img])
    text = page.read_text()
    assert "tyr search (hywia)" in text and "![allocation_per_layer](allocation_per_layer.png)" in text
    assert (tmp_path / "report" / "allocation_per_layer.png").exists()


def test_summarize_side_by_side_table_and_update_section(tmp_path):
    """The per-method table puts dense first, the searched row next, uniform rows by 50 % perplexity,
    each sparsity in its own columns; --update rewrites only the marked section of a document."""
    from experiments.summarize import pivot, update_section

    def row(method, sp, wiki):
        return {
            "method": method,
            "sparsity": sp,
            "wikitext2": wiki,
            "ptb": 2 * wiki,
            "avg": 0.4,
            "limit": 100,
            "avg_no_boolq": 0.6,
        }

    rows = [
        row("dense (m)", 0.0, 10.0),
        row("b / none", 0.25, 30.0),
        row("b / none", 0.5, 90.0),
        row("a / lstsq", 0.25, 40.0),
        row("a / lstsq", 0.5, 60.0),
        row("tyr search (a)", 0.5, 50.0),
    ]
    lines = pivot(rows).splitlines()
    assert lines[0].startswith("| method | WikiText-2 @25% | PTB @25% | avg @25% | avg w/o BoolQ @25% | WikiText-2 @50%")
    assert [l.split(" | ")[0][2:] for l in lines[2:]] == ["dense (m)", "tyr search (a)", "a / lstsq", "b / none"]
    assert lines[2].count("10.00") == 2 and lines[3].split(" | ")[1:5] == ["-", "-", "-", "-"]
    assert lines[5].split(" | ")[1:3] == ["30.00", "60.00"]
    assert lines[2].split(" | ")[4] == "60.00"  # the average without BoolQ
    doc = tmp_path / "RESULTS.md"
    doc.write_text("intro\n<!-- summary:begin -->\nold\n<!-- summary:end -->\noutro\n")
    update_section(doc, "new table\n")
    assert doc.read_text() == "intro\n<!-- summary:begin -->\nnew table\n<!-- summary:end -->\noutro\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- summary:begin -->"):
        update_section(plain, "t")


def test_finished_result_ignores_speed_settings_only(tmp_path):
    """A sweep rerun skips a job whose saved config matches, whatever the thread count, paths or
    evaluation batching; any other change (sparsity, an evaluation setting) reruns it."""
    from omegaconf import OmegaConf

    from tyr.recipes.common import finished_result

    base = {
        "target_sparsity": 0.5,
        "threads": 2,
        "paths": {"output_dir": "a"},
        "eval": {"limit": 100, "batch_size": 16, "ppl_batch_size": 1},
    }
    (tmp_path / "results.json").write_text(json.dumps({"ppl": 1.0, "config": base}))

    def check(**change):
        cfg = json.loads(json.dumps(base))
        for key, value in change.items():
            node, *path = key.split("__")
            if path:
                cfg[node][path[0]] = value
            else:
                cfg[node] = value
        return finished_result(tmp_path, OmegaConf.create(cfg))

    assert check() == {"ppl": 1.0, "config": base}
    assert check(threads=1, paths={"output_dir": "b"}, eval__batch_size=4, eval__logits_mb=256) is not None
    assert check(target_sparsity=0.25) is None
    assert check(eval__limit=None) is None
    assert finished_result(tmp_path / "nothing", OmegaConf.create(base)) is None
