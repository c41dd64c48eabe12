"""The LLM.int8() mixed-precision forward on Triton: four launches, no host synchronisation.

For x [M, K], weight_int8 [N, K], weight_absmax [N]:

1. column flags [K]: calibrated ``fp_cols`` pre-set, run-time outliers (any |x| >= threshold) merged
   in by one reduction over x;
2. the run-time outlier columns compacted to a device-side sorted list and count;
3. row quantization with every flagged column left out of the row absmax and coded 0 (second and
   last sweep over x);
4. the int8 GEMM whose epilogue dequantizes, adds the decomposed columns as float32 rank-1 updates
   (gathering only those columns of x and of the weight) and the bias, and rounds once to x's dtype.

Same semantics as ``reference.int8_mixed_linear``; the int8 codes and int32 accumulators are the
reference's exactly, float results differ only by the order of float32 additions.
"""

from __future__ import annotations

import torch

from .int8_matmul import int8_linear_dequant
from .quant import CALIBRATED_COLUMN, RUNTIME_OUTLIER, compact_columns, outlier_column_flags, quantize_rows


def int8_mixed_linear(x, weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None):
    """The ``llm_int8::int8_mixed_linear`` kernel: x [M, K] -> [M, N] in x's dtype."""
    k = x.shape[1]
    has_fp_cols = fp_cols is not None and fp_cols.numel() > 0
    flags = torch.zeros(k, dtype=torch.int32, device=x.device)
    if has_fp_cols:
        flags.index_fill_(0, fp_cols, CALIBRATED_COLUMN)
    cols = n_cols = None
    if threshold > 0.0:
        outlier_column_flags(x, threshold, flags)
        cols, n_cols = compact_columns(flags, RUNTIME_OUTLIER)
    use_flags = threshold > 0.0 or has_fp_cols
    x_int8, x_absmax = quantize_rows(x, flags if use_flags else None, exclude_flagged=use_flags)
    return int8_linear_dequant(
        x_int8, weight_int8, x_absmax, weight_absmax, bias, x.dtype,
        x=x, cols=cols, n_cols=n_cols,
        fp_cols=fp_cols if has_fp_cols else None, fp_weight=fp_weight if has_fp_cols else None,
    )
