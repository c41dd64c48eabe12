"""llm_int8: LLM.int8() (Dettmers et al., 2022) for PyTorch, faithful to the paper and fast on CPU and GPU.

    import llm_int8
    report = llm_int8.quantize_(model, llm_int8.Int8Config(threshold=6.0))
"""

import importlib.metadata
import importlib.util
import warnings

from . import dispatch  # noqa: F401  (registers the Triton kernels for CUDA tensors when available)
from . import functional
from .convert import Int8Config, QuantizeReport, memory_footprint, quantize_
from .decode import lean_decoding
from .nn import Embedding8bit, Linear8bitLt, set_batch_invariant

__version__ = "0.1.0"

__all__ = [
    "Embedding8bit",
    "Int8Config",
    "Linear8bitLt",
    "QuantizeReport",
    "functional",
    "lean_decoding",
    "memory_footprint",
    "quantize_",
    "set_batch_invariant",
]

def _transformers_major() -> int | None:
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


if (_transformers_major() or 0) >= 5:
    # Registers the "llm_int8" quantization method with transformers (the optional extra "hf").
    from .integrations.hf import LLMInt8Config

    __all__.append("LLMInt8Config")


def _register_peft() -> None:
    # Makes peft's LoRA/DoRA wrap Linear8bitLt (llm_int8.integrations.peft). An incompatible peft must not
    # break `import peft`: it is told here, and peft then refuses our layers with its own error.
    try:
        from .integrations.peft import register
        register()
    except (ImportError, AttributeError) as err:
        warnings.warn(
            f"llm_int8 could not register its LoRA layers with peft {importlib.metadata.version('peft')} ({err}); "
            "LoRA on Linear8bitLt needs a compatible peft: pip install peft==0.21.2"
        )


if importlib.util.find_spec("peft") is not None:
    # Registered when peft is imported (now, if it already is): importing peft takes seconds.
    from .integrations import call_when_imported

    call_when_imported("peft", _register_peft)


def __getattr__(name):
    if name == "LLMInt8Config":  # not registered above: import it here for the error that says why
        from .integrations.hf import LLMInt8Config

        return LLMInt8Config
    raise AttributeError(f"module 'llm_int8' has no attribute {name!r}")
