"""Verification of an exported folder in a fresh process (:mod:`tyr.export.verify_child`): reloaded
logits against the in-memory model, the KV-cache path against the full forward, cached against
uncached greedy generation, the config's per-layer widths, and no tyr import. Tensors cross the
process boundary as safetensors, the rest as JSON."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tyr.export.config import ExportVerificationError, pruned_config
from tyr.export.folder import ALLOCATION_FILE

log = logging.getLogger(__name__)

_TYR_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this tyr package


def verify_export(
    out_dir: str | os.PathLike,
    reference_model: nn.Module,
    input_ids: torch.Tensor,
    atol: float = 1e-4,
    max_new_tokens: int = 8,
    cache_atol: float | None = None,
    strict_generation: bool | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """Load ``out_dir`` in a fresh process (offline, ``trust_remote_code=True``) and check it.

    Checks: max |Δ logits| against ``reference_model`` on ``input_ids`` <= ``atol``; logits computed
    token by token through the KV cache match the full forward (<= ``cache_atol``, default
    ``max(10 * atol, 1e-3 * max|logits|)`` in float32, where Gemma-3's large hidden states make rounding
    visible, ``0.05 * max|logits|`` in 16-bit dtypes, where rounding alone reaches a few percent);
    greedy ``generate`` with ``use_cache=True`` equals ``use_cache=False`` for ``max_new_tokens`` tokens;
    the per-layer widths in the config match the reference.
    Returns the numbers; raises :class:`ExportVerificationError` listing what failed. A generation
    mismatch only warns when ``strict_generation`` is False (default: strict in float32 only, since
    16-bit rounding can flip a near-tie between cached and uncached greedy decoding).
    """
    out_dir = Path(out_dir).resolve()
    input_ids = input_ids.detach().cpu().long()
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] < 2:
        raise ValueError("input_ids needs at least 2 tokens")
    dtype = next(reference_model.parameters()).dtype
    cfg = reference_model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0)
    with torch.no_grad():
        ref_logits = reference_model(input_ids, use_cache=False).logits.float()
        ref_gen = reference_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=False,
            pad_token_id=pad,
        )
    layout = "padded"
    if (out_dir / ALLOCATION_FILE).exists():
        layout = json.loads((out_dir / ALLOCATION_FILE).read_text()).get("layout", "padded")
    expected = pruned_config(reference_model, layout)
    if cache_atol is None:  # cached vs full forward differ by rounding, relative to the logits' scale
        scale = float(ref_logits.abs().max())
        # float32: 1e-3 of the logits' scale. Gemma-3's hidden states reach 1e5 while its logits stay below
        # ~50, so summation order alone moved a pruned Gemma-3-270M's logits by 6.6e-3 (max 37; in float64
        # the two paths agree to 1e-14); a wrong position or mask moves them by a good fraction of the scale.
        cache_atol = max(10 * atol, 1e-3 * scale) if dtype == torch.float32 else 0.05 * scale
    with tempfile.TemporaryDirectory(prefix="tyr-verify-") as tmp:
        tmp = Path(tmp)
        save_file({"input_ids": input_ids.contiguous()}, str(tmp / "ids.safetensors"))
        args = {
            "path": str(out_dir),
            "dtype": str(dtype).removeprefix("torch."),
            "input_ids": str(tmp / "ids.safetensors"),
            "out_tensors": str(tmp / "result.safetensors"),
            "out_json": str(tmp / "result.json"),
            "max_new_tokens": max_new_tokens,
            "split": max(1, input_ids.shape[1] // 2),
            "threads": torch.get_num_threads(),
            "pad_token_id": pad,
        }
        (tmp / "args.json").write_text(json.dumps(args))
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_MODULES_CACHE=str(tmp / "modules"),
            OMP_NUM_THREADS=str(torch.get_num_threads()),
            PYTHONPATH=_TYR_ROOT,
        )  # this tyr's child module; it makes tyr unimportable before loading
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "tyr.export.verify_child", str(tmp / "args.json")],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise ExportVerificationError(
                f"loading {out_dir} in a fresh process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        res = {**load_file(str(tmp / "result.safetensors")), **json.loads((tmp / "result.json").read_text())}
    report = {
        "max_abs_logit_diff": float((res["logits"] - ref_logits).abs().max()),
        "max_abs_cache_logit_diff": float((res["stepwise"] - res["logits"]).abs().max()),
        "generate_cache_equals_no_cache": bool(torch.equal(res["with_cache"], res["without_cache"])),
        "matches_reference_generation": bool(torch.equal(res["without_cache"], ref_gen)),
        "generated_tokens": int(res["with_cache"].shape[1] - input_ids.shape[1]),
        "config_widths_match": res["widths"]
        == {
            "layer_num_heads": expected.layer_num_heads,
            "layer_num_kv_heads": expected.layer_num_kv_heads,
            "layer_intermediate_size": expected.layer_intermediate_size,
        },
        "cache_atol": float(cache_atol),
        "tyr_imported": bool(res["tyr_imported"]),
        "model_class": res["model_class"],
        "config_class": res["config_class"],
        "load_seconds": float(res["load_seconds"]),
        "subprocess_seconds": time.time() - t0,
    }
    problems = []
    if not report["max_abs_logit_diff"] <= atol:
        problems.append(f"max |Δ logits| vs the in-memory model is {report['max_abs_logit_diff']:.3g} > atol {atol:g}")
    if not report["max_abs_cache_logit_diff"] <= report["cache_atol"]:
        problems.append(
            f"logits through the KV cache differ from the full forward by {report['max_abs_cache_logit_diff']:.3g} "
            f"> {cache_atol:g}"
        )
    if strict_generation is None:
        strict_generation = dtype == torch.float32
    if not report["generate_cache_equals_no_cache"]:
        msg = "greedy generate with use_cache=True differs from use_cache=False"
        if strict_generation:
            problems.append(msg)
        else:
            log.warning("%s (%s; not treated as a failure in %s)", msg, out_dir, dtype)
    if not report["config_widths_match"]:
        problems.append(f"per-layer widths in the exported config {res['widths']} do not match the model")
    if report["tyr_imported"]:
        problems.append("the exported folder imported tyr")
    if problems:
        raise ExportVerificationError(f"export {out_dir} failed verification: " + "; ".join(problems) + f" ({report})")
    log.info(
        "verified %s: max|Δ logits| %.2e, cache %.2e, generation ok",
        out_dir,
        report["max_abs_logit_diff"],
        report["max_abs_cache_logit_diff"],
    )
    return report
