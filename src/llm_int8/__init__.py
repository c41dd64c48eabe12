"""llm_int8: LLM.int8() (Dettmers et al., 2022) for PyTorch, faithful to the paper and fast on CPU and GPU.

    import llm_int8
    report = llm_int8.quantize_(model, llm_int8.Int8Config(threshold=6.0))
"""

from . import functional
from .convert import Int8Config, QuantizeReport, memory_footprint, quantize_
from .nn import Linear8bitLt

__version__ = "0.1.0"

__all__ = [
    "Int8Config",
    "Linear8bitLt",
    "QuantizeReport",
    "functional",
    "memory_footprint",
    "quantize_",
]
