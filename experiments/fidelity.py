"""Fidelity study (issue #14): does the search's fitness rank allocations the way held-out text does?

From one finished pipeline run (its supernets, teacher cache and search state), take allocations at
the run's sparsity -- uniform, OWL, the searched one of each iteration, and budget-preserving random
perturbations of the searched and of the uniform allocation at several distances (d single level
switches, each keeping the parameter budget) -- and build every one in two forms:
- ``supernet``: assembled from the run's supernet variants (what the search scores);
- ``sequential``: pruned sequentially at the same widths (every layer on the outputs of the already
  pruned layers before it: what the re-prune and the uniform prune recipe ship).

For each model it measures, on the same tokens for every model:
- the search's fitness: mean per-token KL(dense || pruned) on the teacher's top-k over the search
  sequences (``fit_all``: every sequence the search may draw; ``fit_512`` / ``fit_2048``: the first 1 /
  4 sequences, the token counts of ``search=fast``'s two stages, to see how noisy one stage is);
- KL on the held-out block of C4 teacher sequences that the evolution never saw (``kl_heldout``);
- WikiText-2 and PTB perplexity over the first ``--windows`` windows of 2048 tokens.

and reports Spearman's rho between each fitness and each held-out measure, per form and pooled.
One JSON line per (allocation, form) in ``--out``; a rerun skips lines already there (resumable).

Usage:
    .venv/bin/python -m experiments.fidelity runs/pipeline/smollm2-135m/demo-s0.5 \
        --out experiments/results/fidelity_demo.jsonl [--windows 32] [--threads 2] [--forms supernet]
        [--shard 0/2]   # two processes of --threads 1 each: --shard 0/2 and --shard 1/2, same --out
    .venv/bin/python -m experiments.fidelity --report experiments/results/fidelity_demo.jsonl [--plot docs/img/f.png]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tyr.utils import portable_path

PERTURB_SEARCHED = [1, 2, 4, 8, 16, 32]  # distances (level switches) from the searched allocation, 2 draws each
PERTURB_UNIFORM = [2, 4, 8, 16]  # ... from the uniform one, 2 draws each


def owl_levels(model, calib: torch.Tensor, grid, target: float, batch_size: int) -> dict:
    """OWL's layer sparsities (outlier-weighted) at the nearest levels of ``grid``."""
    from tyr.allocation import nearest_levels, outlier_ratios, owl_sparsities

    return nearest_levels(grid, owl_sparsities(outlier_ratios(model, calib, batch_size=batch_size), target))


def allocations(
    state: dict, model, real: bool, seed: int = 0, owl: dict | None = None, uniform_keep: dict | None = None
) -> list[dict]:
    """The study's allocations, interleaved so that a partial run already spans the range:
    ``{"name", "supernet" (folder), "levels"}`` (or ``"keep"``: kept units per layer, sequential form only).

    Every allocation is at the run's budget (the one stored with its first iteration), counted as the
    run's search counted it (``real``: ``search.budget=real``). With ``real`` the uniform and OWL
    allocations are fitted to the real budget (:func:`tyr.search.budget.fit_to_budget`, as the search's start is) and the
    perturbations switch levels under the real costs (:func:`tyr.supernet.costs.real_costs`), so every
    model has the searched model's size. ``uniform_keep`` (the run's ``uniform_reprune`` widths, the
    prune recipe's model) adds that model as ``uniform_recipe``."""
    from tyr.search import Allocation, SearchSpace, mutate
    from tyr.search.budget import fit_to_budget
    from tyr.supernet.costs import real_costs
    from tyr.supernet.store import SupernetStore

    first, last = state["iterations"][0], state["iterations"][-1]
    s0, s1 = SupernetStore.open(first["supernet"]), SupernetStore.open(last["supernet"])
    budget = int(first.get("budget") or s0.grid.allocation_params(s0.grid.centre_levels()))
    costs0, costs1 = ((real_costs(s, model) if real else s.grid.costs()) for s in (s0, s1))
    errors0 = s0.errors() if real else None

    def on_budget(levels):  # a first-iteration allocation moved to the budget (real costs only)
        return fit_to_budget(costs0, errors0, levels, budget) if real else levels

    uniform = on_budget(s0.grid.centre_levels())
    base = [
        {"name": "uniform", "supernet": first["supernet"], "levels": uniform},
        {"name": "searched", "supernet": last["supernet"], "levels": last["levels"]},
    ]
    if uniform_keep is not None:
        base.append({"name": "uniform_recipe", "supernet": first["supernet"], "keep": uniform_keep})
    if owl is not None:
        base.append({"name": "owl", "supernet": first["supernet"], "levels": on_budget(owl)})
    if len(state["iterations"]) > 1:
        base.append({"name": "searched_iter0", "supernet": first["supernet"], "levels": first["levels"]})
    rng = np.random.default_rng(seed)

    def walk(costs, levels, d):
        space = SearchSpace.from_costs(costs, budget=budget)
        a = Allocation(levels)
        for _ in range(d):
            a = mutate(space, a, rng, max_flips=1)
        return a.to_json()

    pert = []
    for rep in range(2):
        for i in range(max(len(PERTURB_SEARCHED), len(PERTURB_UNIFORM))):
            if i < len(PERTURB_SEARCHED):
                d = PERTURB_SEARCHED[i]
                pert.append(
                    {"name": f"searched+{d}#{rep}", "supernet": last["supernet"], "levels": walk(costs1, last["levels"], d)}
                )
            if i < len(PERTURB_UNIFORM):
                d = PERTURB_UNIFORM[i]
                pert.append({"name": f"uniform+{d}#{rep}", "supernet": first["supernet"], "levels": walk(costs0, uniform, d)})
    return base + pert


@torch.no_grad()
def sequence_kl(model, teacher, batch_size: int) -> list[float]:
    """Per-sequence sum of KL(teacher || model) over the teacher's positions (full-model forward)."""
    from tyr.fitness import topk_kl

    out = []
    for i in range(0, teacher.input_ids.shape[0], batch_size):
        x = teacher.input_ids[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        slp = torch.log_softmax(logits, -1).gather(-1, teacher.topk_ids[i : i + batch_size].long())
        kl = topk_kl(slp, teacher.topk_logp[i : i + batch_size], teacher.tail_logp[i : i + batch_size])
        out.extend(float(v) for v in kl.double().sum(-1))
    return out


def measure(model, teacher, n_hold: int, ppl_sets: dict, batch_size: int) -> dict:
    from tyr.evaluation import perplexity

    t0 = time.time()
    per_seq = sequence_kl(model, teacher, batch_size)
    T1 = teacher.input_ids.shape[1] - 1
    N = len(per_seq)
    mean = lambda a, b: sum(per_seq[a:b]) / ((b - a) * T1)  # noqa: E731
    rec = {
        "fit_512": mean(0, 1),
        "fit_2048": mean(0, 4),
        "fit_all": mean(0, N - n_hold),
        "kl_heldout": mean(N - n_hold, N),
        "kl_per_sequence": [v / T1 for v in per_seq],
    }
    for name, ids in ppl_sets.items():
        r = perplexity(model, ids, 1, desc=name)
        rec[name] = r["ppl"]
    rec["seconds"] = time.time() - t0
    return rec


def run(args) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from experiments.runs import load_run
    from tyr.artifacts import read_json_checked
    from tyr.data import TokenSetSpec, get_token_set
    from tyr.recipes.common import taylor_for, token_cache
    from tyr.search.budget import allocation_cost
    from tyr.search.settings import search_settings
    from tyr.supernet.assemble import Assembler
    from tyr.supernet.costs import real_costs
    from tyr.supernet.path import build_path_supernet, keep_counts
    from tyr.supernet.store import SupernetStore

    r = load_run(args.run, args.threads)
    run_dir, cfg, state, lm, model, teacher, model_id = r.dir, r.cfg, r.state, r.lm, r.model, r.teacher, r.model_id
    n_hold = int(state.get("holdout_sequences", 0))
    if n_hold == 0:
        raise SystemExit("the run has no held-out teacher sequences (search.holdout=0): no held-out KL to measure")
    bs = int(cfg.batch_size)
    cache = token_cache(cfg)
    ppl_sets = {
        name: get_token_set(TokenSetSpec(src, 2048, -1, sampling="contiguous"), lm.tokenizer, cache, lm.name).input_ids[
            : args.windows
        ]
        for name, src in (("wikitext2", "wikitext2_test"), ("ptb", "ptb_test"))
    }
    done = {(r["name"], r["form"]) for r in read_rows(args.out)} if args.out.exists() else set()
    pruner = instantiate(cfg.pruner)
    calib = get_token_set(TokenSetSpec(**cfg.data.calibration), lm.tokenizer, cache, lm.name).input_ids
    taylor = taylor_for(cfg, lm, pruner)
    settings = search_settings(OmegaConf.to_container(cfg.search, resolve=True), bs)
    work = args.work or (run_dir / "fidelity")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    owl_file = run_dir / "owl.json"
    if owl_file.exists():
        owl = json.loads(owl_file.read_text())["levels"]
    else:
        owl = owl_levels(
            model, calib, SupernetStore.open(state["iterations"][0]["supernet"]).grid, float(cfg.target_sparsity), bs
        )
    checked = False
    uniform_file = run_dir / "results_uniform_reprune.json"
    uniform_keep = read_json_checked(uniform_file).get("kept") if uniform_file.exists() else None
    allocs = allocations(state, model, cfg.search.get("budget", "nominal") == "real", args.seed, owl, uniform_keep)
    for alloc in shard(allocs[: args.limit], *args.shard):
        store = SupernetStore.open(alloc["supernet"], expect_model=model_id)
        for form in args.forms:
            if (alloc["name"], form) in done or (form == "supernet" and "levels" not in alloc):
                continue
            t0 = time.time()
            if form == "supernet":
                use, levels = store, alloc["levels"]
            else:
                keep = alloc.get("keep") or keep_counts(store.grid, alloc["levels"])
                use = build_path_supernet(
                    model, model_id, pruner, calib, taylor, keep, work / alloc["name"], settings, {"fidelity_of": alloc["name"]}
                )
                levels = use.grid.centre_levels()
            asm = Assembler(model, use)
            asm.assemble(levels)
            try:
                rec = measure(model, teacher, n_hold, ppl_sets, bs)
            finally:
                asm.restore_dense()
            if not done and not checked:  # once: this script's KL equals the search's own code path (layer loop)
                from tyr.coarse_to_fine import full_kl

                N = teacher.input_ids.shape[0]
                rec["fit_all_search_code"] = full_kl(model, use, levels, teacher, bs, (0, N - n_hold))
                checked = True
                print(f"fit_all {rec['fit_all']:.6f} vs the search's full_kl {rec['fit_all_search_code']:.6f}", flush=True)
            rec = {
                "name": alloc["name"],
                "form": form,
                "levels": alloc.get("levels"),
                "keep": keep_counts(use.grid, levels),
                "real_params": allocation_cost(real_costs(use, model), levels),
                "run": portable_path(run_dir),
                "windows": args.windows,
                "wall_seconds": time.time() - t0,
                **rec,
            }
            with open(args.out, "a") as f:  # locked: --shard processes append to the same file
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(json.dumps(rec) + "\n")
            print(
                f"{alloc['name']:>16} {form:>10}: fit_all {rec['fit_all']:.4f} heldout {rec['kl_heldout']:.4f} "
                f"wt2 {rec['wikitext2']:.2f} ptb {rec['ptb']:.2f} ({rec['wall_seconds']:.0f} s)",
                flush=True,
            )
            if form == "sequential":
                shutil.rmtree(work / alloc["name"], ignore_errors=True)  # ~0.3 GB of shards each


def read_rows(path: Path) -> list[dict]:
    """The study's results file: one JSON record per (allocation, form)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def shard(items: list, index: int, count: int) -> list:
    """The ``index``-th of ``count`` interleaved shards of ``items`` (every ``count``-th from ``index``), so that
    ``count`` processes (``--shard index/count``, one thread each) split the allocations without overlap."""
    return items[index::count]


def parse_shard(v: str) -> tuple[int, int]:
    i, _, n = v.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"--shard takes I/N with 0 <= I < N, not {v!r}")
    return int(i), int(n)


def rho_interval(rho: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Approximate 95 % interval of a Spearman rho (|rho| < 1) over n > 3 pairs: Fisher's z with Fieller,
    Hartley and Pearson's variance 1.06 / (n - 3) for rank correlations."""
    half = z * math.sqrt(1.06 / (n - 3))
    return math.tanh(math.atanh(rho) - half), math.tanh(math.atanh(rho) + half)


def plot(path: Path, out: Path) -> Path:
    """The study's scatter: the search fitness (``fit_all``) against WikiText-2 and PTB perplexity, one point
    per model, by form; the base allocations are labelled, the perturbations are small markers."""
    import matplotlib.ticker

    from tyr.plots import plt

    recs = read_rows(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    style = {"supernet": ("C0", "o"), "sequential": ("C1", "s")}
    for ax, m, title in zip(axes, ("wikitext2", "ptb"), ("WikiText-2", "PTB")):
        for form, (color, marker) in style.items():
            rs = [r for r in recs if r["form"] == form]
            base = [r for r in rs if "+" not in r["name"]]
            pert = [r for r in rs if "+" in r["name"]]
            ax.scatter([r["fit_all"] for r in pert], [r[m] for r in pert], s=14, color=color, marker=marker, alpha=0.5)
            ax.scatter([r["fit_all"] for r in base], [r[m] for r in base], s=40, color=color, marker=marker, label=form)
            for r in base:
                ax.annotate(r["name"], (r["fit_all"], r[m]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("search fitness fit_all (mean KL to dense)")
        ax.set_ylabel(f"{title} perplexity (32 x 2048 tokens)")
        ax.set_title(f"{title}: {len(recs)} models")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(path: Path) -> str:
    from scipy.stats import spearmanr

    recs = read_rows(path)
    lines = [
        f"{len(recs)} models from {path}",
        "",
        "| allocation | form | fit_512 | fit_2048 | fit_all | KL held-out | WikiText-2 | PTB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in recs:
        lines.append(
            f"| {r['name']} | {r['form']} | {r['fit_512']:.4f} | {r['fit_2048']:.4f} | {r['fit_all']:.4f} | "
            f"{r['kl_heldout']:.4f} | {r['wikitext2']:.2f} | {r['ptb']:.2f} |"
        )
    lines += [
        "",
        "Spearman rho (n models): fitness against held-out measure",
        "",
        "| models | fitness | KL held-out | WikiText-2 | PTB |",
        "|---|---|---:|---:|---:|",
    ]
    groups = {
        "supernet": [r for r in recs if r["form"] == "supernet"],
        "sequential": [r for r in recs if r["form"] == "sequential"],
        "both forms": recs,
    }
    for form in ("supernet", "sequential"):  # the fine scale the evolution works on: the searched one and its neighbours
        groups[f"{form}, searched and its perturbations"] = [
            r for r in groups[form] if r["name"] == "searched" or r["name"].startswith("searched+")
        ]
    for gname, rs in groups.items():
        if len(rs) < 3:
            continue
        for fit in ("fit_512", "fit_2048", "fit_all", "kl_heldout"):
            cells = []
            for m in ("kl_heldout", "wikitext2", "ptb"):
                rho = spearmanr([r[fit] for r in rs], [r[m] for r in rs]).statistic
                if fit == m or math.isnan(rho):
                    cells.append("-")
                elif len(rs) > 4 and abs(rho) < 0.9999:
                    cells.append("{:.2f} ({:.2f} to {:.2f})".format(rho, *rho_interval(rho, len(rs))))
                else:
                    cells.append(f"{rho:.2f}")
            lines.append(f"| {gname} (n={len(rs)}) | {fit} | " + " | ".join(cells) + " |")
    # the cross-form question: does the supernet form's fitness rank the sequential models?
    seq = {r["name"]: r for r in groups["sequential"]}
    pairs = [(r, seq[r["name"]]) for r in groups["supernet"] if r["name"] in seq]
    if len(pairs) >= 3:
        lines += ["", f"supernet-form fitness against the sequential model of the same widths (n={len(pairs)}):", ""]
        for fit in ("fit_all", "kl_heldout"):
            cells = [
                f"{m} {spearmanr([a[fit] for a, _ in pairs], [b[m] for _, b in pairs]).statistic:.2f}"
                for m in ("kl_heldout", "wikitext2", "ptb")
            ]
            lines.append(f"- {fit}: " + ", ".join(cells))
    lines += needed_kl(groups["sequential"])
    return "\n".join(lines)


def needed_kl(seq: list[dict], target: float = 0.85) -> list[str]:
    """What the 0.85x target asks of the search, read off the shipped (sequential) models: a least-squares
    line of log perplexity on held-out KL over them, and the held-out KL at which that line reaches
    ``target`` x the prune recipe's uniform model (``uniform_recipe``), next to the searched model's."""
    base = next((r for r in seq if r["name"] == "uniform_recipe"), None)
    best = next((r for r in seq if r["name"] == "searched"), None)
    if base is None or best is None or len(seq) < 4:
        return []
    x = np.array([r["kl_heldout"] for r in seq])
    out = ["", f"log perplexity against held-out KL over the sequential models (n={len(seq)}), target {target}x uniform:", ""]
    out += ["| set | slope per unit KL | R^2 | KL uniform | KL searched | ratio searched | KL for the target |"]
    out += ["|---|---:|---:|---:|---:|---:|---:|"]
    for m in ("wikitext2", "ptb"):
        y = np.log([r[m] for r in seq])
        slope, icpt = np.polyfit(x, y, 1)
        r2 = 1 - ((y - (slope * x + icpt)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        kl_target = (math.log(target * base[m]) - icpt) / slope
        out.append(
            f"| {m} | {slope:.3f} | {r2:.2f} | {base['kl_heldout']:.4f} | {best['kl_heldout']:.4f} | "
            f"{best[m] / base[m]:.3f} | {kl_target:.4f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", type=Path, help="a finished pipeline run directory")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/fidelity.jsonl"))
    ap.add_argument("--work", type=Path, default=None, help="where the sequential builds go (default: <run>/fidelity)")
    ap.add_argument("--windows", type=int, default=32, help="perplexity windows of 2048 tokens per set")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N allocations")
    ap.add_argument(
        "--forms",
        type=lambda v: [f for f in v.split(",") if f],
        default=["supernet", "sequential"],
        help="which forms to build, comma-separated (a first pass with supernet only spans every allocation cheaply)",
    )
    ap.add_argument(
        "--shard", type=parse_shard, default=(0, 1), help="I/N: only every N-th allocation from the I-th (parallel processes)"
    )
    ap.add_argument("--report", type=Path, default=None, help="print the table and rho of a results file, then exit")
    ap.add_argument("--plot", type=Path, default=None, help="with --report: also draw the fitness/perplexity scatter here")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        if args.plot:
            print(f"scatter: {plot(args.report, args.plot)}")
        return
    if args.run is None:
        ap.error("give a pipeline run directory (or --report FILE)")
    if not args.forms or set(args.forms) - {"supernet", "sequential"}:
        ap.error(f"--forms takes supernet and/or sequential, not {','.join(args.forms)!r}")
    run(args)


if __name__ == "__main__":
    main()
