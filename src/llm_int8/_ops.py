"""The op contract: every low-level LLM.int8() operation, its schema and its fake implementation.

Convention, stated once for the whole package: a linear layer computes ``out = x @ weight.T`` with

    x       [M, K]   hidden states (M tokens, K input features)
    weight  [N, K]   one row per output feature
    out     [M, N]

Vector-wise quantization gives every row of x and every row of weight its own absmax; codes are
``round(v * 127 / absmax)`` in [-127, 127] (never -128). The int8 product is accumulated in int32
and dequantized by the outer product ``x_absmax[:, None] * w_absmax[None, :] / 127**2``.

Kernels are registered against these schemas elsewhere: ``reference.py`` for every device (the
oracle and the fallback), ``cpu.py`` for the CPU, ``dispatch.py`` for CUDA (the stages of ``cuda.py``
on the Triton kernels of ``triton/``, each guarded by its torch-op counterpart). The fake implementations
here let ``torch.compile(fullgraph=True)`` trace through the ops and let modules live on the meta
device. Argument checking that users should see happens in ``functional.py``; the ``torch._check``
calls here guard the contract itself.
"""

from __future__ import annotations

import torch

NAMESPACE = "llm_int8"
INT8_MAX = 127

OP_NAMES = ("int8_vectorwise_quant", "int8_linear_matmul", "int8_mm_dequant", "int8_mixed_linear")

_lib = torch.library.Library(NAMESPACE, "DEF")

_lib.define("int8_vectorwise_quant(Tensor x, float threshold=0.0) -> (Tensor, Tensor, Tensor)")
_lib.define("int8_linear_matmul(Tensor a, Tensor b) -> Tensor")
_lib.define(
    "int8_mm_dequant(Tensor acc, Tensor x_absmax, Tensor w_absmax, Tensor? bias=None, "
    "ScalarType? out_dtype=None) -> Tensor"
)
_lib.define(
    "int8_mixed_linear(Tensor x, Tensor weight_int8, Tensor weight_absmax, Tensor? bias=None, "
    "float threshold=6.0, Tensor? fp_cols=None, Tensor? fp_weight=None) -> Tensor"
)


@torch.library.register_fake(f"{NAMESPACE}::int8_vectorwise_quant")
def _(x: torch.Tensor, threshold: float = 0.0):
    """x [M, K] float -> (x_int8 [M, K], x_absmax float32 [M], outlier_cols int64 [n_outliers])."""
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {x.dim()}-D")
    x_int8 = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    x_absmax = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if threshold > 0.0:
        n_outliers = torch.library.get_ctx().new_dynamic_size()
    else:
        n_outliers = 0
    outlier_cols = torch.empty(n_outliers, dtype=torch.int64, device=x.device)
    return x_int8, x_absmax, outlier_cols


@torch.library.register_fake(f"{NAMESPACE}::int8_linear_matmul")
def _(a: torch.Tensor, b: torch.Tensor):
    """a int8 [M, K], b int8 [N, K] -> int32 [M, N] = a @ b.T, exact."""
    torch._check(a.dtype == torch.int8 and b.dtype == torch.int8, lambda: "a and b must be int8")
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "a and b must be 2-D")
    torch._check(a.shape[1] == b.shape[1], lambda: f"K mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}")
    return torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)


@torch.library.register_fake(f"{NAMESPACE}::int8_mm_dequant")
def _(acc, x_absmax, w_absmax, bias=None, out_dtype=None):
    """acc int32 [M, N], x_absmax [M], w_absmax [N] -> out [M, N] in out_dtype (float32 by default)."""
    torch._check(acc.dtype == torch.int32, lambda: f"acc must be int32, got {acc.dtype}")
    return torch.empty(acc.shape, dtype=out_dtype or torch.float32, device=acc.device)


@torch.library.register_fake(f"{NAMESPACE}::int8_mixed_linear")
def _(x, weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None):
    """x [M, K] float, weight_int8 [N, K], weight_absmax [N] -> out [M, N] in x's dtype."""
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {x.dim()}-D")
    torch._check(weight_int8.dim() == 2, lambda: "weight_int8 must be 2-D [N, K]")
    torch._check(x.shape[1] == weight_int8.shape[1], lambda: "K mismatch between x and weight_int8")
    return torch.empty((x.shape[0], weight_int8.shape[0]), dtype=x.dtype, device=x.device)


def register_kernels(device: str | None, kernels: dict) -> None:
    """Register ``kernels[name]`` as the kernel of every op of :data:`OP_NAMES` for ``device`` ("cpu",
    "cuda"; None: every device, the fallback). ``kernels`` maps op names to functions (a module's
    ``globals()`` where it names them after the ops)."""
    for name in OP_NAMES:
        torch.library.register_kernel(f"{NAMESPACE}::{name}", device, kernels[name])
