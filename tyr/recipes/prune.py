"""Uniform pruning: ``python -m tyr.recipes.prune model=smollm2-135m pruner=hywia target_sparsity=0.5``.

Every layer is pruned to the same parameter sparsity with the chosen local pruner, the pruned model
is evaluated, and ``results.json``, ``layers.jsonl`` (and for HyWIA ``fusion_weights.png``) are
written into the run directory. With ``export=true`` the pruned model is also written as a Hugging
Face folder (``hf_model/``) and checked in a fresh process, as the pipeline does (``export.json``);
with ``export_formats=[hf,gguf]`` that folder also as ``gguf/model.gguf`` for llama.cpp / Ollama.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tyr.data import TokenSetSpec, get_token_set
from tyr.evaluation import evaluate_model, results_table
from tyr.plots import plot_fusion_weights
from tyr.pruning.uniform import prune_uniform
from tyr.recipes.common import eval_kwargs, finished_result, load, log, recorded, start, taylor_for, to_container, token_cache
from tyr.utils import JsonlWriter, peak_rss_mb, write_json


def dense_pass_seconds(model, ids: torch.Tensor, batch_size: int) -> float:
    """Wall time of one plain forward+backward (autograd, whole model) over ``ids``."""
    t0 = time.time()
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i : i + batch_size]
        model(x, labels=x).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.time() - t0


def export_checked(lm, out: Path, ids: torch.Tensor, allocation: dict) -> dict:
    """Export the pruned in-memory model to ``out`` and check it in a fresh process against the model on
    two of ``ids``' sequences (at most 128 tokens); the record is written next to it as export.json."""
    from tyr.export import export_model, verify_export

    t0 = time.time()
    export_model(lm.model, lm.tokenizer, out, allocation=allocation, overwrite=True)
    record = {
        "out": str(out),
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "verify": verify_export(out, lm.model, ids[:2, :128]),
        "seconds": time.time() - t0,
    }
    write_json(out.parent / "export.json", record)
    log.info("exported and verified %s (%.1f MB)", out, record["bytes"] / 1e6)
    return record


@hydra.main(config_path="../../conf", config_name="prune", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    run_dir = start(cfg)
    done = finished_result(run_dir, cfg)
    if done is not None and (not cfg.export or "export" in done):  # a rerun of an interrupted sweep skips finished jobs
        log.info("already done with the same config, skipping: %s", run_dir / "results.json")
        return
    t_start = time.time()
    lm = load(cfg)
    pruner = instantiate(cfg.pruner)
    tok_kw = dict(tokenizer=lm.tokenizer, cache=token_cache(cfg), tokenizer_name=lm.name)
    calib = get_token_set(TokenSetSpec(**cfg.data.calibration), **tok_kw).input_ids
    timings = {}
    if cfg.measure_dense_pass:
        timings["dense_fwd_bwd"] = dense_pass_seconds(lm.model, calib, int(cfg.batch_size))
    t0 = time.time()
    taylor = taylor_for(cfg, lm, pruner)
    timings["gradients"] = time.time() - t0
    metrics = JsonlWriter(run_dir / "layers.jsonl", fresh=True)  # the prune restarts, it does not resume
    report = prune_uniform(
        lm.model, pruner, calib, float(cfg.target_sparsity), taylor, int(cfg.batch_size), on_layer=lambda r: metrics.write(**r)
    )
    timings["prune"] = report["seconds"]
    timings["prune_total"] = timings["gradients"] + timings["prune"]
    if "dense_fwd_bwd" in timings:
        timings["prune_total_over_dense_fwd_bwd"] = timings["prune_total"] / timings["dense_fwd_bwd"]
    log.info(
        "pruned to %.4f sparsity (target %.4f) in %.0f s",
        report["achieved_sparsity"],
        report["target_sparsity"],
        timings["prune_total"],
    )
    res = evaluate_model(lm.model, lm.tokenizer, **eval_kwargs(cfg))
    res.update(
        model=lm.name,
        revision=lm.revision,
        pruner=cfg.pruner.name,
        reconstruction=cfg.pruner.reconstruction,
        target_sparsity=report["target_sparsity"],
        achieved_sparsity=report["achieved_sparsity"],
        timings=timings,
        wall_time=time.time() - t_start,
        peak_rss_mb=peak_rss_mb(),
        config=to_container(cfg),
        calibration_tokens=int(calib.numel()),
    )
    write_json(run_dir / "results.json", res)
    write_json(run_dir / "prune_report.json", report)
    if cfg.export:  # after results.json: a failed check leaves the evaluation on disk
        res["export"] = export_checked(
            lm,
            run_dir / "hf_model",
            calib,
            {
                "recipe": "prune",
                "pruner": cfg.pruner.name,
                "reconstruction": cfg.pruner.reconstruction,
                "target_sparsity": report["target_sparsity"],
                "achieved_sparsity": report["achieved_sparsity"],
            },
        )
        if "gguf" in cfg.export_formats:
            from tyr.pipeline.export import export_gguf

            res["export"]["gguf"] = export_gguf(run_dir / "hf_model", str(cfg.gguf_dtype))[0]  # in <run>/gguf/
        write_json(run_dir / "results.json", res)
    plot_fusion_weights(
        report["layers"], run_dir / "fusion_weights.png", f"HyWIA fusion weights, {lm.name} at {report['target_sparsity']:.0%}"
    )
    label = f"{lm.name} {cfg.pruner.name}/{cfg.pruner.reconstruction} {report['target_sparsity']:.0%}"
    table = results_table({label: res})
    (run_dir / "results.md").write_text(table + "\n")
    print(table)
    print(
        f"achieved sparsity {report['achieved_sparsity']:.4f}; prune {timings['prune_total']:.0f} s"
        + (f" = {timings['prune_total_over_dense_fwd_bwd']:.1f}x one dense fwd+bwd" if "dense_fwd_bwd" in timings else "")
        + f"; results in {run_dir}"
    )


if __name__ == "__main__":
    main()
