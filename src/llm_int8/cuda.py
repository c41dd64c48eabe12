"""The CUDA path: the LLM.int8() ops composed from stages, and those stages written in torch ops.

Shapes follow ``_ops.py``: x [M, K], weight_int8 [N, K], out [M, N]. The mixed forward is three stages

1. ``outlier_column_flags``: one int32 flag per input column, ``RUNTIME_OUTLIER`` where some
   |x| >= threshold (``reference.outlier_values``), merged into flags that may hold
   ``CALIBRATED_COLUMN`` already;
2. ``quantize_rows``: row absmax and int8 codes, flagged columns left out of the absmax and coded 0;
3. ``linear_dequant``: the int8 GEMM, dequantized, plus the decomposed columns (run-time outliers
   against the dequantized int8 weight, calibrated ``fp_cols`` against their stored float weight)
   and the bias, rounded once to x's dtype;

and :class:`Stages` says who runs them (with two more for the ``int8_linear_matmul`` and
``int8_mm_dequant`` ops): the Triton kernels (``llm_int8.triton.STAGES``), the torch
ops below (:data:`TORCH_STAGES`), or a guarded mix of both (``llm_int8.dispatch``), where a Triton
kernel that fails to compile or launch hands its stage over to the torch ops once, with a warning.

No stage reads a device value on the host: the outlier columns stay a device-side flag vector
(the Triton GEMM reads their count in the kernel; the torch ops here mask instead of indexing), so
a forward never waits for the GPU and can be captured in a CUDA graph. The one exception is the
``int8_vectorwise_quant`` op with threshold > 0, whose contract returns the outlier columns as a
tensor of data-dependent length (``nonzero``); the forward never calls it.

The torch stages are the safe path: exact int8 codes and int32 accumulators (``torch._int_mm``,
padded to cuBLAS's shape rules), float parts computed so that no TF32 setting can round them. They
are not fast: with run-time outliers the decomposed product is a dense masked GEMM over all K
columns (with no host read of the outlier count there is no smaller exact choice), in float64 in
chunks of at most ``DENSE_CHUNK_BYTES``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ._ops import INT8_MAX
from .reference import outlier_column_mask, outlier_values

# Flag values in the int32 [K] column-flag vector shared by every stage.
RUNTIME_OUTLIER = 1  # a column found at run time (some |x| >= threshold)
CALIBRATED_COLUMN = 2  # a calibrated fp column (``fp_cols``): always out of the int8 product

# torch._int_mm on CUDA (cuBLASLt) takes a [M, K] x [K, N] product only with M > 16 and K, N
# positive multiples of 8; smaller or ragged operands are zero-padded, which adds nothing to the sums.
INT_MM_MIN_ROWS = 17
INT_MM_MULTIPLE = 8
# Largest float64 weight block the dense outlier product converts at a time (bytes).
DENSE_CHUNK_BYTES = 64 * 2**20


class Stages(NamedTuple):
    """Who runs each stage: the three of the CUDA forward (see the module docstring), then the two
    that the ``int8_linear_matmul`` and ``int8_mm_dequant`` ops run on their own.

    * ``outlier_column_flags(x, threshold, flags) -> flags`` (updates flags [K] in place);
    * ``quantize_rows(x, flags, threshold=0.0, mask_values=False, exclude_flagged=False)
      -> (x_int8 [M, K], x_absmax float32 [M])``;
    * ``linear_dequant(a, b, x_absmax, w_absmax, bias, out_dtype, *, x=None, flags=None,
      fp_cols=None, fp_weight=None) -> out [M, N]``;
    * ``linear_matmul(a, b) -> int32 [M, N]`` and ``mm_dequant(acc, x_absmax, w_absmax, bias,
      out_dtype) -> out [M, N]`` for the ops of those names.
    """

    outlier_column_flags: Callable
    quantize_rows: Callable
    linear_dequant: Callable
    linear_matmul: Callable
    mm_dequant: Callable


# --------------------------------------------------------------------------------------------
# The ops, composed from stages


def vectorwise_quant(stages: Stages, x: torch.Tensor, threshold: float = 0.0):
    """``int8_vectorwise_quant``: (x_int8 [M, K], x_absmax [M], outlier_cols int64 sorted)."""
    if threshold > 0.0:
        flags = torch.zeros(x.shape[1], dtype=torch.int32, device=x.device)
        stages.outlier_column_flags(x, threshold, flags)
        codes, absmax = stages.quantize_rows(x, flags, threshold, mask_values=True)
        outlier_cols = flags.nonzero().view(-1)  # data-dependent length: the op's one host sync
    else:
        codes, absmax = stages.quantize_rows(x, None)
        outlier_cols = torch.empty(0, dtype=torch.int64, device=x.device)
    return codes, absmax, outlier_cols


def mixed_linear(stages: Stages, x, weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None,
                 fp_weight=None):
    """``int8_mixed_linear``: x [..., K] -> [..., N] in x's dtype (the op passes [M, K]); the semantics of
    ``reference.int8_mixed_linear``."""
    if x.dim() != 2:
        out = mixed_linear(stages, x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight_int8, weight_absmax,
                           bias, threshold, fp_cols, fp_weight)
        return out.view(*x.shape[:-1], out.shape[-1])
    has_fp_cols = fp_cols is not None and fp_cols.numel() > 0
    use_flags = threshold > 0.0 or has_fp_cols
    flags = None
    if use_flags:
        flags = torch.zeros(x.shape[1], dtype=torch.int32, device=x.device)
        if has_fp_cols:
            flags.index_fill_(0, fp_cols, CALIBRATED_COLUMN)
        if threshold > 0.0:
            stages.outlier_column_flags(x, threshold, flags)
    x_int8, x_absmax = stages.quantize_rows(x, flags, exclude_flagged=use_flags)
    return stages.linear_dequant(
        x_int8, weight_int8, x_absmax, weight_absmax, bias, x.dtype,
        x=x, flags=flags if threshold > 0.0 else None,
        fp_cols=fp_cols if has_fp_cols else None, fp_weight=fp_weight if has_fp_cols else None,
    )


# --------------------------------------------------------------------------------------------
# The stages in torch ops: the safe path, and the CUDA path where Triton is missing


def outlier_column_flags(x: torch.Tensor, threshold: float, flags: torch.Tensor) -> torch.Tensor:
    """Raise ``flags`` [K] to ``RUNTIME_OUTLIER`` where a column of x [M, K] holds some |x| >= threshold.

    NaN is never an outlier and cannot hide one elsewhere in its column (it counts as 0 here).
    """
    if x.shape[0] == 0 or x.shape[1] == 0:
        return flags
    hit = outlier_column_mask(x, threshold).to(torch.int32) * RUNTIME_OUTLIER
    return torch.maximum(flags, hit, out=flags)


def quantize_rows(x, flags, threshold=0.0, mask_values=False, exclude_flagged=False):
    """Row-wise codes of x [M, K]: (x_int8 [M, K], x_absmax float32 [M]), bit-identical to the reference.

    Columns with a nonzero flag are coded 0; ``exclude_flagged`` also leaves them out of the row
    absmax, ``mask_values`` leaves every |x| >= threshold out of it. ``127 / absmax`` is taken as torch
    takes it in ``reference.quantize_rows``; a NaN/Inf row gets code 0 (its absmax carries the NaN/Inf).
    """
    m, k = x.shape
    xf = x.float()
    if k == 0:
        return torch.empty((m, 0), dtype=torch.int8, device=x.device), torch.zeros(m, device=x.device)
    magnitude = xf.abs()
    if mask_values:
        magnitude.masked_fill_(outlier_values(magnitude, threshold), 0.0)
    if exclude_flagged:
        magnitude.masked_fill_((flags != 0).unsqueeze(0), 0.0)
    absmax = magnitude.amax(dim=1)
    scale = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax))
    # Codes can only be NaN (NaN input, or Inf times a zero scale), never Inf: |x| <= absmax elsewhere.
    codes = (xf * scale.unsqueeze(1)).round_().nan_to_num_(nan=0.0)
    if flags is not None:
        codes.masked_fill_((flags != 0).unsqueeze(0), 0.0)
    return codes.to(torch.int8), absmax


def linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM a [M, K] x b [N, K]^T -> int32 [M, N] through ``torch._int_mm`` (cuBLASLt).

    Operands outside cuBLAS's shape rules (``INT_MM_MIN_ROWS``, ``INT_MM_MULTIPLE``) are zero-padded:
    a 1-row decode step computes 17 rows, and a weight with K or N not a multiple of 8 is copied.
    """
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device)
    pad_m = max(INT_MM_MIN_ROWS - m, 0)
    pad_k = -k % INT_MM_MULTIPLE
    pad_n = -n % INT_MM_MULTIPLE
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_k, 0, pad_n))
    acc = torch._int_mm(a.contiguous(), b.contiguous().T)  # [K, N] column-major: cuBLAS's "TN" layout
    if pad_m or pad_n:
        acc = acc[:m, :n].contiguous()
    return acc


def dequant_epilogue(acc, x_absmax, w_absmax, bias=None, out_dtype=torch.float32, *, x=None, b=None, flags=None,
                     fp_cols=None, fp_weight=None):
    """acc int32 [M, N] -> out [M, N] in out_dtype: ``acc * x_absmax/127 (x) w_absmax/127``, plus the
    run-time outlier columns of x (``flags == RUNTIME_OUTLIER``) against the dequantized int8 weight b
    [N, K], plus ``x[:, fp_cols] @ fp_weight.T``, plus bias; float32 sums, rounded once to out_dtype.

    The outlier product is dense (x masked to the outlier columns) and in float64, N-chunked: its
    products and sums are exact enough for any TF32 setting, and it needs no count of the columns.
    """
    out = acc.float() * (x_absmax.float() / INT8_MAX).unsqueeze(1) * (w_absmax.float() / INT8_MAX).unsqueeze(0)
    if flags is not None and acc.numel():
        x_outliers = x.double().masked_fill_((flags != RUNTIME_OUTLIER).unsqueeze(0), 0.0)
        w_scale = w_absmax.double() / INT8_MAX
        rows = max(1, DENSE_CHUNK_BYTES // (8 * max(b.shape[1], 1)))
        for start in range(0, b.shape[0], rows):
            stop = min(start + rows, b.shape[0])
            part = x_outliers @ b[start:stop].double().T
            out[:, start:stop] += (part * w_scale[start:stop]).float()
    if fp_cols is not None and acc.numel():
        out += (x[:, fp_cols].double() @ fp_weight.double().T).float()
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def linear_dequant(a, b, x_absmax, w_absmax, bias=None, out_dtype=torch.float32, *, x=None, flags=None,
                   fp_cols=None, fp_weight=None):
    """``dequant_epilogue(linear_matmul(a, b), ...)``: the GEMM stage in torch ops."""
    return dequant_epilogue(linear_matmul(a, b), x_absmax, w_absmax, bias, out_dtype, x=x, b=b, flags=flags,
                            fp_cols=fp_cols, fp_weight=fp_weight)


def mm_dequant(acc, x_absmax, w_absmax, bias=None, out_dtype=None):
    """The ``int8_mm_dequant`` op in torch ops: int32 [M, N] -> float [M, N] in out_dtype (float32)."""
    return dequant_epilogue(acc, x_absmax, w_absmax, bias, out_dtype or torch.float32)


TORCH_STAGES = Stages(outlier_column_flags, quantize_rows, linear_dequant, linear_matmul, mm_dequant)
