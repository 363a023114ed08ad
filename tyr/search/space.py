"""The search space: per-module pruning levels, their parameter costs, and the level-switch mutation.

Conventions
-----------
* A model has L decoder layers; each layer has one module per *type* (normally "attn" and "mlp").
* Module (t, l) has ``n = num_levels(t, l)`` candidate levels ``0 .. n-1``. **Level 0 is the least
  pruned** (most parameters kept) and **level n-1 the most pruned** (fewest kept). ``costs[t][l][k]``
  is the number of parameters module (t, l) keeps at level k, so it is non-increasing in k.
* An allocation is one level per module. The total cost of an allocation is the sum of its module
  costs; it is feasible when every level is in range and the total is ``<= budget``.
* A *level switch* picks one type t and two different layers i != j, moves i one level towards more
  pruning (k -> k+1) and j one level towards less pruning (k -> k-1). When the per-level cost steps
  of type t are equal across layers, the total cost is unchanged. When they are not (clipped grids,
  layers of different widths, uneven steps), a switch is only allowed if the total after it is still
  ``<= budget``; the search can then drift below the budget but never above it.

Only numpy and the standard library are used here (no torch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

log = logging.getLogger("tyr.search")


class Allocation:
    """One level per module: ``alloc.levels[t][l]`` is the level of module (t, l).

    Immutable and hashable (two allocations are equal when they have the same types and levels), so
    allocations can be put in sets to reject duplicates. Types are kept sorted by name internally.
    """

    __slots__ = ("_levels", "_key", "_hash")

    def __init__(self, levels: Mapping[str, Sequence[int]]):
        items = tuple(sorted((str(t), tuple(int(k) for k in ks)) for t, ks in levels.items()))
        object.__setattr__(self, "_levels", MappingProxyType(dict(items)))
        object.__setattr__(self, "_key", items)
        object.__setattr__(self, "_hash", hash(items))

    @property
    def levels(self) -> Mapping[str, tuple[int, ...]]:
        """Read-only mapping type -> tuple of per-layer levels."""
        return self._levels

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self._key)

    def flat(self) -> tuple[int, ...]:
        """All levels in one tuple (types in sorted order, then layers): a compact key for a space."""
        return tuple(k for _, ks in self._key for k in ks)

    def with_level(self, t: str, l: int, k: int) -> Allocation:
        """A copy with module (t, l) at level k (no range check; see SearchSpace.is_feasible)."""
        if t not in self._levels:
            raise KeyError(f"unknown module type {t!r}; have {list(self._levels)}")
        ks = list(self._levels[t])
        ks[l] = int(k)
        return Allocation({**self._levels, t: ks})

    def to_json(self) -> dict[str, list[int]]:
        return {t: list(ks) for t, ks in self._key}

    @classmethod
    def from_json(cls, obj: Mapping[str, Sequence[int]]) -> Allocation:
        return cls(obj)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Allocation is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Allocation) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):  # picklable / deep-copyable despite the mapping proxy
        return (Allocation, (self.to_json(),))

    def __repr__(self) -> str:
        return "Allocation(" + ", ".join(f"{t}={list(ks)}" for t, ks in self._key) + ")"


@dataclass(frozen=True)
class SearchSpace:
    """Per-module level costs and a global parameter budget.

    ``costs[t][l][k]``: parameters kept by module (t, l) at level k (level 0 = least pruned).
    ``budget``: the largest allowed total of kept parameters. Validated on construction.
    """

    costs: dict[str, list[list[int]]]
    budget: int
    _arr: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)
    _nlev: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()
        costs = {t: [[int(c) for c in layer] for layer in layers] for t, layers in self.costs.items()}
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "budget", int(self.budget))
        arr, nlev = {}, {}
        for t, layers in costs.items():
            n = np.array([len(layer) for layer in layers], dtype=np.int64)
            a = np.zeros((len(layers), int(n.max())), dtype=np.int64)
            for l, layer in enumerate(layers):
                a[l, : len(layer)] = layer
                a[l, len(layer) :] = layer[-1]  # padding, never read for a valid level
            arr[t], nlev[t] = a, n
        object.__setattr__(self, "_arr", arr)
        object.__setattr__(self, "_nlev", nlev)

    @classmethod
    def from_costs(cls, costs: Mapping[str, Sequence[Sequence[int]]], budget: int | None = None) -> SearchSpace:
        """A space whose budget defaults to the cost of the centre allocation."""
        costs = {t: [list(layer) for layer in layers] for t, layers in costs.items()}
        if budget is None:
            _validate_costs(costs)
            budget = sum(layer[len(layer) // 2] for layers in costs.values() for layer in layers)
        return cls(costs, int(budget))

    def validate(self) -> None:
        """Raise ValueError with a clear message if the costs or budget are inconsistent."""
        _validate_costs(self.costs)
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, np.integer)):
            raise ValueError(f"budget must be an int (kept parameters), got {type(self.budget).__name__}")
        lo = sum(int(layer[-1]) for layers in self.costs.values() for layer in layers)
        if self.budget < lo:
            raise ValueError(
                f"budget {self.budget} is below the minimum achievable cost {lo} (every module at its most pruned level)"
            )

    # ---- shape helpers ----------------------------------------------------------------------------

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.costs)

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.costs.values())))

    def num_levels(self, t: str, l: int) -> int:
        return len(self.costs[t][l])

    def min_cost(self) -> int:
        return sum(layer[-1] for layers in self.costs.values() for layer in layers)

    def max_cost(self) -> int:
        return sum(layer[0] for layers in self.costs.values() for layer in layers)

    # ---- allocations ------------------------------------------------------------------------------

    def check(self, alloc: Allocation) -> str | None:
        """None if ``alloc`` fits this space's shape and level ranges, else the reason it does not."""
        if set(alloc.levels) != set(self.costs):
            return f"allocation types {sorted(alloc.levels)} != space types {sorted(self.costs)}"
        for t, layers in self.costs.items():
            ks = alloc.levels[t]
            if len(ks) != len(layers):
                return f"type {t!r}: {len(ks)} layers in allocation, {len(layers)} in space"
            for l, (k, layer) in enumerate(zip(ks, layers)):
                if not 0 <= k < len(layer):
                    return f"module ({t!r}, layer {l}): level {k} out of range 0..{len(layer) - 1}"
        return None

    def cost(self, alloc: Allocation) -> int:
        """Total kept parameters of ``alloc``."""
        err = self.check(alloc)
        if err:
            raise ValueError(err)
        return sum(self.costs[t][l][k] for t, ks in alloc.levels.items() for l, k in enumerate(ks))

    def is_feasible(self, alloc: Allocation) -> bool:
        return self.check(alloc) is None and self.cost(alloc) <= self.budget

    def centre(self) -> Allocation:
        """Every module at its centre level ``num_levels // 2``."""
        return Allocation({t: [len(layer) // 2 for layer in layers] for t, layers in self.costs.items()})

    def uniform(self, level: int) -> Allocation:
        """Every module at ``level``, clipped to each module's last level (for ragged grids)."""
        if level < 0:
            raise ValueError(f"level must be >= 0, got {level}")
        return Allocation({t: [min(level, len(layer) - 1) for layer in layers] for t, layers in self.costs.items()})


def _validate_costs(costs: Any) -> None:
    if not isinstance(costs, Mapping) or not costs:
        raise ValueError("costs must be a non-empty dict: type -> per-layer list of per-level costs")
    n_layers: dict[str, int] = {}
    for t, layers in costs.items():
        if not isinstance(t, str):
            raise ValueError(f"module type names must be strings, got {t!r}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise ValueError(f"costs[{t!r}] must be a non-empty list of layers")
        n_layers[t] = len(layers)
        for l, layer in enumerate(layers):
            if isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence) or len(layer) == 0:
                raise ValueError(f"costs[{t!r}][{l}] must be a non-empty list of per-level costs")
            for k, c in enumerate(layer):
                if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                    raise ValueError(f"costs[{t!r}][{l}][{k}] must be an int, got {c!r}")
                if c < 0:
                    raise ValueError(f"costs[{t!r}][{l}][{k}] = {c} is negative")
            for k in range(len(layer) - 1):
                if layer[k + 1] > layer[k]:
                    raise ValueError(
                        f"costs[{t!r}][{l}] is not non-increasing at level {k}->{k + 1} "
                        f"({layer[k]} -> {layer[k + 1]}); level 0 must be the least pruned (most parameters)"
                    )
    if len(set(n_layers.values())) > 1:
        raise ValueError(f"all module types must have the same number of layers, got {n_layers}")


# ---- mutation ---------------------------------------------------------------------------------------


def _switch_moves(space: SearchSpace, t: str, lv: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feasible level switches for type t: a boolean (L, L) matrix ok[i, j] (i pruned more, j less)
    and the cost change of each half-move."""
    a, n = space._arr[t], space._nlev[t]
    idx = np.arange(len(lv))
    down = lv < n - 1  # can go one level towards more pruning
    up = lv > 0  # can go one level towards less pruning
    d_down = np.where(down, a[idx, np.minimum(lv + 1, n - 1)] - a[idx, lv], 0)
    d_up = np.where(up, a[idx, np.maximum(lv - 1, 0)] - a[idx, lv], 0)
    ok = down[:, None] & up[None, :] & (total + d_down[:, None] + d_up[None, :] <= space.budget)
    np.fill_diagonal(ok, False)
    return ok, d_down, d_up


def _type_weights(space: SearchSpace, type_weights: Mapping[str, float] | None) -> dict[str, float]:
    if type_weights is None:
        return {t: 1.0 for t in space.types}
    if set(type_weights) != set(space.types):
        raise ValueError(f"type_weights must give a weight for exactly the types {list(space.types)}, got {list(type_weights)}")
    w = {t: float(type_weights[t]) for t in space.types}
    if any(not np.isfinite(v) or v < 0 for v in w.values()):
        raise ValueError(f"type_weights must be finite and >= 0, got {w}")
    return w


def mutate(
    space: SearchSpace,
    alloc: Allocation,
    rng: np.random.Generator,
    max_flips: int = 4,
    type_weights: Mapping[str, float] | None = None,
) -> Allocation:
    """Apply ``min(randint(1, max_flips), randint(1, max_flips))`` level switches to ``alloc``.

    Each switch picks a type with probability proportional to ``type_weights`` (among types that have
    a feasible switch), then a feasible (i, j) pair uniformly. The result is always feasible and, when
    any switch exists, different from ``alloc`` (if the flips cancel out, the draw is repeated, and as
    a last resort a single switch is applied). If no switch exists, ``alloc`` itself is returned.
    """
    if max_flips < 1:
        raise ValueError(f"max_flips must be >= 1, got {max_flips}")
    total = space.cost(alloc)  # also checks shape and ranges
    if total > space.budget:
        raise ValueError(f"cannot mutate an infeasible allocation: cost {total} > budget {space.budget}")
    weights = _type_weights(space, type_weights)
    types = space.types
    base = {t: np.asarray(alloc.levels[t], dtype=np.int64) for t in types}
    attempts = 8
    for attempt in range(attempts):
        if attempt == attempts - 1:
            n_flips = 1
        else:
            n_flips = int(min(rng.integers(1, max_flips + 1), rng.integers(1, max_flips + 1)))
        lv = {t: base[t].copy() for t in types}
        cur = total
        for _ in range(n_flips):
            moves = {t: _switch_moves(space, t, lv[t], cur) for t in types}
            avail = [t for t in types if weights[t] > 0 and moves[t][0].any()]
            if not avail:
                break
            p = np.array([weights[t] for t in avail])
            t = avail[int(rng.choice(len(avail), p=p / p.sum()))] if len(avail) > 1 else avail[0]
            ok, d_down, d_up = moves[t]
            cand = np.flatnonzero(ok)
            i, j = divmod(int(cand[rng.integers(len(cand))]), ok.shape[1])
            lv[t][i] += 1
            lv[t][j] -= 1
            cur += int(d_down[i] + d_up[j])
        if any(not np.array_equal(lv[t], base[t]) for t in types):
            child = Allocation({t: lv[t].tolist() for t in types})
            assert cur == space.cost(child) <= space.budget
            return child
        if n_flips == 1 or not avail:  # a single switch always changes the allocation: none exists
            break
    return alloc
