"""The coarse-to-fine search settings (torch-free). Their defaults are Týr's settings — the one place
they are written: the driver (:mod:`tyr.coarse_to_fine`) and the planner (:mod:`tyr.planner`) take
this dataclass, and the config option ``search=paper`` is registered from it (:mod:`tyr.recipes`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tyr.settings import UnknownSettingError, from_config


@dataclass
class SearchSettings:
    name: str = "paper"
    intervals: list[float] = field(default_factory=lambda: [0.125, 0.0625, 0.03125, 0.015625])  # 4 iterations
    n_levels: int = 9
    min_heads: int = 1
    min_channels: int = 32
    eea: str = "expectation"
    # EEA mode of the last iteration when there are several; None: ``eea``. ``path``: the last supernet's
    # variants are pruned along the previous iteration's best allocation (every layer on the outputs of the
    # already pruned layers of that path), so the last search scores models close to the ones that ship
    final_eea: str | None = None
    # which form of the searched widths is the result when the re-prune ran: ``reprune`` (the sequentially
    # pruned model), ``supernet``, or ``heldout`` (the lower KL on the held-out teacher sequences). ``reprune``
    # since session 6: across forms, C4 KL ranks opposite to WikiText-2 / PTB (docs/journal.md, issue #14)
    choose_form: str = "reprune"  # one of CHOOSE_FORMS
    # what the budget counts (one of BUDGETS): ``real``, the parameters the sliced model keeps (key / value
    # heads whose query group is pruned away are dropped; tyr.supernet.costs), the budget being the target
    # sparsity of the dense prunable parameters and the start fitted to it (tyr.search.budget); ``nominal``,
    # the grid's count (key / value heads a fixed cost), the budget being the grid centre's. ``real`` since
    # session 7: ``nominal`` left SmolLM2-135M's 50 % models 1.3M parameters under the target
    budget: str = "real"
    # where iteration 0's grid is centred (one of STARTS): ``fitted``, the uniform target of every module, the
    # start fitted to the real budget by the supernet's local errors (tyr.supernet.costs); ``recipe``, the
    # widths of the prune recipe's uniform model (tyr.pruning.uniform.uniform_widths: each layer at the
    # target, its MLP sized after its pruned attention), found by one sequential pass before the build
    start: str = "fitted"
    generations: int = 50
    offspring: int = 128
    stages: list[tuple[int, int]] = field(default_factory=lambda: [(2048, 16), (16384, 4), (131072, 1)])  # (tokens, survivors)
    max_flips: int = 4
    prescreen_keep: int | None = None  # surrogate first stage: keep this many offspring (None: off)
    prefix_cache: bool = True
    prefix_cache_max_mb: float = 16384.0
    surrogate_check: int = 64  # evaluate this many random candidates per iteration with both fitnesses
    reprune: bool = True  # re-prune sequentially at the searched widths; keep it if its KL is lower
    holdout: float = 0.25  # fraction of the teacher sequences kept out of the search (the re-prune choice is scored on them)
    topk: int = 8192  # teacher top-k logits kept per position
    seed: int = 0
    batch_size: int = 8  # not a search option: the recipes pass their top-level batch_size


CHOOSE_FORMS = ("reprune", "supernet", "heldout")
BUDGETS = ("real", "nominal")
STARTS = ("fitted", "recipe")
CONFIG_FIELDS = tuple(f.name for f in fields(SearchSettings) if f.name != "batch_size")


def paper_config() -> dict[str, Any]:
    """Týr's settings as a ``search`` config option (the keys of ``conf/search/*.yaml``)."""
    d = asdict(SearchSettings())
    return {k: [list(s) for s in d[k]] if k == "stages" else d[k] for k in CONFIG_FIELDS}


def search_settings(options: Mapping[str, Any], batch_size: int = 8) -> SearchSettings:
    """Typed settings from a ``search`` config option (a plain mapping); unknown keys are an error."""
    unknown = sorted(set(options) - set(CONFIG_FIELDS))
    if unknown:
        raise UnknownSettingError(f"unknown search settings {unknown}; known: {list(CONFIG_FIELDS)}")
    return from_config(SearchSettings, {**options, "batch_size": batch_size}, "search")
