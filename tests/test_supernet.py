"""Supernet: level grids, EEA, storage (resume, integrity) and assembly, on tiny-llama."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import torch

from tyr.layerwise.engine import InputStats, capture_layer_inputs, collect_input_stats, run_layer
from tyr.modeling.adapter import get_adapter
from tyr.modeling.slicing import slice_attention, slice_mlp
from tyr.pruning.problem import attention_problem, mlp_problem
from tyr.pruning.uniform import prune_uniform
from tyr.search import Allocation, SearchSpace, mutate
from tyr.supernet.assemble import Assembler
from tyr.supernet.builder import build_supernet, eea_weights, full_weight
from tyr.supernet.grid import LayerShape, layer_shapes, make_grid, module_levels
from tyr.supernet.store import SupernetError, SupernetStore

from conftest import pruner_from_conf

MODEL = {"name": "tiny-llama", "revision": "random-seed:0", "dtype": "float32"}


def _build(tiny, calib, taylor, root, eea="expectation", sparsity=0.5, path=None, centre=None, pruner="hywia"):
    grid = make_grid(layer_shapes(tiny.model), sparsity, interval=0.25, n_levels=5, min_channels=8, centre=centre)
    store = SupernetStore.create_or_resume(root, model=MODEL, grid=grid, eea=eea, config={"pruner": pruner, "path": path})
    build_supernet(tiny.model, pruner_from_conf(pruner), calib, grid, store, eea=eea, taylor=taylor, path=path, progress=False)
    return store, grid


def test_module_levels():
    assert module_levels(9, 4, 0.125, 9, 1) == ((8, 7, 6, 5, 4, 3, 2, 1, 0), 4)
    assert module_levels(1536, 768, 0.125, 9, 32) == ((1536, 1344, 1152, 960, 768, 576, 384, 192, 0), 4)
    keep, c = module_levels(4, 1, 0.125, 9, 1)  # tiny layer: clipped and merged, not crashed
    assert keep == (4, 3, 2, 1, 0) and keep[c] == 1
    with pytest.raises(ValueError):
        module_levels(4, 5, 0.125, 9, 1)


def test_level_moves_keep_the_budget_exact():
    shapes = [LayerShape(32, 1000.0, 4096, 30.0)] * 6
    grid = make_grid(shapes, 0.5)
    space = SearchSpace.from_costs(grid.costs())
    start = Allocation(grid.centre_levels())
    rng = np.random.default_rng(0)
    a = start
    for _ in range(500):
        a = mutate(space, a, rng)
        assert grid.allocation_params(a.to_json()) == grid.allocation_params(start.to_json())
    assert abs(1 - grid.allocation_params(start.to_json()) / grid.dense_params() - 0.5) < 0.01


def test_eea_expectation_equals_weighted_average_of_variant_outputs(tiny, calib, taylor):
    model = tiny.model
    a = get_adapter(model)
    x, kw = capture_layer_inputs(model, calib)
    layer = a.layers(model)[1]
    grid = make_grid(layer_shapes(model), 0.5, interval=0.25, n_levels=5, min_channels=8)
    st, _ = collect_input_stats(layer, x, kw[1], {"o": a.attention(layer).o_proj, "d": a.mlp(layer).down_proj})
    for kind, prob in (
        ("attn", attention_problem(a, layer, 1, st["o"], taylor[1]["attn"])),
        ("mlp", mlp_problem(a, layer, 1, st["d"], taylor[1]["mlp"])),
    ):
        g = grid.modules[kind][1]
        variants = pruner_from_conf().prune(prob, list(g.keep))
        w = eea_weights(g, "expectation")
        dens = [k / g.n_units for k in g.keep]
        assert np.allclose(w, np.array(dens) / sum(dens))
        W_exp, _ = full_weight(prob, variants, w)
        # explicit: each variant's output through a really sliced layer, averaged with the weights
        sliced_layers = []
        for v in variants:
            lay = copy.deepcopy(layer)
            if len(v.keep) < g.n_units:
                (slice_attention if kind == "attn" else slice_mlp)(a, lay, v.keep, v.out_weight, v.out_bias)
            sliced_layers.append(lay)
        lay = copy.deepcopy(layer)
        target = a.attention(lay).o_proj if kind == "attn" else a.mlp(lay).down_proj
        with torch.no_grad():
            target.weight.copy_(W_exp)
        if kind == "mlp":  # the attention is untouched and Σw = 1: compare the layer outputs
            explicit = sum(wi * run_layer(v_lay, x, kw[1]) for wi, v_lay in zip(w, sliced_layers))
            torch.testing.assert_close(run_layer(lay, x, kw[1]), explicit, atol=1e-4, rtol=1e-4)
        else:  # the MLP is non-linear in its input: compare the attention block outputs
            explicit = sum(wi * _attention_output(a, v_lay, x, kw[1]) for wi, v_lay in zip(w, sliced_layers))
            torch.testing.assert_close(_attention_output(a, lay, x, kw[1]), explicit, atol=1e-4, rtol=1e-4)


def _attention_output(a, layer, x, kw):
    """The attention block's output while ``layer`` runs over ``x`` (a forward hook that returns None)."""
    seen = {}

    def hook(module, args, out):
        seen["y"] = out[0] if isinstance(out, tuple) else out

    h = a.attention(layer).register_forward_hook(hook)
    try:
        run_layer(layer, x, kw, batch_size=len(x))
    finally:
        h.remove()
    return seen["y"]


def _digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("layer_*.safetensors"))}


def test_resume_gives_identical_shards_and_detects_corruption(tiny, calib, taylor, tmp_path, monkeypatch):
    full, _ = _build(tiny, calib, taylor, tmp_path / "full")
    ref = _digests(tmp_path / "full")
    assert len(ref) == 4 and full.manifest["complete"]
    # interrupted build: fail while storing layer 2
    import tyr.supernet.store as store_mod

    real = store_mod.SupernetStore.write_layer

    def crashing(self, layer, *a, **k):
        if layer == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, layer, *a, **k)

    monkeypatch.setattr(store_mod.SupernetStore, "write_layer", crashing)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny, calib, taylor, tmp_path / "resumed")
    monkeypatch.setattr(store_mod.SupernetStore, "write_layer", real)
    partial = SupernetStore.create_or_resume(
        tmp_path / "resumed", model=MODEL, grid=full.grid, eea="expectation", config={"pruner": "hywia", "path": None}
    )
    assert partial.completed_layers() == [0, 1] and not partial.manifest["complete"]
    with pytest.raises(SupernetError, match="not complete"):
        SupernetStore.open(tmp_path / "resumed")
    _build(tiny, calib, taylor, tmp_path / "resumed")
    assert _digests(tmp_path / "resumed") == ref
    # a flipped byte is detected, naming the file
    shard = tmp_path / "full" / "layer_001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = SupernetStore.open(tmp_path / "full")
    with pytest.raises(SupernetError, match="layer_001.safetensors"):
        store.variant(1, "mlp", 0)
    # a manifest from another model or config is refused
    with pytest.raises(SupernetError, match="not other-model"):
        SupernetStore.create_or_resume(
            tmp_path / "full",
            model={**MODEL, "name": "other-model"},
            grid=full.grid,
            eea="expectation",
            config={"pruner": "hywia", "path": None},
        )
    with pytest.raises(SupernetError, match="another configuration"):
        SupernetStore.create_or_resume(
            tmp_path / "full", model=MODEL, grid=full.grid, eea="none", config={"pruner": "hywia", "path": None}
        )


def test_compact_storage(tiny, calib, taylor, tmp_path):
    store, grid = _build(tiny, calib, taylor, tmp_path / "s")
    ours = store.manifest["disk_bytes"]
    # Týr's layout: every variant as zero-padded full q, k, v, o, gate, up, down tensors
    a = get_adapter(tiny.model)
    per_layer = sum(lin.weight.numel() for lin in a.projections(a.layers(tiny.model)[0]).values())
    tyr_layout = sum(len(grid.modules[k][l].keep) for k in ("attn", "mlp") for l in range(4)) * per_layer * 4 // 2
    assert ours * 2 < tyr_layout


def _captured_input(layer, proj, x, kw) -> torch.Tensor:
    seen = []

    def hook(module, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    h = proj.register_forward_pre_hook(hook)
    try:
        run_layer(layer, x, kw)
    finally:
        h.remove()
    return torch.cat(seen)


def _masked_model(model, store, levels):
    """The pruned model of ``levels`` without slicing: every removed unit's o_proj / down_proj columns
    zeroed, the kept ones set to the stored variant's weights (and its bias added). Equal to slicing
    (tests/test_slicing.py)."""
    m = copy.deepcopy(model)
    a = get_adapter(m)
    with torch.no_grad():
        for l, layer in enumerate(a.layers(m)):
            for kind, proj, width in (
                ("attn", a.attention(layer).o_proj, a.geometry(layer).head_dim),
                ("mlp", a.mlp(layer).down_proj, 1),
            ):
                v = store.variant(l, kind, levels[kind][l])
                cols = [u * width + j for u in v.keep for j in range(width)]
                W = torch.zeros_like(proj.weight)
                W[:, cols] = v.weight.to(W.dtype)
                proj.weight.copy_(W)
                if v.bias is not None:
                    proj.bias = torch.nn.Parameter(v.bias.clone() if proj.bias is None else proj.bias + v.bias)
    return m


@pytest.mark.parametrize("mode", ["none", "uniform", "expectation"])
def test_modes_build_the_variants_of_their_inputs(tiny, calib, taylor, tmp_path, mode):
    """Recomputed here from the stored variants and each mode's definition (DESIGN.md section 3):
    layer l's inputs are the dense model's (none) or come from layers < l whose o_proj / down_proj
    are the w-weighted mixture of their stored variants (w ∝ kept fraction for expectation, equal for
    uniform), and the MLP's from the mixed attention of its own layer. On those inputs each stored
    variant keeps what the pruner keeps, and its stored error is the relative error of its weights
    measured on the captured activations. The assembled model is the masked model of the same levels,
    also after a level change that rebuilds only the changed layer."""
    store, grid = _build(tiny, calib, taylor, tmp_path / mode, eea=mode)
    errors = store.errors()
    pruner = pruner_from_conf()
    model = copy.deepcopy(tiny.model)  # turned into the mixed model layer by layer
    a = get_adapter(model)
    x, kw = capture_layer_inputs(model, calib)
    for l, layer in enumerate(a.layers(model)):
        for kind in ("attn", "mlp"):
            g = grid.modules[kind][l]
            proj = a.attention(layer).o_proj if kind == "attn" else a.mlp(layer).down_proj
            X = _captured_input(layer, proj, x, kw[l]).double()
            st = InputStats(X.shape[1])
            st.add(X.float())
            problem = (attention_problem if kind == "attn" else mlp_problem)(a, layer, l, st, taylor[l][kind])
            chosen = [v.keep for v in pruner.prune(problem, list(g.keep), g.centre)]
            W0 = proj.weight.detach().double()
            Y = X @ W0.T
            mixed = torch.zeros_like(W0)
            w = [k / g.n_units for k in g.keep] if mode == "expectation" else [1.0] * len(g.keep)
            for lvl in range(len(g.keep)):
                v = store.variant(l, kind, lvl)
                assert v.keep == chosen[lvl], (mode, l, kind, lvl)
                cols = problem.columns(v.keep)
                err = float((X[:, cols] @ v.weight.double().T - Y).pow(2).sum() / Y.pow(2).sum())
                assert math.isclose(errors[kind][l][lvl], err, rel_tol=2e-3, abs_tol=1e-7), (mode, l, kind, lvl)
                mixed[:, cols] += w[lvl] / sum(w) * v.weight.double()
            if mode != "none":
                with torch.no_grad():
                    proj.weight.copy_(mixed)
        x = run_layer(layer, x, kw[l])

    pruned = copy.deepcopy(tiny.model)
    asm = Assembler(pruned, store)
    levels = grid.centre_levels()
    assert asm.assemble(levels) == [0, 1, 2, 3]
    levels["mlp"][2] = 0
    assert asm.assemble(levels) == [2]  # only the changed layer is rebuilt
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(calib[:2]).logits, _masked_model(tiny.model, store, levels)(calib[:2]).logits, atol=1e-4, rtol=1e-4
        )


def test_assembly_at_centre_equals_uniform_pruning(tiny, calib, taylor, tmp_path):
    pruned = copy.deepcopy(tiny.model)
    rep = prune_uniform(pruned, pruner_from_conf(), calib, 0.5, taylor, progress=False)
    centre = {"attn": [r["heads_kept"] for r in rep["layers"]], "mlp": [r["channels_kept"] for r in rep["layers"]]}
    grid = make_grid(layer_shapes(tiny.model), 0.5, interval=0.25, n_levels=5, min_channels=8, centre=centre)
    path = grid.centre_levels()
    store, grid = _build(tiny, calib, taylor, tmp_path / "p", eea="path", path=path, centre=centre)
    model = copy.deepcopy(tiny.model)
    Assembler(model, store).assemble(path)
    with torch.no_grad():
        torch.testing.assert_close(model(calib[:3]).logits, pruned(calib[:3]).logits, atol=1e-4, rtol=1e-4)


def test_path_build_keeps_existing_output_biases(tiny, calib, tmp_path):
    """On a model whose o_proj / down_proj have biases of their own, with a bias-compensating pruner
    (FLAP), the path supernet is still the sequential prune: the EEA forward keeps each module's own
    bias and adds the compensation, as slicing does."""
    biased = copy.deepcopy(tiny.model)
    a = get_adapter(biased)
    g = torch.Generator().manual_seed(0)
    for layer in a.layers(biased):
        for parent, name in ((a.attention(layer), "o_proj"), (a.mlp(layer), "down_proj")):
            old = getattr(parent, name)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(0.1 * torch.randn(old.out_features, generator=g))
            setattr(parent, name, new)
    seq = copy.deepcopy(biased)
    rep = prune_uniform(seq, pruner_from_conf("flap"), calib, 0.5, None, progress=False)
    centre = {"attn": [r["heads_kept"] for r in rep["layers"]], "mlp": [r["channels_kept"] for r in rep["layers"]]}
    grid = make_grid(layer_shapes(biased), 0.5, interval=0.25, n_levels=5, min_channels=8, centre=centre)
    store = SupernetStore.create_or_resume(tmp_path / "p", model=MODEL, grid=grid, eea="path", config={"biased": True})
    build_supernet(biased, pruner_from_conf("flap"), calib, grid, store, eea="path", path=grid.centre_levels(), progress=False)
    model = copy.deepcopy(biased)
    Assembler(model, store).assemble(grid.centre_levels())
    with torch.no_grad():
        torch.testing.assert_close(model(calib[:3]).logits, seq(calib[:3]).logits, atol=1e-4, rtol=1e-4)


def test_real_sparsity_is_at_least_the_nominal_target(tiny, calib, taylor, tmp_path):
    from tyr.modeling.params import parameter_counts

    store, grid = _build(tiny, calib, taylor, tmp_path / "r")
    dense = parameter_counts(tiny.model)["prunable"]
    assert grid.dense_params() == dense  # nominal dense == real dense
    model = copy.deepcopy(tiny.model)
    asm = Assembler(model, store)
    rng = np.random.default_rng(0)
    space = SearchSpace.from_costs(grid.costs(), budget=grid.allocation_params(grid.centre_levels()))
    a = Allocation(grid.centre_levels())
    for _ in range(5):
        asm.assemble(a.to_json())
        real = parameter_counts(model)["prunable"]
        assert real <= grid.allocation_params(a.to_json())  # conservative accounting
        assert 1 - real / dense >= 0.5 - 0.02
        a = mutate(space, a, rng)


def test_real_costs_are_the_parameters_of_the_assembled_model(tiny, calib, taylor, tmp_path):
    """The real cost table counts what slicing keeps: for random allocations (key / value groups
    emptied among them), the table's sum is the assembled model's prunable parameter count."""
    from tyr.modeling.params import parameter_counts
    from tyr.search.budget import allocation_cost
    from tyr.supernet.costs import real_costs

    store, grid = _build(tiny, calib, taylor, tmp_path / "r")
    costs = real_costs(store, tiny.model)
    model = copy.deepcopy(tiny.model)
    asm = Assembler(model, store)
    rng = np.random.default_rng(0)
    emptied = 0
    for _ in range(12):
        levels = {k: [int(rng.integers(len(g.keep))) for g in grid.modules[k]] for k in ("attn", "mlp")}
        asm.assemble(levels)
        assert allocation_cost(costs, levels) == parameter_counts(model)["prunable"], levels
        emptied += allocation_cost(costs, levels) < grid.allocation_params(levels)
    assert emptied > 0  # some allocations drop a key / value head, where the nominal count is wrong


def test_fit_to_budget_fits_and_leaves_no_level_that_fits():
    from tyr.search.budget import allocation_cost, fit_to_budget

    rng = np.random.default_rng(1)
    for trial in range(200):
        n_layers, n_levels = int(rng.integers(1, 6)), int(rng.integers(2, 6))
        costs, errors = {}, {}
        for k in ("attn", "mlp"):
            costs[k] = [sorted(rng.choice(1000, size=n_levels, replace=False).tolist(), reverse=True) for _ in range(n_layers)]
            errors[k] = [sorted(rng.random(n_levels).tolist()) for _ in range(n_layers)]
        start = {k: [int(rng.integers(n_levels)) for _ in range(n_layers)] for k in costs}
        floor = allocation_cost(costs, {k: [n_levels - 1] * n_layers for k in costs})
        budget = int(rng.integers(floor, allocation_cost(costs, {k: [0] * n_layers for k in costs}) + 1))
        out = fit_to_budget(costs, errors, start, budget)
        total = allocation_cost(costs, out)
        assert total <= budget, trial
        for k in costs:  # maximal: no module can take one level back within the budget
            for l, lvl in enumerate(out[k]):
                assert lvl == 0 or total - costs[k][l][lvl] + costs[k][l][lvl - 1] > budget, (trial, k, l)
        if allocation_cost(costs, start) <= budget:  # a start that fits is only given levels back
            assert all(o <= s for k in costs for o, s in zip(out[k], start[k])), trial
    with pytest.raises(ValueError, match="fits the budget"):
        fit_to_budget({"attn": [[10, 5]]}, {"attn": [[0.0, 1.0]]}, {"attn": [0]}, 4)


def test_a_level_of_none_leaves_that_module_dense(tiny, calib, taylor, tmp_path):
    """Single-module assembly (sensitivity studies): every module whose level is None is the dense
    module, and the one pruned module is the stored variant sliced in by hand."""
    store, grid = _build(tiny, calib, taylor, tmp_path / "n")
    L = len(grid.modules["attn"])
    levels = {"attn": [None] * L, "mlp": [None] * L}
    last = len(grid.modules["attn"][1].keep) - 1
    levels["attn"][1] = last  # the most pruned attention of layer 1
    model = copy.deepcopy(tiny.model)
    asm = Assembler(model, store)
    assert asm.assemble(levels) == list(range(L))  # every layer leaves the never-assembled state
    expect = copy.deepcopy(tiny.model)
    a = get_adapter(expect)
    v = store.variant(1, "attn", last)
    slice_attention(a, a.layers(expect)[1], v.keep, v.weight, v.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(calib[:2]).logits, expect(calib[:2]).logits, atol=0, rtol=0)
        assert not torch.allclose(model(calib[:2]).logits, tiny.model(calib[:2]).logits, atol=1e-3)
    levels["attn"][1] = None
    asm.assemble(levels)
    with torch.no_grad():
        torch.testing.assert_close(model(calib[:2]).logits, tiny.model(calib[:2]).logits, atol=0, rtol=0)
