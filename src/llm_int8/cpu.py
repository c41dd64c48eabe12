"""CPU kernels for the ops in ``_ops.py``.

The int8 GEMM path is chosen per machine and shape (``gemm_path``):

* ``native``: our AVX2 kernel (``csrc/int8_gemm_avx2.c``, built on first use), exact for codes in
  [-127, 127]. On CPUs without AVX-512 VNNI, ``torch._int_mm`` is a scalar loop, slower than fp32.
* ``int_mm``: ``torch._int_mm`` (oneDNN) on AVX-512 machines when the native kernel is unavailable.
* ``fp32``: float32 GEMMs over K-chunks of at most ``EXACT_FP32_CHUNK`` columns. Every partial sum
  is an integer below 2**24 in magnitude, so float32 holds it exactly; chunks are summed in int32.

The mixed forward makes as few passes over x and the output as eager torch allows: one reduction
finds the outlier columns, one masks them, one gives the row absmax, one quantizes; the dequant
scales, bias and outlier product are applied in place on one float32 output.
"""

from __future__ import annotations

import math

import torch

from . import _native
from ._ops import INT8_MAX, register_binder, register_kernel
from .reference import decomposed_columns, decomposed_weight, quantize_rows, row_absmax
from .reference import int8_vectorwise_quant as _reference_vectorwise_quant

# 1040 * 127**2 < 2**24: the largest K-chunk whose float32 dot products of int8 codes are exact.
EXACT_FP32_CHUNK = 1024


def gemm_path(m: int, k: int, n: int) -> str:
    """Which int8 GEMM implementation the CPU uses for an [m, k] x [n, k]^T product."""
    if _native.available():
        return "native"
    # torch._int_mm sums wrongly on some CPUs when K = 1 and b.T has strides (1, 1).
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and k > 1 and m > 0 and n > 0:
        return "int_mm"
    return "fp32"


def _gemm_fp32_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    acc = torch.zeros((m, b.shape[0]), dtype=torch.int32)
    for start in range(0, k, EXACT_FP32_CHUNK):
        stop = min(start + EXACT_FP32_CHUNK, k)
        part = a[:, start:stop].float() @ b[:, start:stop].float().T
        acc += part.to(torch.int32)
    return acc


def int8_linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    path = gemm_path(a.shape[0], a.shape[1], b.shape[0])
    if path == "native":
        return _native.int8_gemm_nt(a, b)
    if path == "int_mm":
        return torch._int_mm(a.contiguous(), b.contiguous().T)
    return _gemm_fp32_exact(a, b)


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


def _native_mixed_ok(x, weight_int8) -> bool:
    m, k = x.shape
    return m > 0 and k > 0 and weight_int8.shape[0] > 0 and k <= _native.MAX_K and _native.available()


_F32 = (torch.float32,)
_F32_F16_BF16 = (torch.float32, torch.float16, torch.bfloat16)


def _native_operand(t, dtypes=_F32):
    """t as the native kernel reads it: contiguous, in one of ``dtypes`` (else float32); None stays None."""
    if t is None or (t.dtype in dtypes and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def _native_layer(weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight) -> _native.MixedLinear:
    return _native.MixedLinear(
        weight_int8 if weight_int8.shape[1] <= 1 or weight_int8.stride(1) == 1 else weight_int8.contiguous(),
        _native_operand(weight_absmax), _native_operand(bias), float(threshold),
        fp_cols if fp_cols is None or fp_cols.is_contiguous() else fp_cols.contiguous(),
        _native_operand(fp_weight, _F32_F16_BF16),
    )


def _native_forward(layer: _native.MixedLinear, x, weight_int8, weight_absmax, bias, fp_weight):
    """The layer's output for x [M, K] (M > 0; or [..., K] contiguous) in x's dtype: one native call,
    plus one addmm when more columns were decomposed than the fused epilogue takes (a low threshold)."""
    xf = x if x.dtype is torch.float32 else x.float()
    if not xf.is_contiguous() and (xf.dim() != 2 or xf.shape[1] > 1 and xf.stride(1) != 1
                                   or xf.shape[0] > 1 and xf.stride(0) < xf.shape[1]):
        xf = xf.contiguous()
    out, nc = layer(xf)
    if nc > _native.MAX_FUSED_COLS:
        cols = layer.last_columns(nc)
        w_cols = decomposed_weight(weight_int8, weight_absmax, cols[: nc - layer.nfp], fp_weight)
        rows = out.view(-1, layer.n)
        rows.addmm_(xf.reshape(-1, layer.k)[:, cols], w_cols.T)
        if bias is not None:
            rows.add_(bias.float())
    return out if x.dtype is torch.float32 else out.to(x.dtype)


def int8_mixed_linear(x, weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None):
    if _native_mixed_ok(x, weight_int8):
        # One native call: outlier columns, row quantization, GEMM and the dequantization epilogue.
        layer = _native_layer(weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
        return _native_forward(layer, x, weight_int8, weight_absmax, bias, fp_weight)
    xf = x.float()
    cols, w_cols = decomposed_columns(xf, weight_int8, weight_absmax, threshold, fp_cols, fp_weight)
    has_cols = cols.numel() > 0
    x_main = xf.index_fill(1, cols, 0.0) if has_cols else xf
    x_absmax = row_absmax(x_main)
    acc = int8_linear_matmul(quantize_rows(x_main, x_absmax), weight_int8)
    out = torch.mul(acc, (x_absmax / INT8_MAX).unsqueeze(1))
    out.mul_((weight_absmax.float() / INT8_MAX).unsqueeze(0))
    if has_cols:
        out.addmm_(xf[:, cols], w_cols.T)
    if bias is not None:
        out.add_(bias.float())
    return out.to(x.dtype)


def _rows_apply(kernel, x, args):
    """kernel(x as [M, K] rows, *args), reshaped back to [..., N]."""
    if x.dim() == 2:
        return kernel(x, *args)
    out = kernel(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), *args)
    return out.view(*x.shape[:-1], out.shape[-1])


class _BoundNative:
    """One layer's native forward, x [..., K] -> out [..., N] (see :func:`bind_mixed_linear`)."""

    __slots__ = ("layer", "args", "tensors")

    def __init__(self, args):
        weight_int8, weight_absmax, bias, _, _, fp_weight = self.args = args
        self.layer, self.tensors = _native_layer(*args), (weight_int8, weight_absmax, bias, fp_weight)

    def __call__(self, x):
        if x.numel() == 0:
            return _rows_apply(int8_mixed_linear, x, self.args)
        return _native_forward(self.layer, x, *self.tensors)


def bind_mixed_linear(weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None):
    """``int8_mixed_linear`` of one layer as a callable x [..., K] -> out [..., N].

    When the kernel can read the layer's tensors in place, their checks and pointers are bound once
    (a decoding step calls every layer with one row, where that per-call work is a large share).
    Tensors it would have to convert are converted on every call, so the callable never holds a
    copy that an in-place update of the layer could leave stale.
    """
    args = (weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
    n, k = weight_int8.shape
    in_place = (
        weight_absmax.dtype is torch.float32 and weight_absmax.is_contiguous()
        and (bias is None or bias.dtype is torch.float32 and bias.is_contiguous())
        and (fp_cols is None or fp_cols.is_contiguous() and fp_weight.dtype in _F32_F16_BF16 and fp_weight.is_contiguous())
        and (k <= 1 or weight_int8.stride(1) == 1)
    )
    if not (in_place and n > 0 and 0 < k <= _native.MAX_K and _native.available()):
        return lambda x: _rows_apply(int8_mixed_linear, x, args)
    return _BoundNative(args)


for _name, _fn in [
    ("int8_vectorwise_quant", int8_vectorwise_quant),
    ("int8_linear_matmul", int8_linear_matmul),
    ("int8_mm_dequant", int8_mm_dequant),
    ("int8_mixed_linear", int8_mixed_linear),
]:
    register_kernel(_name, "cpu", _fn)
register_binder("cpu", bind_mixed_linear)
