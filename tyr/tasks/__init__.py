"""Zero-shot tasks by their standard lm-eval names: local files over the repo's data where tyr ships
the data, lm-eval's built-in tasks (which need their data set from the Hub, or its cache) otherwise.

Local tasks (:data:`TASKS`: arc_easy, arc_challenge, boolq, openbookqa, piqa): each task's documents
are normalised once to ``{"query", "choices", "gold"}`` JSONL with the same prompts as lm-eval's
built-in task of the same name, and a YAML naming that file is written next to it;
``TaskManager(include_path=...)`` then finds the tasks by name (``tyr_<name>``). Any other name is
an lm-eval task (hellaswag, winogrande, ...): :func:`check_tasks` says in one line what is missing
before a model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from tyr.data import data_dir

# lm-eval built-in tasks whose folder under lm_eval/tasks is known (indexing one folder takes about a
# second, all of lm-eval's ~20 s): name -> (folder, metric reported: acc_norm where lm-eval reports it).
BUILTIN = {"hellaswag": ("hellaswag", "acc_norm"), "winogrande": ("winogrande", "acc")}


class UnknownTaskError(ValueError):
    """A zero-shot task name that is neither a local task nor registered in lm-eval."""


class TaskDataMissingError(RuntimeError):
    """An lm-eval built-in task whose data set cannot be loaded (offline and not cached)."""


_LETTERS = "ABCDE"


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _arc(path: Path) -> Iterator[dict]:
    # lm-eval arc_easy / arc_challenge: "Question: {q}\nAnswer:", numeric labels mapped to A-E.
    for d in _jsonl(path):
        labels = [c["label"] for c in d["question"]["choices"]]
        key = d["answerKey"]
        if key.isdigit() and key not in labels:
            key = _LETTERS[int(key) - 1]
        labels = [_LETTERS[int(x) - 1] if x.isdigit() else x for x in labels]
        yield {
            "query": f"Question: {d['question']['stem']}\nAnswer:",
            "choices": [c["text"] for c in d["question"]["choices"]],
            "gold": labels.index(key if not key.isdigit() else _LETTERS[int(key) - 1]),
        }


def _boolq(path: Path) -> Iterator[dict]:
    # lm-eval boolq (SuperGLUE): "{passage}\nQuestion: {question}?\nAnswer:", choices no / yes.
    for d in _jsonl(path):
        yield {
            "query": f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
            "choices": ["no", "yes"],
            "gold": int(bool(d["answer"])),
        }


def _openbookqa(path: Path) -> Iterator[dict]:
    # lm-eval openbookqa: the question stem as the prompt.
    for d in _jsonl(path):
        labels = [c["label"] for c in d["question"]["choices"]]
        yield {
            "query": d["question"]["stem"],
            "choices": [c["text"] for c in d["question"]["choices"]],
            "gold": labels.index(d["answerKey"].strip()),
        }


def _piqa(path: Path) -> Iterator[dict]:
    # lm-eval piqa: "Question: {goal}\nAnswer:", choices sol1 / sol2; labels in a separate file.
    labels = [int(x) for x in (path.parent / "valid-labels.lst").read_text().split()]
    for d, y in zip(_jsonl(path), labels, strict=True):
        yield {"query": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "gold": y}


# name -> (data file relative to data/, converter, lm-eval metric to report)
TASKS: dict[str, tuple[str, Callable[[Path], Iterator[dict]], str]] = {
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl", _arc, "acc_norm"),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl", _arc, "acc_norm"),
    "boolq": ("boolq/dev.jsonl", _boolq, "acc"),
    "openbookqa": ("openbookqa/test.jsonl", _openbookqa, "acc_norm"),
    "piqa": ("piqa/valid.jsonl", _piqa, "acc_norm"),
}

_YAML = """task: tyr_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def task_manager(names: list[str], include_path: list[str] | None = None):
    """An lm-eval ``TaskManager`` that knows the built-in tasks among ``names`` (only their folders when
    all are in :data:`BUILTIN`, else all of lm-eval's) plus the folders of ``include_path``."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    builtin = [n for n in names if n not in TASKS]
    root = Path(lm_eval.tasks.__file__).parent
    folders = [str(root / BUILTIN[n][0]) for n in builtin if n in BUILTIN]
    full = any(n not in BUILTIN for n in builtin)
    return TaskManager(include_path=[*(include_path or []), *folders] or None, include_defaults=full)


def metric_of(name: str, metrics: dict[str, float]) -> str:
    """The metric reported for a task: acc_norm for ARC / OBQA / PIQA / HellaSwag, acc for BoolQ /
    WinoGrande, acc_norm (else acc, else the first) for other lm-eval tasks."""
    if name in TASKS:
        return TASKS[name][2]
    if name in BUILTIN:
        return BUILTIN[name][1]
    return next((m for m in ("acc_norm", "acc") if m in metrics), next(iter(metrics)))


def check_tasks(names: list[str]) -> None:
    """Raise :class:`UnknownTaskError` / :class:`TaskDataMissingError` (one line naming what is missing)
    unless every task can run: local tasks always can; lm-eval tasks need their data set loadable."""
    builtin = [n for n in names if n not in TASKS]
    if not builtin:
        return
    tm = task_manager(builtin)
    unknown = [n for n in builtin if n not in tm.all_tasks]
    if unknown:
        raise UnknownTaskError(
            f"unknown zero-shot task(s) {unknown}: neither a local task ({', '.join(TASKS)}) "
            "nor registered in lm-eval (`lm_eval ls tasks` lists those)"
        )
    for name in builtin:
        try:
            tm.load([name])
        except Exception as e:  # noqa: BLE001 - offline, gated, not cached: all mean the data is missing
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise TaskDataMissingError(
                f"zero-shot task {name!r} is lm-eval's built-in task and its data set could not be loaded ({why}); "
                f"run once with Hub access to fill the datasets cache, or keep to the tasks whose data ships in "
                f"data/: {', '.join(TASKS)}"
            ) from None


def write_tasks(out_dir: str | Path, names: list[str] | None = None) -> Path:
    """Write normalised JSONL + YAML for the named tasks into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in names or list(TASKS):
        if name not in TASKS:
            raise ValueError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}")
        rel, convert, _ = TASKS[name]
        docs = list(convert(data_dir() / rel))
        jsonl = out / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (out / f"tyr_{name}.yaml").write_text(_YAML.format(name=name, path=jsonl.resolve()))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m tyr.tasks DIR [TASK ...]``: write the task files, then run lm-eval on any checkpoint:
    ``lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True --include_path DIR --tasks tyr_piqa``."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__)
        return
    out = write_tasks(args[0], args[1:] or None)
    print(",".join(f"tyr_{n}" for n in (args[1:] or TASKS)), "written to", out)
