"""The ops: fast CPU kernels against the reference (exact on codes and accumulators) and against
float64 (bounds from the int8 math)."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    exact_mixed_linear_f64,
    make_input,
    make_weight,
    quantization_bound,
    rounding_bound,
)
from llm_int8 import _native, cpu, reference
from llm_int8 import functional as F

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (M, K, N): M = 1, sizes that are no block multiple, 3-D inputs via `shape`
SHAPES = [(1, 64, 32), (7, 33, 5), (16, 256, 130), (128, 96, 64)]
THRESHOLDS = [0.0, 6.0]


#: Every int8 GEMM path of the CPU kernels; a machine that cannot run one skips its tests.
ALL_GEMM_PATHS = ["avx512_vnni", "avx2", "int_mm", "fp32"]
GEMM_PATHS = [
    pytest.param(p, marks=pytest.mark.skipif(p not in cpu.gemm_paths(), reason=f"this machine does not run {p}"))
    for p in ALL_GEMM_PATHS
]


# ---------------------------------------------------------------------------------------------
# int8_vectorwise_quant


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,_n", SHAPES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("n_outliers", [0, 3])
def test_vectorwise_quant_cpu_equals_reference(dtype, m, k, _n, threshold, n_outliers):
    x = make_input(m, k, dtype, n_outlier_cols=n_outliers)
    got = torch.ops.llm_int8.int8_vectorwise_quant(x, threshold)
    want = reference.int8_vectorwise_quant(x, threshold)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


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
# int8_linear_matmul: exact on every path


@pytest.mark.parametrize("path", GEMM_PATHS)
@pytest.mark.parametrize(
    "m,k,n", [(0, 16, 8), (3, 0, 5), (1, 1, 1), (5, 1, 7), (1, 4096, 33), (17, 1041, 9), (33, 8192, 65), (2, 64, 0)]
)
def test_int8_gemm_exact(path, m, k, n):
    """Each path as int8_linear_matmul runs it (int_mm hands K = 1 to fp32, as the library does)."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    want = (a.long() @ b.long().T).to(torch.int32)
    assert torch.equal(cpu.int8_gemm(a, b, path), want)


@pytest.mark.parametrize("path", GEMM_PATHS)
def test_int8_gemm_exact_full_range_k8192(path):
    """All codes at +-127 with K = 8192: sums of 132 million, far past float32's exact range."""
    k = 8192
    a = torch.full((4, k), 127, dtype=torch.int8)
    a[1] = -127
    a[2, ::2] = -127
    a[3] = torch.randint(-127, 128, (k,), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    b = torch.full((6, k), 127, dtype=torch.int8)
    b[1] = -127
    b[2, 1::2] = -127
    want = (a.long() @ b.long().T).to(torch.int32)
    assert want.abs().max() == k * 127 * 127
    assert torch.equal(cpu.int8_gemm(a, b, path), want)
    assert torch.equal(F.int8_linear_matmul(a, b), want)
    assert torch.equal(reference.int8_linear_matmul(a, b), want)


@pytest.mark.parametrize("path", GEMM_PATHS)
@pytest.mark.parametrize("where", ["a", "b", "both"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 1), (3, 33, 5), (17, 1041, 9), (5, 4096, 70)])
def test_int8_gemm_exact_with_min_codes(path, where, m, k, n):
    """-128 anywhere in either operand (the codes symmetric quantization never makes, but a
    checkpoint or a caller may): exact on every path."""
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    if where in ("a", "both"):
        a[0] = -128  # a row of -128 against every b: the largest products
        a[-1, ::2] = -128
    if where in ("b", "both"):
        b[0] = -128
        b[-1, 1::2] = -128
    want = (a.long() @ b.long().T).to(torch.int32)
    assert torch.equal(cpu.int8_gemm(a, b, path), want)
    assert torch.equal(F.int8_linear_matmul(a, b), want)


def test_int8_linear_matmul_min_codes_square():
    """The case that once gave -1048576 instead of +1048576 (the AVX2 sign trick negating -128)."""
    a = torch.full((1, 64), -128, dtype=torch.int8)
    assert F.int8_linear_matmul(a, a).item() == 64 * 128 * 128


def test_int8_linear_matmul_k_limits():
    """K beyond what int32 holds exactly is an error, not a wrapped number: 127**2 * K must fit
    int32 (K <= 133144), and 128**2 * K (K <= 131071) when a -128 code is present."""
    k = _native.MAX_K_FULL_RANGE + 1
    a, b = torch.full((1, k), 127, dtype=torch.int8), torch.full((1, k), -127, dtype=torch.int8)
    assert F.int8_linear_matmul(a, b).item() == -127 * 127 * k  # fine without -128
    b[0, 5] = -128
    with pytest.raises(ValueError, match="too large for an exact int32 result"):
        F.int8_linear_matmul(a, b)
    k = _native.MAX_K + 1
    with pytest.raises(ValueError, match="too large for an exact int32 result"):
        F.int8_linear_matmul(torch.zeros(1, k, dtype=torch.int8), torch.zeros(2, k, dtype=torch.int8))


def test_eager_path_without_the_native_kernel(monkeypatch):
    """Where the native kernel is unavailable, the ops run eager torch on the other GEMM paths:
    bit-identical to the reference without decomposition, within float32 rounding with it."""
    monkeypatch.setitem(_native._state, "fns", None)
    monkeypatch.setitem(_native._state, "isas", ())
    monkeypatch.setitem(_native._state, "reason", "pretend: no native kernel")
    assert not _native.available() and cpu.gemm_paths()[0] in ("int_mm", "fp32")
    x, _, weight_int8, weight_absmax, bias = _case(torch.float32, 9, 300, 40, 6.0, 3)
    assert torch.equal(F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, 0.0),
                       reference.int8_mixed_linear(x, weight_int8, weight_absmax, bias, 0.0))
    out64, magnitude, n_cols = exact_mixed_linear_f64(x, weight_int8, weight_absmax, bias, 6.0)
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, 6.0)
    assert n_cols > 0 and ((out.double() - out64).abs() <= rounding_bound(out64, magnitude, n_cols, torch.float32)).all()
    a = torch.full((2, 64), -128, dtype=torch.int8)
    assert torch.equal(F.int8_linear_matmul(a, a), torch.full((2, 2), 64 * 128 * 128, dtype=torch.int32))


def test_int8_linear_matmul_k1_transposed_view():
    """torch._int_mm sums wrongly for K = 1 with a (1, 1)-strided b.T on some CPUs; we must not."""
    a = torch.randint(-127, 128, (16, 1), dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 1), dtype=torch.int8)
    assert torch.equal(F.int8_linear_matmul(a, b), (a.long() @ b.long().T).int())


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


def _case(dtype, m, k, n, threshold, n_outliers, bias=True, shape=None):
    x = make_input(m, k, dtype, n_outlier_cols=n_outliers, shape=shape)
    weight = make_weight(n, k, dtype)
    weight_int8, weight_absmax = F.quantize_weight(weight)
    b = torch.randn(n).to(dtype) if bias else None
    return x, weight, weight_int8, weight_absmax, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("threshold,n_outliers", [(0.0, 0), (6.0, 0), (6.0, 3), (0.0, 3)])
def test_mixed_linear_cpu_and_reference_match_float64(dtype, m, k, n, threshold, n_outliers):
    """Both kernels compute the same quantized product: equal to its float64 value up to float32
    arithmetic and the final rounding to x's dtype."""
    x, _, weight_int8, weight_absmax, bias = _case(dtype, m, k, n, threshold, n_outliers)
    out64, magnitude, n_cols = exact_mixed_linear_f64(x, weight_int8, weight_absmax, bias, threshold)
    bound = rounding_bound(out64, magnitude, n_cols, dtype)
    if threshold > 0 and n_outliers:
        assert n_cols > 0
    for out in (
        F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold),
        reference.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold),
    ):
        assert out.dtype == dtype and out.shape == (m, n)
        err = (out.double() - out64).abs()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold,n_outliers", [(0.0, 0), (6.0, 0), (6.0, 4)])
def test_mixed_linear_within_quantization_bound_of_float_product(dtype, threshold, n_outliers):
    m, k, n = 24, 300, 40
    x, weight, weight_int8, weight_absmax, bias = _case(dtype, m, k, n, threshold, n_outliers)
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold)
    true = x.double() @ weight.double().T + bias.double()
    bound = quantization_bound(x, weight, weight_absmax, threshold)
    # plus float32 arithmetic and the final rounding to dtype
    bound += 2 * torch.finfo(dtype).eps * true.abs() + 300 * 1.2e-7 * (x.double().abs() @ weight.double().abs().T)
    assert ((out.double() - true).abs() <= bound).all()


def test_decomposition_recovers_what_vectorwise_loses():
    """The point of LLM.int8(): with outlier columns, alpha = 6 is far closer to the float product."""
    x, weight, weight_int8, weight_absmax, _ = _case(torch.float32, 64, 512, 64, 6.0, 2)
    true = x.double() @ weight.double().T
    err = {}
    for threshold in (0.0, 6.0):
        out = F.int8_mixed_linear(x, weight_int8, weight_absmax, None, threshold)
        err[threshold] = ((out.double() - true).norm() / true.norm()).item()
    assert err[6.0] < err[0.0] / 3, err


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_linear_3d_input(dtype):
    x, _, weight_int8, weight_absmax, bias = _case(dtype, 2 * 5, 48, 24, 6.0, 2)
    out3 = F.int8_mixed_linear(x.view(2, 5, 48), weight_int8, weight_absmax, bias)
    out2 = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias)
    assert out3.shape == (2, 5, 24) and torch.equal(out3.view(10, 24), out2)


def test_outlier_columns_are_a_property_of_the_batch():
    """One large value in one row takes its whole column out of the int8 product for every row."""
    x, weight, weight_int8, weight_absmax, _ = _case(torch.float32, 6, 32, 8, 6.0, 0)
    x[2, 5] = 50.0
    cols, *_ = reference.decomposed_columns(x, weight_int8, weight_absmax, 6.0, None, None)
    assert cols.tolist() == [5]
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, None, 6.0)
    out_row = F.int8_mixed_linear(x[:1], weight_int8, weight_absmax, None, 6.0)  # no outlier in row 0 alone
    assert not torch.equal(out[:1], out_row)


# ---------------------------------------------------------------------------------------------
# Edge cases a float matmul handles


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_zero_row_gives_exactly_the_bias(dtype, threshold):
    x, _, weight_int8, weight_absmax, bias = _case(dtype, 4, 64, 16, threshold, 1)
    x[2] = 0
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold)
    assert torch.equal(out[2], bias)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_poisons_exactly_the_rows_a_float_matmul_would(dtype, threshold, bad):
    x, weight, weight_int8, weight_absmax, bias = _case(dtype, 5, 40, 12, threshold, 1)
    x[1, 7] = bad
    x[3, 0] = bad
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, bias, threshold)
    float_out = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    assert torch.equal(torch.isfinite(out), torch.isfinite(float_out))
    assert torch.isfinite(out[[0, 2, 4]]).all() and not torch.isfinite(out[[1, 3]]).any()


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_empty_batch_and_empty_features(threshold):
    _, _, weight_int8, weight_absmax, bias = _case(torch.float32, 1, 16, 8, 0.0, 0)
    out = F.int8_mixed_linear(torch.zeros(0, 16), weight_int8, weight_absmax, bias, threshold)
    assert out.shape == (0, 8)
    out = F.int8_mixed_linear(torch.zeros(3, 2, 0), torch.zeros(8, 0, dtype=torch.int8), weight_absmax, bias, threshold)
    assert out.shape == (3, 2, 8) and torch.equal(out, bias.expand(3, 2, 8))


@pytest.mark.parametrize("k,n", [(1, 1), (1, 9), (3, 1), (4097, 3)])
def test_any_k_and_n(k, n):
    x, weight, weight_int8, weight_absmax, bias = _case(torch.float32, 5, k, n, 6.0, 0)
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
# Autograd, compile, meta


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold,n_outliers", [(0.0, 0), (6.0, 3)])
def test_backward_reaches_input_through_dequantized_weight_and_bias(dtype, threshold, n_outliers):
    x, _, weight_int8, weight_absmax, bias = _case(dtype, 6, 40, 10, threshold, n_outliers)
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


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated columns"])
@pytest.mark.parametrize("n_outliers", [0, 3])
def test_compile_fullgraph_matches_eager(n_outliers, calibrated):
    """Calibrated 16-bit columns are checked when set, never per call: no host sync, no graph break."""
    from llm_int8 import Linear8bitLt

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Linear8bitLt.from_linear(linear)
    if calibrated:
        layer.set_fp_columns(torch.tensor([5, 9, 60]), linear.weight.detach().half())
    compiled = torch.compile(layer, fullgraph=True)
    for seed in (0, 1):  # a second input must not recompile into something different
        x = make_input(5, 64, n_outlier_cols=n_outliers, seed=seed)
        assert torch.equal(compiled(x), layer(x))


def test_compile_fullgraph_of_the_functional_op_with_calibrated_columns():
    weight = torch.randn(32, 64)
    weight_int8, weight_absmax = F.quantize_weight(weight)
    fp_cols, fp_weight = torch.tensor([1, 7]), weight[:, [1, 7]].half()

    def f(x):
        return F.int8_mixed_linear(x, weight_int8, weight_absmax, None, 6.0, fp_cols, fp_weight)

    x = make_input(4, 64, n_outlier_cols=2)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_meta_device_shapes():
    from llm_int8 import Linear8bitLt

    layer = Linear8bitLt(64, 32, device="meta")
    out = layer(torch.empty(3, 7, 64, device="meta", dtype=torch.bfloat16))
    assert out.shape == (3, 7, 32) and out.dtype == torch.bfloat16 and out.is_meta
