"""The scorer interface and the nested top-k selection every ranking scorer uses."""

from __future__ import annotations

import torch

from tyr.pruning.problem import ModuleProblem


class Scorer:
    """Base: rank units by ``score`` (higher = more important) and keep the top ones."""

    needs_gradients = False

    def score(self, problem: ModuleProblem) -> torch.Tensor:
        raise NotImplementedError

    def select(self, problem: ModuleProblem, keep_counts: list[int], probe: int | None = None) -> tuple[list[list[int]], dict]:
        """Nested kept sets for ``keep_counts``; ``probe`` is the count that matters most (the
        supernet's centre level), used by scorers that calibrate themselves on one count."""
        return nested_top(self.score(problem), keep_counts), {}


def nested_top(scores: torch.Tensor, keep_counts: list[int]) -> list[list[int]]:
    """Top-k units by score for every k (ties broken by lower index): nested by construction."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [sorted(order[:k]) for k in keep_counts]


def probe_count(keep_counts: list[int], n_units: int) -> int:
    """The middle of the counts that remove something (the default probe of calibrating scorers)."""
    inner = sorted(k for k in keep_counts if 0 < k < n_units)
    return inner[len(inner) // 2] if inner else max(1, n_units // 2)
