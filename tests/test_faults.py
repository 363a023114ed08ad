"""Fault injection on tiny-llama (issue #16): kill -9 at seeded points of the build, the search, the
re-prune and the export; corruption of every artifact type; every bad-setting case. Each must end in
artifacts identical to an uninterrupted run (the oracle: a reference run of the same command), or
in a one-line error (exit 2, no traceback, no stray directory, the run's record untouched).

Kills use the ``TYR_FAULT=<point>:<n>`` hook (tyr.artifacts.fault_point: SIGKILL at the n-th
arrival) or a SIGKILL from outside after a seeded random delay."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_DATA

SEED = 16
RNG = random.Random(SEED)
LAYERS, ITERATIONS, GENERATIONS = 4, 2, 2
BASE = [
    "model=tiny-llama",
    "eval=smoke",
    "eval.tasks=[]",
    *TINY_DATA,
    "search.min_channels=8",
    f"search.generations={GENERATIONS}",
    "search.offspring=4",
    "search.stages=[[64,2],[256,1]]",
    "search.surrogate_check=4",
    "compare=[]",
    "export=false",
    "recover=none",
]  # the recovery stage (its own kill / resume tests: test_recovery.py) would take 45 s per run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache (token sets, Taylor statistics) that shares the converted tokenizer model."""
    c = tmp_path_factory.mktemp("cache")
    real = Path(os.environ.get("TYR_CACHE") or Path.home() / ".cache" / "tyr") / "models"
    (c / "models").symlink_to(real)
    return c


def _env(**extra) -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TYR_THREADS="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    env.pop("TYR_FAULT", None)
    env.update(extra)
    return env


def pipeline(
    run: Path,
    cache: Path,
    *extra: str,
    fault: str | None = None,
    kill_after: float | None = None,
    module: str = "tyr.recipes.pipeline",
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *BASE, f"hydra.run.dir={run}", f"paths.cache_dir={cache}", *extra]
    env = _env(**({"TYR_FAULT": fault} if fault else {}))
    if kill_after is None:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(kill_after)
    p.send_signal(signal.SIGKILL)
    out, err = p.communicate()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(run: Path) -> dict:
    """Everything a run decided, without wall-clock fields: the allocation, every supernet shard,
    the teacher cache, the search state and history, the searched model's perplexity."""
    state = json.loads((run / "search_state.json").read_text())
    timing = {"build_seconds", "search_seconds", "seconds", "time", "time_s"}

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in timing}
        return [strip(v) for v in d] if isinstance(d, list) else d

    history = [strip(json.loads(l)) for l in (run / "history.jsonl").read_text().splitlines()]
    res = json.loads((run / "results_searched.json").read_text())
    return {
        "allocation": json.loads((run / "allocation.json").read_text()),
        "shards": {str(p.relative_to(run)): sha(p) for p in sorted(run.glob("*/supernet/layer_*.safetensors"))},
        "teacher": sha(run / "teacher.safetensors"),
        "state": strip(state),
        "history": history,
        "ppl": {k: v["ppl"] for k, v in res["perplexity"].items()},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("ref") / "run"
    p = pipeline(run, cache)
    assert p.returncode == 0, p.stderr[-3000:]
    return run, snapshot(run)


def copy_of(reference, tmp_path) -> Path:
    run = tmp_path / "moved" / "run"  # another place: paths in the run state are relative
    shutil.copytree(reference[0], run)
    return run


def flip_byte(path: Path, offset_from_end: int = 5) -> None:
    b = bytearray(path.read_bytes())
    b[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(b))


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [l for l in p.stderr.splitlines() if l.startswith("tyr: ")]
    assert len(lines) == 1 and "Traceback" not in p.stderr + p.stdout, p.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_reference_bookkeeping(reference):
    """The uninterrupted run's own bookkeeping: relative paths, one record per generation."""
    run, snap = reference
    state = json.loads((run / "search_state.json").read_text())
    assert all(not Path(it["supernet"]).is_absolute() for it in state["iterations"])
    assert not Path(state["reprune"]["supernet"]).is_absolute()
    keys = [(h["iteration"], h["generation"]) for h in snap["history"]]
    assert keys == [(i, g) for i in range(ITERATIONS) for g in range(GENERATIONS)]
    assert all("surrogate" in it for it in state["iterations"])


# --- kill -9 ---------------------------------------------------------------------------------------

KILLS = [
    pytest.param("build.layer", RNG.randint(1, LAYERS * ITERATIONS), id="build"),
    pytest.param("search.generation", RNG.randint(1, GENERATIONS * ITERATIONS), id="search"),
    pytest.param("build.layer", LAYERS * ITERATIONS + RNG.randint(1, LAYERS), id="reprune", marks=pytest.mark.slow),
    pytest.param("build.checkpoint", RNG.randint(1, LAYERS * ITERATIONS), id="checkpoint", marks=pytest.mark.slow),
    pytest.param("write_verified", RNG.randint(2, 6), id="verified-write", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("point,n", KILLS)
def test_kill_at_a_point_then_rerun_is_identical(reference, cache, tmp_path, point, n):
    run = tmp_path / "run"
    p = pipeline(run, cache, fault=f"{point}:{n}")
    assert p.returncode == -signal.SIGKILL, (point, n, p.returncode, p.stderr[-2000:])
    p = pipeline(run, cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert snapshot(run) == reference[1]
    for m in run.glob("*/supernet/manifest.json"):  # timings survive the kill: at least the layers' own time
        man = json.loads(m.read_text())
        assert man["build_seconds_total"] >= sum(l["info"]["seconds"] for l in man["layers"].values())


def test_carried_small_state_alone_reruns_identically(reference, cache, tmp_path):
    """A run moved to another machine as experiments/claim.py carries it (config, stage records, search state and
    history, results; no shard, no teacher cache): nothing is searched again, the teacher and the re-prune are
    made again byte for byte, and the searched model's results are the same."""
    from experiments.claim import carry_files

    src, run = reference[0], tmp_path / "run"
    for p in carry_files(src):
        dst = run / p.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    assert not list(run.glob("*/supernet")) and not (run / "teacher.safetensors").exists()
    p = pipeline(run, cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list(run.glob("iter*"))  # no iteration ran again: each needs its supernet
    snap, ref = snapshot(run), reference[1]
    assert snap["shards"] == {k: v for k, v in ref["shards"].items() if k.startswith("reprune/")}
    assert {k: v for k, v in snap.items() if k != "shards"} == {k: v for k, v in ref.items() if k != "shards"}


@pytest.mark.slow
@pytest.mark.parametrize("delay", [round(RNG.uniform(3.0, 10.0), 2) for _ in range(3)])
def test_kill_after_a_random_delay_then_rerun_is_identical(reference, cache, tmp_path, delay):
    """SIGKILL from outside after a seeded random delay (a warm run takes ~12 s on one thread; on a
    faster machine the delay is halved until the kill lands before the end)."""
    run = tmp_path / "run"
    while (p := pipeline(run, cache, kill_after=delay)).returncode == 0 and delay > 0.5:
        shutil.rmtree(run)
        delay /= 2
    assert p.returncode == -signal.SIGKILL, (delay, p.returncode)
    p = pipeline(run, cache)
    assert p.returncode == 0, (delay, p.stderr[-3000:])
    assert snapshot(run) == reference[1]


@pytest.mark.slow
def test_kill_during_export_then_rerun_exports_the_same_folder(reference, cache, tmp_path):
    a, b = copy_of(reference, tmp_path / "a"), copy_of(reference, tmp_path / "b")
    assert pipeline(a, cache, "export=true").returncode == 0
    p = pipeline(b, cache, "export=true", fault="export.record:1")
    assert p.returncode == -signal.SIGKILL and not (b / "export.json").exists()
    assert pipeline(b, cache, "export=true").returncode == 0
    files = sorted(f.relative_to(a / "hf_model") for f in (a / "hf_model").rglob("*") if f.is_file())
    assert files and all(sha(a / "hf_model" / f) == sha(b / "hf_model" / f) for f in files)


# --- corruption ------------------------------------------------------------------------------------


def test_corrupt_activation_checkpoint_is_rebuilt(reference, cache, tmp_path):
    run = tmp_path / "run"
    p = pipeline(run, cache, fault="build.layer:2")  # the checkpoint after layer 1 is on disk
    assert p.returncode == -signal.SIGKILL
    ck = run / "iter0" / "supernet" / "activations.safetensors"
    assert ck.exists()
    flip_byte(ck, 9)
    p = pipeline(run, cache)
    assert p.returncode == 0 and "is corrupt" in p.stdout + p.stderr and "rebuilding" in p.stdout + p.stderr, p.stderr[-2000:]
    assert snapshot(run) == reference[1]


def test_corrupt_teacher_cache_is_rebuilt(reference, cache, tmp_path):
    run = copy_of(reference, tmp_path)
    flip_byte(run / "teacher.safetensors")
    p = pipeline(run, cache)
    assert p.returncode == 0 and "teacher.safetensors is corrupt" in p.stdout + p.stderr, p.stderr[-2000:]
    assert snapshot(run) == reference[1]


def test_corrupt_taylor_cache_is_rebuilt(reference, cache, tmp_path):
    run = copy_of(reference, tmp_path)
    (taylor,) = (cache / "taylor").glob("*.safetensors")
    good = taylor.read_bytes()
    flip_byte(taylor)
    p = pipeline(run, cache)
    assert p.returncode == 0 and "is corrupt" in p.stdout + p.stderr, p.stderr[-2000:]
    assert taylor.read_bytes() == good and snapshot(run) == reference[1]


def _chosen_store(run: Path) -> Path:
    return (run / json.loads((run / "allocation.json").read_text())["manifest"]).parent


@pytest.mark.parametrize("what", ["shard", "manifest", "search_state", "results", "stage_record"])
def test_corrupt_result_is_one_line_naming_file_and_repair(reference, cache, tmp_path, what):
    run = copy_of(reference, tmp_path)
    target, words = {
        "shard": (_chosen_store(run) / "layer_001.safetensors", ["layer_001.safetensors", "redo=search"]),
        "manifest": (_chosen_store(run) / "manifest.json", ["manifest.json", "not valid JSON", "redo=search"]),
        "search_state": (run / "search_state.json", ["search_state.json", "redo=search"]),
        "results": (run / "results_searched.json", ["results_searched.json", "redo=evaluate"]),
        "stage_record": (run / "stages" / "search.json", ["search.json", "not valid JSON"]),
    }[what]
    if target.suffix == ".json":
        target.write_text(target.read_text()[: len(target.read_text()) // 2])  # cut short, as a full disk would
    else:
        flip_byte(target, 50)
    config = (run / ".hydra" / "config.yaml").read_bytes()
    one_line_error(pipeline(run, cache), *words)
    assert (run / ".hydra" / "config.yaml").read_bytes() == config
    if what == "results":  # the command the message names repairs it
        assert pipeline(run, cache, "redo=evaluate").returncode == 0
        assert snapshot(run) == reference[1]


# --- reruns with other settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,stage,setting",
    [
        ("search.generations=3", "search", "search.generations: 2 -> 3"),
        ("search.n_levels=5", "search", "search.n_levels: 9 -> 5"),
        ("data.search.seed=7", "prepare", "data.search.seed: 1 -> 7"),
        ("search.topk=64", "prepare", "search.topk: 256 -> 64"),
        ("data.calibration.seed=3", "search", "data.calibration.seed: 0 -> 3"),
    ],
)
def test_rerun_with_other_settings_is_refused_and_leaves_the_run_untouched(reference, cache, tmp_path, override, stage, setting):
    run = copy_of(reference, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    msg = one_line_error(pipeline(run, cache, override), setting, f"redo={stage}")
    assert "Traceback" not in msg
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # .hydra/config.yaml included


def test_failed_rerun_restores_the_config_record(reference, cache, tmp_path):
    """An accepted rerun (other evaluation settings) that fails leaves .hydra/ as it was."""
    run = copy_of(reference, tmp_path)
    config = (run / ".hydra" / "config.yaml").read_bytes()
    p = pipeline(run, cache, "eval.seq_len=100000000")
    one_line_error(p, "asked for")
    assert (run / ".hydra" / "config.yaml").read_bytes() == config
    assert (
        json.loads((run / "results_searched.json").read_text())["perplexity"]
        == json.loads((reference[0] / "results_searched.json").read_text())["perplexity"]
    )


def test_other_eval_settings_reevaluate_and_redo_search_remakes_identically(reference, cache, tmp_path):
    run = copy_of(reference, tmp_path)
    p = pipeline(run, cache, "eval.ppl_windows=1")
    said = "evaluated with other settings (eval.ppl_windows: 2 -> 1)"
    assert p.returncode == 0 and said in p.stdout + p.stderr, p.stderr[-2000:]
    res = json.loads((run / "results_searched.json").read_text())
    assert all(r["windows"] == 1 for r in res["perplexity"].values())


def _search_files(run: Path) -> dict:
    pats = ("search_state.json", "history.jsonl", "iter*/**/*", "reprune/**/*", "teacher.safetensors")
    return {str(p.relative_to(run)): sha(p) for pat in pats for p in run.glob(pat) if p.is_file()}


def test_other_form_choice_reuses_the_search(reference, cache, tmp_path):
    """``search.choose_form`` / ``search.reprune`` pick a form of the searched widths downstream of the
    search: a changed choice keeps every search artifact byte for byte and evaluates the newly chosen
    form, the last iteration's supernet variants. A run whose search record was written while they
    were in the search key (the record holds them), and before ``search.start`` existed, is accepted
    for its own settings; ``search.start=recipe`` is another search and is refused in one line."""
    run = copy_of(reference, tmp_path)
    before = _search_files(run)
    state = json.loads((run / "search_state.json").read_text())
    last = state["iterations"][-1]
    for override in ("search.choose_form=supernet", "search.reprune=false"):
        p = pipeline(run, cache, override)
        assert p.returncode == 0, p.stderr[-2000:]
        assert _search_files(run) == before
        alloc = json.loads((run / "allocation.json").read_text())
        assert alloc["source"] == "supernet" and _chosen_store(run) == run / last["supernet"]
        res = json.loads((run / "results_searched.json").read_text())
        assert Path(res["supernet"]).resolve() == (run / last["supernet"]).resolve()
        assert snapshot(run)["ppl"] != reference[1]["ppl"]  # another model than the reference's re-prune form
    record = run / "stages" / "search.json"
    old = json.loads(record.read_text())
    old["settings"]["search"].update(reprune=True, choose_form="reprune")  # as the earlier version wrote it,
    assert old["settings"]["search"].pop("start") == "fitted"  # before search.start existed
    record.write_text(json.dumps(old))
    p = pipeline(run, cache)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _search_files(run) == before and json.loads((run / "allocation.json").read_text())["source"] == "reprune"
    assert snapshot(run)["ppl"] == reference[1]["ppl"]  # the re-prune form evaluated again, as the reference did
    p = pipeline(run, cache, "search.start=recipe")
    assert p.returncode == 2 and 'search.start: "fitted" -> "recipe"' in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_redo_search_remakes_the_same_artifacts(reference, cache, tmp_path):
    run = copy_of(reference, tmp_path)
    flip_byte(_chosen_store(run) / "layer_002.safetensors", 50)
    assert pipeline(run, cache, "redo=search").returncode == 0
    assert snapshot(run) == reference[1]


# --- bad settings, each refused before anything is loaded or created -------------------------------


def _bad_files(tmp: Path) -> dict:
    (tmp / "bad_line.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (tmp / "no_text.jsonl").write_text('{"body": "no text key"}\n')
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    (no_weights / "tokenizer.json").write_text("{}")
    no_tok = tmp / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text("{}")
    (no_tok / "model.safetensors").write_bytes(b"\0" * 16)
    not_run = tmp / "not_a_run"
    not_run.mkdir()
    from tyr.data import data_dir

    return {
        "boolq": data_dir() / "boolq" / "dev.jsonl",
        "bad_line": tmp / "bad_line.jsonl",
        "no_text": tmp / "no_text.jsonl",
        "no_weights": no_weights,
        "no_tok": no_tok,
        "not_run": not_run,
    }


BAD = [  # (recipe, overrides, words in the one-line message)
    ("pipeline", ["target_sparsity=1.0"], ["target_sparsity=1.0"]),
    ("pipeline", ["target_sparsity=1.5"], ["target_sparsity=1.5"]),
    ("pipeline", ["search.n_levels=1"], ["search.n_levels=1"]),
    ("pipeline", ["search.n_levels=4"], ["search.n_levels=4"]),
    ("pipeline", ["search.generations=0"], ["search.generations=0"]),
    ("pipeline", ["compare=[dense,foo]"], ["compare", "foo"]),
    ("pipeline", ["search.offspring=0"], ["search.offspring=0"]),
    ("pipeline", ["search.holdout=1.0"], ["search.holdout=1.0"]),
    ("pipeline", ["search.intervals=[]"], ["search.intervals"]),
    ("pipeline", ["search.stages=[[1000,2],[100000,1]]"], ["search.stages", "100000"]),
    # the held-out block leaves too few tokens
    ("pipeline", ["search.holdout=0.9", "data.search.num_sequences=8"], ["search.stages"]),
    ("pipeline", ["data.calibration.source=jsonl:{tmp}/missing.jsonl"], ["data.calibration.source", "missing.jsonl"]),
    ("pipeline", ["data.search.source=jsonl:{bad_line}"], ["data.search.source", "bad_line.jsonl:2", "not a JSON line"]),
    ("pipeline", ["data.calibration.source=jsonl:{no_text}"], ["no_text.jsonl:1", "'text'"]),
    ("pipeline", ["data.calibration.source=wikitext3"], ["unknown text source", "wikitext3"]),
    # evaluation text is refused for every stage (issue #32): test splits, the general dev set, evaluation files
    ("pipeline", ["data.search.source=general_test"], ["data.search.source", "'general_test'", "evaluation text"]),
    ("pipeline", ["data.calibration.source='c4[0:100]+wikitext2_test'"], ["data.calibration.source", "'wikitext2_test'"]),
    ("pipeline", ["data.gradient.source=general_dev"], ["data.gradient.source", "'general_dev'", "evaluation text"]),
    ("pipeline", ["recover=lora", "recover.data=[{{source: ptb_test, weight: 1.0}}]"], ["recover.data", "'ptb_test'"]),
    ("prune", ["data.calibration.source=general_test"], ["data.calibration.source", "'general_test'"]),
    ("build", ["data.calibration.source=jsonl:{boolq}"], ["data.calibration.source", "evaluation text"]),
    ("pipeline", ["data.calibration.seq_len=0"], ["data.calibration.seq_len=0"]),
    ("pipeline", ["data.calibration.num_sequences=0"], ["data.calibration.num_sequences=0"]),
    ("pipeline", ["model=hf_folder"], ["model.source.path="]),
    ("pipeline", ["model=hf_folder", "model.source.path={no_weights}"], ["no_weights", "weights"]),
    ("pipeline", ["model=hf_folder", "model.source.path={no_tok}"], ["no_tokenizer", "tokenizer"]),
    ("pipeline", ["redo=everything"], ["redo=everything"]),
    ("pipeline", ["eval.tasks=[arc_easy,foo]"], ["eval.tasks", "foo"]),
    ("build", ["supernet.n_levels=4"], ["supernet.n_levels=4"]),
    ("build", ["target_sparsity=0"], ["target_sparsity=0"]),
    ("prune", ["data.calibration.seq_len=0"], ["data.calibration.seq_len=0"]),
    ("evaluate", ["eval.seq_len=0"], ["eval.seq_len=0"]),
    ("export", ["run={tmp}/nowhere"], ["run=", "no such directory"]),
    ("export", ["run={not_run}"], ["allocation.json"]),
    ("plan", ["model=hf_folder"], ["arch"]),
    ("plan", ["target_sparsity=1.5"], ["target_sparsity=1.5"]),
    ("plan", ["search=paper", "search.n_levels=4"], ["search.n_levels=4"]),
]


def _run_in_process(recipe: str, overrides: list[str], capsys) -> tuple[int, str]:
    """The recipe's real Hydra entry point, in this process (fast: no interpreter start-up)."""
    import importlib

    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF

    mod = importlib.import_module(f"tyr.recipes.{recipe}")

    # the same task function and config, with conf/ given as an absolute path (the module's relative
    # config_path is resolved against the module only when it runs as __main__)
    def accepted(cfg):  # the recipe body never runs here: these settings must be refused before it
        raise AssertionError("the settings were accepted")

    accepted.__module__ = mod.__name__  # Hydra names the job after the task function's module
    app = hydra.main(config_path=str(CONF), config_name=recipe, version_base="1.3")(accepted)
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = [f"tyr.recipes.{recipe}", *overrides]
    try:
        with pytest.raises(SystemExit) as e:
            app()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("recipe,overrides,words", BAD, ids=[" ".join(b[1]) + f" ({b[0]})" for b in BAD])
def test_bad_setting_is_one_line_before_anything_is_made(tmp_path, capsys, recipe, overrides, words):
    files = {k: str(v) for k, v in _bad_files(tmp_path).items()}
    overrides = [o.format(tmp=tmp_path, **files) for o in overrides]
    out = tmp_path / "out"
    base = ["model=tiny-llama"] if recipe != "export" and not any(o.startswith("model=") for o in overrides) else []
    code, err = _run_in_process(recipe, base + overrides + ([] if recipe == "export" else [f"paths.output_dir={out}"]), capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tyr: "), err
    for w in words:
        assert w.format(tmp=tmp_path, **files) in lines[0], (w, lines[0])
    assert not out.exists() and not any(Path(files["not_run"]).iterdir())  # no run directory, no export_logs/


def test_bad_setting_from_the_command_line(tmp_path):
    """The same refusal as a user sees it: exit 2, one line on stderr, no traceback, no directory."""
    p = pipeline(tmp_path / "run", tmp_path / "cache", "target_sparsity=1.0")
    one_line_error(p, "target_sparsity=1.0")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    p = subprocess.run(
        [sys.executable, "-m", "tyr.recipes.export", f"run={tmp_path}/nowhere"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    one_line_error(p, "no such directory")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("obstacle", ["dangling_link", "file_in_the_way", "no_permission"])
def test_run_directory_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch, obstacle):
    """A fresh clone with a ``runs`` link to another machine's folder (issue #31), a file where the run
    directory's parent should be, a folder without write permission: exit 2, one line naming the
    obstacle, nothing made, before anything loads (the recipe body never runs)."""
    out = tmp_path / "runs"
    words = {"dangling_link": "does not exist", "file_in_the_way": "is a file", "no_permission": "no permission"}[obstacle]
    if obstacle == "dangling_link":
        out.symlink_to(tmp_path / "elsewhere" / "runs")
    elif obstacle == "file_in_the_way":
        out.write_text("not a directory")
    else:
        out.mkdir()
        real_access = os.access  # root may write anywhere: the refusal is tested through the check's own probe
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out else real_access(p, mode, **kw))
    before = sorted(tmp_path.rglob("*"))
    code, err = _run_in_process("pipeline", ["model=tiny-llama", f"paths.output_dir={out}"], capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tyr: run directory ") and words in lines[0], err
    assert sorted(tmp_path.rglob("*")) == before
    code, err = _run_in_process("pipeline", ["-m", "model=tiny-llama", f"paths.output_dir={out}"], capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tyr: sweep directory ") and words in lines[0], err
    assert sorted(tmp_path.rglob("*")) == before


def test_replaced_weights_are_a_new_model(tmp_path, monkeypatch):
    """A local checkpoint is identified by its content: same path, other weights, other digest; an
    unchanged folder is not hashed again (the per-file cache)."""
    import tyr.artifacts as art

    (tmp_path / "m").mkdir()
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(b"a" * 1000)
    cache = tmp_path / "digests.json"
    d1 = art.weights_digest(tmp_path / "m", cache)
    calls = []
    monkeypatch.setattr(art, "file_sha256", lambda p: calls.append(p) or "x")
    assert art.weights_digest(tmp_path / "m", cache) == d1 and calls == []
    monkeypatch.undo()
    w.write_bytes(b"b" * 1000)  # same size, replaced in place
    os.utime(w, ns=(1, 1))
    assert art.weights_digest(tmp_path / "m", cache) != d1
    assert (
        art.weights_digest(tmp_path / "m", cache)
        == "sha256:"
        + hashlib.sha256(f"model.safetensors|1000|{hashlib.sha256(b'b' * 1000).hexdigest()}".encode()).hexdigest()[:16]
    )


def test_diff_names_the_setting(tmp_path):
    from tyr.artifacts import StageRecord, describe_diff

    a = StageRecord("search", {"search": {"generations": 12, "n_levels": 9}, "model": {"name": "m"}})
    b = StageRecord("search", {"model": {"name": "m"}, "search": {"n_levels": 5, "generations": 12}})
    assert a.key != b.key and b.mismatch(a) == "search.n_levels: 9 -> 5"
    assert StageRecord("s", {"x": 1, "y": 2}).key == StageRecord("s", {"y": 2, "x": 1}).key
    assert describe_diff({"a": 1}, {"a": 1, "b": 2}) == "b: (unset) -> 2"


def test_verified_file_round_trip_and_corruption(tmp_path):
    import torch

    from tyr.artifacts import CorruptArtifactError, StaleArtifactError, read_verified, write_verified

    t = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4), "i": torch.tensor([1, 2], dtype=torch.int32)}
    write_verified(tmp_path / "f.safetensors", t, key="k1")
    back, meta = read_verified(tmp_path / "f.safetensors", key="k1")
    assert all(torch.equal(back[k], t[k]) for k in t) and meta["key"] == "k1"
    with pytest.raises(StaleArtifactError):
        read_verified(tmp_path / "f.safetensors", key="k2")
    flip_byte(tmp_path / "f.safetensors", 3)
    with pytest.raises(CorruptArtifactError, match="f.safetensors is corrupt"):
        read_verified(tmp_path / "f.safetensors")
    (tmp_path / "f.safetensors").write_bytes((tmp_path / "f.safetensors").read_bytes()[:40])  # truncated
    with pytest.raises(CorruptArtifactError, match="cannot be read"):
        read_verified(tmp_path / "f.safetensors")


def test_build_that_failed_before_its_first_layer_does_not_block_the_corrected_command(tmp_path):
    """A manifest with no layer and no activation checkpoint holds no work: another configuration
    starts afresh in its place; once a layer exists, another configuration is refused, naming it."""
    from tyr.supernet.grid import LayerShape, make_grid
    from tyr.supernet.store import SupernetError, SupernetStore

    grid = make_grid([LayerShape(4, 10.0, 64, 3.0)] * 2, 0.5, 0.25, 3, 1, 8)
    model = {"name": "m", "revision": "r", "dtype": "float32"}
    SupernetStore.create_or_resume(
        tmp_path, model=model, grid=grid, eea="expectation", config={"calibration": {"num_sequences": 0}}
    )
    s = SupernetStore.create_or_resume(
        tmp_path, model=model, grid=grid, eea="expectation", config={"calibration": {"num_sequences": 8}}
    )
    assert s.manifest["config"]["calibration"]["num_sequences"] == 8
    s.manifest["layers"]["0"] = {"shard": "x", "sha256": "y", "bytes": 0, "errors": {}, "info": {}}
    s.save_manifest()
    with pytest.raises(SupernetError, match=r"calibration.num_sequences: 8 -> 16"):
        SupernetStore._create_or_resume(
            tmp_path, model=model, grid=grid, eea="expectation", config={"calibration": {"num_sequences": 16}}
        )


@pytest.mark.slow
def test_moved_run_exports_with_the_export_recipe(reference, cache, tmp_path):
    run = copy_of(reference, tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "tyr.recipes.export", f"run={run}", "verify=false"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and (run / "hf_model" / "config.json").exists(), p.stderr[-2000:]
