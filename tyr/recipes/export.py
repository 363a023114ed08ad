"""Export a searched allocation to a Hugging Face checkpoint:
``python -m tyr.recipes.export run=<pipeline run dir> [out=DIR] [export_formats=[hf,gguf] gguf_dtype=q8_0]``,
or write the GGUF of an exported folder: ``python -m tyr.recipes.export folder=<hf folder> [gguf_dtype=q8_0]``.

The model is rebuilt from the dense weights and the supernet named in ``allocation.json``, written
with per-layer widths (the family's exported architecture, ``tyr_llama``, ``tyr_qwen3``, ...,
loadable with ``trust_remote_code=True``), and checked in a fresh process
(:func:`tyr.pipeline.export.export_allocation`, the pipeline's export stage). With ``gguf`` among the
formats, the folder is then written as ``gguf/model.gguf`` beside it (:func:`tyr.pipeline.export.export_gguf`:
kept when the same settings made it from the same folder).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tyr.data import TokenSetSpec, get_token_set
from tyr.models import load_model
from tyr.pipeline.export import EXPORT_DIR, export_allocation, export_gguf, gguf_path, searched_allocation
from tyr.recipes.common import log, recorded
from tyr.settings import from_config
from tyr.utils import setup_run


def export_run(
    run_dir: Path,
    out: Path | None = None,
    verify: bool = True,
    layout: str = "padded",
    overwrite: bool = False,
    streaming: bool = False,
) -> dict:
    """Export the searched allocation of a pipeline run (model and check data from the run's saved
    config); returns the export record. ``streaming``: read and write one decoder layer at a time
    (:func:`tyr.export.export_streamed`); the fresh-process check is then skipped."""
    run_dir = Path(run_dir)
    run_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    lm = load_model(run_cfg.model.name, instantiate(run_cfg.model.source), run_cfg.model.dtype, streaming=streaming)
    alloc, store = searched_allocation(run_dir, lm)
    ids = None
    if verify:
        spec = from_config(TokenSetSpec, OmegaConf.to_container(run_cfg.data.search, resolve=True), "data.search")
        ids = get_token_set(spec, lm.tokenizer, str(Path(run_cfg.paths.cache_dir) / "tokens"), lm.name).input_ids[:2, :128]
    return export_allocation(lm, store, alloc, Path(out or run_dir / EXPORT_DIR), ids, layout, overwrite)


def write_gguf_of(folder: Path, dtype: str, out: Path | None) -> None:
    """The GGUF of an exported folder (kept if up to date), and one line saying where it is."""
    out = out or gguf_path(folder)
    record, written = export_gguf(folder, dtype, out)
    state = "written" if written else "up to date"
    print(f"GGUF {out} ({dtype}, {record['bytes'] / 1e6:.1f} MB, {state}; tokenizer {record['tokenizer']})")


@hydra.main(config_path="../../conf", config_name="export", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    setup_run(int(cfg.seed), int(cfg.threads))
    gguf_out = Path(cfg.gguf_out) if cfg.gguf_out else None
    if cfg.folder:  # an exported folder: its GGUF only
        return write_gguf_of(Path(cfg.folder), str(cfg.gguf_dtype), gguf_out)
    rec = export_run(
        Path(cfg.run),
        Path(cfg.out) if cfg.out else None,
        bool(cfg.verify),
        str(cfg.layout),
        bool(cfg.overwrite),
        streaming=bool(cfg.streaming),
    )
    log.info("exported to %s (%.1f MB)", rec["out"], rec["bytes"] / 1e6)
    print(f"exported to {rec['out']} ({rec['bytes'] / 1e6:.1f} MB)" + (f"; verified: {rec['verify']}" if "verify" in rec else ""))
    if "gguf" in cfg.export_formats:
        write_gguf_of(Path(rec["out"]), str(cfg.gguf_dtype), gguf_out)


if __name__ == "__main__":
    main()
