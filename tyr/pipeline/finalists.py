"""Stage ``finalists`` (``finalists=recovery``): the training-aware choice of the widths to ship
(:mod:`tyr.finalists`), between the search and the evaluation. Keyed by the search key, its own settings and
the short recovery's; its record ``finalists/finalists.json`` resumes finalist by finalist. The chosen finalist
joins the search state as the form ``finalist``, which :func:`tyr.search_state.final_allocation` ships."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tyr.artifacts import read_json_checked, settings_key
from tyr.finalists import run_finalists
from tyr.models import LoadedModel
from tyr.pipeline.prepare import Prepared
from tyr.pipeline.settings import PipelineSettings, RunKeys
from tyr.supernet.store import SupernetStore

log = logging.getLogger("tyr")

FINALISTS_DIR = "finalists"


def finalists_stage(
    lm: LoadedModel, model: dict, pruner, prep: Prepared, s: PipelineSettings, keys: RunKeys, recovery, state: dict, run_dir: Path
) -> dict:
    """``state`` with the chosen finalist added as ``state["finalist"]`` (a form: supernet, levels, fitness);
    ``state`` unchanged when the step is off."""
    fs = s.finalists
    if not fs.alphas:
        return state
    from tyr.pipeline.recover import training_windows
    from tyr.pruning.uniform import uniform_widths

    short = dataclasses.replace(recovery, tokens=fs.tokens)
    key = settings_key({"search": keys.search.key, "finalists": dataclasses.asdict(fs), "recovery": dataclasses.asdict(short)})
    root = Path(run_dir) / FINALISTS_DIR
    record_file = root / "finalists.json"
    record = read_json_checked(record_file) if record_file.exists() else {}
    uniform_keep = record.get("uniform_keep") if record.get("key") == key else None
    if uniform_keep is None and any(a < 1.0 for a in fs.alphas):
        uniform_keep = uniform_widths(lm.model, pruner, prep.calib, s.target_sparsity, prep.taylor, batch_size=s.batch_size)
    final = state["iterations"][-1]
    searched_store = SupernetStore.open(state["reprune"]["supernet"], expect_model=model) if state.get("reprune") else None
    n = prep.teacher.input_ids.shape[0]
    n_hold = int(state.get("holdout_sequences") or 0)
    holdout = (n - n_hold, n) if n_hold else (0, n)
    record = run_finalists(
        lm.model,
        model,
        pruner,
        prep.calib,
        prep.taylor,
        prep.teacher,
        holdout,
        s.search,
        final["keep"],
        uniform_keep or final["keep"],
        fs,
        short,
        training_windows(short, lm, s.cache_dir),
        root,
        key,
        searched_store,
        (SupernetStore.open(final["supernet"], expect_model=model), final["levels"]),
        extra={"uniform_keep": uniform_keep},
    )
    chosen = next(c for c in record["candidates"] if c["name"] == record["chosen"])
    log.info(
        "finalists: %s ships (KL after a %d-token recovery: %s)",
        record["chosen"],
        fs.tokens,
        ", ".join(f"{c['name']} {c['kl_after']:.4f}" for c in record["candidates"]),
    )
    return {
        **state,
        "finalist": {
            "supernet": str(Path(run_dir) / chosen["supernet"]),
            "levels": chosen["levels"],
            "fitness": chosen["kl_after"],
            "alpha": chosen["alpha"],
            "name": chosen["name"],
        },
    }
