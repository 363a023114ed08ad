"""Build a supernet: ``python -m tyr.recipes.build model=smollm2-135m target_sparsity=0.5``.

Writes ``supernet/`` (shards + manifest) into the run directory, which is derived from the settings:
killing the build and rerunning the same command continues from the last complete layer.
``evaluate_centre=true`` also assembles the centre allocation and evaluates it (``results.json``).

``runtime.streaming=true`` reads one decoder layer at a time from the checkpoint; under
``python -m torch.distributed.run --nproc_per_node=N -m tyr.recipes.build ...`` the ranks split the
calibration sequences and the per-level solves, and rank 0 writes the supernet (docs/scale.md).
"""

from __future__ import annotations

import time

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from tyr import dist
from tyr.data import TokenSetSpec, get_token_set
from tyr.evaluation import evaluate_model, results_table
from tyr.recipes.common import eval_kwargs, load, load_in_memory, log, recorded, start, taylor_for, to_container, token_cache
from tyr.supernet.assemble import Assembler
from tyr.supernet.builder import build_supernet
from tyr.supernet.grid import layer_shapes, make_grid
from tyr.supernet.store import SupernetStore
from tyr.utils import JsonlWriter, peak_rss_mb, read_json, write_json


@hydra.main(config_path="../../conf", config_name="build", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    run_dir = start(cfg)
    t_start = time.time()
    lm = load(cfg)
    pruner = instantiate(cfg.pruner)
    s = cfg.supernet
    grid = make_grid(
        layer_shapes(lm.model),
        float(cfg.target_sparsity),
        float(s.interval),
        int(s.n_levels),
        int(s.min_heads),
        int(s.min_channels),
    )
    path = None
    if s.eea == "path":
        path = read_json(s.path)["levels"] if s.path else grid.centre_levels()
    calib_spec = TokenSetSpec(**cfg.data.calibration)
    model_id = {"name": lm.name, "revision": lm.revision, "dtype": str(cfg.model.dtype)}
    store = SupernetStore.create_or_resume(
        run_dir / "supernet",
        model=model_id,
        grid=grid,
        eea=str(s.eea),
        config={
            "pruner": to_container(cfg.pruner),
            "calibration": to_container(cfg.data.calibration),
            "gradient": to_container(cfg.data.gradient) if pruner.needs_gradients else None,
            "target_sparsity": float(cfg.target_sparsity),
            "path": path,
        },
    )
    if store.manifest["complete"]:
        log.info("supernet already complete: %s", store.root)
    else:
        calib = get_token_set(calib_spec, lm.tokenizer, token_cache(cfg), lm.name).input_ids
        t0 = time.time()
        taylor = taylor_for(cfg, lm, pruner)
        t_grad = time.time() - t0
        metrics = JsonlWriter(run_dir / "build.jsonl")
        build_supernet(
            lm.model,
            pruner,
            calib,
            grid,
            store,
            eea=str(s.eea),
            taylor=taylor,
            path=path,
            batch_size=int(cfg.batch_size),
            on_layer=lambda r: metrics.write(**r),
        )
        store.manifest.update(
            gradient_seconds=t_grad,
            build_seconds=time.time() - t0,
            peak_rss_mb=peak_rss_mb(),
            calibration_tokens=int(calib.numel()),
            streaming=bool(cfg.runtime.streaming),
            world_size=dist.world(),
            peak_rss_mb_per_rank=dist.all_gather_object(peak_rss_mb()),
        )
        store.save_manifest()  # build_supernet already marked it complete; add the recipe's timings (rank 0)
    if not dist.is_main():
        dist.shutdown()
        return
    m = store.manifest
    log.info(
        "supernet: %d layers, %.1f MB on disk, built in %.0f s",
        len(m["layers"]),
        m["disk_bytes"] / 1e6,
        m.get("build_seconds", 0),
    )
    dist.shutdown()
    if cfg.evaluate_centre:
        if cfg.runtime.streaming:
            del lm
            lm = load_in_memory(cfg)  # evaluation runs the whole model
        asm = Assembler(lm.model, SupernetStore.open(store.root))
        asm.assemble(grid.centre_levels())
        res = evaluate_model(lm.model, lm.tokenizer, **eval_kwargs(cfg))
        res.update(
            model=lm.name,
            eea=str(s.eea),
            allocation="centre",
            target_sparsity=float(cfg.target_sparsity),
            supernet=str(store.root),
            wall_time=time.time() - t_start,
            peak_rss_mb=peak_rss_mb(),
            config=to_container(cfg),
        )
        write_json(run_dir / "results.json", res)
        print(results_table({f"{lm.name} centre eea={s.eea}": res}))


if __name__ == "__main__":
    main()
