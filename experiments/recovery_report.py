"""Collect recovery runs into experiments/results/recovery.json and a perplexity-against-tokens plot.

    python -m experiments.recovery_report runs/recovery [MORE_ROOTS ...] [--out experiments/results]

Reads every ``<run>/recover/<mode>-<key>/results-<protocol>.json`` (tyr.recipes.recover) below each ROOT. The
table (issue 15's schema; searched models of pipeline runs under "searched") takes, per sparsity and mode,
the run evaluated with the most perplexity windows (ties: the most tokens); each ``after_<mode>`` entry
also holds its own ``tokens`` and ``seconds``, and the top-level ``tokens`` / ``seconds`` are LoRA's.
The plot shows every LoRA / full run's WikiText-2 perplexity against its tokens, protocol by protocol.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

from experiments import search_vs_uniform as sv

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tyr.utils import portable_path


def scores(res: dict) -> dict:
    """Perplexities with their standard errors and the zero-shot average with its own
    (:func:`experiments.search_vs_uniform.scores`), plus the protocol's size."""
    s = sv.scores(res)
    return {**s, "ppl_windows": s.get("wikitext2_windows"), "task_limit": (res.get("zero_shot") or {}).get("limit")}


def ratios(before: dict, after: dict) -> dict:
    """after / before perplexity per set, paired over the same windows, with its 95 % interval."""
    out = {}
    for name in ("wikitext2", "ptb"):
        r = sv.paired_ratio(after["perplexity"].get(name, {}), before["perplexity"].get(name, {}))
        if r is not None:
            out[name] = r
    return out


def collect(root: Path) -> list[dict]:
    runs = []
    for f in sorted(root.glob("**/recover/*/results-*.json")):  # one per run and evaluation protocol
        r = json.loads(f.read_text())
        src = r["settings"]["source"]
        runs.append(
            {
                "sparsity": str(src["target_sparsity"]),
                "kind": src["kind"],
                "mode": r["recovery"]["mode"],
                "tokens": r["recovery"]["tokens"],
                "seconds": round(r["recovery"]["seconds"]),
                "before": scores(r["before"]),
                "after": scores(r["after"]),
                "after_over_before": ratios(r["before"], r["after"]),
                "dir": portable_path(f.parent),
            }
        )
    return runs


def table(runs: list[dict]) -> dict:
    """Issue 15's schema for the uniform models; searched models (pipeline runs) under "searched"."""
    out: dict = {}
    for r in sorted(runs, key=lambda r: (r["after"]["ppl_windows"] or 0, r["after"]["task_limit"] or 0, r["tokens"])):
        row = out.setdefault(r["sparsity"], {})
        if r["kind"] == "searched":
            row = row.setdefault("searched", {})
        row["before"] = r["before"]
        row[f"after_{r['mode']}"] = {
            **r["after"],
            "after_over_before": r["after_over_before"],
            "tokens": r["tokens"],
            "seconds": r["seconds"],
            "dir": r["dir"],
        }
        if r["mode"] == "lora":
            row.update(tokens=r["tokens"], seconds=r["seconds"])
    return out


def plot(runs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (sp, mode, w), pts in sorted(_series(runs).items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{float(sp):.0%} {mode} ({w} windows of 2048)")
    ax.set_xscale("log")
    top = max(t for pts in _series(runs).values() for t, _ in pts)
    ticks = [_BEFORE_X] + [10.0**k for k in range(5, math.floor(math.log10(top * 1.05)) + 1)]  # 999,424 tokens: "1M"
    ax.set_xticks(ticks, ["0 (before)"] + [f"{t / 1e6:g}M" if t >= 1e6 else f"{t / 1e3:g}K" for t in ticks[1:]])
    ax.minorticks_off()
    ax.set_xlabel("recovery tokens (log scale)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_BEFORE_X = 1e4  # where the log-scale x axis draws 0 tokens (before recovery)


def _series(runs: list[dict]) -> dict:
    s: dict = {}
    for r in runs:
        key = (r["sparsity"], f"{r['kind']} {r['mode']}", r["after"]["ppl_windows"])
        s.setdefault(key, [(0, r["before"]["wikitext2"])])  # 0 tokens: before recovery (drawn at the left edge)
        s[key].append((r["tokens"], r["after"]["wikitext2"]))
    return {k: [(max(t, _BEFORE_X), p) for t, p in sorted(set(v))] for k, v in s.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("roots", type=Path, nargs="+", help="directories searched for recovery results")
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--name", default="recovery", help="file names: NAME.json, NAME_runs.json, NAME_ppl_vs_tokens.png")
    a = ap.parse_args()
    runs = [r for root in a.roots for r in collect(root)]
    if not runs:
        raise SystemExit(f"no recovery results under {' '.join(map(str, a.roots))}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(table(runs), indent=2) + "\n")
    (a.out / f"{a.name}_runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    plot(runs, a.out / f"{a.name}_ppl_vs_tokens.png")
    print(json.dumps(table(runs), indent=2))


if __name__ == "__main__":
    main()
