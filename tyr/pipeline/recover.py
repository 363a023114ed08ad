"""Stage ``recover``: the pruned model distilled from the dense one with LoRA or full training
(:mod:`tyr.recovery`), evaluated before and after, and exported (checked in a fresh process).
Everything lands in ``<run>/recover/<mode>-<key>/`` (key: the recovery settings, the pruned and the
dense model): ``settings.json``, ``metrics.jsonl``, ``loss.png``, ``results-<protocol>.json`` (the
done check: one per evaluation protocol), ``results.json``, ``results.md``, ``hf_model/`` and the
checkpoints. A rerun resumes the training or reuses the finished result; other settings get another
directory. Under torchrun the training is data parallel; rank 0 evaluates and exports."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from tyr import dist
from tyr.evaluation import evaluate_model, results_table
from tyr.export import export_model, verify_export
from tyr.models import LoadedModel
from tyr.pipeline.export import searched_allocation
from tyr.pipeline.settings import PipelineSettings, RunKeys, eval_settings
from tyr.plots import plot_recovery
from tyr.recovery.data import recovery_windows
from tyr.recovery.trainer import RecoverySettings, fingerprint, train
from tyr.supernet.assemble import Assembler
from tyr.utils import read_json, write_json

log = logging.getLogger("tyr")


def searched_student(run_dir: Path, lm: LoadedModel, target_sparsity: float):
    """A pipeline run's searched model (``allocation.json``) as an in-memory copy; ``lm.model`` stays dense."""
    alloc, store = searched_allocation(run_dir, lm)
    asm = Assembler(lm.model, store)
    asm.assemble(alloc["levels"])
    student = copy.deepcopy(lm.model)
    asm.restore_dense()
    return student, {"kind": "searched", "target_sparsity": float(target_sparsity), "allocation": alloc}


def training_windows(s: RecoverySettings, lm: LoadedModel, cache_dir: str):
    """The recovery text of ``s`` as its [s.windows, seq_len] training windows; a budget larger than the
    text raises :class:`tyr.recovery.data.RecoveryBudgetError`."""
    return recovery_windows(list(s.sources), s.seq_len, s.windows, s.seed, lm.tokenizer, str(Path(cache_dir) / "tokens"), lm.name)


def _evaluated(path: Path, model, lm: LoadedModel, eval_config: dict, cache_dir: str, **record) -> dict:
    """Evaluate once per evaluation protocol: ``path`` is reused when it was written with the same one."""
    if path.exists() and read_json(path).get("eval") == eval_config:
        return read_json(path)
    kwargs = eval_settings(eval_config).kwargs(str(Path(cache_dir) / "tokens"), lm.name)
    res = evaluate_model(model, lm.tokenizer, **kwargs)
    res.update(model=lm.name, eval=eval_config, **record)
    write_json(path, res)
    return res


def _teacher_id(lm: LoadedModel) -> str:
    return f"{lm.name}|{lm.revision}|{next(lm.model.parameters()).dtype}"


def recovery_paths(lm: LoadedModel, student_id: str, s: RecoverySettings, root: Path, eval_config: dict):
    """(key, directory, protocol, done file) of recovering the student ``student_id`` with ``s``: the done file
    is the result of one evaluation protocol (results.json in the directory is the latest)."""
    key = s.key(student_id, _teacher_id(lm))
    out = root / f"{s.mode}-{key}"
    protocol = hashlib.sha256(json.dumps(eval_config, sort_keys=True).encode()).hexdigest()[:8]
    return key, out, protocol, out / f"results-{protocol}.json"


def recover_model(
    lm: LoadedModel,
    student,
    source: dict,
    s: RecoverySettings,
    root: Path,
    eval_config: dict,
    cache_dir: str,
    export: bool = True,
    before: dict | None = None,
    stop_after: int | None = None,
) -> dict | None:
    """Recover ``student`` from the dense ``lm.model`` into ``root/<mode>-<key>``; returns the result
    (None on ranks other than 0, and when ``stop_after`` ended the training early). ``eval_config``:
    the evaluation protocol as configured (``conf/eval``), which also names the result files."""
    student_id = fingerprint(student)
    key, out, protocol, done = recovery_paths(lm, student_id, s, root, eval_config)
    label = f"{lm.name} {source['kind']}"
    if done.exists():
        log.info("recovery already done and evaluated with these settings: %s", done)
        return read_json(done)
    windows = training_windows(s, lm, cache_dir)  # first: a budget beyond the text fails before the evaluation
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        described = {k: v for k, v in source.items() if k != "allocation"}
        write_json(out / "settings.json", {"key": key, "settings": asdict(s), "teacher": _teacher_id(lm), "source": described})
        # the pruned model before recovery: one evaluation per student and protocol, whatever the settings
        before = before or _evaluated(
            root / f"results_before-{student_id[:12]}-{protocol}.json", student, lm, eval_config, cache_dir, stage="before"
        )
    t0 = time.time()
    student, summary = train(lm.model, student, windows, s, out, stop_after=stop_after)
    student.to("cpu")
    lm.model.to("cpu")
    if not summary["finished"] or not dist.is_main():
        return None
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    plot_recovery(records, out / "loss.png", f"{label}: recovery ({s.mode}, {summary['tokens']:,} tokens)")
    after = _evaluated(
        out / f"results_after-{protocol}.json", student, lm, eval_config, cache_dir, stage="after", recovery=summary
    )
    result = {
        "key": key,
        "dir": str(out),
        "before": before,
        "after": after,
        "recovery": summary,
        "wall_seconds_this_run": time.time() - t0,
        "settings": read_json(out / "settings.json"),
    }
    if export:
        export_model(
            student,
            lm.tokenizer,
            out / "hf_model",
            allocation=source.get("allocation"),
            overwrite=True,
            extra_files={"tyr_recovery.json": {"settings": result["settings"], "recovery": summary}},
        )
        result["verify"] = verify_export(out / "hf_model", student, windows[:2, : min(128, s.seq_len)])
        result["hf_model"] = str(out / "hf_model")
    write_json(done, result)
    write_json(out / "results.json", result)
    rows = {f"{label} {s.mode} before": before, f"{label} {s.mode} after ({summary['tokens']:,} tokens)": after}
    (out / "results.md").write_text(results_table(rows) + "\n")
    return result


def recover_stage(
    lm: LoadedModel, recovery: RecoverySettings, s: PipelineSettings, keys: RunKeys, run_dir: Path, before: dict | None = None
) -> tuple[dict, str | None]:
    """The pipeline's recovery stage: the searched model of ``run_dir`` recovered from the dense
    ``lm``; returns the result row to add to the pipeline's table and the recovered model's exported
    folder (None without export)."""
    student, source = searched_student(run_dir, lm, s.target_sparsity)
    res = recover_model(
        lm, student, source, recovery, Path(run_dir) / "recover", keys.config["eval"], s.cache_dir, export=s.export, before=before
    )
    row = f"{lm.name} searched {s.target_sparsity:.0%} + recovery ({recovery.mode}, {res['recovery']['tokens']:,} tokens)"
    return {row: res["after"]}, res.get("hf_model")


def recover_uniform_stage(
    lm: LoadedModel,
    pruner,
    prep,
    recovery: RecoverySettings,
    dense_counts: dict,
    s: PipelineSettings,
    keys: RunKeys,
    run_dir: Path,
) -> tuple[dict, dict]:
    """The baseline that counts, given the searched model's recovery: ``uniform_reprune`` (every layer pruned
    sequentially to the target) made on a copy of the dense model, which stays the teacher, evaluated, then
    recovered with the same settings (tokens, text, method, seed). Returns (the row before, the row after).
    A rerun whose recovery is done reads both back without pruning; otherwise the copy is pruned again
    (deterministic: the same fingerprint as the one recorded)."""
    from tyr.pipeline.evaluate import evaluate_uniform_prune, uniform_fingerprint

    root = Path(run_dir) / "recover"
    recorded = uniform_fingerprint(run_dir)
    if recorded is not None:
        *_, done = recovery_paths(lm, recorded, recovery, root, keys.config["eval"])
        if done.exists():
            before = evaluate_uniform_prune(
                lm, pruner, prep, dense_counts, s, keys, run_dir, model=lm.model, fingerprint_only=True
            )
            res = read_json(done)
            return before, {_uniform_row(lm, s, recovery, res): res["after"]}
    student = copy.deepcopy(lm.model)
    before = evaluate_uniform_prune(lm, pruner, prep, dense_counts, s, keys, run_dir, model=student, always_prune=True)
    source = {"kind": "uniform_reprune", "target_sparsity": float(s.target_sparsity)}
    res = recover_model(
        lm, student, source, recovery, root, keys.config["eval"], s.cache_dir, export=False, before=next(iter(before.values()))
    )
    return before, {_uniform_row(lm, s, recovery, res): res["after"]}


def _uniform_row(lm: LoadedModel, s: PipelineSettings, recovery: RecoverySettings, res: dict) -> str:
    return f"{lm.name} uniform_reprune {s.target_sparsity:.0%} + recovery ({recovery.mode}, {res['recovery']['tokens']:,} tokens)"
