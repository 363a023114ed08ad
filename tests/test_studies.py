"""The issue #14 study scripts' arithmetic (experiments/), against values computed by hand."""

import math


def test_needed_kl_reads_the_target_off_an_exact_line():
    from experiments.fidelity import needed_kl

    # log ppl = 1 + 2 kl on WikiText-2 and 2 + 0.5 kl on PTB exactly: the line is recovered (R^2 = 1) and
    # the KL at which it reaches 0.85x the uniform model's perplexity is kl_u + log(0.85) / slope
    kls = [1.0, 0.9, 1.1, 0.8, 1.2]
    names = ["uniform_recipe", "searched", "a", "b", "c"]
    seq = [
        {"name": n, "kl_heldout": k, "wikitext2": math.exp(1 + 2 * k), "ptb": math.exp(2 + 0.5 * k)} for n, k in zip(names, kls)
    ]
    rows = [line for line in needed_kl(seq) if line.startswith("| wikitext2") or line.startswith("| ptb")]
    got = {r.split("|")[1].strip(): [float(c) for c in r.split("|")[2:-1]] for r in rows}
    for m, slope in (("wikitext2", 2.0), ("ptb", 0.5)):
        s, r2, kl_u, kl_s, ratio, kl_t = got[m]
        assert (s, r2, kl_u, kl_s) == (slope, 1.0, 1.0, 0.9)
        assert ratio == round(math.exp(slope * (0.9 - 1.0)), 3)
        assert kl_t == round(1.0 + math.log(0.85) / slope, 4)
    # too few shipped models, or no uniform row: nothing to read off
    assert needed_kl(seq[:3]) == []
    assert needed_kl([dict(r, name="x") for r in seq]) == []


def test_search_vs_uniform_keeps_only_the_rows_no_run_gives(tmp_path):
    """A table built from run directories plus ``--keep``: a fresh run replaces the kept row of its sparsity,
    other kept rows stay, and the rows come out in order of sparsity."""
    import json

    from experiments.search_vs_uniform import collect, merge

    def result(sp, wt2, ptb, nll):
        return {
            "config": {"target_sparsity": sp},
            "params": {"total": 100},
            "budget": {"sparsity": sp},
            "perplexity": {"wikitext2": {"ppl": wt2, "window_nll": nll}, "ptb": {"ppl": ptb, "window_nll": nll}},
        }

    run = tmp_path / "run"
    run.mkdir()
    (run / "results_searched.json").write_text(json.dumps(result(0.25, 40.0, 80.0, [3.0, 3.2])))
    (run / "results_uniform_reprune.json").write_text(json.dumps(result(0.25, 50.0, 100.0, [3.1, 3.5])))
    kept = {"0.5": {"ratio": {"wikitext2": 0.8}}, "0.25": {"ratio": {"wikitext2": 0.99}}}
    table = merge(kept, collect([run]))
    assert list(table) == ["0.25", "0.5"]
    assert table["0.5"] == kept["0.5"]
    assert table["0.25"]["ratio"] == {"wikitext2": 0.8, "ptb": 0.8}
    # paired over the two windows: exp(mean(3.0 - 3.1, 3.2 - 3.5)) = exp(-0.2)
    assert math.isclose(table["0.25"]["paired"]["wikitext2"]["ratio"], math.exp(-0.2))


def test_fidelity_shards_split_the_allocations_without_overlap():
    """``--shard I/N``: the N shards together are every allocation exactly once, each process gets its turn
    in the list's order (so a partial pass still spans the interleaved range); bad specs are refused."""
    import argparse

    import pytest

    from experiments.fidelity import parse_shard, shard

    items = list(range(25))
    for n in (1, 2, 3, 7):
        parts = [shard(items, *parse_shard(f"{i}/{n}")) for i in range(n)]
        assert sorted(x for p in parts for x in p) == items
        assert all(p == sorted(p) for p in parts)
        assert [len(p) for p in parts] == [len(range(i, 25, n)) for i in range(n)]
    for bad in ("2/2", "1", "a/2", "-1/2", "1/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shard(bad)


def test_rho_interval_covers_the_true_rank_correlation_95_percent_of_the_time():
    """The report's interval for Spearman's rho, against a simulation: samples of n = 24 pairs from a
    bivariate normal whose population Spearman rho is (6 / pi) asin(r / 2); about 95 % of the intervals
    around the sample rho contain it."""
    import numpy as np
    from scipy.stats import spearmanr

    from experiments.fidelity import rho_interval

    rng = np.random.default_rng(0)
    n, trials = 24, 2000
    for r in (0.3, 0.8):
        true = 6 / math.pi * math.asin(r / 2)
        cov = [[1, r], [r, 1]]
        hits = 0
        for _ in range(trials):
            x = rng.multivariate_normal([0, 0], cov, size=n)
            lo, hi = rho_interval(spearmanr(x[:, 0], x[:, 1]).statistic, n)
            hits += lo <= true <= hi
        assert 0.93 <= hits / trials <= 0.975, (r, hits / trials)
