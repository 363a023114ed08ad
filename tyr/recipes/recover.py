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
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tyr import dist
from tyr.data import TokenSetSpec, get_token_set
from tyr.evaluation import evaluate_model, results_table
from tyr.models import load_model
from tyr.plots import plot_recovery
from tyr.recipes.common import eval_kwargs, log, recorded, start, to_container, token_cache
from tyr.recovery.data import RecoveryError, check_disjoint, recovery_windows
from tyr.recovery.lora import LoraSettings
from tyr.recovery.student import load_sliced, read_meta, save_sliced
from tyr.recovery.trainer import RecoverySettings, fingerprint, train
from tyr.utils import read_json, write_json


def settings_from(r: DictConfig, device: str = "cpu") -> RecoverySettings:
    """The typed settings of a ``recover`` config node."""
    lo = r.lora
    return RecoverySettings(
        mode=str(r.mode), tokens=int(r.tokens), sources=tuple((str(d.source), float(d.weight)) for d in r.data),
        seq_len=int(r.seq_len), batch_size=int(r.batch_size), micro_batch_size=int(r.micro_batch_size), lr=float(r.lr),
        min_lr_ratio=float(r.min_lr_ratio), warmup=float(r.warmup), weight_decay=float(r.weight_decay),
        max_grad_norm=float(r.max_grad_norm), topk=int(r.topk), ce_weight=float(r.ce_weight), bf16=bool(r.bf16),
        lora=LoraSettings(int(lo.rank), float(lo.alpha), float(lo.dropout), tuple(str(m) for m in lo.target_modules)),
        train_embeddings=bool(r.train_embeddings), seed=int(r.seed), checkpoint_every=int(r.checkpoint_every),
        log_every=int(r.log_every), keep_checkpoints=int(r.keep_checkpoints), device=str(r.get("device", device)))


def used_text(data: DictConfig | None, eval_cfg: DictConfig) -> dict[str, str]:
    """The text a run calibrated, searched and evaluates on: role -> source."""
    used = {f"evaluation ({s})": str(s) for s in eval_cfg.perplexity}
    for role in ("calibration", "search", "gradient"):
        if data is not None and data.get(role) is not None:
            used[role] = str(data[role].source)
    return used


def check(cfg: DictConfig, data: DictConfig | None = None) -> RecoverySettings | None:
    """Validate ``cfg.recover`` (None when it is null) before anything is loaded: a bad setting or
    recovery text that overlaps calibration / search / evaluation text is one line on stderr, exit 2."""
    if cfg.get("recover") is None:
        return None
    try:
        s = settings_from(cfg.recover)
        s.validate()
        check_disjoint([src for src, _ in s.sources], used_text(data if data is not None else cfg.get("data"), cfg.eval))
        return s
    except RecoveryError as e:
        print(f"tyr: {e}", file=sys.stderr)
        sys.exit(2)


def student_from_run(run_dir: Path, run_cfg: DictConfig, lm):
    """The pruned model of a run as an in-memory copy (``lm.model`` stays dense): a pipeline run's
    chosen allocation (``allocation.json``), or a prune run's uniform model, pruned again from the
    run's own config the first time and kept in ``<run>/pruned_model.safetensors``."""
    if (run_dir / "allocation.json").exists():
        from tyr.supernet.assemble import Assembler
        from tyr.supernet.store import SupernetStore

        alloc = read_json(run_dir / "allocation.json")
        store = SupernetStore.open((run_dir / alloc["manifest"]).parent, expect_model={"name": lm.name, "revision": lm.revision})
        asm = Assembler(lm.model, store)
        asm.assemble(alloc["levels"])
        student = copy.deepcopy(lm.model)
        asm.restore_dense()
        return student, {"kind": "searched", "target_sparsity": float(run_cfg.target_sparsity), "allocation": alloc}
    if "pruner" not in run_cfg or "target_sparsity" not in run_cfg:
        raise RecoveryError(f"run={run_dir} is neither a pipeline run (allocation.json) nor a prune run "
                            "(tyr.recipes.prune)")
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
        prune_uniform(student, pruner, calib.input_ids[rows.start : rows.stop], float(run_cfg.target_sparsity), taylor,
                      int(run_cfg.batch_size))
        if dist.is_main():
            save_sliced(student, path, {"config_sha256": config_sha, "model": lm.name, "revision": lm.revision})
    dist.barrier()
    return load_sliced(lm.model, path), {"kind": "uniform", "pruner": str(run_cfg.pruner.name),
                                         "target_sparsity": float(run_cfg.target_sparsity)}


def _eval_cfg(cfg: DictConfig, name: str) -> DictConfig:
    return OmegaConf.create({"eval": to_container(cfg.eval), "paths": {"cache_dir": str(cfg.paths.cache_dir)},
                             "model": {"name": name}})


def _evaluated(path: Path, model, lm, ecfg: DictConfig, **record) -> dict:
    """Evaluate once per evaluation protocol: ``path`` is reused when it was written with the same one."""
    want = to_container(ecfg.eval)
    if path.exists() and read_json(path).get("eval") == want:
        return read_json(path)
    res = evaluate_model(model, lm.tokenizer, **eval_kwargs(ecfg))
    res.update(model=lm.name, eval=want, **record)
    write_json(path, res)
    return res


def recover_model(lm, student, source: dict, s: RecoverySettings, root: Path, cfg: DictConfig, export: bool = True,
                  before: dict | None = None, stop_after: int | None = None) -> dict | None:
    """Recover ``student`` from the dense ``lm.model`` into ``root/<mode>-<key>``; returns the result
    (None on ranks other than 0, and when ``stop_after`` ended the training early)."""
    teacher_id = f"{lm.name}|{lm.revision}|{next(lm.model.parameters()).dtype}"
    student_id = fingerprint(student)
    key = s.key(student_id, teacher_id)
    out = root / f"{s.mode}-{key}"
    label = f"{lm.name} {source['kind']}"
    ecfg = _eval_cfg(cfg, lm.name)
    protocol = hashlib.sha256(json.dumps(to_container(ecfg.eval), sort_keys=True).encode()).hexdigest()[:8]
    done = out / f"results-{protocol}.json"  # one result per evaluation protocol; results.json: the latest
    if done.exists():
        log.info("recovery already done and evaluated with these settings: %s", done)
        return read_json(done)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        write_json(out / "settings.json", {"key": key, "settings": asdict(s),
                                           "teacher": teacher_id, "source": {k: v for k, v in source.items() if k != "allocation"}})
        # the pruned model before recovery: one evaluation per student and protocol, whatever the settings
        before = before or _evaluated(root / f"results_before-{student_id[:12]}-{protocol}.json", student, lm, ecfg, stage="before")
    t0 = time.time()
    windows = recovery_windows(list(s.sources), s.seq_len, s.windows, s.seed, lm.tokenizer, token_cache(cfg), lm.name)
    student, summary = train(lm.model, student, windows, s, out, stop_after=stop_after)
    student.to("cpu")
    lm.model.to("cpu")
    if not summary["finished"] or not dist.is_main():
        return None
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    plot_recovery(records, out / "loss.png", f"{label}: recovery ({s.mode}, {summary['tokens']:,} tokens)")
    after = _evaluated(out / f"results_after-{protocol}.json", student, lm, ecfg, stage="after", recovery=summary)
    result = {"key": key, "dir": str(out), "before": before, "after": after, "recovery": summary, "wall_seconds_this_run": time.time() - t0,
              "settings": read_json(out / "settings.json")}
    if export:
        from tyr.export import export_model, verify_export

        export_model(student, lm.tokenizer, out / "hf_model", allocation=source.get("allocation"), overwrite=True,
                     extra_files={"tyr_recovery.json": {"settings": result["settings"], "recovery": summary}})
        result["verify"] = verify_export(out / "hf_model", student, windows[:2, : min(128, s.seq_len)])
        result["hf_model"] = str(out / "hf_model")
    write_json(done, result)
    write_json(out / "results.json", result)
    rows = {f"{label} {s.mode} before": before, f"{label} {s.mode} after ({summary['tokens']:,} tokens)": after}
    (out / "results.md").write_text(results_table(rows) + "\n")
    return result


def recover_stage(cfg: DictConfig, run_dir: Path, lm, s: RecoverySettings, before: dict | None = None) -> dict:
    """The pipeline's recovery stage: the searched model of ``run_dir`` recovered from the dense
    ``lm``; returns the result row to add to the pipeline's table."""
    student, source = student_from_run(run_dir, cfg, lm)
    res = recover_model(lm, student, source, s, run_dir / "recover", cfg, export=bool(cfg.export), before=before)
    return {f"{lm.name} searched {cfg.target_sparsity:.0%} + recovery ({s.mode}, {res['recovery']['tokens']:,} tokens)":
            res["after"]}


@hydra.main(config_path="../../conf", config_name="recover", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run)
    if not (run_dir / ".hydra" / "config.yaml").exists():
        print(f"tyr: run={run_dir} is not a run directory (no .hydra/config.yaml)", file=sys.stderr)
        sys.exit(2)
    run_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    s = check(cfg, run_cfg.get("data"))
    start(cfg)
    dist.init_from_env(s.device)
    t0 = time.time()
    lm = load_model(run_cfg.model.name, instantiate(run_cfg.model.source), run_cfg.model.dtype)
    try:
        student, source = student_from_run(run_dir, run_cfg, lm)
        res = recover_model(lm, student, source, s, run_dir / "recover", cfg, export=bool(cfg.export),
                            stop_after=None if cfg.stop_after is None else int(cfg.stop_after))
    except RecoveryError as e:
        print(f"tyr: {e}", file=sys.stderr)
        sys.exit(2)
    dist.shutdown()
    if res is None:
        return
    b, a = res["before"]["perplexity"], res["after"]["perplexity"]
    for name in a:
        print(f"{name} perplexity: {b[name]['ppl']:.2f} before -> {a[name]['ppl']:.2f} after "
              f"({b[name]['windows']} windows of {b[name]['seq_len']})")
    print(f"{res['recovery']['tokens']:,} tokens in {res['recovery']['seconds']:.0f} s of training; "
          f"wall time {time.time() - t0:.0f} s; results in {res['dir']}")


if __name__ == "__main__":
    main()
