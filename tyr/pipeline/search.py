"""Stage ``search`` (build + search + re-prune): the coarse-to-fine search of :mod:`tyr.coarse_to_fine`
— per iteration a supernet (``iter<i>/supernet/``) and an evolution (``search_state.json``,
``history.jsonl``), then the sequential re-prune at the searched widths (``reprune/supernet/``).
Keyed by the search record; resumable; done when every iteration and the re-prune are in the state.

Under torchrun every rank runs it (the layer loops split the work, the evolution runs in lock-step);
rank 0 writes."""

from __future__ import annotations

import logging
from pathlib import Path

from tyr.artifacts import read_json_checked
from tyr.coarse_to_fine import run_search
from tyr.models import LoadedModel
from tyr.pipeline.layout import begin
from tyr.pipeline.prepare import Prepared
from tyr.pipeline.settings import PipelineSettings, RunKeys

log = logging.getLogger("tyr")

STATE_FILE = "search_state.json"


def model_id(lm: LoadedModel, dtype: str) -> dict:
    """The identity every supernet of the run is checked against."""
    return {"name": lm.name, "revision": lm.revision, "dtype": dtype}


def search_done(run_dir: Path, s: PipelineSettings) -> bool:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return False
    state = read_json_checked(path)
    return len(state["iterations"]) == len(s.search.intervals) and (not s.search.reprune or bool(state.get("reprune")))


def build_and_search(
    lm: LoadedModel, model: dict, pruner, prep: Prepared, s: PipelineSettings, keys: RunKeys, run_dir: Path
) -> dict:
    """Run (or resume) the search; returns its state with absolute supernet paths."""
    if search_done(run_dir, s):
        log.info("search: done with these settings (%s); reading it back", Path(run_dir) / STATE_FILE)
    begin(run_dir, keys.search)
    return run_search(
        lm.model, model, pruner, prep.calib, prep.taylor, prep.teacher, s.target_sparsity, s.search, run_dir, keys.supernet
    )
