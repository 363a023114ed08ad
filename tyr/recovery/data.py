"""Recovery text: local sources mixed by weight into a fixed, seeded order of token windows.

Every source is turned into all of its whole windows of ``seq_len`` tokens (a contiguous token set of
:mod:`tyr.data`, cached per tokenizer). The sources take turns in proportion to their weights, each
giving its windows in a seeded order; the order depends only on the settings, so a resumed run reads
on from the same position, and a smaller budget trains on the start of a larger one's text. Recovery
text must not overlap the text that calibrated, searched or evaluates the model: :func:`check_disjoint`
compares document ranges.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tyr.data import TextTooShortError, TokenSetSpec, get_token_set


class RecoveryError(ValueError):
    """A recovery setting the user must change (reported as one line, exit 2)."""


class RecoveryBudgetError(RecoveryError, TextTooShortError):
    """The token budget asks for more text than the recovery sources hold."""


def document_range(source: str) -> tuple[str, int, float]:
    """``source`` as (corpus, first document, end document): ``c4[0:600]`` -> ("c4", 0, 600);
    ``wikitext2_train`` -> ("wikitext2_train", 0, inf). Different corpora never overlap."""
    from tyr.data import _split_range

    if source.startswith(("jsonl:", "parquet:")):
        kind, spec = source.split(":", 1)
        path, a, b = _split_range(spec)
        return f"{kind}:{path}", a, math.inf if b is None else b
    if source == "c4" or source.startswith("c4["):
        _, a, b = _split_range(source)
        return "c4", a, math.inf if b is None else b
    return source, 0, math.inf


def overlaps(a: str, b: str) -> bool:
    """Whether sources ``a`` and ``b`` (either may be a ``+`` mix) share a document."""
    if "+" in a or "+" in b:
        return any(overlaps(x, y) for x in a.split("+") for y in b.split("+"))
    ca, a0, a1 = document_range(a)
    cb, b0, b1 = document_range(b)
    return ca == cb and max(a0, b0) < min(a1, b1)


def check_disjoint(sources: list[str], used: dict[str, str]) -> None:
    """Raise :class:`RecoveryError` if a recovery source is a test split or shares documents with a
    source in ``used`` (role -> source: calibration, search, gradient, evaluation...)."""
    from tyr.data import DataSourceError, refuse_eval_text

    for s in sources:
        try:
            refuse_eval_text(s, "recover.data source")
        except DataSourceError as e:
            raise RecoveryError(str(e)) from None
        for role, u in used.items():
            if overlaps(s, u):
                raise RecoveryError(
                    f"recovery source {s!r} overlaps the {role} text {u!r}; pick documents "
                    "that calibration, search and evaluation do not use"
                )


def schedule(n: int, weights: list[float]) -> list[int]:
    """The source of each of ``n`` positions, by smooth weighted round robin: every prefix holds each
    source in proportion to its weight (within one window)."""
    total, credit, out = sum(weights), [0.0] * len(weights), []
    for _ in range(n):
        credit = [c + w for c, w in zip(credit, weights)]
        j = max(range(len(weights)), key=lambda i: credit[i])
        credit[j] -= total
        out.append(j)
    return out


def mix_windows(
    windows: list[torch.Tensor], weights: list[float], n: int, seed: int, names: list[str] | None = None
) -> torch.Tensor:
    """``n`` windows [n, T] from ``windows`` (one [N_i, T] tensor per source): the sources take turns
    by :func:`schedule`, each giving its windows in a seeded random order. The mix of a smaller budget
    is the start of a larger one's (same seed), so budgets can be compared on nested text."""
    names = names or [f"source {i}" for i in range(len(windows))]
    order = schedule(n, weights)
    counts = [order.count(i) for i in range(len(windows))]
    short = [(nm, c, len(w)) for nm, c, w in zip(names, counts, windows) if c > len(w)]
    if short:
        T = windows[0].shape[1]
        have = min(int(len(w) / (wt / sum(weights))) for w, wt in zip(windows, weights))
        detail = "; ".join(f"{nm} gets {c} windows but holds {h}" for nm, c, h in short)
        raise RecoveryBudgetError(
            f"recovery budget of {n * T:,} tokens ({n} windows of {T}) is larger than the text: {detail}. "
            f"At these weights the sources hold about {have * T:,} tokens; lower recover.tokens or add sources."
        )
    perms = [np.random.default_rng([seed, i]).permutation(len(w)) for i, w in enumerate(windows)]
    taken = [0] * len(windows)
    rows = []
    for j in order:
        rows.append(windows[j][int(perms[j][taken[j]])])
        taken[j] += 1
    return torch.stack(rows) if rows else torch.empty(0, windows[0].shape[1], dtype=windows[0].dtype)


def recovery_windows(
    sources: list[tuple[str, float]], seq_len: int, n: int, seed: int, tokenizer, cache: str, tokenizer_name: str = ""
) -> torch.Tensor:
    """The ``n`` training windows of the mix ``sources`` ((source, weight) pairs)."""
    wins = [
        get_token_set(TokenSetSpec(s, seq_len, -1, sampling="contiguous"), tokenizer, cache, tokenizer_name).input_ids
        for s, _ in sources
    ]
    return mix_windows(wins, [w for _, w in sources], n, seed, [s for s, _ in sources])
