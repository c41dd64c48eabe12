"""The Triton kernels (``llm_int8.triton``) against the pure-torch reference.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: ``TRITON_INTERPRET`` is read
when a kernel is decorated, so it is set here before ``llm_int8.triton`` is first imported (nothing
imports it earlier on a machine without CUDA; importing torch or triton first does not matter). On a
CUDA machine the same tests run the compiled kernels on the GPU.

int8 codes, row absmax, outlier columns and int32 accumulators must equal the reference exactly;
float outputs may differ only by the order of float32 additions and one final rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="Triton is not installed (pip install 'llm-int8[triton]')")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from llm_int8 import dispatch, reference  # noqa: E402
from llm_int8.triton import int8_matmul, mixed, quant  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# Triton's own helpers (tl.zeros, tl.sum, ...) are decorated when triton is first imported. If another
# test module imported it first (bitsandbytes does) without the interpreter, the kernels cannot run in
# this process: the tests then run in a fresh one (test_triton_kernels_in_a_fresh_process).
IN_PROCESS = ON_GPU or isinstance(tl.zeros, InterpretedFunction)
FRESH_PROCESS_TIMEOUT_S = 600


@pytest.fixture(autouse=True)
def _kernels_runnable_here(request):
    if not IN_PROCESS and request.node.originalname != "test_triton_kernels_in_a_fresh_process":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 before this module; run in a fresh process")


@pytest.mark.slow
@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_triton_kernels_in_a_fresh_process():
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=repo, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=FRESH_PROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS32 = torch.finfo(torch.float32).eps
# (M, K): one row, sizes that are not multiples of the interpreter's 16/32 blocks, several K blocks.
QUANT_SHAPES = [(1, 33), (17, 64), (33, 130)]
# (M, K, N)
GEMM_SHAPES = [(1, 1, 1), (1, 33, 17), (5, 64, 130), (17, 130, 33), (64, 5, 64)]
OUTLIER_COLS = (2, 4)  # columns given values beyond the threshold


def _x_with_outliers(m, k, dtype, seed):
    """x [M, K] ~ N(0, 1.5^2) in dtype, with columns OUTLIER_COLS (where they exist) holding 9 and -20."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 1.5
    for i, col in enumerate(c for c in OUTLIER_COLS if c < k):
        x[(i * 7) % m, col] = 9.0 if i % 2 == 0 else -20.0
    return x.to(dtype)


def _int8(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


def _on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _assert_close_to_reference(out, ref, magnitude, n_float_terms):
    """|out - ref| <= one rounding of the output dtype + (terms + 4) float32 roundings of the magnitude.

    ``magnitude`` bounds the sum of absolute values entering each output (|x| @ |W|.T + |bias|); the
    float32 parts of kernel and reference differ only in the order of their additions.
    """
    out = out.cpu().float()
    ref_f = ref.float()
    bound = torch.finfo(ref.dtype).eps * ref_f.abs() + (n_float_terms + 4) * EPS32 * magnitude
    bound += torch.finfo(ref.dtype).tiny
    err = (out - ref_f).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} exceeds its bound at {(err - bound).argmax().item()}"


# --------------------------------------------------------------------------------------------
# Quantization


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_triton_vectorwise_quant_matches_reference_exactly(dtype, shape, threshold):
    x = _x_with_outliers(*shape, dtype, seed=shape[0] * 1000 + shape[1])
    codes, absmax, cols = quant.int8_vectorwise_quant(*_on_device(x), threshold)
    ref_codes, ref_absmax, ref_cols = reference.int8_vectorwise_quant(x, threshold)
    if threshold > 0:
        assert ref_cols.numel() >= 1, "the test input must hold outliers"
    assert codes.dtype == torch.int8 and absmax.dtype == torch.float32 and cols.dtype == torch.int64
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(absmax.cpu(), ref_absmax)
    assert torch.equal(cols.cpu(), ref_cols)


# Under the interpreter both branches of tl.where are evaluated in numpy, so 1 / 0 warns there.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_triton_vectorwise_quant_rounds_ties_to_even_and_handles_nonfinite_rows():
    # Row 0 has absmax 127, so the scale is exactly 1 and x.5 values are ties.
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.25, 0.0])
    x = torch.stack([
        ties,
        torch.zeros(8),                                            # all zero: absmax 0, codes 0
        torch.tensor([1.0, float("nan"), 2.0, 0, 0, 0, 0, 0]),     # NaN: absmax NaN, codes 0
        torch.tensor([1.0, float("inf"), 2.0, 0, 0, 0, 0, 0]),     # Inf at threshold 0: codes 0
    ])
    codes, absmax, _ = quant.int8_vectorwise_quant(*_on_device(x), 0.0)
    ref_codes, ref_absmax, _ = reference.int8_vectorwise_quant(x, 0.0)
    assert codes[0].tolist() == [127, 0, 2, 2, 0, -2, 3, 0]
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(absmax.cpu(), ref_absmax, rtol=0, atol=0, equal_nan=True)
    assert absmax[2].isnan() and absmax[3].isinf()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
def test_triton_mixed_row_quant_leaves_flagged_columns_out(dtype, shape):
    # The mixed forward's quantizer: flagged columns leave the row absmax whole and are coded 0.
    x = _x_with_outliers(*shape, dtype, seed=7 + shape[1])
    flags = quant.outlier_column_flags(*_on_device(x), 6.0)
    found = reference.outlier_columns(x.float(), 6.0)
    assert torch.equal(flags.cpu().nonzero().view(-1), found)
    codes, absmax = quant.quantize_rows(*_on_device(x), flags, exclude_flagged=True)
    ref_codes, ref_absmax, _ = reference.int8_vectorwise_quant(x.float().index_fill(1, found, 0.0), 0.0)
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(absmax.cpu(), ref_absmax)


@pytest.mark.parametrize("k", [1, 130, 2500])
def test_triton_compact_columns_lists_flagged_columns_in_order(k):
    gen = torch.Generator().manual_seed(k)
    flags = torch.randint(0, 3, (k,), generator=gen, dtype=torch.int32)
    cols, count = quant.compact_columns(*_on_device(flags), quant.RUNTIME_OUTLIER)
    expected = (flags == quant.RUNTIME_OUTLIER).nonzero().view(-1)
    assert count.item() == expected.numel()
    assert torch.equal(cols.cpu()[: count.item()], expected)


# --------------------------------------------------------------------------------------------
# int8 GEMM and dequantization


@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_triton_int8_matmul_int32_accumulator_is_exact(shape):
    m, k, n = shape
    a, b = _int8((m, k), seed=m + k), _int8((n, k), seed=n * k)
    acc = int8_matmul.int8_linear_matmul(*_on_device(a, b))
    assert acc.dtype == torch.int32
    assert torch.equal(acc.cpu(), reference.int8_linear_matmul(a, b))


def test_triton_int8_matmul_extreme_codes_and_strided_inputs():
    # All codes -127: every product is 127**2, the largest partial sums; b is a transposed view.
    m, k, n = 17, 130, 33
    a = torch.full((m, k), -127, dtype=torch.int8)
    b = _int8((k, n), seed=3).T
    a_dev, b_dev = _on_device(a, b)
    b_dev = b_dev if ON_GPU else b  # keep the transposed strides on the CPU
    acc = int8_matmul.int8_linear_matmul(a_dev, b_dev)
    assert b.stride() == (1, n)
    assert torch.equal(acc.cpu(), reference.int8_linear_matmul(a, b))
    full = torch.full((m, k), -127, dtype=torch.int8)
    assert torch.equal(int8_matmul.int8_linear_matmul(*_on_device(full, full)).cpu(),
                       torch.full((m, m), k * 127 * 127, dtype=torch.int32))


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_mm_dequant_matches_reference(out_dtype, with_bias):
    m, n = 17, 33
    acc = reference.int8_linear_matmul(_int8((m, 64), 1), _int8((n, 64), 2))
    gen = torch.Generator().manual_seed(5)
    x_absmax, w_absmax = torch.rand(m, generator=gen) * 4, torch.rand(n, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = int8_matmul.int8_mm_dequant(*_on_device(acc, x_absmax, w_absmax, bias), out_dtype)
    ref = reference.int8_mm_dequant(acc, x_absmax, w_absmax, bias, out_dtype)
    assert out.dtype == out_dtype
    magnitude = acc.float().abs() * (x_absmax / 127)[:, None] * (w_absmax / 127)[None, :]
    if bias is not None:
        magnitude += bias.abs()
    _assert_close_to_reference(out, ref, magnitude, n_float_terms=0)


# --------------------------------------------------------------------------------------------
# The mixed-precision forward


def _weight(n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    w_int8, w_absmax, _ = reference.int8_vectorwise_quant(w, 0.0)
    return w_int8, w_absmax


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 33, 17, True), (17, 64, 5, False), (33, 130, 64, True)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_triton_mixed_linear_matches_reference(dtype, shape, threshold):
    m, k, n, with_bias = shape
    x = _x_with_outliers(m, k, dtype, seed=m * k)
    w_int8, w_absmax = _weight(n, k, dtype, seed=n)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype) if with_bias else None
    out = mixed.int8_mixed_linear(*_on_device(x, w_int8, w_absmax, bias), threshold)
    ref = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, threshold)
    assert out.dtype == dtype and out.shape == (m, n)
    n_cols = reference.outlier_columns(x.float(), threshold).numel() if threshold > 0 else 0
    assert threshold == 0 or n_cols >= 1, "the test input must hold outliers"
    w_deq = w_int8.float() * (w_absmax / 127)[:, None]
    magnitude = x.float().abs() @ w_deq.abs().T + (bias.float().abs() if bias is not None else 0.0)
    _assert_close_to_reference(out, ref, magnitude, n_float_terms=n_cols)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_mixed_linear_calibrated_fp_columns_and_strided_x(dtype):
    m, k, n = 17, 64, 33
    x = _x_with_outliers(k, m, dtype, seed=11).T  # [M, K] with strides (1, K)
    x_dev = x.to(DEVICE) if ON_GPU else x
    w_int8, w_absmax = _weight(n, k, dtype, seed=12)
    found = reference.outlier_columns(x.float(), 6.0)
    assert found.tolist() == [0, 7]
    fp_cols = torch.tensor([7, 9, 63])  # 7 is also found at run time: it must take the fp_weight path only
    fp_weight = (torch.randn(n, 3, generator=torch.Generator().manual_seed(13)) * 0.05).to(dtype)
    out = mixed.int8_mixed_linear(x_dev, *_on_device(w_int8, w_absmax), None, 6.0, *_on_device(fp_cols, fp_weight))
    ref = reference.int8_mixed_linear(x, w_int8, w_absmax, None, 6.0, fp_cols, fp_weight)
    w_deq = w_int8.float() * (w_absmax / 127)[:, None]
    w_deq[:, fp_cols] = fp_weight.float()
    magnitude = x.float().abs() @ w_deq.abs().T
    n_cols = found.numel() + fp_cols.numel()
    _assert_close_to_reference(out, ref, magnitude, n_float_terms=n_cols)


# --------------------------------------------------------------------------------------------
# Dispatch


def test_triton_dispatch_routes_by_device_and_explains_a_missing_gpu_path(monkeypatch):
    assert dispatch.kernel_backend("cpu") == "cpu"
    if ON_GPU:
        assert dispatch.kernel_backend("cuda") == "triton"
        dispatch.require_gpu_path()
    else:
        assert dispatch.kernel_backend("cuda") == "reference"
        with pytest.raises(RuntimeError, match="GPU path is unavailable: PyTorch sees no CUDA device"):
            dispatch.require_gpu_path()
    monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name: None)
    assert "pip install 'llm-int8[triton]'" in dispatch.gpu_path_unavailable_reason()
