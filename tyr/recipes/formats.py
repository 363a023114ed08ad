"""The export formats' settings (``export_formats``, ``gguf_dtype``: conf/gguf/default.yaml), checked
before anything loads: known formats, a known dtype, and a GGUF only for a family that has one (read
from the model's ``arch:`` block or its folder's config.json, without loading it)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tyr.artifacts import SettingsError


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise SettingsError(msg)


FORMATS = ("hf", "gguf")


def model_type_of(model: DictConfig) -> str | None:
    """The model's ``model_type`` without loading it: its ``arch:`` block, else its folder's config.json."""
    if model.get("arch") is not None:
        return str(model.arch.model_type)
    src = model.get("source")
    path = src.get("path") if src is not None and "path" in src.keys() and not OmegaConf.is_missing(src, "path") else None
    return folder_model_type(Path(str(path)).expanduser()) if path else None


def folder_model_type(folder: Path) -> str | None:
    cfg_file = folder / "config.json"
    return str(OmegaConf.load(cfg_file).get("model_type")) if cfg_file.is_file() else None


def check_formats(cfg: DictConfig, model_type: str | None) -> None:
    """``export_formats`` and ``gguf_dtype`` (conf/gguf/default.yaml); a GGUF only for a family that has one."""
    from tyr.export.gguf import GGUF_DTYPES, check_gguf_family

    formats = [str(f) for f in cfg.export_formats]
    unknown = [f for f in formats if f not in FORMATS]
    _need(not unknown, f"export_formats: unknown {unknown}; known: {', '.join(FORMATS)}")
    _need(
        "gguf" not in formats or "hf" in formats,
        "export_formats=[gguf]: the GGUF is written from the Hugging Face folder; give export_formats=[hf,gguf]",
    )
    _need(str(cfg.gguf_dtype) in GGUF_DTYPES, f"gguf_dtype={cfg.gguf_dtype} must be one of {', '.join(GGUF_DTYPES)}")
    if "gguf" in formats and model_type is not None:
        try:
            check_gguf_family(model_type)
        except ValueError as e:
            raise SettingsError(f"export_formats=[hf,gguf]: {e}") from None
