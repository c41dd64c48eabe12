"""The machinery of the property-based tests (``test_functional.py``, ``test_baselines.py``,
``test_saved_format.py``): case strategies, the float64 reference and the error bounds of every public
op and of ``Linear8bitLt``.

Hypothesis draws the structure of each case (shapes, dtype, threshold, layout, what to plant) and a
seed; the values come from a seeded torch generator, so cases are cheap to build and shrink well.

What is compared, and how:

* int8 codes, outlier columns and int32 accumulators: exactly (``torch.equal``) against
  ``llm_int8.reference`` and, for accumulators, against the float64 product of the codes.
* float outputs: against float64 ``x @ w.T + b`` computed from the very values the op received,
  with an error bound derived from the int8 math (see ``mixed_linear_bound``), never a blanket
  tolerance. Where the true result lies beyond the output dtype's range the output must be the
  matching infinity, as a float matmul in that dtype gives.

Case counts come from the hypothesis profile (``tests/conftest.py``): ``quick`` in CI,
``LLM_INT8_FUZZ_PROFILE=long`` for the long run documented in docs/reliability.md.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import llm_int8.functional as F
from llm_int8 import Linear8bitLt, _native, reference
from llm_int8._ops import INT8_MAX

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
U32 = 2.0**-24  # unit roundoff of float32: every internal float computation is float32
FP16_MAX = torch.finfo(torch.float16).max
# Half a code step, relative to the row absmax: the rounding error of round(v * 127 / absmax).
HALF_CODE_STEP = 1.0 / (2 * INT8_MAX)
# The scale 127/absmax and the product v * scale are each rounded in float32: the pre-rounding
# code is off by at most 127 * 2u (|v| <= absmax), i.e. a relative 2 * 127 * 2u on the half step.
QUANT_SLACK = 1.0 + 4 * INT8_MAX * U32 * (1 + U32)
LAYOUTS = ("contiguous", "transposed", "strided", "3d", "3d_permuted")
# Largest K drawn for the GEMM: past the 1024-column float32 chunks of the CPU path and past
# 2**24 / 127**2 = 1040, where an accumulator stops being exact in float32.
K_LARGE = 2600


# bfloat16's unit roundoff: the backward rounds the scaled gradient to bfloat16 where the AVX-512 BF16
# kernel runs it, and only there (functional._grad_input); elsewhere it stays float32.
BF16_U = 2.0**-8  # 8 significant bits
GRAD_U = BF16_U if _native.grad_bf16_available() else 0.0


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n float32 roundings."""
    return n * U32 / (1 - n * U32)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp at 1.0: the relative rounding error of round-to-nearest into dtype."""
    return torch.finfo(dtype).eps / 2


def half_subnormal_step(dtype: torch.dtype) -> float:
    """Absolute rounding error floor of dtype near zero (half its subnormal spacing)."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps / 2


def overflow_at(dtype: torch.dtype) -> float:
    """The magnitude from which round-to-nearest into dtype gives +-Inf: max + half an ulp there."""
    info = torch.finfo(dtype)
    ulp_at_max = 2.0 ** math.floor(math.log2(info.max)) * info.eps  # fp16: 2**15 * 2**-10 = 32
    return info.max + ulp_at_max / 2  # fp16: 65520, which ties to even, i.e. to Inf


# --------------------------------------------------------------------------------------------
# Case construction


@st.composite
def layouts(draw):
    """(layout, batch): batch splits M into [batch, M / batch] for the 3-D layouts."""
    layout = draw(st.sampled_from(LAYOUTS))
    batch = draw(st.sampled_from((1, 2, 3))) if layout.startswith("3d") else 1
    return layout, batch


def with_layout(x2d: torch.Tensor, layout: str, batch: int) -> torch.Tensor:
    """The values of x2d [M, K] in the given memory layout (the 3-D ones have shape [batch, M/batch, K])."""
    m, k = x2d.shape
    if layout == "contiguous":
        return x2d.clone()
    if layout == "transposed":  # column-major storage: strides (1, M)
        return x2d.T.contiguous().T
    if layout == "strided":  # every other element of a wider buffer: strides (2K, 2)
        buf = torch.zeros((m, k, 2), dtype=x2d.dtype)
        buf[..., 0] = x2d
        return buf[..., 0]
    x3 = x2d.reshape(batch, m // batch, k)
    if layout == "3d":
        return x3.clone()
    return x3.transpose(0, 1).contiguous().transpose(0, 1)  # 3d_permuted: non-contiguous 3-D


def plant(values: torch.Tensor, gen: torch.Generator, rows, cols, value_fn) -> None:
    """Set values[r, c] = +-value_fn() for every r in rows, c in cols (random signs)."""
    for c in cols:
        for r in rows:
            sign = 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0
            values[r, c] = sign * value_fn()


@st.composite
def mixed_cases(draw, with_nonfinite: bool):
    """A complete mixed-linear case: x, float weight, bias, threshold, and the x layout."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    layout, batch = draw(layouts())
    m = batch * draw(st.sampled_from((0, 1, 1, 2, 3, 5, 8, 17)))
    k = draw(st.sampled_from((1, 2, 3, 7, 16, 33, 64, 130, 515, 1100)))
    n = draw(st.sampled_from((1, 2, 5, 16, 31)))
    threshold = draw(st.sampled_from((0.0, 0.0, 6.0, 6.0, 1.5, 3.25, 20.0)))
    scale = draw(st.sampled_from((1e-3, 0.5, 1.0, 2.0, 40.0)))
    n_outlier_cols = draw(st.integers(0, min(3, k)))
    n_zero_rows = draw(st.integers(0, 2))
    n_zero_weight_rows = draw(st.integers(0, 2))
    near_fp16_max = draw(st.booleans()) if dtype == torch.float16 else False
    n_nonfinite = draw(st.integers(1, 3)) if with_nonfinite else 0
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((m, k), generator=gen, dtype=torch.float64) * scale
    if m:
        outlier_cols = torch.randperm(k, generator=gen)[:n_outlier_cols].tolist()
        for c in outlier_cols:
            rows = torch.randperm(m, generator=gen)[: 1 + int(torch.randint(m, (), generator=gen))].tolist()
            # A third of the columns hold exactly the threshold (the >= boundary), the others values
            # up to 8x it; 6x the scale when the decomposition is off.
            level = threshold if threshold > 0 else 6.0 * scale
            at_boundary = bool(torch.rand((), generator=gen) < 1 / 3)

            def outlier_value():
                return level if at_boundary else level * (1 + 7 * float(torch.rand((), generator=gen)))

            plant(x, gen, rows, [c], outlier_value)
        for r in torch.randperm(m, generator=gen)[:n_zero_rows].tolist():
            x[r] = 0.0
        if near_fp16_max:
            r, c = int(torch.randint(m, (), generator=gen)), int(torch.randint(k, (), generator=gen))
            x[r, c] = FP16_MAX * (0.5 + 0.5 * float(torch.rand((), generator=gen)))
        for _ in range(n_nonfinite):
            r, c = int(torch.randint(m, (), generator=gen)), int(torch.randint(k, (), generator=gen))
            x[r, c] = (math.nan, math.inf, -math.inf)[int(torch.randint(3, (), generator=gen))]
    x = x.to(dtype)
    weight = torch.randn((n, k), generator=gen, dtype=torch.float64) / math.sqrt(k)
    for r in torch.randperm(n, generator=gen)[:n_zero_weight_rows].tolist():
        weight[r] = 0.0
    weight = weight.to(dtype)
    bias = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype) if has_bias else None
    return x, weight, bias, threshold, layout, batch


# --------------------------------------------------------------------------------------------
# The float64 reference and the error bound


def decomposed_columns64(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean [K]: columns holding any |x| >= threshold (NaN never counts), computed in float64."""
    if threshold <= 0 or x.shape[0] == 0:
        return torch.zeros(x.shape[1], dtype=torch.bool)
    return (x.double().abs().nan_to_num(nan=0.0) >= threshold).any(dim=0)


def mixed_linear_bound(x, weight, weight_absmax, bias, cols_mask, fp_cols=None):
    """float64 (ref [M, N], err [M, N]): the true result and a bound on |float32 result - ref|.

    Write x^ and w^ for the dequantized int8 values. With dx[m] = x_absmax[m] / 254 (x_absmax over
    the columns left in the int8 product) and dw[n] = w_absmax[n] / 254, each times QUANT_SLACK,
    |x^ - x| <= dx and |w^ - w| <= dw elementwise, so since x^ w^ - x w = dx w + x dw + dx dw:

        |sum_k x^ w^ - x w| <= sum_{k int8} (dx |w| + |x| dw + dx dw) + sum_{k decomposed} |x| dw

    (decomposed columns keep x exact; calibrated ``fp_cols`` also keep w exact, dw = 0 there, as
    their stored float weight is the weight itself). The float32 evaluation adds: the dequant of the int32
    accumulator (5 roundings: the int-to-float conversion, two scales, two products), the
    decomposed float32 GEMM over C columns, w^'s own dequant (2 roundings) and the bias add; all
    are below gamma(C + 8) * (sum_k |x^| |w^| + |b|), with |x^| <= |x| + dx, |w^| <= |w| + dw.
    """
    x64, w64 = x.double(), weight.double()
    cols_mask = cols_mask.clone()
    float_w = cols_mask.clone()  # decomposed columns multiplying the dequantized int8 weight
    if fp_cols is not None:
        cols_mask[fp_cols] = True
        float_w[fp_cols] = False
    ref = x64 @ w64.T
    if bias is not None:
        ref = ref + bias.double()
    keep = ~cols_mask
    x_absmax = (x64 * keep).abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.float64)
    dx = (x_absmax * HALF_CODE_STEP * QUANT_SLACK).unsqueeze(1)  # [M, 1]
    dw = (weight_absmax.double() * HALF_CODE_STEP * QUANT_SLACK).unsqueeze(0)  # [1, N]
    keep64 = keep.double()
    abs_x, abs_w = x64.abs(), w64.abs()
    row_mass = abs_x @ keep64  # sum over int8 columns of |x|, [M]
    quant = dx * (abs_w @ keep64).unsqueeze(0) + row_mass.unsqueeze(1) * dw + dx * dw * keep64.sum()
    quant = quant + (abs_x @ float_w.double()).unsqueeze(1) * dw
    x_hat = abs_x + dx * keep64
    mass = x_hat @ (abs_w + dw.T).T
    if bias is not None:
        mass = mass + bias.double().abs()
    err = quant + gamma(int(cols_mask.sum()) + 8) * mass
    return ref, err


def int8_math_reference(x, weight_int8, weight_absmax, bias, cols_mask, fp_cols=None, fp_weight=None):
    """float64 (ref [M, N], err [M, N]) for the int8 computation itself, from its codes.

    ref is the exact value of what the op computes before float32 rounding: the int8 product of
    the codes (of x with the decomposed columns zeroed) dequantized exactly, plus the decomposed
    columns times the dequantized (or calibrated float) weight columns, plus bias. Only float32
    evaluation error remains, gamma(C + 8) * (sum_k |x^| |w^| + |b|) as in ``mixed_linear_bound``.
    A wrong scale, a wrong column set or a lost term shows here at float32 resolution.
    """
    cols_mask = cols_mask.clone()
    if fp_cols is not None:
        cols_mask[fp_cols] = True
    x_main = x.double().masked_fill(cols_mask.unsqueeze(0), 0.0)
    codes, x_absmax, _ = reference.int8_vectorwise_quant(x_main.float(), 0.0)
    x_hat = codes.double() * (x_absmax.double() / INT8_MAX).unsqueeze(1)
    w_hat = weight_int8.double() * (weight_absmax.double() / INT8_MAX).unsqueeze(1)
    if fp_cols is not None:
        w_hat[:, fp_cols] = fp_weight.double()
    x_cols = x.double().masked_fill(~cols_mask.unsqueeze(0), 0.0)
    ref = x_hat @ w_hat.T + x_cols @ w_hat.T
    mass = x_hat.abs() @ w_hat.abs().T + x_cols.abs() @ w_hat.abs().T
    if bias is not None:
        ref = ref + bias.double()
        mass = mass + bias.double().abs()
    return ref, gamma(int(cols_mask.sum()) + 8) * mass


def assert_float_result(out: torch.Tensor, ref: torch.Tensor, err: torch.Tensor, what: str) -> None:
    """out (in its dtype) against ref given |float32 result - ref| <= err, then one rounding to out's dtype.

    Non-finite ref -> non-finite out. Finite ref: if |ref| - err reaches the overflow point of
    out's dtype the output must be the infinity of ref's sign; if |ref| + err stays below it the
    output must be finite and within err + half an ulp of the output; in between, either.
    """
    dtype = out.dtype
    out64 = out.double()
    bad_ref = ~torch.isfinite(ref)
    missed = bad_ref & torch.isfinite(out64)
    assert not missed.any(), f"{what}: finite output where a float matmul gives NaN/Inf at {missed.nonzero()[:5].tolist()}"
    fin = ~bad_ref
    limit = overflow_at(dtype)
    must_inf = fin & (ref.abs() - err >= limit)
    must_fin = fin & (ref.abs() + err < limit)
    wrong_inf = must_inf & ~(torch.isinf(out64) & (torch.sign(out64) == torch.sign(ref)))
    assert not wrong_inf.any(), f"{what}: expected +-Inf (true result beyond {dtype} range) at {wrong_inf.nonzero()[:5].tolist()}"
    ambiguous = fin & ~must_inf & ~must_fin
    inf_ok = ambiguous & torch.isinf(out64) & (torch.sign(out64) == torch.sign(ref))
    check = (must_fin | ambiguous) & ~inf_ok
    bound = err + unit_roundoff(dtype) * (ref.abs() + err) + half_subnormal_step(dtype)
    delta = (out64 - ref).abs()
    over = check & ~(delta <= bound)  # NaN in out counts as over
    if over.any():
        i = tuple(over.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: |out - ref| = {delta[i].item():.6g} > bound {bound[i].item():.6g} at {list(i)} "
            f"(out {out64[i].item():.6g}, ref {ref[i].item():.6g}, {int(over.sum())} elements over)"
        )


# --------------------------------------------------------------------------------------------
# Checks of the mixed-precision forward and its gradient


def check_mixed(x, weight, bias, threshold, layout, batch, fp_cols=None):
    """Run the functional op, the reference kernel and Linear8bitLt on x; check each against float64."""
    m, k = x.shape
    n = weight.shape[0]
    weight_int8, weight_absmax = F.quantize_weight(weight)
    cols_mask = decomposed_columns64(x, threshold)
    fp_weight = None if fp_cols is None else weight[:, fp_cols]  # the weight's own dtype: exact
    ref, err = mixed_linear_bound(x, weight, weight_absmax, bias, cols_mask, fp_cols)

    tight_ref, tight_err = int8_math_reference(x, weight_int8, weight_absmax, bias, cols_mask, fp_cols, fp_weight)

    xl = with_layout(x, layout, batch)
    out = F.int8_mixed_linear(xl, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
    assert out.dtype == x.dtype and out.shape == (*xl.shape[:-1], n)
    assert_float_result(out.reshape(m, n), ref, err, f"int8_mixed_linear[{layout}] vs float64 x @ w.T")
    assert_float_result(out.reshape(m, n), tight_ref, tight_err, f"int8_mixed_linear[{layout}] vs its int8 math")
    if x.dtype != torch.float32:
        # The same values in float32 take the same decomposition and codes; the float32 output
        # checks the int8 math at float32 resolution, finer than a bf16/fp16 output can show.
        out32 = F.int8_mixed_linear(xl.float(), weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
        assert_float_result(out32.reshape(m, n), tight_ref, tight_err, f"int8_mixed_linear[{layout}, as float32]")

    out_ref = reference.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
    assert_float_result(out_ref, ref, err, "reference.int8_mixed_linear")
    # The CPU kernel and the oracle agree on which entries are non-finite.
    assert torch.equal(torch.isfinite(out.reshape(m, n)), torch.isfinite(out_ref))

    layer = Linear8bitLt.from_weight(weight, bias, threshold=threshold)
    if fp_cols is not None:
        layer.set_fp_columns(fp_cols, weight)
    with torch.no_grad():
        out_layer = layer(xl)
    assert out_layer.shape == out.shape
    # The module's forward is the functional op: bit-identical, NaN where it has NaN.
    assert torch.equal(out_layer.isnan(), out.isnan()) and torch.equal(out_layer.nan_to_num(), out.nan_to_num())


def grad_input_bound(g: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """|grad_x - g @ w_hat| for the backward of functional._grad_input, g [M, N] and w_hat [N, K] in float64.

    grad_out scaled by absmax / 127 in float32 (2 roundings), rounded to bfloat16 where the AVX-512
    BF16 kernel runs (unit roundoff 2^-8; GRAD_U is 0 on the float32 path), multiplied by the exact
    int8 codes and summed in float32 over N: (GRAD_U + gamma(N + 2)) of sum |g| |w^|. The kernel
    flushes values below 2^-126 to zero: at most 2^-126 * 127 per term (codes <= 127).
    """
    n = g.shape[1]
    return (GRAD_U + gamma(n + 2) * (1 + GRAD_U)) * (g.abs() @ w_hat.abs()) + n * INT8_MAX * 2.0**-126
