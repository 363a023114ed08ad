"""The tokenizer of a GGUF (tyr.export.gguf_vocab) against tokenizer oracles: llama.cpp's tokenization of
text with the written file equals transformers' (the tokenizer copied from the source GGUF and the one
built from the Hugging Face tokenizer), and, for a SentencePiece model, SentencePiece's BPE worked out by
hand."""

from __future__ import annotations

import json
import struct

import gguf
import pytest
from test_families import _family
from test_gguf import _exported

from tyr.export.gguf import write_gguf
from tyr.export.llamacpp import open_llama

from conftest import compose


def test_tokenizers(tmp, smollm2_gguf):
    """The tokenizer copied from the source GGUF and the one built from the Hugging Face tokenizer both
    tokenize text as the Hugging Face tokenizer does (llama.cpp's tokenizer against transformers')."""
    lm = _family("tiny-llama")
    _, folder = _exported("tiny-llama", "uneven", tmp)
    texts = ["The capital of France is Paris.", "  def f(x):\n\treturn x**2  # 3.14 ünïcödé 🦙", "<|im_start|>user\nHi<|im_end|>"]
    for src, expect in ((None, "built: gpt2 BPE, pre-tokenizer smollm"), (smollm2_gguf, "copied from")):
        rec = write_gguf(folder, tmp / "tok.gguf", "f32", tokenizer_gguf=src)
        assert rec["tokenizer"].startswith(expect)
        llm = open_llama(rec["out"], vocab_only=True, verbose=False)
        try:
            for text in texts:
                want = lm.tokenizer(text, add_special_tokens=False).input_ids
                assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, (expect, text)
        finally:
            llm.close()
    fields = gguf.GGUFReader(tmp / "tok.gguf").fields
    source = gguf.GGUFReader(smollm2_gguf).fields
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert fields[key].contents() == source[key].contents()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-tokenizer")


@pytest.fixture(scope="module")
def smollm2_gguf():
    from hydra.utils import instantiate

    src = instantiate(compose("evaluate", ["model=smollm2-135m"]).model.source)
    return src.locate_gguf("smollm2-135m")


def _sentencepiece_model(pieces: list[tuple[str, float, int]]) -> bytes:
    """A SentencePiece model file (the ModelProto's pieces: piece 1, score 2, type 3), encoded by hand."""

    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out += bytes([n & 0x7F | 0x80])
            n >>= 7
        return out + bytes([n])

    def sub(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    out = b""
    for piece, score, kind in pieces:
        msg = sub(1, piece.encode()) + varint(2 << 3 | 5) + struct.pack("<f", score) + varint(3 << 3) + varint(kind)
        out += sub(1, msg)
    return out


def test_sentencepiece_tokenizer_is_built_with_its_scores(tmp):
    """A folder with a SentencePiece tokenizer.model (Llama 2, Mistral 7B): the GGUF holds its pieces,
    scores and types, and llama.cpp then tokenizes as SentencePiece's BPE does, worked out by hand here:
    "abc" -> "▁abc" merges the best-scored pair first ("ab", then nothing): ▁ ab c. With equal scores
    (the placeholder of a tokenizer.json-only build) the leftmost pair would win: ▁a bc."""
    _, exported = _exported("tiny-llama", "uneven", tmp)
    folder = tmp / "spm"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((exported / f).read_bytes())
    bytes_ = [(f"<0x{i:02X}>", 0.0, 6) for i in range(256)]
    normal = [("\u2581a", -3.0, 1), ("bc", -2.0, 1), ("ab", -1.0, 1), ("\u2581", -4.0, 1), ("a", -5.0, 1), ("b", -6.0, 1)]
    (folder / "tokenizer.model").write_bytes(
        _sentencepiece_model([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), *bytes_, *normal, ("c", -7.0, 1)])
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    rec = write_gguf(folder, tmp / "spm.gguf", "f32")
    assert rec["tokenizer"] == "built: llama (SentencePiece tokenizer.model)"
    fields = gguf.GGUFReader(rec["out"]).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.scores"].contents()[259:266] == [-3.0, -2.0, -1.0, -4.0, -5.0, -6.0, -7.0]
    assert (
        fields["tokenizer.ggml.token_type"].contents()[:4] == [2, 3, 3, 6] and len(fields["tokenizer.ggml.tokens"].data) == 49152
    )
    llm = open_llama(rec["out"], vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(b"abc", add_bos=False) == [262, 261, 265]  # ▁ ab c
        assert llm.tokenize(b"ab c", add_bos=False) == [262, 261, 262, 265]  # ▁ ab ▁ c
        assert llm.tokenize("é".encode(), add_bos=False) == [262, 3 + 0xC3, 3 + 0xA9]  # byte fallback
        assert llm.tokenize(b"abc", add_bos=True)[0] == 1
    finally:
        llm.close()
