"""Zero-shot time and peak memory of one task with fixed batches against the logits budget.

    python experiments/zero_shot_batching.py --task boolq --batch-size 16 --logits-mb none
    python experiments/zero_shot_batching.py --task boolq --batch-size 16 --logits-mb 256

One configuration per process, so the peak RSS (VmHWM) is that configuration's own.
"""

from __future__ import annotations

import argparse

import torch

from tyr.evaluation import zero_shot
from tyr.models import cache_dir
from tyr.utils import peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(cache_dir() / "models" / "smollm2-135m"), help="a Hugging Face folder")
    ap.add_argument("--task", default="boolq")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--logits-mb", default="256", help="MB of logits per batch, or 'none' for fixed batches")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    budget = None if args.logits_mb.lower() == "none" else float(args.logits_mb)
    r = zero_shot(model, tok, [args.task], limit=args.limit, batch_size=args.batch_size, logits_mb=budget)
    print(
        f"{args.task} batch_size={args.batch_size} logits_mb={budget}: score {r.scores[args.task]:.4f}, "
        f"{r.seconds:.1f} s, peak RSS {peak_rss_mb():.0f} MB"
    )


if __name__ == "__main__":
    main()
