"""A GGUF opened by llama-cpp-python (the dev extra), as tyr's tests and GGUF benchmark open it.

On a CPU with AMX, llama.cpp as llama-cpp-python 0.3.36 builds it (``-march=native``) places quantized weights in
its AMX buffer type and segfaults in the first matrix product: measured here on a Xeon with ``amx_int8``, for
the package's own SmolLM2 Q4_1 GGUF as for tyr's q8_0 files (the f32 ones run; upstream report:
ggml-org/llama.cpp#20824). On such a CPU the extra buffer types are switched off (what ``llama-cli --no-repack``
does); elsewhere llama.cpp's defaults, weight repacking included, stand. docs/gguf.md says the same to users."""

from __future__ import annotations

import contextlib
from pathlib import Path


def cpu_has_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports AMX (``amx_int8``); False where there is no ``/proc/cpuinfo``."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_int8" in line.split() for line in text.splitlines())


@contextlib.contextmanager
def _model_params(extra_bufts: bool):
    """llama-cpp-python's model parameters with ``use_extra_bufts`` set (its ``Llama`` exposes no argument)."""
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = default


def open_llama(path: str | Path, **kwargs):
    """``llama_cpp.Llama(path, **kwargs)``, with the extra buffer types off on a CPU with AMX."""
    from llama_cpp import Llama

    with _model_params(extra_bufts=not cpu_has_amx()):
        return Llama(str(path), **kwargs)
