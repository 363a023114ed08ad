"""Perplexity and zero-shot accuracy of an in-memory model."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tyr.modeling.adapter import get_adapter
from tyr.utils import Progress

log = logging.getLogger(__name__)


HEAD_CHUNK = 1024  # positions per vocabulary projection: [1024, V] float32 logits at most (1 GB at V = 262K)


def token_nll(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Summed negative log-likelihood (float64 scalar) of ``targets`` [B, T] under ``lm_head(hidden)``.

    The vocabulary projection is done in chunks of positions so that a 262K-vocabulary head never
    materialises [B, T, V] logits at once.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, h.shape[0], chunk):
        logits = lm_head(h[i : i + chunk]).float()
        total += F.cross_entropy(logits, t[i : i + chunk], reduction="sum").double()
    return total


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 1, desc: str = "ppl") -> dict:
    """Perplexity over non-overlapping windows ``input_ids`` [N, T]: exp(mean NLL of every token
    after the first of each window). Returns ppl, nll, their standard errors over windows, the
    per-window NLL, tokens and seconds."""
    adapter = get_adapter(model)
    base, head = adapter.base_model(model), adapter.lm_head(model)
    window_nll, t0 = [], time.time()
    bar = Progress(input_ids.shape[0], desc)
    for i in range(0, input_ids.shape[0], batch_size):
        x = input_ids[i : i + batch_size]
        hidden = base(input_ids=x).last_hidden_state
        window_nll += [
            float(token_nll(hidden[j : j + 1, :-1], head, x[j : j + 1, 1:])) / (x.shape[1] - 1) for j in range(x.shape[0])
        ]
        bar.update(x.shape[0])
    bar.close()
    n = len(window_nll)
    nll = sum(window_nll) / n  # every window has the same number of scored tokens
    # standard error of the mean NLL over windows (windows as the samples), and of ppl by the delta method
    se = math.sqrt(sum((v - nll) ** 2 for v in window_nll) / (n - 1) / n) if n > 1 else float("nan")
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "nll_se": se,
        "ppl_se": math.exp(nll) * se,
        "window_nll": window_nll,
        "tokens": n * (input_ids.shape[1] - 1),
        "windows": n,
        "seq_len": int(input_ids.shape[1]),
        "seconds": time.time() - t0,
    }


@dataclass
class ZeroShotResult:
    scores: dict[str, float]  # task -> reported metric (acc_norm where reported, else acc)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> all metrics
    samples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    per_doc: dict[str, list[float]] = field(default_factory=dict)  # task -> the reported metric per document, by doc_id

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / max(1, len(self.scores))


def _request_tokens(req) -> int:
    """Tokens of one lm-eval loglikelihood request ``(key, context_enc, continuation_enc)``."""
    return len(req[1]) + len(req[2])


LL_BATCH_TOKENS = 4096  # most padded tokens per loglikelihood batch (the decoder's activations, not logits)


@torch.inference_mode()
def continuation_loglikelihoods(
    model, requests: list, max_length: int, max_batch: int = 16, batch_tokens: int = LL_BATCH_TOKENS, desc: str = ""
) -> list[tuple[float, bool]]:
    """lm-eval's loglikelihood of each request ``(key, context_enc, continuation_enc)``: the summed
    log-probability of the continuation after the context, and whether greedy decoding gives it.

    Same inputs as lm-eval's HFLM (context + continuation, left-truncated to ``max_length`` + 1 tokens,
    the last one dropped; right-padded batches, longest first), but the vocabulary projection and
    log-softmax run only at the continuation's positions. HFLM projects and log-softmaxes every
    position of the padded batch, which with a 262K vocabulary (Gemma-3) costs more than the decoder."""
    adapter = get_adapter(model)
    base, head = adapter.base_model(model), adapter.lm_head(model)
    inps = [tuple((ctx + cont)[-(max_length + 1) :][:-1]) for _, ctx, cont in requests]
    # requests with the same input (the choices of a one-token answer: " yes" / " no") share one row
    rows: dict[tuple, list[int]] = {}
    for j, inp in enumerate(inps):
        rows.setdefault(inp, []).append(j)
    unique = sorted(rows, key=len, reverse=True)
    out: list = [None] * len(requests)
    bar = Progress(len(requests), desc or "loglikelihood")
    i = 0
    while i < len(unique):
        batch = unique[i : i + max(1, min(max_batch, batch_tokens // max(1, len(unique[i]))))]
        x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        for r, inp in enumerate(batch):
            x[r, : len(inp)] = torch.as_tensor(inp)
        hidden = base(input_ids=x).last_hidden_state
        # every request's continuation positions, projected together (one pass over the head's weight)
        owners = [(r, j) for r, inp in enumerate(batch) for j in rows[inp]]
        conts = [torch.as_tensor(requests[j][2], dtype=torch.long) for _, j in owners]
        h = torch.cat([hidden[r, len(batch[r]) - len(c) : len(batch[r])] for (r, _), c in zip(owners, conts)])
        t = torch.cat(conts)
        ll, hit = torch.empty(len(t), dtype=torch.float64), torch.empty(len(t), dtype=torch.bool)
        for k in range(0, len(t), HEAD_CHUNK):
            part = slice(k, k + HEAD_CHUNK)
            logp = F.log_softmax(head(h[part]).float(), dim=-1)
            ll[part] = logp.gather(1, t[part, None]).squeeze(1).double()
            hit[part] = logp.argmax(-1) == t[part]
        start = 0
        for (_, j), c in zip(owners, conts):
            out[j] = (float(ll[start : start + len(c)].sum()), bool(hit[start : start + len(c)].all()))
            start += len(c)
        bar.update(len(owners))
        i += len(batch)
    bar.close()
    return out


def _budget_hflm(model, tokenizer, max_batch: int, logits_mb: float | None):
    """lm-eval's HFLM with tyr's loglikelihood (:func:`continuation_loglikelihoods`), and whose batches
    for generation hold at most ``logits_mb`` MB of float32 logits (None: fixed ``max_batch``).

    lm-eval log-softmaxes a whole batch at once (batch × padded length × vocab floats, several copies),
    so a fixed batch of long requests with a large vocabulary costs gigabytes. Loglikelihood batches
    (multiple choice, rolling perplexity) no longer materialise those logits; on SmolLM2 (49K vocab,
    100 BoolQ documents, 1 thread) lm-eval's own loop in fixed batches of 16 peaked at 5.9 GB."""
    from lm_eval.models.huggingface import HFLM

    vocab = int(model.get_output_embeddings().weight.shape[0])
    budget_tokens = max(1, int(logits_mb * 2**20 // (4 * vocab))) if logits_mb is not None else None

    def fit(length: int) -> int:
        return max_batch if budget_tokens is None else max(1, min(max_batch, budget_tokens // max(1, length)))

    class TyrHFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            res = continuation_loglikelihoods(self.model, requests, self.max_length, max_batch, desc="zero-shot requests")
            for (key, _, _), answer in zip(requests, res):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return res

        def _detect_batch_size(self, requests=None, pos=0):  # generation requests
            return fit(_request_tokens(requests[pos]) if requests else self.max_length)

    return TyrHFLM(pretrained=model, tokenizer=tokenizer, batch_size="auto", max_batch_size=max_batch, device="cpu")


# lm-eval warnings about what tyr does on purpose (an in-memory model, num_fewshot=0) and per-call chatter.
_LM_EVAL_EXPECTED = (
    "model kwarg is not of type",
    "already-initialized model",
    "Overwriting default num_fewshot",
    "Setting verbosity through simple_evaluate",
    "Building contexts for",
    "Selected tasks",
    "Task: tyr_",
)


class _LmEvalFilter(logging.Filter):
    """Drops lm-eval's expected warnings and shows any other message once per process."""

    seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(s in msg for s in _LM_EVAL_EXPECTED) or msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def quiet_lm_eval() -> None:
    """Install :class:`_LmEvalFilter` on lm-eval's loggers (idempotent)."""
    for name in (
        "lm_eval",
        "lm_eval.models.huggingface",
        "lm_eval.evaluator",
        "lm_eval.evaluator_utils",
        "lm_eval.api.task",
        "lm_eval.api.model",
    ):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _LmEvalFilter) for f in lg.filters):
            lg.addFilter(_LmEvalFilter())


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    task_dir: str | None = None,
    logits_mb: float | None = 256,
) -> ZeroShotResult:
    """lm-eval zero-shot accuracy on the in-memory model: local task files for the tasks whose data
    ships with tyr, lm-eval's built-in tasks (their data from the Hub or its cache) for other names
    (:mod:`tyr.tasks`). Batches hold up to ``batch_size`` requests and at most ``logits_mb`` MB of
    logits (None: fixed ``batch_size``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate

    from tyr.tasks import TASKS, metric_of, task_manager, write_tasks

    quiet_lm_eval()
    t0 = time.time()
    local = [t for t in tasks if t in TASKS]
    registered = {t: f"tyr_{t}" if t in TASKS else t for t in tasks}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tasks(task_dir or tmp, local) if local else None
        tm = task_manager(list(tasks), include_path=[str(folder)] if folder else None)
        lm = _budget_hflm(model, tokenizer, batch_size, logits_mb)
        out = simple_evaluate(
            model=lm,
            tasks=list(registered.values()),
            num_fewshot=0,
            limit=limit,
            task_manager=tm,
            bootstrap_iters=0,
            log_samples=True,  # per-document scores: paired comparisons of two models on the same documents
            verbosity="WARNING",
        )
    scores, metrics, samples, per_doc = {}, {}, {}, {}
    for t in tasks:
        r = out["results"][registered[t]]
        m = {k.split(",")[0]: float(v) for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
        metrics[t] = m
        scores[t] = m[metric_of(t, m)]
        samples[t] = int(out.get("n-samples", {}).get(registered[t], {}).get("effective", -1))
        docs = sorted(out.get("samples", {}).get(registered[t], []), key=lambda d: d["doc_id"])
        per_doc[t] = [float(d[metric_of(t, m)]) for d in docs]
    return ZeroShotResult(scores, metrics, samples, time.time() - t0, per_doc)


_PPL_NAMES = {"general_test": "general", "general_dev": "general_dev", "wikitext2_test": "wikitext2", "ptb_test": "ptb"}


def evaluate_model(
    model,
    tokenizer,
    *,
    perplexity_sources: list[str],
    seq_len: int,
    ppl_windows: int,
    ppl_batch_size: int,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    token_cache: str,
    tokenizer_name: str = "",
    logits_mb: float | None = 256,
) -> dict:
    """Perplexity on each source's test windows plus lm-eval zero-shot; a JSON-ready dict."""
    from tyr.data import TokenSetSpec, get_token_set
    from tyr.modeling.params import parameter_counts

    t0 = time.time()
    out: dict = {"params": parameter_counts(model), "perplexity": {}, "zero_shot": None}
    for src in perplexity_sources:
        spec = TokenSetSpec(src, seq_len, -1, sampling="contiguous")
        ids = get_token_set(spec, tokenizer, token_cache, tokenizer_name).input_ids
        if ppl_windows and ppl_windows > 0:
            ids = ids[:ppl_windows]
        r = perplexity(model, ids, ppl_batch_size, desc=f"ppl {src}")
        log.info(
            "%s: ppl %.3f over %d tokens (%d windows of %d) in %.0f s",
            src,
            r["ppl"],
            r["tokens"],
            r["windows"],
            r["seq_len"],
            r["seconds"],
        )
        out["perplexity"][_PPL_NAMES.get(src, src)] = r
    if tasks:
        zs = zero_shot(model, tokenizer, list(tasks), limit=limit, batch_size=batch_size, logits_mb=logits_mb)
        out["zero_shot"] = {
            "scores": zs.scores,
            "average": zs.average,
            "metrics": zs.metrics,
            "samples": zs.samples,
            "per_doc": zs.per_doc,
            "seconds": zs.seconds,
            "limit": limit,
        }
        log.info("zero-shot average %.4f (%s) in %.0f s", zs.average, zs.scores, zs.seconds)
    out["seconds"] = time.time() - t0
    return out


def results_table(rows: dict[str, dict]) -> str:
    """A Markdown table, one row per labelled result of :func:`evaluate_model`."""
    ppl_keys, task_keys = [], []
    for r in rows.values():
        ppl_keys += [k for k in r.get("perplexity", {}) if k not in ppl_keys]
        zs = r.get("zero_shot") or {}
        task_keys += [k for k in zs.get("scores", {}) if k not in task_keys]
    head = ["model", "params"] + [f"{k} ppl" for k in ppl_keys] + task_keys + (["avg"] if task_keys else []) + ["time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        zs = r.get("zero_shot") or {}
        cells = [label, f"{r['params']['total'] / 1e6:.1f}M"]
        cells += [f"{r['perplexity'][k]['ppl']:.2f}" if k in r.get("perplexity", {}) else "-" for k in ppl_keys]
        cells += [f"{100 * zs['scores'][k]:.2f}" if k in zs.get("scores", {}) else "-" for k in task_keys]
        if task_keys:
            cells.append(f"{100 * zs['average']:.2f}" if zs else "-")
        cells.append(f"{r.get('seconds', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
