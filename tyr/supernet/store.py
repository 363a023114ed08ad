"""On-disk supernet: one safetensors shard per layer plus a versioned JSON manifest.

A shard holds every variant of its layer compactly: per module and level the kept unit indices
(int32), the kept output-projection columns (refit, model dtype) and an optional bias. Other
projections are row slices of the dense weights, so they are not stored. The manifest records the
schema version, model id / revision / dtype, the grid and its parameter counts, the EEA mode, a hash
of everything that determines the shards, per-shard sha256, per-variant error estimates and which
layers are complete. :class:`SupernetStore` is the only code that reads or writes these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tyr import dist
from tyr.artifacts import CorruptArtifactError, describe_diff, fault_point, load_cache, read_json_checked, write_verified
from tyr.artifacts import file_sha256 as sha256_file
from tyr.supernet.grid import KINDS, SupernetGrid
from tyr.utils import write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CHECKPOINT = "activations.safetensors"


class SupernetError(RuntimeError):
    """A supernet on disk that cannot be used: corrupt, from another model or another config."""


def read_manifest(path: Path) -> dict:
    try:
        return read_json_checked(path)
    except CorruptArtifactError as e:
        raise SupernetError(f"{e}; delete {path.parent} to rebuild it (in a pipeline run: redo=search)") from None


def config_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StoredVariant:
    keep: list[int]
    weight: torch.Tensor  # kept output-projection columns [out, kept*unit_width]
    bias: torch.Tensor | None
    error: float


class SupernetStore:
    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self._verified: set[int] = set()
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    # --- creation / opening ------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, root: str | Path, *, model: dict, grid: SupernetGrid, eea: str, config: dict) -> SupernetStore:
        """Open the supernet at ``root`` for building: new, or resumed if it was built by the same
        model and config (anything else is refused, naming the manifest). When distributed, rank 0
        creates it and the other ranks open it after a barrier."""
        if dist.world() > 1:
            store = cls._create_or_resume(root, model=model, grid=grid, eea=eea, config=config) if dist.is_main() else None
            dist.barrier()
            return store or cls._create_or_resume(root, model=model, grid=grid, eea=eea, config=config)
        return cls._create_or_resume(root, model=model, grid=grid, eea=eea, config=config)

    @classmethod
    def _create_or_resume(cls, root: str | Path, *, model: dict, grid: SupernetGrid, eea: str, config: dict) -> SupernetStore:
        root = Path(root)
        path = root / MANIFEST
        header = {"model": model, "eea": eea, "grid": grid.to_json(), "config": config}
        h = config_hash(header)
        if path.exists():
            m = read_manifest(path)
            if not m.get("layers") and not any(root.glob("activations*.safetensors")):
                m = None  # nothing was built yet (e.g. a build that failed before its first layer): start afresh
        if path.exists() and m is not None:
            cls._check_compatible(path, m, model, h, header)
            store = cls(root, m)
            for l in store.completed_layers():
                store.verify_layer(l)
            return store
        root.mkdir(parents=True, exist_ok=True)
        costs = grid.costs()
        m = {
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **header,
            "config_hash": h,
            "params": {
                "nominal_costs": costs,
                "dense_prunable": grid.dense_params(),
                "centre": grid.allocation_params(grid.centre_levels()),
            },
            "layers": {},
            "complete": False,
        }
        store = cls(root, m)
        store.save_manifest()
        return store

    @staticmethod
    def _check_compatible(path: Path, m: dict, model: dict, h: str, header: dict | None = None) -> None:
        if m.get("schema_version") != SCHEMA_VERSION:
            raise SupernetError(f"{path}: schema version {m.get('schema_version')} is not {SCHEMA_VERSION}")
        for key in ("name", "revision"):
            if m["model"].get(key) != model.get(key):
                raise SupernetError(
                    f"{path}: built for model {m['model'].get('name')} @ {m['model'].get('revision')}, "
                    f"not {model.get('name')} @ {model.get('revision')}; use another directory"
                )
        if m.get("config_hash") != h:
            old = {k: m.get(k) for k in ("model", "eea", "grid", "config")}
            what = describe_diff(old, header) if header is not None else f"hash {m.get('config_hash')} != {h}"
            raise SupernetError(
                f"{path}: built with another configuration ({what}); use another directory or delete it to rebuild"
            )

    @classmethod
    def open(cls, root: str | Path, expect_model: dict | None = None) -> SupernetStore:
        """Open a finished supernet for reading (assembly / search)."""
        path = Path(root) / MANIFEST
        if not path.exists():
            raise SupernetError(f"no supernet manifest at {path}")
        m = read_manifest(path)
        if m.get("schema_version") != SCHEMA_VERSION:
            raise SupernetError(f"{path}: schema version {m.get('schema_version')} is not {SCHEMA_VERSION}")
        if expect_model is not None and any(m["model"].get(k) != expect_model.get(k) for k in ("name", "revision")):
            raise SupernetError(
                f"{path}: built for model {m['model'].get('name')} @ {m['model'].get('revision')}, "
                f"not {expect_model.get('name')} @ {expect_model.get('revision')}"
            )
        if not m.get("complete"):
            raise SupernetError(f"{path}: the build is not complete ({len(m['layers'])} layers done); rerun the build")
        return cls(Path(root), m)

    # --- properties --------------------------------------------------------------------------
    @property
    def grid(self) -> SupernetGrid:
        return SupernetGrid.from_json(self.manifest["grid"])

    @property
    def num_layers(self) -> int:
        return len(self.manifest["grid"]["attn"])

    def completed_layers(self) -> list[int]:
        return sorted(int(k) for k in self.manifest["layers"])

    def errors(self) -> dict[str, list[list[float]]]:
        """Per-variant error estimates: kind -> layer -> level."""
        return {k: [self.manifest["layers"][str(l)]["errors"][k] for l in range(self.num_layers)] for k in KINDS}

    def shard_path(self, layer: int) -> Path:
        return self.root / f"layer_{layer:03d}.safetensors"

    # --- writing -----------------------------------------------------------------------------
    def write_layer(self, layer: int, variants: dict[str, list], dtype: torch.dtype, info: dict | None = None) -> None:
        """Store all variants of one layer (``variants[kind][level]`` with .keep, .out_weight,
        .out_bias, .rel_error), then record the shard in the manifest (shard first, so an
        interruption never leaves a manifest pointing at a missing or partial shard)."""
        tensors: dict[str, torch.Tensor] = {}
        errors: dict[str, list[float]] = {}
        for kind in KINDS:
            errors[kind] = []
            for lvl, v in enumerate(variants[kind]):
                tensors[f"{kind}.{lvl}.keep"] = torch.as_tensor(v.keep, dtype=torch.int32)
                tensors[f"{kind}.{lvl}.weight"] = v.out_weight.to("cpu", dtype).contiguous()
                if v.out_bias is not None:
                    tensors[f"{kind}.{lvl}.bias"] = v.out_bias.to("cpu", dtype).contiguous()
                errors[kind].append(float(v.rel_error))
        path = self.shard_path(layer)
        tmp = path.with_name(path.name + ".tmp")
        # One metadata key: safetensors writes its metadata map in random key order, and shards must
        # be byte-identical when rebuilt.
        meta = json.dumps({"layer": layer, "schema_version": SCHEMA_VERSION}, sort_keys=True)
        save_file(tensors, str(tmp), metadata={"tyr": meta})
        os.replace(tmp, path)
        self.manifest["layers"][str(layer)] = {
            "shard": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "errors": errors,
            "info": info or {},
        }
        self.save_manifest()
        self._verified.add(layer)

    def mark_complete(self, extra: dict | None = None) -> None:
        missing = [l for l in range(self.num_layers) if str(l) not in self.manifest["layers"]]
        if missing:
            raise SupernetError(f"cannot mark complete: layers {missing} missing")
        self.manifest["complete"] = True
        self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.manifest["disk_bytes"] = sum(v["bytes"] for v in self.manifest["layers"].values())
        if extra:
            self.manifest.update(extra)
        self.save_manifest()
        for ckpt in self.root.glob("activations*.safetensors"):
            ckpt.unlink()

    def save_manifest(self) -> None:
        """Write the manifest (rank 0 only when distributed: it is the one writer of artifacts)."""
        if dist.is_main():
            write_json(self.root / MANIFEST, self.manifest)

    def reload(self) -> None:
        """Re-read the manifest from disk (other ranks, after rank 0 wrote it)."""
        self.manifest = read_manifest(self.root / MANIFEST)

    # --- activation checkpoint (resume) ---------------------------------------------------------
    def checkpoint_path(self, part: int = 0, parts: int = 1) -> Path:
        """One file per rank when distributed (each rank holds its block of calibration sequences)."""
        return self.root / (CHECKPOINT if parts == 1 else f"activations.rank{part}of{parts}.safetensors")

    def save_checkpoint(self, next_layer: int, hidden: torch.Tensor, part: int = 0, parts: int = 1) -> None:
        """The inputs of layer ``next_layer``, with their checksum (tyr.artifacts.write_verified)."""
        write_verified(self.checkpoint_path(part, parts), {"hidden": hidden}, metadata={"next_layer": next_layer})
        fault_point("build.checkpoint")

    def load_checkpoint(self, part: int = 0, parts: int = 1) -> tuple[int, torch.Tensor] | None:
        """The checkpoint (next layer, activations), or None if there is none or it is corrupt (the
        build then restarts from the calibration tokens; the finished shards are kept)."""
        import logging

        path = self.checkpoint_path(part, parts)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                nxt = int(json.loads(f.metadata()["tyr_verified"])["next_layer"])
        except Exception:  # noqa: BLE001 - unreadable header: load_cache below reports it
            nxt = None
        t = load_cache(path, log=logging.getLogger(__name__))
        return None if t is None or nxt is None else (nxt, t["hidden"])

    # --- reading -----------------------------------------------------------------------------
    def verify_layer(self, layer: int) -> None:
        entry = self.manifest["layers"].get(str(layer))
        if entry is None:
            raise SupernetError(f"layer {layer} is not in the supernet at {self.root}")
        path = self.root / entry["shard"]
        if not path.exists():
            raise SupernetError(f"supernet shard missing: {path}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise SupernetError(
                f"supernet shard corrupt: {path} (sha256 {digest[:12]}… != manifest {entry['sha256'][:12]}…); "
                "delete the supernet to rebuild it (in a pipeline run: redo=search)"
            )
        self._verified.add(layer)

    def verify(self) -> None:
        for l in self.completed_layers():
            self.verify_layer(l)

    def _tensors(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._cache:
            if layer not in self._verified:
                self.verify_layer(layer)
            self._cache = {layer: load_file(str(self.shard_path(layer)))}  # one shard in memory at a time
        return self._cache[layer]

    def kept_sets(self, layer: int, kind: str) -> list[list[int]]:
        """The kept units of every level of module (``layer``, ``kind``), read without the weights."""
        if layer not in self._verified:
            self.verify_layer(layer)
        with safe_open(str(self.shard_path(layer)), "pt") as f:
            return [f.get_tensor(f"{kind}.{lvl}.keep").tolist() for lvl in range(len(self.grid.modules[kind][layer].keep))]

    def variant(self, layer: int, kind: str, level: int) -> StoredVariant:
        t = self._tensors(layer)
        key = f"{kind}.{level}"
        if f"{key}.keep" not in t:
            raise SupernetError(f"layer {layer} has no {kind} level {level}")
        err = self.manifest["layers"][str(layer)]["errors"][kind][level]
        return StoredVariant(t[f"{key}.keep"].tolist(), t[f"{key}.weight"], t.get(f"{key}.bias"), err)
