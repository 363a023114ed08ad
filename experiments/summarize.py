"""Collect every job of a sweep (or any folder of runs) into one table and plots.

    python -m experiments.summarize runs/multirun/prune/2026-11-22_22-00-00 [--out DIR] [--dense results.json]

Reads each ``results.json`` (evaluate / prune / build / pipeline recipes) and ``failed.json`` below the
folder, and writes ``summary.md``, ``summary.csv``, ``ppl_vs_sparsity.png`` and ``acc_vs_sparsity.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"]


def _row(method: str, sparsity: float | None, res: dict, source: Path) -> dict:
    ppl = res.get("perplexity", {})
    zs = res.get("zero_shot") or {}
    row = {"method": method, "sparsity": sparsity, "achieved": res.get("achieved_sparsity", (res.get("budget") or {}).get("sparsity")),
           "params_M": res.get("params", {}).get("total", 0) / 1e6,
           "wikitext2": ppl.get("wikitext2", {}).get("ppl"), "ptb": ppl.get("ptb", {}).get("ppl"),
           "avg": zs.get("average"), "limit": zs.get("limit"), "source": str(source)}
    for t in TASKS:
        row[t] = zs.get("scores", {}).get(t)
    return row


def collect(root: Path) -> tuple[list[dict], list[dict]]:
    rows, failed = [], []
    for f in sorted(root.rglob("results.json")):
        res = json.loads(f.read_text())
        if "rows" in res:  # pipeline: one row per evaluated allocation
            for label, r in res["rows"].items():
                name = r.get("allocation", label)
                pr = r.get("config", {}).get("pruner", {}).get("name", "")
                rows.append(_row(f"tyr search ({pr})" if name == "searched" else f"{name} allocation ({pr})",
                                 r.get("config", {}).get("target_sparsity"), r, f.parent))
        elif "pruner" in res:  # uniform prune
            rows.append(_row(f"{res['pruner']} / {res.get('reconstruction', '?')}", res.get("target_sparsity"), res, f.parent))
        elif res.get("allocation") == "centre":  # build with evaluate_centre
            rows.append(_row(f"supernet centre (eea={res.get('eea')})", res.get("target_sparsity"), res, f.parent))
        else:  # dense evaluation
            rows.append(_row(f"dense ({res.get('model', '?')})", 0.0, res, f.parent))
    for f in sorted(root.rglob("failed.json")):
        failed.append({"job": str(f.parent), **{k: v for k, v in json.loads(f.read_text()).items() if k != "traceback"}})
    rows.sort(key=lambda r: (r["sparsity"] or 0.0, r["method"]))
    return rows, failed


def _fmt(v, pct=False):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict], failed: list[dict]) -> str:
    head = ["method", "sparsity", "achieved", "params", "WikiText-2 ppl", "PTB ppl"] + TASKS + ["avg"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], _fmt(r["sparsity"]), "-" if r["achieved"] is None else f"{r['achieved']:.4f}",
                 f"{r['params_M']:.1f}M", _fmt(r["wikitext2"]), _fmt(r["ptb"])]
        cells += [_fmt(r[t], pct=True) for t in TASKS] + [_fmt(r["avg"], pct=True)]
        out.append("| " + " | ".join(cells) + " |")
    if failed:
        out += ["", "Failed jobs:", ""] + [f"- `{f['job']}`: {f['error']}" for f in failed]
    limits = {r["limit"] for r in rows if r["limit"] is not None}
    if limits:
        out += ["", f"Zero-shot on the first {sorted(limits)} documents of each task."]
    return "\n".join(out) + "\n"


def plots(rows: list[dict], out: Path) -> None:
    by = {}
    for r in rows:
        if r["sparsity"]:
            by.setdefault(r["method"], []).append(r)
    for key, fname, label in (("wikitext2", "ppl_vs_sparsity.png", "WikiText-2 perplexity"),
                              ("avg", "acc_vs_sparsity.png", "zero-shot average accuracy")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for m, rs in sorted(by.items()):
            pts = sorted((r["sparsity"], r[key]) for r in rs if r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        dense = [r for r in rows if not r["sparsity"] and r[key] is not None]
        if dense:
            ax.axhline(dense[0][key], color="black", ls="--", lw=0.8, label="dense")
        if key == "wikitext2":
            ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = collect(args.root)
    (out / "summary.md").write_text(markdown(rows, failed))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        w.writeheader()
        w.writerows(rows)
    plots(rows, out)
    print(markdown(rows, failed))


if __name__ == "__main__":
    main()
