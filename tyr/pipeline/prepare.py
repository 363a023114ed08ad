"""Stage ``prepare``: the token sets, the Taylor statistics (for pruners that need gradients) and the
teacher's top-k cache of the search sequences (``teacher.safetensors``, keyed by the prepare record).
Done when the teacher file reads back verified with the prepare key."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tyr.artifacts import StageRecord
from tyr.data import TokenSetSpec, get_token_set, token_set_key
from tyr.fitness import TeacherCache
from tyr.models import LoadedModel
from tyr.pipeline.layout import begin
from tyr.pipeline.settings import PipelineSettings

log = logging.getLogger("tyr")

TEACHER_FILE = "teacher.safetensors"


@dataclass
class Prepared:
    calib: torch.Tensor  # [N, T] calibration token ids
    search_ids: torch.Tensor  # [N, T] the teacher's sequences
    taylor: dict | None  # per-unit Taylor statistics, or None
    teacher: TeacherCache


def taylor_for(lm: LoadedModel, needs_gradients: bool, gradient: TokenSetSpec, cache_dir: str, batch_size: int) -> dict | None:
    """Per-unit Taylor statistics if the pruner needs them, cached under ``cache_dir/taylor`` per model
    revision and token set."""
    if not needs_gradients:
        return None
    from tyr.pruning.taylor import load_or_collect_taylor

    ids = get_token_set(gradient, lm.tokenizer, str(Path(cache_dir) / "tokens"), lm.name).input_ids
    key = hashlib.sha256(f"{lm.name}|{lm.revision}|{token_set_key(gradient, lm.tokenizer)}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / "taylor" / f"{lm.name}-{key}.safetensors"
    return load_or_collect_taylor(lm.model, ids, str(cache), batch_size)


def prepare_done(run_dir: Path, record: StageRecord) -> bool:
    return TeacherCache.load(Path(run_dir) / TEACHER_FILE, record.key) is not None


def prepare(lm: LoadedModel, needs_gradients: bool, s: PipelineSettings, record: StageRecord, run_dir: Path) -> Prepared:
    """The prepare stage; the teacher cache is reused when it reads back with ``record``'s key, else
    (missing, corrupt, made with other settings) built again."""
    tok = dict(tokenizer=lm.tokenizer, cache=s.token_cache, tokenizer_name=lm.name)
    calib = get_token_set(s.calibration, **tok).input_ids
    search_ids = get_token_set(s.search_data, **tok).input_ids
    taylor = taylor_for(lm, needs_gradients, s.gradient, s.cache_dir, s.batch_size)
    teacher_file = Path(run_dir) / TEACHER_FILE
    k = s.search.topk
    log.info(
        "teacher cache: %d tokens x top-%d = %.1f MB",
        search_ids.numel(),
        k,
        TeacherCache.estimate_bytes(search_ids.numel(), k) / 1e6,
    )
    teacher = TeacherCache.load(teacher_file, record.key) if teacher_file.exists() else None
    if teacher is None:  # none yet, or corrupt (logged): built again
        begin(run_dir, record)
        teacher = TeacherCache.build(lm.model, search_ids, k, s.batch_size)
        teacher.save(teacher_file, record.key)
    return Prepared(calib, search_ids, taylor, teacher)
