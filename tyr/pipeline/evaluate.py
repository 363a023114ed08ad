"""Stage ``evaluate``: each model form assembled and evaluated once (``results_<form>.json``, keyed
by the evaluation settings and the form: a rerun reads it back only for the same key), the searched
allocation's summary (``allocation.json``) and the plots (``search_fitness.png``, ``allocation.png``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from tyr.artifacts import describe_diff, read_json_checked, settings_key
from tyr.evaluation import evaluate_model
from tyr.modeling.params import parameter_counts
from tyr.models import LoadedModel
from tyr.pipeline.compare import Form
from tyr.pipeline.layout import form_key
from tyr.pipeline.prepare import Prepared
from tyr.pipeline.settings import PipelineSettings, RunKeys
from tyr.plots import plot_allocation, plot_search_history
from tyr.pruning.uniform import kept_widths, prune_uniform
from tyr.supernet.assemble import Assembler
from tyr.supernet.grid import SupernetGrid
from tyr.supernet.store import SupernetStore
from tyr.utils import write_json

log = logging.getLogger("tyr")

ALLOCATION_FILE = "allocation.json"


def real_budget(model, dense_counts: dict) -> dict:
    """The parameters ``model`` (pruned) keeps against the dense model's ``dense_counts``."""
    counts = parameter_counts(model)
    return {
        "prunable_kept": counts["prunable"],
        "prunable_dense": dense_counts["prunable"],
        "sparsity": 1 - counts["prunable"] / dense_counts["prunable"],
        "total_params": counts["total"],
        "dense_total_params": dense_counts["total"],
    }


def allocation_summary(model, store: SupernetStore, levels: dict, dense_counts: dict, fitness=None) -> dict:
    """A searched (or comparison) allocation as the pipeline records it (``allocation.json``): level,
    sparsity and kept units per module, nominal and real budget. Not an export's
    ``tyr_allocation.json`` (per-layer widths of a folder: :func:`tyr.export.widths_record`)."""
    grid = store.grid
    modules = {}
    for kind in ("attn", "mlp"):
        modules[kind] = []
        for l, lvl in enumerate(levels[kind]):
            g = grid.modules[kind][l]
            modules[kind].append(
                {
                    "layer": l,
                    "level": lvl,
                    "kept": g.keep[lvl],
                    "units": g.n_units,
                    "sparsity": g.sparsity(lvl),
                    "kept_units": store.variant(l, kind, lvl).keep,
                }
            )
    nominal = grid.allocation_params(levels)
    return {
        "levels": levels,
        "modules": modules,
        "fitness": fitness,
        "budget": {
            "nominal_kept": nominal,
            "nominal_dense": grid.dense_params(),
            "nominal_sparsity": 1 - nominal / grid.dense_params(),
            **real_budget(model, dense_counts),
        },
        "manifest": str(store.root / "manifest.json"),
        "config_hash": store.manifest["config_hash"],
    }


def results_key(eval_settings: dict, form: dict) -> tuple[str, dict]:
    settings = {"eval": eval_settings, "form": form}
    return settings_key(settings), settings


# the evaluation settings each part of a result depends on (the rest only change how fast)
PART_SETTINGS = {"perplexity": ("perplexity", "seq_len", "ppl_windows"), "zero_shot": ("tasks", "limit")}


def reusable_parts(old_settings: dict, settings: dict, old: dict) -> dict:
    """The parts (perplexity, zero-shot) of an earlier result ``old`` of the same model form whose own
    evaluation settings are unchanged: a new task list does not redo the perplexity windows."""
    if old_settings.get("form") != settings["form"]:
        return {}
    a, b = old_settings.get("eval") or {}, settings["eval"]
    return {
        part: old[part]
        for part, names in PART_SETTINGS.items()
        if part in old and all(n in a and n in b and a[n] == b[n] for n in names)
    }


def evaluated(
    out: Path,
    lm: LoadedModel,
    s: PipelineSettings,
    keys: RunKeys,
    form: dict,
    make: Callable[[], dict] | None = None,
    model=None,
    **record,
) -> dict:
    """The model as it is now, evaluated once: ``out`` is read back on a rerun only if it was made
    with the same evaluation settings for the same model form (its key); otherwise re-evaluated.
    ``make``, if given, is called first when the model must be evaluated (it makes the model form;
    the fields it returns join the record)."""
    key, settings = results_key(keys.eval, form)
    kwargs = s.eval.kwargs(s.token_cache, s.model)
    kept: dict = {}  # parts of an earlier evaluation of the same form that these settings leave unchanged
    if out.exists():
        old = read_json_checked(out)
        if old.get("key") == key:
            return old
        kept = reusable_parts(old.get("settings") or {}, settings, old)
        log.info(
            "%s was evaluated with other settings (%s); re-evaluating%s",
            out.name,
            describe_diff(old.get("settings") or {}, settings),
            f" all but its {' and '.join(kept)}" if kept else "",
        )
    if make is not None:
        record = {**record, **make()}
    if "perplexity" in kept:
        kwargs["perplexity_sources"] = []
    if "zero_shot" in kept:
        kwargs["tasks"] = []
    res = evaluate_model(lm.model if model is None else model, lm.tokenizer, **kwargs)
    res.update(kept)
    res.update(model=lm.name, **record, config=keys.config, key=key, settings=settings)
    write_json(out, res)
    return res


def evaluate_uniform_prune(
    lm: LoadedModel,
    pruner,
    prep: Prepared,
    dense_counts: dict,
    s: PipelineSettings,
    keys: RunKeys,
    run_dir: Path,
    model=None,
    always_prune: bool = False,
    fingerprint_only: bool = False,
) -> dict:
    """``uniform_reprune``: the prune recipe's model, the best uniform model of the run's pruner and
    calibration. Every layer is pruned sequentially to the target, its MLP sized after its attention,
    so each layer's real sparsity is the target (:func:`tyr.pruning.uniform.prune_uniform`). ``model``
    (default ``lm.model``, so this is the last use of the dense model) is pruned in place; a rerun with
    the same key reads the results back without pruning, unless ``always_prune`` (the pruned model is
    needed again: its recovery). The record holds the pruned model's fingerprint (its recovery's key).
    ``fingerprint_only``: the recorded results, read back; nothing is pruned or evaluated."""
    from tyr.recovery.trainer import fingerprint

    target = lm.model if model is None else model

    def prune() -> dict:
        rep = prune_uniform(target, pruner, prep.calib, s.target_sparsity, prep.taylor, batch_size=s.batch_size)
        return {
            "budget": real_budget(target, dense_counts),
            "kept": kept_widths(rep["layers"]),
            "fingerprint": fingerprint(target),
        }

    form = {"uniform_prune": keys.supernet, "prepare": keys.prepare.key}
    out = Path(run_dir) / "results_uniform_reprune.json"
    label = f"{lm.name} uniform_reprune {s.target_sparsity:.0%}"
    if fingerprint_only:
        return {label: read_json_checked(out)}
    if always_prune:
        made = prune()
        row = evaluated(out, lm, s, keys, form, lambda: made, allocation="uniform_reprune", model=target)
        if row.get("fingerprint") != made["fingerprint"]:  # an older record, or a model that prunes differently now
            row = {**row, "fingerprint": made["fingerprint"]}
            write_json(out, row)
        return {label: row}
    return {label: evaluated(out, lm, s, keys, form, prune, allocation="uniform_reprune", model=target)}


def uniform_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of the run's ``uniform_reprune`` model, if it was recorded."""
    out = Path(run_dir) / "results_uniform_reprune.json"
    return read_json_checked(out).get("fingerprint") if out.exists() else None


def evaluate_dense(lm: LoadedModel, s: PipelineSettings, keys: RunKeys, run_dir: Path) -> dict:
    """The unpruned model, same protocol: the top row of the table."""
    return {
        f"{lm.name} dense": evaluated(
            Path(run_dir) / "results_dense.json", lm, s, keys, {"model": keys.prepare.settings["model"]}, allocation="dense"
        )
    }


def evaluate_forms(
    lm: LoadedModel,
    forms: dict[str, Form],
    chosen_source: str,
    dense_counts: dict,
    s: PipelineSettings,
    keys: RunKeys,
    run_dir: Path,
) -> tuple[dict, dict]:
    """Each form assembled, summarised and evaluated; ``allocation.json`` is the ``searched`` form's
    summary. Returns the results' rows and the searched form's per-module sparsities."""
    run_dir = Path(run_dir)
    rows, searched_sparsity = {}, {}
    for name, form in forms.items():
        asm = Assembler(lm.model, form.store)
        asm.assemble(form.levels)
        rec = allocation_summary(lm.model, form.store, form.levels, dense_counts, form.fitness)
        if name == "searched":
            rec["source"] = chosen_source  # "reprune" (sequentially re-pruned) or "supernet"
            rec["manifest"] = str(Path(rec["manifest"]).resolve().relative_to(run_dir.resolve()))  # the run dir may move
            write_json(run_dir / ALLOCATION_FILE, rec)
            searched_sparsity = {k: [m["sparsity"] for m in rec["modules"][k]] for k in ("attn", "mlp")}
        supernet = form.store.root.resolve().relative_to(run_dir.resolve())
        rows[f"{lm.name} {name} {s.target_sparsity:.0%}"] = evaluated(
            run_dir / f"results_{name}.json",
            lm,
            s,
            keys,
            form_key(keys.search.key, name, form.levels, supernet),
            allocation=name,
            budget=rec["budget"],
            supernet=str(form.store.root),
        )
        asm.restore_dense()
    return rows, searched_sparsity


def plot_run(run_dir: Path, state: dict, grid: SupernetGrid, searched_sparsity: dict, title: str) -> None:
    """``search_fitness.png`` (the history) and ``allocation.png`` (searched against uniform sparsity: the centre
    of the first iteration's ``grid``)."""
    run_dir = Path(run_dir)
    uniform_sparsity = {k: [g.sparsity(g.centre) for g in grid.modules[k]] for k in ("attn", "mlp")}
    history_file = run_dir / "history.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
    plot_search_history(history, run_dir / "search_fitness.png")
    plot_allocation(searched_sparsity, uniform_sparsity, run_dir / "allocation.png", title)
