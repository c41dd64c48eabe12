"""The fused native LLM.int8() forward (``_native.mixed_linear``) against the reference kernel, for
every micro-kernel this CPU runs.

Without decomposed columns the fused path performs the reference's float32 operations in the same
order, so outputs must be bit-identical (which also pins the int8 codes and int32 sums: one code off
changes a whole output row). With decomposed columns only the order of the float32 sum over those
columns may differ, so the bound is a few float32 roundings of the terms involved.
"""

from __future__ import annotations

import pytest
import torch

from llm_int8 import _native, reference
from llm_int8.functional import quantize_weight

from helpers import EPS32, make_input, make_weight

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"native kernels unavailable: {_native.unavailable_reason()}"
)

ISAS = [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in _native.isas(), reason=f"this CPU has no {isa}"))
    for isa in ("avx2", "avx512_vnni")
]

# (M, K, N): M = 1 (decode), tile edges in M and N (blocks of 2 x 4 and 4 x 4), K not a multiple of
# 32 or 64, K > 8192 with enough rows to be cut into K blocks (int32 partial sums kept in the output
# buffer), large M with small N (the threads split M instead of N).
SHAPES = [(1, 4096, 520), (1, 1, 1), (2, 33, 9), (3, 37, 5), (5, 200, 130), (16, 576, 192),
          (129, 1000, 33), (600, 300, 6), (64, 10000, 20)]


def weight(n, k, seed=1):
    return quantize_weight(make_weight(n, k, seed=seed))


def fused(x, w_int8, w_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None, isa=None):
    return _native.mixed_linear(x, w_int8, w_absmax, bias, threshold, fp_cols, fp_weight, isa=isa)


def columns_of(x, w_int8, w_absmax, threshold=6.0, fp_cols=None, fp_weight=None):
    """The decomposed columns the C entry point reports for x (found ones ascending, then fp_cols)."""
    cols = torch.empty(x.shape[1] + (0 if fp_cols is None else fp_cols.numel()), dtype=torch.int64)
    _, nc = _native.mixed_linear(x, w_int8, w_absmax, None, threshold, fp_cols, fp_weight, cols_out=cols)
    return cols[:nc]


def rounding_bound(x, w_int8, w_absmax, cols, fp_cols=None, fp_weight=None, bias=None):
    """Float32 rounding of the decomposed sum, its addition and the bias: (C + 3) eps32 * magnitude."""
    n_found = cols.numel() - (0 if fp_cols is None else fp_cols.numel())
    w_cols = reference.dequantize_weight_columns(w_int8, w_absmax, cols[:n_found])
    if fp_cols is not None:
        w_cols = torch.cat([w_cols, fp_weight.float()], dim=1)
    ref = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, 0.0)  # size of the int8 part
    magnitude = ref.abs() + x.abs()[:, cols] @ w_cols.abs().T
    if bias is not None:
        magnitude = magnitude + bias.float().abs()
    return (cols.numel() + 3) * EPS32 * magnitude


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_no_decomposition_is_bit_identical(m, k, n, with_bias, isa):
    x = make_input(m, k, seed=m + k)
    w_int8, w_absmax = weight(n, k)
    bias = torch.randn(n) if with_bias else None
    for threshold in (0.0, 100.0):  # off, and on with no column reaching it
        assert columns_of(x, w_int8, w_absmax, threshold).numel() == 0
        out = fused(x, w_int8, w_absmax, bias, threshold, isa=isa)
        assert torch.equal(out, reference.int8_mixed_linear(x, w_int8, w_absmax, bias, threshold))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_decomposed_columns_match_reference(m, k, n, isa):
    x = make_input(m, k, n_outlier_cols=max(1, k // 300), seed=7 * m + k)
    w_int8, w_absmax = weight(n, k)
    bias = torch.randn(n)
    out = fused(x, w_int8, w_absmax, bias, 6.0, isa=isa)
    cols = columns_of(x, w_int8, w_absmax, 6.0)
    assert torch.equal(cols, reference.outlier_columns(x, 6.0))
    want = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, 6.0)
    assert ((out - want).abs() <= rounding_bound(x, w_int8, w_absmax, cols, bias=bias)).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fp_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_calibrated_columns_found_columns_and_overlap(fp_dtype, isa):
    m, k, n = 9, 300, 70
    x = make_input(m, k, n_outlier_cols=5, seed=3)
    found = reference.outlier_columns(x, 6.0)
    fp_cols = torch.tensor([found[0].item(), 4, 250])  # one calibrated column is also found at run time
    w_int8, w_absmax = weight(n, k)
    fp_weight = torch.randn(n, 3).to(fp_dtype)
    fp_weight[0, :] = torch.tensor([6.0e-8, -1.0e-5, 65504.0]).to(fp_dtype)  # fp16 subnormals and max
    bias = torch.randn(n)
    out = fused(x, w_int8, w_absmax, bias, 6.0, fp_cols, fp_weight, isa=isa)
    cols = columns_of(x, w_int8, w_absmax, 6.0, fp_cols, fp_weight)
    assert torch.equal(cols, torch.cat([found[1:], fp_cols]))  # found (not calibrated) first, then fp_cols
    want = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, 6.0, fp_cols, fp_weight)
    assert ((out - want).abs() <= rounding_bound(x, w_int8, w_absmax, cols, fp_cols, fp_weight, bias)).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threshold", [1.0, 1e-30])
def test_any_number_of_decomposed_columns_is_fused(threshold, isa):
    """A low threshold decomposes hundreds of columns (1e-30: every column, the int8 part is zero);
    the C epilogue multiplies them all, in one call."""
    m, k, n = 6, 512, 40
    x = make_input(m, k, seed=11)
    w_int8, w_absmax = weight(n, k)
    bias = torch.randn(n)
    fp_cols = torch.tensor([3, 100])
    fp_weight = torch.randn(n, 2)
    cols = columns_of(x, w_int8, w_absmax, threshold, fp_cols, fp_weight)
    assert cols.numel() > 64 and (threshold == 1.0 or cols.numel() == k)
    out = fused(x, w_int8, w_absmax, bias, threshold, fp_cols, fp_weight, isa=isa)
    want = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, threshold, fp_cols, fp_weight)
    assert ((out - want).abs() <= rounding_bound(x, w_int8, w_absmax, cols, fp_cols, fp_weight, bias)).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16])
def test_16_bit_bias_is_read_in_place(bias_dtype, isa):
    m, k, n = 5, 200, 37
    x = make_input(m, k, seed=12)
    w_int8, w_absmax = weight(n, k)
    bias = torch.randn(n).to(bias_dtype)
    bias[0] = 65504.0 if bias_dtype == torch.float16 else 3.0e38
    assert torch.equal(fused(x, w_int8, w_absmax, bias, 0.0, isa=isa),
                       reference.int8_mixed_linear(x, w_int8, w_absmax, bias, 0.0))


@pytest.mark.parametrize("isa", ISAS)
def test_strided_rows_and_low_precision_inputs(isa):
    k, n = 100, 12
    w_int8, w_absmax = weight(n, k)
    base = make_input(8, 2 * k, n_outlier_cols=2, seed=5)
    x = base[:, :k]  # rows strided by 2K: read in place
    assert x.stride(0) == 2 * k
    assert torch.equal(fused(x, w_int8, w_absmax, None, 0.0, isa=isa),
                       reference.int8_mixed_linear(x.contiguous(), w_int8, w_absmax, None, 0.0))
    xt = make_input(k, 8, seed=8).T  # columns strided: copied
    assert torch.equal(fused(xt, w_int8, w_absmax, None, 0.0, isa=isa),
                       reference.int8_mixed_linear(xt.contiguous(), w_int8, w_absmax, None, 0.0))
    for dtype in (torch.float16, torch.bfloat16):
        xd = make_input(8, k, dtype=dtype, seed=6)
        out = fused(xd, w_int8, w_absmax, None, 0.0, isa=isa)
        assert out.dtype == dtype
        assert torch.equal(out, reference.int8_mixed_linear(xd, w_int8, w_absmax, None, 0.0))
    assert fused(torch.zeros(0, k), w_int8, w_absmax, None, 0.0, isa=isa).shape == (0, n)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 4096, 1030), (258, 1024, 515), (2049, 1024, 9)])
def test_threaded_shapes(m, k, n, isa):
    """Shapes large enough for the kernel's helper threads (decoding N split, N split, M split):
    bit-identical without decomposition, within rounding with it."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w_int8, w_absmax = weight(n, k)
        bias = torch.randn(n)
        x = make_input(m, k, seed=m)
        assert torch.equal(fused(x, w_int8, w_absmax, bias, 0.0, isa=isa),
                           reference.int8_mixed_linear(x, w_int8, w_absmax, bias, 0.0))
        x = make_input(m, k, n_outlier_cols=5, seed=m + 1)
        cols = columns_of(x, w_int8, w_absmax, 6.0)
        out = fused(x, w_int8, w_absmax, bias, 6.0, isa=isa)
        want = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, 6.0)
        assert cols.numel() == 5 and ((out - want).abs() <= rounding_bound(x, w_int8, w_absmax, cols, bias=bias)).all()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_zero_nan_and_inf_rows(threshold, isa):
    k, n = 64, 8
    x = make_input(5, k, seed=9)
    x[0] = 0.0
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 7] = -float("inf")
    w_int8, w_absmax = weight(n, k)
    bias = torch.randn(n)
    out = fused(x, w_int8, w_absmax, bias, threshold, isa=isa)
    want = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, threshold)
    assert torch.equal(out[0], bias)  # an all-zero row gives exactly the bias
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.allclose(out[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert finite[4].all()  # the clean row is untouched by the others


def test_bad_fp_column_is_an_error_not_a_wild_read():
    w_int8, w_absmax = weight(4, 16)
    with pytest.raises(RuntimeError, match="failed with code -1"):
        fused(torch.randn(2, 16), w_int8, w_absmax, None, 6.0, torch.tensor([16]), torch.zeros(4, 1))


def test_layers_the_kernel_cannot_read_in_place_are_refused():
    w_int8, w_absmax = weight(4, 16)
    for args in [(w_int8.T.contiguous().T, w_absmax, None), (w_int8, w_absmax.double(), None),
                 (w_int8, w_absmax, torch.zeros(8)[::2]), (w_int8, w_absmax, torch.zeros(4, dtype=torch.float64))]:
        assert not _native.can_read_in_place(*args)
        with pytest.raises(ValueError, match="cannot read this layer in place"):
            _native.mixed_linear(torch.zeros(2, 16), *args, 6.0)


@pytest.mark.parametrize("fp_dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_weight_value_is_read_exactly(fp_dtype):
    # x = [1], one calibrated column, int8 part all zero: out[0, n] is the stored value itself
    fp_weight = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(fp_dtype).reshape(-1, 1)
    n = fp_weight.shape[0]
    out = fused(torch.ones(1, 1), torch.zeros(n, 1, dtype=torch.int8), torch.ones(n), None, 0.0,
                torch.tensor([0]), fp_weight)
    want = fp_weight.float().reshape(1, -1)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("isa", ISAS)
def test_weight_with_min_codes(isa):
    """A weight holding -128 (e.g. loaded from a checkpoint): x's codes never do, so the fused
    forward is exact for it (int8 part compared with the reference bit for bit)."""
    m, k, n = 7, 300, 20
    x = make_input(m, k, seed=13)
    w_int8, w_absmax = weight(n, k)
    w_int8[0] = -128
    w_int8[3, ::2] = -128
    assert torch.equal(fused(x, w_int8, w_absmax, None, 0.0, isa=isa),
                       reference.int8_mixed_linear(x, w_int8, w_absmax, None, 0.0))


@pytest.mark.parametrize("asked,warns", [("avx2", False), ("sse", True)])
def test_llm_int8_isa_forces_the_avx2_micro_kernel(asked, warns):
    """LLM_INT8_ISA=avx2 in a fresh process: the package runs the AVX2 micro-kernel, with the same
    numbers (bit-identical without decomposition); an unknown name warns and keeps the best one."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import torch\n"
        "from llm_int8 import _native\n"
        "from llm_int8.functional import quantize_weight\n"
        "torch.manual_seed(0)\n"
        "w, s = quantize_weight(torch.randn(37, 300))\n"
        "x = torch.randn(5, 300)\n"
        "same = torch.equal(_native.mixed_linear(x, w, s, None, 0.0), _native.mixed_linear(x, w, s, None, 0.0, isa='avx2'))\n"
        "print(_native.default_isa(), same)\n"
    )
    env = {**os.environ, "LLM_INT8_ISA": asked}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    isa, same = proc.stdout.split()
    best = "avx512_vnni" if "avx512_vnni" in _native.isas() else "avx2"
    assert isa == (best if warns else "avx2") and same == "True"
    assert ("LLM_INT8_ISA must be one of" in proc.stderr) == warns
