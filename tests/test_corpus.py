"""The general corpus (issue #32): the committed split is what the code makes of the shipped files, its sets are
disjoint in their *text* (not only in their ids), held-out books stay held out, and every stage refuses
evaluation text. Oracles: the texts themselves (paragraph hashes), the raw files' sha256, the settings check."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from tyr import corpus
from tyr.data import DataSourceError, load_text, refuse_eval_text


@pytest.fixture(scope="module")
def splits():
    return json.loads((corpus.corpus_dir() / "splits.json").read_text())


def test_committed_split_is_what_the_code_makes(splits):
    assert corpus.make_splits(corpus.corpus_dir()) == splits


def test_sets_are_disjoint_in_ids_and_in_text(splits):
    ids = [i for s in corpus.SETS for i in splits["sets"][s]]
    assert len(ids) == len(set(ids)) and not set(ids) & set(splits["unused"])
    # independent of the ids: no paragraph of 200+ characters appears in two sets
    seen: dict[str, str] = {}
    for s in corpus.SETS:
        for para in re.split(r"\n\s*\n", corpus.set_text(s)):
            if len(para) < 200:
                continue
            h = hashlib.sha1(para.strip().encode()).hexdigest()
            assert seen.setdefault(h, s) == s, f"a paragraph of {s} is also in {seen[h]}: {para[:80]!r}"


def test_held_out_books_and_sizes(splits):
    def books_of(s):
        return {i.split("#")[0] for i in splits["sets"][s] if i.startswith("books/")}

    assert books_of("test") == {"books/14881.txt"} and books_of("dev") == {"books/14263.txt"}
    for s in ("calibration", "search", "recovery"):
        assert not books_of(s) & {"books/14881.txt", "books/14263.txt"}
    for s in ("dev", "test"):
        chars = sum(v["chars"] for v in splits["counts"][s].values())
        assert chars == len(corpus.set_text(s)) - 2 * (len(splits["sets"][s]) - 1)  # joined by blank lines
        assert chars >= 4 * 64_000 * 2  # >= 64K tokens at >= 4 characters a token, twice over
        assert all(splits["counts"][s][d]["documents"] > 0 for d in corpus.DOMAINS)


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "general"
    shutil.copytree(corpus.corpus_dir(), root)
    f = root / "code" / "bisect.py"
    f.write_text(f.read_text() + "\n# edited\n")
    corpus._load.cache_clear()
    with pytest.raises(corpus.CorpusError, match="code/bisect.py"):
        corpus.set_text("test", root)
    corpus._load.cache_clear()


@pytest.mark.parametrize(
    "source",
    ["general_test", "general_dev", "wikitext2_test", "ptb_test", "c4[0:10]+general_test", "jsonl:{data}/boolq/dev.jsonl"],
)
def test_stages_refuse_evaluation_text(source):
    from tyr.data import data_dir

    with pytest.raises(DataSourceError, match="evaluation"):
        refuse_eval_text(source.format(data=data_dir()), "data.search.source")


@pytest.mark.parametrize("source", ["general_calibration", "general_search", "general_recovery", "c4[0:600]", "wikitext2_valid"])
def test_stages_may_read_training_and_validation_text(source):
    refuse_eval_text(source, "data.search.source")
    assert len(load_text(source)) > 100_000
