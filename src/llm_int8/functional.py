"""The functions users call: quantization primitives and the LLM.int8() matmul ops.

Shapes follow ``_ops.py``: x [M, K] (or [..., K]), weight [N, K], out = x @ weight.T [M, N].
Arguments are checked here, once, with messages that say what was wrong; the ops behind these
wrappers (``torch.ops.llm_int8.*``) assume checked inputs.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _native, cpu, dispatch, reference, saved_format  # noqa: F401  (importing cpu and reference registers their kernels)
from ._ops import INT8_MAX

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ops = torch.ops.llm_int8


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_float_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16 or float32, got {x.dtype}; "
            f"cast it first, e.g. {name}.float()"
        )
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (its last is the feature dim K), got a scalar")


def _check_threshold(threshold: float, name: str = "threshold") -> float:
    """The outlier threshold alpha as a float, or the error that says what is wrong with it.

    The one threshold validator: ``Linear8bitLt`` (constructor and attribute), ``Int8Config`` /
    ``LLMInt8Config`` and the functional ops call it; ``name`` is how the caller's user spells it.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"{name} must be a number >= 0 (0 disables the outlier decomposition; the paper uses 6.0), got {threshold!r}"
        )
    threshold = float(threshold)
    if math.isnan(threshold) or threshold < 0.0:
        raise ValueError(
            f"{name} must be >= 0 (0 disables the outlier decomposition; the paper uses 6.0), got {threshold}"
        )
    return threshold


def _check_int8_weight(weight_int8: torch.Tensor, weight_absmax: torch.Tensor) -> None:
    for name, t in (("weight_int8", weight_int8), ("weight_absmax", weight_absmax)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(t).__name__}; get both from "
                "llm_int8.functional.quantize_weight(weight)"
            )
    if weight_int8.dtype != torch.int8:
        raise TypeError(
            f"weight_int8 must be int8, got {weight_int8.dtype}; quantize a float weight first with "
            "llm_int8.functional.quantize_weight(weight)"
        )
    if weight_int8.dim() != 2:
        raise ValueError(f"weight_int8 must be 2-D [N, K], got shape {tuple(weight_int8.shape)}")
    n = weight_int8.shape[0]
    if weight_absmax.shape != (n,):
        raise ValueError(
            f"weight_absmax must have shape [N] = [{n}] (one absmax per output row), got {tuple(weight_absmax.shape)}"
        )
    if not weight_absmax.is_floating_point():
        raise TypeError(f"weight_absmax must be a float tensor, got {weight_absmax.dtype}")


def _check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}; move them with .to(device)")


def plain_eager_call(x, bias: torch.Tensor | None) -> bool:
    """True for eager inference: x a plain float tensor, no gradient needed, not under
    torch.compile, no torch function or dispatch mode active (else the op and its dispatcher are
    needed: autograd, tracing and modes). Written for speed: it runs on every layer call."""
    if type(x) is not torch.Tensor:
        return False  # (before reading x.dtype: a list gets check_linear_input's TypeError)
    dt = x.dtype
    return (
        (dt is torch.float32 or dt is torch.bfloat16 or dt is torch.float16)
        and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._is_torch_function_mode_enabled()
    )


def eager_kernel(x: torch.Tensor, weight_int8: torch.Tensor, bias: torch.Tensor | None):
    """The ``int8_mixed_linear`` kernel registered for x's device, for a layer to call directly (no
    dispatcher round trip) in eager inference (:func:`plain_eager_call`) when x is on the weight's
    device; None otherwise (the caller then takes the op). On the CPU it is ``cpu.int8_mixed_linear``
    (one native call), on CUDA the kernel ``dispatch`` registered: the same function the op runs."""
    if not plain_eager_call(x, bias) or x.device != weight_int8.device:
        return None
    if x.is_cpu:
        return cpu.int8_mixed_linear
    if x.is_cuda:
        return dispatch.registered_cuda_kernels().get("int8_mixed_linear")
    return None


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with M the product of the leading dims (also when a dim is 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# --------------------------------------------------------------------------------------------
# The LLM.int8() ops


def int8_vectorwise_quant(
    x: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise absmax quantization of x [..., K] with outlier-column detection.

    Values with |x| >= threshold (threshold > 0) are outliers: they are left out of their row's
    absmax, and every column holding one is an outlier column whose codes are all 0 (it belongs to
    the 16-bit part of the decomposition). fp16, bf16 and fp32 are quantized from their own values,
    never cast through fp16. Returns (x_int8 [..., K], x_absmax float32 [M] with M the product of
    the leading dims (flat, as bitsandbytes returns its row stats), outlier_cols int64 [n_outliers],
    sorted; empty when threshold is 0).
    """
    _check_float_input(x)
    threshold = _check_threshold(threshold)
    x_int8, x_absmax, outlier_cols = _ops.int8_vectorwise_quant(_as_rows(x), threshold)
    return x_int8.reshape(x.shape), x_absmax, outlier_cols


def quantize_weight(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-wise int8 weight: (weight_int8 [N, K], weight_absmax float32 [N]).

    Quantized from the weight's own dtype. For fp16 weights the codes and absmax are bit-identical
    to bitsandbytes (which casts fp32/bf16 weights to fp16 first; we do not, which is more faithful).
    A weight holding NaN or +-Inf is refused (a ValueError naming ``name``, the layer's weight as the
    caller knows it, and the rows): no int8 code or finite scale represents those rows, and a saved
    non-finite scale would make the checkpoint unreadable. Every quantizing path calls this function.
    """
    _check_float_input(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(weight.shape)}")
    _check_finite_weight(weight, name)
    weight_int8, weight_absmax, _ = _ops.int8_vectorwise_quant(weight, 0.0)
    return weight_int8, weight_absmax


def _check_finite_weight(weight: torch.Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` and the first rows of ``weight`` [N, K] that hold NaN or +-Inf."""
    if weight.is_meta or weight.numel() == 0:
        return
    bad_rows = (~torch.isfinite(weight)).any(dim=1)
    if not bool(bad_rows.any()):
        return
    rows = bad_rows.nonzero().view(-1)
    first = rows[0].item()
    col = (~torch.isfinite(weight[first])).nonzero()[0].item()
    raise ValueError(
        f"{name} holds NaN or Inf in {rows.numel()} of its {weight.shape[0]} rows (rows {rows[:8].tolist()}"
        f"{' ...' if rows.numel() > 8 else ''}; first at row {first}, column {col}: {weight[first, col].item()}); "
        "int8 codes and their float32 row scales cannot represent them. The float weights are broken (a diverged "
        "training run or a damaged file): load a good copy of them before quantizing"
    )


def dequantize_weight(weight_int8: torch.Tensor, weight_absmax: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """float [N, K] = weight_int8 * weight_absmax[:, None] / 127."""
    _check_int8_weight(weight_int8, weight_absmax)
    return (weight_int8.float() * (weight_absmax.float() / INT8_MAX).unsqueeze(1)).to(dtype)


def int8_linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM: a int8 [M, K] (or [..., K]), b int8 [N, K] -> int32 [..., N] = a @ b.T.

    Exact for every int8 code of both operands (-128 included) and every K up to 133,144 (131,071
    when a -128 occurs), where the int32 result can no longer overflow; a larger K is a ValueError.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
            raise TypeError(f"{name} must be an int8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if b.dim() != 2 or a.dim() < 1:
        raise ValueError(f"b must be 2-D [N, K] and a at least 1-D [..., K]; got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.shape[-1] != b.shape[1]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (need a[..., K], b[N, K])")
    _check_same_device(a=a, b=b)
    acc = _ops.int8_linear_matmul(_as_rows(a), b)
    return acc.reshape(*a.shape[:-1], b.shape[0])


def int8_mm_dequant(
    acc: torch.Tensor,
    x_absmax: torch.Tensor,
    w_absmax: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """acc int32 [M, N] -> ``acc * x_absmax[:, None] * w_absmax[None, :] / 127**2 + bias`` in out_dtype.

    x_absmax [M] and w_absmax [N] (bitsandbytes' [M, 1] / [N, 1] are accepted too). Computed in
    float32 and rounded once to out_dtype.
    """
    if acc.dtype != torch.int32 or acc.dim() != 2:
        raise TypeError(f"acc must be a 2-D int32 tensor [M, N], got {acc.dtype} {tuple(acc.shape)}")
    m, n = acc.shape
    # bitsandbytes passes row / column stats as [M, 1] / [N, 1]; both layouts mean the same vectors.
    if x_absmax.shape == (m, 1):
        x_absmax = x_absmax.view(m)
    if w_absmax.shape == (n, 1):
        w_absmax = w_absmax.view(n)
    if x_absmax.shape != (m,) or w_absmax.shape != (n,):
        raise ValueError(
            f"x_absmax must be [M] (or [M, 1]) = [{m}] and w_absmax [N] (or [N, 1]) = [{n}]; "
            f"got {tuple(x_absmax.shape)}, {tuple(w_absmax.shape)}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {out_dtype}")
    return _ops.int8_mm_dequant(acc, x_absmax, w_absmax, bias, out_dtype)


def int8_mixed_linear(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_absmax: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
    fp_cols: torch.Tensor | None = None,
    fp_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LLM.int8() forward: ``x @ dequant(weight).T + bias`` with mixed-precision decomposition.

    x [..., K] fp16/bf16/fp32; weight_int8 [N, K]; weight_absmax [N]. Every input column of x
    holding a value with |x| >= threshold leaves the int8 product and is multiplied in float32
    against the matching (dequantized) weight columns; the rest goes through the vector-wise int8
    GEMM. ``fp_cols`` [F] (int64, distinct, in [0, K)) with ``fp_weight`` [N, F] name columns that
    always take the float path, against stored 16/32-bit weight columns (calibrated outlier dims).
    Output in x's dtype, shape [..., N]. Differentiable w.r.t. x and bias (the weight is frozen).

    The values of ``fp_cols`` are checked on every eager call (one host sync); under
    ``torch.compile`` they are not, so compiled code should hold its columns in a ``Linear8bitLt``,
    which checks them once, when they are set.
    """
    threshold = _check_mixed_linear_args("int8_mixed_linear", x, weight_int8, weight_absmax, bias, threshold,
                                         fp_cols, fp_weight)
    return mixed_linear_op(x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)


_FP_COLS_REMEDY = "pass distinct int64 column indices in [0, K) and their float weight columns [N, F]"


def _check_mixed_linear_args(op, x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight) -> float:
    """The argument checks of the LLM.int8() forwards (``op`` names the caller); returns the threshold."""
    _check_int8_weight(weight_int8, weight_absmax)
    threshold = _check_threshold(threshold)
    n, k = weight_int8.shape
    check_linear_input(x, (n, k), weight_int8.device)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    _check_same_device(x=x, weight_int8=weight_int8, weight_absmax=weight_absmax, bias=bias)
    if fp_cols is not None or fp_weight is not None:
        for name, t in (("fp_cols", fp_cols), ("fp_weight", fp_weight)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        # Under torch.compile, shapes and dtypes only: the values would need a host sync (a graph break).
        saved_format.validate_fp_columns(
            fp_cols, fp_weight, n, k, op, remedy=_FP_COLS_REMEDY,
            check_values=not torch.compiler.is_compiling(), error=ValueError,
        )
    return threshold


def int8_mixed_linear_per_row(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_absmax: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
    fp_cols: torch.Tensor | None = None,
    fp_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch-invariant LLM.int8() forward: each row of x decomposes only its own outliers.

    :func:`int8_mixed_linear` takes a column out of the int8 product for every row when any row
    holds an outlier in it, so a row's result depends on the other rows of the batch. Here the float
    path of row i holds only the entries of row i with ``|x| >= threshold`` (and the calibrated
    ``fp_cols``, for every row); the rest of the row is quantized with its own absmax. Row i's output
    is then the same bit for bit whatever else is in x: the int8 product is exact per row (int32),
    its dequantization is per element, and the float entries are added one decomposed column at a
    time, in a fixed order (found columns ascending, then ``fp_cols``), where the columns of the
    other rows add exact zeros. Same arguments and result shape as :func:`int8_mixed_linear`.
    """
    threshold = _check_mixed_linear_args("int8_mixed_linear_per_row", x, weight_int8, weight_absmax, bias,
                                         threshold, fp_cols, fp_weight)
    return per_row_mixed_linear_op(x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)


def per_row_mixed_linear_op(x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight) -> torch.Tensor:
    """:func:`int8_mixed_linear_per_row` on x [..., K] -> [..., N], arguments already checked."""
    rows = _as_rows(x)
    xf = rows.float()
    if threshold > 0.0:  # the one outlier rule, per entry (NaN never an outlier)
        own = reference.outlier_values(xf, threshold)
    else:
        own = torch.zeros(xf.shape, dtype=torch.bool, device=xf.device)
    if fp_cols is not None and fp_cols.numel():
        own[:, fp_cols] = True
    x_main = xf.masked_fill(own, 0.0)
    # the int8 part: x_main's rows quantized each with its own absmax, no decomposition (threshold 0)
    kernel = eager_kernel(x_main, weight_int8, None)
    if kernel is not None:
        out = kernel(x_main, weight_int8, weight_absmax, None, 0.0, None, None)
    else:
        out = _ops.int8_mixed_linear(x_main, weight_int8, weight_absmax, None, 0.0, None, None)
    found = own.any(dim=0).nonzero().view(-1)
    if fp_cols is not None and fp_cols.numel():
        found = found[~torch.isin(found, fp_cols)]
        cols = torch.cat([found, fp_cols])
    else:
        cols = found
    if cols.numel():
        w_cols = reference.decomposed_weight(weight_int8, weight_absmax, found, fp_weight)  # float32 [N, C]
        x_cols = xf[:, cols].masked_fill(~own[:, cols], 0.0)  # each row's own entries; exact zeros elsewhere
        for c in range(cols.numel()):  # one column at a time: each element sums its terms in column order
            out = out.add_(x_cols[:, c : c + 1] * w_cols[:, c])
    if bias is not None:
        out = out.add_(bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], weight_int8.shape[0])


def check_linear_input(x: torch.Tensor, weight_shape: tuple[int, int], device: torch.device) -> None:
    """x must be a float tensor [..., K] on ``device``, for a weight [N, K] (no host sync: safe on every call)."""
    _check_float_input(x)
    if x.shape[-1] != weight_shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dim but the weight expects K = {weight_shape[1]} "
            f"(x {tuple(x.shape)}, weight [N, K] = {tuple(weight_shape)})"
        )
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}; move them with .to(device)")


def mixed_linear_op(x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight) -> torch.Tensor:
    """The ``int8_mixed_linear`` op on x [..., K] -> [..., N], arguments already checked."""
    out = _ops.int8_mixed_linear(_as_rows(x), weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
    return out.reshape(*x.shape[:-1], weight_int8.shape[0])


# --------------------------------------------------------------------------------------------
# Autograd: the gradient flows to x through the frozen dequantized weight (what adapters such as
# LoRA need) and to the bias. The int8 weight gets none.


def _grad_input(grad_out: torch.Tensor, weight_int8: torch.Tensor, weight_absmax: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] = (grad_out * weight_absmax / 127) @ weight_int8, summed in float32.

    grad_out [M, N] is scaled by each weight row's absmax / 127 (so the int8 codes stay whole; every
    int8 code is exact in float32 and in bfloat16). Two paths, chosen per call:

    * the AVX-512 BF16 kernel (CPU with that extension, no double backward): the scaled gradient is
      rounded once to bfloat16 and the products summed in float32. The result differs from
      grad_out @ dequant(W) by at most 2^-8 * sum_n |g_n| |W^_nk| (plus float32 summation): per
      term, never more than the int8 weight itself is off from the float weight it was quantized
      from (half a step, 2^-8 of its row's absmax). In return it runs at twice the float32
      multiply-adds per instruction, reading the int8 weight in place.
    * everywhere else, a float32 GEMM of the float32 scaled gradient: no bfloat16 rounding (it
      would buy no speed there), only float32's, about 2^-24 * (N + 2) of sum |g| |W^|.
    """
    scaled = grad_out.float() * (weight_absmax.float() / INT8_MAX)
    # (a double backward, create_graph=True, needs this product in autograd: the torch path below)
    if scaled.device.type == "cpu" and not scaled.requires_grad and _native.grad_bf16_available():
        m, n = scaled.shape
        a = torch.empty((m, n + n % 2), dtype=torch.bfloat16)
        a[:, :n] = scaled  # round to nearest even, as .bfloat16()
        if n % 2:
            a[:, n] = 0  # the pair partner of the last row of W: the kernel reads N in pairs
        return _native.grad_bf16_s8(a, weight_int8)
    return scaled @ weight_int8.float()


def _setup_context(ctx, inputs, output):
    x, weight_int8, weight_absmax, bias, _threshold, fp_cols, fp_weight = inputs
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(weight_int8, weight_absmax, fp_cols, fp_weight)


def _backward(ctx, grad_out):
    weight_int8, weight_absmax, fp_cols, fp_weight = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input(grad_out, weight_int8, weight_absmax)
        if fp_cols is not None and fp_cols.numel():
            # calibrated columns: their float path, in float32 against the stored 16-bit weight
            grad_x[:, fp_cols] = grad_out.float() @ fp_weight.float()
        grad_x = grad_x.to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_out.sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None, None


torch.library.register_autograd("llm_int8::int8_mixed_linear", _backward, setup_context=_setup_context)
