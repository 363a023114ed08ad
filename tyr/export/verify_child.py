"""The fresh process of :func:`tyr.export.verify.verify_export`:
``python -m tyr.export.verify_child <args.json>``.

It loads an exported folder as a user would (``AutoModelForCausalLM``, ``trust_remote_code=True``,
offline) with tyr made unimportable, and writes what the parent compares: the full-forward logits,
the logits computed token by token through the KV cache, and greedy generations with and without the
cache (``result.safetensors``), plus the loaded classes, the config's per-layer widths and whether
any tyr module was imported (``result.json``).

Starting this module executes only ``tyr/__init__.py`` and ``tyr/export/__init__.py``, which import
nothing (the package's names are loaded lazily); both are dropped before torch or transformers is
imported, so the folder's own code is the only model code that runs.
"""

from __future__ import annotations

import inspect
import json
import sys
import time


def _forbid_tyr() -> None:
    for name in [m for m in sys.modules if m == "tyr" or m.startswith("tyr.")]:
        del sys.modules[name]
    sys.modules["tyr"] = None  # an exported folder must load without tyr


def main(args_file: str) -> None:
    _forbid_tyr()
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    args = json.loads(open(args_file).read())
    torch.set_num_threads(args["threads"])
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args["path"], trust_remote_code=True, dtype=getattr(torch, args["dtype"]))
    model.eval()
    load_s = time.time() - t0
    ids = load_file(args["input_ids"])["input_ids"]
    n_new, split = args["max_new_tokens"], args["split"]
    gen = dict(
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        num_beams=1,
        pad_token_id=args["pad_token_id"],
        attention_mask=torch.ones_like(ids),
    )
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
        # Prefill then one token at a time through the KV cache, no position ids given.
        # The cache keyword is `past_key_values` up to transformers 5.23 and `cache` from 5.24.
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(ids[:, :split], use_cache=True)
        pkv, steps = out[kw], [out.logits.float()]
        for t in range(split, ids.shape[1]):
            o = model(ids[:, t : t + 1], use_cache=True, **{kw: pkv})
            steps.append(o.logits.float())
        stepwise = torch.cat(steps, dim=1)
        with_cache = model.generate(ids, use_cache=True, **gen)
        without_cache = model.generate(ids, use_cache=False, **gen)
    c = model.config
    save_file(
        {
            "logits": logits.contiguous(),
            "stepwise": stepwise.contiguous(),
            "with_cache": with_cache.contiguous(),
            "without_cache": without_cache.contiguous(),
        },
        args["out_tensors"],
    )
    with open(args["out_json"], "w") as f:
        json.dump(
            {
                "load_seconds": load_s,
                "model_class": type(model).__name__,
                "config_class": type(c).__name__,
                "module": type(model).__module__,
                "widths": {k: getattr(c, k, None) for k in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size")},
                "tyr_imported": any(m == "tyr" or m.startswith("tyr.") for m in sys.modules if sys.modules[m] is not None),
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
