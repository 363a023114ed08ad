"""KL and perplexity on the search tokens of every model form a pipeline run evaluated, next to its
test perplexities.

The search ranks allocations by KL(dense ‖ pruned) on held-out C4 tokens; the results table ranks
models by WikiText-2 / PTB perplexity. This script scores the run's four pruned forms with the
search's own measure (all search tokens, no rotation) so the two rankings can be compared:
the searched widths as assembled from the supernet and as re-pruned sequentially, and the uniform
widths in both forms.

Usage:
    .venv/bin/python -m experiments.form_kl runs/pipeline/smollm2-135m/obs-s0.5-fast [more runs]
Writes ``<run>/form_kl.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tyr.coarse_to_fine import full_kl
from tyr.fitness import TeacherCache
from tyr.models import load_model
from tyr.supernet.assemble import Assembler
from tyr.supernet.store import SupernetStore


def forms(run: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (supernet folder, levels) for every form whose supernet exists in ``run``."""
    from tyr.search_state import resolved

    state = resolved(json.loads((run / "search_state.json").read_text()), run)  # paths relative to the run
    last = state["iterations"][-1]
    first = SupernetStore.open(state["iterations"][0]["supernet"])
    out = {
        "searched (supernet)": (Path(last["supernet"]), last["levels"]),
        "uniform (supernet)": (first.root, first.grid.centre_levels()),
    }
    for name, sub in (("searched (re-pruned)", "reprune"), ("uniform (re-pruned)", "uniform_reprune")):
        root = run / sub / "supernet"
        if (root / "manifest.json").exists():
            out[name] = (root, SupernetStore.open(root).grid.centre_levels())
    return out


UNIFORM_FILES = {"uniform (supernet)": "results_uniform.json", "uniform (re-pruned)": "results_uniform_reprune.json"}


def results_for(run: Path, folder: Path) -> dict | None:
    """The run's evaluation of the form stored in ``folder`` (results_*.json naming that supernet)."""
    for f in run.glob("results_*.json"):
        r = json.loads(f.read_text())
        if r.get("supernet") == str(folder):
            return r
    return None


@torch.no_grad()
def search_nll(model, store: SupernetStore, levels: dict, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL of the assembled model on the search sequences (their perplexity's log)."""
    asm = Assembler(model, store)
    asm.assemble(levels)
    try:
        tot, n = 0.0, 0
        for i in range(0, ids.shape[0], batch_size):
            x = ids[i : i + batch_size]
            tot += model(x, labels=x).loss.item() * x.shape[0] * (x.shape[1] - 1)
            n += x.shape[0] * (x.shape[1] - 1)
        return tot / n
    finally:
        asm.restore_dense()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        "| run | form | KL (search tokens) | C4 ppl (search tokens) | WikiText-2 | PTB | avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in args.runs:
        run = run.resolve()
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        lm = load_model(cfg.model.name, instantiate(cfg.model.source), cfg.model.dtype)
        teacher = TeacherCache.load(run / "teacher.safetensors")
        if teacher is None:
            raise SystemExit(f"{run}/teacher.safetensors is missing, corrupt or unverified: rerun the pipeline to rebuild it")
        rows = {}
        done = json.loads((run / "form_kl.json").read_text())["forms"] if (run / "form_kl.json").exists() else {}
        for name, (folder, levels) in forms(run).items():
            store = SupernetStore.open(folder)
            old = done.get(name, {})
            kl = (
                old["kl"]
                if old.get("supernet") == str(folder) and "kl" in old
                else full_kl(lm.model, store, levels, teacher, int(cfg.batch_size))
            )
            nll = search_nll(lm.model, store, levels, teacher.input_ids, int(cfg.batch_size))
            fixed = run / UNIFORM_FILES.get(name, "-")
            if name in UNIFORM_FILES:
                res = json.loads(fixed.read_text()) if fixed.exists() else None
            else:
                res = results_for(run, folder)
            ppl = (res or {}).get("perplexity", {})
            rows[name] = {
                "kl": kl,
                "search_nll": nll,
                "search_ppl": float(torch.tensor(nll).exp()),
                "supernet": str(folder),
                "wikitext2": ppl.get("wikitext2", {}).get("ppl"),
                "ptb": ppl.get("ptb", {}).get("ppl"),
                "avg": (res or {}).get("zero_shot", {}).get("average"),
            }
            fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
            lines.append(
                f"| {run.name} | {name} | {kl:.4f} | {rows[name]['search_ppl']:.2f} | "
                f"{fmt(rows[name]['wikitext2'])} | {fmt(rows[name]['ptb'])} | "
                f"{fmt(rows[name]['avg'], 3)} |"
            )
            print(lines[-1], flush=True)
        (run / "form_kl.json").write_text(json.dumps({"tokens": int(teacher.input_ids.numel()), "forms": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
