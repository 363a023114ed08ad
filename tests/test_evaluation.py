"""Perplexity matches an independent computation; lm-eval local tasks give accuracies in [0, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tyr.evaluation import perplexity, token_nll, zero_shot


def test_perplexity_equals_exp_mean_nll(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (3, 40))
    got = perplexity(tiny.model, ids, batch_size=2)
    # Independent: full logits from the CausalLM, log-softmax, gather the next token.
    with torch.no_grad():
        logits = tiny.model(ids).logits[:, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert got["tokens"] == 3 * 39
    assert math.isclose(got["ppl"], math.exp(-logp.mean().item()), rel_tol=1e-5)
    # and equal to HF's own loss on each window (same length, so the mean of means is the mean)
    with torch.no_grad():
        losses = [tiny.model(ids[i : i + 1], labels=ids[i : i + 1]).loss.item() for i in range(3)]
    assert math.isclose(got["ppl"], math.exp(sum(losses) / 3), rel_tol=1e-5)


def test_chunked_nll_equals_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h, t = torch.randn(2, 7, 16), torch.randint(0, 50, (2, 7))
    full = F.cross_entropy(head(h).reshape(-1, 50), t.reshape(-1), reduction="sum")
    assert torch.allclose(token_nll(h, head, t, chunk=3).float(), full, rtol=1e-6)


def test_local_lm_eval_task_on_tiny_model(tiny):
    r = zero_shot(tiny.model, tiny.tokenizer, ["arc_easy", "boolq", "piqa"], limit=6, batch_size=4)
    assert set(r.scores) == {"arc_easy", "boolq", "piqa"}
    for task, m in r.metrics.items():
        assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["acc_norm"] <= 1.0
        assert r.samples[task] == 6
    assert 0.0 <= r.average <= 1.0


def test_loglikelihoods_equal_lm_eval_hflm(tiny):
    """tyr's loglikelihood (projection at the continuation's positions only) against lm-eval's own HFLM
    loop on the same requests: multi-token continuations, contexts of many lengths, contexts cut from
    the left at max_length, and one-token answers sharing their input; every batch stays within the
    token cap and computes each distinct input once."""
    from lm_eval.models.huggingface import HFLM

    from tyr.evaluation import continuation_loglikelihoods
    from tyr.layerwise.engine import hooks

    texts = [
        ("Question: what colour is the sky?\nAnswer:", " blue"),
        ("Question: what colour is the sky?\nAnswer:", " a deep shade of green, mostly"),
        ("The cat sat on the", " mat."),
        ("A", " long continuation of several words that goes on"),
        (" ".join(["word"] * 60), " and more words at the end"),  # cut from the left at max_length
        ("Paris is the capital of", " France"),
        ("Is Paris the capital of France? Answer:", " yes"),  # one-token answers: one shared input
        ("Is Paris the capital of France? Answer:", " no"),
    ]
    ref = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=3, max_length=40, device="cpu")
    reqs = [((c, x), *ref._encode_pair(c, x)) for c, x in texts]
    assert len(reqs[4][1]) + len(reqs[4][2]) > 41
    want = HFLM._loglikelihood_tokens(ref, reqs, disable_tqdm=True)
    shapes = []
    with hooks([(tiny.model.get_input_embeddings(), "forward_pre", lambda m, a: shapes.append(tuple(a[0].shape)))]):
        got = continuation_loglikelihoods(tiny.model, reqs, max_length=40, max_batch=4, batch_tokens=100)
    for (lg, gg), (lw, gw) in zip(got, want):
        assert abs(lg - lw) < 1e-4 * max(1.0, abs(lw)) and gg == gw
    assert all(b * t <= 100 or b == 1 for b, t in shapes) and max(b for b, _ in shapes) > 1
    assert sum(b for b, _ in shapes) == len(texts) - 1


def test_zero_shot_scores_equal_lm_eval_hflm(tiny):
    """The five-task path end to end: tyr's zero-shot metrics on real documents equal those of lm-eval's
    HFLM with its own loglikelihood loop."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from tyr.tasks import task_manager, write_tasks

    tasks = ["arc_easy", "boolq"]
    r = zero_shot(tiny.model, tiny.tokenizer, tasks, limit=8, batch_size=8)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tm = task_manager(tasks, include_path=[str(write_tasks(tmp, tasks))])
        lm = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=8, device="cpu")
        names = [f"tyr_{t}" for t in tasks]
        out = simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=8, task_manager=tm, bootstrap_iters=0)
    for t in tasks:
        res = out["results"][f"tyr_{t}"]
        ref = {k.split(",")[0]: float(v) for k, v in res.items() if k.endswith(",none") and "stderr" not in k}
        assert r.metrics[t] == ref


def test_task_files_normalise_all_documents(tmp_path):
    import json

    from tyr.tasks import write_tasks

    out = write_tasks(tmp_path)
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "openbookqa": 500, "piqa": 1838}
    for name, n in sizes.items():
        docs = [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(docs) == n
        assert all(0 <= d["gold"] < len(d["choices"]) for d in docs)
        assert (out / f"tyr_{name}.yaml").exists()


def test_standard_task_names_local_or_lm_eval():
    """The five tasks whose data ships run locally under their lm-eval names; other lm-eval names go to
    lm-eval's registry, with the metric lm-eval's papers report."""
    from tyr.tasks import BUILTIN, TASKS, check_tasks, metric_of, task_manager

    check_tasks(["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"])  # no lm-eval index, no network
    assert set(TASKS) | set(BUILTIN) == {"boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"}
    tm = task_manager(["boolq", "hellaswag", "winogrande"])
    assert {"hellaswag", "winogrande"} <= set(tm.all_tasks) and "tyr_boolq" not in tm.all_tasks
    assert metric_of("hellaswag", {"acc": 0.3, "acc_norm": 0.4}) == "acc_norm"
    assert metric_of("winogrande", {"acc": 0.5}) == "acc" and metric_of("boolq", {"acc": 0.6, "acc_norm": 0.6}) == "acc"


def test_lm_eval_task_without_its_data_offline_is_one_line(tmp_path):
    """Offline, an lm-eval task whose data set is not cached stops the recipe before the model loads:
    exit 2 and one line on stderr naming the task and the data set."""
    from test_recipes import run_recipe

    p = run_recipe(
        "tyr.recipes.evaluate", "model=tiny-llama", "eval=smoke", "eval.tasks=[boolq,winogrande]", f"hydra.run.dir={tmp_path}"
    )
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("tyr: eval.tasks: zero-shot task 'winogrande'"), p.stderr[-2000:]
    assert "allenai/winogrande" in lines[0] and "Traceback" not in p.stdout
    assert not (tmp_path / "results.json").exists()


def test_rolling_loglikelihood_equals_lm_eval_hflm(tiny):
    """Rolling log-likelihood (perplexity tasks such as wikitext): lm-eval cuts the text into windows of
    max_length and asks the loglikelihood loop for whole windows; tyr's loop gives HFLM's numbers."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tyr.data import load_text
    from tyr.evaluation import _budget_hflm

    text = load_text("ptb_test")[:3000]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    ref = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=2, max_length=64, device="cpu")
    ours = _budget_hflm(tiny.model, tiny.tokenizer, 2, 256)
    ours._max_length = 64
    want, got = ref.loglikelihood_rolling(reqs, disable_tqdm=True), ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert type(ours) is not HFLM and ours.max_length == 64
    assert abs(got[0] - want[0]) < 1e-5 * abs(want[0]) and want[0] < 0
