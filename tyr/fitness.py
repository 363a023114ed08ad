"""Fitness of candidate allocations: KL(dense ‖ pruned) on cached teacher top-k log-probabilities.

The teacher cache holds, for every position of the search tokens, the dense model's top-k token ids,
their log-probabilities and the log of the remaining (tail) mass. The KL of a candidate is computed
over the k tokens plus one tail bucket, which is exact when k covers the vocabulary and a tight
approximation otherwise (the tail bucket keeps it a true divergence between two distributions).

Speed-ups beyond Týr, both switchable and measured:
- **prefix cache**: the parent of a generation is evaluated first and its per-layer inputs are kept;
  a child whose first changed layer is f starts from the parent's input of layer f.
- **surrogate**: :func:`surrogate_scores` ranks candidates with no forward at all, from the
  supernet's per-variant error estimates (see ``EvolutionConfig.prescreen_keep``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tyr import dist, streaming
from tyr.artifacts import load_cache, write_verified
from tyr.layerwise.driver import KeepInputs, forward_layers, run_layers
from tyr.layerwise.engine import capture_layer_inputs
from tyr.modeling.adapter import get_adapter

log = logging.getLogger(__name__)


@dataclass
class TeacherCache:
    input_ids: torch.Tensor  # [N, T]
    topk_ids: torch.Tensor  # [N, T-1, k] int32
    topk_logp: torch.Tensor  # [N, T-1, k] float32
    tail_logp: torch.Tensor  # [N, T-1] float32, log(1 - Σ top-k p)

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.input_ids, self.topk_ids, self.topk_logp, self.tail_logp))

    @staticmethod
    def estimate_bytes(num_tokens: int, k: int) -> int:
        return num_tokens * (k * 8 + 4 + 8)

    @classmethod
    @torch.no_grad()
    def build(cls, model, input_ids: torch.Tensor, k: int, batch_size: int = 4, chunk: int = 1024) -> TeacherCache:
        """The dense model's top-k log-probabilities, computed layer by layer (a streamed model holds
        one layer at a time). Distributed: each rank computes its block of sequences, then every
        rank receives the whole cache."""
        a = get_adapter(model)
        norm, head = a.final_norm(model), a.lm_head(model)
        device = streaming.execution(model).device
        ids, lps, tails = [], [], []
        x = forward_layers(model, input_ids, batch_size, shard=True)  # None: no sequences on this rank
        if x is not None:
            for i in range(0, x.shape[0], batch_size):
                h = norm(x[i : i + batch_size].to(device))[:, :-1]
                flat = h.reshape(-1, h.shape[-1])
                bi, bl, bt = [], [], []
                for j in range(0, flat.shape[0], chunk):
                    top_ids, top_logp, tail = teacher_topk(head(flat[j : j + chunk]), k)
                    bi.append(top_ids.int().cpu())
                    bl.append(top_logp.cpu())
                    bt.append(tail.cpu())
                shape = h.shape[:2]
                ids.append(torch.cat(bi).reshape(*shape, -1))
                lps.append(torch.cat(bl).reshape(*shape, -1))
                tails.append(torch.cat(bt).reshape(*shape))
        parts = dist.all_gather_object((torch.cat(ids), torch.cat(lps), torch.cat(tails)) if ids else None)
        parts = [p for p in parts if p is not None]
        return cls(input_ids.clone(), *(torch.cat([p[j] for p in parts]) for j in range(3)))

    def save(self, path: str | Path, key: str | None = None) -> None:
        """Write the cache with its checksum and settings key (rank 0 only when distributed; every
        rank holds the same cache)."""
        if not dist.is_main():
            return
        write_verified(
            path,
            {
                "input_ids": self.input_ids.int(),
                "topk_ids": self.topk_ids,
                "topk_logp": self.topk_logp,
                "tail_logp": self.tail_logp,
            },
            key=key,
        )

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> TeacherCache | None:
        """The cache at ``path`` if it is intact and was made with settings ``key``; else None (a
        corrupt or stale file is logged, and the caller rebuilds it)."""
        t = load_cache(path, key, log)
        return None if t is None else cls(t["input_ids"].long(), t["topk_ids"], t["topk_logp"], t["tail_logp"])


def kl_sum(hidden: torch.Tensor, norm, head, teacher: TeacherCache, rows, chunk: int = 1024) -> float:
    """Σ over positions of KL(teacher ‖ student) for the student's last hidden states ``hidden``
    (pre-norm, [b, T, H]) of the teacher's sequences ``rows`` (a slice or an index tensor)."""
    device = head.weight.device
    h = norm(hidden.to(device))[:, :-1].reshape(-1, hidden.shape[-1])
    ids = teacher.topk_ids[rows].reshape(h.shape[0], -1).long().to(device)
    tlp = teacher.topk_logp[rows].reshape(h.shape[0], -1).to(device)
    ttail = teacher.tail_logp[rows].reshape(-1).to(device)
    total = 0.0
    for j in range(0, h.shape[0], chunk):
        slp = torch.log_softmax(head(h[j : j + chunk]).float(), -1).gather(-1, ids[j : j + chunk])
        kl = topk_kl(slp, tlp[j : j + chunk], ttail[j : j + chunk])
        total += float(kl.double().sum())
    return total


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's side of the top-k KL for logits [..., V]: top-k token ids, their
    log-probabilities (float32) and the log of the remaining (tail) mass."""
    logp = torch.log_softmax(logits.float(), -1)
    top = logp.topk(min(k, logp.shape[-1]), -1)
    return top.indices, top.values, torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))


def topk_kl(slp: torch.Tensor, tlp: torch.Tensor, ttail: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher ‖ student) over the teacher's top-k tokens plus one tail bucket.

    ``slp`` [..., k]: the student's log-probabilities at the teacher's top-k ids; ``tlp`` [..., k] and
    ``ttail`` [...]: the teacher's (:func:`teacher_topk`). Differentiable in ``slp``."""
    stail = torch.log1p(-slp.exp().sum(-1).clamp(max=1 - 1e-7))
    return (tlp.exp() * (tlp - slp)).sum(-1) + ttail.exp() * (ttail - stail)


@dataclass
class FitnessStats:
    candidates: int = 0
    layer_forwards: int = 0  # layer forwards run (per sequence batch pass over all sequences)
    layer_forwards_saved: int = 0  # skipped thanks to the prefix cache
    seconds: float = 0.0
    history: list = field(default_factory=list)


class KLFitness:
    """``fitness(allocs, stage, num_tokens)`` for :func:`tyr.search.evolve`: mean per-token KL of each
    candidate on the first ``ceil(num_tokens / T)`` teacher sequences (the same for every candidate
    of a call). The last element of ``allocs`` is the parent: it is evaluated first, and with
    ``prefix_cache`` its layer inputs are reused by the children.

    Layers come from ``assembler.layer`` (streamed models: one pruned layer in memory at a time).
    Distributed: each rank evaluates its block of the call's sequences and the KL sums are
    all-reduced, so every rank returns the same fitness values."""

    def __init__(
        self,
        model,
        assembler,
        teacher: TeacherCache,
        batch_size: int = 8,
        prefix_cache: bool = True,
        prefix_cache_max_mb: float = 4096.0,
        rotate: bool = True,
        sequences: tuple[int, int] | None = None,
    ):
        self.model, self.asm, self.teacher = model, assembler, teacher
        self.a = get_adapter(model)
        self.batch_size, self.prefix_cache, self.max_mb = batch_size, prefix_cache, prefix_cache_max_mb
        self.stats = FitnessStats()
        self._kwargs = None
        # With ``rotate``, generation g uses teacher sequences starting at g·n (mod N), so successive
        # generations see fresh tokens (as in EvoPress) while every candidate of a stage shares them.
        # A stage-0 call starts a new generation; set ``generation`` when resuming an evolution.
        self.rotate = rotate
        self.generation = -1
        # ``sequences``: only teacher sequences [start, stop) are used (e.g. the search leaves a
        # held-out block for the final choice between model forms).
        N = teacher.input_ids.shape[0]
        self.first, self.stop = sequences if sequences is not None else (0, N)
        if not 0 <= self.first < self.stop <= N:
            raise ValueError(f"sequences {sequences} outside the teacher's 0..{N}")

    def rows(self, n_seq: int) -> torch.Tensor:
        g = max(self.generation, 0) if self.rotate else 0
        return self.first + (torch.arange(n_seq) + g * n_seq) % (self.stop - self.first)

    def _layer_kwargs(self):
        if self._kwargs is None:
            _, self._kwargs = capture_layer_inputs(self.model, self.teacher.input_ids[:1])
        return self._kwargs

    @torch.no_grad()
    def _run(self, rows: torch.Tensor, start: int, x: torch.Tensor, keep_inputs: bool) -> tuple[float, list | None]:
        keep = KeepInputs(keep_inputs)
        x = run_layers(
            self.model,
            keep,
            start=start,
            hidden=x,
            layer_kwargs=self._layer_kwargs(),
            layer_source=self.asm.layer,
            batch_size=self.batch_size,
        )
        self.stats.layer_forwards += keep.count
        inputs = keep.inputs if keep_inputs else None
        norm, head = self.a.final_norm(self.model), self.a.lm_head(self.model)
        bs, n_seq = self.batch_size, len(rows)
        kl = sum(kl_sum(x[i : i + bs], norm, head, self.teacher, rows[i : i + bs]) for i in range(0, n_seq, bs))
        return kl, inputs

    def __call__(self, allocs, stage: int, num_tokens: int) -> list[float]:
        t0 = time.time()
        T = self.teacher.input_ids.shape[1]
        n_seq = min(self.stop - self.first, max(1, math.ceil(num_tokens / T)))
        if stage == 0:
            self.generation += 1
        all_rows = self.rows(n_seq)
        mine = dist.shard(n_seq)
        rows = all_rows[mine.start : mine.stop]
        ids = self.teacher.input_ids[rows]
        x0 = capture_layer_inputs(self.model, ids, self.batch_size)[0] if len(rows) else None
        n_tok = n_seq * (T - 1)
        L = self.a.num_layers(self.model)
        cache_mb = L * (x0.numel() * x0.element_size() if x0 is not None else 0) / 2**20
        use_cache = self.prefix_cache and cache_mb <= self.max_mb
        order = [len(allocs) - 1] + list(range(len(allocs) - 1))  # parent first
        out = [0.0] * len(allocs)
        parent_levels, parent_inputs = None, None
        for idx in order:
            levels = allocs[idx].to_json() if hasattr(allocs[idx], "to_json") else allocs[idx]
            self.asm.assemble(levels)
            start, x = 0, x0
            if use_cache and parent_inputs is not None:
                first = next((l for l in range(L) if any(levels[k][l] != parent_levels[k][l] for k in levels)), L)
                start, x = first, (parent_inputs[first] if first < L else None)
                self.stats.layer_forwards_saved += first
                if first == L:  # identical to the parent
                    out[idx] = out[order[0]]
                    continue
            kl, inputs = (
                self._run(rows, start, x, keep_inputs=use_cache and parent_inputs is None)
                if len(rows)
                else (0.0, [None] * L if use_cache and parent_inputs is None else None)
            )  # no sequences here
            if inputs is not None:
                parent_levels, parent_inputs = levels, inputs
            out[idx] = dist.all_reduce_sum(kl) / n_tok
            self.stats.candidates += 1
        self.stats.seconds += time.time() - t0
        return out


def surrogate_scores(errors: dict[str, list[list[float]]], allocs) -> list[float]:
    """Zero-forward fitness: the sum over modules of the chosen variant's stored relative error."""
    out = []
    for a in allocs:
        levels = a.to_json() if hasattr(a, "to_json") else a
        out.append(sum(errors[k][l][lvl] for k in levels for l, lvl in enumerate(levels[k])))
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(x) < 3:
        return float("nan")
    r = spearmanr(np.asarray(x), np.asarray(y)).statistic
    return float(r)
