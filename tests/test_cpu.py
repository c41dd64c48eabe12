"""``cpu.py``: the CPU kernels against the reference (exact on codes and accumulators) on every int8
GEMM path this machine runs, and against float64."""

from __future__ import annotations

import pytest
import torch

from helpers import exact_mixed_linear_f64, linear_case, make_input, rounding_bound
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
    x, _, weight_int8, weight_absmax, bias = linear_case(torch.float32, 9, 300, 40, 6.0, 3)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("threshold,n_outliers", [(0.0, 0), (6.0, 0), (6.0, 3), (0.0, 3)])
def test_mixed_linear_cpu_and_reference_match_float64(dtype, m, k, n, threshold, n_outliers):
    """Both kernels compute the same quantized product: equal to its float64 value up to float32
    arithmetic and the final rounding to x's dtype."""
    x, _, weight_int8, weight_absmax, bias = linear_case(dtype, m, k, n, threshold, n_outliers)
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
