"""Local pruner: scorers, least-squares reconstruction, uniform pruning, layer-at-a-time gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import CONF, compose, pruner_from_conf
from tyr.data import TokenSetSpec, build_token_set
from tyr.importance import HyWIA, OBS, Magnitude
from tyr.layerwise.engine import InputStats, capture_layer_inputs, collect_input_stats
from tyr.layerwise.gradients import layerwise_gradients
from tyr.modeling.adapter import get_adapter
from tyr.pruning.local import LocalPruner
from tyr.pruning.problem import attention_problem, mlp_problem, refit, relative_error
from tyr.pruning.taylor import collect_taylor
from tyr.pruning.uniform import prune_uniform

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
    from tyr.pruning.problem import ModuleProblem

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


@pytest.mark.parametrize("scorer", [Magnitude(), HyWIA(), OBS()], ids=["magnitude", "hywia", "obs"])
def test_reconstruction_never_increases_error(scorer, tiny, calib, taylor):
    a = get_adapter(tiny.model)
    x, kw = capture_layer_inputs(tiny.model, calib)
    for li, layer in enumerate(a.layers(tiny.model)):
        st, _ = collect_input_stats(layer, x, kw[li], {"o": a.attention(layer).o_proj, "d": a.mlp(layer).down_proj})
        for prob, counts in ((attention_problem(a, layer, li, st["o"], taylor[li]["attn"]), [3, 2, 1]),
                             (mlp_problem(a, layer, li, st["d"], taylor[li]["mlp"]), [96, 64, 32])):
            plain = LocalPruner(scorer, reconstruction="none").prune(prob, counts)
            rec = LocalPruner(scorer, reconstruction="lstsq").prune(prob, counts)
            for v0, v1 in zip(plain, rec):
                assert v0.keep == v1.keep
                assert v1.rel_error <= v0.rel_error + 1e-9


def test_hywia_fusion_weights(tiny, calib, taylor):
    a = get_adapter(tiny.model)
    x, kw = capture_layer_inputs(tiny.model, calib)
    layer = a.layers(tiny.model)[1]
    st, _ = collect_input_stats(layer, x, kw[1], {"d": a.mlp(layer).down_proj})
    p = mlp_problem(a, layer, 1, st["d"], taylor[1]["mlp"])
    _, info = HyWIA(temperature=0.25).select(p, [64])
    assert math.isclose(info["alpha_fine"] + info["alpha_coarse"], 1.0, rel_tol=1e-9)
    # the granularity with the lower refit error gets the larger weight
    assert (info["alpha_fine"] > 0.5) == (info["err_fine"] < info["err_coarse"])
    with pytest.raises(ValueError):
        HyWIA(temperature=0)
    with pytest.raises(ValueError, match="components"):
        HyWIA(components=["fine", "magnitude"])


def test_hywia_compensated_component(tiny, calib, taylor):
    """The third component is the one-shot OBS cost; the fusion weights follow the probe errors, and
    a fusion of only that component keeps what a one-round OBS removal keeps."""
    a = get_adapter(tiny.model)
    x, kw = capture_layer_inputs(tiny.model, calib)
    layer = a.layers(tiny.model)[2]
    st, _ = collect_input_stats(layer, x, kw[2], {"o": a.attention(layer).o_proj, "d": a.mlp(layer).down_proj})
    for p, counts in ((mlp_problem(a, layer, 2, st["d"], taylor[2]["mlp"]), [64]),
                      (attention_problem(a, layer, 2, st["o"], taylor[2]["attn"]), [2])):
        _, info = HyWIA(components=["fine", "coarse", "compensated"]).select(p, counts)
        alphas = {c: info[f"alpha_{c}"] for c in ("fine", "coarse", "compensated")}
        assert math.isclose(sum(alphas.values()), 1.0, rel_tol=1e-9)
        errs = {c: info[f"err_{c}"] for c in alphas}
        assert max(alphas, key=alphas.get) == min(errs, key=errs.get)
        only, _ = HyWIA(components=["compensated"]).select(p, counts)
        one_round = OBS(rounds_attn=1, rounds_mlp=1).select(p, counts)[0]
        assert only == one_round


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
