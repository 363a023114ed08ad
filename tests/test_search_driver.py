"""KL fitness (top-k teacher cache, prefix cache) and the resumable coarse-to-fine driver on tiny-llama."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

from tyr.coarse_to_fine import SearchSettings, SearchStateError, first_grid, full_kl, run_search
from tyr.data import TokenSetSpec, build_token_set
from tyr.fitness import KLFitness, TeacherCache, kl_sum
from tyr.modeling.adapter import get_adapter
from tyr.pruning.taylor import collect_taylor
from tyr.pruning.uniform import prune_uniform, uniform_widths
from tyr.search import Allocation
from tyr.search_state import final_allocation
from tyr.supernet.assemble import Assembler
from tyr.supernet.builder import build_supernet
from tyr.supernet.grid import layer_shapes, make_grid
from tyr.supernet.path import build_path_supernet
from tyr.supernet.store import SupernetStore
from tyr.utils import read_json

from conftest import pruner_from_conf

MODEL = {"name": "tiny-llama", "revision": "random-seed:0", "dtype": "float32"}


@pytest.fixture(scope="module")
def data(tiny):
    calib = build_token_set(TokenSetSpec("c4[0:100]", 48, 8, seed=0), tiny.tokenizer).input_ids
    search = build_token_set(TokenSetSpec("c4[600:700]", 32, 6, seed=1), tiny.tokenizer).input_ids
    taylor = collect_taylor(tiny.model, calib[:4], progress=False)
    return calib, search, taylor


def test_topk_kl_equals_exact_kl_when_k_covers_vocab(tiny, data):
    _, search, _ = data
    model = copy.deepcopy(tiny.model)
    teacher = TeacherCache.build(tiny.model, search[:2], k=49152)
    with torch.no_grad():  # perturb the student
        for layer in get_adapter(model).layers(model):
            for p in layer.mlp.parameters():
                p.mul_(4.0)
    a = get_adapter(model)
    with torch.no_grad():
        h = a.base_model(model)(input_ids=search[:2]).last_hidden_state
        got = kl_sum(h, a.final_norm(model), a.lm_head(model), teacher, slice(0, 2))
        lt = torch.log_softmax(tiny.model(search[:2]).logits[:, :-1].double(), -1)
        ls = torch.log_softmax(model(search[:2]).logits[:, :-1].double(), -1)
        exact = (lt.exp() * (lt - ls)).sum().item()
    assert exact > 0.05 and math.isclose(got, exact, rel_tol=1e-3)


@pytest.fixture(scope="module")
def supernet(tiny, data, tmp_path_factory):
    calib, _, taylor = data
    grid = make_grid(layer_shapes(tiny.model), 0.5, interval=0.25, n_levels=5, min_channels=8)
    store = SupernetStore.create_or_resume(tmp_path_factory.mktemp("sn"), model=MODEL, grid=grid, eea="expectation", config={})
    build_supernet(tiny.model, pruner_from_conf(), calib, grid, store, taylor=taylor, progress=False)
    return SupernetStore.open(store.root), grid


def test_kl_fitness_dense_is_zero_and_prefix_cache_is_exact(tiny, data, supernet):
    _, search, _ = data
    store, grid = supernet
    teacher = TeacherCache.build(tiny.model, search, k=64)
    model = copy.deepcopy(tiny.model)
    dense = Allocation({k: [0] * 4 for k in ("attn", "mlp")})
    centre = Allocation(grid.centre_levels())
    kids = [centre.with_level("mlp", 3, 0), centre.with_level("attn", 2, 3), centre.with_level("mlp", 0, 1)]
    f_cache = KLFitness(model, Assembler(model, store), teacher, prefix_cache=True)
    model2 = copy.deepcopy(tiny.model)
    f_plain = KLFitness(model2, Assembler(model2, store), teacher, prefix_cache=False)
    assert f_cache([dense], 0, 6 * 32)[0] < 1e-6
    a = f_cache(kids + [centre], 0, 6 * 32)
    b = f_plain(kids + [centre], 0, 6 * 32)
    assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-12) for x, y in zip(a, b)), (a, b)
    assert f_cache.stats.layer_forwards_saved == 3 + 2 + 0  # first changed layers of the three children
    assert f_plain.stats.layer_forwards_saved == 0
    assert all(x > 0 for x in a)


def _settings(**kw):
    base = dict(intervals=[0.25, 0.125], n_levels=5, min_channels=8, generations=3, offspring=4, stages=[(64, 2), (192, 1)])
    return SearchSettings(**{**base, "seed": 3, "batch_size": 4, "surrogate_check": 0, "holdout": 0.0, **kw})


def test_driver_resumes_to_the_same_allocation(tiny, data, tmp_path, monkeypatch):
    calib, search, taylor = data
    teacher = TeacherCache.build(tiny.model, search, k=64)
    ref = run_search(
        copy.deepcopy(tiny.model), MODEL, pruner_from_conf(), calib, taylor, teacher, 0.5, _settings(), tmp_path / "a"
    )
    assert len(ref["iterations"]) == 2
    for it in ref["iterations"]:
        assert it["cost"] <= it["budget"]
    # kill during iteration 1 (after a few fitness calls), then rerun the same call
    import tyr.fitness as fit

    real = fit.KLFitness.__call__
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(fit.KLFitness, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run_search(copy.deepcopy(tiny.model), MODEL, pruner_from_conf(), calib, taylor, teacher, 0.5, _settings(), tmp_path / "b")
    monkeypatch.setattr(fit.KLFitness, "__call__", real)
    partial = read_json(tmp_path / "b" / "search_state.json")
    assert len(partial["iterations"]) < 2
    # resumed on another machine (experiments/claim.py carries the state and history, not the shards): the
    # supernets are built again
    for d in (tmp_path / "b").glob("iter*"):
        shutil.rmtree(d)
    got = run_search(
        copy.deepcopy(tiny.model), MODEL, pruner_from_conf(), calib, taylor, teacher, 0.5, _settings(), tmp_path / "b"
    )
    for x, y in zip(ref["iterations"], got["iterations"]):
        assert x["levels"] == y["levels"] and x["keep"] == y["keep"]
        assert math.isclose(x["fitness"], y["fitness"], rel_tol=1e-6)
    # a finished search carried without any shards: nothing is searched again, and the re-prune's store is
    # built again byte for byte (the manifest's per-shard sha256 of the first build)
    shards = read_json(tmp_path / "a" / "reprune" / "supernet" / "manifest.json")["layers"]
    # the first grid (the plot's uniform line) is known without its supernet
    first = SupernetStore.open(ref["iterations"][0]["supernet"]).grid
    assert first_grid(tiny.model, 0.5, _settings(), ref).to_json() == first.to_json()
    for d in [*(tmp_path / "a").glob("iter*"), tmp_path / "a" / "reprune"]:
        shutil.rmtree(d)
    monkeypatch.setattr(fit.KLFitness, "__call__", dying)  # any fitness call would be a search or a KL run again
    calls["n"] = -(10**9)
    again = run_search(
        copy.deepcopy(tiny.model), MODEL, pruner_from_conf(), calib, taylor, teacher, 0.5, _settings(), tmp_path / "a"
    )
    assert calls["n"] == -(10**9)
    assert [i["levels"] for i in again["iterations"]] == [i["levels"] for i in ref["iterations"]]
    rebuilt = read_json(tmp_path / "a" / "reprune" / "supernet" / "manifest.json")["layers"]
    assert {l: e["sha256"] for l, e in rebuilt.items()} == {l: e["sha256"] for l, e in shards.items()}
    assert not list((tmp_path / "a").glob("iter*"))  # the iterations' supernets are not needed again


def test_path_supernet_is_the_sequential_prune(tiny, data, tmp_path):
    """A one-level supernet built along an allocation (EEA ``path``) is the sparsegpt-loop prune at
    those widths: every layer pruned on the outputs of the already pruned layers before it."""
    calib, search, taylor = data
    pruner = pruner_from_conf()
    seq = copy.deepcopy(tiny.model)
    report = prune_uniform(seq, pruner, calib, 0.5, taylor, batch_size=4, progress=False)
    keep = {"attn": [r["heads_kept"] for r in report["layers"]], "mlp": [r["channels_kept"] for r in report["layers"]]}
    # the same pass on layer copies finds the recipe's widths and leaves the model dense
    dense_model = copy.deepcopy(tiny.model)
    assert uniform_widths(dense_model, pruner, calib, 0.5, taylor, batch_size=4) == keep
    assert all(torch.equal(a, b) for a, b in zip(dense_model.state_dict().values(), tiny.model.state_dict().values()))
    store = build_path_supernet(
        tiny.model, MODEL, pruner, calib, taylor, keep, tmp_path / "p", SearchSettings(min_channels=8, batch_size=4)
    )
    assert all(len(g.keep) == 1 for k in ("attn", "mlp") for g in store.grid.modules[k])
    model = copy.deepcopy(tiny.model)
    Assembler(model, store).assemble(store.grid.centre_levels())
    with torch.no_grad():
        got, want, dense = (m(search[:2]).logits for m in (model, seq, tiny.model))
    assert (want - dense).abs().max() > 0.1  # pruning changed the model
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_search_ends_with_the_better_of_supernet_and_reprune(tiny, data, tmp_path):
    calib, search, taylor = data
    teacher = TeacherCache.build(tiny.model, search, k=64)
    model = copy.deepcopy(tiny.model)
    state = run_search(model, MODEL, pruner_from_conf(), calib, taylor, teacher, 0.5, _settings(), tmp_path)
    rp, last = state["reprune"], state["iterations"][-1]
    path_store = SupernetStore.open(rp["supernet"])
    assert [g.keep[0] for g in path_store.grid.modules["mlp"]] == last["keep"]["mlp"]
    assert [g.keep[0] for g in path_store.grid.modules["attn"]] == last["keep"]["attn"]
    # the recorded KLs are those of the two models on all search tokens; the result is the lower
    kl_sn = full_kl(model, SupernetStore.open(last["supernet"]), last["levels"], teacher, 4)
    kl_rp = full_kl(model, path_store, rp["levels"], teacher, 4)
    assert math.isclose(kl_sn, rp["kl_supernet"], rel_tol=1e-6) and math.isclose(kl_rp, rp["kl_reprune"], rel_tol=1e-6)
    fin = final_allocation(state, "heldout")
    assert fin["fitness"] == min(kl_sn, kl_rp) and fin["source"] == ("reprune" if kl_rp < kl_sn else "supernet")
    # choose_form names the result whatever the KLs say; it is applied downstream of the search (the
    # state records no choice), so one search serves every choice
    assert "chosen" not in rp
    for form in ("reprune", "supernet"):
        fin = final_allocation(state, form)
        assert fin["source"] == form and fin["levels"] == (rp["levels"] if form == "reprune" else last["levels"])
    assert final_allocation(state, "reprune", reprune=False)["supernet"] == last["supernet"]  # the setting off
    with pytest.raises(ValueError, match="choose_form=best must be one of"):
        final_allocation(state, "best")
    # switched off: no re-prune, the last iteration is the result
    off = run_search(
        copy.deepcopy(tiny.model),
        MODEL,
        pruner_from_conf(),
        calib,
        taylor,
        teacher,
        0.5,
        _settings(reprune=False),
        tmp_path / "off",
    )
    assert "reprune" not in off and final_allocation(off)["levels"] == off["iterations"][-1]["levels"]


def test_holdout_sequences_are_never_searched_and_score_the_reprune(tiny, data, tmp_path):
    calib, search, taylor = data  # 6 teacher sequences; a quarter held out = the last 2
    teacher = TeacherCache.build(tiny.model, search, k=64)
    f = KLFitness(tiny.model, None, teacher, sequences=(0, 4))
    seen = set()
    for g in range(7):
        f.generation = g
        seen |= set(f.rows(3).tolist())
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="outside"):
        KLFitness(tiny.model, None, teacher, sequences=(0, 7))
    state = run_search(
        copy.deepcopy(tiny.model), MODEL, pruner_from_conf(), calib, taylor, teacher, 0.5, _settings(holdout=0.25), tmp_path
    )
    rp = state["reprune"]
    assert state["holdout_sequences"] == 2 and rp["kl_sequences"] == [4, 6] and rp["kl_tokens"] == 2 * 31
    kl = full_kl(copy.deepcopy(tiny.model), SupernetStore.open(rp["supernet"]), rp["levels"], teacher, 4, (4, 6))
    assert math.isclose(kl, rp["kl_reprune"], rel_tol=1e-6)
    # resuming with another holdout would mix two searches: refused
    with pytest.raises(SearchStateError, match="held-out"):
        run_search(
            copy.deepcopy(tiny.model), MODEL, pruner_from_conf(), calib, taylor, teacher, 0.5, _settings(holdout=0.5), tmp_path
        )
    with pytest.raises(ValueError, match="fraction"):
        run_search(
            copy.deepcopy(tiny.model),
            MODEL,
            pruner_from_conf(),
            calib,
            taylor,
            teacher,
            0.5,
            _settings(holdout=1.0),
            tmp_path / "x",
        )


def test_final_iteration_in_path_mode_prunes_along_the_previous_best(tiny, data, tmp_path):
    """``final_eea="path"``: the last iteration's supernet is built along the previous iteration's best
    allocation, so its centre variants are exactly the sequential prune at those widths (the oracle:
    the one-level path supernet, itself checked against the sparsegpt loop above); the first iteration
    keeps ``eea``."""
    calib, search, taylor = data
    teacher = TeacherCache.build(tiny.model, search, k=64)
    model = copy.deepcopy(tiny.model)
    state = run_search(
        model,
        MODEL,
        pruner_from_conf(),
        calib,
        taylor,
        teacher,
        0.5,
        _settings(final_eea="path", reprune=False),
        tmp_path / "run",
    )
    first, last = state["iterations"]
    s0, s1 = SupernetStore.open(first["supernet"]), SupernetStore.open(last["supernet"])
    assert s0.manifest["eea"] == "expectation" and s1.manifest["eea"] == "path"
    assert [g.keep[g.centre] for g in s1.grid.modules["mlp"]] == first["keep"]["mlp"]
    path = build_path_supernet(
        tiny.model,
        MODEL,
        pruner_from_conf(),
        calib,
        taylor,
        first["keep"],
        tmp_path / "p",
        SearchSettings(min_channels=8, batch_size=4),
    )
    a, b = copy.deepcopy(tiny.model), copy.deepcopy(tiny.model)
    Assembler(a, s1).assemble(s1.grid.centre_levels())
    Assembler(b, path).assemble(path.grid.centre_levels())
    with torch.no_grad():
        got, want, dense = (m(search[:2]).logits for m in (a, b, tiny.model))
    assert (want - dense).abs().max() > 0.1
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # in the default (expectation) mode the centre variants differ from the sequential prune
    default = run_search(
        copy.deepcopy(tiny.model),
        MODEL,
        pruner_from_conf(),
        calib,
        taylor,
        teacher,
        0.5,
        _settings(reprune=False),
        tmp_path / "default",
    )
    s1e = SupernetStore.open(default["iterations"][1]["supernet"])
    c = copy.deepcopy(tiny.model)
    Assembler(c, s1e).assemble(s1e.grid.centre_levels())
    with torch.no_grad():
        assert (c(search[:2]).logits - want).abs().max() > 1e-3


def test_recipe_start_centres_the_first_grid_on_the_recipe_widths(tiny, data, tmp_path, monkeypatch):
    """``search.start=recipe``: iteration 0's grid is centred on the prune recipe's widths (the oracle:
    the recipe run in place), found once and kept in the state, so a resumed run does not redo it."""
    import tyr.pruning.uniform as uniform

    calib, search, taylor = data
    teacher = TeacherCache.build(tiny.model, search, k=64)
    pruner = pruner_from_conf()
    report = prune_uniform(copy.deepcopy(tiny.model), pruner, calib, 0.5, taylor, batch_size=4, progress=False)
    want = {"attn": [r["heads_kept"] for r in report["layers"]], "mlp": [r["channels_kept"] for r in report["layers"]]}
    fitted = make_grid(layer_shapes(tiny.model), 0.5, 0.25, 5, 1, 8)
    assert {k: [g.keep[g.centre] for g in fitted.modules[k]] for k in ("attn", "mlp")} != want  # the start moves
    settings = _settings(start="recipe", intervals=[0.25], generations=1, reprune=False)
    state = run_search(copy.deepcopy(tiny.model), MODEL, pruner, calib, taylor, teacher, 0.5, settings, tmp_path)
    assert state["start"]["keep"] == want
    grid = SupernetStore.open(state["iterations"][0]["supernet"]).grid
    assert {k: [g.keep[g.centre] for g in grid.modules[k]] for k in ("attn", "mlp")} == want
    assert first_grid(tiny.model, 0.5, settings, state).to_json() == grid.to_json()  # known without the supernet
    # a run killed after the start was found, before the first supernet: it resumes from the recorded start
    import json
    import shutil

    saved = json.loads((tmp_path / "search_state.json").read_text())
    shutil.rmtree(tmp_path / "iter0")
    (tmp_path / "search_state.json").write_text(json.dumps({**saved, "iterations": [], "current": None}))
    monkeypatch.setattr(uniform, "uniform_widths", lambda *a, **k: pytest.fail("the start was found again"))
    again = run_search(copy.deepcopy(tiny.model), MODEL, pruner, calib, taylor, teacher, 0.5, settings, tmp_path)
    assert again["start"] == state["start"] and again["iterations"][0]["levels"] == state["iterations"][0]["levels"]


def test_recipe_start_built_along_the_path_is_the_recipe_model(tiny, data, tmp_path):
    """``search.start=recipe`` with ``search.eea=path``: iteration 0's variants are pruned along the recipe's
    widths, so the grid centre assembles to the prune recipe's model itself (its heads, not only its widths)."""
    calib, search, taylor = data
    teacher = TeacherCache.build(tiny.model, search, k=64)
    pruner = pruner_from_conf()
    seq = copy.deepcopy(tiny.model)
    prune_uniform(seq, pruner, calib, 0.5, taylor, batch_size=4, progress=False)
    settings = _settings(start="recipe", eea="path", intervals=[0.25], generations=1, reprune=False)
    state = run_search(copy.deepcopy(tiny.model), MODEL, pruner, calib, taylor, teacher, 0.5, settings, tmp_path)
    store = SupernetStore.open(state["iterations"][0]["supernet"])
    assert store.manifest["eea"] == "path"
    model = copy.deepcopy(tiny.model)
    Assembler(model, store).assemble(store.grid.centre_levels())
    with torch.no_grad():
        got, want = model(search[:2]).logits, seq(search[:2]).logits
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
