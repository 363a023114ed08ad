"""The pipeline's stages, each with the settings that make its artifacts and a key of them.

``prepare`` (teacher top-k cache: the model, ``data.search``, ``search.topk``) → ``search`` (every
supernet, the evolution, the re-prune: the prepare key, the model, pruner, calibration / gradient
data, target sparsity and every search setting) → ``evaluate`` (each ``results_<form>.json``: the
evaluation settings and the model form, keyed per file) → ``export`` (the search key and the chosen
form). A stage's record (``<run>/stages/<stage>.json``, :class:`tyr.artifacts.StageRecord`) is
written when the stage starts making artifacts; a rerun whose settings differ from a record whose
artifacts exist is refused in one line naming the setting, unless ``redo=<stage>`` asks to remove
that stage's artifacts and everything after it. Evaluation results and the export are redone on
their own when their key changes: they are cheap next to the search and always downstream of it.

Settings that change how fast, not what (threads, paths, batch sizes, runtime placement) are left
out of every key.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tyr.artifacts import SettingsError, StageRecord, describe_diff, settings_key

log = logging.getLogger("tyr")

STAGES = ("prepare", "search", "evaluate", "export")  # redo=<stage> redoes it and every stage after it
ARTIFACTS = {
    "prepare": ["teacher.safetensors"],
    "search": ["search_state.json", "history.jsonl", "iter*", "reprune", "uniform_reprune", "allocation.json",
               "search_fitness.png", "allocation.png", "timings.json"],
    "evaluate": ["results_*.json", "owl.json", "results.json", "results.md"],
    "export": ["hf_model", "export.json"],
}
CHECKED = ("prepare", "search")  # refused on a change; evaluate / export are redone by their own keys
EVAL_SPEED_KEYS = ("batch_size", "logits_mb", "ppl_batch_size")


def _c(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def model_identity(cfg: DictConfig) -> dict:
    """Name, weights identity (content digest of a local folder, GGUF sha256, or seed + config) and
    dtype, without loading the weights."""
    from hydra.utils import instantiate

    src = instantiate(cfg.model.source)
    if callable(getattr(src, "revision", None)):
        revision = src.revision()
    else:
        _, revision = src.folder(str(cfg.model.name))
    return {"name": str(cfg.model.name), "revision": revision, "dtype": str(cfg.model.dtype)}


def eval_settings(cfg: DictConfig) -> dict:
    return {k: v for k, v in _c(cfg.eval).items() if k not in EVAL_SPEED_KEYS}


def records(cfg: DictConfig, model_id: dict, needs_gradients: bool) -> dict[str, StageRecord]:
    """The prepare and search records of a pipeline config."""
    # keys are the config paths, so a differing setting is named as the user writes it
    prepare = StageRecord("prepare", {"model": model_id, "data.search": _c(cfg.data.search),
                                      "search.topk": int(cfg.search.topk)})
    build = {"model": model_id, "pruner": _c(cfg.pruner), "data.calibration": _c(cfg.data.calibration),
             "data.gradient": _c(cfg.data.gradient) if needs_gradients else None,
             "target_sparsity": float(cfg.target_sparsity)}
    search = {k: v for k, v in _c(cfg.search).items() if k not in ("name", "topk")}
    return {"prepare": prepare, "search": StageRecord("search", {"prepare": prepare.key, **build, "search": search})}


def record_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / f"{stage}.json"


def has_artifacts(run_dir: Path, stage: str) -> bool:
    return any(any(Path(run_dir).glob(pat)) for pat in ARTIFACTS[stage])


def _needs_gradients(cfg: DictConfig) -> bool:
    from hydra.utils import instantiate

    return bool(instantiate(cfg.pruner).needs_gradients)


def stored_records(run_dir: Path) -> dict[str, StageRecord]:
    """The run's records; for a run made before records existed, derived from its saved config."""
    out = {s: r for s in CHECKED if (r := StageRecord.read(record_path(run_dir, s))) is not None}
    legacy = Path(run_dir) / ".hydra" / "config.yaml"
    if not out and legacy.exists() and has_artifacts(run_dir, "prepare"):
        old = OmegaConf.load(legacy)
        out = records(old, model_identity(old), _needs_gradients(old))
    return out


def check_run(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse (:class:`~tyr.artifacts.SettingsError`) a rerun in ``run_dir`` whose prepare or
    search settings differ from those that made the artifacts there, unless ``redo`` covers it."""
    redo = cfg.get("redo")
    if redo is not None and redo not in STAGES:
        raise SettingsError(f"redo={redo} must be one of {', '.join(STAGES)}")
    if not Path(run_dir).is_dir():
        return
    old = stored_records(run_dir)
    if not old:
        return
    new = records(cfg, model_identity(cfg), _needs_gradients(cfg))
    for stage in CHECKED:
        if redo is not None and STAGES.index(redo) <= STAGES.index(stage):
            return
        if stage in old and has_artifacts(run_dir, stage) and old[stage].key != new[stage].key:
            raise SettingsError(
                f"{run_dir} holds a {stage} stage made with other settings ({describe_diff(old[stage].settings, new[stage].settings)}); "
                f"rerun with redo={stage} to redo it and every stage after it, or choose another directory (name=...)")


def _writer() -> bool:
    """Rank 0 writes the run's files (under torchrun, before the process group exists too)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def apply_redo(run_dir: Path, redo: str | None) -> None:
    """Remove the artifacts and records of stage ``redo`` and every stage after it."""
    if redo is None or not _writer():
        return
    for stage in STAGES[STAGES.index(redo):]:
        for pat in ARTIFACTS[stage]:
            for p in Path(run_dir).glob(pat):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        record_path(run_dir, stage).unlink(missing_ok=True)
    log.info("redo=%s: removed the artifacts of %s", redo, ", ".join(STAGES[STAGES.index(redo):]))


def begin(run_dir: Path, record: StageRecord) -> None:
    """Write a stage's record as it starts making artifacts (its settings are then the directory's)."""
    path = record_path(run_dir, record.stage)
    old = StageRecord.read(path) if path.exists() else None
    if _writer() and (old is None or old.key != record.key):
        record.write(path)


def form_key(search_key: str, allocation: str, levels: dict | None = None, supernet: Path | None = None) -> dict:
    """The identity of a model form to evaluate or export: the search that made it, its name, its
    supernet (relative to the run directory) and its levels in it."""
    return {"search": search_key, "allocation": allocation, "supernet": None if supernet is None else str(supernet),
            "levels": levels}


def results_key(cfg: DictConfig, form: dict) -> tuple[str, dict]:
    settings = {"eval": eval_settings(cfg), "form": form}
    return settings_key(settings), settings


def repair_hint(path: Path | None) -> str:
    """The command that remakes a corrupt file of a pipeline run: the redo of the stage that owns it."""
    if path is None:
        return ""
    for stage in STAGES:
        for part in (path.name, *(p.name for p in path.parents)):
            if any(Path(part).match(pat) for pat in ARTIFACTS[stage]):
                return f"; rerun the pipeline with redo={stage} to remake it"
    return "; delete it to remake it"
