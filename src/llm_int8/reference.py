"""Pure-torch reference kernels for the ops in ``_ops.py``: readable, device-agnostic, the oracle.

They are registered for every device, so they are also the fallback wherever no faster kernel is
registered. Fast kernels must give the same int8 codes and the same int32 accumulators exactly, and
float outputs equal up to float32 rounding.
"""

from __future__ import annotations

import torch

from ._ops import INT8_MAX, register_kernels


def quantize_rows(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Row-wise absmax codes: ``round(x * (127 / absmax[:, None]))`` as int8.

    x is float32 [M, K], absmax float32 [M]. The scale is formed first and the product rounded half
    to even, as bitsandbytes does, so codes are bit-identical to its quantizer. A row whose absmax
    is 0 (all zeros) gets code 0, not NaN; a row holding NaN or Inf (absmax not finite) gets code 0
    everywhere, its non-finite absmax carries the NaN/Inf into that row's output instead.
    Since |x| <= absmax, codes lie in [-127, 127] without clamping.
    """
    scale = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax))
    codes = (x * scale.unsqueeze(1)).round_()
    if not bool(torch.isfinite(absmax).all()):
        codes.nan_to_num_(nan=0.0)
    return codes.to(torch.int8)


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| along dim 1 as float32 [M]; 0 for K = 0; NaN propagates."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return x.abs().amax(dim=1).float()


def outlier_values(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The outlier rule, written once for the package: bool, True where |x| >= threshold (> 0).

    NaN is never an outlier (the comparison is False); +-Inf always is. Every Python path (this
    reference, ``cuda.py``, the Triton launchers, the evaluation's statistics) asks this function or
    :func:`outlier_column_mask`; the C and Triton kernels apply the same comparison and cite it.
    """
    return x.abs() >= threshold


def outlier_column_mask(x: torch.Tensor, threshold: float, dim: int = 0, keepdim: bool = False) -> torch.Tensor:
    """bool, True for the columns of x holding any outlier (:func:`outlier_values`) along ``dim``
    (default 0: the rows of x [M, K], giving [K]); all False when ``dim`` is empty."""
    return outlier_values(x, threshold).any(dim=dim, keepdim=keepdim)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted int64 indices of the outlier columns of x [M, K] (:func:`outlier_column_mask`)."""
    return outlier_column_mask(x, threshold).nonzero().view(-1)


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0):
    xf = x.float()
    if threshold > 0.0:
        outlier_cols = outlier_columns(xf, threshold)
        xf = xf.masked_fill(outlier_values(xf, threshold), 0.0)
    else:
        outlier_cols = torch.empty(0, dtype=torch.int64, device=x.device)
    x_absmax = row_absmax(xf)
    x_int8 = quantize_rows(xf, x_absmax)
    x_int8[:, outlier_cols] = 0
    return x_int8, x_absmax, outlier_cols


def int8_linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 holds every partial sum exactly (|sum| <= K * 127**2 << 2**53), on every device.
    return (a.double() @ b.double().T).to(torch.int32)


def int8_mm_dequant(acc, x_absmax, w_absmax, bias=None, out_dtype=None):
    out = acc.float() * (x_absmax.float() / INT8_MAX).unsqueeze(1) * (w_absmax.float() / INT8_MAX).unsqueeze(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or torch.float32)


def dequantize_weight_columns(weight_int8, weight_absmax, cols):
    """float32 [N, len(cols)]: the dequantized columns ``cols`` of the int8 weight."""
    return weight_int8[:, cols].float() * (weight_absmax.float() / INT8_MAX).unsqueeze(1)


def decomposed_columns(xf, weight_int8, weight_absmax, threshold, fp_cols, fp_weight):
    """The columns taken out of the int8 product and the float weight columns they multiply.

    Returns (cols [C] int64, w_cols float32 [N, C]). Columns found at run time (any |x| >= threshold)
    multiply the dequantized int8 weight columns; calibrated ``fp_cols`` always leave the int8
    product and multiply their stored 16/32-bit weight columns ``fp_weight`` [N, F].
    """
    if threshold > 0.0:
        found = outlier_columns(xf, threshold)
    else:
        found = torch.empty(0, dtype=torch.int64, device=xf.device)
    if fp_cols is None or fp_cols.numel() == 0:
        return found, decomposed_weight(weight_int8, weight_absmax, found, None)
    found = found[~torch.isin(found, fp_cols)]
    return torch.cat([found, fp_cols]), decomposed_weight(weight_int8, weight_absmax, found, fp_weight)


def decomposed_weight(weight_int8, weight_absmax, found, fp_weight):
    """float32 [N, len(found) + F]: the dequantized int8 columns ``found``, then ``fp_weight`` [N, F] (or none)."""
    w_cols = dequantize_weight_columns(weight_int8, weight_absmax, found)
    return w_cols if fp_weight is None else torch.cat([w_cols, fp_weight.float()], dim=1)


def int8_mixed_linear(x, weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None):
    """The LLM.int8() forward, as in the paper: the decomposed columns leave the int8 product whole.

    The int8 part quantizes x with those columns set to 0, so their remaining (non-outlier) values
    do not widen the row scales; the decomposed part is multiplied in float32 and added; the sum is
    rounded once to x's dtype.
    """
    xf = x.float()
    cols, w_cols = decomposed_columns(xf, weight_int8, weight_absmax, threshold, fp_cols, fp_weight)
    x_main = xf.index_fill(1, cols, 0.0) if cols.numel() else xf
    x_int8, x_absmax, _ = int8_vectorwise_quant(x_main, 0.0)
    acc = int8_linear_matmul(x_int8, weight_int8)
    out = int8_mm_dequant(acc, x_absmax, weight_absmax)
    if cols.numel():
        out = out + xf[:, cols] @ w_cols.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


register_kernels(None, globals())
