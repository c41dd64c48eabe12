"""The paper's Table-1 baselines: absmax and zero-point int8 at per-tensor, row-wise and vector-wise
granularity, as real W8A8 layers (activations quantized at every forward, integer products exact).

These are what LLM.int8() is compared against, not part of the library's int8 path (which is
``llm_int8.functional`` / ``Linear8bitLt``, vector-wise with the decomposition), so they live in the
evaluation package.

Granularity (x [M, K] the layer input, weight [N, K], out = x @ weight.T):

* ``tensor``: one scale for all of x and one for all of the weight (the naive baseline);
* ``row``: one scale per row of x (per token), one for the whole weight;
* ``vector``: one scale per row of x and one per row of the weight (per output feature), i.e. the
  outer product of two scale vectors dequantizes the int32 product (vector-wise quantization).

A threshold > 0 adds the mixed-precision decomposition: every input column holding a value with
|x| >= threshold is taken out of the int8 product and multiplied in float32 against the original
float weight columns (the paper's semantics).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from .._ops import INT8_MAX
from ..reference import outlier_columns

# Integers below 2**24 in magnitude are exact in float32: the largest K-chunk for an exact float32
# GEMM of integer operands bounded by max_abs is 2**24 // max_abs**2.
FLOAT32_EXACT_INT = 2**24
SCHEMES = ("absmax", "zeropoint")
GRANULARITIES = ("tensor", "row", "vector")


def absmax_quantize(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization: ``codes = round(x * 127 / absmax)``, int8 in [-127, 127].

    Granularity: ``dim=None`` gives one absmax for the whole tensor (per-tensor); ``dim=d`` one per
    slice along d, i.e. ``absmax = max |x|`` reduced over d with keepdim (``dim=-1`` on x [M, K] is
    row-wise). Returns (codes with x's shape, absmax float32 broadcastable to x). An all-zero slice
    gets absmax 0 and codes 0.
    """
    F._check_float_input(x)
    xf = x.float()
    if xf.numel() == 0:  # amax has no identity; sum of nothing gives zeros of the reduced shape
        absmax = xf.abs().sum(dim=dim, keepdim=dim is not None)
    else:
        absmax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax))
    return (xf * scale).round_().nan_to_num_(nan=0.0).to(torch.int8), absmax


def absmax_dequantize(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`absmax_quantize`: ``codes * absmax / 127`` in ``dtype``."""
    return (codes.float() * (absmax.float() / INT8_MAX)).to(dtype)


def zeropoint_quantize(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (zero-point) quantization onto the full int8 range [-128, 127].

    ``scale = 255 / (max - min)``, ``zero_point = round(-scale * min) - 128``,
    ``codes = clamp(round(scale * x) + zero_point, -128, 127)``. Granularity as in
    :func:`absmax_quantize`. A constant slice (max == min) gets scale 1 so it still round-trips
    within 0.5. Returns (codes int8, scale float32, zero_point float32, integer-valued).
    """
    F._check_float_input(x)
    if x.numel() == 0:
        raise ValueError(f"cannot choose a zero point for an empty tensor (shape {tuple(x.shape)})")
    xf = x.float()
    if dim is None:
        lo, hi = xf.min(), xf.max()
    else:
        lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    span = hi - lo
    scale = torch.where(span > 0, 255.0 / span, torch.ones_like(span))
    zero_point = torch.round(-scale * lo) - 128.0
    codes = (torch.round(scale * xf) + zero_point).clamp_(-128, 127)
    return codes.to(torch.int8), scale, zero_point


def zeropoint_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`zeropoint_quantize`: ``(codes - zero_point) / scale`` in ``dtype``."""
    return ((codes.float() - zero_point) / scale).to(dtype)


def exact_integer_matmul(a: torch.Tensor, b: torch.Tensor, max_abs: int, b_zero: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ (b - b_zero).T`` for integer-valued a [M, K] (float32) and b [N, K] (float32 or int8 codes,
    ``b_zero`` a scalar or [N, 1] integer-valued offset), with every entry of a and b - b_zero at most
    ``max_abs`` in magnitude, exactly.

    Used for zero-point codes shifted by their zero point (outside the [-127, 127] contract of
    ``int8_linear_matmul``): float32 GEMMs over K-chunks whose partial sums stay below 2**24, summed
    in int64. b is shifted one chunk at a time, so an int8 weight is never widened whole. Returns
    float32 [M, N] (exact up to the final float32 rounding).
    """
    chunk = max(1, FLOAT32_EXACT_INT // (max_abs * max_abs))
    acc = torch.zeros((a.shape[0], b.shape[0]), dtype=torch.int64)
    for start in range(0, a.shape[1], chunk):
        b_chunk = b[:, start : start + chunk].float()
        if b_zero is not None:
            b_chunk = b_chunk - b_zero
        acc += (a[:, start : start + chunk] @ b_chunk.T).to(torch.int64)
    return acc.float()


class QuantLinearW8A8(nn.Module):
    """A linear layer computed in int8 from int8 activations and int8 weights (Table 1 baselines).

    scheme: ``"absmax"`` (symmetric codes in [-127, 127]) or ``"zeropoint"`` (asymmetric, [-128, 127]).
    granularity: ``"tensor"``, ``"row"`` or ``"vector"`` (see the module docstring).
    threshold: > 0 adds the mixed-precision decomposition against the float weight columns.

    Holds the int8 codes (one byte per weight) and, with a threshold, a reference to the float weight.
    """

    def __init__(self, weight: torch.Tensor, bias, scheme: str, granularity: str, threshold: float = 0.0):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be 'absmax' or 'zeropoint', got {scheme!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'tensor', 'row' or 'vector', got {granularity!r}")
        self.scheme, self.granularity, self.threshold = scheme, granularity, float(threshold)
        weight = weight.detach().float()
        self.register_buffer("weight_float", weight if threshold > 0 else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        w_dim = -1 if granularity == "vector" else None
        if scheme == "absmax":
            codes, absmax = absmax_quantize(weight, dim=w_dim)
            self.register_buffer("weight_int8", codes)
            self.register_buffer("weight_scale", absmax.reshape(1, -1) / INT8_MAX)  # [1, N] or [1, 1]
        else:
            codes, scale, zero_point = zeropoint_quantize(weight, dim=w_dim)
            self.register_buffer("weight_int8", codes)
            self.register_buffer("weight_zero_point", zero_point)  # [] or [N, 1], integer-valued
            # the largest |code - zero point|, from each row's extreme codes (no float copy of the weight)
            self.weight_shifted_max = 0
            if weight.numel():
                zero_rows = zero_point.reshape(-1)
                extremes = torch.stack([codes.amax(dim=1).float() - zero_rows, codes.amin(dim=1).float() - zero_rows])
                self.weight_shifted_max = int(extremes.abs().max())
            self.register_buffer("weight_scale", 1.0 / scale.reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        out = None
        if self.threshold > 0:
            cols = outlier_columns(xf, self.threshold)
            if cols.numel():
                out = xf[:, cols] @ self.weight_float[:, cols].T
                xf = xf.index_fill(1, cols, 0.0)
        x_dim = None if self.granularity == "tensor" else -1
        if self.scheme == "absmax":
            x_int8, x_absmax = absmax_quantize(xf, dim=x_dim)
            acc = F.int8_linear_matmul(x_int8, self.weight_int8).float()
            main = acc * (x_absmax.reshape(-1, 1) / INT8_MAX) * self.weight_scale
        else:
            x_codes, x_scale, x_zero = zeropoint_quantize(xf, dim=x_dim)
            x_shifted = x_codes.float() - x_zero
            bound = max(int(x_shifted.abs().max()) if x_shifted.numel() else 0, self.weight_shifted_max, 1)
            acc = exact_integer_matmul(x_shifted, self.weight_int8, bound, self.weight_zero_point)
            main = acc / x_scale.reshape(-1, 1) * self.weight_scale
        out = main if out is None else out + main
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], -1)
