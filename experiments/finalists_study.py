"""Does the finalists' short-recovery KL rank them as a full recovery does (issue #32)?

From a finished pipeline run with ``finalists=recovery`` (its ``finalists/finalists.json`` and each finalist's
sequential prune), give every finalist the run's own full recovery (``recover`` settings of its config, or
``--tokens``) and evaluate it on ``--eval`` perplexity sources (default: the general dev set; never a test set
while settings are being chosen). One JSON line per finalist in ``--out`` (resumable), then Spearman's rho
between the short-recovery KL and the dev perplexity after the full recovery.

    .venv/bin/python -m experiments.finalists_study runs/dev/pipeline/smollm2-135m/<run> --out runs/dev/finalists.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch

from tyr.utils import portable_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=None, help="full recovery budget (default: the run's recover.tokens)")
    ap.add_argument("--eval", nargs="+", default=["general_dev"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alphas", type=float, nargs="*", default=None, help="only these finalists (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tyr.fitness import spearman
    from tyr.models import load_model
    from tyr.pipeline.recover import recover_model
    from tyr.recipes.checks import settings_from
    from tyr.supernet.assemble import Assembler
    from tyr.supernet.store import SupernetStore

    run = args.run.resolve()
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    record = json.loads((run / "finalists" / "finalists.json").read_text())
    lm = load_model(cfg.model.name, instantiate(cfg.model.source), cfg.model.dtype)
    recovery = settings_from(cfg.recover)
    if args.tokens:
        recovery = dataclasses.replace(recovery, tokens=args.tokens)
    eval_config = {**OmegaConf.to_container(cfg.eval, resolve=True), "perplexity": list(args.eval), "tasks": []}
    done = {json.loads(l)["alpha"] for l in args.out.read_text().splitlines()} if args.out.exists() else set()
    for cand in record["candidates"]:
        if cand["alpha"] in done or (args.alphas is not None and cand["alpha"] not in args.alphas):
            continue
        store = SupernetStore.open(run / cand["supernet"], expect_model={"name": lm.name, "revision": lm.revision})
        asm = Assembler(lm.model, store)
        asm.assemble(store.grid.centre_levels())
        student = copy.deepcopy(lm.model)
        asm.restore_dense()
        res = recover_model(
            lm,
            student,
            {"kind": f"finalist alpha={cand['alpha']}", "target_sparsity": float(cfg.target_sparsity)},
            recovery,
            run / "recover",  # the pipeline's own recoveries: a finalist equal to its searched or uniform model is reused
            eval_config,
            str(cfg.paths.cache_dir),
            export=False,
        )
        line = {
            "alpha": cand["alpha"],
            "kl_before": cand["kl_before"],
            "kl_short": cand["kl_after"],
            "short_tokens": cand["recovery_tokens"],
            "full_tokens": res["recovery"]["tokens"],
            "before": {k: v["ppl"] for k, v in res["before"]["perplexity"].items()},
            "after": {k: v["ppl"] for k, v in res["after"]["perplexity"].items()},
            "run": portable_path(run),
        }
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(line, flush=True)
    rows = [json.loads(l) for l in args.out.read_text().splitlines()]
    for name in rows[0]["after"]:
        rho = spearman([r["kl_short"] for r in rows], [r["after"][name] for r in rows])
        rho0 = spearman([r["kl_before"] for r in rows], [r["after"][name] for r in rows])
        print(f"{name}: rho(short-recovery KL, ppl after full recovery) = {rho:.3f}; rho(KL before, same) = {rho0:.3f}")
        for r in sorted(rows, key=lambda r: r["alpha"]):
            kl = f"KL {r['kl_before']:.4f} -> {r['kl_short']:.4f}"
            print(f"  alpha {r['alpha']:.2f}: {kl}; ppl {r['before'][name]:.2f} -> {r['after'][name]:.2f}")


if __name__ == "__main__":
    main()
