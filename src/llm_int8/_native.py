"""The torch-facing wrappers of the native CPU kernels: the exact int8 GEMM, the fused LLM.int8()
forward with its per-weight preparation cache, the bf16 backward, and the kernels' thread count.

Building and loading the library, and choosing its micro-kernel and thread runner, is
:mod:`llm_int8._native_lib`'s job; its public functions are re-exported here, so callers use
``_native.available()``, ``_native.isas()`` and so on. The kernels are called through :mod:`ctypes`,
which releases the GIL for the duration of a call. Only the standard library and torch are imported.
"""
from __future__ import annotations

import threading
import weakref

import torch

from ._native_lib import (  # noqa: F401 - re-exported: the library's state and loader
    DEFAULT_RUNNER, ISA_CODES, RUNNERS, SYMBOLS, _FEATURE_AVX512_BF16, _load, _state, available, default_isa,
    function, isas, library_path, set_thread_runner, thread_runner, unavailable_reason,
)

__all__ = [
    "available", "unavailable_reason", "library_path", "isas", "default_isa", "function",
    "int8_gemm_nt", "can_read_in_place", "mixed_linear", "MAX_K", "MAX_K_FULL_RANGE",
    "grad_bf16_available", "grad_bf16_s8",
]

#: Largest K for which an int32 result is guaranteed for codes in [-127, 127]:
#: 127 * 127 * K must not exceed 2**31 - 1.
MAX_K = (2**31 - 1) // (127 * 127)  # 133144
#: The same for codes that include -128: 128 * 128 * K <= 2**31 - 1.
MAX_K_FULL_RANGE = (2**31 - 1) // (128 * 128)  # 131071
_FP_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _isa_code(isa: str | None) -> int:
    name = default_isa() if isa is None else isa
    if name not in isas():
        raise ValueError(f"micro-kernel {isa!r} is not available on this CPU; it runs {isas()}")
    return ISA_CODES[name]


def _rows_operand(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A tensor whose rows are K-contiguous, and its row stride (copies only if needed)."""
    rows, k = t.shape
    if t.is_contiguous():
        return t, max(k, 1)
    if k > 1 and t.stride(1) != 1 or rows > 1 and t.stride(0) < k:
        t = t.contiguous()
    if rows <= 1:
        return t, max(k, 1)
    return t, t.stride(0)


def int8_gemm_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                 isa: str | None = None) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` [M, K] and ``b`` [N, K]; returns int32 [M, N].

    Both operands keep K as the last dimension (``b`` is e.g. an ``nn.Linear``-style weight).
    Inputs whose last dimension is not contiguous are copied; rows may be strided.

    Contract (see the C header):

    * ``isa="avx2"``: a's codes in **[-127, 127]** (the sign trick cannot negate -128; it is not
      checked here, ``cpu.int8_linear_matmul`` routes such an ``a`` elsewhere); b may hold -128.
      ``isa="avx512_vnni"``: every int8 code in both. ``None``: :func:`default_isa`.
    * The result is exact whenever the true result fits int32, which ``K <= MAX_K`` (133144)
      guarantees for codes in [-127, 127] and ``K <= MAX_K_FULL_RANGE`` (131071) for any codes; a K
      above MAX_K raises ValueError.
    * Uses up to :func:`kernel_threads` threads; the GIL is released during the call.

    ``out``, if given, must be a CPU int32 tensor of shape [M, N] whose last dimension is
    contiguous; it is overwritten and returned.  Raises RuntimeError if the native kernels are
    unavailable (see :func:`unavailable_reason`).
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("int8_gemm_nt expects torch.Tensor operands")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8_gemm_nt expects int8 tensors, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"int8_gemm_nt expects 2-D tensors a [M, K] and b [N, K], got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError(f"int8_gemm_nt runs on CPU tensors, got {a.device} and {b.device}")
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(
            f"int8_gemm_nt: inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} "
            "(expected a [M, K] and b [N, K])"
        )
    if k > MAX_K:
        raise ValueError(f"int8_gemm_nt: K={k} exceeds {MAX_K}, the int32 result could overflow")

    if out is None:
        out = torch.empty((m, n), dtype=torch.int32)
    else:
        if out.dtype != torch.int32 or out.device.type != "cpu" or tuple(out.shape) != (m, n):
            raise ValueError(
                f"int8_gemm_nt: out must be a CPU int32 tensor of shape {(m, n)}, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if n > 1 and out.stride(1) != 1:
            raise ValueError("int8_gemm_nt: out must have a contiguous last dimension")
        if m > 1 and n > 0 and out.stride(0) < n:
            raise ValueError("int8_gemm_nt: out rows must not overlap (stride(0) >= N)")

    fn = function("llm_int8_gemm_nt_s8s8s32")
    code = _isa_code(isa)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()

    a_, lda = _rows_operand(a)
    b_, ldb = _rows_operand(b)
    ldc = out.stride(0) if m > 1 else n
    rc = fn(a_.data_ptr(), lda, b_.data_ptr(), ldb, out.data_ptr(), ldc, m, n, k,
            max(1, kernel_threads()), code)
    if rc != 0:
        raise RuntimeError(f"native int8 GEMM failed with code {rc} (M={m}, N={n}, K={k})")
    return out


_F32 = torch.float32


def can_read_in_place(weight_int8, weight_absmax, bias, fp_cols=None, fp_weight=None) -> bool:
    """Whether :func:`mixed_linear` reads these layer tensors in place (else the caller converts them).

    weight_int8 [N, K] (rows K-contiguous); weight_absmax float32 [N] contiguous; bias [N] contiguous
    float32, float16 or bfloat16, or None; fp_cols int64 [F] contiguous with fp_weight [N, F]
    contiguous (float32, float16 or bfloat16), or both None. CPU tensors, N, K > 0, K <= MAX_K.
    """
    if weight_int8.dim() != 2:
        return False
    n, k = weight_int8.shape
    return (
        available() and weight_int8.dtype == torch.int8 and n > 0 and 0 < k <= MAX_K
        and (k == 1 or weight_int8.stride(1) == 1) and (n == 1 or weight_int8.stride(0) >= k)
        and weight_int8.is_cpu and weight_absmax.is_cpu
        and weight_absmax.dtype == _F32 and tuple(weight_absmax.shape) == (n,) and weight_absmax.is_contiguous()
        and (bias is None or bias.is_cpu and bias.dtype in _FP_DTYPE_CODES and tuple(bias.shape) == (n,)
             and bias.is_contiguous())
        and (fp_cols is None) == (fp_weight is None)
        and (fp_cols is None or fp_cols.is_cpu and fp_weight.is_cpu and fp_cols.dtype == torch.int64
             and fp_cols.dim() == 1 and fp_cols.is_contiguous() and fp_weight.dtype in _FP_DTYPE_CODES
             and tuple(fp_weight.shape) == (n, fp_cols.numel()) and fp_weight.is_contiguous())
    )


# The layer arguments of llm_int8_mixed_linear_f32, checked once per layer and kept while the layer
# holds the same tensors over the same memory with the same threshold: id(weight_int8) -> _Prepared.
# An entry goes when its weight is freed (the weak reference's callback), so an id is never reused
# while its entry is here; a decoding step calls every layer once per token, where a full check per
# call (~8 us of Python) would add up.
_prepared: dict = {}


class _Prepared:
    __slots__ = ("weight", "tensors", "ptrs", "threshold", "args", "__weakref__")

    def __init__(self, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight, isa_code):
        key = id(weight_int8)
        self.weight = weakref.ref(weight_int8, lambda _, key=key: _prepared.pop(key, None))
        self.tensors = (weight_absmax, bias, fp_cols, fp_weight)
        self.ptrs = tuple(0 if t is None else t.data_ptr() for t in (weight_int8, *self.tensors))
        self.threshold = threshold
        n, k = weight_int8.shape
        nfp = 0 if fp_cols is None else fp_cols.numel()
        self.args = (
            weight_int8.data_ptr(), weight_int8.stride(0) if n > 1 else k, n, k, weight_absmax.data_ptr(),
            None if bias is None else bias.data_ptr(), 0 if bias is None else _FP_DTYPE_CODES[bias.dtype],
            threshold, fp_cols.data_ptr() if nfp else None, nfp,
            fp_weight.data_ptr() if nfp else None, _FP_DTYPE_CODES[fp_weight.dtype] if nfp else 0, isa_code,
        )

    def holds(self, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight) -> bool:
        """The very tensors prepared, over the same memory (a ``.data = other`` swap keeps the object,
        not the pointer), and the same threshold."""
        t, p = self.tensors, self.ptrs
        return (
            self.weight() is weight_int8 and t[0] is weight_absmax and t[1] is bias and t[2] is fp_cols
            and t[3] is fp_weight and self.threshold == threshold
            and weight_int8.data_ptr() == p[0] and weight_absmax.data_ptr() == p[1]
            and (bias is None or bias.data_ptr() == p[2])
            and (fp_weight is None or fp_cols.data_ptr() == p[3] and fp_weight.data_ptr() == p[4])
        )


def _layer_args(weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight, isa):
    isa_code = _state["isa_code"] if isa is None else _isa_code(isa)
    entry = _prepared.get(id(weight_int8))
    if entry is not None and entry.args[12] == isa_code and entry.holds(
            weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight):
        return entry.args
    if not can_read_in_place(weight_int8, weight_absmax, bias, fp_cols, fp_weight):
        raise ValueError(
            f"the native forward cannot read this layer in place: weight {weight_int8.dtype} "
            f"{tuple(weight_int8.shape)} strides {weight_int8.stride()} (int8 [N, K], K-contiguous rows, "
            f"0 < K <= {MAX_K}), weight_absmax contiguous float32 [N], bias contiguous float [N] or None, "
            "fp_cols contiguous int64 [F] with fp_weight contiguous float [N, F] or both None, all on the CPU"
        )
    isa_code = _state["isa_code"] if isa is None else _isa_code(isa)  # (can_read_in_place loaded the library)
    entry = _Prepared(weight_int8, weight_absmax, bias, float(threshold), fp_cols, fp_weight, isa_code)
    _prepared[id(weight_int8)] = entry
    return entry.args


def mixed_linear(x, weight_int8, weight_absmax, bias, threshold: float, fp_cols=None, fp_weight=None,
                 isa: str | None = None, cols_out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole LLM.int8() forward of one layer in one native call: out [..., N] in x's dtype.

    x: float32, float16 or bfloat16 CPU tensor [..., K] (converted to float32 and made row-contiguous
    if needed); the layer's tensors as :func:`can_read_in_place` accepts them (ValueError otherwise),
    read in place on every call, never copied (checked on the first call with these tensors). ``isa``:
    the micro-kernels (:func:`default_isa` if None). ``cols_out`` (int64, at least K + F elements), if
    given, receives the decomposed columns (found ones ascending, then fp_cols); their number is then
    returned beside out.
    """
    args = _layer_args(weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight, isa)
    n, k = args[2], args[3]
    shape, dt = x.shape, x.dtype
    xf = x if dt is _F32 else x.float()
    if len(shape) == 2:
        m = shape[0]
        if m > 1 and xf.stride(0) < k or k > 1 and xf.stride(1) != 1:
            xf = xf.contiguous()
        ldx = xf.stride(0) if m > 1 else k
        out = torch.empty(m, n)
    else:
        if not xf.is_contiguous():
            xf = xf.contiguous()
        m, ldx = xf.numel() // k, k
        out = torch.empty(*shape[:-1], n)
    nc = 0
    if m:
        nc = _state["fns"]["llm_int8_mixed_linear_f32"](
            *args, xf.data_ptr(), ldx, m, out.data_ptr(), None if cols_out is None else cols_out.data_ptr(),
            kernel_threads(),
        )
        if nc < 0:
            raise RuntimeError(f"native LLM.int8() forward failed with code {nc} (M={m}, N={n}, K={k})")
    out = out if dt is _F32 else out.to(dt)
    return out if cols_out is None else (out, nc)


# ---------------------------------------------------------------------------------------------
# Backward through the frozen weight: bfloat16 x int8 -> float32 (llm_int8_grad_bf16_s8, needs
# AVX-512 BF16, which llm_int8_cpu_features() reports as its own bit).


def grad_bf16_available() -> bool:
    """True when :func:`grad_bf16_s8` runs natively on this machine (AVX-512 BF16)."""
    return available() and bool(function("llm_int8_cpu_features")() & _FEATURE_AVX512_BF16)


def grad_bf16_s8(a: torch.Tensor, weight_int8: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] = a[:, :N] @ weight_int8, accumulated in float32 (vdpbf16ps).

    a: bfloat16 [M, N2], rows contiguous, N2 = N rounded up to even with the extra column zero;
    weight_int8: int8 [N, K] (rows may be strided). Call only when :func:`grad_bf16_available`.
    """
    n, k = weight_int8.shape
    m, n2 = a.shape
    if not grad_bf16_available() or a.dtype != torch.bfloat16 or weight_int8.dtype != torch.int8 or n2 != n + n % 2:
        raise ValueError(
            f"grad_bf16_s8 needs the native kernel, a bf16 [M, {n + n % 2}] and an int8 [N, K] weight; "
            f"got {a.dtype} {tuple(a.shape)} and {weight_int8.dtype} {tuple(weight_int8.shape)}"
        )
    if a.stride(1) != 1 or (m > 1 and a.stride(0) < n2):
        a = a.contiguous()
    w, ldw = _rows_operand(weight_int8)
    out = torch.empty((m, k), dtype=torch.float32)
    rc = function("llm_int8_grad_bf16_s8")(
        a.data_ptr(), a.stride(0) if m > 1 else n2, w.data_ptr(), ldw, out.data_ptr(), max(k, 1),
        m, n, k, kernel_threads(),
    )
    if rc != 0:
        raise MemoryError("the native backward kernel could not allocate its 32 KiB packing buffers")
    return out


# ---------------------------------------------------------------------------------------------
# Which threads run the kernels' parallel parts

_threads = threading.local()  # .count: the kernels' thread count while torch's own ops run on fewer


def kernel_threads() -> int:
    """Threads the kernels may use: ``torch.get_num_threads()``, or the count :func:`kernel_threads_kept`
    holds while torch's own ops are limited to fewer (a lean decoding step)."""
    return getattr(_threads, "count", None) or torch.get_num_threads()


class kernel_threads_kept:
    """Within this context the kernels keep ``count`` threads (default: torch's count on entry) while
    torch's own ops run on ``torch_threads``; both are restored on exit. Per Python thread for the
    kernels; torch's setting is process-wide."""

    def __init__(self, torch_threads: int = 1, count: int | None = None):
        self.torch_threads, self.count = torch_threads, count

    def __enter__(self):
        self._saved = (getattr(_threads, "count", None), torch.get_num_threads())
        _threads.count = self.count or kernel_threads()
        torch.set_num_threads(self.torch_threads)
        return self

    def __exit__(self, *exc):
        _threads.count, torch_threads = self._saved
        torch.set_num_threads(torch_threads)
        return False
