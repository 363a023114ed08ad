"""Zero-shot time and peak memory of one task: tyr's loglikelihood against lm-eval's own HFLM loop.

    python experiments/zero_shot_batching.py --task boolq --impl tyr
    python experiments/zero_shot_batching.py --task boolq --impl lm-eval --batch-size 4

tyr projects onto the vocabulary only at the continuation's positions; lm-eval's HFLM projects and
log-softmaxes every position of a padded batch. One configuration per process, so the peak RSS
(VmHWM) is that configuration's own.
"""

from __future__ import annotations

import argparse

import torch

import tyr.evaluation
from tyr.evaluation import zero_shot
from tyr.models import cache_dir
from tyr.utils import peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(cache_dir() / "models" / "smollm2-135m"), help="a Hugging Face folder")
    ap.add_argument("--task", default="boolq")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--impl", choices=["tyr", "lm-eval"], default="tyr")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    if args.impl == "lm-eval":
        from lm_eval.models.huggingface import HFLM

        def plain(model, tokenizer, max_batch, logits_mb):
            return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=max_batch, device="cpu")

        tyr.evaluation._budget_hflm = plain
    r = zero_shot(model, tok, [args.task], limit=args.limit, batch_size=args.batch_size)
    print(
        f"{args.task} impl={args.impl} batch_size={args.batch_size}: score {r.scores[args.task]:.4f}, "
        f"{r.seconds:.1f} s, peak RSS {peak_rss_mb():.0f} MB"
    )


if __name__ == "__main__":
    main()
