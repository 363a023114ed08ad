"""(1 + lambda) elitist evolution with staged (multi-fidelity) selection, as in EvoPress / Tyr.

One generation:
  1. Draw ``offspring`` distinct children of the parent with :func:`mutate` (children equal to any
     allocation proposed before, or to each other, are redrawn; at most ``max_duplicate_retries``
     redraws per generation, after which the generation goes on with fewer children).
  2. Optionally rank them with a zero-cost ``prescreen`` surrogate and keep the best ``prescreen_keep``.
  3. For each stage s: evaluate the remaining children **and the parent** with
     ``fitness(allocs, s, stage.num_tokens)`` (one batch call; the parent is the last element). Lower is
     better. The best ``stage.survivors`` children go on to the next stage; the parent is re-entered at
     every stage and does **not** count towards ``survivors``. So stage s evaluates ``n_s + 1``
     candidates with ``n_0 = offspring`` (or ``prescreen_keep``) and ``n_{s+1} = min(survivors_s, n_s)``.
  4. The final stage must have ``survivors == 1``: its best child replaces the parent only if its
     fitness is strictly lower than the parent's in that same call (same tokens); ties keep the parent.

Determinism and checkpoints: all randomness comes from one ``numpy.random.Generator`` seeded with
``config.seed``. After every generation a JSON-serialisable ``state`` dict is built (see
:func:`evolve`); it is passed to ``on_generation(record, state)`` and returned in
:class:`EvolutionResult`. Saving it (e.g. with ``tyr.utils.write_json``) and passing it back as
``evolve(..., state=saved)`` continues the run exactly as if it had not been interrupted, provided the
fitness gives the same values for the same calls. ``fitness`` is not told the generation index; a
caller that draws fresh tokens per generation should count generations itself, starting from
``state["generation"]`` on resume.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from tyr.search.space import Allocation, SearchSpace, _type_weights, mutate

log = logging.getLogger("tyr.search")

STATE_VERSION = 1

Fitness = Callable[[list[Allocation], int, int], Sequence[float]]
Prescreen = Callable[[list[Allocation]], Sequence[float]]
OnGeneration = Callable[[dict[str, Any], dict[str, Any]], "bool | None"]


@dataclass(frozen=True)
class Stage:
    """A selection stage: evaluate every remaining candidate on ``num_tokens`` tokens, keep the best
    ``survivors`` children (the parent is re-entered on top of them)."""

    num_tokens: int
    survivors: int


@dataclass
class EvolutionConfig:
    generations: int  # total generations of the run (a resumed run continues up to this number)
    offspring: int  # lambda: children drawn per generation
    stages: list[Stage]  # Stage objects or (num_tokens, survivors) pairs; the last must keep 1
    seed: int = 0
    max_flips: int = 4  # a mutation applies min(randint(1, max_flips), randint(1, max_flips)) switches
    prescreen_keep: int | None = None  # keep this many children after the prescreen (None: no prescreen)
    max_duplicate_retries: int = 1000  # redraws of duplicate children allowed per generation
    type_weights: dict[str, float] | None = None  # probability weights of the module types in a switch
    progress: bool = False  # tqdm bar over generations

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(*s) for s in self.stages]
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.offspring < 1:
            raise ValueError(f"offspring must be >= 1, got {self.offspring}")
        if not self.stages:
            raise ValueError("at least one selection stage is needed")
        for i, s in enumerate(self.stages):
            if s.num_tokens < 1 or s.survivors < 1:
                raise ValueError(f"stage {i}: num_tokens and survivors must be >= 1, got {s}")
        if self.stages[-1].survivors != 1:
            raise ValueError(f"the last stage must keep exactly 1 survivor (the next parent), got {self.stages[-1]}")
        if self.max_flips < 1:
            raise ValueError(f"max_flips must be >= 1, got {self.max_flips}")
        if self.prescreen_keep is not None and self.prescreen_keep < 1:
            raise ValueError(f"prescreen_keep must be >= 1 or None, got {self.prescreen_keep}")
        if self.max_duplicate_retries < 0:
            raise ValueError(f"max_duplicate_retries must be >= 0, got {self.max_duplicate_retries}")

    def to_json(self) -> dict[str, Any]:
        return {
            "offspring": self.offspring,
            "stages": [[s.num_tokens, s.survivors] for s in self.stages],
            "seed": self.seed,
            "max_flips": self.max_flips,
            "prescreen_keep": self.prescreen_keep,
            "max_duplicate_retries": self.max_duplicate_retries,
            "type_weights": self.type_weights,
        }


@dataclass
class EvolutionResult:
    best: Allocation  # the final parent
    best_fitness: float | None  # its fitness in the last generation's final stage (None: no generation ran)
    history: list[dict[str, Any]]  # one record per generation (the same records on_generation saw)
    state: dict[str, Any] = field(repr=False)  # JSON-serialisable; pass back as evolve(..., state=...)


def _scores(values: Sequence[float], n: int, what: str) -> np.ndarray:
    out = np.asarray([float(v) for v in values], dtype=np.float64)
    if out.shape != (n,):
        raise ValueError(f"{what} returned {out.shape[0] if out.ndim == 1 else out.shape} values for {n} candidates")
    if np.isnan(out).any():
        log.warning("%s returned NaN for %d candidate(s); treating as +inf", what, int(np.isnan(out).sum()))
        out = np.where(np.isnan(out), np.inf, out)
    return out


def _offspring(
    space: SearchSpace, parent: Allocation, rng: np.random.Generator, config: EvolutionConfig, seen: dict[tuple[int, ...], None]
) -> list[Allocation]:
    """Up to ``config.offspring`` children, none proposed before; every child is added to ``seen``."""
    children: list[Allocation] = []
    rejected = 0
    while len(children) < config.offspring:
        child = mutate(space, parent, rng, config.max_flips, config.type_weights)
        if child == parent:  # no switch exists at all
            log.warning("no level switch is possible from the parent; the search space is exhausted")
            break
        key = child.flat()
        if key in seen:
            rejected += 1
            if rejected > config.max_duplicate_retries:
                log.warning(
                    "only %d distinct new children after %d duplicate redraws (wanted %d)",
                    len(children),
                    rejected - 1,
                    config.offspring,
                )
                break
            continue
        seen[key] = None
        children.append(child)
    return children


def evolve(
    space: SearchSpace,
    fitness: Fitness,
    config: EvolutionConfig,
    start: Allocation | None = None,
    state: dict[str, Any] | None = None,
    on_generation: OnGeneration | None = None,
    prescreen: Prescreen | None = None,
) -> EvolutionResult:
    """Run (or continue) the (1 + lambda) elitist evolution; see the module docstring.

    ``start``: the first parent (default: ``space.centre()``); must be feasible. Ignored if ``state``
    is given. ``state``: a state dict from a previous run (``EvolutionResult.state`` or the second
    argument of ``on_generation``), possibly after a JSON round trip; the run continues from it until
    ``config.generations`` generations are done in total. ``on_generation(record, state)`` is called
    after each generation; returning True stops the run after that generation.
    ``prescreen(children) -> scores``: used when ``config.prescreen_keep`` is set.

    State format (``version`` 1): ``generation`` (completed generations), ``parent`` (allocation JSON),
    ``parent_fitness`` (float or None), ``rng`` (``rng.bit_generator.state``), ``seen`` (every
    allocation proposed so far, as ``Allocation.flat()`` lists, in order), ``history`` (all records),
    ``config`` (``EvolutionConfig.to_json()``, checked on resume).
    """
    if config.prescreen_keep is not None and prescreen is None:
        raise ValueError("config.prescreen_keep is set but no prescreen function was given")
    if prescreen is not None and config.prescreen_keep is None:
        log.warning("a prescreen function was given but config.prescreen_keep is None; it will not be used")
    _type_weights(space, config.type_weights)  # validate early

    rng = np.random.default_rng(config.seed)
    if state is not None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported evolution state version {state.get('version')!r}")
        if state.get("config") != config.to_json():
            log.warning("resuming with a different config: saved %s, now %s", state.get("config"), config.to_json())
        parent = Allocation.from_json(state["parent"])
        parent_fitness = None if state["parent_fitness"] is None else float(state["parent_fitness"])
        rng.bit_generator.state = state["rng"]
        seen = {tuple(int(k) for k in key): None for key in state["seen"]}
        history = list(state["history"])
        gen = int(state["generation"])
        log.info("resuming evolution at generation %d (parent fitness %s)", gen, parent_fitness)
    else:
        parent = space.centre() if start is None else start
        parent_fitness = None
        seen = {}
        history = []
        gen = 0
    err = space.check(parent)
    if err:
        raise ValueError(f"start allocation does not fit the space: {err}")
    if not space.is_feasible(parent):
        raise ValueError(f"start allocation costs {space.cost(parent)} > budget {space.budget}; pass a feasible start")
    seen.setdefault(parent.flat(), None)

    def snapshot() -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "generation": gen,
            "parent": parent.to_json(),
            "parent_fitness": parent_fitness,
            "rng": rng.bit_generator.state,
            "seen": [list(key) for key in seen],
            "history": list(history),
            "config": config.to_json(),
        }

    bar = tqdm(total=config.generations, initial=gen, desc="evolution", disable=not config.progress, leave=False)
    try:
        while gen < config.generations:
            t0 = time.perf_counter()
            children = _offspring(space, parent, rng, config, seen)
            n_children = len(children)
            prescreened = None
            if prescreen is not None and config.prescreen_keep is not None and len(children) > config.prescreen_keep:
                scores = _scores(prescreen(list(children)), len(children), "prescreen")
                order = np.argsort(scores, kind="stable")[: config.prescreen_keep]
                children = [children[i] for i in order]
                prescreened = len(children)

            stages: list[dict[str, Any]] = []
            incoming_fitness = parent_fitness
            if children:
                for s, stage in enumerate(config.stages):
                    pool = children + [parent]
                    values = _scores(fitness(list(pool), s, stage.num_tokens), len(pool), "fitness")
                    child_values, parent_value = values[:-1], float(values[-1])
                    order = np.argsort(child_values, kind="stable")
                    stages.append(
                        {
                            "num_tokens": stage.num_tokens,
                            "candidates": len(pool),
                            "parent_fitness": parent_value,
                            "best_child_fitness": float(child_values[order[0]]),
                        }
                    )
                    if s < len(config.stages) - 1:
                        children = [children[i] for i in order[: stage.survivors]]
                    else:
                        incoming_fitness = parent_value
                        best = int(order[0])
                        if child_values[best] < parent_value:
                            parent, parent_fitness = children[best], float(child_values[best])
                        else:
                            parent_fitness = parent_value
            improved = bool(stages) and parent_fitness < incoming_fitness
            gen += 1
            record = {
                "generation": gen - 1,
                "parent_fitness": incoming_fitness,
                "best_fitness": parent_fitness,
                "improved": improved,
                "offspring": n_children,
                "prescreened": prescreened,
                "evaluated": [st["candidates"] for st in stages],
                "tokens_evaluated": sum(st["candidates"] * st["num_tokens"] for st in stages),
                "stages": stages,
                "time_s": round(time.perf_counter() - t0, 6),
                "parent": parent.to_json(),
                "cost": space.cost(parent),
            }
            history.append(record)
            log.info(
                "generation %d: parent %s -> best %s%s, %d children, evaluated %s, %.2fs",
                record["generation"],
                _fmt(incoming_fitness),
                _fmt(parent_fitness),
                " (improved)" if improved else "",
                n_children,
                record["evaluated"],
                record["time_s"],
            )
            bar.update(1)
            if parent_fitness is not None:
                bar.set_postfix(fitness=f"{parent_fitness:.4g}")
            if on_generation is not None and on_generation(record, snapshot()):
                log.info("stopped by on_generation after generation %d", gen - 1)
                break
    finally:
        bar.close()
    return EvolutionResult(best=parent, best_fitness=parent_fitness, history=history, state=snapshot())


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.6g}"
