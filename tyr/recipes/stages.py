"""The keys of a pipeline config: each stage's settings, as the user writes them, and their hash.

``prepare`` (teacher top-k cache: the model, ``data.search``, ``search.topk``) → ``search`` (every
supernet, the evolution, the re-prune: the prepare key, the model, pruner, calibration / gradient
data, target sparsity and every search setting but ``name``, ``topk`` and the downstream
``reprune`` / ``choose_form``) → ``evaluate`` (each ``results_<form>.json``: the evaluation settings
and the model form, keyed per file) → ``export`` (the search key and the chosen form).
``search.reprune`` and ``search.choose_form`` say which form of the searched widths is the result; a
changed choice keeps the search (the re-prune is added when it had been off) and redoes only the
evaluation and export of the other form. A stage's record (``<run>/stages/<stage>.json``,
:class:`tyr.artifacts.StageRecord`) is written when the stage starts making artifacts; a rerun
whose settings differ from a record whose artifacts exist is refused in one line naming the setting,
unless ``redo=<stage>`` asks to remove that stage's artifacts and everything after it. Evaluation
results and the export are redone on their own when their key changes: they are cheap next to the
search and always downstream of it.

Settings that change how fast, not what (threads, paths, batch sizes, runtime placement) are left
out of every key. The run directory's layout (which stage owns which file, the records, the redo) is
:mod:`tyr.pipeline.layout`; the stages themselves are :mod:`tyr.pipeline`. The keys are taken from
the composed config (not from the typed settings) so that they stay those of the runs already made.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tyr.artifacts import SettingsError, StageRecord, describe_diff
from tyr.pipeline.layout import CHECKED, STAGES, eval_protocol, has_artifacts, record_path
from tyr.pipeline.settings import RunKeys


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
    return eval_protocol(_c(cfg.eval))


# search settings that decide only which form of the searched widths is kept, not what the search makes:
# out of the search key (evaluations and the export are keyed by the form itself)
DOWNSTREAM = ("name", "topk", "reprune", "choose_form")
# search settings added since records existed, at the value every earlier search used
ADDED = {"start": "fitted"}


def search_key_settings(search: dict) -> dict:
    """The search settings that make the search stage's artifacts (a record older than a setting
    holds the value its search used)."""
    return {**ADDED, **{k: v for k, v in search.items() if k not in DOWNSTREAM}}


def records(cfg: DictConfig, model_id: dict, needs_gradients: bool) -> dict[str, StageRecord]:
    """The prepare and search records of a pipeline config."""
    # keys are the config paths, so a differing setting is named as the user writes it
    prepare = StageRecord("prepare", {"model": model_id, "data.search": _c(cfg.data.search), "search.topk": int(cfg.search.topk)})
    build = {
        "model": model_id,
        "pruner": _c(cfg.pruner),
        "data.calibration": _c(cfg.data.calibration),
        "data.gradient": _c(cfg.data.gradient) if needs_gradients else None,
        "target_sparsity": float(cfg.target_sparsity),
    }
    search = search_key_settings(_c(cfg.search))
    return {"prepare": prepare, "search": StageRecord("search", {"prepare": prepare.key, **build, "search": search})}


def _needs_gradients(cfg: DictConfig) -> bool:
    from hydra.utils import instantiate

    return bool(instantiate(cfg.pruner).needs_gradients)


def stored_records(run_dir: Path) -> dict[str, StageRecord]:
    """The run's records; for a run made before records existed, derived from its saved config."""
    out = {s: _current(r) for s in CHECKED if (r := StageRecord.read(record_path(run_dir, s))) is not None}
    legacy = Path(run_dir) / ".hydra" / "config.yaml"
    if not out and legacy.exists() and has_artifacts(run_dir, "prepare"):
        old = OmegaConf.load(legacy)
        out = records(old, model_identity(old), _needs_gradients(old))
    return out


def _current(rec: StageRecord) -> StageRecord:
    """A record as this version keys it: records written before ``reprune`` / ``choose_form`` left
    the search key hold them, and those written before ``start`` lack it; either would otherwise
    refuse a rerun of their own settings."""
    if rec.stage != "search" or not isinstance(rec.settings.get("search"), dict):
        return rec
    return StageRecord(rec.stage, {**rec.settings, "search": search_key_settings(rec.settings["search"])})


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
            changed = describe_diff(old[stage].settings, new[stage].settings)
            raise SettingsError(
                f"{run_dir} holds a {stage} stage made with other settings ({changed}); "
                f"rerun with redo={stage} to redo it and every stage after it, or choose another directory (name=...)"
            )


def run_keys(cfg: DictConfig, model_id: dict, needs_gradients: bool) -> RunKeys:
    """Every key of a pipeline config, made once: the prepare and search records, the evaluation
    settings of each result's key, and the configuration every supernet of the run records."""
    recs = records(cfg, model_id, needs_gradients)
    supernet = {
        "pruner": _c(cfg.pruner),
        "calibration": _c(cfg.data.calibration),
        "gradient": _c(cfg.data.gradient) if needs_gradients else None,
        "target_sparsity": float(cfg.target_sparsity),
    }
    return RunKeys(prepare=recs["prepare"], search=recs["search"], eval=eval_settings(cfg), supernet=supernet, config=_c(cfg))
