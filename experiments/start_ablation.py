"""Does the evolution's start matter? (issue #14)

Re-runs the first coarse-to-fine iteration of a finished pipeline run -- same supernet, real costs,
budget, fitness sequences (rotation included), evolution settings and seed -- from other starts, and
measures each result's KL on the run's held-out teacher sequences:
- ``uniform``: the run's own start (the grid centre fitted to the budget). Its result must be the run's
  first-iteration allocation: the script's check that it repeats the pipeline's search;
- ``additive``: the allocation that minimises the summed single-module KL increases measured by
  :mod:`experiments.sensitivity` (``--sensitivity FILE``).

Usage:
    .venv/bin/python -m experiments.start_ablation runs/pipeline/smollm2-135m/mix-path-s0.5 \
        --sensitivity experiments/results/sensitivity_smollm2-135m_s0.5.jsonl --out F.json [--generations N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tyr.utils import portable_path


def main() -> None:
    from omegaconf import OmegaConf

    from experiments.sensitivity import additive_allocation, load, start_and_budget, tables
    from tyr.coarse_to_fine import full_kl
    from tyr.fitness import KLFitness
    from tyr.search import Allocation, SearchSpace
    from tyr.search.budget import allocation_cost
    from tyr.search.evolution import EvolutionConfig, evolve
    from tyr.search.settings import search_settings
    from tyr.supernet.assemble import Assembler
    from tyr.supernet.costs import refill

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--sensitivity", type=Path, required=True, help="the results file of experiments.sensitivity")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--starts", default="uniform,additive")
    ap.add_argument("--generations", type=int, default=None, help="default: the run's")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    run_dir = args.run.resolve()
    cfg, state, model, teacher, store = load(run_dir, args.threads)
    settings = search_settings(OmegaConf.to_container(cfg.search, resolve=True), int(cfg.batch_size))
    dkl, costs, _ = tables(args.sensitivity, store, model)
    uniform, budget = start_and_budget(state, store, costs)
    starts = {"uniform": uniform, "additive": additive_allocation(costs, dkl, budget)}
    N, n_hold = teacher.input_ids.shape[0], int(state["holdout_sequences"])
    first = state["iterations"][0]
    out = json.loads(args.out.read_text()) if args.out.exists() else {"run": portable_path(run_dir), "budget": budget}
    space = SearchSpace.from_costs(costs, budget=budget)
    asm = Assembler(model, store)
    evo = EvolutionConfig(
        generations=args.generations or settings.generations,
        offspring=settings.offspring,
        stages=list(settings.stages),
        seed=settings.seed,  # iteration 0
        max_flips=settings.max_flips,
        prescreen_keep=None,
    )
    for name in args.starts.split(","):
        if name in out:
            continue
        t0 = time.time()
        cache = (settings.prefix_cache, settings.prefix_cache_max_mb)  # a fresh fitness: its token rotation starts at 0
        fitness = KLFitness(model, asm, teacher, settings.batch_size, *cache, sequences=(0, N - n_hold))
        result = evolve(space, fitness, evo, start=Allocation(starts[name]))
        asm.restore_dense()
        best, _ = refill(costs, store.errors(), result.best.to_json(), budget, settings.budget)
        rec = {
            "start": starts[name],
            "start_kl_heldout": full_kl(model, store, starts[name], teacher, settings.batch_size, (N - n_hold, N)),
            "levels": best,
            "real_params": allocation_cost(costs, best),
            "generations": evo.generations,
            "kl_heldout": full_kl(model, store, best, teacher, settings.batch_size, (N - n_hold, N)),
            "equals_the_runs_iteration0": best == first["levels"],
            "seconds": time.time() - t0,
        }
        out[name] = rec
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(
            f"{name:>9} start: held-out KL {rec['start_kl_heldout']:.4f} -> {rec['kl_heldout']:.4f} after "
            f"{evo.generations} generations ({rec['real_params']:,} params; same as the run's: "
            f"{rec['equals_the_runs_iteration0']}; {rec['seconds']:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
