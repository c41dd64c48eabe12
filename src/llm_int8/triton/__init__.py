"""Triton kernels for the ``llm_int8`` ops: the fast GPU path.

The only package that imports ``triton``. :data:`STAGES` fills the stages of the CUDA forward
(``llm_int8.cuda``) with the launchers below; ``llm_int8.dispatch`` guards each of them with its
torch-op counterpart and registers the result as the CUDA kernels of the ops in ``_ops.py``. The
launchers also accept CPU tensors under ``TRITON_INTERPRET=1``, which is how the test suite checks
them without a GPU.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("triton") is None:
    raise ImportError(
        "llm_int8's GPU kernels need Triton, which is not installed: pip install 'llm-int8[triton]' "
        "(Triton ships with the CUDA builds of PyTorch on Linux)"
    )

from ..cuda import Stages  # noqa: E402
from .int8_matmul import (  # noqa: E402
    dequant_epilogue,
    int8_linear_dequant,
    int8_linear_matmul,
    int8_mm_dequant,
)
from .quant import compact_columns, outlier_column_flags, quantize_rows  # noqa: E402

STAGES = Stages(outlier_column_flags, quantize_rows, int8_linear_dequant, int8_linear_matmul, int8_mm_dequant)

__all__ = [
    "STAGES",
    "compact_columns",
    "dequant_epilogue",
    "int8_linear_dequant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "outlier_column_flags",
    "quantize_rows",
]
