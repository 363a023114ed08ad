"""Single-module sensitivity (issue #14): how much is a non-uniform allocation worth on this model?

From one finished pipeline run, take its first supernet (the grid around the uniform allocation) and
measure, for every module (attention or MLP of one layer) and every level, the search's fitness --
mean per-token KL(dense || model) on the teacher's top-k, over the first ``--sequences`` search
sequences -- of the dense model with only that module pruned to that level. ``dkl`` is the increase
over the dense model on the same tokens.

The report then asks what an *additive* model of these numbers predicts:
- how unequal the modules are at the uniform level (coefficient of variation, the largest share);
- the allocation that minimises the sum of ``dkl`` under the run's real parameter budget (marginal
  greedy from the most pruned level, :func:`tyr.search.budget.fit_to_budget`'s give-back loop), and the
  predicted ratio of its summed ``dkl`` to the uniform allocation's at the same budget.
With ``--check`` it also measures the true KL on the run's held-out teacher sequences of: the uniform
start, that additive allocation, and the run's first-iteration searched allocation (same supernet).

One JSON line per (layer, kind, level) in ``--out``; a rerun skips lines already there (resumable).

Usage:
    .venv/bin/python -m experiments.sensitivity runs/pipeline/smollm2-135m/mix-path-s0.5 \
        --out experiments/results/sensitivity_smollm2.jsonl [--sequences 4] [--threads 1] [--check]
    .venv/bin/python -m experiments.sensitivity runs/... --out F --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tyr.supernet.grid import KINDS
from tyr.utils import portable_path


def summed(table: dict, levels: dict) -> float:
    """The sum over modules of ``table[kind][layer][level]`` at ``levels`` (the additive prediction)."""
    return sum(table[k][l][lv] for k in KINDS for l, lv in enumerate(levels[k]))


def additive_allocation(costs: dict, dkl: dict, budget: int) -> dict[str, list[int]]:
    """Levels minimising the summed ``dkl`` under ``budget``: start from every module's most pruned
    level and give levels back where the summed ``dkl`` falls most per parameter added, while it fits."""
    from tyr.search.budget import fit_to_budget

    most = {k: [len(c) - 1 for c in costs[k]] for k in costs}
    return fit_to_budget(costs, dkl, most, budget)


def load(run_dir: Path, threads: int):
    from experiments.runs import load_run
    from tyr.supernet.store import SupernetStore

    r = load_run(run_dir, threads)
    store = SupernetStore.open(r.state["iterations"][0]["supernet"], expect_model=r.model_id)
    return r.cfg, r.state, r.model, r.teacher, store


def measure(args) -> None:
    from tyr.fitness import KLFitness
    from tyr.supernet.assemble import Assembler

    cfg, state, model, teacher, store = load(args.run.resolve(), args.threads)
    done = set()
    if args.out.exists():
        done = {(r["layer"], r["kind"], r["level"]) for r in map(json.loads, args.out.read_text().splitlines())}
    grid = store.grid
    L = len(grid.modules["attn"])
    dense = {k: [None] * L for k in KINDS}
    asm = Assembler(model, store)
    fitness = KLFitness(model, asm, teacher, int(cfg.batch_size), rotate=False, sequences=(0, args.sequences))
    tokens = args.sequences * teacher.input_ids.shape[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for li in range(L):
            todo = [(k, lv) for k in KINDS for lv in range(len(grid.modules[k][li].keep)) if (li, k, lv) not in done]
            if not todo:
                continue
            t0 = time.time()
            allocs = []
            for k, lv in todo:
                a = {kk: list(v) for kk, v in dense.items()}
                a[k][li] = lv
                allocs.append(a)
            kls = fitness(allocs + [dense], 0, tokens)  # the dense parent last: evaluated first, its inputs reused
            base = kls[-1]
            with open(args.out, "a") as f:
                for (k, lv), kl in zip(todo, kls[:-1]):
                    g = grid.modules[k][li]
                    rec = {"layer": li, "kind": k, "level": lv, "kept": g.keep[lv], "units": g.n_units}
                    rec.update({"sparsity": g.sparsity(lv), "kl": kl, "kl_dense": base, "dkl": kl - base})
                    rec.update({"sequences": args.sequences, "run": portable_path(args.run)})
                    f.write(json.dumps(rec) + "\n")
            print(f"layer {li + 1}/{L}: {len(todo)} variants in {time.time() - t0:.0f} s", flush=True)
    finally:
        asm.restore_dense()
    if args.check:
        check(args, cfg, state, model, teacher, store)


def tables(path: Path, store, model) -> tuple[dict, dict, list]:
    """The measured ``dkl[kind][layer][level]`` table, the real cost table and the records."""
    from tyr.supernet.costs import real_costs

    recs = [json.loads(line) for line in path.read_text().splitlines()]
    dkl = {k: [[float("nan")] * len(g.keep) for g in store.grid.modules[k]] for k in KINDS}
    for r in recs:
        dkl[r["kind"]][r["layer"]][r["level"]] = r["dkl"]
    missing = sum(v != v for k in KINDS for row in dkl[k] for v in row)
    if missing:
        raise SystemExit(f"{missing} (layer, kind, level) cells are not measured yet in {path}")
    return dkl, real_costs(store, model), recs


def start_and_budget(state, store, costs) -> tuple[dict, int]:
    """The run's budget and its uniform start (the grid centre fitted to it, as the search starts)."""
    from tyr.search.budget import fit_to_budget

    first = state["iterations"][0]
    budget = int(first.get("budget") or store.grid.allocation_params(store.grid.centre_levels()))
    return fit_to_budget(costs, store.errors(), store.grid.centre_levels(), budget), budget


def check(args, cfg, state, model, teacher, store) -> None:
    from tyr.coarse_to_fine import full_kl
    from tyr.search.budget import allocation_cost

    dkl, costs, _ = tables(args.out, store, model)
    first = state["iterations"][0]
    uniform, budget = start_and_budget(state, store, costs)
    n_hold = int(state.get("holdout_sequences", 0))
    N = teacher.input_ids.shape[0]
    rows = {"uniform": uniform, "additive": additive_allocation(costs, dkl, budget), "searched_iter0": first["levels"]}
    out = {"budget": budget, "heldout_sequences": n_hold}
    for name, levels in rows.items():
        out[name] = {
            "levels": levels,
            "real_params": allocation_cost(costs, levels),
            "sum_dkl": summed(dkl, levels),
            "kl_heldout": full_kl(model, store, levels, teacher, int(cfg.batch_size), (N - n_hold, N)),
        }
        print(
            f"{name:>15}: {out[name]['real_params']:,} params, sum dkl {out[name]['sum_dkl']:.4f}, "
            f"held-out KL {out[name]['kl_heldout']:.4f}",
            flush=True,
        )
    args.out.with_suffix(".check.json").write_text(json.dumps(out, indent=1) + "\n")


def report(args) -> str:
    from tyr.fitness import spearman
    from tyr.search.budget import allocation_cost

    cfg, state, model, teacher, store = load(args.run.resolve(), args.threads)
    dkl, costs, recs = tables(args.out, store, model)
    grid = store.grid
    uniform, budget = start_and_budget(state, store, costs)
    additive = additive_allocation(costs, dkl, budget)
    lines = [f"{len(recs)} single-module variants from {args.out} ({recs[0]['sequences']} sequences)", ""]
    lines += [
        "| kind | mean dkl at the uniform level | CV over layers | largest (layer) | largest / median |",
        "|---|---:|---:|---|---:|",
    ]
    for k in KINDS:
        at = [dkl[k][l][g.centre] for l, g in enumerate(grid.modules[k])]
        top = max(range(len(at)), key=at.__getitem__)
        lines.append(
            f"| {k} | {statistics.mean(at):.4f} | {statistics.pstdev(at) / statistics.mean(at):.2f} | "
            f"{at[top]:.4f} ({top}) | {at[top] / statistics.median(at):.1f} |"
        )
    err = store.errors()
    for k in KINDS:  # does the supernet's layer-local error (the surrogate) rank modules as the KL does?
        at_e = [err[k][l][g.centre] for l, g in enumerate(grid.modules[k])]
        at_d = [dkl[k][l][g.centre] for l, g in enumerate(grid.modules[k])]
        lines.append(f"- {k}: rho(local error, dkl) over layers at the uniform level {spearman(at_e, at_d):.2f}")
    s_u, s_a = summed(dkl, uniform), summed(dkl, additive)
    lines += [
        "",
        f"budget {budget:,}: uniform start {allocation_cost(costs, uniform):,} params, sum dkl {s_u:.4f}; "
        f"additive optimum {allocation_cost(costs, additive):,} params, sum dkl {s_a:.4f} (ratio {s_a / s_u:.3f})",
        "additive optimum's sparsity per layer:",
    ]
    for k in KINDS:
        lines.append(f"- {k}: " + " ".join(f"{grid.modules[k][l].sparsity(lv):.2f}" for l, lv in enumerate(additive[k])))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished pipeline run directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sequences", type=int, default=4, help="search sequences the KL is measured on")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="then measure the held-out KL of uniform / additive / searched")
    ap.add_argument("--report", action="store_true", help="print the tables of a results file, then exit")
    args = ap.parse_args()
    if args.report:
        print(report(args))
    else:
        measure(args)


if __name__ == "__main__":
    main()
