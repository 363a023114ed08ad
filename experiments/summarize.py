"""Collect every job of a sweep (or any folder of runs) into one table and plots.

    python -m experiments.summarize ROOT [ROOT ...] [--out DIR] [--report docs/report]

Reads each ``results.json`` (evaluate / prune / build / pipeline recipes) and ``failed.json`` below the
folders, and writes ``summary.md``, ``summary.csv``, ``ppl_vs_sparsity.png``, ``acc_vs_sparsity.png``
and, when pipeline runs are among them, ``allocation_per_layer.png`` (searched kept fraction per
layer against uniform). ``--report DIR`` also writes a short report page (``DIR/README.md``) with the
table and the plots.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tyr.utils import portable_path

TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"]


def _row(method: str, sparsity: float | None, res: dict, source: Path) -> dict:
    ppl = res.get("perplexity", {})
    zs = res.get("zero_shot") or {}
    achieved = res.get("achieved_sparsity", (res.get("budget") or {}).get("sparsity"))
    row = {
        "method": method,
        "sparsity": sparsity,
        "achieved": achieved,
        "params_M": res.get("params", {}).get("total", 0) / 1e6,
        "wikitext2": ppl.get("wikitext2", {}).get("ppl"),
        "ptb": ppl.get("ptb", {}).get("ppl"),
        "avg": zs.get("average"),
        "limit": zs.get("limit"),
        "source": str(source),
    }
    for t in TASKS:
        row[t] = zs.get("scores", {}).get(t)
    rest = [row[t] for t in TASKS if t != "boolq" and row[t] is not None]
    row["avg_no_boolq"] = sum(rest) / len(rest) if rest else None
    return row


# Pipeline rows (tyr.recipes.pipeline): "searched" is the result (whichever form won on the search
# KL); the other form of the same widths is reported too.
PIPELINE_LABELS = {
    "searched": "tyr search ({pr})",
    "searched_supernet": "tyr search ({pr}), supernet form",
    "searched_reprune": "tyr search ({pr}), re-pruned form",
    "uniform_reprune": "uniform sequential ({pr})",
}


def collect(root: Path) -> tuple[list[dict], list[dict]]:
    rows, failed = [], []
    for f in sorted(root.rglob("results.json")):
        if "eval_export" in f.parts:  # re-evaluations of an exported folder are checks, not rows
            continue
        res = json.loads(f.read_text())
        if "rows" in res:  # pipeline: one row per evaluated allocation
            for label, r in res["rows"].items():
                name = r.get("allocation", label)
                pr = r.get("config", {}).get("pruner", {}).get("name", "")
                if name == "dense":
                    rows.append(_row(f"dense ({r.get('model', '?')})", 0.0, r, f.parent))
                    continue
                label = PIPELINE_LABELS.get(name, "{name} allocation ({pr})").format(name=name, pr=pr)
                rows.append(_row(label, r.get("config", {}).get("target_sparsity"), r, f.parent))
        elif "pruner" in res:  # uniform prune
            rows.append(_row(f"{res['pruner']} / {res.get('reconstruction', '?')}", res.get("target_sparsity"), res, f.parent))
        elif res.get("allocation") == "centre":  # build with evaluate_centre
            rows.append(_row(f"supernet centre (eea={res.get('eea')})", res.get("target_sparsity"), res, f.parent))
        else:  # dense evaluation
            rows.append(_row(f"dense ({res.get('model', '?')})", 0.0, res, f.parent))
    for f in sorted(root.rglob("failed.json")):
        record = {k: v for k, v in json.loads(f.read_text()).items() if k != "traceback"}
        failed.append({"job": portable_path(f.parent), **record})
    return rows, failed


def collect_all(roots: list[Path]) -> tuple[list[dict], list[dict]]:
    """Rows of every root; one dense row per evaluation protocol (several runs evaluate the same dense model)."""
    rows, failed, seen = [], [], set()
    for root in roots:
        r, f = collect(root)
        rows += r
        failed += f
    out = []
    for r in rows:
        # the dense model once per protocol; any other row once per identical result (a rerun of
        # the same run elsewhere, e.g. make demo and the equivalent explicit pipeline command)
        key = (r["method"], r["sparsity"], r["limit"]) + (
            () if r["method"].startswith("dense") else (r["wikitext2"], r["ptb"], r["avg"])
        )
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    out.sort(key=lambda r: (r["sparsity"] or 0.0, not r["method"].startswith("tyr"), r["method"]))
    return out, failed


def allocation_plot(roots: list[Path], out: Path) -> Path | None:
    """Kept fraction per layer (attention heads, MLP channels) of every pipeline run's searched
    allocation, against uniform (the centre of its first supernet grid)."""
    runs = sorted({f.parent for root in roots for f in root.rglob("allocation.json")})
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run in runs:
        a = json.loads((run / "allocation.json").read_text())
        sp = 1 - a["budget"]["nominal_sparsity"]
        for ax, kind in zip(axes, ("attn", "mlp")):
            mods = a["modules"][kind]
            ax.plot(
                [m["layer"] for m in mods],
                [m["kept"] / m["units"] for m in mods],
                marker=".",
                label=f"{run.name} (kept {sp:.0%})",
            )
    for ax, title in zip(axes, ("attention heads kept", "MLP channels kept")):
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.axhline(0.75, color="grey", lw=0.6, ls=":")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("kept fraction (dotted: uniform 50 % / 25 %)")
    fig.tight_layout()
    path = out / "allocation_per_layer.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v, pct=False):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.2f}"
    return str(v)


def failed_list(failed: list[dict]) -> str:
    """The failed jobs as a Markdown list (empty when none failed)."""
    if not failed:
        return ""
    return "\n".join(["Failed jobs:", ""] + [f"- `{f['job']}`: {f['error']}" for f in failed]) + "\n"


def markdown(rows: list[dict], failed: list[dict]) -> str:
    head = ["method", "sparsity", "achieved", "params", "WikiText-2 ppl", "PTB ppl"] + TASKS + ["avg"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["method"],
            _fmt(r["sparsity"]),
            "-" if r["achieved"] is None else f"{r['achieved']:.4f}",
            f"{r['params_M']:.1f}M",
            _fmt(r["wikitext2"]),
            _fmt(r["ptb"]),
        ]
        cells += [_fmt(r[t], pct=True) for t in TASKS] + [_fmt(r["avg"], pct=True)]
        out.append("| " + " | ".join(cells) + " |")
    if failed:
        out += ["", failed_list(failed)]
    limits = {r["limit"] for r in rows if r["limit"] is not None}
    if limits:
        out += ["", f"Zero-shot on the first {sorted(limits)} documents of each task."]
    return "\n".join(out) + "\n"


def pivot(rows: list[dict]) -> str:
    """One line per method, each sparsity side by side (WikiText-2 / PTB perplexity, zero-shot average
    and the average without BoolQ, whose accuracy mostly tracks how often a model answers its majority
    "yes"), dense on top, then the searched rows, then the uniform ones by the last sparsity's
    WikiText-2 perplexity."""
    levels = sorted({r["sparsity"] for r in rows if r["sparsity"]})
    by: dict[str, dict] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["sparsity"] or 0.0] = r
    dense = [m for m in by if m.startswith("dense")]
    rest = [m for m in by if m not in dense]
    last = levels[-1] if levels else None

    def order(m):
        r = by[m].get(last)
        return (
            not m.startswith("tyr"),
            "allocation" not in m and not m.startswith("tyr"),
            r["wikitext2"] if r and r["wikitext2"] is not None else float("inf"),
            m,
        )

    head = ["method"] + [f"{c} @{s:.0%}" for s in levels for c in ("WikiText-2", "PTB", "avg", "avg w/o BoolQ")]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dense + sorted(rest, key=order):
        cells = [m]
        for s in levels:
            r = by[m].get(0.0 if m in dense else s)
            cells += (
                ["-"] * 4
                if r is None
                else [_fmt(r["wikitext2"]), _fmt(r["ptb"]), _fmt(r["avg"], pct=True), _fmt(r["avg_no_boolq"], pct=True)]
            )
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"


def update_section(path: Path, text: str) -> None:
    """Replace what stands between the summary markers of ``path`` with ``text``."""
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section to update")
    head, rest = doc.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def plots(rows: list[dict], out: Path) -> None:
    by = {}
    for r in rows:
        if r["sparsity"]:
            by.setdefault(r["method"], []).append(r)
    colors = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # 10 strong, then 10 light
    bases = sorted({m.split(" / ")[0] for m in by})  # a scorer keeps its colour with and without refit
    for key, fname, label in (
        ("wikitext2", "ppl_vs_sparsity.png", "WikiText-2 perplexity"),
        ("avg", "acc_vs_sparsity.png", "zero-shot average accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for m, rs in sorted(by.items()):
            pts = sorted((r["sparsity"], r[key]) for r in rs if r[key] is not None)
            if pts:  # one colour per method; dashed without reconstruction; the search stands out
                color = colors[bases.index(m.split(" / ")[0]) % len(colors)]
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=m,
                    color=color,
                    ls="--" if m.endswith("/ none") else "-",
                    lw=2.5 if m.startswith("tyr") else 1.2,
                )
        dense = [r for r in rows if not r["sparsity"] and r[key] is not None]
        if dense:
            ax.axhline(dense[0][key], color="black", ls=":", lw=0.8, label="dense")
        if key == "wikitext2":
            ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def report_page(rows: list[dict], failed: list[dict], roots: list[Path], out: Path, images: list[Path]) -> Path:
    """A short Markdown page: sources, table, plots (copied next to it)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Sweep report",
        "",
        "Generated by `python -m experiments.summarize " + " ".join(str(r) for r in roots) + f" --report {out}`.",
        "",
        pivot(rows),
        "All rows:",
        "",
        markdown(rows, failed),
    ]
    for img in images:
        shutil.copy(img, out / img.name)
        lines += [f"![{img.stem}]({img.name})", ""]
    page = out / "README.md"
    page.write_text("\n".join(lines))
    return page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None, help="where summary.* and plots go (default: the first root)")
    ap.add_argument("--report", type=Path, default=None, help="also write a report page into this folder")
    ap.add_argument(
        "--update",
        type=Path,
        default=None,
        help=f"also put the side-by-side table into this Markdown file, between {BEGIN} and {END}",
    )
    args = ap.parse_args()
    out = args.out or args.roots[0]
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = collect_all(args.roots)
    side_by_side = pivot(rows)
    (out / "summary.md").write_text(side_by_side + "\n" + markdown(rows, failed))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        w.writeheader()
        w.writerows(rows)
    plots(rows, out)
    images = [out / "ppl_vs_sparsity.png", out / "acc_vs_sparsity.png"]
    alloc = allocation_plot(args.roots, out)
    if alloc is not None:
        images.append(alloc)
    if args.report:
        print("report:", report_page(rows, failed, args.roots, args.report, images))
    if args.update:
        update_section(args.update, side_by_side + "\n" + failed_list(failed))
        print("updated:", args.update)
    print(side_by_side)
    print(markdown(rows, failed))


if __name__ == "__main__":
    main()
