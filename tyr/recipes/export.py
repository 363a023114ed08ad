"""Export a searched allocation to a Hugging Face checkpoint:
``python -m tyr.recipes.export run=<pipeline run dir> [out=DIR]``.

The model is rebuilt from the dense weights and the supernet named in ``allocation.json``, written
with per-layer widths (the family's exported architecture, ``tyr_llama``, ``tyr_qwen3``, ...,
loadable with ``trust_remote_code=True``), and checked in a fresh process.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tyr.data import TokenSetSpec, get_token_set
from tyr.export import export_model, export_streamed, verify_export
from tyr.models import load_model
from tyr.recipes.common import log
from tyr.supernet.assemble import Assembler
from tyr.supernet.store import SupernetStore
from tyr.utils import read_json, setup_run, write_json


def export_run(run_dir: Path, out: Path | None = None, verify: bool = True, layout: str = "padded",
               overwrite: bool = False, token_cache: str | None = None, lm=None, streaming: bool = False) -> dict:
    """Export the searched allocation of a pipeline run; returns the export record. ``lm``: the run's
    model already loaded (dense); it is restored to dense afterwards. ``streaming``: read and write
    one decoder layer at a time (:func:`tyr.export.export_streamed`); the fresh-process check then
    is skipped, since it compares with the whole model in memory."""
    run_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    alloc = read_json(run_dir / "allocation.json")
    if lm is None:
        lm = load_model(run_cfg.model.name, instantiate(run_cfg.model.source), run_cfg.model.dtype, streaming=streaming)
    store = SupernetStore.open(Path(alloc["manifest"]).parent, expect_model={"name": lm.name, "revision": lm.revision})
    asm = Assembler(lm.model, store)
    asm.assemble(alloc["levels"])
    out = out or run_dir / "hf_model"
    if asm.streaming:
        export_streamed(lm.model, asm, lm.tokenizer, out, allocation=alloc, layout=layout, overwrite=overwrite)
        if verify:
            log.warning("streamed export: the fresh-process comparison with the in-memory model is skipped")
            verify = False
    else:
        export_model(lm.model, lm.tokenizer, out, allocation=alloc, layout=layout, overwrite=overwrite)
    record = {"out": str(out), "bytes": sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()),
              "streamed": asm.streaming, "manifest": alloc["manifest"]}
    if verify:
        spec = TokenSetSpec(**OmegaConf.to_container(run_cfg.data.search, resolve=True))
        ids = get_token_set(spec, lm.tokenizer, token_cache or str(Path(run_cfg.paths.cache_dir) / "tokens"), lm.name).input_ids[:2, :128]
        record["verify"] = verify_export(out, lm.model, ids)
    asm.restore_dense()
    write_json(Path(out).parent / "export.json", record)
    return record


@hydra.main(config_path="../../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_run(int(cfg.seed), int(cfg.threads))
    rec = export_run(Path(cfg.run), Path(cfg.out) if cfg.out else None, bool(cfg.verify), str(cfg.layout), bool(cfg.overwrite),
                     streaming=bool(cfg.streaming))
    log.info("exported to %s (%.1f MB)", rec["out"], rec["bytes"] / 1e6)
    print(f"exported to {rec['out']} ({rec['bytes'] / 1e6:.1f} MB)" + (f"; verified: {rec['verify']}" if "verify" in rec else ""))


if __name__ == "__main__":
    main()
