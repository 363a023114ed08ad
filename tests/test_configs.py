"""Configs behave: every option (a file in conf/ or registered in code) composes and resolves, the
options of a group are interchangeable, pruners instantiate and need gradients exactly when the
planner budgets a gradient pass, model sources instantiate, and the experiments plan (no weights)
at every point of their sweeps with Týr's search settings."""

from __future__ import annotations

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import tyr.recipes  # noqa: F401  (registers the options defined in code)
from tyr.pruning.local import LocalPruner
from tyr.search.settings import CONFIG_FIELDS, SearchSettings, search_settings

from conftest import CONF, compose

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
IN_CODE = sorted(
    (g, name.removesuffix(".yaml")) for g, opts in ConfigStore.instance().repo.items() if g in GROUPS for name in opts
)
OPTIONS = sorted({(g, f.stem) for g in GROUPS for f in (CONF / g).glob("*.yaml")} | set(IN_CODE))
PRIMARY = sorted(f.stem for f in CONF.glob("*.yaml"))
NEEDS = {
    ("data", "fineweb_edu"): ["data.root=/data/fineweb-edu"],  # options with a mandatory value
    ("model", "hf_folder"): ["model.source.path=/models/exported"],
}
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))


def _groups_of(primary: str) -> set[str]:
    defaults = OmegaConf.load(CONF / f"{primary}.yaml").get("defaults", [])
    return {next(iter(d)) for d in defaults if isinstance(d, dict) or OmegaConf.is_dict(d)}


def _options(group: str) -> list[str]:
    return [o for g, o in OPTIONS if g == group]


def test_every_option_is_used_by_some_recipe():
    used = set().union(*(_groups_of(p) for p in PRIMARY))
    assert set(GROUPS) - {"experiment"} <= used
    assert ("search", "paper") in IN_CODE


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


@pytest.mark.parametrize("option", _options("search"))
def test_search_options_are_complete_settings(option):
    """Every search option sets every field of the settings the driver takes (so switching options
    never falls back to a default silently); ``paper`` is exactly the dataclass's defaults."""
    search = compose("pipeline", [f"search={option}"]).search
    assert set(search) == set(CONFIG_FIELDS)
    settings = search_settings(OmegaConf.to_container(search, resolve=True), batch_size=8)
    assert settings.name == option
    if option == "paper":
        assert settings == SearchSettings()
    with pytest.raises(ValueError, match="unknown search settings"):
        search_settings({**OmegaConf.to_container(search), "generation": 3})


@pytest.mark.parametrize("option", _options("pruner"))
def test_pruner_needs_gradients_exactly_when_the_planner_budgets_them(option):
    from tyr.recipes.plan import plan_from_config

    cfg = compose("plan", [f"pruner={option}"])
    pruner = instantiate(cfg.pruner)
    assert isinstance(pruner, LocalPruner)
    assert pruner.name == {"taylor_element": "taylor_element1"}.get(option, option)  # an alias runs as its target
    assert (plan_from_config(cfg)["tokens"]["gradient"] > 0) == pruner.needs_gradients


@pytest.mark.parametrize("model", _options("model"))
def test_model_source_instantiates(model):
    cfg = compose("evaluate", [f"model={model}", *NEEDS.get(("model", model), [])])
    src = instantiate(cfg.model.source)
    if model == "hf_folder":  # a folder brings its own name and architecture
        assert src.path == "/models/exported" and cfg.model.arch is None
        return
    assert cfg.model.name == model
    from tyr.planner import ArchFacts

    ArchFacts.from_dict(OmegaConf.to_container(cfg.model.arch, resolve=True))  # validates the arch block


def test_unknown_model_lists_options():
    with pytest.raises(MissingConfigException) as e:
        compose("evaluate", ["model=no-such-model"])
    assert "smollm2-135m" in str(e.value)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_plans_at_every_sweep_point(experiment):
    """Each experiment composes for the pipeline, instantiates its pruner, and plans without weights at
    every sparsity of its sweep; the paper experiments use Týr's search settings and calibration
    (4M FineWeb-Edu tokens at length 4096, DESIGN.md section 2) on the model they name."""
    from tyr.recipes.plan import plan_from_config

    extra = ["data.root=/data/fineweb-edu"] if experiment.startswith("paper_") else []
    cfg = compose("pipeline", [f"+experiment={experiment}", *extra], return_hydra_config=True)
    instantiate(cfg.pruner)
    settings = search_settings(OmegaConf.to_container(cfg.search, resolve=True), int(cfg.batch_size))
    sweep = OmegaConf.select(cfg, "hydra.sweeper.params.target_sparsity")
    points = [float(x) for x in str(sweep).split(",")] if sweep is not None else [float(cfg.target_sparsity)]
    for s in points:
        p = plan_from_config(compose("plan", [f"+experiment={experiment}", f"target_sparsity={s}", *extra]))
        assert p["target_sparsity"] == s and p["model"] == cfg.model.name
        assert abs(p["params"]["kept_at_budget"] / p["params"]["model"]["prunable"] - (1 - s)) < 0.02
    if experiment.startswith("paper_"):
        assert cfg.model.name == experiment.removeprefix("paper_")
        assert settings == SearchSettings(batch_size=int(cfg.batch_size))
        assert p["tokens"]["calibration"] == 4 * 2**20 and p["tokens"]["seq_len"] == 4096
