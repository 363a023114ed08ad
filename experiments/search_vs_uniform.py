"""Issue #14's table: the exported (searched) model against the best uniform model of the same pruner and
calibration (``uniform_reprune``: the prune recipe's model, every layer pruned sequentially to the target), per sparsity.

    .venv/bin/python -m experiments.search_vs_uniform RUN [RUN ...] [--keep TABLE.json]
        [--out experiments/results/search_vs_uniform.json]

Each RUN is a finished pipeline run evaluated with ``uniform_reprune`` among its comparisons. ``--keep``
takes the rows of an earlier table (this script's output) for the sparsities no RUN gives: a row carries
everything it needs (paired ratios included), so it outlives its run directory. Writes
``{"<sparsity>": {"searched": {...}, "uniform_sequential": {...}, "ratio": {...}, "protocol": "..."}}``
and prints a Markdown table. Perplexities carry their standard error over windows (delta method on the
mean window NLL); the zero-shot average carries sqrt(sum_t p_t (1 - p_t) / n_t) / n_tasks.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tyr.utils import portable_path


def scores(res: dict) -> dict:
    ppl = res.get("perplexity", {})
    zs = res.get("zero_shot") or {}
    out = {}
    for name in ("wikitext2", "ptb"):
        r = ppl.get(name, {})
        out[name] = r.get("ppl")
        out[f"{name}_se"] = r.get("ppl_se")
        out[f"{name}_windows"] = r.get("windows")
    out["avg"] = zs.get("average")
    sc, n = zs.get("scores") or {}, zs.get("samples") or {}
    if sc and all(n.get(t, 0) > 0 for t in sc):
        out["avg_se"] = math.sqrt(sum(p * (1 - p) / n[t] for t, p in sc.items())) / len(sc)
        out["docs_per_task"] = min(n.values())
    return out


def paired_ratio(a: dict, b: dict) -> dict | None:
    """exp(mean of per-window NLL differences) of two perplexity results on the same windows, with its
    95 % interval (the windows as paired samples)."""
    x, y = a.get("window_nll"), b.get("window_nll")
    if not x or not y or len(x) != len(y) or len(x) < 2:
        return None
    d = [u - v for u, v in zip(x, y)]
    n, m = len(d), sum(d) / len(d)
    se = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1) / n)
    return {"ratio": math.exp(m), "ci95": [math.exp(m - 1.96 * se), math.exp(m + 1.96 * se)], "windows": n}


def protocol(res: dict) -> str:
    s = scores(res)
    return (
        f"perplexity over {s.get('wikitext2_windows')} windows of 2048 tokens (WikiText-2, PTB test); "
        f"zero-shot average of {len((res.get('zero_shot') or {}).get('scores') or {})} tasks over "
        f"{s.get('docs_per_task')} documents each"
    )


def collect(runs: list[Path]) -> dict:
    table = {}
    for run in runs:
        searched = json.loads((run / "results_searched.json").read_text())
        sp = str(float(searched["config"]["target_sparsity"]))
        uniform = json.loads((run / "results_uniform_reprune.json").read_text())
        a, b = scores(searched), scores(uniform)
        table[sp] = {
            "searched": a,
            "uniform_sequential": b,
            "ratio": {k: a[k] / b[k] for k in ("wikitext2", "ptb") if a.get(k) and b.get(k)},
            "real_sparsity": {  # of the prunable parameters each model really keeps
                "searched": (searched.get("budget") or {}).get("sparsity"),
                "uniform_sequential": (uniform.get("budget") or {}).get("sparsity"),
            },
            "total_params": {"searched": searched["params"]["total"], "uniform_sequential": uniform["params"]["total"]},
            "run": portable_path(run),
            "protocol": protocol(searched),
        }
        table[sp]["paired"] = {
            k: paired_ratio(searched["perplexity"].get(k, {}), uniform["perplexity"].get(k, {})) for k in ("wikitext2", "ptb")
        }
        if a.get("avg") is not None and b.get("avg") is not None:
            table[sp]["ratio"]["avg_difference"] = a["avg"] - b["avg"]
    return dict(sorted(table.items(), key=lambda kv: float(kv[0])))


def markdown(table: dict) -> str:
    def cell(v, se, d=2):
        return "-" if v is None else (f"{v:.{d}f} ± {se:.{d}f}" if se is not None else f"{v:.{d}f}")

    lines = [
        "| sparsity | model | WikiText-2 | PTB | zero-shot avg | WT2 ratio | PTB ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for sp, row in table.items():
        for name in ("uniform_sequential", "searched"):
            s, r = row[name], row["ratio"] if name == "searched" else {"wikitext2": 1.0, "ptb": 1.0}
            lines.append(
                f"| {float(sp):.1%} | {name} | {cell(s['wikitext2'], s.get('wikitext2_se'))} | "
                f"{cell(s['ptb'], s.get('ptb_se'))} | {cell(s['avg'], s.get('avg_se'), 4)} | "
                f"{r.get('wikitext2', float('nan')):.3f} | {r.get('ptb', float('nan')):.3f} |"
            )
    for sp, row in table.items():
        for k, p in (row.get("paired") or {}).items():
            if p:
                lines.append(
                    f"- {float(sp):.1%} {k}: searched / uniform = {p['ratio']:.3f}, 95 % CI "
                    f"{p['ci95'][0]:.3f}-{p['ci95'][1]:.3f} (paired over {p['windows']} windows)"
                )
    return "\n".join(lines)


def merge(kept: dict, table: dict) -> dict:
    """The rows of ``table`` and, for sparsities it lacks, those of ``kept``, in order of sparsity."""
    return dict(sorted({**kept, **table}.items(), key=lambda kv: float(kv[0])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--keep", type=Path, action="append", default=[], help="an earlier table whose other rows to keep")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/search_vs_uniform.json"))
    args = ap.parse_args()
    table = collect([r.resolve() for r in args.runs])
    for kept in args.keep:
        table = merge(json.loads(kept.read_text()), table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table))


if __name__ == "__main__":
    main()
