"""The distillation loss: KL(teacher ‖ student) on the teacher's top-k tokens plus a tail bucket (the
fitness's divergence, :func:`tyr.fitness.topk_kl`), computed on the fly from a teacher forward of the
same batch, plus an optional next-token cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tyr.fitness import teacher_topk, topk_kl
from tyr.modeling.adapter import get_adapter


@dataclass
class TeacherTargets:
    ids: torch.Tensor  # [P, k] int64, P = positions (every token but the last of each sequence)
    logp: torch.Tensor  # [P, k] float32
    tail: torch.Tensor  # [P] float32


def _hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of every position but the last, flattened to [P, H]."""
    h = get_adapter(model).base_model(model)(input_ids=input_ids).last_hidden_state[:, :-1]
    return h.reshape(-1, h.shape[-1])


@torch.no_grad()
def teacher_targets(teacher, input_ids: torch.Tensor, k: int, chunk: int = 1024) -> TeacherTargets:
    """The teacher's top-k log-probabilities of the next token at every position of ``input_ids``."""
    h = _hidden(teacher, input_ids)
    head = get_adapter(teacher).lm_head(teacher)
    parts = [teacher_topk(head(h[j : j + chunk]), k) for j in range(0, h.shape[0], chunk)]
    return TeacherTargets(*(torch.cat([p[i] for p in parts]) for i in range(3)))


def distill_loss(
    student, input_ids: torch.Tensor, target: TeacherTargets, ce_weight: float = 0.0, chunk: int = 1024
) -> dict[str, torch.Tensor]:
    """Summed (not averaged) losses over the positions of ``input_ids``: ``kl`` (top-k + tail),
    ``ce`` (next-token cross-entropy, computed only when ``ce_weight`` > 0) and ``loss`` =
    kl + ce_weight * ce. The student's log-probabilities are ``logits - logsumexp(logits)`` taken at
    the teacher's ids only, so no [P, V] log-softmax is kept for the backward pass."""
    h = _hidden(student, input_ids)
    head = get_adapter(student).lm_head(student)
    nxt = input_ids[:, 1:].reshape(-1)
    kl = ce = torch.zeros((), device=h.device)
    for j in range(0, h.shape[0], chunk):
        logits = head(h[j : j + chunk]).float()
        lse = torch.logsumexp(logits, -1)
        slp = logits.gather(-1, target.ids[j : j + chunk].to(h.device)) - lse[:, None]
        kl = kl + topk_kl(slp, target.logp[j : j + chunk].to(h.device), target.tail[j : j + chunk].to(h.device)).sum()
        if ce_weight > 0:
            ce = ce + (lse - logits.gather(-1, nxt[j : j + chunk, None].to(h.device))[:, 0]).sum()
    return {"loss": kl + ce_weight * ce, "kl": kl, "ce": ce}
