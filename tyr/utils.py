"""Small shared helpers: atomic JSON writes, JSONL metrics, run set-up."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def data_dir() -> Path:
    """The repo's ``data/`` folder (override with ``$TYR_DATA``)."""
    env = os.environ.get("TYR_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def portable_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as a result records it, meaningful on another machine: relative to ``root`` (default: the
    working directory, where ``runs/`` lives) when under it, ``$TYR_CACHE/...`` under tyr's cache, else
    the last two components. Never this machine's absolute path."""
    p = Path(path).expanduser().absolute()
    cache = Path(os.environ.get("TYR_CACHE") or Path.home() / ".cache" / "tyr").expanduser().absolute()
    for base, prefix in ((Path(root or Path.cwd()).absolute(), ""), (cache, "$TYR_CACHE/")):
        try:
            return prefix + p.relative_to(base).as_posix()
        except ValueError:
            continue
    return "/".join(p.parts[-2:])


class JsonlWriter:
    """Append-only metrics log: one JSON object per line, flushed at once, with a wall-clock stamp.
    ``fresh=True`` empties an existing log first: for stages that restart from scratch rather than
    resume, so a rerun after an interruption does not leave the dead attempt's records in front."""

    def __init__(self, path: str | Path, fresh: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_default) + "\n")


def proc_status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in MB; None where Linux has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB): ``VmHWM`` of its own memory map where Linux has
    it. ``getrusage``'s ``ru_maxrss`` survives ``execve``, so in a process started by a large parent
    (pytest, the torchrun agent, a benchmark driver) it reports at least the parent's peak."""
    import resource

    hwm = proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup_run(seed: int = 0, threads: int = 0) -> None:
    """Seed every RNG and set torch's thread count (0 keeps torch's default)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads and threads > 0:
        torch.set_num_threads(int(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress over ``total`` steps: a tqdm bar in a terminal; otherwise (logs, CI) a log line
    ``desc i/total, elapsed, ETA`` at most every ``every`` seconds and at the last step."""

    def __init__(self, total: int, desc: str, initial: int = 0, every: float = 30.0, enabled: bool = True):
        import sys

        from tqdm.auto import tqdm

        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False) if self.tty else None
        self.t0 = self.last = time.time()
        self.start_n = initial

    def eta(self) -> float | None:
        done = self.n - self.start_n
        return (time.time() - self.t0) / done * (self.total - self.n) if done > 0 else None

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
            return
        now = time.time()
        if self.enabled and (now - self.last >= self.every or self.n >= self.total):
            self.last = now
            eta = self.eta()
            log.info(
                "%s %d/%d, %s elapsed, ETA %s%s",
                self.desc,
                self.n,
                self.total,
                format_seconds(now - self.t0),
                "?" if eta is None else format_seconds(eta),
                f" ({note})" if note else "",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def track(iterable, desc: str, total: int | None = None, enabled: bool = True, every: float = 30.0):
    """``for x in track(items, "desc")``: :class:`Progress` around a loop (tqdm or log lines)."""
    items = list(iterable) if total is None else iterable
    bar = Progress(len(items) if total is None else total, desc, every=every, enabled=enabled)
    try:
        for x in items:
            yield x
            bar.update()
    finally:
        bar.close()
