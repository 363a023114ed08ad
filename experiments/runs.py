"""Loading a finished pipeline run for the studies of issue #14 (fidelity, sensitivity, start ablation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Run:
    """What the studies read back from a run directory: its resolved config, its search state (paths
    resolved against the run), the dense model, the teacher cache and the model's identity for
    ``SupernetStore.open(..., expect_model=...)``."""

    dir: Path
    cfg: object
    state: dict
    lm: object
    model: torch.nn.Module
    teacher: object
    model_id: dict


def load_run(run_dir: Path, threads: int = 0) -> Run:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tyr.fitness import TeacherCache
    from tyr.models import load_model
    from tyr.search_state import resolved

    if threads:
        torch.set_num_threads(threads)
    run_dir = run_dir.resolve()
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    state = resolved(json.loads((run_dir / "search_state.json").read_text()), run_dir)
    lm = load_model(cfg.model.name, instantiate(cfg.model.source), cfg.model.dtype)
    teacher = TeacherCache.load(run_dir / "teacher.safetensors")
    if teacher is None:
        raise SystemExit(f"{run_dir}/teacher.safetensors is missing or corrupt")
    model_id = {"name": lm.name, "revision": lm.revision, "dtype": str(cfg.model.dtype)}
    return Run(run_dir, cfg, state, lm, lm.model.eval(), teacher, model_id)
