"""The typed settings of the pipeline's stages, converted once from the composed config.

:func:`pipeline_settings` turns the resolved config (a plain dict) into :class:`PipelineSettings` with
:func:`tyr.settings.from_config`; nothing below it reads a config. The defaults stay where they are
written once: the search's in :class:`tyr.search.settings.SearchSettings` (``search=paper``, registered
in Hydra's ConfigStore), everything else in the YAML options under ``conf/`` (the dataclasses below
have no defaults, so a missing key is an error, not a second default).

:class:`RunKeys` holds what identifies the artifacts (:mod:`tyr.recipes.stages` makes it from the
config as the user wrote it, so the keys stay those of the runs already made).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tyr.artifacts import StageRecord
from tyr.data import TokenSetSpec
from tyr.finalists import FinalistSettings
from tyr.search.settings import SearchSettings, search_settings
from tyr.settings import from_config


@dataclass
class EvalSettings:
    """An evaluation protocol (``conf/eval/*.yaml``): perplexity windows and lm-eval zero-shot tasks."""

    perplexity: list[str]  # text sources whose test windows are scored
    seq_len: int
    ppl_windows: int  # windows per source; -1: all
    ppl_batch_size: int
    tasks: list[str]  # lm-eval task names
    limit: int | None  # documents per task; None: the full split
    batch_size: int  # requests per lm-eval batch
    logits_mb: float | None  # at most this many MB of logits per lm-eval batch; None: fixed batches

    def kwargs(self, token_cache: str, tokenizer_name: str) -> dict:
        """The keyword arguments of :func:`tyr.evaluation.evaluate_model`."""
        return dict(
            perplexity_sources=list(self.perplexity),
            seq_len=self.seq_len,
            ppl_windows=self.ppl_windows,
            ppl_batch_size=self.ppl_batch_size,
            tasks=list(self.tasks),
            limit=self.limit,
            batch_size=self.batch_size,
            logits_mb=self.logits_mb,
            token_cache=token_cache,
            tokenizer_name=tokenizer_name,
        )


def eval_settings(options: Mapping[str, Any]) -> EvalSettings:
    return from_config(EvalSettings, options, "eval")


@dataclass
class PipelineSettings:
    """What the pipeline's stages do (``conf/pipeline.yaml``)."""

    model: str  # the model's name (labels of the results' rows)
    dtype: str  # model.dtype
    target_sparsity: float
    batch_size: int  # sequences per forward in the layer loops and the fitness
    calibration: TokenSetSpec  # data.calibration: the local pruner's statistics
    search_data: TokenSetSpec  # data.search: the teacher's sequences (fitness, re-prune choice, export check)
    gradient: TokenSetSpec  # data.gradient: Taylor statistics, for pruners that need gradients
    search: SearchSettings
    eval: EvalSettings
    compare: tuple[str, ...]  # extra rows: dense, uniform, uniform_reprune, owl, searched_other
    export: bool
    finalists: FinalistSettings  # the training-aware choice after the search (alphas=(): off)
    export_formats: tuple[str, ...]  # hf (the folder) and gguf (also gguf/model.gguf written from it)
    gguf_dtype: str
    streaming: bool  # runtime.streaming: the prepare / build / search stages hold one layer at a time
    cache_dir: str

    @property
    def token_cache(self) -> str:
        return str(Path(self.cache_dir) / "tokens")


def pipeline_settings(config: Mapping[str, Any]) -> PipelineSettings:
    """The typed settings of a resolved pipeline config (``OmegaConf.to_container(cfg, resolve=True)``)."""
    data = config["data"]
    return from_config(
        PipelineSettings,
        {
            "model": config["model"]["name"],
            "dtype": config["model"]["dtype"],
            "target_sparsity": config["target_sparsity"],
            "batch_size": config["batch_size"],
            "calibration": data["calibration"],
            "search_data": data["search"],
            "gradient": data["gradient"],
            "search": search_settings(config["search"], int(config["batch_size"])),
            "eval": config["eval"],
            "compare": config["compare"],
            "export": config["export"],
            "finalists": config["finalists"],
            "export_formats": config["export_formats"],
            "gguf_dtype": config["gguf_dtype"],
            "streaming": config["runtime"]["streaming"],
            "cache_dir": config["paths"]["cache_dir"],
        },
    )


@dataclass
class RunKeys:
    """The identities of a run's artifacts (:mod:`tyr.recipes.stages`)."""

    prepare: StageRecord  # teacher cache
    search: StageRecord  # supernets, evolution, re-prune; its key also keys the comparisons and the export
    eval: dict  # evaluation settings in each result's key (speed settings left out)
    supernet: dict  # the configuration every supernet of the run records in its manifest
    config: dict  # the whole resolved config, recorded in every result file
