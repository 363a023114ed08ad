"""The torch-free search core: space, level-switch mutation, staged (1 + lambda) evolution."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from tyr.search import Allocation, EvolutionConfig, SearchSpace, Stage, evolve, mutate

ROOT = Path(__file__).resolve().parents[1]
L = 8
N = 9  # levels per module


def equal_step_space(layers: int = L) -> SearchSpace:
    """Equal per-level steps within a type (100 for attn, 250 for mlp); budget = centre cost."""
    return SearchSpace.from_costs(
        {"attn": [[1000 - 100 * k for k in range(N)]] * layers, "mlp": [[3000 - 250 * k for k in range(N)]] * layers}
    )


def uneven_space() -> SearchSpace:
    """Layers of different widths, uneven steps, clipped and ragged grids."""
    rng = np.random.default_rng(123)
    costs: dict[str, list[list[int]]] = {"attn": [], "mlp": []}
    for t, scale in (("attn", 1000), ("mlp", 4000)):
        for l in range(L):
            n = int(rng.integers(2, N + 1))
            steps = rng.integers(0, scale // 10, size=n - 1)  # zero steps = clipped levels
            costs[t].append([int(scale * (1 + l % 3) - s) for s in np.concatenate([[0], np.cumsum(steps)])])
    return SearchSpace.from_costs(costs)


def in_range(space: SearchSpace, a: Allocation) -> bool:
    return all(0 <= k < space.num_levels(t, l) for t in space.types for l, k in enumerate(a.levels[t]))


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def test_no_torch_import():
    code = "import tyr.search, sys; assert 'torch' not in sys.modules, 'tyr.search imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- space ---------------------------------------------------------------------------------------


def test_allocation_is_immutable_hashable_and_round_trips():
    a = Allocation({"mlp": [1, 2], "attn": [3, 4]})
    b = Allocation.from_json(json.loads(json.dumps(a.to_json())))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.levels["attn"][1] == 4
    c = a.with_level("attn", 1, 0)
    assert c.levels["attn"] == (3, 0) and a.levels["attn"] == (3, 4) and c != a
    with pytest.raises(AttributeError):
        a.x = 1
    with pytest.raises(TypeError):
        a.levels["attn"] = (0, 0)


def test_space_helpers():
    sp = equal_step_space()
    assert sp.types == ("attn", "mlp") and sp.num_layers == L and sp.num_levels("mlp", 3) == N
    centre = sp.centre()
    assert all(k == N // 2 for t in sp.types for k in centre.levels[t])
    assert sp.budget == sp.cost(centre) == L * (600 + 2000)
    assert sp.is_feasible(centre) and sp.is_feasible(sp.uniform(N - 1)) and not sp.is_feasible(sp.uniform(0))
    assert not sp.is_feasible(centre.with_level("attn", 0, N))  # out of range
    assert sp.min_cost() == sp.cost(sp.uniform(N - 1)) and sp.max_cost() == sp.cost(sp.uniform(0))


@pytest.mark.parametrize(
    "costs, budget, match",
    [
        ({}, 0, "non-empty"),
        ({"attn": [[3, 2]], "mlp": [[3, 2], [3, 2]]}, 10, "same number of layers"),
        ({"attn": [[3, 4, 1]]}, 10, "non-increasing"),
        ({"attn": [[3, 2, 1]]}, 0, "below the minimum"),
        ({"attn": [[3, -1]]}, 10, "negative"),
        ({"attn": [[]]}, 10, "non-empty list of per-level"),
        ({"attn": [[3.5, 1]]}, 10, "must be an int"),
    ],
)
def test_validate_rejects_bad_input(costs, budget, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(costs, budget)


# ---- mutation ------------------------------------------------------------------------------------


def test_mutation_keeps_cost_exact_with_equal_steps():
    sp = equal_step_space()
    rng = np.random.default_rng(0)
    centre = sp.centre()
    a = centre
    for _ in range(1000):
        child = mutate(sp, centre, rng)
        assert child != centre and in_range(sp, child) and sp.cost(child) == sp.budget
        a = mutate(sp, a, rng)  # a random walk, reaching the ends of the level ranges
        assert in_range(sp, a) and sp.cost(a) == sp.budget
    # the walk did use the boundary levels without leaving them
    assert any(k in (0, N - 1) for t in sp.types for k in a.levels[t])


def test_mutation_flip_count_and_type_weights():
    sp = equal_step_space()
    rng = np.random.default_rng(1)
    centre = sp.centre()
    moved = []
    for _ in range(2000):
        child = mutate(sp, centre, rng, type_weights={"attn": 0.0, "mlp": 1.0})
        assert child.levels["attn"] == centre.levels["attn"]  # zero weight: never switched
        moved.append(sum(abs(k - N // 2) for k in child.levels["mlp"]))
    # each switch moves two levels by one; min(randint(1,4), randint(1,4)) switches, some may cancel
    assert max(moved) <= 8 and min(moved) >= 2
    assert np.mean(moved) > 3  # more than one switch on average (E[flips] = 1.875)
    with pytest.raises(ValueError, match="type_weights"):
        mutate(sp, centre, rng, type_weights={"attn": 1.0})


def test_mutation_stays_within_budget_with_uneven_steps():
    sp = uneven_space()
    rng = np.random.default_rng(2)
    a = sp.centre()
    assert sp.cost(a) == sp.budget
    costs = []
    for _ in range(1000):
        a = mutate(sp, a, rng)
        assert in_range(sp, a) and sp.cost(a) <= sp.budget
        costs.append(sp.cost(a))
    assert len(set(costs)) > 1  # the steps really are uneven


def test_mutation_degenerate_spaces():
    rng = np.random.default_rng(3)
    one_layer = SearchSpace.from_costs({"attn": [list(range(9, 0, -1))], "mlp": [list(range(9, 0, -1))]})
    a = one_layer.centre()
    assert mutate(one_layer, a, rng) is a  # no pair of layers -> no move
    one_level = SearchSpace.from_costs({"attn": [[5]] * 4, "mlp": [[7]] * 4})
    assert mutate(one_level, one_level.centre(), rng) == one_level.centre()
    # attn has 1 level everywhere: only mlp can move
    mixed = SearchSpace.from_costs({"attn": [[5]] * 4, "mlp": [[9, 6, 3]] * 4})
    for _ in range(50):
        child = mutate(mixed, mixed.centre(), rng)
        assert child.levels["attn"] == (0, 0, 0, 0) and child != mixed.centre()
    # ragged grid: some layers have fewer levels
    ragged = SearchSpace.from_costs({"attn": [[4, 3, 2, 1], [4, 3], [4], [4, 3, 2]], "mlp": [[8, 6, 4]] * 4})
    a = ragged.centre()
    for _ in range(300):
        a = mutate(ragged, a, rng)
        assert in_range(ragged, a) and ragged.cost(a) <= ragged.budget


# ---- evolution -----------------------------------------------------------------------------------

# Separable toy problem: loss = sum_{t,l} w[t][l] * level. Switches within a type conserve that type's
# sum of levels (L * 4 = 32), so the optimum puts the four cheapest layers of each type at the most
# pruned level (8) and the four sensitive ones at level 0.
W = {"attn": [1, 10, 2, 20, 3, 30, 4, 40], "mlp": [5, 50, 6, 60, 7, 70, 8, 80]}
OPTIMUM = Allocation({"attn": [8, 0, 8, 0, 8, 0, 8, 0], "mlp": [8, 0, 8, 0, 8, 0, 8, 0]})


def toy_loss(a: Allocation) -> float:
    return float(sum(W[t][l] * k for t in W for l, k in enumerate(a.levels[t])))


def toy_fitness(allocs, stage, num_tokens):
    return [toy_loss(a) for a in allocs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evolution_finds_known_optimum(seed):
    sp = equal_step_space()
    assert sp.cost(OPTIMUM) == sp.budget
    cfg = EvolutionConfig(generations=150, offspring=16, stages=[Stage(1, 1)], seed=seed)
    stop_at_optimum = lambda record, state: Allocation.from_json(record["parent"]) == OPTIMUM  # noqa: E731
    res = evolve(sp, toy_fitness, cfg, on_generation=stop_at_optimum)
    assert res.best == OPTIMUM and res.best_fitness == toy_loss(OPTIMUM)
    assert len(res.history) < 150  # stopped by the callback once the optimum was reached
    assert sp.cost(res.best) == sp.budget
    fits = [r["best_fitness"] for r in res.history]
    assert all(b <= a for a, b in zip(fits, fits[1:]))  # elitism
    json.dumps(res.history), json.dumps(res.state)  # JSON-serialisable


def noisy_fitness(calls):
    """Loss + noise ~ 1/sqrt(tokens); the noise depends on (call, stage, candidate), i.e. every candidate
    in one call shares the same 'tokens' but different calls draw different ones."""

    def fitness(allocs, stage, num_tokens):
        calls.append((stage, num_tokens, list(allocs)))
        seed = len(calls)
        out = []
        for a in allocs:
            h = zlib.crc32(json.dumps([seed, a.to_json()]).encode())
            out.append(toy_loss(a) + 50.0 / np.sqrt(num_tokens) * np.random.default_rng(h).standard_normal())
        return out

    return fitness


def test_staged_selection_counts_tokens_and_elitism():
    sp = equal_step_space()
    stages = [Stage(100, 4), Stage(1000, 2), Stage(10000, 1)]
    calls: list = []
    records: list = []
    cfg = EvolutionConfig(generations=6, offspring=8, stages=stages, seed=1)
    res = evolve(sp, noisy_fitness(calls), cfg, on_generation=lambda r, s: records.append(r))
    assert len(calls) == 6 * 3 and records == res.history
    parent = sp.centre()
    for g, rec in enumerate(res.history):
        gen_calls = calls[3 * g : 3 * g + 3]
        # stage index, token count and candidate count: lambda + parent, then survivors + parent
        assert [(s, n, len(c)) for s, n, c in gen_calls] == [(0, 100, 9), (1, 1000, 5), (2, 10000, 3)]
        assert rec["evaluated"] == [9, 5, 3] and rec["tokens_evaluated"] == 9 * 100 + 5 * 1000 + 3 * 10000
        for _, _, allocs in gen_calls:
            assert allocs[-1] == parent  # the parent is re-entered at every stage, last
        # survivors of stage s are a subset of the candidates of stage s
        assert set(gen_calls[1][2][:-1]) <= set(gen_calls[0][2][:-1])
        assert set(gen_calls[2][2][:-1]) <= set(gen_calls[1][2][:-1])
        # the parent is replaced only by a candidate that beats it in the final stage
        assert rec["best_fitness"] <= rec["parent_fitness"]
        new_parent = Allocation.from_json(rec["parent"])
        assert rec["improved"] == (new_parent != parent)
        parent = new_parent
    assert res.best == parent


def test_elitism_with_deterministic_fitness():
    sp = equal_step_space()
    cfg = EvolutionConfig(generations=15, offspring=6, stages=[(16, 3), (64, 1)], seed=2)
    res = evolve(sp, toy_fitness, cfg)
    fits = [r["parent_fitness"] for r in res.history]
    assert all(b <= a for a, b in zip(fits, fits[1:]))
    assert all(r["best_fitness"] <= r["parent_fitness"] for r in res.history)
    assert res.best_fitness == toy_loss(res.best) < toy_loss(sp.centre())


def test_prescreen_cuts_offspring():
    sp = equal_step_space()
    seen_sizes, stage0 = [], []

    def prescreen(allocs):
        seen_sizes.append(len(allocs))
        return [toy_loss(a) for a in allocs]

    def fitness(allocs, stage, n):
        if stage == 0:
            stage0.append(allocs[:-1])
        return toy_fitness(allocs, stage, n)

    cfg = EvolutionConfig(generations=3, offspring=10, stages=[(8, 2), (32, 1)], prescreen_keep=3, seed=0)
    res = evolve(sp, fitness, cfg, prescreen=prescreen)
    assert seen_sizes == [10, 10, 10] and [len(c) for c in stage0] == [3, 3, 3]
    assert all(r["evaluated"] == [4, 3] and r["prescreened"] == 3 for r in res.history)
    with pytest.raises(ValueError, match="prescreen"):
        evolve(sp, fitness, cfg)  # prescreen_keep without a prescreen function


def test_no_duplicate_evaluations():
    sp = equal_step_space(layers=3)
    evaluated: list[Allocation] = []

    def fitness(allocs, stage, n):
        assert len(set(allocs)) == len(allocs)  # no duplicates within a call (parent included)
        evaluated.extend(allocs[:-1])
        return toy_fitness(allocs, stage, n)

    cfg = EvolutionConfig(generations=20, offspring=12, stages=[(1, 1)], seed=4, max_duplicate_retries=200)
    evolve(sp, fitness, cfg)
    assert len(evaluated) == len(set(evaluated))  # no child is evaluated twice across generations


def test_tiny_space_does_not_loop_forever():
    # 2 layers, attn 3 levels, mlp 1 level: only (0,2), (1,1), (2,0) exist for attn
    sp = SearchSpace.from_costs({"attn": [[3, 2, 1]] * 2, "mlp": [[5]] * 2})
    cfg = EvolutionConfig(generations=5, offspring=8, stages=[(1, 1)], seed=0, max_duplicate_retries=50)
    res = evolve(sp, lambda a, s, n: [float(x.levels["attn"][0]) for x in a], cfg)
    assert len(res.history) == 5
    assert res.history[0]["offspring"] == 2 and all(r["offspring"] == 0 for r in res.history[1:])
    assert res.best == Allocation({"attn": [0, 2], "mlp": [0, 0]})


@pytest.mark.parametrize(
    "costs",
    [
        {"attn": [list(range(9, 0, -1))], "mlp": [list(range(9, 0, -1))]},  # 1 layer
        {"attn": [[5]] * 3, "mlp": [[7]] * 3},  # 1 level everywhere
    ],
)
def test_evolution_on_degenerate_spaces(costs):
    sp = SearchSpace.from_costs(costs)
    res = evolve(sp, toy_fitness, EvolutionConfig(generations=3, offspring=4, stages=[(1, 1)]))
    assert res.best == sp.centre() and res.best_fitness is None
    assert [r["offspring"] for r in res.history] == [0, 0, 0]


def test_determinism_and_resume():
    sp = uneven_space()
    cfg = lambda g: EvolutionConfig(generations=g, offspring=6, stages=[(10, 3), (100, 1)], seed=7)  # noqa: E731
    full = evolve(sp, noisy_fitness([]), cfg(10))
    again = evolve(sp, noisy_fitness([]), cfg(10))
    assert strip_time(full.history) == strip_time(again.history) and full.best == again.best

    # fitness noise depends on the call counter, so the resumed fitness keeps counting where it was
    calls: list = []
    part = evolve(sp, noisy_fitness(calls), cfg(4))
    state = json.loads(json.dumps(part.state))  # as if saved to disk
    assert state["generation"] == 4 and len(state["history"]) == 4
    rest = evolve(sp, noisy_fitness(calls), cfg(10), state=state)
    assert rest.best == full.best and rest.best_fitness == full.best_fitness
    assert strip_time(rest.history) == strip_time(full.history)
    assert json.loads(json.dumps(rest.state))["rng"] == json.loads(json.dumps(full.state))["rng"]

    # checkpoint from the callback, stop early by returning True, then resume
    calls = []
    saved = {}

    def on_gen(record, st):
        saved["state"] = json.loads(json.dumps(st))
        return record["generation"] == 2

    stopped = evolve(sp, noisy_fitness(calls), cfg(10), on_generation=on_gen)
    assert len(stopped.history) == 3 and saved["state"]["generation"] == 3
    resumed = evolve(sp, noisy_fitness(calls), cfg(10), state=saved["state"])
    assert resumed.best == full.best and strip_time(resumed.history) == strip_time(full.history)


def test_evolve_rejects_infeasible_start():
    sp = equal_step_space()
    with pytest.raises(ValueError, match="budget"):
        evolve(sp, toy_fitness, EvolutionConfig(generations=1, offspring=2, stages=[(1, 1)]), start=sp.uniform(0))
    with pytest.raises(ValueError, match="last stage"):
        EvolutionConfig(generations=1, offspring=2, stages=[(1, 2)])
