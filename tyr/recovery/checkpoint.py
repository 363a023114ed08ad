"""Training checkpoints: safetensors + JSON with a sha256 manifest, written atomically.

``<dir>/step-000050/`` holds ``trainable.safetensors`` (the trained weights or adapters),
``optimizer.safetensors`` (AdamW's per-parameter state), ``rng.safetensors`` (torch's generator
states) and ``state.json`` (step, data position, optimiser hyper-parameters, settings key), and
``manifest.json`` with every file's sha256. A checkpoint is written into a temporary folder and
renamed into place, so a kill -9 leaves either a whole checkpoint or none; :func:`latest` returns
the newest one whose manifest checks out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tyr.utils import read_json, write_json

log = logging.getLogger(__name__)

SCHEMA = 1
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _set_rng_state(t: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(t["torch_cpu"])
    cuda = [t[k] for k in sorted(t) if k.startswith("torch_cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save(
    root: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, state: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` and remove all but the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / FILES[0]))
    sd = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(params.values())}
    order = [index[id(p)] for g in optimizer.param_groups for p in g["params"]]  # optimizer index -> our index
    names = list(params)
    opt = {
        f"{names[order[i]]}::{k}": v.detach().cpu().contiguous()
        for i, st in sd["state"].items()
        for k, v in st.items()
        if torch.is_tensor(v)
    }
    save_file(opt, str(tmp / FILES[1]))
    save_file(_rng_state(), str(tmp / FILES[2]))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    write_json(tmp / FILES[3], {"schema": SCHEMA, "step": step, "param_groups": groups, **state})
    write_json(tmp / "manifest.json", {"schema": SCHEMA, "sha256": {f: _sha256(tmp / f) for f in FILES}})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def valid(ckpt: Path) -> bool:
    """Every file present and matching the manifest's sha256."""
    try:
        m = read_json(ckpt / "manifest.json")
        return m.get("schema") == SCHEMA and all(_sha256(ckpt / f) == m["sha256"][f] for f in FILES)
    except (OSError, ValueError, KeyError):
        return False


def latest(root: Path) -> Path | None:
    """The newest valid checkpoint under ``root`` (damaged ones are skipped with a warning)."""
    for ckpt in sorted(root.glob("step-*"), reverse=True):
        if valid(ckpt):
            return ckpt
        log.warning("checkpoint %s is incomplete or damaged; skipped", ckpt)
    return None


def load(ckpt: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimiser state and RNG from ``ckpt``; returns its state.json."""
    state = read_json(ckpt / "state.json")
    weights = load_file(str(ckpt / FILES[0]))
    if set(weights) != set(params):
        raise ValueError(f"checkpoint {ckpt} holds other parameters than the model trains")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    opt = load_file(str(ckpt / FILES[1]))
    names = list(params)
    index = {id(p): i for i, p in enumerate(params.values())}
    order = [index[id(p)] for g in optimizer.param_groups for p in g["params"]]
    per: dict[int, dict] = {}
    for key, t in opt.items():
        name, field = key.split("::")
        per.setdefault(order.index(names.index(name)), {})[field] = t
    sd = optimizer.state_dict()
    groups = [{**g, **saved} for g, saved in zip(sd["param_groups"], state["param_groups"])]
    for g in groups:  # JSON turned tuples into lists
        g.update({k: tuple(v) for k, v in g.items() if isinstance(v, list) and k != "params"})
    optimizer.load_state_dict({"state": per, "param_groups": groups})
    _set_rng_state(load_file(str(ckpt / FILES[2])))
    return state


def describe(ckpt: Path) -> str:
    return json.dumps({k: v for k, v in read_json(ckpt / "state.json").items() if k in ("step", "tokens")})
