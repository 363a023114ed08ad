"""Artifacts keyed by the settings that made them, and verified files.

A stage of a run writes artifacts; they may be reused only for exactly the settings and inputs that
made them. :func:`settings_key` hashes a settings dict (canonical JSON); a :class:`StageRecord` keeps
the settings next to the key so a mismatch can be *named* (:func:`diff`: ``search.generations: 12 ->
6``) instead of showing two hashes.

Caches (activation checkpoints, the teacher cache, Taylor statistics, recovery checkpoints) are
safetensors files written with :func:`write_verified`: the sha256 of the tensors (names, dtypes,
shapes, bytes) and the settings key are recorded in the file's own header, written atomically with
it, so no second file can fall out of step. :func:`read_verified` recomputes the checksum and raises
:class:`CorruptArtifactError` naming the file; callers rebuild a corrupt cache.

:func:`weights_digest` identifies a checkpoint folder by its content (size and sha256 of every
weight file), cached by (path, mtime, size) so that repeated runs do not re-read the weights.
:func:`fault_point` is the fault-injection hook of the test suite (``TYR_FAULT=name:n`` kills the
process with SIGKILL the n-th time ``name`` is reached).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_SCHEMA = 1


class CorruptArtifactError(RuntimeError):
    """A file whose content does not match its recorded checksum, or that cannot be parsed."""

    def __init__(self, msg: str, path: str | Path | None = None):
        super().__init__(msg)
        self.path = None if path is None else Path(path)


class SettingsError(ValueError):
    """A setting the run cannot work with (reported in one line, exit 2)."""


class StaleArtifactError(ValueError):
    """An artifact made with other settings than the ones asked for now (reported in one line)."""


# --- settings keys ----------------------------------------------------------------------------


def canonical(settings: Any) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def settings_key(settings: dict) -> str:
    """A short stable hash of a settings dict (key order does not matter)."""
    return hashlib.sha256(canonical(settings).encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def diff(old: dict, new: dict) -> list[str]:
    """The settings that differ, as ``"path: old -> new"`` lines (dotted paths, sorted)."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if canonical(va if va is not missing else None) != canonical(vb if vb is not missing else None) or (va is missing) != (
            vb is missing
        ):
            fmt = lambda v: "(unset)" if v is missing else canonical(v)  # noqa: E731
            out.append(f"{k}: {fmt(va)} -> {fmt(vb)}")
    return out


def describe_diff(old: dict, new: dict, limit: int = 3) -> str:
    """The first few differing settings in one line."""
    d = diff(old, new)
    more = f" (and {len(d) - limit} more)" if len(d) > limit else ""
    return "; ".join(d[:limit]) + more if d else "no setting differs"


@dataclass
class StageRecord:
    """What made a stage's artifacts: its name, the settings (inputs included, e.g. the upstream
    stages' keys) and their key. Stored as JSON in the run directory (``stages/<name>.json``)."""

    stage: str
    settings: dict

    @property
    def key(self) -> str:
        return settings_key(self.settings)

    def to_json(self) -> dict:
        return {"schema": RECORD_SCHEMA, "stage": self.stage, "key": self.key, "settings": self.settings}

    @classmethod
    def read(cls, path: str | Path) -> StageRecord | None:
        path = Path(path)
        if not path.exists():
            return None
        d = read_json_checked(path)
        return cls(d["stage"], d["settings"])

    def write(self, path: str | Path) -> None:
        from tyr.utils import write_json

        write_json(path, self.to_json())

    def mismatch(self, other: StageRecord) -> str | None:
        """None if ``other`` was made with the same settings, else the differing settings in one line."""
        return None if other.key == self.key else describe_diff(other.settings, self.settings)


def read_json_checked(path: str | Path) -> Any:
    """JSON from ``path``; an unreadable file raises :class:`CorruptArtifactError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptArtifactError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})", path) from None


# --- verified safetensors ---------------------------------------------------------------------


def tensors_sha256(tensors: dict) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            u = t.reshape(-1).view(torch.uint8)
            for i in range(0, u.numel(), 1 << 26):  # in 64 MB pieces: memory-mapped activations stay on disk
                h.update(u[i : i + (1 << 26)].numpy())
    return h.hexdigest()


def write_verified(path: str | Path, tensors: dict, key: str | None = None, metadata: dict | None = None) -> None:
    """Write ``tensors`` to a safetensors file atomically, with their sha256 (and the settings
    ``key`` that made them) recorded in the header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"tyr_verified": canonical({"sha256": tensors_sha256(tensors), "key": key, **(metadata or {})})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    fault_point("write_verified")
    os.replace(tmp, path)


def read_verified(path: str | Path, key: str | None = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a file written by :func:`write_verified`. Raises
    :class:`CorruptArtifactError` if it cannot be read or its checksum does not match, and
    :class:`StaleArtifactError` if ``key`` is given and differs from the recorded one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["tyr_verified"])
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated / garbled header, a missing record: all corrupt
        raise CorruptArtifactError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]})", path) from None
    digest = tensors_sha256(tensors)
    if digest != meta.get("sha256"):
        raise CorruptArtifactError(f"{path} is corrupt (sha256 {digest[:12]}… != recorded {str(meta.get('sha256'))[:12]}…)", path)
    if key is not None and meta.get("key") != key:
        raise StaleArtifactError(f"{path} was made with other settings (key {meta.get('key')} != {key})")
    return tensors, meta


def load_cache(path: str | Path, key: str | None = None, log=None) -> dict | None:
    """The tensors of a verified cache file, or None if it is missing, corrupt or stale (logged):
    the caller rebuilds it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read_verified(path, key)[0]
    except (CorruptArtifactError, StaleArtifactError) as e:
        if log is not None:
            log.warning("%s; rebuilding it", e)
        return None


# --- content of a checkpoint folder -----------------------------------------------------------

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted({p for pat in WEIGHT_PATTERNS for p in folder.glob(pat) if p.is_file()})


def weights_digest(folder: str | Path, cache_file: str | Path | None = None) -> str:
    """``"sha256:<16 hex>"`` of a checkpoint folder's weights: the name, size and sha256 of every
    weight file. Per-file hashes are cached in ``cache_file`` by (resolved path, mtime, size)."""
    cache: dict = {}
    if cache_file is not None and Path(cache_file).exists():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except (json.JSONDecodeError, OSError):
            cache = {}
    parts, changed = [], False
    for p in weight_files(folder):
        st = p.stat()
        ident = f"{p.resolve()}|{st.st_mtime_ns}|{st.st_size}"
        if ident not in cache:
            cache[ident] = file_sha256(p)
            changed = True
        parts.append(f"{p.name}|{st.st_size}|{cache[ident]}")
    if changed and cache_file is not None:
        from tyr.utils import write_json

        write_json(cache_file, cache)
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- fault injection (tests) --------------------------------------------------------------------

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """With ``TYR_FAULT=name:n`` in the environment, the n-th arrival here kills the process (SIGKILL,
    as ``kill -9`` would): the fault-injection tests use it to stop a run at an exact point."""
    spec = os.environ.get("TYR_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] >= int(n or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
