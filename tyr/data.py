"""Token sets: real text turned into fixed-length int32 windows, saved as safetensors + metadata.

A token set is what every stage consumes (calibration, search fitness, perplexity). It is built
from a named text source, a tokenizer, a window length, a count and a seed, and cached on disk under
a key derived from all of them, so that re-running a stage re-uses it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from tyr.utils import data_dir

log = logging.getLogger(__name__)

TOKENSET_SCHEMA = 1


class TextTooShortError(ValueError):
    """The source text holds fewer tokens than the token set asks for."""


class DataSourceError(ValueError):
    """A text source that cannot be read: unknown name, missing file, a bad line (one-line message)."""


KNOWN_SOURCES = (
    "general_calibration, general_search, general_recovery, general_dev, general_test, "
    "wikitext2_test, wikitext2_train, wikitext2_valid, ptb_test, ptb_valid, c4, c4[a:b], "
    "jsonl:PATH[a:b], parquet:PATH[a:b], and mixes of them joined by '+'"
)
GENERAL_PREFIX = "general_"  # general_<set>: a set of the shipped general corpus (tyr.corpus)
# Text that only evaluation reads: test splits, and the general corpus's dev set (settings are chosen on it).
# No stage (calibration, gradients, search, recovery) may read them: refuse_eval_text.
EVAL_ONLY_SOURCES = ("wikitext2_test", "ptb_test", "general_test", "general_dev")
# Files under data/ that evaluation reads (perplexity test splits, zero-shot task files) or that are split by
# name (the general corpus): a stage may not read them as a local file either.
EVAL_FILES = (
    "wikitext2/wiki.test.raw",
    "ptb/ptb.test.txt",
    "arc_easy",
    "arc_challenge",
    "boolq",
    "openbookqa",
    "piqa",
    "general",
)


def refuse_eval_text(source: str, where: str) -> None:
    """Raise :class:`DataSourceError` if ``source`` (or a part of a ``+`` mix) is evaluation text: a test split,
    the general dev set, or a local file that evaluation reads. Every stage's text passes through here."""
    for part in source.split("+"):
        if part in EVAL_ONLY_SOURCES:
            raise DataSourceError(
                f"{where}={source!r} reads {part!r}: evaluation text, which no stage may read; stages read training "
                "or validation text (general_calibration, general_search, general_recovery, c4[a:b], wikitext2_valid, ...)"
            )
        if part.startswith(("jsonl:", "parquet:")):
            import glob

            pattern, _, _ = _split_range(part.split(":", 1)[1])
            root = data_dir().resolve()
            for f in glob.glob(os.path.expanduser(pattern)) or [os.path.expanduser(pattern)]:
                rel = Path(f).resolve()
                if rel.is_relative_to(root) and any(
                    rel.relative_to(root).as_posix() == e or rel.relative_to(root).as_posix().startswith(e + "/")
                    for e in EVAL_FILES
                ):
                    raise DataSourceError(
                        f"{where}={source!r} reads {f}: evaluation text, or a corpus split by name; use a named source"
                    )


# ------------------------------------------------------------------------------------------------
# Text sources
# ------------------------------------------------------------------------------------------------


def _read_jsonl_texts(path: Path, key: str, start: int, stop: int | None) -> list[str]:
    """Documents ``start..stop-1`` (the ``key`` field of each non-empty line); a line that is not a
    JSON object with a string ``key`` is a :class:`DataSourceError` naming the file and line."""
    if not path.exists():
        raise DataSourceError(f"text file {path} does not exist")
    docs: list[str] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if stop is not None and len(docs) >= stop:
                break
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{path}:{i}: not a JSON line ({e.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(key), str):
                raise DataSourceError(f"{path}:{i}: no {key!r} string field in this JSON line")
            docs.append(doc[key])
    return docs[start:stop]


def _lines(path: Path) -> str:
    if not path.exists():
        raise DataSourceError(f"text file {path} does not exist")
    return path.read_text(encoding="utf-8")


def load_text(source: str) -> str:
    """The text of a named source, as one string (documents joined by blank lines).

    Sources: ``wikitext2_test`` (raw test split), ``wikitext2_train`` / ``wikitext2_valid`` (tokenized
    splits), ``ptb_test`` / ``ptb_valid``, ``c4`` (all 1,000 documents), ``c4[a:b]`` (documents a..b-1).
    """
    d = data_dir()
    if source.startswith(GENERAL_PREFIX):
        from tyr.corpus import CorpusError, set_text

        try:
            return set_text(source[len(GENERAL_PREFIX) :])
        except CorpusError as e:
            raise DataSourceError(str(e)) from None
    if source == "wikitext2_test":
        # The usual recipe: "\n\n".join(HF rows) == the raw file's text.
        return _lines(d / "wikitext2" / "wiki.test.raw")
    if source in ("wikitext2_train", "wikitext2_valid"):
        return _lines(d / "wikitext2" / f"wiki.{source.split('_')[1]}.tokens")
    if source in ("ptb_test", "ptb_valid"):
        # Sentences joined with newlines, as in the files (lm-eval's ptb joins the same way).
        return _lines(d / "ptb" / f"ptb.{source.split('_')[1]}.txt")
    if source == "c4" or source.startswith("c4["):
        _, start, stop = _split_range(source)
        return "\n\n".join(_read_jsonl_texts(d / "c4_sample" / "c4_sample.jsonl", "text", start, stop))
    if source.startswith(("jsonl:", "parquet:")):
        return "\n\n".join(_local_documents(source))
    raise DataSourceError(f"unknown text source {source!r}; known: {KNOWN_SOURCES}")


def _split_range(spec: str) -> tuple[str, int, int | None]:
    """``'path[a:b]'`` -> (path, a, b); no brackets: the whole range."""
    if spec.endswith("]") and "[" in spec:
        path, rng = spec[:-1].rsplit("[", 1)
        try:
            a, b = rng.split(":")
            return path, int(a or 0), (int(b) if b else None)
        except ValueError:
            raise DataSourceError(f"text source {spec!r}: the range must be [a:b] with integers a, b") from None
    return spec, 0, None


def _local_documents(source: str) -> list[str]:
    """Documents ``a..b-1`` of local files (the ``text`` field), for calibration sets users bring
    themselves, e.g. FineWeb-Edu parquet shards: ``parquet:/data/fineweb-edu/*.parquet[0:8000]``.
    PATH may be a glob; files are read in sorted order and only until ``b`` documents are read."""
    import glob

    kind, spec = source.split(":", 1)
    pattern, start, stop = _split_range(spec)
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise DataSourceError(f"text source {source!r}: no files match {pattern!r}")
    docs: list[str] = []
    for f in files:
        if stop is not None and len(docs) >= stop:
            break
        if kind == "jsonl":
            docs.extend(_read_jsonl_texts(Path(f), "text", 0, None if stop is None else stop - len(docs)))
        else:
            import pyarrow.parquet as pq

            try:
                docs.extend(pq.read_table(f, columns=["text"]).column("text").to_pylist())
            except Exception as e:  # noqa: BLE001 - not parquet, no text column: the user's file
                raise DataSourceError(f"{f}: cannot read a 'text' column ({type(e).__name__}: {str(e)[:100]})") from None
    return docs[start:stop]


def check_source(source: str) -> None:
    """Everything about a text source that can be checked without tokenizing: the name is known,
    the files exist, and (jsonl) every line of the range used is a JSON object with a ``text``
    string; (parquet) every file has a ``text`` column. Raises :class:`DataSourceError`."""
    if "+" in source:
        for part in source.split("+"):
            check_source(part)
        return
    d = data_dir()
    fixed = {
        "wikitext2_test": d / "wikitext2" / "wiki.test.raw",
        "wikitext2_train": d / "wikitext2" / "wiki.train.tokens",
        "wikitext2_valid": d / "wikitext2" / "wiki.valid.tokens",
        "ptb_test": d / "ptb" / "ptb.test.txt",
        "ptb_valid": d / "ptb" / "ptb.valid.txt",
    }
    if source.startswith(GENERAL_PREFIX):
        from tyr.corpus import SETS, CorpusError, check_corpus

        if source[len(GENERAL_PREFIX) :] not in SETS:
            raise DataSourceError(f"unknown text source {source!r}; the general corpus's sets: {', '.join(SETS)}")
        try:
            check_corpus()
        except CorpusError as e:
            raise DataSourceError(str(e)) from None
    elif source in fixed:
        if not fixed[source].exists():
            raise DataSourceError(f"text source {source!r}: {fixed[source]} does not exist")
    elif source == "c4" or source.startswith("c4["):
        _, start, stop = _split_range(source)
        _read_jsonl_texts(d / "c4_sample" / "c4_sample.jsonl", "text", start, stop)
    elif source.startswith("jsonl:"):
        _local_documents(source)
    elif source.startswith("parquet:"):
        import glob

        pattern, _, _ = _split_range(source.split(":", 1)[1])
        files = sorted(glob.glob(os.path.expanduser(pattern)))
        if not files:
            raise DataSourceError(f"text source {source!r}: no files match {pattern!r}")
        import pyarrow.parquet as pq

        for f in files:
            try:
                names = pq.read_schema(f).names
            except Exception as e:  # noqa: BLE001
                raise DataSourceError(f"{f}: not a parquet file ({type(e).__name__})") from None
            if "text" not in names:
                raise DataSourceError(f"{f}: no 'text' column (columns: {', '.join(names[:8])})")
    else:
        raise DataSourceError(f"unknown text source {source!r}; known: {KNOWN_SOURCES}")


def check_spec(spec: TokenSetSpec, what: str) -> None:
    """A token set's numbers and source, checked before anything is loaded (``what``: its config path)."""
    if spec.seq_len < 2:
        raise DataSourceError(f"{what}.seq_len={spec.seq_len} must be at least 2")
    if spec.num_sequences == 0 or spec.num_sequences < -1:
        raise DataSourceError(f"{what}.num_sequences={spec.num_sequences} must be positive (or -1: all windows)")
    if spec.sampling not in ("random", "contiguous"):
        raise DataSourceError(f"{what}.sampling={spec.sampling!r} must be 'random' or 'contiguous'")
    if "+" in spec.source and (spec.sampling != "random" or spec.num_sequences < len(spec.source.split("+"))):
        raise DataSourceError(
            f"{what}.source={spec.source!r} mixes sources: it needs sampling=random and at least one sequence per source"
        )
    try:
        check_source(spec.source)
    except DataSourceError as e:
        raise DataSourceError(f"{what}.source: {e}") from None


# ------------------------------------------------------------------------------------------------
# Token sets
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSetSpec:
    """What a token set is made of.

    ``sampling='contiguous'``: the first ``num_sequences`` non-overlapping windows of the tokenized
    text in order (``num_sequences=-1``: all whole windows; the tail shorter than a window is dropped),
    as for perplexity. ``sampling='random'``: ``num_sequences`` distinct non-overlapping windows drawn
    with ``seed`` (calibration, search).
    """

    source: str
    seq_len: int
    num_sequences: int
    sampling: str = "random"
    seed: int = 0

    def key(self, tokenizer_id: str, prefix: tuple[int, ...] = ()) -> str:
        d = {**asdict(self), "tokenizer": tokenizer_id, "schema": TOKENSET_SCHEMA}
        if prefix:  # only tokenizers that open every text with special tokens: other keys stay as they were
            d["prefix"] = list(prefix)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TokenSet:
    input_ids: torch.Tensor  # int64 [N, T] in memory; int32 on disk
    metadata: dict[str, str]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from tyr import dist

        if not dist.is_main():  # rank 0 writes shared files; the other ranks built the same set in memory
            return
        tmp = path.with_suffix(".tmp")
        save_file({"input_ids": self.input_ids.to(torch.int32).numpy()}, str(tmp), metadata=self.metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> TokenSet:
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), "np") as f:
            meta = dict(f.metadata() or {})
        arr = load_file(str(path))["input_ids"]
        return cls(torch.from_numpy(arr.astype(np.int64)), meta)


def tokenizer_id(tokenizer) -> str:
    """A stable identity for a tokenizer: its class, size and a hash of its vocabulary."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}-{len(vocab)}-{h}"


def window_prefix(tokenizer) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before every text by default (Gemma-3 and Llama: the BOS
    token; SmolLM2: none). Every window of a token set starts with them, as the model saw its text in
    training: without its BOS, dense Gemma-3-270M reads WikiText-2 at perplexity 54 instead of 19."""
    probe = "The text."
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return tuple(int(t) for t in full[:i])
    return ()


def tokenize_text(text: str, tokenizer) -> np.ndarray:
    """Token ids of a long text, without special tokens. Tokenised in paragraph chunks so that very
    long texts neither warn nor blow up memory; chunk borders fall on blank lines."""
    parts, ids = text.split("\n\n"), []
    chunk: list[str] = []
    size = 0
    for i, p in enumerate(parts):
        chunk.append(p)
        size += len(p)
        if size > 200_000 or i == len(parts) - 1:
            piece = "\n\n".join(chunk) + ("\n\n" if i < len(parts) - 1 else "")
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            chunk, size = [], 0
    return np.asarray(ids, dtype=np.int64)


def _mixed_token_set(spec: TokenSetSpec, tokenizer, tokenizer_name: str) -> TokenSet:
    """``a+b+c``: ``num_sequences`` random windows split as evenly as the count allows over the sources
    (the first ones get the remainder), each source drawn with its own seed, then interleaved source
    by source, so that any prefix of the set (a search stage's first sequences) is a mix too."""
    parts = spec.source.split("+")
    counts = [spec.num_sequences // len(parts) + (i < spec.num_sequences % len(parts)) for i in range(len(parts))]
    sets = [
        build_token_set(TokenSetSpec(p, spec.seq_len, n, "random", spec.seed + 7919 * i), tokenizer, tokenizer_name)
        for i, (p, n) in enumerate(zip(parts, counts))
    ]
    order = [(i, j) for j in range(max(counts)) for i in range(len(parts)) if j < counts[i]]
    ids = torch.stack([sets[i].input_ids[j] for i, j in order])
    meta = {k: str(v) for k, v in asdict(spec).items()}
    meta.update(
        schema=str(TOKENSET_SCHEMA),
        tokenizer=tokenizer_name,
        tokenizer_id=tokenizer_id(tokenizer),
        source_tokens="+".join(s.metadata["source_tokens"] for s in sets),
    )
    if "prefix" in sets[0].metadata:
        meta["prefix"] = sets[0].metadata["prefix"]
    return TokenSet(ids, meta)


def build_token_set(spec: TokenSetSpec, tokenizer, tokenizer_name: str = "") -> TokenSet:
    if spec.seq_len <= 0:
        raise DataSourceError(f"seq_len must be positive, got {spec.seq_len}")
    if "+" in spec.source:
        return _mixed_token_set(spec, tokenizer, tokenizer_name)
    prefix = window_prefix(tokenizer)
    body = spec.seq_len - len(prefix)  # text tokens per window
    if body <= 0:
        raise DataSourceError(f"seq_len {spec.seq_len} leaves no text after the tokenizer's {len(prefix)} leading tokens")
    ids = tokenize_text(load_text(spec.source), tokenizer)
    n_windows = len(ids) // body
    want = n_windows if spec.num_sequences == -1 else spec.num_sequences
    if want <= 0 or want > n_windows:
        raise TextTooShortError(
            f"token set from {spec.source!r}: asked for {want} windows of {spec.seq_len} tokens "
            f"({max(want, 0) * spec.seq_len:,} tokens) but the text holds {len(ids):,} tokens "
            f"({n_windows} whole windows). Use fewer or shorter sequences, or another source."
        )
    windows = ids[: n_windows * body].reshape(n_windows, body)
    if prefix:
        windows = np.concatenate([np.tile(np.asarray(prefix, dtype=ids.dtype), (n_windows, 1)), windows], axis=1)
    if spec.sampling == "contiguous":
        chosen = windows[:want]
    elif spec.sampling == "random":
        rng = np.random.default_rng(spec.seed)
        chosen = windows[np.sort(rng.choice(n_windows, size=want, replace=False))]
    else:
        raise ValueError(f"sampling must be 'random' or 'contiguous', got {spec.sampling!r}")
    meta = {k: str(v) for k, v in asdict(spec).items()}
    meta.update(
        schema=str(TOKENSET_SCHEMA), tokenizer=tokenizer_name, tokenizer_id=tokenizer_id(tokenizer), source_tokens=str(len(ids))
    )
    if prefix:
        meta["prefix"] = ",".join(map(str, prefix))
    return TokenSet(torch.from_numpy(np.ascontiguousarray(chosen)), meta)


def token_set_key(spec: TokenSetSpec, tokenizer) -> str:
    """What a token set is keyed by: its spec, the tokenizer's identity and the tokens it opens windows with."""
    return spec.key(tokenizer_id(tokenizer), window_prefix(tokenizer))


def get_token_set(spec: TokenSetSpec, tokenizer, cache: str | Path, tokenizer_name: str = "") -> TokenSet:
    """Build a token set once and cache it under ``cache/<key>.safetensors``."""
    name = spec.source.replace("[", "_").replace(":", "-").replace("]", "").replace("+", "_")[:80]
    path = Path(cache) / f"{name}-{token_set_key(spec, tokenizer)}.safetensors"
    if path.exists():
        return TokenSet.load(path)
    ts = build_token_set(spec, tokenizer, tokenizer_name)
    ts.save(path)
    log.info("token set %s: %d x %d tokens -> %s", spec.source, *ts.input_ids.shape, path)
    return ts
