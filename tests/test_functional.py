"""``functional.py``: the functions users call, against float64 (bounds from the int8 math) and the
definitions; edge cases a float matmul handles; bad input; autograd; and property-based tests (hypothesis)
of every public op and of ``Linear8bitLt`` against float64 (their machinery: ``fuzz_cases.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_cases import (
    FLOAT_DTYPES,
    FP16_MAX,
    HALF_CODE_STEP,
    QUANT_SLACK,
    K_LARGE,
    gamma,
    unit_roundoff,
    layouts,
    with_layout,
    mixed_cases,
    decomposed_columns64,
    mixed_linear_bound,
    assert_float_result,
    check_mixed,
    grad_input_bound,
)
from helpers import exact_mixed_linear_f64, linear_case, make_input, quantization_bound, rounding_bound
from llm_int8 import _native, cpu, reference
from llm_int8 import functional as F
from llm_int8._ops import INT8_MAX

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
THRESHOLDS = [0.0, 6.0]

pytestmark = pytest.mark.usefixtures("restore_torch_rng")  # leave the global RNG as found


# ---------------------------------------------------------------------------------------------
# int8_vectorwise_quant


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorwise_quant_codes_follow_the_definition(dtype):
    x = make_input(9, 50, dtype, n_outlier_cols=2, scale=40.0)
    threshold = 6.0
    codes, absmax, cols = F.int8_vectorwise_quant(x, threshold)
    xf = x.double()
    outlier = xf.abs() >= threshold
    assert torch.equal(cols, outlier.any(0).nonzero().view(-1))
    want_absmax = xf.masked_fill(outlier, 0).abs().amax(1)
    assert torch.equal(absmax.double(), want_absmax)
    # round half to even of v * (127 / absmax) in float32, outlier columns zeroed
    scale = (127.0 / absmax.float())[:, None]
    want = torch.round(x.float().masked_fill(outlier, 0) * scale).to(torch.int8)
    want[:, cols] = 0
    assert torch.equal(codes, want)
    assert codes.abs().max() <= 127 and (codes != -128).all()


def test_vectorwise_quant_zero_row_and_empty():
    x = torch.zeros(3, 8)
    x[1] = torch.arange(8.0)
    codes, absmax, _ = F.int8_vectorwise_quant(x)
    assert torch.equal(codes[0], torch.zeros(8, dtype=torch.int8))
    assert absmax[0] == 0 and codes[1, -1] == 127
    codes, absmax, cols = F.int8_vectorwise_quant(torch.zeros(0, 8), 6.0)
    assert codes.shape == (0, 8) and absmax.shape == (0,) and cols.numel() == 0
    codes, absmax, _ = F.int8_vectorwise_quant(torch.zeros(4, 0))
    assert codes.shape == (4, 0) and torch.equal(absmax, torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# int8_linear_matmul


def test_int8_linear_matmul_3d_and_noncontiguous():
    a = torch.randint(-127, 128, (2, 3, 40), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 9), dtype=torch.int8).T  # non-contiguous [9, 40]
    want = (a.long() @ b.long().T).int()
    assert torch.equal(F.int8_linear_matmul(a, b), want)
    assert torch.equal(F.int8_linear_matmul(a[:, :, ::2].contiguous(), b[:, ::2]), (a[:, :, ::2].long() @ b[:, ::2].long().T).int())


# ---------------------------------------------------------------------------------------------
# int8_mm_dequant


def test_mm_dequant_matches_float64():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (5, 7), dtype=torch.int32, generator=g)  # results stay inside fp16 range
    sx, sw = torch.rand(5, generator=g) * 10, torch.rand(7, generator=g) * 3
    bias = torch.randn(7, generator=g)
    product = acc.double() * sx.double()[:, None] * sw.double()[None, :] / 127**2
    want = product + bias.double()
    for out_dtype in DTYPES:
        got = F.int8_mm_dequant(acc, sx, sw, bias, out_dtype)
        ref = reference.int8_mm_dequant(acc, sx, sw, bias, out_dtype)
        assert got.dtype == out_dtype
        # float32 rounding of the product and the sum (relative to the terms: the sum may cancel),
        # then one rounding to out_dtype (relative to the result; absolute where it is subnormal)
        fi = torch.finfo(out_dtype)
        bound = 6 * 1.2e-7 * (product.abs() + bias.double().abs()) + fi.eps * want.abs() + fi.eps * fi.smallest_normal
        assert ((got.double() - want).abs() <= bound).all()
        assert ((ref.double() - want).abs() <= bound).all()


# ---------------------------------------------------------------------------------------------
# int8_mixed_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold,n_outliers", [(0.0, 0), (6.0, 0), (6.0, 4)])
def test_mixed_linear_within_quantization_bound_of_float_product(dtype, threshold, n_outliers):
    m, k, n = 24, 300, 40
    x, weight, weight_int8, weight_absmax, bias = linear_case(dtype, m, k, n, threshold, n_outliers)
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold)
    true = x.double() @ weight.double().T + bias.double()
    bound = quantization_bound(x, weight, weight_absmax, threshold)
    # plus float32 arithmetic and the final rounding to dtype
    bound += 2 * torch.finfo(dtype).eps * true.abs() + 300 * 1.2e-7 * (x.double().abs() @ weight.double().abs().T)
    assert ((out.double() - true).abs() <= bound).all()


def test_decomposition_recovers_what_vectorwise_loses():
    """The point of LLM.int8(): with outlier columns, alpha = 6 is far closer to the float product."""
    x, weight, weight_int8, weight_absmax, _ = linear_case(torch.float32, 64, 512, 64, 6.0, 2)
    true = x.double() @ weight.double().T
    err = {}
    for threshold in (0.0, 6.0):
        out = F.int8_mixed_linear(x, weight_int8, weight_absmax, None, threshold)
        err[threshold] = ((out.double() - true).norm() / true.norm()).item()
    assert err[6.0] < err[0.0] / 3, err


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_linear_3d_input(dtype):
    x, _, weight_int8, weight_absmax, bias = linear_case(dtype, 2 * 5, 48, 24, 6.0, 2)
    out3 = F.int8_mixed_linear(x.view(2, 5, 48), weight_int8, weight_absmax, bias)
    out2 = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias)
    assert out3.shape == (2, 5, 24) and torch.equal(out3.view(10, 24), out2)


# ---------------------------------------------------------------------------------------------
# Edge cases a float matmul handles


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_zero_row_gives_exactly_the_bias(dtype, threshold):
    x, _, weight_int8, weight_absmax, bias = linear_case(dtype, 4, 64, 16, threshold, 1)
    x[2] = 0
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold)
    assert torch.equal(out[2], bias)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_poisons_exactly_the_rows_a_float_matmul_would(dtype, threshold, bad):
    x, weight, weight_int8, weight_absmax, bias = linear_case(dtype, 5, 40, 12, threshold, 1)
    x[1, 7] = bad
    x[3, 0] = bad
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold)
    float_out = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    assert torch.equal(torch.isfinite(out), torch.isfinite(float_out))
    assert torch.isfinite(out[[0, 2, 4]]).all() and not torch.isfinite(out[[1, 3]]).any()


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_empty_batch_and_empty_features(threshold):
    _, _, weight_int8, weight_absmax, bias = linear_case(torch.float32, 1, 16, 8, 0.0, 0)
    out = F.int8_mixed_linear(torch.zeros(0, 16), weight_int8, weight_absmax, bias, threshold)
    assert out.shape == (0, 8)
    out = F.int8_mixed_linear(torch.zeros(3, 2, 0), torch.zeros(8, 0, dtype=torch.int8), weight_absmax, bias, threshold)
    assert out.shape == (3, 2, 8) and torch.equal(out, bias.expand(3, 2, 8))


@pytest.mark.parametrize("k,n", [(1, 1), (1, 9), (3, 1), (4097, 3)])
def test_any_k_and_n(k, n):
    x, weight, weight_int8, weight_absmax, bias = linear_case(torch.float32, 5, k, n, 6.0, 0)
    out64, magnitude, n_cols = exact_mixed_linear_f64(x, weight_int8, weight_absmax, bias, 6.0)
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, 6.0)
    assert ((out.double() - out64).abs() <= rounding_bound(out64, magnitude, n_cols, torch.float32)).all()


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda w, s: F.int8_mixed_linear(torch.ones(2, 5), w, s), ValueError, "K = 4"),
        (lambda w, s: F.int8_mixed_linear(torch.ones(2, 4, dtype=torch.int64), w, s), TypeError, "float16, bfloat16 or float32"),
        (lambda w, s: F.int8_mixed_linear(torch.ones(2, 4), w.float(), s), TypeError, "quantize_weight"),
        (lambda w, s: F.int8_mixed_linear(torch.ones(2, 4), w, s, threshold=-1.0), ValueError, "threshold must be >= 0"),
        (lambda w, s: F.int8_mixed_linear(torch.ones(2, 4), w, s[:2]), ValueError, "weight_absmax must have shape"),
        (lambda w, s: F.int8_mixed_linear(torch.ones(2, 4), w, s, torch.ones(2)), ValueError, "bias must have shape"),
        (lambda w, s: F.int8_linear_matmul(torch.ones(2, 4, dtype=torch.int8), w[:, :3]), ValueError, "inner dimensions"),
        (lambda w, s: F.int8_linear_matmul(torch.ones(2, 4), w), TypeError, "a must be an int8"),
        (lambda w, s: F.int8_vectorwise_quant(torch.ones(2, 4, dtype=torch.int32)), TypeError, "float16"),
        (lambda w, s: F.int8_vectorwise_quant(torch.ones(2, 4), float("nan")), ValueError, "threshold"),
    ],
)
def test_bad_input_says_what_was_wrong(call, error, message):
    weight_int8, weight_absmax = F.quantize_weight(torch.randn(3, 4))
    with pytest.raises(error, match=message):
        call(weight_int8, weight_absmax)


# ---------------------------------------------------------------------------------------------
# Autograd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold,n_outliers", [(0.0, 0), (6.0, 3)])
def test_backward_reaches_input_through_dequantized_weight_and_bias(dtype, threshold, n_outliers):
    x, _, weight_int8, weight_absmax, bias = linear_case(dtype, 6, 40, 10, threshold, n_outliers)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    grad_out = torch.randn(6, 10).to(dtype)
    F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold).backward(grad_out)
    w_deq = weight_int8.double() * weight_absmax.double()[:, None] / 127
    want = grad_out.double() @ w_deq
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype
    # the scaled gradient is rounded to bfloat16 (2^-8) where the AVX-512 BF16 kernel runs, else kept
    # in float32 (see functional._grad_input); then N = 10 products summed in float32 after 2 roundings
    # of the scaling (12 float32 unit roundoffs) and one rounding to dtype
    grad_u = 2.0**-8 if _native.grad_bf16_available() else 0.0
    tol = (grad_u + 12 * 2.0**-24 + torch.finfo(dtype).eps) * (grad_out.double().abs() @ w_deq.abs())
    assert ((x.grad.double() - want).abs() <= tol).all()
    # M = 6 additions in the grad's dtype, each rounding relative to the running sum of magnitudes
    bias_bound = 6 * torch.finfo(dtype).eps * grad_out.double().abs().sum(0)
    assert ((bias.grad.double() - grad_out.double().sum(0)).abs() <= bias_bound).all()


# --------------------------------------------------------------------------------------------
# Property-based tests (hypothesis) against float64: the machinery and its bounds are in fuzz_cases.py



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


@given(case=mixed_cases(with_nonfinite=False))
def test_mixed_linear_against_float64(case):
    check_mixed(*case)


@given(case=mixed_cases(with_nonfinite=True))
def test_mixed_linear_nonfinite_rows(case):
    """NaN/Inf in x: exactly the rows a float matmul makes non-finite are non-finite (whole rows)."""
    x, weight, bias, threshold, layout, batch = case
    check_mixed(x, weight, bias, threshold, layout, batch)
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
    check_mixed(x, weight, bias, threshold, layout, batch, fp_cols=fp_cols)


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
