"""Every file in conf/ composes, and model sources instantiate to the right classes."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, compose

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
PRIMARY = sorted(f.stem for f in CONF.glob("*.yaml"))
NEEDS = {("data", "fineweb_edu"): ["data.root=/data/fineweb-edu"],  # options with a mandatory value
         ("model", "hf_folder"): ["model.source.path=/models/exported"]}


def _groups_of(primary: str) -> set[str]:
    defaults = OmegaConf.load(CONF / f"{primary}.yaml").get("defaults", [])
    return {next(iter(d)) for d in defaults if isinstance(d, dict) or OmegaConf.is_dict(d)}


def test_every_option_is_used_by_some_recipe():
    used = set().union(*(_groups_of(p) for p in PRIMARY))
    assert set(GROUPS) - {"experiment"} <= used


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_composes(group, option):
    primaries = [p for p in PRIMARY if group in _groups_of(p)]
    assert primaries or group == "experiment"
    for primary in primaries:
        cfg = compose(primary, [f"{group}={option}", *NEEDS.get((group, option), [])])
        # Everything but the hydra/paths sections must resolve without a running Hydra app.
        for key in cfg:
            if key != "paths" and not OmegaConf.is_missing(cfg, key) and OmegaConf.is_config(cfg[key]):
                OmegaConf.to_container(cfg[key], resolve=True)


@pytest.mark.parametrize("model", sorted(f.stem for f in (CONF / "model").glob("*.yaml")))
def test_model_source_instantiates(model):
    cfg = compose("evaluate", [f"model={model}", *NEEDS.get(("model", model), [])])
    src = instantiate(cfg.model.source)
    assert type(src).__name__ in ("GGUFPackageSource", "PretrainedSource", "RandomInitSource")
    if model == "hf_folder":  # a folder brings its own name and architecture
        assert src.path == "/models/exported" and cfg.model.arch is None
        return
    assert cfg.model.name == model
    arch = cfg.model.arch
    assert arch.num_heads % arch.num_kv_heads == 0 and arch.num_layers > 0


def test_unknown_model_lists_options():
    with pytest.raises(MissingConfigException) as e:
        compose("evaluate", ["model=no-such-model"])
    assert "smollm2-135m" in str(e.value)


PAPER = sorted(f.stem for f in (CONF / "experiment").glob("paper_*.yaml"))


def test_paper_experiments_cover_the_three_models():
    assert PAPER == ["paper_llama2-7b", "paper_llama3.1-70b", "paper_llama3.1-8b"]


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiment_composes(experiment):
    cfg = compose("pipeline", [f"+experiment={experiment}", "data.root=/data/fineweb-edu"], return_hydra_config=True)
    assert cfg.model.name == experiment.removeprefix("paper_") and cfg.model.source._target_ == "tyr.models.PretrainedSource"
    assert cfg.search.name == "paper" and list(cfg.search.intervals) == [0.125, 0.0625, 0.03125, 0.015625]
    assert (cfg.search.generations, cfg.search.offspring) == (50, 128)
    assert [list(s) for s in cfg.search.stages] == [[2048, 16], [16384, 4], [131072, 1]]
    c = cfg.data.calibration
    assert c.seq_len == 4096 and c.seq_len * c.num_sequences == 4 * 2**20  # 4M tokens
    assert c.source.startswith("parquet:/data/fineweb-edu/")
    assert cfg.eval.ppl_windows == -1 and cfg.eval.limit is None  # the full evaluation
    sparsities = [float(x) for x in str(cfg.hydra.sweeper.params.target_sparsity).split(",")]
    assert sparsities == [0.125, 0.25, 0.375, 0.5]


def test_demo_experiment_composes():
    cfg = compose("pipeline", ["+experiment=demo"])
    assert cfg.model.name == "smollm2-135m" and cfg.target_sparsity == 0.5 and cfg.search.name == "fast"
    assert list(cfg.compare) == ["dense", "uniform", "owl"] and cfg.data.calibration.num_sequences == 32
