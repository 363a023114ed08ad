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
