"""The pipeline's stage library (tyr.pipeline) without a model run: the one conversion of config nodes
to typed settings, each stage's done check, and the lazy tyr.export package that lets the export
check start without tyr's model code. Seconds in all."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from tyr.settings import from_config

from conftest import ROOT, compose


@dataclass
class Inner:
    a: int
    names: tuple[str, ...]


@dataclass
class Outer:
    x: float
    inner: Inner
    pairs: list[tuple[int, int]]
    limit: int | None = None
    name: str = "n"


def test_from_config_converts_by_annotation():
    o = from_config(Outer, {"x": 1, "inner": {"a": 2, "names": ["p", "q"]}, "pairs": [[1, 2], [3, 4]], "limit": None})
    assert o == Outer(1.0, Inner(2, ("p", "q")), [(1, 2), (3, 4)], None, "n")
    assert type(o.x) is float and type(o.inner.names) is tuple and type(o.pairs[0]) is tuple


@pytest.mark.parametrize(
    "options,words",
    [
        ({"x": 1, "inner": {"a": 2, "names": []}, "pairs": [], "y": 3}, ["outer", "['y']"]),
        ({"x": 1, "inner": {"a": 2, "names": [], "b": 0}, "pairs": []}, ["outer.inner", "['b']"]),
        ({"inner": {"a": 2, "names": []}, "pairs": []}, ["missing", "['x']"]),
        ({"x": 1, "inner": {"a": "two", "names": []}, "pairs": []}, ["outer.inner.a='two'"]),
        ({"x": 1, "inner": {"a": 2, "names": []}, "pairs": [[1, 2, 3]]}, ["outer.pairs", "2 entries"]),
    ],
)
def test_from_config_names_the_bad_setting(options, words):
    with pytest.raises(ValueError) as e:
        from_config(Outer, options, "outer")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_pipeline_settings_hold_the_composed_values():
    """The typed settings carry what the YAML options say (conf/experiment/demo.yaml, conf/eval/quick.yaml,
    conf/search/fast.yaml), converted to the annotated types."""
    from tyr.pipeline.settings import pipeline_settings

    cfg = compose("pipeline", ["+experiment=demo", "runtime.streaming=true"])
    s = pipeline_settings(OmegaConf.to_container(cfg, resolve=True))
    assert (s.model, s.target_sparsity, s.compare, s.streaming) == ("smollm2-135m", 0.5, ("uniform_reprune",), True)
    assert s.calibration.num_sequences == 32 and s.search_data.seed == 1 and s.gradient.num_sequences == 16
    assert s.search_data.num_sequences == 32 and s.search_data.source == "general_search"
    assert (s.eval.ppl_windows, s.eval.limit, s.eval.seq_len, s.eval.logits_mb) == (8, 50, 2048, 256.0)
    assert list(s.eval.perplexity) == ["general_test"] and list(s.eval.tasks) == ["arc_easy", "piqa"]
    assert s.search.name == "fast" and s.search.stages == [(512, 2), (2048, 1)] and s.search.batch_size == 8
    assert list(s.search.intervals) == [0.125] and s.search.generations == 12
    assert s.token_cache.endswith("tokens")


def test_eval_settings_give_every_argument_evaluate_model_needs():
    from tyr.evaluation import evaluate_model
    from tyr.pipeline.settings import eval_settings

    e = eval_settings(OmegaConf.to_container(compose("evaluate", ["eval=smoke"]).eval, resolve=True))
    kwargs = e.kwargs("/cache/tokens", "m")
    params = inspect.signature(evaluate_model).parameters
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty} - {"model", "tokenizer"}
    assert required <= set(kwargs) <= set(params)
    assert kwargs["tasks"] == ["arc_easy", "boolq"] and kwargs["seq_len"] == 128 and kwargs["limit"] == 4


def test_recovery_settings_conversion_and_unknown_key_is_one_line(capsys):
    from tyr.recipes.recover import check

    cfg = compose("pipeline", ["model=tiny-llama", "recover=full", "recover.data=[{source:wikitext2_train,weight:2}]"])
    s = check(cfg)
    assert (s.mode, s.lr, s.sources) == ("full", 1e-4, (("wikitext2_train", 2.0),))
    assert (s.lora.alpha, s.lora.target_modules[0]) == (32.0, "q_proj") and type(s.lora.alpha) is float
    bad = compose("pipeline", ["model=tiny-llama", "+recover.epochs=3"])
    with pytest.raises(SystemExit) as e:
        check(bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "epochs" in err[0]


def test_prepare_done_only_for_an_intact_teacher_with_the_key(tmp_path):
    from tyr.artifacts import StageRecord
    from tyr.fitness import TeacherCache
    from tyr.pipeline.prepare import TEACHER_FILE, prepare_done

    rec, other = StageRecord("prepare", {"a": 1}), StageRecord("prepare", {"a": 2})
    assert not prepare_done(tmp_path, rec)
    g = torch.Generator().manual_seed(0)
    t = TeacherCache(
        torch.randint(0, 50, (2, 5), generator=g),
        torch.randint(0, 50, (2, 4, 3), generator=g).int(),
        torch.randn(2, 4, 3, generator=g),
        torch.randn(2, 4, generator=g),
    )
    t.save(tmp_path / TEACHER_FILE, rec.key)
    assert prepare_done(tmp_path, rec) and not prepare_done(tmp_path, other)
    b = bytearray((tmp_path / TEACHER_FILE).read_bytes())
    b[-3] ^= 0xFF
    (tmp_path / TEACHER_FILE).write_bytes(bytes(b))
    assert not prepare_done(tmp_path, rec)


def test_search_done_needs_every_iteration_and_the_reprune(tmp_path):
    from tyr.pipeline.search import STATE_FILE, search_done
    from tyr.pipeline.settings import pipeline_settings

    cfg = compose("pipeline", ["model=tiny-llama", "search.intervals=[0.1,0.05]"])
    s = pipeline_settings(OmegaConf.to_container(cfg, resolve=True))
    state = tmp_path / STATE_FILE
    assert not search_done(tmp_path, s)
    state.write_text(json.dumps({"iterations": [{"iteration": 0}], "current": {"iteration": 1}}))
    assert not search_done(tmp_path, s)
    state.write_text(json.dumps({"iterations": [{"iteration": 0}, {"iteration": 1}], "current": None}))
    assert not search_done(tmp_path, s)  # the re-prune is still to come
    s.search.reprune = False
    assert search_done(tmp_path, s)
    s.search.reprune = True
    state.write_text(json.dumps({"iterations": [{"iteration": 0}, {"iteration": 1}], "reprune": {"chosen": "reprune"}}))
    assert search_done(tmp_path, s)


def test_export_done_needs_the_key_and_the_folder(tmp_path):
    from tyr.pipeline.export import EXPORT_DIR, EXPORT_RECORD, export_done

    assert not export_done(tmp_path, "k")
    (tmp_path / EXPORT_RECORD).write_text(json.dumps({"key": "k"}))
    assert not export_done(tmp_path, "k")  # no folder
    (tmp_path / EXPORT_DIR).mkdir()
    (tmp_path / EXPORT_DIR / "config.json").write_text("{}")
    assert export_done(tmp_path, "k") and not export_done(tmp_path, "other")


def test_export_check_starts_without_tyr_model_code():
    """``python -m tyr.export.verify_child`` executes tyr/export/__init__.py first: it must import
    neither torch, transformers nor tyr's exported architectures (which register themselves with
    transformers' Auto classes and would stand in for the folder's own code)."""
    code = "import sys, tyr.export; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tyr', 'torch', 'transformers')))"
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "['tyr', 'tyr.export']"
    import tyr.export
    from tyr.export import export_model  # the names still resolve, on first use
    from tyr.export.folder import export_model as direct

    assert export_model is direct and all(getattr(tyr.export, n) is not None for n in tyr.export.__all__)
    with pytest.raises(AttributeError):
        tyr.export.no_such_name  # noqa: B018
