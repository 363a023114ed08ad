"""The general corpus shipped in ``data/general/``: real English text from four domains (web pages from C4,
Wikipedia articles, Project Gutenberg books, Python source), split once into disjoint sets by document:

    calibration   the local pruner's statistics and gradients
    search        the search's fitness text (the teacher's top-k cache)
    recovery      distillation text
    dev           development decisions (which settings to keep): read by evaluation only
    test          the general test slice: read by evaluation only (tyr.data.EVAL_ONLY_SOURCES)

The split is a committed file, ``data/general/splits.json`` (document ids per set, the raw files' sha256),
made by :func:`make_splits` (``python -m tyr.corpus`` rewrites it; a test checks the committed file is what
the function makes from the shipped files). Test and dev books are whole books that no other set reads
(held-out books); code files are never cut between sets. Each set's text is its documents joined by blank
lines, in the split file's order (seeded, domains interleaved, so any prefix of a set is a mix).

Text sources (:mod:`tyr.data`): ``general_calibration``, ``general_search``, ``general_recovery``,
``general_dev``, ``general_test``.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tyr.utils import data_dir

SPLITS_SCHEMA = 1
SETS = ("calibration", "search", "recovery", "dev", "test")
DOMAINS = ("web", "wiki", "books", "code")
# characters per set and domain (about 4 characters per token); recovery takes every document left
QUOTAS = {
    "test": {"web": 240_000, "wiki": 120_000, "books": 120_000, "code": 40_000},
    "dev": {"web": 240_000, "wiki": 120_000, "books": 120_000, "code": 40_000},
    "calibration": {"web": 480_000, "wiki": 240_000, "books": 240_000, "code": 80_000},
    "search": {"web": 240_000, "wiki": 120_000, "books": 120_000, "code": 40_000},
}
HELD_OUT_BOOKS = {"test": "14881.txt", "dev": "14263.txt"}  # whole books: no other set reads them
CHUNK_CHARS = 8_000  # books are cut into documents of about this size, at blank lines
MIN_ARTICLE_CHARS = 500  # Wikipedia stubs below this are left out
SEED = 0


class CorpusError(ValueError):
    """The shipped corpus or its split file is missing or changed (one-line message)."""


@dataclass(frozen=True)
class Document:
    id: str  # "<domain>/<file>#<index>"
    text: str

    @property
    def domain(self) -> str:
        return self.id.split("/", 1)[0]


def corpus_dir() -> Path:
    return data_dir() / "general"


def _chunks(text: str, size: int) -> list[str]:
    """``text`` cut at blank lines into pieces of about ``size`` characters (a paragraph is never cut)."""
    out, cur, n = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        cur.append(para)
        n += len(para) + 2
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def _book_body(raw: bytes) -> str:
    """A Project Gutenberg e-text between its ``*** START`` and ``*** END`` lines, with Unix line ends."""
    text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, flags=re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", text, flags=re.M)
    if not start or not end:
        raise CorpusError("a book without Project Gutenberg START / END lines")
    return text[start.end() : end.start()].strip()


_WIKI_DOC = re.compile(r'<doc id="(\d+)"[^>]*>\n(.*?)</doc>', flags=re.S)


def domain_documents(root: Path, domain: str) -> list[Document]:
    """Every document of ``domain`` under ``root``, in file order."""
    files = sorted(p for p in (root / domain).rglob("*") if p.is_file() and p.name not in ("SOURCE.md", "LICENSE.txt"))
    docs: list[Document] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if domain == "web":
            import pyarrow.parquet as pq

            docs += [
                Document(f"{rel}#{i}", t) for i, t in enumerate(pq.read_table(f, columns=["text"]).column("text").to_pylist())
            ]
        elif domain == "wiki":
            for m in _WIKI_DOC.finditer(f.read_text(encoding="utf-8")):
                body = html.unescape(m.group(2)).strip()
                if len(body) >= MIN_ARTICLE_CHARS:
                    docs.append(Document(f"{rel}#{m.group(1)}", body))
        elif domain == "books":
            docs += [Document(f"{rel}#{i}", c) for i, c in enumerate(_chunks(_book_body(f.read_bytes()), CHUNK_CHARS))]
        elif domain == "code":
            docs.append(Document(f"{rel}#0", f.read_text(encoding="utf-8")))
        else:
            raise CorpusError(f"unknown domain {domain!r}")
    return docs


def file_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in DOMAINS
        for p in sorted((root / d).rglob("*"))
        if p.is_file() and p.name not in ("SOURCE.md", "LICENSE.txt")
    }


def make_splits(root: Path, seed: int = SEED) -> dict:
    """The split of every document under ``root`` into :data:`SETS` (see the module docstring)."""
    import numpy as np

    sets: dict[str, list[Document]] = {s: [] for s in SETS}
    unused: list[str] = []
    for domain in DOMAINS:
        docs = domain_documents(root, domain)
        order = np.random.default_rng([seed, DOMAINS.index(domain)]).permutation(len(docs))
        filled = dict.fromkeys(QUOTAS, 0)
        for i in order:
            doc = docs[int(i)]
            book = doc.id.split("/", 1)[1].split("#")[0] if domain == "books" else None
            held = {s for s, b in HELD_OUT_BOOKS.items() if b == book}
            candidates = sorted(held) if held else [s for s in QUOTAS if s not in HELD_OUT_BOOKS or domain != "books"]
            # a set takes a document while it stays within its quota (+10 %: a long file goes elsewhere)
            target = next((s for s in candidates if filled[s] + len(doc.text) <= 1.1 * QUOTAS[s][domain]), None)
            if target is None:
                if held:  # the rest of a held-out book is read by no set
                    unused.append(doc.id)
                    continue
                target = "recovery"
            else:
                filled[target] += len(doc.text)
            sets[target].append(doc)
    out = {"schema": SPLITS_SCHEMA, "seed": seed, "quotas": QUOTAS, "held_out_books": HELD_OUT_BOOKS, "files": file_digests(root)}
    out["sets"], out["counts"] = {}, {}
    for s in SETS:
        docs = [sets[s][int(i)] for i in np.random.default_rng([seed, 100 + SETS.index(s)]).permutation(len(sets[s]))]
        out["sets"][s] = [d.id for d in docs]
        out["counts"][s] = {
            d: {"documents": sum(x.domain == d for x in docs), "chars": sum(len(x.text) for x in docs if x.domain == d)}
            for d in DOMAINS
        }
    out["unused"] = unused
    return out


@lru_cache(maxsize=2)
def _load(root: str) -> tuple[dict, dict[str, str]]:
    root_p = Path(root)
    path = root_p / "splits.json"
    if not path.exists():
        raise CorpusError(f"{path} does not exist (the general corpus ships with tyr in data/general)")
    splits = json.loads(path.read_text())
    if splits.get("schema") != SPLITS_SCHEMA:
        raise CorpusError(f"{path}: schema {splits.get('schema')}, this tyr reads {SPLITS_SCHEMA}")
    digests = file_digests(root_p)
    if digests != splits["files"]:
        changed = sorted(set(digests.items()) ^ set(splits["files"].items()))
        raise CorpusError(f"{root_p}: the corpus files differ from those the split was made of ({changed[0][0]}, ...)")
    docs = {d.id: d.text for domain in DOMAINS for d in domain_documents(root_p, domain)}
    return splits, docs


def set_text(name: str, root: Path | None = None) -> str:
    """The text of set ``name`` (one of :data:`SETS`): its documents joined by blank lines."""
    if name not in SETS:
        raise CorpusError(f"unknown general set {name!r}; known: {', '.join(SETS)}")
    splits, docs = _load(str(root or corpus_dir()))
    return "\n\n".join(docs[i] for i in splits["sets"][name])


def check_corpus(root: Path | None = None) -> None:
    """The corpus files and split file are present and unchanged (raises :class:`CorpusError`)."""
    _load(str(root or corpus_dir()))


if __name__ == "__main__":  # rewrite data/general/splits.json from the shipped files
    root = corpus_dir()
    splits = make_splits(root)
    (root / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    for s, c in splits["counts"].items():
        print(s, {d: v["chars"] for d, v in c.items()}, sum(v["chars"] for v in c.values()))
    print("unused (held-out book remainders):", len(splits["unused"]))
