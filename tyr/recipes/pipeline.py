"""The whole job: ``python -m tyr.recipes.pipeline model=smollm2-135m target_sparsity=0.5``.

Stages, each skipped when its artifacts are complete (so a rerun of the same command resumes):
prepare (token sets, Taylor statistics, teacher top-k cache) → build + search (coarse-to-fine, see
:mod:`tyr.coarse_to_fine`, ending with the sequential re-prune at the searched widths) →
allocation.json → evaluate the searched model and the comparisons → results.json, results.md, plots.

Comparisons (``compare``): ``dense``; ``uniform`` and ``owl``, assembled from the first iteration's
supernet; ``uniform_reprune``, the prune recipe's model (every layer pruned sequentially to the
target, the plain sparsegpt-loop baseline, same pruner and calibration; evaluated last, as it prunes
the loaded model in place); and ``searched_other``: when the re-prune ran, the searched
widths in the form that lost (``searched_supernet`` or ``searched_reprune``), so both are reported.

Under ``python -m torch.distributed.run --nproc_per_node=N -m tyr.recipes.pipeline ...`` the
prepare, build and search stages are split over the ranks (docs/scale.md); rank 0 alone writes the
artifacts and then evaluates and exports. With ``runtime.streaming=true`` those stages hold one
decoder layer at a time; evaluation and export then load the whole model in memory.

This recipe only validates the config (before anything is loaded), builds the typed settings and
the keys once, and calls the stages of :mod:`tyr.pipeline` in order.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from tyr import dist
from tyr.artifacts import read_json_checked
from tyr.coarse_to_fine import first_grid
from tyr.evaluation import results_table
from tyr.modeling.params import parameter_counts
from tyr.pipeline.compare import comparison_forms, searched_forms
from tyr.pipeline.evaluate import evaluate_dense, evaluate_forms, evaluate_uniform_prune, plot_run
from tyr.pipeline.export import EXPORT_DIR, export_gguf, export_key, export_stage, gguf_path
from tyr.pipeline.finalists import finalists_stage
from tyr.pipeline.layout import apply_redo
from tyr.pipeline.prepare import prepare
from tyr.pipeline.recover import recover_stage, recover_uniform_stage
from tyr.pipeline.report import headline, leading_rows
from tyr.pipeline.search import build_and_search, model_id
from tyr.pipeline.settings import pipeline_settings
from tyr.recipes import stages
from tyr.recipes.common import load, load_in_memory, recorded, start, to_container
from tyr.recipes.recover import check as check_recovery
from tyr.recipes.recover import check_budget as check_recovery_budget
from tyr.search_state import final_allocation
from tyr.utils import peak_rss_mb, write_json


@hydra.main(config_path="../../conf", config_name="pipeline", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    run_dir = start(cfg)  # the config was validated before Hydra made the run directory (tyr.recipes.checks)
    recovery = check_recovery(cfg)  # None with recover=none; a bad setting stops here, before any loading
    t_start = time.time()
    apply_redo(run_dir, cfg.get("redo"))
    pruner = instantiate(cfg.pruner)
    s = pipeline_settings(to_container(cfg))
    keys = stages.run_keys(cfg, stages.model_identity(cfg), pruner.needs_gradients)
    lm = load(cfg)
    if recovery is not None:  # the budget against the recovery text needs the tokenizer: now, not after the search
        check_recovery_budget(recovery, lm, s.cache_dir)
    dist.barrier()  # every rank sees the files as rank 0 left them after a redo
    dense_counts = parameter_counts(lm.model)
    timings = read_json_checked(run_dir / "timings.json") if (run_dir / "timings.json").exists() else {}

    t0 = time.time()
    prep = prepare(lm, pruner.needs_gradients, s, keys.prepare, run_dir)
    timings.setdefault("prepare", time.time() - t0)
    t0 = time.time()
    model = model_id(lm, s.dtype)
    state = build_and_search(lm, model, pruner, prep, s, keys, run_dir)
    timings.setdefault("build_and_search", time.time() - t0)
    main_rank = dist.is_main()
    dist.shutdown()
    if not main_rank:  # rank 0 chooses among finalists, evaluates and exports alone
        return
    write_json(run_dir / "timings.json", timings)
    if s.streaming:
        del lm
        lm = load_in_memory(cfg)  # the finalists, evaluating and exporting run the whole (pruned) model
    if s.finalists.alphas:  # the training-aware choice of the widths to ship
        t0 = time.time()
        state = finalists_stage(lm, model, pruner, prep, s, keys, recovery, state, run_dir)
        timings.setdefault("finalists", time.time() - t0)
        write_json(run_dir / "timings.json", timings)
    chosen = final_allocation(state, s.search.choose_form, s.search.reprune)

    forms = searched_forms(state, model, chosen["source"], other="searched_other" in s.compare)
    rows = evaluate_dense(lm, s, keys, run_dir) if "dense" in s.compare else {}
    forms.update(comparison_forms(lm, model, prep, s, keys, state, run_dir))
    form_rows, searched_sparsity = evaluate_forms(lm, forms, chosen["source"], dense_counts, s, keys, run_dir)
    rows.update(form_rows)
    first = first_grid(lm.model, s.target_sparsity, s.search, state)
    plot_run(run_dir, state, first, searched_sparsity, f"{lm.name} at {s.target_sparsity:.0%}: searched vs uniform")
    exported = {}  # what to ship: the searched model's folder, and the recovered one's when recovery ran
    if s.export:
        exported["searched"] = str(run_dir / EXPORT_DIR)
        t0 = time.time()
        if export_stage(lm, s, export_key(keys, chosen, forms["searched"].store, run_dir), run_dir) is not None:
            timings["export"] = time.time() - t0
    if recovery is not None:  # the searched model distilled from the dense one
        t0 = time.time()
        before = rows.get(f"{lm.name} searched {s.target_sparsity:.0%}")
        row, folder = recover_stage(lm, recovery, s, keys, run_dir, before=before)
        rows.update(row)
        if folder is not None:
            exported["searched + recovery"] = folder
        timings["recover"] = time.time() - t0
    if "uniform_reprune" in s.compare and recovery is not None:  # the baseline gets the same recovery
        t0 = time.time()
        before_u, after_u = recover_uniform_stage(lm, pruner, prep, recovery, dense_counts, s, keys, run_dir)
        rows.update({**before_u, **after_u})
        timings["recover_uniform"] = time.time() - t0
    elif "uniform_reprune" in s.compare:  # prunes lm.model in place: the dense model's last use
        rows.update(evaluate_uniform_prune(lm, pruner, prep, dense_counts, s, keys, run_dir))
    rows = leading_rows(rows)
    if "gguf" in s.export_formats:  # each exported folder also as a GGUF for llama.cpp / Ollama
        for name, folder in list(exported.items()):
            export_gguf(Path(folder), s.gguf_dtype)
            exported[f"{name} (gguf)"] = str(gguf_path(Path(folder)))

    summary = {
        "rows": rows,
        "iterations": state["iterations"],
        "timings": timings,
        "exported": exported,
        "peak_rss_mb": peak_rss_mb(),
        "wall_time_this_run": time.time() - t_start,
    }
    summary["headline"] = headline(rows)
    write_json(run_dir / "results.json", summary)
    table = "\n".join(summary["headline"]["lines"] + ["", results_table(rows)])
    (run_dir / "results.md").write_text(table + "\n")
    print(table)
    for it in state["iterations"]:
        print(
            f"iteration {it['iteration']}: interval {it['interval']:.4f}  KL {it['fitness']:.4f}  "
            f"build {it['build_seconds']:.0f} s  search {it['search_seconds']:.0f} s"
        )
    for what, folder in exported.items():
        print(f"exported ({what}): {folder}")
    print(f"wall time {time.time() - t_start:.0f} s; run directory {run_dir}")


if __name__ == "__main__":
    main()
