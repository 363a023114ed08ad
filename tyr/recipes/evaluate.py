"""Evaluate a model: ``python -m tyr.recipes.evaluate model=smollm2-135m [eval=quick]``.

Writes ``results.json`` into the Hydra run directory and prints a Markdown table.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from tyr.evaluation import evaluate_model, results_table
from tyr.recipes.common import eval_kwargs, load, log, recorded, start, to_container
from tyr.utils import write_json


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
@recorded
def main(cfg: DictConfig) -> None:
    run_dir = start(cfg)
    t0 = time.time()
    lm = load(cfg)
    res = evaluate_model(lm.model, lm.tokenizer, **eval_kwargs(cfg))
    res.update(model=lm.name, revision=lm.revision, wall_time=time.time() - t0, config=to_container(cfg))
    write_json(run_dir / "results.json", res)
    table = results_table({f"{lm.name} (dense)": res})
    (run_dir / "results.md").write_text(table + "\n")
    print(table)
    print(f"wall time {res['wall_time']:.0f} s; results in {run_dir / 'results.json'}")
    log.info("done")


if __name__ == "__main__":
    main()
