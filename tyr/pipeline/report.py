"""What a pipeline run's report leads with: the model to ship against the baseline that counts.

The shipped model is the searched one after recovery when recovery ran (else the searched one); the
baseline is ``uniform_reprune`` (every layer pruned sequentially to the target, same pruner and calibration)
after the same recovery (else before). :func:`headline` compares them on the same windows and documents
(:mod:`tyr.stats`); :func:`leading_rows` orders the table the same way.
"""

from __future__ import annotations

from tyr.stats import paired_diff, paired_ratio


def _kind(label: str) -> tuple[str, bool]:
    """(model kind, recovered) of a row label: kinds 'searched', 'uniform_reprune', 'dense', 'other'."""
    recovered = "+ recovery" in label
    for kind in ("searched", "uniform_reprune", "dense"):
        if f" {kind} " in f" {label} ":
            return kind, recovered
    return "other", recovered


def leading_rows(rows: dict[str, dict]) -> dict[str, dict]:
    """The rows in reading order: searched and uniform after recovery, then before, dense, the others."""
    order = [("searched", True), ("uniform_reprune", True), ("searched", False), ("uniform_reprune", False), ("dense", False)]
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(rows.items(), key=lambda kv: rank.get(_kind(kv[0]), len(order))))


def _find(rows: dict[str, dict], kind: str, recovered: bool) -> tuple[str, dict] | None:
    return next(((k, v) for k, v in rows.items() if _kind(k) == (kind, recovered)), None)


def headline(rows: dict[str, dict]) -> dict:
    """The shipped model against the baseline: per perplexity set the paired ratio, and the zero-shot difference."""
    lines, pairs = [], {}
    for recovered in (True, False):
        a, b = _find(rows, "searched", recovered), _find(rows, "uniform_reprune", recovered)
        if a is None or b is None:
            continue
        stage = "after recovery" if recovered else "before recovery"
        out = {"model": a[0], "baseline": b[0], "perplexity": {}, "zero_shot": None}
        cells = []
        for name, r in a[1].get("perplexity", {}).items():
            q = b[1].get("perplexity", {}).get(name)
            pr = paired_ratio(r.get("window_nll", []), q.get("window_nll", [])) if q else None
            if pr is not None:
                out["perplexity"][name] = {"ppl": r["ppl"], "baseline_ppl": q["ppl"], **pr}
                lo, hi = pr["ci95"]
                cells.append(f"{name} {r['ppl']:.2f} vs {q['ppl']:.2f} (x{pr['ratio']:.3f}, 95% CI {lo:.3f}-{hi:.3f})")
        za, zb = (a[1].get("zero_shot") or {}), (b[1].get("zero_shot") or {})
        if za.get("per_doc") and zb.get("per_doc"):
            d = paired_diff(za["per_doc"], zb["per_doc"])
            if d is not None:
                out["zero_shot"] = {"average": za["average"], "baseline_average": zb["average"], **d}
                cells.append(f"zero-shot {100 * za['average']:.2f} vs {100 * zb['average']:.2f} ({d['diff']:+.2f} points)")
        pairs[stage] = out
        if cells:
            lines.append(f"**Searched vs uniform, {stage}** (same windows and documents): " + "; ".join(cells))
    return {"pairs": pairs, "lines": lines}
