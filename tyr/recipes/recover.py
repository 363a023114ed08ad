"""Recovery: ``python -m tyr.recipes.recover run=<pipeline or prune run dir> [recover=full] [recover.tokens=N]``.

Distils the dense model into the pruned model of a run (the searched model of a pipeline run, the
uniform model of a prune run) with LoRA or full training (:mod:`tyr.recovery`), evaluates it before
and after, and exports the recovered model as a Hugging Face folder checked in a fresh process.
Everything lands in ``<run>/recover/<mode>-<key>/`` (key: a hash of the recovery settings, the
pruned and the dense model): ``metrics.jsonl``, ``loss.png``, ``results.json``, ``results.md``,
``hf_model/`` and the checkpoints. Rerunning the same command resumes the training or reuses the
finished result; other settings get another directory. Under ``torchrun`` the training is data
parallel over the ranks; rank 0 evaluates and exports.
"""

from __future__ import annotations

import copy
import hashlib
import sys
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tyr import dist
from tyr.artifacts import read_json_checked
from tyr.data import TokenSetSpec, get_token_set
from tyr.models import load_model
from tyr.pipeline.layout import eval_protocol
from tyr.pipeline.recover import recover_model, searched_student, training_windows
from tyr.recipes.checks import recovery_settings
from tyr.recipes.common import log, recorded, start, to_container, token_cache
from tyr.recovery.data import RecoveryError
from tyr.recovery.student import load_sliced, read_meta, save_sliced
from tyr.recovery.trainer import RecoverySettings


def check(cfg: DictConfig, data: DictConfig | None = None) -> RecoverySettings | None:
    """:func:`recovery_settings`, before anything is loaded: a refusal is one line on stderr, exit 2."""
    try:
        return recovery_settings(cfg, data)
    except (RecoveryError, ValueError) as e:  # a bad or unknown value, or overlapping text
        print(f"tyr: {e}", file=sys.stderr)
        sys.exit(2)


def check_budget(s: RecoverySettings, lm, cache_dir: str) -> None:
    """The token budget against the recovery text, as soon as the tokenizer is loaded (before any
    pruning, search or evaluation): a budget larger than the text is one line on stderr, exit 2."""
    try:
        training_windows(s, lm, cache_dir)
    except RecoveryError as e:
        print(f"tyr: {e}", file=sys.stderr)
        sys.exit(2)


def pipeline_before(run_dir: Path, eval_config: dict) -> dict | None:
    """A pipeline run's own evaluation of its searched model (``results_searched.json``), when it used
    this evaluation protocol (batching aside; the result's own key records it): the "before" row, so it
    is not evaluated again."""
    path = run_dir / "results_searched.json"
    if not path.exists():
        return None
    res = read_json_checked(path)
    return res if (res.get("settings") or {}).get("eval") == eval_protocol(eval_config) else None


def student_from_run(run_dir: Path, run_cfg: DictConfig, lm):
    """The pruned model of a run as an in-memory copy (``lm.model`` stays dense): a pipeline run's
    chosen allocation (``allocation.json``), or a prune run's uniform model, pruned again from the
    run's own config the first time and kept in ``<run>/pruned_model.safetensors``."""
    if (run_dir / "allocation.json").exists():
        return searched_student(run_dir, lm, float(run_cfg.target_sparsity))
    if "pruner" not in run_cfg or "target_sparsity" not in run_cfg:
        raise RecoveryError(f"run={run_dir} is neither a pipeline run (allocation.json) nor a prune run (tyr.recipes.prune)")
    path = run_dir / "pruned_model.safetensors"
    config_sha = hashlib.sha256((run_dir / ".hydra" / "config.yaml").read_bytes()).hexdigest()
    if not (path.exists() and read_meta(path).get("config_sha256") == config_sha):
        # under torchrun every rank prunes with its share of the calibration sequences (statistics are
        # summed over the ranks, so all ranks get the same model); rank 0 keeps it
        from tyr.pruning.uniform import prune_uniform
        from tyr.recipes.common import taylor_for

        log.info("pruning %s again from the prune run's config (kept in %s)", lm.name, path)
        pruner = instantiate(run_cfg.pruner)
        calib = get_token_set(TokenSetSpec(**run_cfg.data.calibration), lm.tokenizer, token_cache(run_cfg), lm.name)
        taylor = taylor_for(run_cfg, lm, pruner)
        student = copy.deepcopy(lm.model)
        rows = dist.shard(calib.input_ids.shape[0])
        prune_uniform(
            student,
            pruner,
            calib.input_ids[rows.start : rows.stop],
            float(run_cfg.target_sparsity),
            taylor,
            int(run_cfg.batch_size),
        )
        if dist.is_main():
            save_sliced(student, path, {"config_sha256": config_sha, "model": lm.name, "revision": lm.revision})
    dist.barrier()
    return load_sliced(lm.model, path), {
        "kind": "uniform",
        "pruner": str(run_cfg.pruner.name),
        "target_sparsity": float(run_cfg.target_sparsity),
    }


@hydra.main(config_path="../../conf", config_name="recover", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run)
    if not (run_dir / ".hydra" / "config.yaml").exists():
        print(f"tyr: run={run_dir} is not a run directory (no .hydra/config.yaml)", file=sys.stderr)
        sys.exit(2)
    run_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    s = check(cfg, run_cfg.get("data"))
    if s is None:
        print("tyr: recover=none leaves nothing to do; choose recover=lora or recover=full", file=sys.stderr)
        sys.exit(2)
    start(cfg)
    dist.init_from_env(s.device)
    t0 = time.time()
    lm = load_model(run_cfg.model.name, instantiate(run_cfg.model.source), run_cfg.model.dtype)
    check_budget(s, lm, str(cfg.paths.cache_dir))
    try:
        student, source = student_from_run(run_dir, run_cfg, lm)
        before = pipeline_before(run_dir, to_container(cfg.eval)) if source["kind"] == "searched" else None
        if before is not None:
            log.info("before recovery: the pipeline's own evaluation of its searched model (results_searched.json)")
        res = recover_model(
            lm,
            student,
            source,
            s,
            run_dir / "recover",
            to_container(cfg.eval),
            str(cfg.paths.cache_dir),
            export=bool(cfg.export),
            before=before,
            stop_after=None if cfg.stop_after is None else int(cfg.stop_after),
        )
    except RecoveryError as e:
        print(f"tyr: {e}", file=sys.stderr)
        sys.exit(2)
    dist.shutdown()
    if res is None:
        return
    b, a = res["before"]["perplexity"], res["after"]["perplexity"]
    for name in a:
        print(
            f"{name} perplexity: {b[name]['ppl']:.2f} before -> {a[name]['ppl']:.2f} after "
            f"({b[name]['windows']} windows of {b[name]['seq_len']})"
        )
    print(
        f"{res['recovery']['tokens']:,} tokens in {res['recovery']['seconds']:.0f} s of training; "
        f"wall time {time.time() - t0:.0f} s; results in {res['dir']}"
    )


if __name__ == "__main__":
    main()
