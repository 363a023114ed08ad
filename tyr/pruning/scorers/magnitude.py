"""Magnitude: the L2 norm of a unit's weights."""

from __future__ import annotations

from tyr.pruning.scorers.base import Scorer


class Magnitude(Scorer):
    """L2 norm of all of a unit's weights across its coupled projections."""

    def score(self, p):
        return sum(p.unit_sum(W * W, how) for W, how in p.members.values()).sqrt()
