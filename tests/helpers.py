"""Shared test helpers: inputs with planted outliers and error bounds that follow the int8 math."""

from __future__ import annotations

import torch

from llm_int8 import _memory, functional, reference
from llm_int8._ops import INT8_MAX

EPS32 = torch.finfo(torch.float32).eps


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def make_input(m, k, dtype=torch.float32, n_outlier_cols=0, scale=30.0, seed=0, shape=None):
    """x [m, k] ~ N(0, 1) with ``n_outlier_cols`` columns multiplied by ``scale`` (planted outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if n_outlier_cols and k:
        cols = torch.randperm(k, generator=g)[:n_outlier_cols]
        x[:, cols] *= scale
    x = x.to(dtype)
    return x.reshape(shape) if shape is not None else x


def make_weight(n, k, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype)


def linear_case(dtype, m, k, n, threshold, n_outliers, bias=True, shape=None):
    """(x, float weight, weight_int8, weight_absmax, bias): a linear layer's case for the ops."""
    x = make_input(m, k, dtype, n_outlier_cols=n_outliers, shape=shape)
    weight = make_weight(n, k, dtype)
    weight_int8, weight_absmax = functional.quantize_weight(weight)
    b = torch.randn(n).to(dtype) if bias else None
    return x, weight, weight_int8, weight_absmax, b


def decomposition(x2, weight_int8, weight_absmax, threshold):
    """The columns the reference decomposes and the float64 pieces of the LLM.int8() product."""
    xf = x2.float()
    cols, w_cols = reference.decomposed_columns(xf, weight_int8, weight_absmax, threshold, None, None)
    x_main = xf.index_fill(1, cols, 0.0) if cols.numel() else xf
    x_int8, x_absmax, _ = reference.int8_vectorwise_quant(x_main, 0.0)
    return cols, w_cols, x_main, x_int8, x_absmax


def exact_mixed_linear_f64(x2, weight_int8, weight_absmax, bias, threshold):
    """float64 value of what the kernels compute, before any float32 rounding, and the size of the
    terms that float32 rounding applies to (for a rounding bound).

    Returns (out64 [M, N], magnitude [M, N]): magnitude = |int8 part| + sum_k |x||w| over the
    decomposed columns + |bias|.
    """
    cols, w_cols, _, x_int8, x_absmax = decomposition(x2, weight_int8, weight_absmax, threshold)
    sx = x_absmax.double() / INT8_MAX
    sw = weight_absmax.double() / INT8_MAX
    int8_part = (x_int8.double() @ weight_int8.double().T) * sx[:, None] * sw[None, :]
    xo = x2.double()[:, cols]
    outlier_part = xo @ w_cols.double().T
    out = int8_part + outlier_part
    magnitude = int8_part.abs() + xo.abs() @ w_cols.double().abs().T
    if bias is not None:
        out = out + bias.double()
        magnitude = magnitude + bias.double().abs()
    return out, magnitude, cols.numel()


def rounding_bound(out64, magnitude, n_cols, out_dtype):
    """float32 arithmetic (a few roundings per term, n_cols+4 for the outlier sum) plus the final
    rounding to out_dtype (half an ulp, here eps/2 relative, plus the subnormal spacing)."""
    tiny = torch.finfo(out_dtype).smallest_normal * eps(out_dtype)
    return (n_cols + 8) * EPS32 * magnitude + eps(out_dtype) * out64.abs() + tiny


def quantization_bound(x2, weight, weight_absmax, threshold):
    """|LLM.int8(x, W) - x @ W.T| per element, W the float weight, before float rounding.

    Each int8 code is off by at most half a step: |dx| <= x_absmax/254 on the int8 columns,
    |dw| <= w_absmax/254 everywhere. Summing |dx||w| + |x||dw| + |dx||dw| over k gives the bound.
    """
    from llm_int8 import functional as F

    weight_int8, _ = F.quantize_weight(weight)
    cols, _, x_main, _, x_absmax = decomposition(x2, weight_int8, weight_absmax, threshold)
    half_x = x_absmax.double() / (2 * INT8_MAX)
    half_w = weight_absmax.double() / (2 * INT8_MAX)
    w_abs = weight.double().abs()
    main_cols = torch.ones(x2.shape[1], dtype=torch.bool)
    main_cols[cols] = False
    k_main = int(main_cols.sum())
    bound = half_x[:, None] * w_abs[:, main_cols].sum(1)[None, :]
    bound += x2.double().abs().sum(1)[:, None] * half_w[None, :]
    bound += k_main * half_x[:, None] * half_w[None, :]
    return bound


# ---------------------------------------------------------------------------------------------
# Invalid int8 layer states: every load path (Linear8bitLt.load_state_dict, llm_int8.checkpoint,
# from_pretrained) refuses each of them with the same validator and message (llm_int8.saved_format).


def layer_state() -> dict[str, torch.Tensor]:
    """The state dict of a Linear8bitLt 8 -> 4 with bias, as fresh tensors."""
    from torch import nn

    from llm_int8 import Linear8bitLt

    torch.manual_seed(0)
    return {k: v.clone() for k, v in Linear8bitLt.from_linear(nn.Linear(8, 4)).state_dict().items()}


def _scb(value):
    def edit(state):
        state["SCB"][1] = value

    return edit


def _fp_columns(cols, n_weight_cols=None):
    def edit(state):
        state["fp_cols"] = torch.tensor(cols, dtype=torch.int64)
        state["fp_weight"] = torch.zeros(4, len(cols) if n_weight_cols is None else n_weight_cols)

    return edit


#: defect name -> (edit of layer_state() in place, regex the error must match)
LAYER_DEFECTS = {
    "nan scale": (_scb(float("nan")), "finite and >= 0"),
    "inf scale": (_scb(float("inf")), "finite and >= 0"),
    "negative scale": (_scb(-0.5), "finite and >= 0"),
    "scale shape": (lambda s: s.update(SCB=s["SCB"][:3]), r"shape \[N\] = \[4\]"),
    "integer scale": (lambda s: s.update(SCB=s["SCB"].to(torch.int32)), "must be a float tensor"),
    "missing scale": (lambda s: s.pop("SCB"), "without its scales"),
    "code -128": (lambda s: s["weight"].__setitem__((2, 5), -128), r"code -128 \(first at row 2, column 5\)"),
    "3-D weight": (lambda s: s.update(weight=s["weight"].reshape(4, 2, 4)), "2-D int8"),
    "weight_format": (lambda s: s.update(weight_format=torch.tensor(1, dtype=torch.uint8)), "weight_format"),
    "bias shape": (lambda s: s.update(bias=s["bias"][:2]), "bias must be"),
    "fp_cols alone": (lambda s: s.update(fp_cols=torch.tensor([1])), "together"),
    "fp_cols range": (_fp_columns([9]), r"must lie in \[0, 8\)"),
    "fp_cols negative": (_fp_columns([-1]), r"must lie in \[0, 8\)"),
    "fp_cols repeated": (_fp_columns([3, 3]), "repeated columns"),
    "fp_cols int32": (lambda s: s.update(fp_cols=torch.tensor([1], dtype=torch.int32), fp_weight=torch.zeros(4, 1)),
                      "1-D int64"),
    "fp_weight shape": (_fp_columns([1, 2], n_weight_cols=1), "fp_weight must be"),
}


def plan_from_tracker(tracker, min_position_share: float = 0.01):
    """The earlier calibration rule, kept for comparison (docs/eval.md): every column reaching the
    ``llm_int8.eval.outliers.InputTracker``'s threshold at >= ``min_position_share`` of the positions
    (0: at least once). It gains nothing on SmolLM2: those columns leave the int8 product at run time anyway."""
    from llm_int8.eval.calibrate import CalibrationPlan

    if not 0.0 <= min_position_share <= 1.0:
        raise ValueError(f"min_position_share must lie in [0, 1], got {min_position_share}")
    columns = {}
    for site in tracker.sites:
        count_large = site.stats["count_large"]
        share = count_large.double() / max(site.stats["n_positions"], 1)
        # share 0 would select every column: min_position_share = 0 means "seen at least once".
        selected = (share >= min_position_share) & (count_large > 0)
        cols = selected.nonzero().view(-1).tolist()
        for name in site.names:
            columns[name] = cols
    n_positions = max((site.stats["n_positions"] for site in tracker.sites), default=0)
    return CalibrationPlan(tracker.threshold, min_position_share, n_positions, columns)


def resident_bytes(address: int, nbytes: int) -> int:
    """Bytes of the pages overlapping [address, address + nbytes) that are present in this process's
    page tables (``/proc/self/pagemap``); 0 where it cannot be read."""
    page = _memory.PAGE_SIZE
    lo = address // page * page
    hi = -(-(address + nbytes) // page) * page
    return sum(page for entry in _memory._pagemap(lo, hi) if entry & _memory._PAGEMAP_PRESENT)
