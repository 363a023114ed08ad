"""Training-aware choice of the widths to ship (issue #32): a step after the search.

The search ranks allocations by their KL to the dense model *before* recovery, but a user ships a recovered
model, and recovery closes much of the gap between a searched and a uniform allocation. So the search's result
competes with a few finalists on the line from the searched widths (alpha = 1) to the uniform widths (alpha = 0,
the prune recipe's): each is pruned sequentially at its widths, given a short recovery (LoRA distillation from
the dense model, the start of the pipeline's own recovery text), and scored by KL to the dense model on the
search's held-out sequences; the lowest KL after the short recovery is shipped (DarwinLM's training-aware
selection, on a line instead of a population).

Artifacts, under ``<run>/finalists/``: ``finalists.json`` (keyed; one record per finalist as it finishes, so a
rerun resumes), ``a<alpha>/supernet`` (the finalist's sequential prune), ``a<alpha>/recover`` (its short recovery's
checkpoints, in a folder named by the key, so other settings never resume them).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tyr.artifacts import read_json_checked
from tyr.fitness import TeacherCache, topk_kl
from tyr.supernet.grid import LayerShape
from tyr.utils import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalistSettings:
    alphas: tuple[float, ...]  # 1.0: the searched widths; 0.0: the uniform widths; () = the step is off
    tokens: int  # the short recovery's token budget, per finalist
    supernet_form: bool = False  # also the searched widths as the search assembled them (not pruned sequentially)

    def validate(self) -> None:
        if any(not 0.0 <= a <= 1.0 for a in self.alphas) or len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"finalists.alphas={list(self.alphas)} must be distinct fractions in [0, 1]")
        if self.alphas and self.tokens < 1:
            raise ValueError(f"finalists.tokens={self.tokens} must be positive")


def nominal_cost(shapes: list[LayerShape], keep: dict[str, list[int]]) -> float:
    return sum(s.head_unit_params * h + s.channel_unit_params * c for s, h, c in zip(shapes, keep["attn"], keep["mlp"]))


def interpolate(shapes: list[LayerShape], searched: dict, uniform: dict, alpha: float) -> dict[str, list[int]]:
    """Widths ``alpha`` of the way from ``uniform`` to ``searched`` per module, rounded to whole heads and
    channels, at no more nominal parameters than the same mix of the two ends' (channels are taken back where
    rounding added the most)."""
    mix = {k: [alpha * s + (1 - alpha) * u for s, u in zip(searched[k], uniform[k])] for k in ("attn", "mlp")}
    keep = {k: [int(round(x)) for x in v] for k, v in mix.items()}
    limit = alpha * nominal_cost(shapes, searched) + (1 - alpha) * nominal_cost(shapes, uniform)
    while nominal_cost(shapes, keep) > limit + 1e-6:
        l = max(range(len(shapes)), key=lambda i: keep["mlp"][i] - mix["mlp"][i])
        keep["mlp"][l] -= 1
    return keep


@torch.no_grad()
def model_kl(model, teacher: TeacherCache, rows: tuple[int, int], batch_size: int = 4) -> float:
    """Mean per-token KL(dense ‖ model) over the teacher sequences [start, stop) (a whole model, not an assembly)."""
    total, n = 0.0, 0
    for i in range(rows[0], rows[1], batch_size):
        j = min(i + batch_size, rows[1])
        logits = model(teacher.input_ids[i:j]).logits[:, :-1].float()
        ids = teacher.topk_ids[i:j].long()
        slp = torch.log_softmax(logits, -1).gather(-1, ids)
        total += float(topk_kl(slp, teacher.topk_logp[i:j], teacher.tail_logp[i:j]).double().sum())
        n += ids.shape[0] * ids.shape[1]
    return total / n


def _tag(alpha: float) -> str:
    return "a" + f"{alpha:.4f}".rstrip("0").rstrip(".")


def run_finalists(
    model,
    model_id: dict,
    pruner,
    calib_ids: torch.Tensor,
    taylor: dict | None,
    teacher: TeacherCache,
    holdout: tuple[int, int],
    search_settings,
    searched_keep: dict,
    uniform_keep: dict,
    settings: FinalistSettings,
    recovery,
    windows: torch.Tensor,
    root: Path,
    key: str,
    searched_store=None,
    supernet_form: tuple | None = None,
    extra: dict | None = None,
) -> dict:
    """Build, recover and score every finalist (resuming from ``root/finalists.json`` when it holds the same
    ``key``): one per ``settings.alphas`` (named ``a<alpha>``), and with ``settings.supernet_form`` the searched
    widths as the search assembled them (``supernet_form``: its store and levels; named ``supernet``). Returns the
    record with ``chosen``: the name of the finalist with the lowest KL on the ``holdout`` teacher sequences after
    its short recovery. ``searched_store``: the search's own sequential prune at the searched widths, reused for
    alpha = 1. ``recovery``: the short recovery's settings (the pipeline's recovery with ``settings.tokens``),
    ``windows`` its training windows. ``model`` stays dense."""
    from tyr.modeling.params import parameter_counts
    from tyr.recovery.trainer import train
    from tyr.supernet.assemble import Assembler
    from tyr.supernet.grid import layer_shapes
    from tyr.supernet.path import build_path_supernet

    settings.validate()
    root = Path(root)
    record_file = root / "finalists.json"
    record = read_json_checked(record_file) if record_file.exists() else {}
    if record.get("key") != key:
        record = {"key": key, "alphas": list(settings.alphas), "holdout": list(holdout), "candidates": [], **(extra or {})}
    done = {c["name"] for c in record["candidates"]}
    shapes = layer_shapes(model)
    todo = [(_tag(a), a) for a in settings.alphas]
    if settings.supernet_form and supernet_form is not None:
        todo.append(("supernet", 1.0))
    for name, alpha in todo:
        if name in done:
            continue
        t0 = time.time()
        keep = interpolate(shapes, searched_keep, uniform_keep, alpha)
        if name == "supernet":
            store, levels = supernet_form
        elif alpha == 1.0 and searched_store is not None:
            store, levels = searched_store, searched_store.grid.centre_levels()
        else:
            store = build_path_supernet(
                model, model_id, pruner, calib_ids, taylor, keep, root / name / "supernet", search_settings, {"finalist": alpha}
            )
            levels = store.grid.centre_levels()
        asm = Assembler(model, store)
        asm.assemble(levels)
        student = copy.deepcopy(model)
        asm.restore_dense()
        kl_before = model_kl(student, teacher, holdout)
        student, summary = train(model, student, windows, recovery, root / name / f"recover-{key[:12]}", progress=False)
        student.to("cpu")
        model.to("cpu")
        kl_after = model_kl(student, teacher, holdout)
        cand = {
            "name": name,
            "alpha": alpha,
            "keep": keep,
            "supernet": os.path.relpath(store.root.resolve(), root.resolve().parent),
            "levels": levels,
            "params": parameter_counts(student),
            "kl_before": kl_before,
            "kl_after": kl_after,
            "recovery_tokens": summary["tokens"],
            "seconds": time.time() - t0,
        }
        log.info("finalist %s: KL %.4f before, %.4f after a %d-token recovery", name, kl_before, kl_after, summary["tokens"])
        record["candidates"].append(cand)
        write_json(record_file, record)
        del student
    best = min(record["candidates"], key=lambda c: (c["kl_after"] if math.isfinite(c["kl_after"]) else math.inf, -c["alpha"]))
    if record.get("chosen") != best["name"]:
        record["chosen"] = best["name"]
        write_json(record_file, record)
    return record
