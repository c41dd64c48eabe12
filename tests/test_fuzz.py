"""Property-based tests of every public op and of ``Linear8bitLt`` against a float64 reference.

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

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import llm_int8.functional as F
from llm_int8.eval import baselines
from llm_int8 import Linear8bitLt, _native, cpu, reference
from llm_int8._ops import INT8_MAX

pytestmark = pytest.mark.usefixtures("restore_torch_rng")  # leave the global RNG as found

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
# int8_vectorwise_quant and quantize_weight


@given(case=mixed_cases(with_nonfinite=False), nonfinite=st.booleans())
def test_vectorwise_quant_codes(case, nonfinite):
    x, _, _, threshold, layout, batch = case
    if nonfinite and x.numel():
        x = x.clone()
        x.view(-1)[x.numel() // 2] = math.nan
    x2d = x
    xl = with_layout(x2d, layout, batch)
    codes, x_absmax, outlier_cols = F.int8_vectorwise_quant(xl, threshold)
    # row stats are flat [M] (M = the product of the leading dims), as bitsandbytes returns them
    assert codes.shape == xl.shape and x_absmax.shape == (x2d.shape[0],)
    codes = codes.reshape(x2d.shape)

    # Exactly the reference (the CPU kernel and the oracle agree bit for bit).
    ref_codes, ref_absmax, ref_cols = reference.int8_vectorwise_quant(x2d, threshold)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(x_absmax.nan_to_num(nan=-1.0), ref_absmax.nan_to_num(nan=-1.0))
    assert torch.equal(outlier_cols, ref_cols)

    # Independently, in float64: the outlier columns, the row absmax over the non-outlier values,
    # codes in [-127, 127], 0 in outlier columns and non-finite rows, and within half a step.
    x64 = x2d.double()
    is_outlier = (x64.abs() >= threshold) if threshold > 0 else torch.zeros_like(x64, dtype=torch.bool)
    expected_cols = is_outlier.any(dim=0).nonzero().view(-1)
    assert torch.equal(outlier_cols, expected_cols)
    masked = x64.masked_fill(is_outlier, 0.0)
    expected_absmax = masked.abs().amax(dim=1) if x2d.shape[1] else torch.zeros(x2d.shape[0], dtype=torch.float64)
    assert torch.equal(x_absmax.double().nan_to_num(nan=-1.0), expected_absmax.nan_to_num(nan=-1.0))
    assert bool(((codes >= -INT8_MAX) & (codes <= INT8_MAX)).all())
    assert not codes[:, expected_cols].any()
    finite_rows = torch.isfinite(expected_absmax)
    assert not codes[~finite_rows].any()
    inlier_cols = torch.ones(x2d.shape[1], dtype=torch.bool)
    inlier_cols[expected_cols] = False
    dequant = codes.double() * (expected_absmax / INT8_MAX).unsqueeze(1)
    step = (expected_absmax * HALF_CODE_STEP * QUANT_SLACK).unsqueeze(1)
    sub = (dequant - x64)[finite_rows][:, inlier_cols].abs()
    assert bool((sub <= step[finite_rows]).all())


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    n=st.sampled_from((0, 1, 3, 16)),
    k=st.sampled_from((1, 5, 64, 300)),
    scale=st.sampled_from((1e-3, 1.0, 300.0)),
    zero_rows=st.integers(0, 2),
    transposed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_weight_round_trip(dtype, n, k, scale, zero_rows, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn((n, k), generator=gen) * scale
    weight[:zero_rows] = 0.0
    weight = weight.to(dtype)
    w_in = with_layout(weight, "transposed" if transposed else "contiguous", 1)
    weight_int8, weight_absmax = F.quantize_weight(w_in)
    ref_int8, ref_absmax, _ = reference.int8_vectorwise_quant(weight, 0.0)
    assert torch.equal(weight_int8, ref_int8) and torch.equal(weight_absmax, ref_absmax)
    assert torch.equal(weight_absmax.double(), weight.double().abs().amax(dim=1))
    # dequantize_weight: codes * fl(absmax / 127), two float32 roundings, then half a step off w.
    deq = F.dequantize_weight(weight_int8, weight_absmax).double()
    exact_deq = weight_int8.double() * (weight_absmax.double() / INT8_MAX).unsqueeze(1)
    assert bool(((deq - exact_deq).abs() <= gamma(2) * exact_deq.abs()).all())
    step = (weight_absmax.double() * HALF_CODE_STEP * QUANT_SLACK).unsqueeze(1)
    assert bool(((exact_deq - weight.double()).abs() <= step).all())


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=st.sampled_from(((7,), (3, 5), (4, 1), (2, 3, 6), (0, 4))),
    dim=st.sampled_from((None, -1, 0)),
    scale=st.sampled_from((1e-3, 1.0, 500.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_absmax_and_zeropoint_round_trip(dtype, shape, dim, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    x64 = x.double()
    codes, absmax = baselines.absmax_quantize(x, dim=dim)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert bool(((codes >= -INT8_MAX) & (codes <= INT8_MAX)).all())
    if x.numel():
        expected = x64.abs().amax() if dim is None else x64.abs().amax(dim=dim, keepdim=True)
        assert torch.equal(absmax.double(), expected)
    deq = baselines.absmax_dequantize(codes, absmax, torch.float32).double()
    step = absmax.double() * HALF_CODE_STEP * QUANT_SLACK
    # absmax_dequantize rounds codes * fl(absmax / 127) twice in float32.
    assert bool(((deq - x64).abs() <= step + gamma(2) * x64.abs().add(step)).all())

    if x.numel() == 0:
        return
    zcodes, zscale, zero_point = baselines.zeropoint_quantize(x, dim=dim)
    lo = x64.amin() if dim is None else x64.amin(dim=dim, keepdim=True)
    hi = x64.amax() if dim is None else x64.amax(dim=dim, keepdim=True)
    # codes - zero_point = round(fl(scale * x)) (integers below 2**24 are exact in float32), so the
    # round trip is within half a step 1/scale, plus float32 roundings: scale*x, the division, and
    # the step itself, which fl(255 / fl(hi - lo)) knows to 2 roundings. Clamping to [-128, 127]
    # can only move a code back toward the true value.
    zdeq = baselines.zeropoint_dequantize(zcodes, zscale, zero_point).double()
    mag = torch.maximum(lo.abs(), hi.abs())
    bound = 0.5 / zscale.double() * (1 + gamma(2)) + gamma(3) * mag
    assert bool(((zdeq - x64).abs() <= bound).all())


# --------------------------------------------------------------------------------------------
# int8_linear_matmul and int8_mm_dequant


@given(
    m=st.sampled_from((0, 1, 2, 7, 33)),
    k=st.sampled_from((1, 2, 15, 1024, 1041, K_LARGE)),
    n=st.sampled_from((1, 3, 16, 40)),
    extreme=st.sampled_from(("random", "all_max", "alternating")),
    a_layout=layouts(),
    b_transposed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_linear_matmul_exact(m, k, n, extreme, a_layout, b_transposed, seed):
    layout, batch = a_layout
    m = m * batch
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-INT8_MAX, INT8_MAX + 1, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-INT8_MAX, INT8_MAX + 1, (n, k), generator=gen, dtype=torch.int8)
    if extreme == "all_max":  # the largest accumulators there are: K * 127**2
        a.fill_(INT8_MAX)
        b.fill_(INT8_MAX)
        b[: n // 2] = -INT8_MAX
    elif extreme == "alternating":  # partial sums swing by 127**2 every step
        a.fill_(INT8_MAX)
        b[:] = INT8_MAX
        b[:, 1::2] = -INT8_MAX
    acc = F.int8_linear_matmul(with_layout(a, layout, batch), with_layout(b, "transposed" if b_transposed else "contiguous", 1))
    assert acc.dtype == torch.int32
    acc = acc.reshape(m, n)
    assert torch.equal(acc, reference.int8_linear_matmul(a, b))
    assert torch.equal(acc.double(), a.double() @ b.double().T)
    # The CPU's portable path (float32 GEMMs over exact K-chunks), whichever path this machine uses.
    assert torch.equal(cpu._gemm_fp32_exact(a, b), acc)


@given(
    m=st.sampled_from((0, 1, 4, 9)),
    n=st.sampled_from((1, 3, 17)),
    k=st.sampled_from((1, 100, 5000)),
    out_dtype=st.sampled_from(FLOAT_DTYPES),
    absmax_scale=st.sampled_from((1e-3, 1.0, 50.0, FP16_MAX)),
    zeros=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_mm_dequant(m, n, k, out_dtype, absmax_scale, zeros, has_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    bound = k * INT8_MAX**2
    acc = torch.randint(-bound, bound + 1, (m, n), generator=gen, dtype=torch.int64).to(torch.int32)
    x_absmax = torch.rand(m, generator=gen) * absmax_scale
    w_absmax = torch.rand(n, generator=gen)
    if zeros and m:
        x_absmax[0] = 0.0
        w_absmax[0] = 0.0
    bias = torch.randn(n, generator=gen) if has_bias else None
    out = F.int8_mm_dequant(acc, x_absmax, w_absmax, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    # acc * (x_absmax / 127) * (w_absmax / 127) + bias in float32: 6 roundings (int-to-float,
    # two scales, two products, the bias add), then one rounding into out_dtype.
    prod = acc.double() * (x_absmax.double() / INT8_MAX).unsqueeze(1) * (w_absmax.double() / INT8_MAX).unsqueeze(0)
    ref = prod + (bias.double() if bias is not None else 0.0)
    err = gamma(6) * (prod.abs() + (bias.double().abs() if bias is not None else 0.0))
    assert_float_result(out, ref, err, "int8_mm_dequant")
    ref_out = reference.int8_mm_dequant(acc, x_absmax, w_absmax, bias, out_dtype)
    assert_float_result(ref_out, ref, err, "reference.int8_mm_dequant")


# --------------------------------------------------------------------------------------------
# int8_mixed_linear and Linear8bitLt


def _check_mixed(x, weight, bias, threshold, layout, batch, fp_cols=None):
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


@given(case=mixed_cases(with_nonfinite=False))
def test_mixed_linear_against_float64(case):
    _check_mixed(*case)


@given(case=mixed_cases(with_nonfinite=True))
def test_mixed_linear_nonfinite_rows(case):
    """NaN/Inf in x: exactly the rows a float matmul makes non-finite are non-finite (whole rows)."""
    x, weight, bias, threshold, layout, batch = case
    _check_mixed(x, weight, bias, threshold, layout, batch)
    weight_int8, weight_absmax = F.quantize_weight(weight)
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold)
    bad_rows = ~torch.isfinite(x.double()).all(dim=1)
    # Moderate values elsewhere: no finite row overflows, so the non-finite rows are exactly these.
    if not (x.double().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) > 1e3).any():
        assert torch.equal(~torch.isfinite(out).all(dim=1), bad_rows)
        assert bool((~torch.isfinite(out[bad_rows])).all())


@given(case=mixed_cases(with_nonfinite=False), n_fp=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_mixed_linear_calibrated_columns(case, n_fp, seed):
    x, weight, bias, threshold, layout, batch = case
    k = x.shape[1]
    fp_cols = torch.randperm(k, generator=torch.Generator().manual_seed(seed))[: min(n_fp, k)].sort().values
    _check_mixed(x, weight, bias, threshold, layout, batch, fp_cols=fp_cols)


def grad_input_bound(g: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """|grad_x - g @ w_hat| for the backward of functional._grad_input, g [M, N] and w_hat [N, K] in float64.

    grad_out scaled by absmax / 127 in float32 (2 roundings), rounded to bfloat16 where the AVX-512
    BF16 kernel runs (unit roundoff 2^-8; GRAD_U is 0 on the float32 path), multiplied by the exact
    int8 codes and summed in float32 over N: (GRAD_U + gamma(N + 2)) of sum |g| |w^|. The kernel
    flushes values below 2^-126 to zero: at most 2^-126 * 127 per term (codes <= 127).
    """
    n = g.shape[1]
    return (GRAD_U + gamma(n + 2) * (1 + GRAD_U)) * (g.abs() @ w_hat.abs()) + n * INT8_MAX * 2.0**-126


@given(case=mixed_cases(with_nonfinite=False), calibrated=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_mixed_linear_gradients(case, calibrated, seed):
    """grad_x = grad_out @ W^ (the dequantized weight, calibrated columns exact); grad_bias = sum of grad_out."""
    x, weight, bias, threshold, layout, batch = case
    m, k = x.shape
    n = weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    weight_int8, weight_absmax = F.quantize_weight(weight)
    fp_cols = torch.randperm(k, generator=gen)[:2].sort().values if calibrated else None
    fp_weight = None if fp_cols is None else weight[:, fp_cols]
    xl = with_layout(x, layout, batch).requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    out = F.int8_mixed_linear(xl, weight_int8, weight_absmax, b, threshold, fp_cols, fp_weight)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    out.backward(grad_out)
    g = grad_out.reshape(m, n).double()
    w_hat = weight_int8.double() * (weight_absmax.double() / INT8_MAX).unsqueeze(1)
    if fp_cols is not None:
        w_hat[:, fp_cols] = fp_weight.double()
    ref, err = g @ w_hat, grad_input_bound(g, w_hat)
    assert xl.grad.dtype == x.dtype and xl.grad.shape == xl.shape
    assert_float_result(xl.grad.reshape(m, k), ref, err, "grad_x")
    if b is not None:
        # Summed in grad_out's dtype over M rows: each addition rounds in that dtype.
        ref_b = g.sum(0)
        err_b = (m * unit_roundoff(grad_out.dtype) / (1 - m * unit_roundoff(grad_out.dtype))) * g.abs().sum(0)
        assert_float_result(b.grad, ref_b, err_b, "grad_bias")


def test_backward_without_bias():
    weight_int8, weight_absmax = F.quantize_weight(torch.randn(3, 4))
    x = torch.randn(2, 4, requires_grad=True)
    F.int8_mixed_linear(x, weight_int8, weight_absmax, None, 6.0).sum().backward()
    w_hat = weight_int8.double() * (weight_absmax.double() / INT8_MAX).unsqueeze(1)
    ref = torch.ones(2, 3, dtype=torch.float64) @ w_hat
    assert_float_result(x.grad, ref, grad_input_bound(torch.ones(2, 3, dtype=torch.float64), w_hat), "grad_x without bias")


# --------------------------------------------------------------------------------------------
# fp16 range: the result saturates like a float matmul in fp16, never earlier


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@given(k=st.sampled_from((2, 4, 16, 64)), sign=st.sampled_from((1.0, -1.0)), seed=st.integers(0, 2**31 - 1))
def test_fp16_range(threshold, k, sign, seed):
    gen = torch.Generator().manual_seed(seed)
    # Row 0: every product is near fp16's max but they cancel in pairs (partial sums reach
    # k/2 * 60000 >> 65504, the true result is small). Row 1: the true result is ~k * 30000,
    # beyond fp16's range for k >= 4. Row 2: the true result just inside the range.
    big = float(torch.empty((), dtype=torch.float16).fill_(60000.0))
    x = torch.zeros((3, k), dtype=torch.float16)
    x[0, : k // 2] = big
    x[0, k // 2 : 2 * (k // 2)] = -big
    x[1] = sign * 30000.0
    x[2, 0] = sign * 30000.0
    x[2, 1] = sign * 30000.0 * float(torch.rand((), generator=gen))
    weight = torch.ones((2, k), dtype=torch.float16)
    weight[1] = 0.5
    weight_int8, weight_absmax = F.quantize_weight(weight)
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, None, threshold)
    # torch's own fp16 matmul with the dequantized weight (exact here: the weight is 1 and 0.5).
    float_mm = x @ F.dequantize_weight(weight_int8, weight_absmax, torch.float16).T
    assert torch.equal(torch.isfinite(out), torch.isfinite(float_mm))
    assert torch.equal(out[~torch.isfinite(out)], float_mm[~torch.isfinite(out)])
    assert bool(torch.isfinite(out[0]).all()), "cancelling products must not overflow in an intermediate sum"
    if k >= 4:
        assert bool((out[1, 0] == sign * math.inf).item()), "a true result beyond fp16's range must be +-Inf"
    ref, err = mixed_linear_bound(x, weight, weight_absmax, None, decomposed_columns64(x, threshold))
    assert_float_result(out, ref, err, "fp16 range")


# ---------------------------------------------------------------------------------------------
# Saved weights holding -128 (other tools' int8 range): refused on every load path, naming the layer


LOAD_PATHS = ("Linear8bitLt.load_state_dict", "checkpoint.load_checkpoint", "from_pretrained")


@pytest.fixture(scope="module")
def saved_int8_model(tmp_path_factory):
    """A tiny int8 Llama saved with save_pretrained: (folder, its tensors, its int8 layer names)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from llm_int8.integrations.hf import LLMInt8Config

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fuzz-int8")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "fp32", quantization_config=LLMInt8Config())
    model.save_pretrained(folder / "int8")
    tensors = load_file(folder / "int8" / "model.safetensors")
    layers = sorted(name for name, m in model.named_modules() if isinstance(m, Linear8bitLt))
    return folder / "int8", tensors, layers


@given(
    path=st.sampled_from(LOAD_PATHS),
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    n_codes=st.integers(1, 5),
    layer_pick=st.integers(0, 10**6),
    seed=st.integers(0, 2**31 - 1),
)
def test_weights_holding_minus_128_are_refused_on_every_load_path(
    saved_int8_model, tmp_path_factory, path, n, k, n_codes, layer_pick, seed
):
    from safetensors.torch import save_file

    from llm_int8.checkpoint import load_checkpoint
    from llm_int8.saved_format import CheckpointError

    gen = torch.Generator().manual_seed(seed)
    tmp = tmp_path_factory.mktemp("minus128")
    if path == "from_pretrained":
        folder, tensors, layers = saved_int8_model
        name = layers[layer_pick % len(layers)]
        tensors = dict(tensors)
        weight = tensors[f"{name}.weight"] = tensors[f"{name}.weight"].clone()
    else:
        name = "block.proj"
        layer = Linear8bitLt.from_weight(torch.randn(n, k, generator=gen))
        tensors = {f"{name}.{key}": v.clone() for key, v in layer.state_dict().items()}
        weight = tensors[f"{name}.weight"]
    flat = torch.randperm(weight.numel(), generator=gen)[:n_codes]
    weight.view(-1)[flat] = -128
    first = int(flat.min())
    row, col = divmod(first, weight.shape[1])
    message = rf"{name}: weight holds the code -128 \(first at row {row}, column {col}\)"

    if path == "Linear8bitLt.load_state_dict":
        module = torch.nn.ModuleDict({"block": torch.nn.ModuleDict({"proj": Linear8bitLt(k, n)})})
        with pytest.raises(RuntimeError, match=message):
            module.load_state_dict(tensors)
    elif path == "checkpoint.load_checkpoint":
        file = tmp / "layer.safetensors"
        save_file(tensors, file)
        module = torch.nn.ModuleDict({"block": torch.nn.ModuleDict({"proj": Linear8bitLt(k, n)})})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(module, file)
    else:
        import transformers

        (tmp / "config.json").write_text((folder / "config.json").read_text())
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=message):
            transformers.AutoModelForCausalLM.from_pretrained(tmp)
