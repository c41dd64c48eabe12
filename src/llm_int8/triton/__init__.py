"""Triton kernels for the ``llm_int8`` ops: the GPU path.

The only package that imports ``triton``. ``llm_int8.dispatch`` registers the launchers below as the
CUDA kernels of the ops in ``_ops.py``; they also accept CPU tensors under ``TRITON_INTERPRET=1``,
which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("triton") is None:
    raise ImportError(
        "llm_int8's GPU kernels need Triton, which is not installed: pip install 'llm-int8[triton]' "
        "(Triton ships with the CUDA builds of PyTorch on Linux)"
    )

from .int8_matmul import int8_linear_dequant, int8_linear_matmul, int8_mm_dequant  # noqa: E402
from .mixed import int8_mixed_linear  # noqa: E402
from .quant import int8_vectorwise_quant  # noqa: E402

KERNELS = {
    "int8_vectorwise_quant": int8_vectorwise_quant,
    "int8_linear_matmul": int8_linear_matmul,
    "int8_mm_dequant": int8_mm_dequant,
    "int8_mixed_linear": int8_mixed_linear,
}

__all__ = [
    "KERNELS",
    "int8_linear_dequant",
    "int8_linear_matmul",
    "int8_mixed_linear",
    "int8_mm_dequant",
    "int8_vectorwise_quant",
]
