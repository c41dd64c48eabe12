"""CPU kernels for the ops in ``_ops.py``.

The int8 GEMM path is chosen per machine (``gemm_paths()[0]``):

* ``avx512_vnni`` / ``avx2``: our native kernel (``csrc/*.c``, built on first use) with
  its AVX-512 VNNI micro-kernel where the CPU has one (on Zen 4 it measured faster than both the
  AVX2 micro-kernel and ``torch._int_mm`` plus a dequantization epilogue, see the README), else
  its AVX2 one. The AVX2 micro-kernel needs a's codes in [-127, 127]; an ``a`` holding -128 takes
  the ``fp32`` path there.
* ``int_mm``: ``torch._int_mm`` (oneDNN) on AVX-512 machines when the native kernel is unavailable.
* ``fp32``: float32 GEMMs over K-chunks of at most ``EXACT_FP32_CHUNK`` columns. Every partial sum
  is an integer of magnitude at most 2**24, so float32 holds it exactly; chunks are summed in int32.

``int8_mixed_linear`` is one native call (outlier columns, row quantization, GEMM and the
dequantization epilogue, any number of decomposed columns) whenever the native kernel is
available; otherwise the eager torch path below makes as few passes over x and the output as it
can.
"""

from __future__ import annotations

import math

import torch

from . import _native
from ._ops import INT8_MAX, register_kernels
from .reference import decomposed_columns, quantize_rows, row_absmax
from .reference import int8_vectorwise_quant as _reference_vectorwise_quant

INT8_MIN = -128
# 1024 * 128**2 = 2**24: the largest K-chunk whose float32 dot products of int8 codes are exact.
EXACT_FP32_CHUNK = 1024


def gemm_paths() -> tuple[str, ...]:
    """Every int8 GEMM path this machine runs, the one the package uses first."""
    paths = list(_native.isas())
    if paths:
        paths.insert(0, paths.pop(paths.index(_native.default_isa())))
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        paths.append("int_mm")
    return (*paths, "fp32")


def _path_takes(path: str, a: torch.Tensor, k: int) -> bool:
    if path == "avx2":
        return not _holds_min(a)  # the sign trick cannot negate -128 in a
    # torch._int_mm sums wrongly on some CPUs when K = 1 and b.T has strides (1, 1).
    return path != "int_mm" or k > 1


def _gemm_fp32_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    acc = torch.zeros((m, b.shape[0]), dtype=torch.int32)
    for start in range(0, k, EXACT_FP32_CHUNK):
        stop = min(start + EXACT_FP32_CHUNK, k)
        part = a[:, start:stop].float() @ b[:, start:stop].float().T
        acc += part.to(torch.int32)
    return acc


def _holds_min(t: torch.Tensor) -> bool:
    return t.numel() > 0 and bool((t == INT8_MIN).any())


def int8_gemm(a: torch.Tensor, b: torch.Tensor, path: str) -> torch.Tensor:
    """a [M, K] @ b [N, K].T in int32 on ``path`` (one of :func:`gemm_paths`), as
    ``int8_linear_matmul`` runs it: operands the path cannot take exactly (-128 in a for avx2,
    K = 1 for int_mm) go to fp32. K must be checked by the caller (see ``int8_linear_matmul``)."""
    m, k = a.shape
    if m == 0 or b.shape[0] == 0 or not _path_takes(path, a, k):
        path = "fp32"
    if path in _native.ISA_CODES:
        return _native.int8_gemm_nt(a, b, isa=path)
    if path == "int_mm":
        return torch._int_mm(a.contiguous(), b.contiguous().T)
    return _gemm_fp32_exact(a, b)


def int8_linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a [M, K] @ b [N, K].T for every int8 code, or a ValueError when K is so large
    that the int32 result could overflow."""
    m, k = a.shape
    n = b.shape[0]
    if k > _native.MAX_K or k > _native.MAX_K_FULL_RANGE and m and n and (_holds_min(a) or _holds_min(b)):
        limit = _native.MAX_K if k > _native.MAX_K else _native.MAX_K_FULL_RANGE
        raise ValueError(
            f"K = {k} is too large for an exact int32 result: 128 * 128 * K (127 * 127 * K without -128 codes) "
            f"must fit int32, so K <= {limit} here; split K and add the int32 parts in int64"
        )
    return int8_gemm(a, b, gemm_paths()[0])


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0):
    if threshold > 0.0:
        return _reference_vectorwise_quant(x, threshold)
    # No outliers to mask: two passes (row absmax, codes).
    xf = x.float()
    x_absmax = row_absmax(xf)
    return quantize_rows(xf, x_absmax), x_absmax, torch.empty(0, dtype=torch.int64)


def int8_mm_dequant(acc, x_absmax, w_absmax, bias=None, out_dtype=None):
    out = torch.mul(acc, (x_absmax.float() / INT8_MAX).unsqueeze(1))
    out.mul_((w_absmax.float() / INT8_MAX).unsqueeze(0))
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype or torch.float32)


def _in_place(weight_int8, weight_absmax, bias, fp_cols, fp_weight):
    """The layer's tensors as the native kernel reads them in place (converted where it cannot)."""
    if not _native.can_read_in_place(weight_int8, weight_absmax, bias, fp_cols, fp_weight):
        weight_int8 = weight_int8.contiguous()
        weight_absmax = weight_absmax.to(torch.float32).contiguous()
        if bias is not None and bias.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            bias = bias.float()
        bias = None if bias is None else bias.contiguous()
        if fp_cols is not None:
            fp_cols, fp_weight = fp_cols.long().contiguous(), fp_weight.float().contiguous()
    return weight_int8, weight_absmax, bias, fp_cols, fp_weight


def int8_mixed_linear(x, weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None):
    """The CPU kernel of the op (x [M, K]), and what ``Linear8bitLt`` calls directly in eager inference
    (x [..., K]): one native call (outlier columns, row quantization, GEMM and the dequantization
    epilogue) whenever the native kernel is available, else the eager torch path below."""
    n, k = weight_int8.shape
    if x.numel() and n and 0 < k <= _native.MAX_K and _native.available():
        try:
            return _native.mixed_linear(x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
        except ValueError:  # tensors the kernel cannot read in place: converted copies, for this call
            w, s, b, c, f = _in_place(weight_int8, weight_absmax, bias, fp_cols, fp_weight)
            return _native.mixed_linear(x, w, s, b, threshold, c, f)
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    out = eager_mixed_linear(rows, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
    return out.reshape(*x.shape[:-1], n)


def eager_mixed_linear(x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight):
    """The forward in eager torch around this machine's int8 GEMM (where the native kernel is
    unavailable): as few passes over x and the output as eager torch allows, the scales, decomposed
    columns and bias applied in place."""
    xf = x.float()
    cols, w_cols = decomposed_columns(xf, weight_int8, weight_absmax, threshold, fp_cols, fp_weight)
    has_cols = cols.numel() > 0
    x_main = xf.index_fill(1, cols, 0.0) if has_cols else xf
    x_absmax = row_absmax(x_main)
    acc = int8_gemm(quantize_rows(x_main, x_absmax), weight_int8, gemm_paths()[0])
    out = torch.mul(acc, (x_absmax / INT8_MAX).unsqueeze(1))
    out.mul_((weight_absmax.float() / INT8_MAX).unsqueeze(0))
    if has_cols:
        out.addmm_(xf[:, cols], w_cols.T)
    if bias is not None:
        out.add_(bias.float())
    return out.to(x.dtype)


register_kernels("cpu", globals())
