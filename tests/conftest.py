"""Shared fixtures: a tiny random Llama (GQA) and, where it matters, the real SmolLM2-135M."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Token sets small enough for a tiny model's pipeline to run in seconds (the pipeline tests share them).
TINY_DATA = [
    "data.calibration.num_sequences=8",
    "data.calibration.seq_len=64",
    "data.gradient.num_sequences=4",
    "data.gradient.seq_len=64",
    "data.search.num_sequences=8",
    "data.search.seq_len=64",
]

torch.set_num_threads(int(os.environ.get("TYR_THREADS", "0") or 0) or torch.get_num_threads())


def compose(config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose a config from conf/ the way a recipe would (without running Hydra's app); with
    ``return_hydra_config`` the ``hydra`` section (sweeper params, run dirs) is included."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    import tyr.recipes  # noqa: F401  (registers the config options defined in code, as a recipe's import does)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return _compose(config_name=config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)


def load_from_conf(model: str):
    from hydra.utils import instantiate

    from tyr.models import load_model

    cfg = compose("evaluate", [f"model={model}"])
    return load_model(cfg.model.name, instantiate(cfg.model.source), cfg.model.dtype)


@pytest.fixture(scope="session")
def tiny():
    """tiny-llama from conf/model: 4 layers, hidden 64, 4 query / 2 KV heads, random weights."""
    return load_from_conf("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once from the GGUF package, cached)."""
    return load_from_conf("smollm2-135m")


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="session")
def calib(tiny):
    """8 x 48 calibration tokens of real text (C4) for tiny-llama."""
    from tyr.data import TokenSetSpec, build_token_set

    return build_token_set(TokenSetSpec("c4[0:100]", 48, 8, seed=0), tiny.tokenizer).input_ids


@pytest.fixture(scope="session")
def taylor(tiny, calib):
    """Per-unit Taylor statistics of tiny-llama on 4 calibration sequences."""
    from tyr.pruning.taylor import collect_taylor

    return collect_taylor(tiny.model, calib[:4], progress=False)


def pruner_from_conf(name: str = "hywia"):
    """The local pruner of conf/pruner/<name>.yaml."""
    from hydra.utils import instantiate

    return instantiate(compose("prune", [f"pruner={name}"]).pruner)
