"""The model forms the evaluate stage scores, each an allocation in a supernet: the searched widths
(``searched``) and the comparisons of ``compare``:

- ``searched_other``: the searched widths in the form that lost the re-prune choice
  (``searched_supernet`` or ``searched_reprune``), when the re-prune ran;

- ``uniform``: every module at the first iteration's centre level;
- ``uniform_reprune`` is not a form of a supernet: the prune recipe's model, evaluated last
  (:func:`tyr.pipeline.evaluate.evaluate_uniform_prune`);
- ``owl``: outlier-weighted layer sparsities (``owl.json``, keyed by the search key) at the nearest
  levels of the first iteration's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tyr.allocation import nearest_levels, outlier_ratios, owl_sparsities
from tyr.artifacts import read_json_checked
from tyr.models import LoadedModel
from tyr.pipeline.prepare import Prepared
from tyr.pipeline.settings import PipelineSettings, RunKeys
from tyr.search_state import search_forms
from tyr.supernet.grid import SupernetGrid
from tyr.supernet.store import SupernetStore
from tyr.utils import write_json

OWL_FILE = "owl.json"


@dataclass
class Form:
    """An allocation to assemble: ``levels`` in ``store``; ``fitness`` the search's KL, if it has one."""

    store: SupernetStore
    levels: dict
    fitness: float | None = None


def first_store(state: dict, model: dict) -> SupernetStore:
    return SupernetStore.open(state["iterations"][0]["supernet"], expect_model=model)


def searched_forms(state: dict, model: dict, chosen: str, other: bool = True) -> dict[str, Form]:
    """``searched`` (the ``chosen`` form, :func:`~tyr.search_state.final_allocation`'s ``source``)
    first, then (``other``) the other form of the same widths, if the re-prune ran."""
    out = {}
    for source, form in sorted(search_forms(state).items(), key=lambda kv: kv[0] != chosen):
        if source != chosen and not other:
            continue
        name = "searched" if source == chosen else f"searched_{source}"
        out[name] = Form(SupernetStore.open(form["supernet"], expect_model=model), form["levels"], form["fitness"])
    return out


def owl_levels(model, calib, grid: SupernetGrid, s: PipelineSettings, search_key: str, run_dir: Path) -> dict:
    """OWL's per-layer sparsities at the nearest levels of ``grid``, computed once per search key."""
    owl_file = Path(run_dir) / OWL_FILE
    if not owl_file.exists() or read_json_checked(owl_file).get("search") != search_key:
        ratios = outlier_ratios(model, calib, batch_size=s.batch_size)
        target = owl_sparsities(ratios, s.target_sparsity)
        write_json(
            owl_file,
            {"outlier_ratios": ratios, "layer_sparsity": target, "search": search_key, "levels": nearest_levels(grid, target)},
        )
    return read_json_checked(owl_file)["levels"]


def comparison_forms(
    lm: LoadedModel, model: dict, prep: Prepared, s: PipelineSettings, keys: RunKeys, state: dict, run_dir: Path
) -> dict[str, Form]:
    """The forms of ``s.compare`` (but ``dense``, which is the model itself), in the order listed above."""
    if not {"uniform", "owl"} & set(s.compare):
        return {}
    first = first_store(state, model)
    out = {}
    if "uniform" in s.compare:
        out["uniform"] = Form(first, first.grid.centre_levels())
    if "owl" in s.compare:
        out["owl"] = Form(first, owl_levels(lm.model, prep.calib, first.grid, s, keys.search.key, run_dir))
    return out
