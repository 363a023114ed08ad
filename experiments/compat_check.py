"""One row of the transformers compatibility table (run by experiments/compat.sh in a throwaway venv).

``python experiments/compat_check.py --out row.json [--foreign FOLDER] [--keep FOLDER]``:

1. round trip in this environment: tiny-llama pruned with uneven GQA groups, an attention-less
   layer and bias compensation (the export tests' plan), exported with this transformers, checked in a
   fresh process by :func:`tyr.export.verify_export` (logits vs the in-memory model, stepwise KV-cache
   logits vs the full forward, greedy generation with and without the cache), in both layouts;
2. ``lm_eval`` (the CLI, a fresh process) on the exported folder with a local task;
3. ``--foreign FOLDER``: a folder exported under *another* transformers (the locked one) is loaded
   here and its logits compared with the reference logits stored beside it, and its cached and
   uncached generations compared — what a user meets who loads last month's folder today.
``--keep FOLDER`` writes this run's padded folder (with ``compat_reference.safetensors``) there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REF = "compat_reference.safetensors"
# layer: (kept query heads, kept MLP channels, bias compensation)
PLAN = [([0, 1, 2], range(0, 128, 2), False), ([3], range(100), True), ([0, 1, 2, 3], [], False), ([], range(7), True)]


def pruned_tiny():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tyr.modeling.adapter import get_adapter
    from tyr.modeling.slicing import slice_attention, slice_mlp
    from tyr.models import load_model

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("evaluate", ["model=tiny-llama"])
    loaded = load_model(cfg.model.name, instantiate(cfg.model.source), cfg.model.dtype)
    model = copy.deepcopy(loaded.model)
    a, g = get_adapter(model), torch.Generator().manual_seed(1)
    for i, (heads, channels, bias) in enumerate(PLAN):
        layer = a.layers(model)[i]
        o_bias = 0.05 * torch.randn(64, generator=g) if bias else None
        d_bias = 0.05 * torch.randn(64, generator=g) if bias else None
        slice_attention(a, layer, heads, o_bias=o_bias)
        slice_mlp(a, layer, list(channels), down_bias=d_bias)
    return model, loaded.tokenizer


def round_trip(row: dict, work: Path, keep: Path | None) -> None:
    from tyr.export import export_model, verify_export

    model, tok = pruned_tiny()
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    for layout in ("padded", "index"):
        out = export_model(model, tok, work / layout, layout=layout)
        rep = verify_export(out, model, ids, atol=1e-4, cache_atol=1e-4)
        row[f"{layout}_logit_diff"] = rep["max_abs_logit_diff"]
        row[f"{layout}_cache_diff"] = rep["max_abs_cache_logit_diff"]
        row[f"{layout}_generate_cache_equal"] = rep["generate_cache_equals_no_cache"]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
    save_file({"input_ids": ids, "logits": ref}, str(work / "padded" / REF))
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(work / "padded", keep)
    row["round_trip"] = True


def lm_eval_cli(row: dict, work: Path) -> None:
    tasks = work / "tasks"
    subprocess.run([sys.executable, "-m", "tyr.tasks", str(tasks)], check=True, capture_output=True, text=True)
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [
            str(lm_eval),
            "--model",
            "hf",
            "--include_path",
            str(tasks),
            "--tasks",
            "tyr_piqa",
            "--limit",
            "20",
            "--model_args",
            f"pretrained={work / 'padded'},trust_remote_code=True",
            "--device",
            "cpu",
            "--output_path",
            str(work / "lm_eval"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    results = list((work / "lm_eval").rglob("results_*.json"))
    acc = json.loads(results[0].read_text())["results"]["tyr_piqa"]["acc,none"]
    row["lm_eval_acc_20"] = acc
    row["lm_eval"] = True


def foreign(row: dict, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = load_file(str(folder / REF))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = ref["input_ids"]
    with torch.no_grad():
        diff = float((model(ids, use_cache=False).logits.float() - ref["logits"]).abs().max())
        gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        same = torch.equal(model.generate(ids, use_cache=True, **gen), model.generate(ids, use_cache=False, **gen))
    cfg = json.loads((folder / "config.json").read_text())
    row["foreign_exported_with"] = cfg.get("tyr_exported_with_transformers") or cfg.get("transformers_version")
    row["foreign_logit_diff"] = diff
    row["foreign_generate_cache_equal"] = same
    row["foreign"] = diff <= 1e-4 and same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--foreign", default=None, help="a folder exported under another transformers, to load here")
    ap.add_argument("--keep", default=None, help="copy this run's exported folder here")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TYR_THREADS", "1")))
    row: dict = {"transformers": transformers.__version__, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="tyr-compat-") as tmp:
        steps = [
            ("round_trip", lambda: round_trip(row, Path(tmp), Path(args.keep) if args.keep else None)),
            ("lm_eval", lambda: lm_eval_cli(row, Path(tmp))),
        ]
        if args.foreign:
            steps.append(("foreign", lambda: foreign(row, Path(args.foreign))))
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - a row records what failed, and how
                row[name] = False
                # the temporary directory's name is this run's, not a result: recorded as <tmp>
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}".replace(tmp, "<tmp>").splitlines()[0][:300]
                traceback.print_exc()
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))
    return 0 if all(row.get(n) for n, _ in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
