"""The backward through the frozen int8 weight (functional._grad_input and its AVX-512 BF16 kernel).

grad_x = (grad_out * absmax / 127) @ weight_int8, summed in float32, the scaled gradient rounded to
bfloat16 only where the AVX-512 BF16 kernel runs: checked against float64 with the bound of each
path's arithmetic, on the shapes that break kernels (odd N, K not a multiple of the 64 columns of a
micro-tile, M not a multiple of its 6 rows, strided weights, empty dims), on both paths (the native
kernel where the CPU has AVX-512 BF16, the float32 torch path everywhere).
"""

from __future__ import annotations

import pytest
import torch

from llm_int8 import _native
from llm_int8 import functional as F
from llm_int8._ops import INT8_MAX

U32 = 2.0**-24
BF16_U = 2.0**-8
NATIVE = _native.grad_bf16_available()


def bf16_product_bound(a64: torch.Tensor, w64: torch.Tensor) -> torch.Tensor:
    """|float32 sum - a64 @ w64| for bf16 a and int8 w: exact products, N float32 additions, and the
    kernel's flush of values below 2^-126 (at most 2^-126 * 127 per term)."""
    n = a64.shape[1]
    return n * U32 / (1 - n * U32) * (a64.abs() @ w64.abs()) + n * INT8_MAX * 2.0**-126


SHAPES = [
    (1, 1, 1), (7, 3, 5), (6, 2, 64), (13, 257, 130), (97, 11, 1000), (200, 300, 65), (5, 0, 7), (0, 4, 4), (3, 4, 0)
]


@pytest.mark.skipif(not NATIVE, reason="the CPU has no AVX-512 BF16")
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_native_kernel_against_float64(m, n, k, strided):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    # magnitudes over six decades, negative and positive codes up to +-127
    g = torch.randn(m, n, generator=gen) * torch.logspace(-3, 3, max(n, 1))[:n]
    full = torch.randint(-127, 128, (n, k + 9), dtype=torch.int8, generator=gen)
    w = full[:, 4 : 4 + k] if strided else full[:, :k].contiguous()
    a = torch.zeros(m, n + n % 2, dtype=torch.bfloat16)
    a[:, :n] = g
    out = _native.grad_bf16_s8(a, w)
    assert out.dtype == torch.float32 and out.shape == (m, k)
    a64, w64 = a[:, :n].double(), w.double()
    assert ((out.double() - a64 @ w64).abs() <= bf16_product_bound(a64, w64)).all()


def gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of n float32 roundings."""
    return n * U32 / (1 - n * U32)


@pytest.mark.skipif(not NATIVE, reason="the CPU has no AVX-512 BF16")
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (13, 257, 130), (64, 96, 70)])
def test_grad_input_bf16_kernel_rounds_the_scaled_gradient_once(m, n, k):
    """Where the AVX-512 BF16 kernel runs: bf16(g * absmax / 127) times the codes, summed in float32."""
    gen = torch.Generator().manual_seed(n)
    weight_int8, weight_absmax = F.quantize_weight(torch.randn(n, k, generator=gen))
    grad_out = torch.randn(m, n, generator=gen)
    out = F._grad_input(grad_out, weight_int8, weight_absmax)
    scaled = (grad_out * (weight_absmax / INT8_MAX)).bfloat16().double()  # what the kernel multiplies
    ref = scaled @ weight_int8.double()
    assert ((out.double() - ref).abs() <= bf16_product_bound(scaled, weight_int8.double())).all()
    # and against the gradient through the dequantized weight: within bf16's rounding of the gradient
    w_hat = weight_int8.double() * (weight_absmax.double() / INT8_MAX)[:, None]
    exact = grad_out.double() @ w_hat
    bound = (BF16_U + (n + 2) * U32 * 1.01) * (grad_out.double().abs() @ w_hat.abs())
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (13, 257, 130), (64, 96, 70)])
def test_grad_input_without_the_bf16_kernel_stays_float32(monkeypatch, m, n, k):
    """Where the kernel does not run (AVX2, other devices, double backward) nothing is rounded to
    bfloat16: the float32 scaled gradient times the codes, summed in float32. Its error against the
    float64 gradient through the dequantized weight is float32's, gamma(N + 2) of sum |g| |W^|: a
    path that rounded to bfloat16 (2^-8 of it) fails this bound by orders of magnitude."""
    monkeypatch.setattr(_native, "grad_bf16_available", lambda: False)
    gen = torch.Generator().manual_seed(n)
    weight_int8, weight_absmax = F.quantize_weight(torch.randn(n, k, generator=gen))
    grad_out = torch.randn(m, n, generator=gen)
    out = F._grad_input(grad_out, weight_int8, weight_absmax)
    w_hat = weight_int8.double() * (weight_absmax.double() / INT8_MAX)[:, None]
    exact = grad_out.double() @ w_hat
    bound = gamma(n + 2) * (grad_out.double().abs() @ w_hat.abs())
    assert ((out.double() - exact).abs() <= bound).all()
    # the same through autograd (the op's backward takes this path too)
    x = torch.randn(m, k, generator=gen, requires_grad=True)
    F.int8_mixed_linear(x, weight_int8, weight_absmax, None, 6.0).backward(grad_out)
    assert ((x.grad.double() - exact).abs() <= bound).all()


@pytest.mark.skipif(not NATIVE, reason="the CPU has no AVX-512 BF16")
def test_native_kernel_nonfinite_like_a_matmul():
    """Inf and NaN in the gradient reach exactly the outputs a float matmul would make non-finite."""
    w = torch.tensor([[1, -2, 0], [3, 0, 4]], dtype=torch.int8)
    a = torch.tensor([[float("inf"), 0.0], [float("nan"), 1.0], [1.0, 2.0]]).bfloat16()
    out = _native.grad_bf16_s8(a, w)
    ref = a.double() @ w.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(out[finite].double(), ref[finite])


def test_double_backward_goes_through_autograd():
    """With create_graph=True the gradient is itself differentiable (the native kernel is bypassed)."""
    weight_int8, weight_absmax = F.quantize_weight(torch.randn(5, 7))
    x = torch.randn(3, 7, requires_grad=True)
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, None, 6.0)
    grad_out = torch.randn(3, 5, requires_grad=True)
    (grad_x,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
    assert grad_x.requires_grad
    (grad_g,) = torch.autograd.grad(grad_x.sum(), grad_out)
    # d/dg sum(g @ W^) = W^ summed over its columns: the codes' sums (exact integers in float32) times
    # absmax / 127 in float32, two roundings (this path has no bfloat16 cast)
    w_hat = weight_int8.double() * (weight_absmax.double() / INT8_MAX)[:, None]
    ref = w_hat.sum(1).expand(3, 5)
    assert ((grad_g.double() - ref).abs() <= gamma(2) * ref.abs()).all()
