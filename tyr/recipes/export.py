"""Export a searched allocation to a Hugging Face checkpoint:
``python -m tyr.recipes.export run=<pipeline run dir> [out=DIR]``.

The model is rebuilt from the dense weights and the supernet named in ``allocation.json``, written
with per-layer widths (the family's exported architecture, ``tyr_llama``, ``tyr_qwen3``, ...,
loadable with ``trust_remote_code=True``), and checked in a fresh process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tyr.artifacts import fault_point, read_json_checked
from tyr.data import TokenSetSpec, get_token_set
from tyr.export import check_out_dir, export_model, export_streamed, verify_export
from tyr.models import load_model
from tyr.recipes.common import log, recorded
from tyr.supernet.assemble import Assembler
from tyr.supernet.store import SupernetStore
from tyr.utils import setup_run, write_json


def export_run(run_dir: Path, out: Path | None = None, verify: bool = True, layout: str = "padded",
               overwrite: bool = False, token_cache: str | None = None, lm=None, streaming: bool = False,
               key: str | None = None) -> dict:
    """Export the searched allocation of a pipeline run; returns the export record. ``lm``: the run's
    model already loaded (dense); it is restored to dense afterwards. ``streaming``: read and write
    one decoder layer at a time (:func:`tyr.export.export_streamed`); the fresh-process check then
    is skipped, since it compares with the whole model in memory."""
    run_dir = Path(run_dir)
    run_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    alloc = read_json_checked(run_dir / "allocation.json")
    if lm is None:
        lm = load_model(run_cfg.model.name, instantiate(run_cfg.model.source), run_cfg.model.dtype, streaming=streaming)
    store = SupernetStore.open((run_dir / alloc["manifest"]).parent, expect_model={"name": lm.name, "revision": lm.revision})
    asm = Assembler(lm.model, store)
    asm.assemble(alloc["levels"])
    out = Path(out or run_dir / "hf_model")
    check_out_dir(out, overwrite)  # the one refusal of a non-empty folder (tyr.export.folder)
    # Written and checked under a staging name, renamed into place only once verified: a failed
    # export or check never leaves an unusable folder where a loadable one is expected.
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if asm.streaming:
            export_streamed(lm.model, asm, lm.tokenizer, staging, allocation=alloc, layout=layout)
            if verify:
                log.warning("streamed export: the fresh-process comparison with the in-memory model is skipped")
                verify = False
        else:
            export_model(lm.model, lm.tokenizer, staging, allocation=alloc, layout=layout)
        record = {"out": str(out), "bytes": sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
                  "streamed": asm.streaming, "manifest": alloc["manifest"], "key": key}
        if verify:
            spec = TokenSetSpec(**OmegaConf.to_container(run_cfg.data.search, resolve=True))
            cache = token_cache or str(Path(run_cfg.paths.cache_dir) / "tokens")
            ids = get_token_set(spec, lm.tokenizer, cache, lm.name).input_ids[:2, :128]
            record["verify"] = verify_export(staging, lm.model, ids)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    asm.restore_dense()
    fault_point("export.record")
    write_json(Path(out).parent / "export.json", record)
    return record


@hydra.main(config_path="../../conf", config_name="export", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    setup_run(int(cfg.seed), int(cfg.threads))
    rec = export_run(Path(cfg.run), Path(cfg.out) if cfg.out else None, bool(cfg.verify), str(cfg.layout), bool(cfg.overwrite),
                     streaming=bool(cfg.streaming))
    log.info("exported to %s (%.1f MB)", rec["out"], rec["bytes"] / 1e6)
    print(f"exported to {rec['out']} ({rec['bytes'] / 1e6:.1f} MB)" + (f"; verified: {rec['verify']}" if "verify" in rec else ""))


if __name__ == "__main__":
    main()
