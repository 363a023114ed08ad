"""What the search's prefix cache saves: the same generations of candidates scored by the KL fitness
with and without reusing the parent's per-layer hidden states, interleaved generation by generation
(so both modes see the same machine load), with the fitness values checked equal.

Usage (after a pipeline run, which leaves a supernet and a teacher cache in its run directory):
    .venv/bin/python experiments/prefix_cache_bench.py --run runs/pipeline/smollm2-135m/hywia-s0.5-fast \\
        --generations 6 --offspring 8 --tokens 2048 --json runs/prefix_cache_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tyr.fitness import KLFitness, TeacherCache  # noqa: E402
from tyr.search import Allocation, SearchSpace, mutate  # noqa: E402
from tyr.supernet.assemble import Assembler  # noqa: E402
from tyr.supernet.store import SupernetStore  # noqa: E402

from conftest import load_from_conf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a pipeline run directory (iter0/supernet, teacher.safetensors)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    lm = load_from_conf(args.model)
    store = SupernetStore.open(run / "iter0" / "supernet")
    teacher = TeacherCache.load(run / "teacher.safetensors")
    if teacher is None:
        raise SystemExit(f"{run}/teacher.safetensors is missing, corrupt or unverified: rerun the pipeline to rebuild it")
    grid = store.grid
    space = SearchSpace.from_costs(grid.costs(), budget=grid.allocation_params(grid.centre_levels()))
    asm = Assembler(lm.model, store)
    fit = {mode: KLFitness(lm.model, asm, teacher, args.batch_size, prefix_cache=mode) for mode in (True, False)}
    rng = np.random.default_rng(args.seed)
    parent = Allocation(grid.centre_levels())
    seconds = {True: 0.0, False: 0.0}
    max_diff = 0.0
    for g in range(args.generations):
        allocs = [mutate(space, parent, rng) for _ in range(args.offspring)] + [parent]
        values = {}
        for mode in (True, False) if g % 2 == 0 else (False, True):
            t0 = time.time()
            values[mode] = fit[mode](allocs, 0, args.tokens)
            seconds[mode] += time.time() - t0
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(values[True], values[False])))
        parent = allocs[int(np.argmin(values[True][:-1]))]  # walk like a search would
        print(f"generation {g}: cached {seconds[True]:.1f} s, uncached {seconds[False]:.1f} s (cumulative)", flush=True)
    asm.restore_dense()
    s = fit[True].stats
    out = {
        "generations": args.generations,
        "offspring": args.offspring,
        "tokens": args.tokens,
        "seconds_cached": seconds[True],
        "seconds_uncached": seconds[False],
        "time_ratio": seconds[True] / seconds[False],
        "layer_forwards_cached": s.layer_forwards,
        "layer_forwards_saved": s.layer_forwards_saved,
        "layer_forwards_uncached": fit[False].stats.layer_forwards,
        "max_abs_fitness_diff": max_diff,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
