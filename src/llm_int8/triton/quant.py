"""Triton kernels for row-wise int8 quantization with outlier-column detection.

x is [M, K] (fp16, bf16 or fp32, any strides). Three small kernels, each a single sweep:

* ``_outlier_flags_kernel``: which columns hold any |x| >= threshold. Outlier columns are a property
  of the whole batch, so every program reduces a [rows, BLOCK_K] slab to one flag per column and
  merges it into ``flags`` [K] (int32) with an atomic max: one pass over x, whatever M is.
* ``_compact_kernel``: flags -> the sorted list of flagged columns and its length, on the device,
  so the matmul that follows needs no host synchronisation to learn how many outliers there are.
* ``_row_quant_kernel``: one program per row: the row absmax (leaving out what the caller says),
  then the codes ``round(x * (127 / absmax))``, flagged columns coded 0. The row is read twice by
  the same program; the second read hits L1/L2.

Codes are bit-identical to ``reference.quantize_rows``. torch evaluates its ``127 / absmax`` as
``absmax.reciprocal() * 127`` (two roundings, not one division), so the kernel forms the scale the same
way, with an IEEE-rounded reciprocal (``div_rn``); the product is rounded once to float32 and then to
the nearest integer, ties to even. The kernel is launched with ``enable_fp_fusion=False`` so the compiler cannot fold
the product into the rounding addition as one FMA (that would round the exact product instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import INT8_MAX

# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to the nearest integer,
# ties to even (IEEE round-to-nearest at a unit-sized ulp). Codes are at most 127 in magnitude.
ROUND_TO_EVEN_MAGIC = tl.constexpr(1.5 * 2**23)
CODE_MAX = tl.constexpr(float(INT8_MAX))
NAN = tl.constexpr(float("nan"))

# Column-flag reduction: rows per inner step, columns per program.
FLAGS_BLOCK_M = 16
FLAGS_BLOCK_K = 128
# Enough programs to fill a large GPU several times over; more only adds atomics.
FLAGS_TARGET_PROGRAMS = 1024
COMPACT_BLOCK = 1024
# Largest column block the row kernel holds in registers per step.
ROW_BLOCK_K_MAX = 2048
ROW_BLOCK_K_MIN = 16


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _outlier_flags_kernel(
    x_ptr, flags_ptr,
    M, K, rows_per_program,
    stride_xm, stride_xk,
    threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_stop = tl.minimum(row_start + rows_per_program, M)

    # -- reduce this slab of rows to one flag per column (NaN compares false: never an outlier)
    hit = tl.zeros([BLOCK_K], dtype=tl.int32)
    for m0 in range(row_start, row_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < row_stop) & k_mask[None, :]
        v = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        big = (tl.abs(v.to(tl.float32)) >= threshold).to(tl.int32)  # the rule of reference.outlier_values
        hit = tl.maximum(hit, tl.max(big, axis=0))

    # -- merge into the batch-wide flags; only columns that hit need an atomic
    tl.atomic_max(flags_ptr + offs_k, hit, mask=k_mask & (hit > 0))


@triton.jit
def _compact_kernel(
    flags_ptr, cols_ptr, count_ptr,
    K,
    FLAG: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program: a running prefix sum turns flags into sorted positions in cols.
    total = tl.zeros([], dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        selected = (tl.load(flags_ptr + offs, mask=offs < K, other=0) == FLAG).to(tl.int32)
        position = total + tl.cumsum(selected, 0) - 1
        tl.store(cols_ptr + position, offs.to(tl.int64), mask=selected != 0)
        total += tl.sum(selected, 0)
    tl.store(count_ptr, total)


@triton.jit
def _row_quant_kernel(
    x_ptr, flags_ptr, codes_ptr, absmax_ptr,
    K,
    stride_xm, stride_xk, stride_cm, stride_ck,
    threshold,
    HAS_FLAGS: tl.constexpr, MASK_VALUES: tl.constexpr, EXCLUDE_FLAGGED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK_K)

    # -- phase 1: the row absmax. MASK_VALUES leaves values >= threshold out of it (int8_vectorwise_quant);
    #    EXCLUDE_FLAGGED leaves whole flagged columns out (the mixed forward). NaN propagates.
    running = tl.zeros([BLOCK_K], dtype=tl.float32)
    nan_seen = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        a = tl.abs(tl.load(x_row + k * stride_xk, mask=mask, other=0.0).to(tl.float32))
        if MASK_VALUES:
            a = tl.where(a >= threshold, 0.0, a)  # reference.outlier_values
        if EXCLUDE_FLAGGED:
            a = tl.where(tl.load(flags_ptr + k, mask=mask, other=0) != 0, 0.0, a)
        is_nan = a != a
        nan_seen = tl.maximum(nan_seen, is_nan.to(tl.int32))
        running = tl.maximum(running, tl.where(is_nan, 0.0, a))
    absmax = tl.max(running, axis=0)
    absmax = tl.where(tl.max(nan_seen, axis=0) > 0, NAN, absmax)
    tl.store(absmax_ptr + row, absmax)

    # -- phase 2: codes. absmax 0 (or NaN) gives scale 0; NaN/Inf products become code 0.
    scale = tl.where(absmax > 0, tl.div_rn(1.0, absmax) * CODE_MAX, 0.0)
    codes_row = codes_ptr + row * stride_cm
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        v = tl.load(x_row + k * stride_xk, mask=mask, other=0.0).to(tl.float32)
        code = (v * scale + ROUND_TO_EVEN_MAGIC) - ROUND_TO_EVEN_MAGIC
        code = tl.where(code != code, 0.0, code)
        if HAS_FLAGS:
            code = tl.where(tl.load(flags_ptr + k, mask=mask, other=0) != 0, 0.0, code)
        tl.store(codes_row + k * stride_ck, code.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers


def outlier_column_flags(x: torch.Tensor, threshold: float, flags: torch.Tensor) -> torch.Tensor:
    """Raise ``flags`` [K] (int32) to ``RUNTIME_OUTLIER`` where a column of x [M, K] holds some
    |x| >= threshold (> 0); the atomic max never lowers a flag (e.g. ``CALIBRATED_COLUMN``)."""
    m, k = x.shape
    if m == 0 or k == 0:
        return flags
    k_blocks = triton.cdiv(k, FLAGS_BLOCK_K)
    m_programs = max(1, min(triton.cdiv(m, FLAGS_BLOCK_M), FLAGS_TARGET_PROGRAMS // k_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(m, m_programs), FLAGS_BLOCK_M) * FLAGS_BLOCK_M
    grid = (triton.cdiv(m, rows_per_program), k_blocks)
    _outlier_flags_kernel[grid](
        x, flags,
        m, k, rows_per_program,
        x.stride(0), x.stride(1),
        float(threshold),
        BLOCK_M=FLAGS_BLOCK_M, BLOCK_K=FLAGS_BLOCK_K,
    )
    return flags


def compact_columns(flags: torch.Tensor, flag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols int64 [K], count int32 [1]): the first ``count`` entries of cols are the sorted indices
    where ``flags == flag``. Stays on the device: no host synchronisation."""
    k = flags.numel()
    cols = torch.empty(max(k, 1), dtype=torch.int64, device=flags.device)
    if not k:
        return cols, torch.zeros(1, dtype=torch.int32, device=flags.device)
    count = torch.empty(1, dtype=torch.int32, device=flags.device)  # the kernel writes it: no memset launch
    _compact_kernel[(1,)](flags, cols, count, k, FLAG=flag, BLOCK=COMPACT_BLOCK)
    return cols, count


def quantize_rows(
    x: torch.Tensor,
    flags: torch.Tensor | None,
    threshold: float = 0.0,
    mask_values: bool = False,
    exclude_flagged: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise codes of x [M, K]: (x_int8 [M, K], x_absmax float32 [M]).

    Columns with a nonzero entry in ``flags`` [K] get code 0; ``exclude_flagged`` also leaves them out
    of the row absmax, ``mask_values`` leaves every value with |x| >= threshold out of it.
    """
    m, k = x.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    absmax = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, absmax
    block_k = min(max(triton.next_power_of_2(k), ROW_BLOCK_K_MIN), ROW_BLOCK_K_MAX)
    _row_quant_kernel[(m,)](
        x, flags if flags is not None else absmax, codes, absmax,
        k,
        x.stride(0), x.stride(1), codes.stride(0), codes.stride(1),
        float(threshold),
        HAS_FLAGS=flags is not None, MASK_VALUES=mask_values, EXCLUDE_FLAGGED=exclude_flagged,
        BLOCK_K=block_k,
        num_warps=4 if block_k <= 1024 else 8,
        enable_fp_fusion=False,
    )
    return codes, absmax
