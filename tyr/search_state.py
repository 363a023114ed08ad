"""The coarse-to-fine search's state file, read: the forms of the searched widths and which one ships.

``search_state.json`` (written by :mod:`tyr.coarse_to_fine` after every generation) holds the iterations'
results, the re-prune's record and, after the pipeline's finalists stage, the chosen finalist. The functions
here only read it (and tidy ``history.jsonl`` against it on resume), so the pipeline's later stages and the
experiments use them without the search driver.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from tyr.search.settings import CHOOSE_FORMS


def rel_path(path: Path, run_dir: Path) -> str:
    """Paths in the run's state are relative to the run directory, so the directory can be moved."""
    return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())


def resolved(state: dict, run_dir: str | Path) -> dict:
    """A copy of a search state with its supernet paths made absolute (older states hold absolute ones)."""
    out = copy.deepcopy(state)
    for rec in out["iterations"] + ([out["reprune"]] if out.get("reprune") else []):
        rec["supernet"] = str(Path(run_dir) / rec["supernet"])
    return out


def drop_uncommitted(path: Path, state: dict) -> None:
    """history.jsonl keeps only generations the state has committed, once each: a kill between
    writing a generation's record and the state would otherwise leave a record that the resumed run
    writes again."""
    if not path.exists():
        return
    cur = state.get("current")
    done_gen = cur["evolution"]["generation"] if cur else 0
    keep, seen = [], set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        key = (r.get("iteration"), r.get("generation"))
        committed = key[0] < len(state["iterations"]) or (cur is not None and key[0] == cur["iteration"] and key[1] < done_gen)
        if committed and key not in seen:
            seen.add(key)
            keep.append(line)
    text = "".join(l + "\n" for l in keep)
    if text != path.read_text():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def search_forms(state: dict) -> dict[str, dict]:
    """The forms of the searched widths, each ``{"supernet", "levels", "fitness"}``: ``supernet`` (the
    last iteration's allocation in its supernet) and, when the re-prune ran, ``reprune``. ``fitness``
    is the KL on the re-prune's scoring sequences when it ran, else the search's last-stage KL."""
    final, rp = state["iterations"][-1], state.get("reprune")
    forms = {
        "supernet": {
            "supernet": final["supernet"],
            "levels": final["levels"],
            "fitness": final["fitness"] if rp is None else rp["kl_supernet"],
        }
    }
    if rp is not None:
        forms["reprune"] = {"supernet": rp["supernet"], "levels": rp["levels"], "fitness": rp["kl_reprune"]}
    if state.get("finalist"):  # the training-aware choice (tyr.finalists), added by the pipeline's finalists stage
        forms["finalist"] = {k: state["finalist"][k] for k in ("supernet", "levels", "fitness")}
    return forms


def chosen_form(reprune: dict | None, choose_form: str = "reprune") -> str:
    """Which form of the searched widths is the result: ``supernet`` when the re-prune did not run
    (``reprune`` is the state's record of it, or None), else ``choose_form``, ``heldout`` meaning the
    form with the lower held-out KL."""
    if choose_form not in CHOOSE_FORMS:
        raise ValueError(f"choose_form={choose_form} must be one of {', '.join(CHOOSE_FORMS)}")
    if reprune is None:
        return "supernet"
    if choose_form == "heldout":
        return "reprune" if reprune["kl_reprune"] < reprune["kl_supernet"] else "supernet"
    return choose_form


def final_allocation(state: dict, choose_form: str = "reprune", reprune: bool = True) -> dict:
    """The search's result: the form of :func:`search_forms` that :func:`chosen_form` picks, with its
    name as ``source``. ``reprune=False`` (the setting) keeps the supernet form even if a re-prune is
    in the state from an earlier run of the same search."""
    source = "finalist" if state.get("finalist") else chosen_form(state.get("reprune") if reprune else None, choose_form)
    return {**search_forms(state)[source], "source": source}
