"""Issue #32's claim protocol: does the search pay off on general text, across search seeds, before and after
the same recovery?

    python -m experiments.claim run --model smollm2-135m --sparsity 0.5 --seeds 0 1 2 [--threads 1] [-- overrides]
    python -m experiments.claim save      # the runs' small state into experiments/results/claim_runs (commit it)
    python -m experiments.claim report [--out experiments/results/claim.json]

``run`` runs the pipeline once per search seed (``search.seed=k``, ``data.search.seed=SEARCH_TEXT_SEED+k``: the
evolution's randomness and the sample of search text), each in ``runs/claim/pipeline/<model>/<tag>-s<sp>-seed<k>``
and resumable. Everything else is frozen in :data:`PROTOCOL` below, written before any test evaluation and
recorded (with its hash) in the results: calibration text and seed, pruner, search settings, the recovery (method,
text, tokens, seed), the evaluation (the general test slice, the full WikiText-2 and PTB test splits, the five
zero-shot tasks over 500 documents each). The uniform model of the same size (``uniform_reprune``: every layer
pruned sequentially to the target, same pruner and calibration) does not depend on the search seed, so seed 0's
run makes it, evaluates it and gives it the same recovery; the other seeds' runs compare with it.

``report`` reads every finished run under ``runs/claim`` and writes the claim table: per model and sparsity, the
searched model against the uniform one before and after recovery, as paired ratios of perplexity (searched /
uniform) and differences of the zero-shot average (searched - uniform, points), pooled over seeds with 95 %
intervals from a two-way bootstrap over seeds and windows / documents (:mod:`tyr.stats`). A run whose search or
recovery text comes from an evaluation's domain (WikiText-2, PTB, or a user's own text) is *tailored*: it goes to
``claim_tailored.json``, never into the general claim.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = "runs/claim"
SEARCH_TEXT_SEED = 101
# The frozen protocol (issue #32): fixed before any test-set evaluation; changing it changes every run's key.
PROTOCOL = {
    "common": [
        "pruner=hywia_comp",
        "data.calibration.num_sequences=32",  # the #14 protocol and the demo's size: 16K tokens
        "eval=default",
        "eval.perplexity=[general_test,wikitext2_test,ptb_test]",
        "eval.ppl_windows=-1",
        "eval.limit=500",
        "recover=lora",
        "recover.tokens=196608",
        "recover.bf16=true",  # bf16 autocast: about 2x faster on this CPU (avx512_bf16); issue #15's protocol too
        "export=true",
        "finalists=none",
    ],
    # medium for SmolLM2 (issue #14's setting); fast for Gemma-3-270M, whose 262K vocabulary makes a generation ~3x
    # dearer (medium would take ~17 h of one core per seed there)
    "search": {"smollm2-135m": ["search=medium"], "gemma3-270m": ["search=fast"]},
}
GENERAL_SOURCES = ("general_calibration", "general_search", "general_recovery")


def protocol_hash() -> str:
    return hashlib.sha256(json.dumps(PROTOCOL, sort_keys=True).encode()).hexdigest()[:12]


def run_name(tag: str, sparsity: float, seed: int) -> str:
    return f"{tag}-s{sparsity}-seed{seed}"


def overrides(model: str, sparsity: float, seed: int, tag: str, extra: list[str]) -> list[str]:
    return [
        f"model={model}",
        f"target_sparsity={sparsity}",
        *PROTOCOL["common"],
        *PROTOCOL["search"].get(model, ["search=medium"]),
        f"search.seed={seed}",
        f"data.search.seed={SEARCH_TEXT_SEED + seed}",
        # seed 0 makes the uniform model and its recovery; the others compare with it (it does not depend on the seed)
        "compare=[uniform_reprune]" if seed == 0 else "compare=[]",
        f"paths.output_dir={OUT_DIR}",
        f"name={run_name(tag, sparsity, seed)}",
        *extra,
    ]


def cmd_run(args) -> None:
    env = dict(os.environ, TYR_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    restored = restore(ROOT / CARRY_DIR, ROOT / OUT_DIR)
    if restored:
        print(f"restored {restored} carried files from {CARRY_DIR}", flush=True)
    for seed in args.seeds:
        cmd = [sys.executable, "-m", "tyr.recipes.pipeline", *overrides(args.model, args.sparsity, seed, args.tag, args.extra)]
        print("+", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, cwd=ROOT, env=env)
        save(ROOT / OUT_DIR, ROOT / CARRY_DIR)
        if p.returncode != 0:
            sys.exit(p.returncode)


# --- carry: a run's small state across machines -----------------------------------------------------------------
# One seed of the protocol takes longer than a working session on 2 cores, and a new machine starts without runs/.
# The run's small files (its config, stage records, search state and history, every evaluation's results) are
# carried in the repository; the big ones (supernets, teacher cache, exported folders) are deterministic and made
# again. A restored search resumes at its last generation; a restored evaluation or finished recovery is reused by
# its key, as in the run it came from.
CARRY_DIR = "experiments/results/claim_runs"
CARRY_GLOBS = (
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    "stages/*.json",
    "search_state.json",  # before history.jsonl: a history line the state has not committed is dropped on resume
    "history.jsonl",
    "timings.json",
    "**/results*.json",
)


def carry_files(run: Path) -> list[Path]:
    """The files of ``run`` that are carried, in copy order."""
    out: list[Path] = []
    for pat in CARRY_GLOBS:
        for p in sorted(run.glob(pat)):
            if p.is_file() and "hf_model" not in p.relative_to(run).parts and p not in out:
                out.append(p)
    return out


def save(runs: Path, carry: Path) -> int:
    """Copy every claim run's carried files under ``runs`` to ``carry`` (paths inside made relative to the
    repository, or to the home directory: the cache's, in the results' config records); returns how many."""
    n = 0
    for run in sorted(p.parent.parent for p in runs.glob("pipeline/*/*/.hydra/config.yaml")):
        for p in carry_files(run):
            dst = carry / p.relative_to(runs)
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = p.read_text().replace(str(ROOT) + os.sep, "").replace(str(Path.home()) + os.sep, "~" + os.sep)
            tmp = dst.with_name(dst.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, dst)
            n += 1
    return n


def restore(carry: Path, runs: Path) -> int:
    """Copy carried files into ``runs`` where the run has none of its own; returns how many."""
    n = 0
    if not carry.is_dir():
        return 0
    for src in sorted(carry.rglob("*")):
        dst = runs / src.relative_to(carry)
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            n += 1
    return n


def cmd_save(args) -> None:
    print(f"saved {save(ROOT / OUT_DIR, ROOT / CARRY_DIR)} files to {CARRY_DIR}")


# --- report -------------------------------------------------------------------------------------------------------


def _rows(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["rows"]


def _pick(rows: dict, kind: str, recovered: bool) -> dict | None:
    from tyr.pipeline.report import _kind

    return next((v for k, v in rows.items() if _kind(k) == (kind, recovered)), None)


def _config(run: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=False)


def tailored(cfg: dict) -> list[str]:
    """The sources of a run's stage text that are not the general corpus's (empty: a general run)."""
    used = [cfg["data"]["calibration"]["source"], cfg["data"]["search"]["source"]]
    used += [d["source"] for d in (cfg.get("recover") or {}).get("data", [])]
    return sorted({p for s in used for p in str(s).split("+") if p not in GENERAL_SOURCES})


def compare(searched: list[dict], uniform: dict) -> dict:
    """Pooled paired statistics of the seeds' searched models against the uniform model."""
    from tyr.stats import pooled_diff, pooled_ratio

    out = {}
    for name in ("general", "wikitext2", "ptb"):
        if all(name in r["perplexity"] for r in searched) and name in uniform["perplexity"]:
            out[f"{name}_ppl_ratio"] = pooled_ratio(
                [r["perplexity"][name]["window_nll"] for r in searched], uniform["perplexity"][name]["window_nll"]
            )
            out[f"{name}_ppl_ratio"]["searched_ppl"] = [r["perplexity"][name]["ppl"] for r in searched]
            out[f"{name}_ppl_ratio"]["uniform_ppl"] = uniform["perplexity"][name]["ppl"]
    zs = [r.get("zero_shot") or {} for r in searched]
    zu = uniform.get("zero_shot") or {}
    if zu.get("per_doc") and all(z.get("per_doc") for z in zs):
        out["zero_shot_diff"] = pooled_diff([z["per_doc"] for z in zs], zu["per_doc"])
        out["zero_shot_diff"]["searched_avg"] = [100 * z["average"] for z in zs]
        out["zero_shot_diff"]["uniform_avg"] = 100 * zu["average"]
    return out


def collect(root: Path) -> tuple[dict, dict]:
    """(general claim, tailored claims) from every finished run under ``root``: {model: {sparsity: entry}}."""
    from tyr.utils import portable_path

    groups: dict[tuple, dict[int, Path]] = {}
    for res in sorted(root.glob("pipeline/*/*/results.json")):
        run = res.parent
        cfg = _config(run)
        key = (cfg["model"]["name"], str(float(cfg["target_sparsity"])), run.name.rsplit("-seed", 1)[0])
        groups.setdefault(key, {})[int(cfg["search"]["seed"])] = run
    general: dict = {}
    special: dict = {}
    for (model, sp, tag), runs in sorted(groups.items()):
        if 0 not in runs:
            continue
        base = _rows(runs[0])
        u_before, u_after = _pick(base, "uniform_reprune", False), _pick(base, "uniform_reprune", True)
        seeds = sorted(runs)
        rows = [_rows(runs[k]) for k in seeds]
        s_before, s_after = [_pick(r, "searched", False) for r in rows], [_pick(r, "searched", True) for r in rows]
        if u_before is None or any(r is None for r in s_before):
            continue
        cfg = _config(runs[0])
        rec = cfg.get("recover") or {}
        entry = {
            "tag": tag,
            "search_text": cfg["data"]["search"]["source"],
            "seeds": seeds,
            "before": compare(s_before, u_before),
            "after": compare(s_after, u_after) if u_after is not None and all(s_after) else None,
            "recovery": {
                "mode": rec.get("mode"),
                "tokens": rec.get("tokens"),
                "text": "+".join(d["source"] for d in rec.get("data", [])),
            },
            "params": {"searched": [r["params"]["total"] for r in s_before], "uniform": u_before["params"]["total"]},
            "runs": [portable_path(runs[k], ROOT) for k in seeds],
            "protocol_hash": protocol_hash(),
        }
        other = tailored(cfg)
        if other:
            entry["tailored_to"] = other
        (special if other else general).setdefault(model, {})[sp] = entry
    return general, special


def _cell(x: dict | None, points: bool = False) -> str:
    if not x:
        return "-"
    m, (lo, hi) = x["mean"], x["ci95"]
    return f"{m:+.2f} ({lo:+.2f} to {hi:+.2f})" if points else f"{m:.3f} ({lo:.3f}-{hi:.3f})"


def markdown(claim: dict) -> str:
    lines = [
        "| model | sparsity | seeds | stage | general ppl ratio | WikiText-2 ratio | PTB ratio | zero-shot diff (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, by_sp in claim.items():
        for sp, e in sorted(by_sp.items(), key=lambda kv: -float(kv[0])):
            for stage in ("before", "after"):
                r = e.get(stage) or {}
                cells = [_cell(r.get(f"{k}_ppl_ratio")) for k in ("general", "wikitext2", "ptb")]
                cells.append(_cell(r.get("zero_shot_diff"), True))
                lines.append(f"| {model} | {float(sp):.0%} | {len(e['seeds'])} | {stage} recovery | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    general, special = collect(ROOT / OUT_DIR)
    for claim, path in ((general, args.out), (special, args.out.with_name(args.out.stem + "_tailored.json"))):
        if claim:
            path.write_text(json.dumps(claim, indent=1) + "\n")
            print(f"{path}:\n{markdown(claim)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--sparsity", type=float, default=0.5)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--tag", default="claim")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("extra", nargs="*", help="further pipeline overrides (after --)")
    sub.add_parser("save", help=f"copy the runs' small state to {CARRY_DIR} (to commit); `run` restores it")
    p = sub.add_parser("report")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "claim.json")
    args = ap.parse_args()
    {"run": cmd_run, "save": cmd_save, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
