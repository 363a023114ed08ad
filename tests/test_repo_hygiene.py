"""What a fresh clone on another machine needs from the tracked tree (issue #31): no symbolic links (a
link to a folder of the developer's machine broke `make demo` everywhere else, and CI, which runs where
the target exists, could not see it), and no absolute paths of this machine in code, configs, docs or
results (results record paths relative to the repository root or to ``$TYR_CACHE``).

The oracle is git's own index (mode 120000 marks a link) and the file system; the path patterns are
those of a developer's machine: home folders, the workplace root, and this checkout's own location."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

MACHINE_ROOTS = r"(?:work|root|home|Users|mnt|scratch|private/var/folders)"


def _git(*args: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def _tracked(root: Path) -> list[str]:
    return [p for p in _git("ls-files", "-z", root=root).split("\0") if p]


def machine_path_pattern(root: Path) -> re.Pattern:
    """Absolute paths that name a machine: under a home or workplace root, or this checkout's location."""
    own = {str(root.resolve()), str(Path.home())} - {"/"}
    alternatives = [rf"(?<![\w.~$-])/{MACHINE_ROOTS}/[\w.-]+", r"\b[A-Z]:\\Users\\"] + [re.escape(o) + r"(?![\w-])" for o in own]
    return re.compile("|".join(alternatives))


def tracked_symlinks(root: Path) -> list[str]:
    """Links in the index (mode 120000) and tracked paths that are links in the work tree."""
    staged = [line.split("\t", 1)[1] for line in _git("ls-files", "-s", root=root).splitlines() if line.startswith("120000 ")]
    return sorted(set(staged) | {p for p in _tracked(root) if (root / p).is_symlink()})


def machine_paths(root: Path) -> list[str]:
    """``file:line: match`` for every machine path in a tracked text file but the shipped data sets (copied
    byte for byte: a web page may mention ``/root``); results (experiments/results) hold no absolute path."""
    pattern, hits = machine_path_pattern(root), []
    any_absolute = re.compile(r'"/[^"\s]+"|(?<![\w.~$-])/tmp/[\w.-]+')  # a whole path, or a temporary one in a message
    for rel in _tracked(root):
        path = root / rel
        if path.is_symlink() or not path.is_file() or rel.startswith("data/"):  # data/: third-party text, byte for byte
            continue
        if rel == "tests/test_repo_hygiene.py":  # this file: the paths it plants and names as examples
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images)
            continue
        text = data.decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            for m in pattern.finditer(line):
                hits.append(f"{rel}:{n}: {m.group(0)}")
            if rel.startswith("experiments/results/"):
                hits += [f"{rel}:{n}: {m.group(0)}" for m in any_absolute.finditer(line)]
    return hits


needs_git = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")


@needs_git
def test_no_tracked_symlinks():
    assert tracked_symlinks(ROOT) == []


@needs_git
def test_no_machine_paths_in_tracked_files():
    hits = machine_paths(ROOT)
    assert hits == [], "\n".join(hits[:20])


@needs_git
def test_the_checks_catch_a_planted_link_and_a_planted_path(tmp_path):
    """The two checks above fail on a deliberately added symlink and absolute path (staged in a copy)."""
    repo = tmp_path / "clone"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "conf").mkdir()
    (repo / "conf" / "ok.yaml").write_text("output_dir: runs   # relative\nexample: /path/to/checkpoint_folder\n")
    (repo / "experiments" / "results").mkdir(parents=True)
    (repo / "experiments" / "results" / "ok.json").write_text('{"run": "runs/pipeline/x"}\n')
    _git("add", "-A", root=repo)
    assert tracked_symlinks(repo) == [] and machine_paths(repo) == []

    os.symlink("/work/runs", repo / "runs")  # what 8ceb893 committed
    _git("add", "runs", root=repo)
    assert tracked_symlinks(repo) == ["runs"]
    _git("rm", "-q", "--cached", "runs", root=repo)
    (repo / "runs").unlink()

    for rel, line, found in [
        ("tyr_script.sh", "P=/work/main/.venv/bin/python\n", "/work/main"),
        ("conf/cache.yaml", f"cache_dir: {Path.home()}/.cache/tyr\n", str(Path.home())),
        ("experiments/results/r.json", '{"run": "/srv/runs/pipeline/x"}\n', '"/srv/runs/pipeline/x"'),
        ("experiments/results/e.json", '{"error": "no repo \'/tmp/tyr-compat-ab12/padded\'"}\n', "/tmp/tyr-compat-ab12"),
        ("docs/notes.md", f"ran in {repo.resolve()}/runs\n", str(repo.resolve())),
    ]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(line)
        _git("add", rel, root=repo)
        hits = machine_paths(repo)
        assert len(hits) >= 1 and all(h.startswith(f"{rel}:1: ") for h in hits) and any(found in h for h in hits), hits
        _git("rm", "-q", "--cached", rel, root=repo)
        (repo / rel).unlink()
    assert machine_paths(repo) == []


@needs_git
def test_run_outputs_are_ignored_as_files_or_links(tmp_path):
    """runs, outputs, multirun stay out of `git add -A` whether they are folders, files or links (the old
    ``runs/`` pattern matched folders only, so a link went in unnoticed). Oracle: git itself, on a copy
    of the repository's .gitignore."""
    repo = tmp_path / "clone"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_bytes((ROOT / ".gitignore").read_bytes())
    os.symlink("/nowhere/runs", repo / "runs")
    (repo / "outputs").write_text("a file")
    (repo / "multirun").mkdir()
    (repo / "multirun" / "x.json").write_text("{}")
    (repo / "tyr").mkdir()
    os.symlink("/nowhere/runs", repo / "tyr" / "runs")  # only the top-level names are run outputs
    _git("add", "-A", root=repo)
    assert sorted(_tracked(repo)) == [".gitignore", "tyr/runs"]
