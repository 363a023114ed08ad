"""Time one dense forward+backward of a model over a token set: the unit in which tyr reports the cost
of pruning, building and searching. Usage:
    .venv/bin/python experiments/dense_pass.py --model smollm2-135m --num-sequences 32 --seq-len 512 [--taylor]
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

import torch  # noqa: E402

from tyr.data import TokenSetSpec, get_token_set  # noqa: E402
from tyr.models import cache_dir  # noqa: E402

from conftest import load_from_conf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", default="c4[0:600]")
    ap.add_argument("--num-sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--taylor", action="store_true", help="also time tyr's layer-at-a-time gradient pass (no cache)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_from_conf(args.model)
    spec = TokenSetSpec(args.source, args.seq_len, args.num_sequences, seed=0)
    ids = get_token_set(spec, lm.tokenizer, cache_dir() / "tokens", lm.name).input_ids
    out = {}
    for what in ("forward", "forward_backward"):
        t0 = time.time()
        for i in range(0, ids.shape[0], args.batch_size):
            x = ids[i : i + args.batch_size]
            if what == "forward":
                with torch.no_grad():
                    lm.model(x)
            else:
                lm.model(x, labels=x).loss.backward()
        lm.model.zero_grad(set_to_none=True)
        out[what + "_seconds"] = time.time() - t0
    if args.taylor:
        from tyr.pruning.taylor import collect_taylor

        t0 = time.time()
        collect_taylor(lm.model, ids, batch_size=args.batch_size, progress=False)
        out["taylor_seconds"] = time.time() - t0
    out.update(model=args.model, tokens=int(ids.numel()), threads=torch.get_num_threads())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
