"""A pipeline run directory: which stage owns which artifacts, the stage records, and the redo.

``prepare`` (teacher top-k cache) → ``search`` (every supernet, the evolution, the re-prune, the
comparisons' supernets, ``allocation.json``, the plots) → ``evaluate`` (each ``results_<form>.json``,
``owl.json``, ``results.json``) → ``export`` (``hf_model/``, ``export.json``). A stage's record
(``stages/<stage>.json``, :class:`tyr.artifacts.StageRecord`) is written when the stage starts
making artifacts; ``redo=<stage>`` removes that stage's artifacts and every later stage's. Torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from tyr.artifacts import StageRecord

log = logging.getLogger("tyr")

STAGES = ("prepare", "search", "evaluate", "export")  # redo=<stage> redoes it and every stage after it
ARTIFACTS = {
    "prepare": ["teacher.safetensors"],
    "search": [
        "search_state.json",
        "history.jsonl",
        "iter*",
        "reprune",
        "finalists",
        "uniform_reprune",
        "allocation.json",
        "search_fitness.png",
        "allocation.png",
        "timings.json",
    ],
    "evaluate": ["results_*.json", "owl.json", "results.json", "results.md"],
    "export": ["hf_model", "export.json", "gguf"],
}
CHECKED = ("prepare", "search")  # refused on a change; evaluate / export are redone by their own keys
EVAL_SPEED_KEYS = ("batch_size", "logits_mb", "ppl_batch_size")  # evaluation settings left out of every key


def eval_protocol(eval_config: dict) -> dict:
    """An evaluation config without the settings that change only how fast it runs: what results are keyed by."""
    return {k: v for k, v in eval_config.items() if k not in EVAL_SPEED_KEYS}


def record_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / f"{stage}.json"


def has_artifacts(run_dir: Path, stage: str) -> bool:
    return any(any(Path(run_dir).glob(pat)) for pat in ARTIFACTS[stage])


def writer() -> bool:
    """Rank 0 writes the run's files (under torchrun, before the process group exists too)."""
    return os.environ.get("RANK", "0") == "0"


def apply_redo(run_dir: Path, redo: str | None) -> None:
    """Remove the artifacts and records of stage ``redo`` and every stage after it."""
    if redo is None or not writer():
        return
    for stage in STAGES[STAGES.index(redo) :]:
        for pat in ARTIFACTS[stage]:
            for p in Path(run_dir).glob(pat):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        record_path(run_dir, stage).unlink(missing_ok=True)
    log.info("redo=%s: removed the artifacts of %s", redo, ", ".join(STAGES[STAGES.index(redo) :]))


def begin(run_dir: Path, record: StageRecord) -> None:
    """Write a stage's record as it starts making artifacts (its settings are then the directory's)."""
    path = record_path(run_dir, record.stage)
    old = StageRecord.read(path) if path.exists() else None
    if writer() and (old is None or old.key != record.key):
        record.write(path)


def form_key(search_key: str, allocation: str, levels: dict | None = None, supernet: Path | None = None) -> dict:
    """The identity of a model form to evaluate or export: the search that made it, its name, its
    supernet (relative to the run directory) and its levels in it."""
    return {
        "search": search_key,
        "allocation": allocation,
        "supernet": None if supernet is None else str(supernet),
        "levels": levels,
    }


def repair_hint(path: Path | None) -> str:
    """The command that remakes a corrupt file of a pipeline run: the redo of the stage that owns it."""
    if path is None:
        return ""
    for stage in STAGES:
        for part in (path.name, *(p.name for p in path.parents)):
            if any(Path(part).match(pat) for pat in ARTIFACTS[stage]):
                return f"; rerun the pipeline with redo={stage} to remake it"
    return "; delete it to remake it"
