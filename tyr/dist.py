"""The only module that talks to ``torch.distributed``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_from_env` starts a process
group (gloo for CPU, nccl for CUDA devices); everything else asks :func:`rank`, :func:`world`,
:func:`is_main` and calls the collectives below, which are no-ops in a single process. A single
process never initialises (nor needs) ``torch.distributed``.

Work is split by :func:`shard`: rank r takes the contiguous block r of ``n`` items (calibration
sequences, fitness tokens, per-level solves), so every item is handled exactly once and the results
can be gathered back in order.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(hours=12)  # how long a rank waits at a collective for the others


def _dist():
    import torch.distributed as d

    return d if d.is_available() and d.is_initialized() else None


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...). Returns True when running distributed. Idempotent."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as d

    if d.is_initialized():
        return True
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # rank 0 alone evaluates (a 70B model's "before" evaluation takes hours) while the others wait at
    # their next collective: the default 30-minute timeout would end them
    d.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    log.info("distributed: rank %d of %d (%s)", d.get_rank(), d.get_world_size(), backend)
    return True


def local_device(device: str | torch.device) -> torch.device:
    """``cuda`` under torchrun means this process's GPU (``LOCAL_RANK``); anything else is kept."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def shutdown() -> None:
    d = _dist()
    if d is not None:
        d.destroy_process_group()


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def world() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def _comm_device() -> torch.device:
    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (every rank gets the same result); returns ``t``."""
    d = _dist()
    if d is None:
        return t
    dev = _comm_device()
    if t.device == dev:
        d.all_reduce(t)
    else:
        tmp = t.to(dev)
        d.all_reduce(tmp)
        t.copy_(tmp)
    return t


def all_reduce_sum(x: float) -> float:
    """Sum a Python number over all ranks (float64)."""
    if _dist() is None:
        return x
    return float(all_reduce_(torch.tensor([x], dtype=torch.float64))[0])


def shard(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank ``r``'s contiguous block of ``range(n)`` (sizes differ by at most one)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (in rank order) on every rank. Objects travel through
    ``torch.distributed``'s own serialisation (in memory, never written to disk)."""
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out
