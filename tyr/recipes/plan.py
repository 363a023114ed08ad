"""Print the cost plan of a run from the model's config alone:
``python -m tyr.recipes.plan model=llama3-70b target_sparsity=0.5 [calib_tokens=4000000 seq_len=4096 search=paper]``.

No weights are loaded (and torch is not imported): the numbers come from the ``arch:`` block of
``conf/model/<name>.yaml`` and the data / supernet / search / pruner configs, through
:func:`tyr.planner.plan`. Writes ``plan.json`` into the run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tyr.planner import ArchFacts, DataSizes, GridSettings, PrunerSettings, Throughput, format_plan, plan
from tyr.search.settings import search_settings

GRADIENT_SCORERS = ("HyWIA", "TaylorVector", "TaylorElement1", "TaylorElement2")


def _tokens(spec: DictConfig) -> int:
    return int(spec.num_sequences) * int(spec.seq_len)


def plan_from_config(cfg: DictConfig) -> dict:
    """The plan for a composed ``plan`` config (also used by the tests)."""
    if cfg.model.get("arch") is None:
        raise ValueError(f"conf/model/{cfg.model.name}.yaml has no arch: block; the planner needs it")
    arch = ArchFacts.from_dict(OmegaConf.to_container(cfg.model.arch, resolve=True))
    scorer = str(cfg.pruner.scorer._target_).rsplit(".", 1)[-1]
    needs_grad = scorer in GRADIENT_SCORERS
    d = cfg.data
    data = DataSizes(
        calib_tokens=int(cfg.calib_tokens) if cfg.calib_tokens is not None else _tokens(d.calibration),
        grad_tokens=(int(cfg.grad_tokens) if cfg.grad_tokens is not None else _tokens(d.gradient)) if needs_grad else 0,
        seq_len=int(cfg.seq_len) if cfg.seq_len is not None else int(d.calibration.seq_len),
        search_set_tokens=_tokens(d.search),
        batch_size=int(cfg.batch_size),
    )
    n = cfg.supernet
    search = search_settings(OmegaConf.to_container(cfg.search, resolve=True), int(cfg.batch_size))
    probes = len(cfg.pruner.scorer.get("components", ("fine", "coarse"))) if scorer == "HyWIA" else 0
    return plan(
        arch,
        str(cfg.model.dtype),
        float(cfg.target_sparsity),
        supernet=GridSettings(int(n.n_levels), float(n.interval), int(n.min_heads), int(n.min_channels), str(n.eea)),
        data=data,
        search=search,
        pruner=PrunerSettings(str(cfg.pruner.reconstruction), bool(cfg.pruner.bias), probes),
        throughput=Throughput(
            float(cfg.tflops), None if cfg.fp64_tflops is None else float(cfg.fp64_tflops), float(cfg.cpu_tflops)
        ),
        model_name=str(cfg.model.name),
        streaming=bool(cfg.runtime.streaming),
    )


@hydra.main(config_path="../../conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    p = plan_from_config(cfg)
    print(format_plan(p))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "plan.json.tmp"
    tmp.write_text(json.dumps(p, indent=2) + "\n")
    os.replace(tmp, run_dir / "plan.json")
    print(f"plan written to {run_dir / 'plan.json'}")


if __name__ == "__main__":
    main()
