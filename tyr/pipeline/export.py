"""Stage ``export``: the searched allocation written as a Hugging Face folder (``hf_model/``, the
family's exported architecture, :mod:`tyr.export`) and checked in a fresh process; ``export.json``
records it with its key (the search key and the chosen form). Done when ``export.json`` holds the
key and the folder holds a config. The folder is written and checked under a staging name and
renamed into place only once verified.

With ``gguf`` among the export formats, :func:`export_gguf` then writes the folder as
``gguf/model.gguf`` next to it (:mod:`tyr.export.gguf`), recorded in ``gguf/model.gguf.json`` with
its key (the dtype, the writer's version and the folder's content) and sha256; a rerun with the
same key and an intact file reuses it, anything else rewrites it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from tyr.artifacts import fault_point, file_sha256, read_json_checked, settings_key, weights_digest
from tyr.data import get_token_set
from tyr.export import check_out_dir, export_model, export_streamed, verify_export
from tyr.export.gguf import GGUF_FILE, WRITER_VERSION, write_gguf
from tyr.models import LoadedModel, cache_dir
from tyr.pipeline.evaluate import ALLOCATION_FILE
from tyr.pipeline.layout import form_key
from tyr.pipeline.settings import PipelineSettings, RunKeys
from tyr.supernet.assemble import Assembler
from tyr.supernet.store import SupernetStore
from tyr.utils import portable_path, write_json

log = logging.getLogger("tyr")

EXPORT_DIR = "hf_model"
EXPORT_RECORD = "export.json"
GGUF_DIR = "gguf"


def searched_allocation(run_dir: Path, lm: LoadedModel) -> tuple[dict, SupernetStore]:
    """A pipeline run's ``allocation.json`` and the supernet it names (checked against ``lm``)."""
    alloc = read_json_checked(Path(run_dir) / ALLOCATION_FILE)
    store = SupernetStore.open(
        (Path(run_dir) / alloc["manifest"]).parent, expect_model={"name": lm.name, "revision": lm.revision}
    )
    return alloc, store


def export_key(keys: RunKeys, chosen: dict, store: SupernetStore, run_dir: Path) -> str:
    supernet = store.root.resolve().relative_to(Path(run_dir).resolve())
    return settings_key(form_key(keys.search.key, chosen["source"], chosen["levels"], supernet))


def export_done(run_dir: Path, key: str) -> bool:
    run_dir = Path(run_dir)
    record = read_json_checked(run_dir / EXPORT_RECORD) if (run_dir / EXPORT_RECORD).exists() else {}
    return record.get("key") == key and (run_dir / EXPORT_DIR / "config.json").exists()


def export_allocation(
    lm: LoadedModel,
    store: SupernetStore,
    alloc: dict,
    out: Path,
    verify_ids: torch.Tensor | None = None,
    layout: str = "padded",
    overwrite: bool = False,
    key: str | None = None,
) -> dict:
    """Assemble ``alloc["levels"]`` in ``store`` on ``lm`` (dense; restored afterwards), write it to
    ``out`` and, given ``verify_ids``, check it in a fresh process; ``export.json`` next to ``out``
    records it. A streamed model is written one decoder layer at a time, unchecked (the check
    compares with the whole model in memory)."""
    out = Path(out)
    check_out_dir(out, overwrite)
    asm = Assembler(lm.model, store)
    asm.assemble(alloc["levels"])
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if asm.streaming:
            export_streamed(lm.model, asm, lm.tokenizer, staging, allocation=alloc, layout=layout)
            if verify_ids is not None:
                log.warning("streamed export: the fresh-process comparison with the in-memory model is skipped")
                verify_ids = None
        else:
            export_model(lm.model, lm.tokenizer, staging, allocation=alloc, layout=layout)
        record = {
            "out": str(out),
            "bytes": sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
            "streamed": asm.streaming,
            "manifest": alloc["manifest"],
            "key": key,
        }
        if verify_ids is not None:
            record["verify"] = verify_export(staging, lm.model, verify_ids)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    asm.restore_dense()
    fault_point("export.record")
    write_json(out.parent / EXPORT_RECORD, record)
    return record


def verify_ids(lm: LoadedModel, s: PipelineSettings) -> torch.Tensor:
    """The export check's input: two search sequences, at most 128 tokens."""
    return get_token_set(s.search_data, lm.tokenizer, s.token_cache, lm.name).input_ids[:2, :128]


def export_stage(lm: LoadedModel, s: PipelineSettings, key: str, run_dir: Path) -> dict | None:
    """Export and check the run's ``allocation.json`` unless already done with ``key``; the record, or None."""
    if export_done(run_dir, key):
        return None
    alloc, store = searched_allocation(run_dir, lm)
    record = export_allocation(lm, store, alloc, Path(run_dir) / EXPORT_DIR, verify_ids(lm, s), overwrite=True, key=key)
    log.info("exported %s (%.1f MB)", record["out"], record["bytes"] / 1e6)
    return record


def gguf_path(folder: Path) -> Path:
    """Where the GGUF of an exported folder goes: ``gguf/model.gguf`` beside the folder."""
    return Path(folder).parent / GGUF_DIR / GGUF_FILE


def gguf_key(folder: Path, dtype: str) -> str:
    """What a GGUF is made from: the dtype, the writer's version, the folder's weights and its other files
    (config, tokenizer, the source record)."""
    folder = Path(folder)
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(".safetensors")}
    weights = weights_digest(folder, cache_dir() / "digests.json")
    return settings_key({"dtype": dtype, "writer": WRITER_VERSION, "weights": weights, "files": files})


def export_gguf(folder: Path, dtype: str, out: Path | None = None) -> tuple[dict, bool]:
    """Write the exported ``folder`` as a GGUF (default :func:`gguf_path`) unless its record holds the same
    key and the file its recorded size and sha256. Returns the record and whether it was written."""
    out = Path(out) if out is not None else gguf_path(folder)
    record_file = out.with_name(out.name + ".json")
    key = gguf_key(folder, dtype)
    if record_file.exists() and out.exists():
        old = read_json_checked(record_file)
        if old.get("key") == key and out.stat().st_size == old.get("bytes") and file_sha256(out) == old.get("sha256"):
            log.info("GGUF %s is up to date (same settings and folder)", out)
            return old, False
    record = write_gguf(folder, out, dtype)
    record.update(key=key, folder=portable_path(folder), out=portable_path(out))
    write_json(record_file, record)
    log.info("wrote %s (%s, %.1f MB)", out, dtype, record["bytes"] / 1e6)
    return record, True
