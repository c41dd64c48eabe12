"""llm_int8: LLM.int8() (Dettmers et al., 2022) for PyTorch, faithful to the paper and fast on CPU and GPU.

    import llm_int8
    report = llm_int8.quantize_(model, llm_int8.Int8Config(threshold=6.0))
"""

import importlib
import importlib.metadata
import importlib.util
import warnings

from . import dispatch  # noqa: F401  (registers the Triton kernels for CUDA tensors when available)
from . import functional
from .convert import Int8Config, QuantizeReport, memory_footprint, quantize_
from .decode import lean_decoding
from .integrations import call_when_imported, transformers_problem
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


def _register_transformers() -> None:
    # Registers the "llm_int8" quantization method and its config with transformers (the optional extra "hf").
    # import_module, not ``from ... import``: when the import of transformers that calls this was itself made
    # by llm_int8.integrations.hf, that module is half-built here, and finishes (registering) afterwards.
    # A failure must not break `import transformers`: it is told here, and from_pretrained then does not know
    # LLMInt8Config.
    try:
        importlib.import_module("llm_int8.integrations.hf")
    except ImportError as err:
        warnings.warn(f"llm_int8 could not register its quantization method with transformers ({err})")


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


if transformers_problem() is None:
    # Registered when transformers is imported (now, if it already is): importing it takes seconds, and a
    # user of Linear8bitLt alone need not pay for it. Then ``llm_int8.LLMInt8Config`` is the registered class.
    call_when_imported("transformers", _register_transformers)
    __all__.append("LLMInt8Config")

if importlib.util.find_spec("peft") is not None:
    # Registered when peft is imported (now, if it already is): importing peft takes seconds.
    call_when_imported("peft", _register_peft)


def __getattr__(name):
    if name == "LLMInt8Config":  # imports transformers (registering with it), or raises the error that says why not
        from .integrations.hf import LLMInt8Config

        return LLMInt8Config
    raise AttributeError(f"module 'llm_int8' has no attribute {name!r}")
