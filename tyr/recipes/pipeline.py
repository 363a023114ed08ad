"""The whole job: ``python -m tyr.recipes.pipeline model=smollm2-135m target_sparsity=0.5``.

Stages, each skipped when its artifacts are complete (so a rerun of the same command resumes):
prepare (token sets, Taylor statistics, teacher top-k cache) → build + search (coarse-to-fine, see
:mod:`tyr.coarse_to_fine`, ending with the sequential re-prune at the searched widths) →
allocation.json → evaluate the searched model and the comparisons → results.json, results.md, plots.

Comparisons (``compare``): ``dense``; ``uniform`` and ``owl``, assembled from the first iteration's
supernet; ``uniform_reprune``, the uniform widths pruned sequentially (the plain sparsegpt-loop
baseline, same pruner and calibration); and, when the re-prune ran, the searched widths in the form
that lost (``searched_supernet`` or ``searched_reprune``), so both are reported.

Under ``python -m torch.distributed.run --nproc_per_node=N -m tyr.recipes.pipeline ...`` the
prepare, build and search stages are split over the ranks (docs/scale.md); rank 0 alone writes the
artifacts and then evaluates and exports. With ``runtime.streaming=true`` those stages hold one
decoder layer at a time; evaluation and export then load the whole model in memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from tyr import dist
from tyr.allocation import nearest_levels, outlier_ratios, owl_sparsities
from tyr.artifacts import describe_diff, read_json_checked, settings_key
from tyr.coarse_to_fine import SearchSettings, build_path_supernet, final_allocation, keep_counts, run_search, search_forms
from tyr.data import TokenSetSpec, get_token_set
from tyr.evaluation import evaluate_model, results_table
from tyr.fitness import TeacherCache
from tyr.modeling.params import parameter_counts
from tyr.plots import plot_allocation, plot_search_history
from tyr.recipes import stages
from tyr.recipes.common import recorded, eval_kwargs, load, load_in_memory, log, start, taylor_for, to_container, token_cache
from tyr.recipes.recover import check as check_recovery, recover_stage
from tyr.supernet.assemble import Assembler
from tyr.supernet.store import SupernetStore
from tyr.utils import peak_rss_mb, write_json


def _settings(cfg: DictConfig) -> SearchSettings:
    s = cfg.search
    return SearchSettings(
        intervals=[float(x) for x in s.intervals], n_levels=int(s.n_levels), min_heads=int(s.min_heads),
        min_channels=int(s.min_channels), eea=str(s.eea), generations=int(s.generations), offspring=int(s.offspring),
        stages=[(int(a), int(b)) for a, b in s.stages], max_flips=int(s.max_flips),
        prescreen_keep=None if s.prescreen_keep is None else int(s.prescreen_keep), prefix_cache=bool(s.prefix_cache),
        prefix_cache_max_mb=float(s.prefix_cache_max_mb), seed=int(s.seed), batch_size=int(cfg.batch_size),
        surrogate_check=int(s.surrogate_check), reprune=bool(s.get("reprune", True)),
        holdout=float(s.get("holdout", 0.0)), final_eea=s.get("final_eea"),
        choose_form=str(s.get("choose_form", "heldout")),
    )


def allocation_record(model, store: SupernetStore, levels: dict, dense_counts: dict, fitness=None) -> dict:
    """allocation.json: level, sparsity and kept units per module, nominal and real budget."""
    grid = store.grid
    modules = {}
    for kind in ("attn", "mlp"):
        modules[kind] = []
        for l, lvl in enumerate(levels[kind]):
            g = grid.modules[kind][l]
            modules[kind].append({"layer": l, "level": lvl, "kept": g.keep[lvl], "units": g.n_units,
                                  "sparsity": g.sparsity(lvl), "kept_units": store.variant(l, kind, lvl).keep})
    counts = parameter_counts(model)
    nominal = grid.allocation_params(levels)
    return {
        "levels": levels, "modules": modules, "fitness": fitness,
        "budget": {"nominal_kept": nominal, "nominal_dense": grid.dense_params(),
                   "nominal_sparsity": 1 - nominal / grid.dense_params(),
                   "prunable_kept": counts["prunable"], "prunable_dense": dense_counts["prunable"],
                   "sparsity": 1 - counts["prunable"] / dense_counts["prunable"],
                   "total_params": counts["total"], "dense_total_params": dense_counts["total"]},
        "manifest": str(store.root / "manifest.json"), "config_hash": store.manifest["config_hash"],
    }


def _evaluated(out: Path, lm, cfg: DictConfig, form: dict, **record) -> dict:
    """The model as it is now, evaluated once: ``out`` is read back on a rerun only if it was made
    with the same evaluation settings for the same model form (its key); otherwise re-evaluated."""
    key, settings = stages.results_key(cfg, form)
    if out.exists():
        old = read_json_checked(out)
        if old.get("key") == key:
            return old
        log.info("%s was evaluated with other settings (%s); re-evaluating", out.name,
                 describe_diff(old.get("settings") or {}, settings))
    res = evaluate_model(lm.model, lm.tokenizer, **eval_kwargs(cfg))
    res.update(model=lm.name, **record, config=to_container(cfg), key=key, settings=settings)
    write_json(out, res)
    return res


@hydra.main(config_path="../../conf", config_name="pipeline", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    run_dir = start(cfg)
    recovery = check_recovery(cfg)  # None with recover=none; a bad setting stops here, before any loading
    t_start = time.time()
    stages.apply_redo(run_dir, cfg.get("redo"))
    pruner = instantiate(cfg.pruner)
    recs = stages.records(cfg, stages.model_identity(cfg), pruner.needs_gradients)
    lm = load(cfg)
    dist.barrier()  # every rank sees the files as rank 0 left them after a redo
    dense_counts = parameter_counts(lm.model)
    tok = dict(tokenizer=lm.tokenizer, cache=token_cache(cfg), tokenizer_name=lm.name)
    timings = read_json_checked(run_dir / "timings.json") if (run_dir / "timings.json").exists() else {}

    # prepare
    t0 = time.time()
    calib = get_token_set(TokenSetSpec(**cfg.data.calibration), **tok).input_ids
    search_ids = get_token_set(TokenSetSpec(**cfg.data.search), **tok).input_ids
    taylor = taylor_for(cfg, lm, pruner)
    teacher_file = run_dir / "teacher.safetensors"
    k = int(cfg.search.topk)
    log.info("teacher cache: %d tokens x top-%d = %.1f MB", search_ids.numel(), k,
             TeacherCache.estimate_bytes(search_ids.numel(), k) / 1e6)
    teacher = TeacherCache.load(teacher_file, recs["prepare"].key) if teacher_file.exists() else None
    if teacher is None:  # none yet, or corrupt (logged): built again
        stages.begin(run_dir, recs["prepare"])
        teacher = TeacherCache.build(lm.model, search_ids, k, int(cfg.batch_size))
        teacher.save(teacher_file, recs["prepare"].key)
    timings.setdefault("prepare", time.time() - t0)

    # build + search
    model_id = {"name": lm.name, "revision": lm.revision, "dtype": str(cfg.model.dtype)}
    store_config = {"pruner": to_container(cfg.pruner), "calibration": to_container(cfg.data.calibration),
                    "gradient": to_container(cfg.data.gradient) if pruner.needs_gradients else None,
                    "target_sparsity": float(cfg.target_sparsity)}
    t0 = time.time()
    settings = _settings(cfg)
    stages.begin(run_dir, recs["search"])
    state = run_search(lm.model, model_id, pruner, calib, taylor, teacher, float(cfg.target_sparsity), settings,
                       run_dir, store_config)
    timings.setdefault("build_and_search", time.time() - t0)
    chosen = final_allocation(state)
    main_rank = dist.is_main()
    dist.shutdown()
    if not main_rank:  # rank 0 evaluates and exports alone
        return
    write_json(run_dir / "timings.json", timings)
    if cfg.runtime.streaming:
        del lm
        lm = load_in_memory(cfg)  # evaluating and exporting run the whole (pruned) model

    # allocations to evaluate: the searched one and the comparisons, each with its supernet
    first_store = SupernetStore.open(state["iterations"][0]["supernet"], expect_model=model_id)
    candidates = {}
    for source, form in sorted(search_forms(state).items(), key=lambda kv: kv[0] != chosen["source"]):
        # the chosen form is "searched"; the other form of the same widths is kept for the record
        name = "searched" if source == chosen["source"] else f"searched_{source}"
        candidates[name] = (SupernetStore.open(form["supernet"], expect_model=model_id), form["levels"], form["fitness"])
    search_key = recs["search"].key
    rows = {}
    if "dense" in cfg.compare:  # the unpruned model, same protocol: the top row of the table
        rows[f"{lm.name} dense"] = _evaluated(run_dir / "results_dense.json", lm, cfg, {"model": recs["prepare"].settings["model"]},
                                              allocation="dense")
    if "uniform" in cfg.compare:
        candidates["uniform"] = (first_store, first_store.grid.centre_levels(), None)
    if "uniform_reprune" in cfg.compare:
        keep = keep_counts(first_store.grid, first_store.grid.centre_levels())
        store = build_path_supernet(lm.model, model_id, pruner, calib, taylor, keep, run_dir / "uniform_reprune" / "supernet",
                                    settings, {**store_config, "reprune_of": "uniform"})
        candidates["uniform_reprune"] = (store, store.grid.centre_levels(), None)
    if "owl" in cfg.compare:
        owl_file = run_dir / "owl.json"
        if not owl_file.exists() or read_json_checked(owl_file).get("search") != search_key:
            ratios = outlier_ratios(lm.model, calib, batch_size=int(cfg.batch_size))
            target = owl_sparsities(ratios, float(cfg.target_sparsity))
            write_json(owl_file, {"outlier_ratios": ratios, "layer_sparsity": target, "search": search_key,
                                  "levels": nearest_levels(first_store.grid, target)})
        candidates["owl"] = (first_store, read_json_checked(owl_file)["levels"], None)
    for name, (store, levels, fit) in candidates.items():
        out = run_dir / f"results_{name}.json"
        asm = Assembler(lm.model, store)
        asm.assemble(levels)
        rec = allocation_record(lm.model, store, levels, dense_counts, fit)
        if name == "searched":
            rec["source"] = chosen["source"]  # "reprune" (sequentially re-pruned) or "supernet"
            rec["manifest"] = str(Path(rec["manifest"]).resolve().relative_to(run_dir.resolve()))  # the run dir may move
            write_json(run_dir / "allocation.json", rec)
        rows[f"{lm.name} {name} {cfg.target_sparsity:.0%}"] = _evaluated(
            out, lm, cfg, stages.form_key(search_key, name, levels, store.root.resolve().relative_to(run_dir.resolve())),
            allocation=name, budget=rec["budget"],
            supernet=str(store.root))
        asm.restore_dense()
        if name == "searched":
            searched_sparsity = {k: [m["sparsity"] for m in rec["modules"][k]] for k in ("attn", "mlp")}
    first_grid = first_store.grid
    uniform_sparsity = {k: [g.sparsity(g.centre) for g in first_grid.modules[k]] for k in ("attn", "mlp")}
    history = [__import__("json").loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()] \
        if (run_dir / "history.jsonl").exists() else []
    plot_search_history(history, run_dir / "search_fitness.png")
    plot_allocation(searched_sparsity, uniform_sparsity, run_dir / "allocation.png",
                    f"{lm.name} at {cfg.target_sparsity:.0%}: searched vs uniform")
    exported = read_json_checked(run_dir / "export.json") if (run_dir / "export.json").exists() else {}
    export_key = settings_key(stages.form_key(search_key, chosen["source"], chosen["levels"],
                                              candidates["searched"][0].root.resolve().relative_to(run_dir.resolve())))
    if cfg.export and (exported.get("key") != export_key or not (run_dir / "hf_model" / "config.json").exists()):
        from tyr.recipes.export import export_run

        t0 = time.time()
        rec = export_run(run_dir, verify=True, lm=lm, token_cache=token_cache(cfg), overwrite=True, key=export_key)
        timings["export"] = time.time() - t0
        log.info("exported %s (%.1f MB)", rec["out"], rec["bytes"] / 1e6)
    if recovery is not None:  # the searched model distilled from the dense one (tyr.recipes.recover)
        t0 = time.time()
        rows.update(recover_stage(cfg, run_dir, lm, recovery, before=rows.get(f"{lm.name} searched {cfg.target_sparsity:.0%}")))
        timings["recover"] = time.time() - t0
    summary = {"rows": rows, "iterations": state["iterations"], "timings": timings, "peak_rss_mb": peak_rss_mb(),
               "wall_time_this_run": time.time() - t_start}
    write_json(run_dir / "results.json", summary)
    table = results_table(rows)
    (run_dir / "results.md").write_text(table + "\n")
    print(table)
    for it in state["iterations"]:
        print(f"iteration {it['iteration']}: interval {it['interval']:.4f}  KL {it['fitness']:.4f}  "
              f"build {it['build_seconds']:.0f} s  search {it['search_seconds']:.0f} s")
    print(f"wall time {time.time() - t_start:.0f} s; run directory {run_dir}")


if __name__ == "__main__":
    main()
