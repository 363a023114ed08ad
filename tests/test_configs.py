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
        cfg = compose(primary, [f"{group}={option}"])
        # Everything but the hydra/paths sections must resolve without a running Hydra app.
        for key in cfg:
            if key != "paths" and not OmegaConf.is_missing(cfg, key) and OmegaConf.is_config(cfg[key]):
                OmegaConf.to_container(cfg[key], resolve=True)


@pytest.mark.parametrize("model", sorted(f.stem for f in (CONF / "model").glob("*.yaml")))
def test_model_source_instantiates(model):
    cfg = compose("evaluate", [f"model={model}"])
    src = instantiate(cfg.model.source)
    assert type(src).__name__ in ("GGUFPackageSource", "PretrainedSource", "RandomInitSource")
    assert cfg.model.name == model
    arch = cfg.model.arch
    assert arch.num_heads % arch.num_kv_heads == 0 and arch.num_layers > 0


def test_unknown_model_lists_options():
    with pytest.raises(MissingConfigException) as e:
        compose("evaluate", ["model=no-such-model"])
    assert "smollm2-135m" in str(e.value)
