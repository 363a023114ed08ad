"""Coarse-to-fine search (Týr): iterate {build supernet → evolutionary search}, halving the level
interval each time and centring the next grid on the previous best allocation.

One resumable driver. Everything lives under ``run_dir``:
``iter{i}/supernet/`` (shards + manifest), ``search_state.json`` (iteration, evolution state, results
so far; rewritten after every generation), ``history.jsonl`` (one line per generation), and at the
end ``allocation.json``. With ``reprune`` a last stage (``reprune/supernet``) prunes the model once
more at the searched widths, sequentially: every layer on the outputs of the already pruned layers
before it (EEA mode ``path``), instead of on the expectation over a grid of variants. Both models
are scored by KL on the ``holdout`` fraction of teacher sequences that the search never used
(``state["reprune"]``). Which form is the result (``choose_form``: ``reprune`` by default; ``heldout``:
the lower KL) is decided downstream, by :func:`tyr.search_state.final_allocation`, so a changed choice reuses the search.
Killing the driver and calling it again continues where it stopped; with
the same seed it reaches the same allocation.

Distributed (torchrun): every rank runs the same evolution in lock-step (same seed, and the fitness
values are all-reduced so they agree bit for bit); rank 0 alone writes the state and history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tyr import dist
from tyr.artifacts import fault_point, read_json_checked
from tyr.fitness import KLFitness, TeacherCache, spearman, surrogate_scores
from tyr.pruning.local import LocalPruner
from tyr.search import Allocation, EvolutionConfig, SearchSpace, evolve, mutate
from tyr.search.settings import STARTS, SearchSettings
from tyr.search_state import chosen_form, drop_uncommitted, rel_path, resolved
from tyr.supernet.assemble import Assembler
from tyr.supernet.builder import build_supernet
from tyr.supernet.costs import refill, search_costs
from tyr.supernet.grid import SupernetGrid, layer_shapes, make_grid
from tyr.supernet.path import build_path_supernet, keep_counts
from tyr.supernet.store import MANIFEST, SupernetStore
from tyr.utils import JsonlWriter, Progress, write_json

log = logging.getLogger(__name__)


class SearchStateError(ValueError):
    """The run directory's search state was made with other settings (reported without a traceback)."""


def eea_of_iteration(settings: SearchSettings, it: int) -> str:
    """``settings.final_eea`` for the last of several iterations, else ``settings.eea``; in ``path``
    mode the path is the iteration's grid centre, i.e. the previous iteration's best allocation."""
    last = it == len(settings.intervals) - 1 and it > 0
    return settings.final_eea if last and settings.final_eea else settings.eea


def full_kl(
    model,
    store: SupernetStore,
    levels: dict[str, list[int]],
    teacher: TeacherCache,
    batch_size: int,
    sequences: tuple[int, int] | None = None,
) -> float:
    """Mean per-token KL of one allocation over the teacher sequences [start, stop) (default: all;
    no rotation, no cache)."""
    asm = Assembler(model, store)
    try:
        fitness = KLFitness(model, asm, teacher, batch_size, prefix_cache=False, rotate=False, sequences=sequences)
        return fitness([levels], 0, teacher.input_ids.numel())[0]
    finally:
        asm.restore_dense()


def _surrogate_check(space, start, errors, fitness, n, rng, tokens) -> dict:
    cands, a = [], start
    for _ in range(n):
        a = mutate(space, a, rng)
        cands.append(a)
    true = fitness(cands + [start], 0, tokens)[:-1]
    sur = surrogate_scores(errors, cands)
    return {"n": n, "tokens": tokens, "spearman": spearman(sur, true)}


@dataclass
class _Search:
    """What every step of one coarse-to-fine search shares: its inputs, its state file and history."""

    model: torch.nn.Module
    model_id: dict
    pruner: LocalPruner
    calib_ids: torch.Tensor
    taylor: dict | None
    teacher: TeacherCache
    target_sparsity: float
    settings: SearchSettings
    run_dir: Path
    store_config: dict
    state: dict
    history: JsonlWriter
    n_hold: int  # teacher sequences the search never sees (the last ones)

    @property
    def state_file(self) -> Path:
        return self.run_dir / "search_state.json"

    def commit(self) -> None:
        if dist.is_main():
            write_json(self.state_file, self.state)


def run_search(
    model,
    model_id: dict,
    pruner: LocalPruner,
    calib_ids: torch.Tensor,
    taylor: dict | None,
    teacher: TeacherCache,
    target_sparsity: float,
    settings: SearchSettings,
    run_dir: str | Path,
    store_config: dict | None = None,
) -> dict:
    """Run (or resume) the whole coarse-to-fine search; returns the final allocation record."""
    run_dir = Path(run_dir)
    state_file = run_dir / "search_state.json"
    state = read_json_checked(state_file) if state_file.exists() else {"iterations": [], "current": None}
    n_hold = _holdout_sequences(teacher.input_ids.shape[0], settings, state, state_file)
    state["holdout_sequences"] = n_hold
    history = JsonlWriter(run_dir / "history.jsonl")
    if dist.is_main():
        drop_uncommitted(history.path, state)
    ctx = _Search(
        model,
        model_id,
        pruner,
        calib_ids,
        taylor,
        teacher,
        target_sparsity,
        settings,
        run_dir,
        store_config or {},
        state,
        history,
        n_hold,
    )
    centre = _start_centre(model, pruner, calib_ids, taylor, target_sparsity, settings, state, state_file)
    for done in state["iterations"]:
        centre = done["keep"]
    for it, interval in enumerate(settings.intervals):
        if it < len(state["iterations"]):
            continue
        centre = _run_iteration(ctx, it, interval, centre)["keep"]
    if settings.reprune and state.get("reprune") is None and state["iterations"]:
        _reprune(ctx)
    elif settings.reprune and state.get("reprune") and not (run_dir / state["reprune"]["supernet"] / MANIFEST).exists():
        # a finished search carried without its shards (experiments/claim.py carries run states across machines):
        # the re-prune is deterministic, so its store is built again at the recorded widths
        log.info("re-prune: %s is missing; pruning along the searched widths again", state["reprune"]["supernet"])
        _path_store(ctx, state["iterations"][-1])
    return resolved(state, run_dir)


def _holdout_sequences(n: int, settings: SearchSettings, state: dict, state_file: Path) -> int:
    """How many of the ``n`` teacher sequences the search holds out (``settings.holdout``), checked against
    the state of an earlier, interrupted run."""
    if not 0.0 <= settings.holdout < 1.0:
        raise ValueError(f"search.holdout={settings.holdout} must be a fraction in [0, 1)")
    n_hold = max(1, int(round(settings.holdout * n))) if settings.holdout > 0 else 0
    if n_hold >= n:
        raise ValueError(f"search.holdout={settings.holdout} leaves no search sequences (the teacher has {n})")
    if state.get("holdout_sequences", 0) != n_hold and (state["iterations"] or state.get("current")):
        raise SearchStateError(
            f"{state_file}: searched with {state.get('holdout_sequences', 0)} held-out sequences, now "
            f"{n_hold} (search.holdout={settings.holdout}); use another run directory"
        )
    return n_hold


def iteration_grid(model, target_sparsity: float, settings: SearchSettings, interval: float, centre) -> SupernetGrid:
    """The level grid of an iteration with this ``interval``, centred on ``centre`` (None: the uniform target)."""
    s = settings
    return make_grid(layer_shapes(model), target_sparsity, interval, s.n_levels, s.min_heads, s.min_channels, centre=centre)


def first_grid(model, target_sparsity: float, settings: SearchSettings, state: dict) -> SupernetGrid:
    """Iteration 0's grid, from the settings and the state alone (no supernet needed)."""
    centre = (state.get("start") or {}).get("keep") if settings.start == "recipe" else None
    return iteration_grid(model, target_sparsity, settings, settings.intervals[0], centre)


def _iteration_store(ctx: _Search, it: int, interval: float, centre) -> SupernetStore:
    """Iteration ``it``'s supernet: its grid centred on ``centre``, built (or its build resumed) if needed."""
    settings = ctx.settings
    grid = iteration_grid(ctx.model, ctx.target_sparsity, settings, interval, centre)
    eea = eea_of_iteration(settings, it)
    store = SupernetStore.create_or_resume(
        ctx.run_dir / f"iter{it}" / "supernet",
        model=ctx.model_id,
        grid=grid,
        eea=eea,
        config={**ctx.store_config, "iteration": it, "interval": interval},
    )
    if not store.manifest["complete"]:
        log.info("iteration %d: building the supernet (interval %.4f, EEA %s)", it, interval, eea)
        build_supernet(
            ctx.model,
            ctx.pruner,
            ctx.calib_ids,
            grid,
            store,
            eea=eea,
            taylor=ctx.taylor,
            path=grid.centre_levels() if eea == "path" else None,
            batch_size=settings.batch_size,
        )
    return SupernetStore.open(store.root, expect_model=ctx.model_id)


def _run_iteration(ctx: _Search, it: int, interval: float, centre) -> dict:
    """One iteration: the supernet, then the evolution on it (resumed from the state if it was cut);
    appends the iteration's record to the state and returns it."""
    import numpy as np

    settings, state = ctx.settings, ctx.state
    t_it = time.time()
    store = _iteration_store(ctx, it, interval, centre)
    t_build = time.time() - t_it
    asm = Assembler(ctx.model, store)
    errors = store.errors()
    costs, budget, start_levels = search_costs(ctx.model, store, errors, ctx.target_sparsity, settings.budget)
    space = SearchSpace.from_costs(costs, budget=budget)
    start = Allocation(start_levels)
    searched_rows = (0, ctx.teacher.input_ids.shape[0] - ctx.n_hold)
    fitness = KLFitness(
        ctx.model,
        asm,
        ctx.teacher,
        settings.batch_size,
        settings.prefix_cache,
        settings.prefix_cache_max_mb,
        sequences=searched_rows,
    )
    evo = EvolutionConfig(
        generations=settings.generations,
        offspring=settings.offspring,
        stages=list(settings.stages),
        seed=settings.seed + it,
        max_flips=settings.max_flips,
        prescreen_keep=settings.prescreen_keep,
    )
    current = state["current"] if state.get("current") and state["current"]["iteration"] == it else None
    resume = current["evolution"] if current else None
    extra = dict(current.get("extra", {})) if current else {}  # the surrogate check of a killed session
    searched_before = float(current.get("search_seconds", 0.0)) if current else 0.0
    if settings.surrogate_check and resume is None:
        extra["surrogate"] = _surrogate_check(
            space,
            start,
            errors,
            fitness,
            settings.surrogate_check,
            np.random.default_rng(settings.seed + 1000 + it),
            settings.stages[0][0],
        )
        log.info("surrogate rank correlation with KL: %.3f", extra["surrogate"]["spearman"])
    fitness.generation = (resume["generation"] - 1) if resume else -1  # the next stage-0 call is generation 0 / resumed one
    for k, v in (current or {}).get("fitness_stats", {}).items():  # counters of the killed session(s)
        setattr(fitness.stats, k, v)
    t_search = time.time()
    bar = Progress(
        settings.generations,
        f"search iteration {it + 1}/{len(settings.intervals)}: generation",
        initial=resume["generation"] if resume else 0,
        every=10.0,
        enabled=dist.is_main(),
    )

    def on_generation(record: dict, evo_state: dict) -> None:
        record = {
            **record,
            "iteration": it,
            "layer_forwards": fitness.stats.layer_forwards,
            "layer_forwards_saved": fitness.stats.layer_forwards_saved,
        }
        fitness.generation = record["generation"]  # keeps token rotation aligned even if a generation had no stages
        state["current"] = {
            "iteration": it,
            "evolution": evo_state,
            "extra": extra,
            "search_seconds": searched_before + time.time() - t_search,
            "fitness_stats": {k: v for k, v in asdict(fitness.stats).items() if k != "history"},
        }
        if dist.is_main():
            ctx.history.write(**record)
            fault_point("search.generation")
        ctx.commit()
        bar.update(note=f"KL {record['best_fitness']:.4g}" if record["best_fitness"] is not None else "")

    prescreen = (lambda allocs: surrogate_scores(errors, allocs)) if settings.prescreen_keep else None
    result = evolve(space, fitness, evo, start=start, state=resume, on_generation=on_generation, prescreen=prescreen)
    bar.close()
    # level switches with uneven real costs may leave the best under the budget: give the rest back
    best, given_back = refill(costs, errors, result.best.to_json(), budget, settings.budget)
    iteration = {
        "iteration": it,
        "interval": interval,
        "levels": best,
        "keep": keep_counts(store.grid, best),
        "fitness": result.best_fitness,  # the evolution's best, before the levels given back
        "levels_given_back": given_back,
        "budget": space.budget,
        "cost": space.cost(Allocation(best)),
        "supernet": rel_path(store.root, ctx.run_dir),
        "build_seconds": store.manifest.get("build_seconds_total", t_build),
        "search_seconds": searched_before + time.time() - t_search,
        "fitness_stats": {k: v for k, v in asdict(fitness.stats).items() if k != "history"},
        **extra,
    }
    state["iterations"].append(iteration)
    state["current"] = None
    ctx.commit()
    asm.restore_dense()
    log.info(
        "iteration %d done: KL %.4f, cost %d / budget %d",
        it,
        result.best_fitness or float("nan"),
        iteration["cost"],
        space.budget,
    )
    return iteration


def _reprune(ctx: _Search) -> None:
    """The sequential re-prune at the last iteration's widths, and both forms' KL on the held-out sequences."""
    state, settings, n_hold = ctx.state, ctx.settings, ctx.n_hold
    N = ctx.teacher.input_ids.shape[0]
    final = state["iterations"][-1]
    t0 = time.time()
    path_store = _path_store(ctx, final)
    # Scored on the held-out sequences: the search has selected the allocation for its supernet
    # variants on the others, so their KL flatters the supernet form.
    rows = (N - n_hold, N) if n_hold else (0, N)
    if not n_hold:
        log.warning(
            "search.holdout=0: the re-prune choice is scored on the tokens the search selected on "
            "(biased towards the supernet form)"
        )
    searched_store = SupernetStore.open(ctx.run_dir / final["supernet"], expect_model=ctx.model_id)
    kl_searched = full_kl(ctx.model, searched_store, final["levels"], ctx.teacher, settings.batch_size, rows)
    kl_reprune = full_kl(ctx.model, path_store, path_store.grid.centre_levels(), ctx.teacher, settings.batch_size, rows)
    n_tok = (rows[1] - rows[0]) * (ctx.teacher.input_ids.shape[1] - 1)
    state["reprune"] = {
        "supernet": rel_path(path_store.root, ctx.run_dir),
        "levels": path_store.grid.centre_levels(),
        "kl_sequences": list(rows),
        "kl_tokens": n_tok,
        "kl_supernet": kl_searched,
        "kl_reprune": kl_reprune,
        "seconds": time.time() - t0,
    }
    ctx.commit()
    log.info(
        "sequential re-prune at the searched widths: KL %.4f vs %.4f from the supernet (%d %s tokens); "
        "choose_form=%s keeps the %s model",
        kl_reprune,
        kl_searched,
        n_tok,
        "held-out" if n_hold else "search",
        settings.choose_form,
        chosen_form(state["reprune"], settings.choose_form),
    )


def _path_store(ctx: _Search, final: dict) -> SupernetStore:
    """The re-prune's one-level supernet along the last iteration's widths (built, resumed or opened)."""
    return build_path_supernet(
        ctx.model,
        ctx.model_id,
        ctx.pruner,
        ctx.calib_ids,
        ctx.taylor,
        final["keep"],
        ctx.run_dir / "reprune" / "supernet",
        ctx.settings,
        {**ctx.store_config, "reprune_of_iteration": final["iteration"]},
    )


def _start_centre(
    model, pruner, calib_ids, taylor, target_sparsity: float, settings: SearchSettings, state: dict, state_file: Path
):
    """Iteration 0's grid centre: None (:func:`make_grid`'s uniform target) for ``start=fitted``; for
    ``start=recipe`` the prune recipe's widths, found once and kept in the state (``state["start"]``)."""
    if settings.start == "fitted":
        return None
    if settings.start != "recipe":
        raise ValueError(f"search.start={settings.start} must be one of {', '.join(STARTS)}")
    if state.get("start") is None:
        from tyr.pruning.uniform import uniform_widths

        t0 = time.time()
        keep = uniform_widths(model, pruner, calib_ids, target_sparsity, taylor, batch_size=settings.batch_size)
        state["start"] = {"rule": "recipe", "keep": keep, "seconds": time.time() - t0}
        if dist.is_main():
            write_json(state_file, state)
        log.info("start: the prune recipe's widths (%d heads, %d channels kept)", sum(keep["attn"]), sum(keep["mlp"]))
    return state["start"]["keep"]
