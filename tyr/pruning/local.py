"""The local pruner: a scorer chooses the kept units, then the output projection is rebuilt."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from tyr.pruning.problem import ModuleProblem, Variant
from tyr.pruning.reconstruction import compensating_bias, refit, relative_error
from tyr.pruning.scorers.base import Scorer

log = logging.getLogger(__name__)

RECONSTRUCTIONS = ("none", "lstsq")


@dataclass
class LocalPruner:
    """``scorer`` picks units; ``reconstruction='lstsq'`` refits the kept output-projection columns
    against the dense output (``'none'`` keeps them as they are); ``bias`` adds a compensating bias
    (FLAP: the removed columns at the mean input, or jointly refit with the columns under lstsq)."""

    scorer: Scorer
    reconstruction: str = "lstsq"
    bias: bool = False
    damp: float = 0.001
    name: str = ""

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}")

    @property
    def needs_gradients(self) -> bool:
        return self.scorer.needs_gradients

    def prune(
        self, problem: ModuleProblem, keep_counts: list[int], centre: int | None = None, only: Iterable[int] | None = None
    ) -> list[Variant | None]:
        """One variant per requested number of kept units (nested kept sets). ``centre`` indexes the
        count that matters most (default: the middle one). With ``only``, the kept sets are chosen
        for all counts but only the variants at those indices are built (the others are None):
        distributed builds spread the refits over ranks this way."""
        bad = [k for k in keep_counts if not 0 <= k <= problem.n_units]
        if bad:
            raise ValueError(f"keep counts {bad} out of range 0..{problem.n_units} ({problem.kind}, layer {problem.layer})")
        probe = keep_counts[len(keep_counts) // 2 if centre is None else centre]
        kept_sets, info = self.scorer.select(problem, list(keep_counts), probe=probe)
        only = None if only is None else set(only)
        out: list[Variant | None] = []
        for i, keep in enumerate(kept_sets):
            if only is not None and i not in only:
                out.append(None)
                continue
            W = problem.out_weight[:, problem.columns(keep)].contiguous()
            if len(keep) == problem.n_units:  # nothing removed: the dense module, exactly
                out.append(Variant(keep, W, None, 0.0, dict(info)))
                continue
            b = compensating_bias(problem, keep) if self.bias else None
            err = relative_error(problem, keep, W, b)
            v_info = dict(info, err_unrefit=err)
            if self.reconstruction == "lstsq":
                W_r, b_r = refit(problem, keep, bias=self.bias, damp=self.damp)
                err_r = relative_error(problem, keep, W_r, b_r)
                # The damped solve can in principle lose to the plain slice; never accept that.
                if err_r <= err:
                    W, b, err = W_r, b_r, err_r
                else:
                    v_info["refit_rejected"] = True
            out.append(Variant(keep, W, b, err, v_info))
        return out
