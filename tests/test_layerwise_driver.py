"""The sequential layer driver (tyr.layerwise.driver) against independent oracles: the Hugging Face
model's own full forward (``output_hidden_states``, forward hooks), and the in-memory model for the
streamed one."""

from __future__ import annotations

import copy

import pytest
import torch

from tyr import streaming
from tyr.layerwise.driver import KeepInputs, LayerCallback, run_layers
from tyr.modeling.adapter import get_adapter


@pytest.fixture(scope="module")
def ids(calib):
    return calib[:5, :40]


@pytest.fixture(scope="module")
def hf_hidden(tiny, ids):
    """The reference: every hidden state of one plain full forward (entry l = input of layer l; the
    last entry is after the final norm)."""
    with torch.no_grad():
        return tiny.model(ids, output_hidden_states=True).hidden_states


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_layer_sees_the_full_forwards_hidden_states(tiny, ids, hf_hidden):
    keep = KeepInputs()
    last = run_layers(tiny.model, keep, ids, batch_size=2)  # batches of 2 over 5 sequences: a ragged last batch
    L = get_adapter(tiny.model).num_layers(tiny.model)
    assert keep.count == L == len(hf_hidden) - 1
    for l, x in enumerate(keep.inputs):
        _close(x, hf_hidden[l])
    _close(get_adapter(tiny.model).final_norm(tiny.model)(last), hf_hidden[L])


def test_outputs_a_callback_returns_are_the_next_layers_inputs(tiny, ids):
    """``process`` may replace a layer's outputs; the oracle doubles layer 1's output with a forward
    hook on the Hugging Face model."""

    class Double(LayerCallback):
        def process(self, l, layer, inputs):
            out = inputs.forward(layer)
            return out * 2 if l == 1 else out

    model = copy.deepcopy(tiny.model)
    a = get_adapter(model)
    last = run_layers(model, Double(), ids, batch_size=3)

    def double(module, args, out):
        return (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2

    h = a.layers(model)[1].register_forward_hook(double)
    try:
        with torch.no_grad():
            ref = model(ids, output_hidden_states=True).hidden_states[-1]
    finally:
        h.remove()
    _close(a.final_norm(model)(last), ref)


def test_streamed_and_offloaded_pass_equals_in_memory(tiny, ids, tmp_path):
    folder = tmp_path / "ckpt"
    tiny.model.save_pretrained(folder, max_shard_size="2MB")
    streamed = streaming.load_streaming(folder, activations_max_mb=0.0, activations_dir=tmp_path / "act")
    a = get_adapter(streamed)
    seen = []

    class Watch(KeepInputs):
        def on_layer_start(self, l, layer, inputs):
            super().on_layer_start(l, layer, inputs)
            seen.append(not any(p.is_meta for p in layer.parameters()))  # loaded for its turn
            assert sum(not p.is_meta for m in a.layers(streamed) for p in m.parameters()) == sum(
                p.numel() > 0 for p in layer.parameters()
            )  # and no other layer is

    keep, ref = Watch(), KeepInputs()
    got = run_layers(streamed, keep, ids, batch_size=2)
    want = run_layers(tiny.model, ref, ids, batch_size=2)
    assert seen == [True] * len(a.layers(streamed))
    assert all(p.is_meta for m in a.layers(streamed) for p in m.parameters())  # all released
    assert got.untyped_storage().filename is not None  # activations memory-mapped
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for x, y in zip(keep.inputs, ref.inputs):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


class _MemoryCheckpoint:
    def __init__(self):
        self.saved = None

    def load(self):
        return self.saved

    def save(self, next_layer, hidden):
        self.saved = (next_layer, hidden.clone())


def test_resume_from_a_checkpoint_runs_only_the_rest_and_gives_the_same_outputs(tiny, ids, hf_hidden):
    class Stop(KeepInputs):
        def on_layer_done(self, l):
            if l == 1:
                raise KeyboardInterrupt  # killed after layer 1's outputs were checkpointed

    ck = _MemoryCheckpoint()
    with pytest.raises(KeyboardInterrupt):
        run_layers(tiny.model, Stop(), ids, checkpoint=ck)
    assert ck.saved[0] == 2
    again = KeepInputs()
    last = run_layers(tiny.model, again, ids, checkpoint=ck)
    assert again.count == 2  # layers 2 and 3 only
    _close(again.inputs[0], hf_hidden[2])
    _close(get_adapter(tiny.model).final_norm(tiny.model)(last), hf_hidden[-1])


def test_hooks_and_stand_ins_are_removed_when_a_callback_fails(tiny, ids):
    model = copy.deepcopy(tiny.model)
    a = get_adapter(model)
    layers = list(a.layers(model))

    def all_hooks():  # (transformers installs output-capturing hooks of its own on a first forward)
        return [(n, list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()]

    before = all_hooks()

    class Fail(LayerCallback):
        def process(self, l, layer, inputs):
            lin = a.projections(layer)["o_proj"]

            def boom(module, args):
                raise RuntimeError("boom")

            return inputs.forward(layer, [(lin, "forward_pre", boom)])

    with pytest.raises(RuntimeError, match="boom"):
        run_layers(model, Fail(), ids)
    assert list(a.layers(model)) == layers  # the capture's stand-ins are gone
    assert all_hooks() == before


def test_uniform_prune_and_owl_stream(tiny, calib, taylor, tmp_path):
    """The uniform prune and the OWL statistics of a streamed model (one dense layer in memory; the
    pruned layers stay) equal those of the model in memory."""
    from tyr.allocation import outlier_ratios
    from tyr.pruning.uniform import prune_uniform

    from conftest import pruner_from_conf

    folder = tmp_path / "ckpt"
    tiny.model.save_pretrained(folder, max_shard_size="2MB")
    streamed = streaming.load_streaming(folder)
    assert outlier_ratios(streamed, calib) == pytest.approx(outlier_ratios(tiny.model, calib), rel=1e-6)
    want = copy.deepcopy(tiny.model)
    rep_w = prune_uniform(want, pruner_from_conf(), calib, 0.5, taylor, batch_size=4, progress=False)
    rep_g = prune_uniform(streamed, pruner_from_conf(), calib, 0.5, taylor, batch_size=4, progress=False)
    assert [r["channels_kept"] for r in rep_g["layers"]] == [r["channels_kept"] for r in rep_w["layers"]]
    assert rep_g["achieved_sparsity"] == rep_w["achieved_sparsity"] > 0.45
    assert not any(p.is_meta for p in streamed.parameters())
    with torch.no_grad():
        torch.testing.assert_close(streamed(calib[:2]).logits, want(calib[:2]).logits, rtol=0, atol=0)
