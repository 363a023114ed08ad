"""Writing an exported folder: the out-dir refusal, the atomic write (temporary sibling folder
renamed into place) with tokenizer, ``tyr_allocation.json`` and extra files, and :func:`export_model`
for an in-memory pruned model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from tyr.export.config import ExportError
from tyr.export.surgery import to_export_model, widths_record

log = logging.getLogger(__name__)

ALLOCATION_FILE = "tyr_allocation.json"


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``out_dir`` resolved, its parent created; a non-empty ``out_dir`` is refused unless ``overwrite``."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (set overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_extra(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, Path):
        shutil.copyfile(content, path)
    else:
        path.write_text(json.dumps(content, indent=2, default=str) + "\n")


def with_source(model: nn.Module, extra_files: dict[str, Any] | None) -> dict[str, Any]:
    """``extra_files`` plus, from the folder the model was loaded from, its ``tyr_source.json`` (an export
    records the model's origin: the GGUF export copies that GGUF's tokenizer) and its SentencePiece
    ``tokenizer.model`` (the GGUF export reads its scores), where it has them."""
    from tyr.models import SOURCE_FILE

    extra = dict(extra_files or {})
    loaded_from = str(getattr(model.config, "_name_or_path", "") or "")
    for name in (SOURCE_FILE, "tokenizer.model") if loaded_from else ():
        if name not in extra and (Path(loaded_from) / name).is_file():
            extra[name] = Path(loaded_from) / name
    return extra


def write_folder(out_dir: Path, write, tokenizer: Any, record: dict, extra_files: dict[str, Any] | None) -> None:
    """``write(tmp)`` the config and weights into a temporary sibling folder, add the tokenizer, the
    allocation record and ``extra_files``, check the custom code is there, then rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extra(tmp / ALLOCATION_FILE, record)
        for name, content in (extra_files or {}).items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"extra file name {name!r} must be a relative path inside the folder")
            write_extra(tmp / name, content)
        cfg = json.loads((tmp / "config.json").read_text())
        code = {ref.split(".")[0] + ".py" for ref in cfg.get("auto_map", {}).values()}
        missing = sorted(f for f in code | {"configuration_tyr_llama.py", "modeling_tyr_llama.py"} if not (tmp / f).exists())
        if "auto_map" not in cfg or missing:
            raise ExportError(f"save_pretrained did not write auto_map / custom code (missing {missing})")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    allocation: dict | None = None,
    max_shard_size: int | str = "2GB",
    extra_files: dict[str, Any] | None = None,
    layout: str = "padded",
    overwrite: bool = False,
) -> Path:
    """Write a loadable Hugging Face folder for an in-memory pruned model and return its path.

    Contents: ``config.json`` (per-layer widths, ``auto_map``), ``configuration_tyr_llama.py`` and
    ``modeling_tyr_llama.py``, safetensors shards (an index when there is more than one shard),
    ``generation_config.json``, the tokenizer (if given), ``tyr_allocation.json`` and
    ``extra_files`` (name -> str / bytes / Path to copy / JSON-serialisable object).
    Everything is written to a temporary sibling folder that is renamed into place at the end,
    so an interrupted export leaves no half-written ``out_dir``.
    """
    out_dir = check_out_dir(out_dir, overwrite)
    t0 = time.time()
    export = to_export_model(model, layout, copy_weights=False)  # only read by save_pretrained
    record = widths_record(model, export, allocation, layout)

    def write(tmp: Path) -> None:
        export.save_pretrained(tmp, max_shard_size=max_shard_size)

    write_folder(out_dir, write, tokenizer, record, with_source(model, extra_files))
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    log.info("exported %s (%s layout, %.1f MB, %.1fs)", out_dir, layout, size / 2**20, time.time() - t0)
    return out_dir
