"""``cuda.py``: the CUDA forward composed from stages, checked here with its torch-op stages
(``cuda.TORCH_STAGES``), which are plain torch and run on CPU tensors too; the Triton stages are
``test_triton_kernels.py``'s, the GPU itself ``test_gpu.py``'s."""

from __future__ import annotations

import pytest
import torch

from helpers import exact_mixed_linear_f64, linear_case, rounding_bound
from llm_int8 import cuda, reference

STAGES = cuda.TORCH_STAGES


def test_stages_are_the_three_of_the_forward_and_the_two_ops():
    assert cuda.Stages._fields == (
        "outlier_column_flags", "quantize_rows", "linear_dequant", "linear_matmul", "mm_dequant",
    )


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_vectorwise_quant_equals_the_reference(dtype, threshold):
    x, *_ = linear_case(dtype, 9, 70, 5, threshold, 3)
    x[4, 11] = float("nan")  # never an outlier; its row's absmax carries it
    got = cuda.vectorwise_quant(STAGES, x, threshold)
    want = reference.int8_vectorwise_quant(x, threshold)
    for g, w in zip(got, want):  # exactly, NaN where the reference has NaN
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_outlier_flags_never_lower_a_calibrated_flag():
    x = torch.zeros(3, 5)
    x[1, 0], x[2, 3] = 7.0, float("nan")
    flags = torch.tensor([0, cuda.CALIBRATED_COLUMN, 0, 0, 0], dtype=torch.int32)
    STAGES.outlier_column_flags(x, 6.0, flags)
    assert flags.tolist() == [cuda.RUNTIME_OUTLIER, cuda.CALIBRATED_COLUMN, 0, 0, 0]


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (17, 130, 33), (5, 9, 3)])
@pytest.mark.parametrize("threshold,n_outliers", [(0.0, 0), (6.0, 3)])
def test_mixed_linear_matches_the_exact_product(m, k, n, threshold, n_outliers):
    """The same quantized product as the reference: equal to its float64 value up to float32 arithmetic."""
    x, _, weight_int8, weight_absmax, bias = linear_case(torch.float32, m, k, n, threshold, n_outliers)
    out = cuda.mixed_linear(STAGES, x, weight_int8, weight_absmax, bias, threshold)
    out64, magnitude, n_cols = exact_mixed_linear_f64(x, weight_int8, weight_absmax, bias, threshold)
    assert ((out.double() - out64).abs() <= rounding_bound(out64, magnitude, n_cols, torch.float32)).all()


def test_linear_matmul_is_exact_at_sizes_cublas_refuses():
    """A 1-row product and K, N not multiples of 8 are zero-padded to cuBLAS's shape rules: still exact."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1, 13), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 13), generator=gen, dtype=torch.int8)
    assert torch.equal(STAGES.linear_matmul(a, b), reference.int8_linear_matmul(a, b))
