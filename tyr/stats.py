"""Paired comparisons of two models evaluated on the same windows and documents (:mod:`tyr.evaluation` results).

Perplexity: the ratio of perplexities is exp(mean over windows of the NLL difference); its interval treats
the windows as paired samples. Zero-shot: the difference of the task-averaged accuracies, in points; per
task the documents are paired samples, and the average's variance is the mean of the tasks' over the number
of tasks squared. Across seeds (:func:`pooled_ratio`, :func:`pooled_diff`), each seed's model is compared with
the same baseline on the same windows / documents, and the interval comes from a two-way bootstrap that
resamples seeds and windows (or documents) independently: it covers both the test text's sampling and the
seed-to-seed spread (conservative for a crossed design).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def _mean_se(d: np.ndarray) -> tuple[float, float]:
    n = len(d)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def paired_ratio(window_nll_a: list[float], window_nll_b: list[float]) -> dict | None:
    """ppl(a) / ppl(b) over the same windows, with its 95 % interval; None if the windows differ."""
    a, b = np.asarray(window_nll_a, dtype=np.float64), np.asarray(window_nll_b, dtype=np.float64)
    if len(a) != len(b) or len(a) < 2:
        return None
    m, se = _mean_se(a - b)
    return {"ratio": math.exp(m), "ci95": [math.exp(m - Z95 * se), math.exp(m + Z95 * se)], "windows": len(a)}


def _task_diffs(per_doc_a: dict[str, list[float]], per_doc_b: dict[str, list[float]]) -> list[np.ndarray] | None:
    tasks = sorted(per_doc_a)
    if not tasks or sorted(per_doc_b) != tasks or any(len(per_doc_a[t]) != len(per_doc_b[t]) or not per_doc_a[t] for t in tasks):
        return None
    return [np.asarray(per_doc_a[t], dtype=np.float64) - np.asarray(per_doc_b[t], dtype=np.float64) for t in tasks]


def paired_diff(per_doc_a: dict[str, list[float]], per_doc_b: dict[str, list[float]]) -> dict | None:
    """(task-averaged accuracy of a) - (that of b), in points, with its 95 % interval; None if the documents differ."""
    diffs = _task_diffs(per_doc_a, per_doc_b)
    if diffs is None:
        return None
    m = float(np.mean([d.mean() for d in diffs]))
    se = math.sqrt(sum(d.var(ddof=1) / len(d) for d in diffs)) / len(diffs)
    return {"diff": 100 * m, "ci95": [100 * (m - Z95 * se), 100 * (m + Z95 * se)], "documents": int(sum(len(d) for d in diffs))}


def _two_way_bootstrap(d: np.ndarray, stat, reps: int, seed: int) -> tuple[float, float]:
    """Percentile interval of ``stat`` over [seeds, items] matrices with rows and columns resampled."""
    rng = np.random.default_rng(seed)
    k, n = d.shape
    vals = np.empty(reps)
    for r in range(reps):
        rows = rng.integers(0, k, k)
        cols = rng.integers(0, n, n)
        vals[r] = stat(d[np.ix_(rows, cols)])
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def pooled_ratio(window_nll_models: list[list[float]], window_nll_base: list[float], reps: int = 4000, seed: int = 0) -> dict:
    """Mean over seeds of log ppl ratios (each seed's model against the same baseline windows), as a ratio,
    with a 95 % two-way bootstrap interval (seeds x windows) and the per-seed ratios."""
    base = np.asarray(window_nll_base, dtype=np.float64)
    d = np.stack([np.asarray(a, dtype=np.float64) - base for a in window_nll_models])
    m = float(d.mean())
    lo, hi = _two_way_bootstrap(d, lambda x: x.mean(), reps, seed) if d.shape[0] > 1 else (m, m)
    if d.shape[0] == 1:  # one seed: the window interval only
        se = d[0].std(ddof=1) / math.sqrt(d.shape[1])
        lo, hi = m - Z95 * se, m + Z95 * se
    return {
        "mean": math.exp(m),
        "ci95": [math.exp(lo), math.exp(hi)],
        "per_seed": [math.exp(float(x.mean())) for x in d],
        "windows": int(d.shape[1]),
    }


def pooled_diff(
    per_doc_models: list[dict[str, list[float]]], per_doc_base: dict[str, list[float]], reps: int = 4000, seed: int = 0
) -> dict:
    """Mean over seeds of task-averaged accuracy differences, in points, with a 95 % two-way bootstrap interval
    (seeds x documents, resampled within each task) and the per-seed differences."""
    per_seed = [_task_diffs(m, per_doc_base) for m in per_doc_models]
    if any(p is None for p in per_seed):
        raise ValueError("the models were not evaluated on the same documents as the baseline")
    tasks = len(per_seed[0])
    mats = [np.stack([p[t] for p in per_seed]) for t in range(tasks)]  # per task: [seeds, documents]
    m = float(np.mean([x.mean() for x in mats]))
    rng = np.random.default_rng(seed)
    k = mats[0].shape[0]
    vals = np.empty(reps)
    for r in range(reps):
        rows = rng.integers(0, k, k)
        vals[r] = np.mean([x[np.ix_(rows, rng.integers(0, x.shape[1], x.shape[1]))].mean() for x in mats])
    lo, hi = np.quantile(vals, [0.025, 0.975]) if k > 1 else (np.nan, np.nan)
    if k == 1:
        se = math.sqrt(sum(x[0].var(ddof=1) / x.shape[1] for x in mats)) / tasks
        lo, hi = m - Z95 * se, m + Z95 * se
    return {
        "mean": 100 * m,
        "ci95": [100 * float(lo), 100 * float(hi)],
        "per_seed": [100 * float(np.mean([x[i].mean() for x in mats])) for i in range(k)],
        "documents_per_task": [int(x.shape[1]) for x in mats],
    }
