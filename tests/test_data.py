"""Token sets: built from real text, saved as int32 safetensors with metadata, round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from tyr.data import (
    DataSourceError,
    TextTooShortError,
    TokenSet,
    TokenSetSpec,
    build_token_set,
    get_token_set,
    load_text,
    tokenize_text,
)


def test_round_trip(tiny, tmp_path):
    spec = TokenSetSpec("c4[0:50]", seq_len=64, num_sequences=10, sampling="random", seed=3)
    ts = build_token_set(spec, tiny.tokenizer, "smollm2-135m")
    assert ts.input_ids.shape == (10, 64) and ts.input_ids.dtype == torch.int64
    ts.save(tmp_path / "t.safetensors")
    back = TokenSet.load(tmp_path / "t.safetensors")
    assert torch.equal(back.input_ids, ts.input_ids)
    assert back.metadata == ts.metadata
    for k in ("source", "seq_len", "seed", "tokenizer", "tokenizer_id", "sampling", "num_sequences"):
        assert k in back.metadata
    assert back.metadata["seq_len"] == "64" and back.metadata["source"] == "c4[0:50]"


def test_random_windows_seeded_and_distinct(tiny):
    a = build_token_set(TokenSetSpec("c4[0:50]", 32, 20, seed=1), tiny.tokenizer).input_ids
    b = build_token_set(TokenSetSpec("c4[0:50]", 32, 20, seed=1), tiny.tokenizer).input_ids
    c = build_token_set(TokenSetSpec("c4[0:50]", 32, 20, seed=2), tiny.tokenizer).input_ids
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 20


def test_contiguous_windows_are_the_tokenized_text(tiny):
    ids = tokenize_text(load_text("ptb_test"), tiny.tokenizer)
    ts = build_token_set(TokenSetSpec("ptb_test", 128, -1, sampling="contiguous"), tiny.tokenizer)
    n = len(ids) // 128
    assert ts.input_ids.shape == (n, 128)
    assert torch.equal(ts.input_ids.reshape(-1), torch.as_tensor(ids[: n * 128]))


def test_calibration_and_search_sources_are_disjoint():
    calib, search = load_text("c4[0:600]"), load_text("c4[600:1000]")
    assert calib and search and calib.split("\n\n")[-1] not in search


def test_text_too_short_is_a_clear_error(tiny):
    with pytest.raises(TextTooShortError, match="asked for 100000 windows"):
        build_token_set(TokenSetSpec("c4[0:2]", 512, 100000), tiny.tokenizer)


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown text source"):
        load_text("bookcorpus")


def test_cache_reuses_file(tiny, tmp_path):
    spec = TokenSetSpec("c4[0:20]", 32, 4, seed=0)
    a = get_token_set(spec, tiny.tokenizer, tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    b = get_token_set(spec, tiny.tokenizer, tmp_path)
    assert torch.equal(a.input_ids, b.input_ids) and list(tmp_path.glob("*.safetensors")) == files


def test_local_jsonl_and_parquet_sources(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tyr.data import load_text

    docs = [f"document number {i}" for i in range(10)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:6])))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[6:]))
    pq.write_table(pa.table({"text": docs[:5], "score": list(range(5))}), tmp_path / "s0.parquet")
    pq.write_table(pa.table({"text": docs[5:], "score": list(range(5))}), tmp_path / "s1.parquet")
    assert load_text(f"jsonl:{tmp_path}/*.jsonl") == "\n\n".join(docs)
    assert load_text(f"jsonl:{tmp_path}/*.jsonl[4:8]") == "\n\n".join(docs[4:8])
    assert load_text(f"parquet:{tmp_path}/*.parquet[3:7]") == "\n\n".join(docs[3:7])
    assert load_text(f"parquet:{tmp_path}/*.parquet[:2]") == "\n\n".join(docs[:2])
    with pytest.raises(DataSourceError, match="no files match"):
        load_text(f"parquet:{tmp_path}/missing/*.parquet")


def test_mixed_source_draws_from_each_text_in_turn(tiny, tmp_path):
    """``a+b``: the windows alternate between the sources, and every window is a whole window of its own
    source's tokenized text (found by brute force), none repeated; the split is as even as the count allows."""
    from tyr.data import check_spec

    spec = TokenSetSpec("ptb_valid+c4[0:50]", 32, 7, seed=3)
    ids = get_token_set(spec, tiny.tokenizer, tmp_path).input_ids
    assert ids.shape == (7, 32)
    texts = [tokenize_text(load_text(s), tiny.tokenizer) for s in ("ptb_valid", "c4[0:50]")]
    whole = [{tuple(t[i : i + 32].tolist()) for i in range(0, len(t) - 31, 32)} for t in texts]
    owner = [[k for k in (0, 1) if tuple(w.tolist()) in whole[k]] for w in ids]
    assert owner == [[0], [1], [0], [1], [0], [1], [0]]  # 4 + 3, interleaved
    assert len({tuple(w.tolist()) for w in ids}) == 7
    with pytest.raises(DataSourceError, match="mixes sources"):
        check_spec(TokenSetSpec("ptb_valid+c4[0:50]", 32, 4, sampling="contiguous"), "data.search")
    with pytest.raises(DataSourceError, match="unknown text source"):
        check_spec(TokenSetSpec("ptb_valid+nonsense", 32, 4), "data.search")


class _BosTokenizer:
    """The tiny model's tokenizer, made to open every text with a BOS by default (as Gemma-3's and
    Llama's do); ``add_special_tokens=False`` gives the plain ids."""

    def __init__(self, inner, bos: int):
        self.inner, self.bos = inner, bos

    def __call__(self, text, add_special_tokens=True):
        ids = list(self.inner(text, add_special_tokens=False)["input_ids"])
        return {"input_ids": ([self.bos] if add_special_tokens else []) + ids}

    def get_vocab(self):
        return self.inner.get_vocab()


def test_windows_open_with_the_tokenizers_bos(tiny, tmp_path):
    """A tokenizer that adds a BOS by default gets it at the start of every window, followed by the next
    seq_len - 1 tokens of the text (contiguous: in order, none skipped); a tokenizer that adds nothing keeps
    the plain windows and the cache key it had before the rule."""
    from tyr.data import token_set_key, window_prefix

    bos = 1
    tok = _BosTokenizer(tiny.tokenizer, bos)
    assert window_prefix(tok) == (bos,) and window_prefix(tiny.tokenizer) == ()
    ids = tokenize_text(load_text("ptb_test"), tiny.tokenizer)
    spec = TokenSetSpec("ptb_test", 64, -1, sampling="contiguous")
    ts = get_token_set(spec, tok, tmp_path)
    n = len(ids) // 63
    assert ts.input_ids.shape == (n, 64)
    assert (ts.input_ids[:, 0] == bos).all()
    assert torch.equal(ts.input_ids[:, 1:].reshape(-1), torch.as_tensor(ids[: n * 63]))
    assert ts.metadata["prefix"] == "1"
    # random windows: each is a BOS and a whole 63-token window of the text (found by brute force)
    whole = {tuple(ids[i : i + 63].tolist()) for i in range(0, len(ids) - 62, 63)}
    rnd = get_token_set(TokenSetSpec("ptb_test", 64, 9, seed=4), tok, tmp_path).input_ids
    assert (rnd[:, 0] == bos).all() and all(tuple(w[1:].tolist()) in whole for w in rnd)
    mixed = get_token_set(TokenSetSpec("ptb_valid+c4[0:50]", 64, 4, seed=1), tok, tmp_path)
    assert (mixed.input_ids[:, 0] == bos).all() and mixed.metadata["prefix"] == "1"
    # the key: a BOS tokenizer's set is not the plain one; the plain key is the pre-rule formula
    assert token_set_key(spec, tok) != token_set_key(spec, tiny.tokenizer)
    import hashlib
    import json
    from dataclasses import asdict

    from tyr.data import TOKENSET_SCHEMA, tokenizer_id

    blob = json.dumps({**asdict(spec), "tokenizer": tokenizer_id(tiny.tokenizer), "schema": TOKENSET_SCHEMA}, sort_keys=True)
    assert token_set_key(spec, tiny.tokenizer) == hashlib.sha256(blob.encode()).hexdigest()[:16]
