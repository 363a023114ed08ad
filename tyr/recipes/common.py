"""What every recipe does with its config: set up the run and load the model. Only recipes (thin
``@hydra.main`` entry points) import this module; the library below takes typed arguments."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tyr.models import LoadedModel, load_model
from tyr.utils import setup_run

log = logging.getLogger("tyr")


def start(cfg: DictConfig) -> Path:
    """Seed, threads, cache location; returns the Hydra run directory (config saved there)."""
    os.environ.setdefault("TYR_CACHE", str(cfg.paths.cache_dir))
    setup_run(int(cfg.seed), int(cfg.threads))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)  # a previous attempt's failure; this one starts afresh
    log.info("run directory: %s", run_dir)
    return run_dir


def finished_result(run_dir: Path, cfg: DictConfig, name: str = "results.json") -> dict | None:
    """The run's saved result if it finished with the same config, else None. Settings that change how
    fast, not what, are left out of the comparison: threads, paths and the evaluation's batching."""
    import json

    path = run_dir / name
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    saved = result.get("config")
    if not isinstance(saved, dict):
        return None
    from tyr.pipeline.layout import eval_protocol

    def strip(c: dict) -> dict:
        c = {k: v for k, v in c.items() if k not in ("threads", "paths")}
        if isinstance(c.get("eval"), dict):
            c["eval"] = eval_protocol(c["eval"])
        return c

    return result if strip(saved) == strip(to_container(cfg)) else None


def recorded(fn):
    """Wrap a recipe body ``fn(cfg)``: on failure write ``failed.json`` (error and traceback) into the
    run directory. In a multirun the failure is logged and swallowed so the sweep goes on; in a
    single run it is re-raised."""
    import functools
    import traceback

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        from hydra.types import RunMode

        from tyr.recipes import checks
        from tyr.recipes.errors import user_errors, user_message

        hc = HydraConfig.get()
        try:
            if hc.mode == RunMode.MULTIRUN:  # a single run was checked before its directory existed
                checks.validate(cfg, str(hc.job.name), Path(hc.runtime.output_dir))
            return fn(cfg)
        except Exception as e:  # noqa: BLE001 - recorded, then re-raised unless in a sweep
            from tyr.utils import write_json

            run_dir = Path(hc.runtime.output_dir)
            checks.restore_record()  # a failed rerun leaves the run's saved config as it was
            write_json(
                run_dir / "failed.json",
                {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "overrides": list(hc.overrides.task)},
            )
            if hc.mode == RunMode.MULTIRUN:
                log.error("job failed (recorded in %s): %s", run_dir / "failed.json", e)
                return None
            if isinstance(e, user_errors()):  # bad input: one clear message, no traceback
                checks.fail(user_message(e))
            raise

    return wrapper


def load(cfg: DictConfig) -> LoadedModel:
    """The model, placed and (optionally) streamed as ``cfg.runtime`` says; under torchrun this
    also joins the process group first."""
    from tyr import dist

    rt = cfg.get("runtime")
    if rt is None:
        return load_model(cfg.model.name, instantiate(cfg.model.source), cfg.model.dtype)
    dist.init_from_env(str(rt.device))
    act_dir = Path(HydraConfig.get().runtime.output_dir) / "activations" / f"rank{dist.rank()}"
    return load_model(
        cfg.model.name,
        instantiate(cfg.model.source),
        cfg.model.dtype,
        streaming=bool(rt.streaming),
        device=dist.local_device(str(rt.device)),
        activations_max_mb=None if rt.activations_max_mb is None else float(rt.activations_max_mb),
        activations_dir=str(act_dir),
    )


def load_in_memory(cfg: DictConfig) -> LoadedModel:
    """The whole model in memory on CPU (evaluation needs it, whatever ``cfg.runtime`` says)."""
    return load_model(cfg.model.name, instantiate(cfg.model.source), cfg.model.dtype)


def token_cache(cfg: DictConfig) -> str:
    return str(Path(cfg.paths.cache_dir) / "tokens")


def eval_kwargs(cfg: DictConfig) -> dict:
    """The keyword arguments of :func:`tyr.evaluation.evaluate_model` for ``cfg.eval``."""
    from tyr.pipeline.settings import eval_settings

    return eval_settings(to_container(cfg.eval)).kwargs(token_cache(cfg), str(cfg.model.name))


def taylor_for(cfg: DictConfig, lm: LoadedModel, pruner) -> dict | None:
    """Per-unit Taylor statistics if the pruner needs them (:func:`tyr.pipeline.prepare.taylor_for`)."""
    if not pruner.needs_gradients:
        return None
    from tyr.data import TokenSetSpec
    from tyr.pipeline.prepare import taylor_for as collect
    from tyr.settings import from_config

    spec = from_config(TokenSetSpec, to_container(cfg.data.gradient), "data.gradient")
    return collect(lm, True, spec, str(cfg.paths.cache_dir), int(cfg.batch_size))


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
