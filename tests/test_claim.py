"""experiments/claim.py: what a claim run carries across machines (its small state, in the repository)."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import claim


def _tree(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_carry_saves_the_small_state_and_restores_it_without_overwriting(tmp_path):
    run = "pipeline/smollm2-135m/claim-s0.5-seed0"
    absolute = f"{claim.ROOT}/runs/claim/{run}/hf_model"
    carried = {  # the run's config, stage records, search state and history, timings, every evaluation's results
        f"{run}/.hydra/config.yaml": "target_sparsity: 0.5\n",
        f"{run}/.hydra/overrides.yaml": "- target_sparsity=0.5\n",
        f"{run}/stages/prepare.json": '{"key": "a"}',
        f"{run}/stages/search.json": '{"key": "b"}',
        f"{run}/search_state.json": '{"iterations": []}',
        f"{run}/history.jsonl": '{"generation": 0}\n',
        f"{run}/timings.json": "{}",
        f"{run}/results_searched.json": json.dumps({"exported": absolute, "cache_dir": f"{Path.home()}/.cache/tyr"}),
        f"{run}/results.json": "{}",
        f"{run}/recover/lora-k1/results-0123abcd.json": "{}",
        f"{run}/recover/results_before-5678-0123abcd.json": "{}",
    }
    left = {  # made again on the next machine: shards, caches, exported folders, Hydra's own record, training state
        f"{run}/.hydra/hydra.yaml": f"cwd: {claim.ROOT}\n",
        f"{run}/teacher.safetensors": "x",
        f"{run}/iter0/supernet/manifest.json": "{}",
        f"{run}/reprune/supernet/layer_000.safetensors": "x",
        f"{run}/hf_model/config.json": "{}",
        f"{run}/hf_model/results.json": "{}",
        f"{run}/recover/lora-k1/metrics.jsonl": "{}\n",
        f"{run}/recover/lora-k1/settings.json": "{}",
        f"{run}/pipeline.log": "log",
    }
    runs, carry = tmp_path / "runs", tmp_path / "carry"
    _tree(runs, {**carried, **left})
    assert claim.save(runs, carry) == len(carried)
    assert _files(carry) == set(carried)
    assert json.loads((carry / run / "results_searched.json").read_text()) == {
        "exported": f"runs/claim/{run}/hf_model",  # relative to the repository
        "cache_dir": "~/.cache/tyr",  # or to the home directory
    }
    assert str(Path.home()) + "/" not in "".join(p.read_text() for p in carry.rglob("*") if p.is_file())
    assert str(claim.ROOT) not in "".join(p.read_text() for p in carry.rglob("*") if p.is_file())
    # the search state before its history: a history line the state has not committed is dropped on resume
    order = [p.name for p in claim.carry_files(runs / run)]
    assert order.index("search_state.json") < order.index("history.jsonl")

    fresh = tmp_path / "fresh"
    _tree(fresh, {f"{run}/search_state.json": '{"iterations": [1]}'})  # newer than the carried one: kept
    assert claim.restore(carry, fresh) == len(carried) - 1
    assert _files(fresh) == set(carried)
    assert (fresh / run / "search_state.json").read_text() == '{"iterations": [1]}'
    assert (fresh / run / "stages" / "search.json").read_text() == '{"key": "b"}'
    assert claim.restore(tmp_path / "nothing", fresh) == 0
