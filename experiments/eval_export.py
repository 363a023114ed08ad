"""Evaluate an exported folder the way a user would, and compare with the in-memory pruned model.

1. ``python -m tyr.recipes.evaluate model=hf_folder model.source.path=<run>/hf_model`` in a fresh
   process (perplexity and zero-shot with the same protocol as the pipeline's ``results_searched.json``);
2. the ``lm_eval`` command line on ``pretrained=<run>/hf_model,trust_remote_code=True`` with tyr's local
   task files (``python -m tyr.tasks DIR``), nothing of tyr imported in that process.

Usage:
    .venv/bin/python experiments/eval_export.py --run runs/pipeline/smollm2-135m/hywia-s0.5-fast
Writes ``<run>/eval_export/eval_export.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tyr.utils import portable_path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict) -> None:
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}):\n{p.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a pipeline run directory with hf_model/ and results_searched.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    run = Path(args.run).resolve()
    folder = run / "hf_model"
    ref = json.loads((run / "results_searched.json").read_text())
    ev = ref["config"]["eval"]
    out = run / "eval_export"
    out.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TYR_THREADS=str(args.threads),
        OMP_NUM_THREADS=str(args.threads),
    )
    py = sys.executable

    # 1. tyr's evaluate recipe on the folder
    _run(
        [
            py,
            "-m",
            "tyr.recipes.evaluate",
            "model=hf_folder",
            f"model.source.path={folder}",
            f"eval.ppl_windows={ev['ppl_windows']}",
            f"eval.limit={ev['limit'] if ev['limit'] is not None else 'null'}",
            f"eval.seq_len={ev['seq_len']}",
            f"hydra.run.dir={out / 'tyr_evaluate'}",
        ],
        env,
    )
    tyr_res = json.loads((out / "tyr_evaluate" / "results.json").read_text())

    # 2. the lm_eval command line, as a user runs it
    tasks = list(ev["tasks"])
    _run([py, "-m", "tyr.tasks", str(out / "tasks"), *tasks], env)
    lm_eval = str(Path(py).with_name("lm_eval"))
    cmd = [
        lm_eval,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={folder},trust_remote_code=True,dtype=float32",
        "--tasks",
        ",".join(f"tyr_{t}" for t in tasks),
        "--include_path",
        str(out / "tasks"),
        "--batch_size",
        str(ev["batch_size"]),
        "--device",
        "cpu",
        "--output_path",
        str(out / "lm_eval"),
    ]
    if ev["limit"] is not None:
        cmd += ["--limit", str(ev["limit"])]
    _run(cmd, env)
    (res_file,) = sorted((out / "lm_eval").rglob("results_*.json"))[-1:]
    cli = json.loads(res_file.read_text())["results"]

    from tyr.tasks import TASKS

    rows, report = [], {"run": portable_path(run), "perplexity": {}, "zero_shot": {}}
    for name, r in ref["perplexity"].items():
        a, b = r["ppl"], tyr_res["perplexity"][name]["ppl"]
        report["perplexity"][name] = {"in_memory": a, "exported": b, "rel_diff": abs(a - b) / a}
        rows.append(f"| {name} ppl | {a:.4f} | {b:.4f} | – | {abs(a - b) / a:.1e} |")
    for t in tasks:
        metric = TASKS[t][2]
        a = ref["zero_shot"]["scores"][t]
        b = tyr_res["zero_shot"]["scores"][t]
        c = float(cli[f"tyr_{t}"][f"{metric},none"])
        report["zero_shot"][t] = {"metric": metric, "in_memory": a, "exported": b, "lm_eval_cli": c}
        rows.append(f"| {t} {metric} | {100 * a:.2f} | {100 * b:.2f} | {100 * c:.2f} | {max(abs(a - b), abs(a - c)):.1e} |")
    (out / "eval_export.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| metric | in memory | exported (tyr evaluate) | exported (lm_eval CLI) | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
