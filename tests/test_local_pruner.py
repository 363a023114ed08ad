"""Local pruner: scorers, least-squares reconstruction, uniform pruning, layer-at-a-time gradients.

Every score, cost and refit is checked against an oracle computed here from its definition: the
captured input activations X of the output projection, explicit per-head / per-channel slices of the
weights, gradients from a plain full backward, and brute-force least squares (DESIGN.md section 2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tyr.data import TokenSetSpec, build_token_set
from tyr.layerwise.engine import InputStats, capture_layer_inputs, collect_input_stats, run_layer
from tyr.layerwise.gradients import layerwise_gradients
from tyr.modeling.adapter import get_adapter
from tyr.pruning.local import LocalPruner
from tyr.pruning.obs_math import damped_inverse, obs_costs, obs_remove
from tyr.pruning.problem import ModuleProblem, attention_problem, mlp_problem
from tyr.pruning.reconstruction import refit, relative_error
from tyr.pruning.scorers import FLAP, OBS, HyWIA, Magnitude, TaylorElement1, TaylorElement2, TaylorVector, WandaSP
from tyr.pruning.uniform import prune_uniform

from conftest import CONF, pruner_from_conf

PRUNERS = sorted(f.stem for f in (CONF / "pruner").glob("*.yaml"))


def test_layerwise_gradients_equal_full_backward(tiny, calib):
    model, ids = tiny.model, calib[:3]
    a = get_adapter(model)
    got = {}
    layerwise_gradients(model, ids, lambda l, d: got.__setitem__(l, d), progress=False)
    assert sorted(got) == list(range(4))
    ref_g, ref_f = {}, {}
    for s in range(3):
        model.zero_grad()
        model(ids[s : s + 1], labels=ids[s : s + 1]).loss.backward()
        for l, layer in enumerate(a.layers(model)):
            for n, lin in a.projections(layer).items():
                g = lin.weight.grad.float()
                ref_g[l, n] = ref_g.get((l, n), 0) + g / 3
                ref_f[l, n] = ref_f.get((l, n), 0) + g * g / 3
    model.zero_grad(set_to_none=True)
    for (l, n), g in ref_g.items():
        torch.testing.assert_close(got[l][n][0], g, rtol=1e-4, atol=1e-6 * g.abs().max().item())
        torch.testing.assert_close(got[l][n][1], ref_f[l, n], rtol=1e-4, atol=1e-6 * ref_f[l, n].abs().max().item())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def _explicit_problem(seed=0, n=400, d_in=12, d_out=5, width=3):
    torch.manual_seed(seed)
    X = torch.randn(n, d_in) @ torch.randn(d_in, d_in) + 0.3
    W0 = torch.randn(d_out, d_in)
    st = InputStats(d_in)
    st.add(X)
    return X, W0, ModuleProblem("attn", 0, width, d_in // width, W0, {"o_proj": (W0, "cols")}, st)


def test_refit_and_error_match_explicit_least_squares():
    X, W0, p = _explicit_problem()
    keep = [0, 2]
    cols = p.columns(keep)
    Y = X @ W0.T
    W, _ = refit(p, keep, damp=0.0)
    ref = torch.linalg.lstsq(X[:, cols].double(), Y.double()).solution.T
    torch.testing.assert_close(W.double(), ref, rtol=1e-4, atol=1e-4)
    err = ((X[:, cols] @ W.T - Y).pow(2).sum() / Y.pow(2).sum()).item()
    assert math.isclose(relative_error(p, keep, W, None), err, rel_tol=1e-4)
    Wb, b = refit(p, keep, bias=True, damp=0.0)
    Z = torch.cat([X[:, cols], torch.ones(len(X), 1)], 1).double()
    refb = torch.linalg.lstsq(Z, Y.double()).solution
    torch.testing.assert_close(b.double(), refb[-1], rtol=1e-4, atol=1e-4)
    errb = ((X[:, cols] @ Wb.T + b - Y).pow(2).sum() / Y.pow(2).sum()).item()
    assert math.isclose(relative_error(p, keep, Wb, b), errb, rel_tol=1e-4) and errb <= err


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_config_prunes_with_nested_sets(name, tiny, calib, taylor):
    pruner = pruner_from_conf(name)
    a = get_adapter(tiny.model)
    x, kw = capture_layer_inputs(tiny.model, calib)
    layer = a.layers(tiny.model)[0]
    stats, _ = collect_input_stats(layer, x, kw[0], {"d": a.mlp(layer).down_proj})
    p = mlp_problem(a, layer, 0, stats["d"], taylor[0]["mlp"])
    variants = pruner.prune(p, [128, 96, 64, 32, 0])
    assert [len(v.keep) for v in variants] == [128, 96, 64, 32, 0]
    for big, small in zip(variants, variants[1:]):
        assert set(small.keep) <= set(big.keep)
    assert variants[0].rel_error == 0.0
    errs = [v.rel_error for v in variants]
    assert errs[1] <= errs[3] + 1e-9 and errs[2] <= errs[3] + 1e-9


def _module(tiny, calib, li: int, kind: str, taylor=None):
    """Layer ``li``'s attention or MLP problem (run on the captured layer-0 inputs) and the input
    activations X [tokens, in] (float64) of its output projection, captured by a hook."""
    a = get_adapter(tiny.model)
    x, kw = capture_layer_inputs(tiny.model, calib)
    layer = a.layers(tiny.model)[li]
    proj = a.attention(layer).o_proj if kind == "attn" else a.mlp(layer).down_proj
    seen = []
    h = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        run_layer(layer, x, kw[li])
    finally:
        h.remove()
    X = torch.cat(seen).double()
    st = InputStats(X.shape[1])
    st.add(X.float())
    make = attention_problem if kind == "attn" else mlp_problem
    return make(a, layer, li, st, None if taylor is None else taylor[li][kind]), X


def _lstsq(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(A, B, driver="gelsd").solution


def _refit_error(X, W0, kept_cols, damp: float = 0.0) -> float:
    """Brute force: drop the other columns, refit the kept ones by least squares, return
    ‖X W'ᵀ − X W₀ᵀ‖² + λ‖W' − W₀‖² (λ = damp·mean diag XᵀX; the OBS cost's damped objective,
    realised as √λ·I rows appended to X)."""
    lam = damp * float((X * X).sum(0).mean())
    Xa = torch.cat([X, math.sqrt(lam) * torch.eye(X.shape[1], dtype=X.dtype)]) if lam else X
    Y = Xa @ W0.T
    if len(kept_cols) == 0:
        return float(Y.pow(2).sum())
    W = _lstsq(Xa[:, kept_cols], Y).T
    return float((Xa[:, kept_cols] @ W.T - Y).pow(2).sum())


def _relative_error(X_kept: torch.Tensor, W: torch.Tensor, Y: torch.Tensor) -> float:
    return float((X_kept @ W.double().T - Y).pow(2).sum() / Y.pow(2).sum())


def _unit_cols(u: int, width: int) -> list[int]:
    return list(range(u * width, (u + 1) * width))


@pytest.mark.parametrize("scorer", [Magnitude(), HyWIA(), OBS()], ids=["magnitude", "hywia", "obs"])
def test_lstsq_variants_are_the_least_squares_refit_of_the_kept_columns(scorer, tiny, calib, taylor):
    """Each reconstructed variant reaches the least-squares optimum on the activations themselves, and
    its reported error is the measured one, as is the plain slice's (damp=0: the exact problem)."""
    for li, kind, counts in ((0, "attn", [3, 2, 1]), (3, "attn", [2]), (0, "mlp", [96, 64, 32]), (3, "mlp", [48])):
        p, X = _module(tiny, calib, li, kind, taylor)
        W0 = p.out_weight.double()
        Y = X @ W0.T
        plain = LocalPruner(scorer, "none").prune(p, counts)
        rec = LocalPruner(scorer, "lstsq", damp=0.0).prune(p, counts)
        for v0, v1 in zip(plain, rec):
            assert v0.keep == v1.keep and len(v1.keep) in counts
            cols = [c for u in v1.keep for c in _unit_cols(u, p.unit_width)]
            W_star = _lstsq(X[:, cols], Y).T
            err_rec, err_best, err_plain = (_relative_error(X[:, cols], W, Y) for W in (v1.out_weight, W_star, W0[:, cols]))
            # optimal on the activations (the weights themselves are not identifiable along ill-conditioned directions)
            assert math.isclose(err_rec, err_best, rel_tol=1e-3, abs_tol=1e-8), (kind, li, err_rec, err_best)
            assert math.isclose(v1.rel_error, err_rec, rel_tol=1e-3, abs_tol=1e-8)
            assert math.isclose(v0.rel_error, err_plain, rel_tol=1e-4)
            assert "refit_rejected" not in v1.info


@pytest.mark.parametrize("width", [1, 3])
def test_obs_group_cost_is_the_brute_force_refit_error(width):
    """tr(W_C [(H⁻¹)_CC]⁻¹ W_Cᵀ) = the increase of ‖XWᵀ − XW₀ᵀ‖² when unit C is removed and the other
    columns are refit by least squares, also after a first removal (the OBS update of W and H⁻¹)."""
    X, W0, p = _explicit_problem(seed=2, d_in=12, width=width)
    X, W0 = X.double(), W0.double()
    d, units = X.shape[1], list(range(p.n_units))

    def others(gone: set[int]) -> list[int]:
        return [c for c in range(d) if c // width not in gone]

    Hinv = damped_inverse(p.stats.H, 0.0)
    costs = obs_costs(p, W0, Hinv, units)
    brute = [_refit_error(X, W0, others({u})) for u in units]
    torch.testing.assert_close(torch.tensor(costs), torch.tensor(brute), rtol=1e-4, atol=0)
    first = min(units, key=brute.__getitem__)
    W, Hi = W0.clone(), Hinv.clone()
    obs_remove(W, Hi, p.columns([first]))
    kept = others({first})
    torch.testing.assert_close(W[:, kept], _lstsq(X[:, kept], X @ W0.T).T, rtol=1e-4, atol=1e-6)  # the refit
    rest = [u for u in units if u != first]
    costs2 = obs_costs(p, W, Hi, rest)
    brute2 = [_refit_error(X, W0, others({first, u})) - brute[first] for u in rest]
    torch.testing.assert_close(torch.tensor(costs2), torch.tensor(brute2), rtol=1e-4, atol=1e-6 * max(brute2))


@pytest.mark.parametrize("width,counts", [(1, [9, 6, 3]), (3, [4, 2])])
def test_obs_one_unit_per_round_is_greedy_least_squares_elimination(width, counts):
    """OBS removing one unit per round keeps what brute-force greedy elimination keeps: at every step
    drop the unit whose removal (with a least-squares refit of the rest) raises the damped error least."""
    X, W0, p = _explicit_problem(seed=3, d_in=18 if width == 3 else 12, width=width)
    X, W0 = X.double(), W0.double()
    damp = 0.01
    got, _ = OBS(rounds_attn=p.n_units, damp=damp).select(p, counts)  # kind "attn": rounds_attn rounds
    alive, want = list(range(p.n_units)), {}
    while len(alive) > min(counts):
        errs = {u: _refit_error(X, W0, [c for v in alive if v != u for c in _unit_cols(v, width)], damp) for u in alive}
        alive.remove(min(errs, key=errs.get))
        want[len(alive)] = sorted(alive)
    assert got == [want[k] for k in counts]


def _member_slices(kind: str, u: int, hd: int) -> list[tuple[str, tuple]]:
    """Unit u's weights, written out: a head's head_dim rows of q_proj and columns of o_proj, a
    channel's row of gate_proj and up_proj and column of down_proj."""
    if kind == "attn":
        rows = slice(u * hd, (u + 1) * hd)
        return [("q_proj", (rows, slice(None))), ("o_proj", (slice(None), rows))]
    return [("gate_proj", (u, slice(None))), ("up_proj", (u, slice(None))), ("down_proj", (slice(None), u))]


def test_taylor_scores_follow_their_formulas_per_head_and_channel(tiny, calib, taylor):
    """LLM-Pruner's scores from a plain full backward (g = mean_s ∂ℓ_s/∂W, F = mean_s (∂ℓ_s/∂W)²),
    s¹ = W⊙g, s² = s¹ − ½ W⊙F⊙W, summed over explicit slices: a head owns its head_dim rows of q_proj
    and columns of o_proj, a channel its gate_proj / up_proj rows and down_proj column."""
    model, ids = tiny.model, calib[:4]  # the sequences of the taylor fixture
    a = get_adapter(model)
    grads = {}
    for s in range(len(ids)):
        model.zero_grad()
        model(ids[s : s + 1], labels=ids[s : s + 1]).loss.backward()
        for l, layer in enumerate(a.layers(model)):
            for n, lin in a.projections(layer).items():
                g = lin.weight.grad.double()
                G, F = grads.get((l, n), (0.0, 0.0))
                grads[l, n] = (G + g / len(ids), F + g * g / len(ids))
    model.zero_grad(set_to_none=True)
    scorers = {"element1": TaylorElement1(), "vector1": TaylorVector(), "element2": TaylorElement2(), "vector2": None}
    for l, layer in enumerate(a.layers(model)):
        proj, hd = a.projections(layer), a.geometry(layer).head_dim
        sal = {}
        for n, lin in proj.items():
            W = lin.weight.detach().double()
            g, F = grads[l, n]
            sal[n] = (W * g, W * g - 0.5 * W * F * W)
        for kind, n_units in (("attn", a.geometry(layer).num_heads), ("mlp", a.intermediate_size(layer))):
            want = {k: torch.zeros(n_units, dtype=torch.float64) for k in scorers}
            for u in range(n_units):
                for name, idx in _member_slices(kind, u, hd):
                    s1, s2 = sal[name][0][idx], sal[name][1][idx]
                    want["element1"][u] += s1.abs().sum()
                    want["vector1"][u] += s1.sum().abs()
                    want["element2"][u] += s2.abs().sum()
                    want["vector2"][u] += s2.sum().abs()
            p = (attention_problem if kind == "attn" else mlp_problem)(a, layer, l, None, taylor[l][kind])
            for key, scorer in scorers.items():
                got = taylor[l][kind][key].double() if scorer is None else scorer.score(p).double()
                torch.testing.assert_close(got, want[key], rtol=1e-3, atol=1e-4 * float(want[key].abs().max()))


def test_magnitude_wanda_sp_and_flap_follow_their_formulas(tiny, calib):
    """Magnitude = ‖unit's weights‖₂ over its member slices; Wanda-sp = Σ_{j∈unit} ‖W₀[:, j]‖₁·‖X_j‖₂;
    FLAP = Σ_{j∈unit} Var(X_j)·‖W₀[:, j]‖², from the activations (FLAP's sample variance; tyr's
    statistics give the population variance, so the scores agree up to the common factor (N−1)/N)."""
    a = get_adapter(tiny.model)
    for li, kind in ((0, "attn"), (1, "attn"), (2, "mlp")):
        p, X = _module(tiny, calib, li, kind)
        layer, W0, w, N = a.layers(tiny.model)[li], p.out_weight.double(), p.unit_width, X.shape[0]
        proj = a.projections(layer)
        var = (X - X.mean(0)).pow(2).sum(0) / (N - 1)
        wanda, flap, mag = [], [], []
        for u in range(p.n_units):
            cols = _unit_cols(u, w)
            wanda.append(sum(float(W0[:, j].abs().sum() * X[:, j].norm()) for j in cols))
            flap.append(sum(float(var[j] * W0[:, j].pow(2).sum()) for j in cols))
            if kind == "attn":
                parts = [proj["q_proj"].weight[cols[0] : cols[-1] + 1], proj["o_proj"].weight[:, cols[0] : cols[-1] + 1]]
            else:
                parts = [proj["gate_proj"].weight[u], proj["up_proj"].weight[u], proj["down_proj"].weight[:, u]]
            mag.append(math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in parts)))
        torch.testing.assert_close(Magnitude().score(p).double(), torch.tensor(mag, dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(WandaSP().score(p).double(), torch.tensor(wanda, dtype=torch.float64), rtol=1e-4, atol=0)
        torch.testing.assert_close(
            FLAP().score(p).double(), torch.tensor(flap, dtype=torch.float64) * (N - 1) / N, rtol=2e-3, atol=1e-5 * max(flap)
        )


def test_gqa_query_heads_read_the_kv_head_the_adapter_names(tiny, calib):
    """Doubling the values of KV head j doubles exactly the o_proj input columns of the query heads
    (or padding slots) that the geometry maps to j: on the dense layer and on an unevenly sliced one."""
    from tyr.modeling.slicing import slice_attention

    a = get_adapter(tiny.model)
    x, kw = capture_layer_inputs(tiny.model, calib[:2])
    dense = copy.deepcopy(a.layers(tiny.model)[1])
    uneven = copy.deepcopy(dense)
    slice_attention(a, uneven, [1, 2, 3])  # KV 0 keeps head 1, KV 1 heads 2 and 3: padded to 2 + 2 slots

    def o_input(layer):
        seen = {}

        def hook(m, args):
            seen["x"] = args[0].detach()

        h = a.attention(layer).o_proj.register_forward_pre_hook(hook)
        try:
            run_layer(layer, x, kw[1], batch_size=len(x))
        finally:
            h.remove()
        return seen["x"]

    for layer in (dense, uneven):
        geo = a.geometry(layer)
        hd, base = geo.head_dim, o_input(layer)
        assert geo.num_heads == 4 and len(geo.kv_of_head) == geo.num_heads
        for j in range(geo.num_kv_heads):
            mod = copy.deepcopy(layer)
            with torch.no_grad():
                a.attention(mod).v_proj.weight[j * hd : (j + 1) * hd] *= 2
            out = o_input(mod)
            for h in range(geo.num_heads):
                got, ref = out[..., h * hd : (h + 1) * hd], base[..., h * hd : (h + 1) * hd]
                if geo.kv_of_head[h] == j:
                    torch.testing.assert_close(got, 2 * ref, rtol=1e-5, atol=1e-6)
                else:
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert a.geometry(uneven).kv_of_head == (0, 0, 1, 1)


@pytest.mark.parametrize("components", [("fine", "coarse"), ("fine", "coarse", "compensated")])
def test_hywia_fusion_follows_its_definition(tiny, calib, taylor, components):
    """Recomputed here from the activations: each component normalised to sum 1 (fine = element²,
    coarse = vector², compensated = the damped brute-force refit cost of removing the unit); the top
    ``probe`` units of each refit by ridge least squares (λ = damp·mean diag XᵀX); logits
    −log(error)/T; softmax; the fused score's top units."""
    T, damp = 0.25, 0.001
    scorer = HyWIA(temperature=T, damp=damp, components=components)
    for li, kind, count in ((1, "mlp", 64), (2, "attn", 2), (3, "mlp", 40)):
        p, X = _module(tiny, calib, li, kind, taylor)
        W0, w = p.out_weight.double(), p.unit_width
        Y = X @ W0.T
        lam = damp * float((X * X).sum(0).mean())
        raw = {"fine": taylor[li][kind]["element2"].double(), "coarse": taylor[li][kind]["vector2"].double()}
        if "compensated" in components:
            d = X.shape[1]
            raw["compensated"] = torch.tensor(
                [_refit_error(X, W0, [c for c in range(d) if c // w != u], damp) for u in range(p.n_units)], dtype=torch.float64
            )
        comps = {c: raw[c] / raw[c].sum() for c in components}
        for c, v in scorer.components(p).items():
            torch.testing.assert_close(v, comps[c], rtol=1e-3, atol=1e-6)
        errs = []
        for c in components:
            keep = sorted(sorted(range(p.n_units), key=lambda i: (-float(comps[c][i]), i))[:count])
            cols = [j for u in keep for j in _unit_cols(u, w)]
            Xr = torch.cat([X[:, cols], math.sqrt(lam) * torch.eye(len(cols), dtype=X.dtype)])
            Wk = _lstsq(Xr, torch.cat([Y, torch.zeros(len(cols), Y.shape[1], dtype=Y.dtype)])).T
            errs.append(float((X[:, cols] @ Wk.T - Y).pow(2).sum() / Y.pow(2).sum()))
        alpha = torch.softmax(torch.tensor([-math.log(e) / T for e in errs], dtype=torch.float64), 0)
        fused = sum(al * comps[c] for al, c in zip(alpha, components))
        (kept,), info = scorer.select(p, [count])
        for c, al, e in zip(components, alpha, errs):
            assert math.isclose(info[f"err_{c}"], e, rel_tol=1e-3), (c, info[f"err_{c}"], e)
            assert math.isclose(info[f"alpha_{c}"], float(al), rel_tol=1e-3, abs_tol=1e-6)
        order = sorted(range(p.n_units), key=lambda i: (-float(fused[i]), i))
        assert kept == sorted(order[:count])
    with pytest.raises(ValueError):
        HyWIA(temperature=0)
    with pytest.raises(ValueError, match="components"):
        HyWIA(components=["fine", "magnitude"])


def test_zero_sparsity_is_identity(tiny, calib, taylor):
    model = copy.deepcopy(tiny.model)
    rep = prune_uniform(model, pruner_from_conf("hywia"), calib, 0.0, taylor, progress=False)
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny.model(ids).logits)
    assert rep["achieved_sparsity"] == 0.0


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_uniform_budget_within_one_unit_per_layer(tiny, calib, taylor, sparsity):
    model = copy.deepcopy(tiny.model)
    rep = prune_uniform(model, pruner_from_conf("hywia"), calib, sparsity, taylor, progress=False)
    per_channel = 3 * 64
    for r in rep["layers"]:
        assert abs((r["params_before"] - r["params_after"]) - sparsity * r["params_before"]) <= per_channel
    assert abs(rep["achieved_sparsity"] - sparsity) < per_channel / rep["params_dense"]["prunable"] * 4 + 1e-9
    ids = calib[:2]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_gradient_scorer_without_gradients_is_refused(tiny, calib):
    with pytest.raises(ValueError, match="needs Taylor"):
        prune_uniform(copy.deepcopy(tiny.model), pruner_from_conf("hywia"), calib, 0.5, None, progress=False)


@pytest.mark.real_model
def test_reconstruction_reduces_error_on_real_data(smollm2):
    model = smollm2.model
    a = get_adapter(model)
    ids = build_token_set(TokenSetSpec("c4[0:600]", 256, 8, seed=0), smollm2.tokenizer).input_ids
    x, kw = capture_layer_inputs(model, ids)
    layer = a.layers(model)[0]
    st, _ = collect_input_stats(layer, x, kw[0], {"o": a.attention(layer).o_proj, "d": a.mlp(layer).down_proj})
    for prob, k in ((attention_problem(a, layer, 0, st["o"]), 4), (mlp_problem(a, layer, 0, st["d"]), 768)):
        (v0,) = LocalPruner(Magnitude(), "none").prune(prob, [k])
        (v1,) = LocalPruner(Magnitude(), "lstsq").prune(prob, [k])
        assert v1.rel_error < 0.9 * v0.rel_error, (prob.kind, v0.rel_error, v1.rel_error)
