"""Triton int8 GEMM with int32 accumulation and the LLM.int8() dequantization epilogue.

``out[M, N] = a[M, K] @ b[N, K].T`` with a, b int8 and an exact int32 accumulator. The epilogue
(``_epilogue``, shared by both kernels below) is chosen at compile time:

* ``acc * (x_absmax / 127)[:, None] * (w_absmax / 127)[None, :]``, in the reference's order;
* plus the decomposed columns as float32 rank-1 updates: run-time outliers (a device-side list and
  count from ``quant.compact_columns``, so the host never learns how many there are) against the
  dequantized int8 weight column, calibrated ``fp_cols`` against their stored float column;
* plus bias, rounded once to the output dtype.

Kernels: ``_int8_gemm_kernel`` (the GEMM, storing either the int32 accumulator or the fused epilogue:
no int32 matrix reaches memory) and ``_epilogue_kernel`` (the epilogue alone, over an int32
accumulator from elsewhere: the ``int8_mm_dequant`` op, and the safe path's ``torch._int_mm``).

With ~0.1 % outlier columns the rank-1 updates cost a few FMAs per output element, next to K
multiply-adds in the int8 part. Two autotuned entry points share the GEMM: decode (M <=
``DECODE_MAX_M``: a 16-row tile that streams the weight, many narrow N tiles so every SM pulls weight
bytes) and prefill (large tiles, grouped tile order for L2 reuse). Configs much larger than the
problem are pruned before tuning, and tuning times each config briefly (``TUNING_WARMUP_MS``,
``TUNING_REP_MS``): the first call of a new shape bucket costs compile time, not seconds of timing.
Under ``TRITON_INTERPRET=1`` on CPU tensors a single small config runs instead, so the ragged-edge
masks are exercised on tiny shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import INT8_MAX
from ..cuda import RUNTIME_OUTLIER
from .quant import compact_columns

CODE_MAX = tl.constexpr(float(INT8_MAX))
DECODE_MAX_M = 16
# Autotuning keys on a power-of-two bucket of M, not M itself, so a new sequence length does not
# trigger a new tuning run.
M_BUCKET_MAX = 4096
# Smallest tile side tl.dot takes.
DOT_MIN = 16
TUNING_WARMUP_MS = 5
TUNING_REP_MS = 25


def _config(block_m, block_n, block_k, group_m, stages, warps):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_stages=stages,
        num_warps=warps,
    )


# H100/H200 (228 KB shared memory per SM) first; the smaller ones are the safe defaults elsewhere. A
# config that does not fit a GPU's shared memory fails to compile there and the autotuner skips it.
PREFILL_CONFIGS = [
    _config(128, 256, 128, 8, 3, 8),
    _config(256, 128, 128, 8, 3, 8),
    _config(128, 128, 128, 8, 4, 8),
    _config(128, 128, 128, 8, 3, 4),
    _config(128, 128, 64, 8, 4, 4),
    _config(64, 128, 128, 8, 4, 4),
    _config(128, 64, 128, 8, 4, 4),
    _config(64, 64, 128, 8, 4, 4),
    _config(32, 64, 128, 8, 4, 4),
]
DECODE_CONFIGS = [
    _config(16, 32, 256, 1, 4, 4),
    _config(16, 64, 256, 1, 4, 4),
    _config(16, 32, 512, 1, 3, 4),
    _config(16, 64, 512, 1, 3, 4),
    _config(16, 128, 128, 1, 5, 4),
    _config(16, 64, 128, 1, 6, 4),
    _config(16, 128, 256, 1, 4, 8),
]
# Under the interpreter: small blocks, so 17 or 33 rows/columns already span two tiles.
INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
TUNING_KEYS = ["M_BUCKET", "N", "K", "DEQUANT", "HAS_OUTLIERS", "HAS_FP_COLS", "HAS_BIAS"]

EPILOGUE_BLOCK_M = 32
EPILOGUE_BLOCK_N = 128


def _fits(block: int, size: int) -> bool:
    """A tile side no larger than the problem side needs (its power of two, at least tl.dot's minimum)."""
    return block <= max(triton.next_power_of_2(size), DOT_MIN)


def prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles are larger than the problem in some dimension (they only add masked
    work and tuning time); when none is left, keep the one with the smallest tile."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    kept = [
        c for c in configs
        if _fits(c.kwargs["BLOCK_M"], m) and _fits(c.kwargs["BLOCK_N"], n) and _fits(c.kwargs["BLOCK_K"], k)
    ]
    if kept:
        return kept
    return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def _tuning_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=TUNING_WARMUP_MS, rep=TUNING_REP_MS, quantiles=quantiles)


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, m_mask, n_mask,
    x_absmax_ptr, w_absmax_ptr, bias_ptr,
    x_ptr, b_ptr, cols_ptr, n_cols_ptr, fp_cols_ptr, fp_weight_ptr,
    F,
    stride_xm, stride_xk, stride_bn, stride_bk, stride_fn, stride_ff,
    HAS_OUTLIERS: tl.constexpr, HAS_FP_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """float32 [BLOCK_M, BLOCK_N] tile of the LLM.int8() output from its int32 accumulator tile."""
    # -- row scale x column scale, in the reference's order
    x_scale = tl.load(x_absmax_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32) / CODE_MAX
    w_scale = tl.load(w_absmax_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) / CODE_MAX
    out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]

    # -- decomposed columns: float32 rank-1 updates with the 16/32-bit x column
    if HAS_OUTLIERS:
        n_cols = tl.load(n_cols_ptr)
        for i in range(0, n_cols):
            col = tl.load(cols_ptr + i)
            x_col = tl.load(x_ptr + offs_m * stride_xm + col * stride_xk, mask=m_mask, other=0.0)
            w_col = tl.load(b_ptr + offs_n * stride_bn + col * stride_bk, mask=n_mask, other=0)
            out += x_col.to(tl.float32)[:, None] * (w_col.to(tl.float32) * w_scale)[None, :]
    if HAS_FP_COLS:
        for i in range(0, F):
            col = tl.load(fp_cols_ptr + i)
            x_col = tl.load(x_ptr + offs_m * stride_xm + col * stride_xk, mask=m_mask, other=0.0)
            w_col = tl.load(fp_weight_ptr + offs_n * stride_fn + i * stride_ff, mask=n_mask, other=0.0)
            out += x_col.to(tl.float32)[:, None] * w_col.to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _int8_gemm_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, x_absmax_ptr, w_absmax_ptr, bias_ptr,
    x_ptr, cols_ptr, n_cols_ptr, fp_cols_ptr, fp_weight_ptr,
    # sizes
    M, N, K, F, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    stride_xm, stride_xk, stride_fn, stride_ff,
    # meta-parameters
    DEQUANT: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_FP_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- tile order: GROUP_M row-tiles sweep the N tiles together, so their weight tiles stay in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # -- main loop: int8 x int8 -> exact int32
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # Triton 3.6 needs the int32 named
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if not DEQUANT:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        out = _epilogue(
            acc, offs_m, offs_n, m_mask, n_mask,
            x_absmax_ptr, w_absmax_ptr, bias_ptr,
            x_ptr, b_ptr, cols_ptr, n_cols_ptr, fp_cols_ptr, fp_weight_ptr,
            F,
            stride_xm, stride_xk, stride_bn, stride_bk, stride_fn, stride_ff,
            HAS_OUTLIERS, HAS_FP_COLS, HAS_BIAS,
        )
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


_tuned = dict(key=TUNING_KEYS, prune_configs_by={"early_config_prune": prune_configs}, do_bench=_tuning_bench)
_decode_kernel = triton.autotune(configs=DECODE_CONFIGS, **_tuned)(_int8_gemm_kernel)
_prefill_kernel = triton.autotune(configs=PREFILL_CONFIGS, **_tuned)(_int8_gemm_kernel)


@triton.jit
def _epilogue_kernel(
    # pointers
    acc_ptr, out_ptr, x_absmax_ptr, w_absmax_ptr, bias_ptr,
    x_ptr, b_ptr, cols_ptr, n_cols_ptr, fp_cols_ptr, fp_weight_ptr,
    # sizes
    M, N, F,
    # strides
    stride_am, stride_an, stride_om, stride_on,
    stride_xm, stride_xk, stride_bn, stride_bk, stride_fn, stride_ff,
    # meta-parameters
    HAS_OUTLIERS: tl.constexpr, HAS_FP_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an, mask=mask, other=0)
    out = _epilogue(
        acc, offs_m, offs_n, m_mask, n_mask,
        x_absmax_ptr, w_absmax_ptr, bias_ptr,
        x_ptr, b_ptr, cols_ptr, n_cols_ptr, fp_cols_ptr, fp_weight_ptr,
        F,
        stride_xm, stride_xk, stride_bn, stride_bk, stride_fn, stride_ff,
        HAS_OUTLIERS, HAS_FP_COLS, HAS_BIAS,
    )
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers


def _epilogue_args(out, b, x, flags, fp_cols, fp_weight):
    """The epilogue's pointer, size and stride arguments and flags; any pointer not in use is ``out``.

    Run-time outlier columns (``flags == RUNTIME_OUTLIER``) are compacted on the device here.
    """
    cols = n_cols = None
    if flags is not None:
        cols, n_cols = compact_columns(flags, RUNTIME_OUTLIER)
    has_fp_cols = fp_cols is not None
    x = x if x is not None else out
    b = b if b is not None else out
    fp_weight = fp_weight if has_fp_cols else out
    pointers = (x, b, cols if cols is not None else out, n_cols if n_cols is not None else out,
                fp_cols if has_fp_cols else out, fp_weight)
    strides = (x.stride(0), x.stride(1), b.stride(0), b.stride(1), fp_weight.stride(0), fp_weight.stride(1))
    flags_meta = {"HAS_OUTLIERS": cols is not None, "HAS_FP_COLS": has_fp_cols}
    return pointers, fp_cols.numel() if has_fp_cols else 0, strides, flags_meta


def _launch_gemm(a, b, out, *, x_absmax=None, w_absmax=None, bias=None, x=None, flags=None, fp_cols=None,
                 fp_weight=None):
    """Check-free launch of the GEMM (with the fused epilogue when x_absmax is given)."""
    m, k = a.shape
    n = b.shape[0]
    pointers, n_fp, strides, meta = _epilogue_args(out, None, x, flags, fp_cols, fp_weight)
    x_ptr, _, cols, n_cols, fp_cols_ptr, fp_weight_ptr = pointers
    stride_xm, stride_xk, _, _, stride_fn, stride_ff = strides
    args = (
        a, b, out,
        x_absmax if x_absmax is not None else out,
        w_absmax if w_absmax is not None else out,
        bias if bias is not None else out,
        x_ptr, cols, n_cols, fp_cols_ptr, fp_weight_ptr,
        m, n, k, n_fp, min(triton.next_power_of_2(m), M_BUCKET_MAX),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        stride_xm, stride_xk, stride_fn, stride_ff,
    )
    meta.update(DEQUANT=x_absmax is not None, HAS_BIAS=bias is not None)

    def grid(config):
        return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)

    if a.device.type == "cpu":  # only reachable under TRITON_INTERPRET=1
        _int8_gemm_kernel[grid](*args, **meta, **INTERPRETER_META)
    elif m <= DECODE_MAX_M:
        _decode_kernel[grid](*args, **meta)
    else:
        _prefill_kernel[grid](*args, **meta)


def int8_linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``llm_int8::int8_linear_matmul`` kernel: a int8 [M, K], b int8 [N, K] -> int32 [M, N], exact."""
    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    _launch_gemm(a, b, out)
    return out


def int8_linear_dequant(a, b, x_absmax, w_absmax, bias=None, out_dtype=torch.float32, *, x=None, flags=None,
                        fp_cols=None, fp_weight=None) -> torch.Tensor:
    """Fused ``int8_mm_dequant(int8_linear_matmul(a, b), ...)`` plus the decomposed columns.

    a int8 [M, K] with row absmax x_absmax [M]; b int8 [N, K] with row absmax w_absmax [N]. With
    ``flags`` [K] the columns ``x[:, flags == RUNTIME_OUTLIER]`` are added against the dequantized
    columns of b; with ``fp_cols`` [F] and ``fp_weight`` [N, F] the columns ``x[:, fp_cols]`` against
    fp_weight. Returns [M, N] in out_dtype.
    """
    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    _launch_gemm(a, b, out, x_absmax=x_absmax, w_absmax=w_absmax, bias=bias, x=x, flags=flags, fp_cols=fp_cols,
                 fp_weight=fp_weight)
    return out


def dequant_epilogue(acc, x_absmax, w_absmax, bias=None, out_dtype=torch.float32, *, x=None, b=None, flags=None,
                     fp_cols=None, fp_weight=None) -> torch.Tensor:
    """The epilogue of :func:`int8_linear_dequant` over an int32 accumulator [M, N] computed elsewhere
    (b is the int8 weight [N, K] the run-time outlier columns are read from)."""
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m == 0 or n == 0:
        return out
    pointers, n_fp, strides, meta = _epilogue_args(out, b, x, flags, fp_cols, fp_weight)
    grid = (triton.cdiv(m, EPILOGUE_BLOCK_M), triton.cdiv(n, EPILOGUE_BLOCK_N))
    _epilogue_kernel[grid](
        acc, out, x_absmax, w_absmax, bias if bias is not None else out,
        *pointers,
        m, n, n_fp,
        acc.stride(0), acc.stride(1), out.stride(0), out.stride(1),
        *strides,
        **meta, HAS_BIAS=bias is not None, BLOCK_M=EPILOGUE_BLOCK_M, BLOCK_N=EPILOGUE_BLOCK_N,
    )
    return out


def int8_mm_dequant(acc, x_absmax, w_absmax, bias=None, out_dtype=None) -> torch.Tensor:
    """The ``llm_int8::int8_mm_dequant`` kernel: int32 [M, N] -> float [M, N] in out_dtype (float32)."""
    return dequant_epilogue(acc, x_absmax, w_absmax, bias, out_dtype or torch.float32)
