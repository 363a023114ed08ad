"""CPU inference benchmark: a dense model folder against exported pruned folders.

Each model is measured in its own fresh process (so peak RSS is per model) on the same prompts:

- prefill (time to first token): ``--batch`` x ``--prompt-len`` tokens in one forward with ``use_cache=True``
  and, as ``generate`` does, logits for the last position only;
- decode: ``--new-tokens`` greedy steps, one token at a time through the KV cache;
- memory: bytes of the weights, the KV cache after decoding, RSS after loading and peak RSS.

Prints a Markdown table with ratios against the dense model (or the first model).
``--layouts padded index`` also measures every exported folder converted to the index-map layout
(uneven GQA groups through ``index_select``, no zero padding heads).

Example::

    python experiments/bench_inference.py --dense runs/dense --pruned runs/export-50 runs/export-30 \\
        --prompt-len 512 --new-tokens 64 --threads 2 --dtype bfloat16 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_inference")


# ------------------------------------------------------------------------------------------------
# Worker: one model in this process
# ------------------------------------------------------------------------------------------------


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def _portable_args(args: argparse.Namespace) -> dict[str, Any]:
    from tyr.utils import portable_path

    out = dict(vars(args))
    out["dense"] = portable_path(args.dense) if args.dense else None
    out["pruned"] = [portable_path(p) for p in args.pruned]
    return out


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from tyr.modeling.hf_pruned.modeling_tyr_llama import CACHE_KWARG
    from tyr.utils import peak_rss_mb, portable_path, proc_status_mb

    torch.set_num_threads(args.threads)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, trust_remote_code=True, dtype=dtype)
    if args.layout == "index":
        from tyr.export import index_layout_from_padded

        model = index_layout_from_padded(model)
    model.eval()
    load_s = time.perf_counter() - t0
    rss_loaded = proc_status_mb("VmRSS")
    seen: set[int] = set()
    params = weight_bytes = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            weight_bytes += p.numel() * p.element_size()
            if isinstance(p, torch.nn.Parameter):
                params += p.numel()
    stored_params = params
    alloc = Path(args.path) / "tyr_allocation.json"
    if alloc.exists():  # real parameters of a pruned export: zero padding heads excluded
        params = int(json.loads(alloc.read_text())["parameters"]["total"])
    from safetensors.torch import load_file

    ids = load_file(args.ids)["ids"]
    prefill_s, decode_s, cache_b = [], [], 0
    with torch.inference_mode():
        model(ids[:, : min(16, ids.shape[1])], use_cache=True)  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)  # as generate() does: logits of the last position only
            prefill_s.append(time.perf_counter() - t)
            pkv = out[CACHE_KWARG]
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(args.new_tokens):
                out = model(nxt, use_cache=True, **{CACHE_KWARG: pkv})
                nxt = out.logits[:, -1:].argmax(-1)
            decode_s.append(time.perf_counter() - t)
            cache_b = _cache_bytes(pkv)
            del out, pkv
    b, n = ids.shape
    pre, dec = statistics.median(prefill_s), statistics.median(decode_s)
    return {
        "path": portable_path(args.path),
        "layout": args.layout,
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "params": params,
        "stored_params": stored_params,
        "weight_mb": weight_bytes / 2**20,
        "kv_cache_mb": cache_b / 2**20,
        "load_s": load_s,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
        "prefill_s": pre,
        "prefill_tok_s": b * n / pre,
        "decode_s": dec,
        "decode_tok_s": b * args.new_tokens / dec,
        "prefill_runs_s": prefill_s,
        "decode_runs_s": decode_s,
    }


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _label(path: str, layout: str) -> str:
    p = Path(path)
    name = (f"{p.parent.name}/{p.name}" if p.name == "hf_model" else p.name) or path
    return name if layout == "padded" else f"{name} [{layout}]"


def _measure(path: str, layout: str, ids_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tyr-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            path,
            "--layout",
            layout,
            "--ids",
            str(ids_file),
            "--out",
            str(out),
            "--threads",
            str(args.threads),
            "--dtype",
            args.dtype,
            "--new-tokens",
            str(args.new_tokens),
            "--repeats",
            str(args.repeats),
        ]
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            OMP_NUM_THREADS=str(args.threads),
            HF_MODULES_CACHE=str(Path(tmp) / "modules"),
        )
        log.info("measuring %s (%s layout)", path, layout)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of {path} ({layout}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def markdown_table(rows: list[dict[str, Any]], ref: dict[str, Any]) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    head = (
        "| model | params (M) | weights (MB) | KV cache (MB) | peak RSS (MB) | prefill tok/s | vs dense "
        "| decode tok/s | vs dense |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['params'] / 1e6:.2f} ({ratio(r['params'], ref['params'])}) | {r['weight_mb']:.1f} "
            f"| {r['kv_cache_mb']:.2f} | {r['peak_rss_mb']:.0f} | {r['prefill_tok_s']:.1f} "
            f"| {ratio(r['prefill_tok_s'], ref['prefill_tok_s'])} | {r['decode_tok_s']:.2f} "
            f"| {ratio(r['decode_tok_s'], ref['decode_tok_s'])} |"
        )
    return "\n".join(lines)


def run_driver(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoConfig

    paths = ([args.dense] if args.dense else []) + list(args.pruned)
    if not paths:
        raise SystemExit("give --dense and/or --pruned folders")
    vocab = min(AutoConfig.from_pretrained(p, trust_remote_code=True).vocab_size for p in paths)
    if args.text_file:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(paths[0], trust_remote_code=True)
        text_ids = tok(Path(args.text_file).read_text(), return_tensors="pt").input_ids[0]
        reps = -(-args.batch * args.prompt_len // max(1, len(text_ids)))
        ids = text_ids.repeat(reps)[: args.batch * args.prompt_len].view(args.batch, args.prompt_len)
    else:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(min(100, vocab - 1), vocab, (args.batch, args.prompt_len), generator=g)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tyr-bench-ids-") as tmp:
        from safetensors.torch import save_file

        ids_file = Path(tmp) / "ids.safetensors"
        save_file({"ids": ids.contiguous()}, str(ids_file))
        jobs = [
            (path, layout, bool(args.dense) and i == 0)
            for i, path in enumerate(paths)
            for layout in (["padded"] if bool(args.dense) and i == 0 else args.layouts)
        ]
        # Round robin: every round measures every model once (fresh process each), so slow drifts of
        # this shared machine hit all models alike; a model's figure is the median over rounds.
        runs: list[list[dict[str, Any]]] = [[] for _ in jobs]
        for rnd in range(args.rounds):
            for j, (path, layout, _is_dense) in enumerate(jobs):
                r = _measure(path, layout, ids_file, args)
                runs[j].append(r)
                log.info(
                    "round %d, %s (%s): prefill %.1f tok/s, decode %.2f tok/s, peak RSS %.0f MB",
                    rnd,
                    path,
                    layout,
                    r["prefill_tok_s"],
                    r["decode_tok_s"],
                    r["peak_rss_mb"],
                )
        for (path, layout, is_dense), rs in zip(jobs, runs):
            r = dict(rs[0])
            for key in ("prefill_s", "decode_s"):
                r[key] = statistics.median(x[key] for x in rs)
            r["prefill_tok_s"] = ids.numel() / r["prefill_s"]
            r["decode_tok_s"] = args.batch * args.new_tokens / r["decode_s"]
            r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
            r["rounds"] = [{k: x[k] for k in ("prefill_tok_s", "decode_tok_s")} for x in rs]
            r["label"] = ("dense: " if is_dense else "") + _label(path, layout)
            rows.append(r)
    print(
        f"\nCPU, {args.threads} thread(s), dtype {rows[0]['dtype']}, batch {args.batch} x {args.prompt_len} prompt "
        f"tokens, {args.new_tokens} decode steps, median of {args.rounds} rounds x {args.repeats} repeats\n"
    )
    print(markdown_table(rows, rows[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": _portable_args(args), "rows": rows}, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", help="dense model folder (the reference for ratios)")
    p.add_argument("--pruned", nargs="*", default=[], help="exported (tyr_llama) folders")
    p.add_argument(
        "--layouts",
        nargs="+",
        default=["padded"],
        choices=["padded", "index"],
        help="layouts to measure for each exported folder (index = index-map, no zero padding heads)",
    )
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (median)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per model, round robin (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--text-file", help="tokenize this text (dense tokenizer) for the prompts instead of random ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write all measurements to this JSON file")
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="padded", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.worker:
        args.path = args.worker
        Path(args.out).write_text(json.dumps(run_worker(args)))
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
