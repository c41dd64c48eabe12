"""Loader and wrapper for the native AVX2 int8 GEMM (``csrc/int8_gemm_avx2.c``).

On this project's CPUs ``torch._int_mm`` is a slow scalar fallback, so we ship a small C kernel
and build it with the system C compiler the first time it is needed:

* The shared library is cached per user in ``$LLM_INT8_CACHE_DIR`` (default
  ``$XDG_CACHE_HOME/llm_int8`` or ``~/.cache/llm_int8``), under a name that contains a hash of the
  C source, the compiler command line and the compiler's version, so an edited source or another
  compiler gets its own build.
* The build writes to a temporary file in the cache directory and then ``os.replace``-s it into
  place, so concurrent processes never load a half-written library (at worst both compile).
* Loading is lazy and guarded by a lock.  Nothing here raises at import time: if the machine is
  not x86-64, has no AVX2, has no compiler, or the build fails, ``available()`` returns False and
  ``unavailable_reason()`` says why.  ``LLM_INT8_DISABLE_NATIVE=1`` turns the kernel off.

The kernel is called through :mod:`ctypes`, which releases the GIL for the duration of the call.
Only the standard library and torch are imported.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "unavailable_reason", "int8_gemm_nt", "mixed_linear_f32", "library_path", "MAX_K"]

#: Largest K for which the int32 result is exact for codes in [-127, 127]:
#: 127 * 127 * K must not exceed 2**31 - 1.
MAX_K = (2**31 - 1) // (127 * 127)  # 133144

_SOURCE = Path(__file__).resolve().parent / "csrc" / "int8_gemm_avx2.c"
_CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fvisibility=hidden"]
_SYMBOL = "llm_int8_gemm_nt_s8s8s32"
_MIXED_SYMBOL = "llm_int8_mixed_linear_f32"
_FP_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Most decomposed columns the fused epilogue multiplies itself; with more, the caller does.
MAX_FUSED_COLS = 64

_lock = threading.Lock()
_state: dict = {"tried": False, "fn": None, "mixed": None, "reason": None, "path": None}


def _cache_dir() -> Path:
    env = os.environ.get("LLM_INT8_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm_int8"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    for name in ("gcc", "cc"):
        if shutil.which(name):
            return name
    return None


def _compiler_version(cc: str) -> str:
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
        return proc.stdout.splitlines()[0] if proc.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, source: bytes) -> Path:
    """Compile the kernel (or reuse a cached build); return the library path. Raises on failure."""
    key = hashlib.sha256()
    for part in (source, " ".join([cc, *_CFLAGS]).encode(), _compiler_version(cc).encode(),
                 platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    name = f"int8_gemm_avx2-{key.hexdigest()[:20]}.so"

    dirs = [_cache_dir()]
    # Fall back to a private temporary directory if the cache directory is not writable.
    last_err: Exception | None = None
    for attempt in range(2):
        if attempt == 1:
            dirs.append(Path(tempfile.mkdtemp(prefix="llm_int8_")))
        d = dirs[-1]
        target = d / name
        if target.is_file():
            return target
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=d)
            os.close(fd)
        except OSError as exc:
            last_err = exc
            continue
        try:
            cmd = [cc, *_CFLAGS, "-o", tmp, str(_SOURCE)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr.strip()}"
                )
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)  # atomic: other processes see no file or the whole file
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable directory to build the native kernel in: {last_err}")


def _load() -> None:
    """Build and load the library once; record the function or the reason it is unavailable."""
    if _state["tried"]:
        return
    with _lock:
        if _state["tried"]:
            return
        try:
            _state["fn"], _state["mixed"], _state["path"] = _try_load()
        except Exception as exc:  # noqa: BLE001 - any failure just means "not available"
            _state["reason"] = f"{type(exc).__name__}: {exc}"
        _state["tried"] = True


def _try_load():
    if os.environ.get("LLM_INT8_DISABLE_NATIVE", "").strip() not in ("", "0"):
        raise RuntimeError("disabled by LLM_INT8_DISABLE_NATIVE")
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise RuntimeError(f"needs an x86-64 CPU with AVX2, this is {platform.machine()!r}")
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        # torch probes the CPU too; "DEFAULT" means no AVX2 (or ATEN_CPU_CAPABILITY forced it).
        raise RuntimeError(f"CPU capability is {cap!r}, the kernel needs AVX2")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (gcc/cc, or $CC)")
    path = _build(cc, _SOURCE.read_bytes())
    lib = ctypes.CDLL(str(path))
    if not lib.llm_int8_cpu_has_avx2():  # authoritative check: cpuid via __builtin_cpu_supports
        raise RuntimeError("the CPU does not support AVX2")
    fn = getattr(lib, _SYMBOL)
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int64,  # A, lda
        ctypes.c_void_p, ctypes.c_int64,  # B, ldb
        ctypes.c_void_p, ctypes.c_int64,  # C, ldc
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # M, N, K
        ctypes.c_int,  # threads
    ]
    fn.restype = ctypes.c_int
    mixed = getattr(lib, _MIXED_SYMBOL)
    p = ctypes.c_void_p
    mixed.argtypes = [p, p, ctypes.c_int64, ctypes.c_int64, p, p, ctypes.c_int]  # layer, x, ldx, M, out, cols, threads
    mixed.restype = ctypes.c_int64
    return fn, mixed, path


def available() -> bool:
    """True if the native kernel could be built and loaded on this machine (builds it if needed)."""
    _load()
    return _state["fn"] is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when the kernel is available)."""
    _load()
    return _state["reason"]


def library_path() -> str | None:
    """Path of the loaded shared library, or None."""
    _load()
    return None if _state["path"] is None else str(_state["path"])


def _rows_operand(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A tensor whose rows are K-contiguous, and its row stride (copies only if needed)."""
    rows, k = t.shape
    if t.is_contiguous():
        return t, max(k, 1)
    if k > 1 and t.stride(1) != 1:
        t = t.contiguous()
    if rows <= 1:
        return t, max(k, 1)
    return t, t.stride(0)


def int8_gemm_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` [M, K] and ``b`` [N, K]; returns int32 [M, N].

    Both operands keep K as the last dimension (``b`` is e.g. an ``nn.Linear``-style weight).
    Inputs whose last dimension is not contiguous are copied; rows may be strided.

    Contract:

    * Codes must lie in **[-127, 127]**.  -128 is not supported (the AVX2 sign trick negates
      values, and -(-128) does not fit int8): it can give a wrong result, and it is not checked,
      because checking would cost a full pass over the weight.
    * The result is exact (equal to the int64 computation) for ``K <= MAX_K`` (133144), since
      ``127 * 127 * K`` then fits in int32; a larger K raises ValueError.
    * Uses ``torch.get_num_threads()`` threads; the GIL is released during the call.

    ``out``, if given, must be a CPU int32 tensor of shape [M, N] whose last dimension is
    contiguous; it is overwritten and returned.  Raises RuntimeError if the native kernel is
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

    fn = _state["fn"] if _state["tried"] else None
    if fn is None:
        _load()
        fn = _state["fn"]
        if fn is None:
            raise RuntimeError(f"native int8 GEMM unavailable: {_state['reason']}")

    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()

    a_, lda = _rows_operand(a)
    b_, ldb = _rows_operand(b)
    ldc = out.stride(0) if m > 1 else n
    rc = fn(a_.data_ptr(), lda, b_.data_ptr(), ldb, out.data_ptr(), ldc, m, n, k,
            max(1, torch.get_num_threads()))
    if rc != 0:
        raise RuntimeError(f"native int8 GEMM failed with code {rc} (M={m}, N={n}, K={k})")
    return out


class _Layer(ctypes.Structure):
    """``llm_int8_layer`` of the C source: one layer's weight side, bound once."""

    _fields_ = [
        ("W", ctypes.c_void_p), ("ldw", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
        ("scb", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("threshold", ctypes.c_float),
        ("fp_cols", ctypes.c_void_p), ("nfp", ctypes.c_int64), ("fpw", ctypes.c_void_p),
        ("fpw_dtype", ctypes.c_int), ("max_cols", ctypes.c_int),
    ]


class _Scratch(threading.local):
    """Per thread: the int64 buffer the kernel writes the decomposed columns to, and its address."""

    cols = None
    ptr = capacity = 0

    def grow(self, size: int) -> int:
        self.cols = torch.empty(max(size, 8192), dtype=torch.int64)
        self.ptr, self.capacity = self.cols.data_ptr(), self.cols.numel()
        return self.ptr


_scratch = _Scratch()


class MixedLinear:
    """The fused LLM.int8() forward (``llm_int8_mixed_linear_f32``) bound to one layer's tensors.

    The tensors are read in place on every call, never copied, so in-place updates are seen; a
    module rebinds when it holds other tensors (see ``Linear8bitLt``). Binding checks the layout
    once, so a call costs one ctypes call and the output's allocation:

    weight_int8 [N, K] (rows K-contiguous); weight_absmax float32 [N] and bias float32 [N] or None,
    contiguous; fp_cols int64 [F] contiguous with fp_weight [N, F] contiguous (float32, float16 or
    bfloat16), or both None. N, K > 0 and K <= MAX_K. Raises ValueError otherwise.
    """

    __slots__ = ("tensors", "n", "k", "nfp", "_layer", "_addr", "_fn")

    def __init__(self, weight_int8, weight_absmax, bias, threshold: float, fp_cols=None, fp_weight=None):
        fn = _state["mixed"]
        if fn is None:
            _load()
            fn = _state["mixed"]
            if fn is None:
                raise RuntimeError(f"native int8 kernels unavailable: {_state['reason']}")
        n, k = weight_int8.shape
        if weight_int8.dtype != torch.int8 or n == 0 or not 0 < k <= MAX_K or (k > 1 and weight_int8.stride(1) != 1):
            raise ValueError(f"weight must be int8 [N, K] with K-contiguous rows, 0 < K <= {MAX_K}, got "
                             f"{weight_int8.dtype} {tuple(weight_int8.shape)} strides {weight_int8.stride()}")
        for name, t in (("weight_absmax", weight_absmax), ("bias", bias)):
            if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (n,) or not t.is_contiguous()):
                raise ValueError(f"{name} must be contiguous float32 [{n}], got {t.dtype} {tuple(t.shape)}")
        if (fp_cols is None) != (fp_weight is None):
            raise ValueError("fp_cols and fp_weight go together")
        nfp = 0 if fp_cols is None else fp_cols.numel()
        if nfp and (fp_cols.dtype != torch.int64 or not fp_cols.is_contiguous() or fp_weight.dtype not in _FP_DTYPE_CODES
                    or tuple(fp_weight.shape) != (n, nfp) or not fp_weight.is_contiguous()):
            raise ValueError(f"fp_cols must be contiguous int64 [F] and fp_weight contiguous float [{n}, F], got "
                             f"{fp_cols.dtype} {tuple(fp_cols.shape)} and {fp_weight.dtype} {tuple(fp_weight.shape)}")
        self.tensors = (weight_int8, weight_absmax, bias, fp_cols, fp_weight)  # kept alive while bound
        self.n, self.k, self.nfp, self._fn = n, k, nfp, fn
        self._layer = _Layer(
            weight_int8.data_ptr(), weight_int8.stride(0) if n > 1 else k, n, k, weight_absmax.data_ptr(),
            None if bias is None else bias.data_ptr(), threshold, fp_cols.data_ptr() if nfp else None, nfp,
            fp_weight.data_ptr() if nfp else None, _FP_DTYPE_CODES[fp_weight.dtype] if nfp else 0, MAX_FUSED_COLS,
        )
        self._addr = ctypes.addressof(self._layer)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x float32 [M, K] with K-contiguous rows, or [..., K] contiguous; M > 0 rows in all.

        Returns (out float32 [..., N], number of decomposed columns). With more than
        MAX_FUSED_COLS of them, out holds the int8 part only (see :func:`mixed_linear_f32`).
        """
        shape, n, k = x.shape, self.n, self.k
        if len(shape) == 2:
            m = shape[0]
            ldx = x.stride(0) if m > 1 else k
            out = torch.empty(m, n)
        else:
            if not x.is_contiguous():
                raise ValueError("an N-D x must be contiguous; pass [M, K] rows for strided input")
            m, ldx = x.numel() // k, k
            out = torch.empty(shape[0], shape[1], n) if len(shape) == 3 else torch.empty(*shape[:-1], n)
        scratch = _scratch
        cols = scratch.ptr if scratch.capacity >= k + self.nfp else scratch.grow(k + self.nfp)
        nc = self._fn(self._addr, x.data_ptr(), ldx, m, out.data_ptr(), cols, torch.get_num_threads())
        if nc < 0:
            raise RuntimeError(f"native LLM.int8() forward failed with code {nc} (M={m}, N={n}, K={k})")
        return out, nc

    def last_columns(self, nc: int) -> torch.Tensor:
        """The decomposed columns of this thread's last call (found ones ascending, then fp_cols)."""
        return _scratch.cols[:nc].clone()


def mixed_linear_f32(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_absmax: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    fp_cols: torch.Tensor | None = None,
    fp_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The LLM.int8() forward in one native call: quantization, int8 GEMM and dequantization fused.

    x float32 [M, K] (rows may be strided, K contiguous), M > 0; the layer's tensors as
    :class:`MixedLinear` takes them.

    Returns ``(out, cols, complete)``: out float32 [M, N]; cols the decomposed columns (those found
    at run time, ascending, then fp_cols). When ``complete`` is False (more than MAX_FUSED_COLS
    columns), out holds only the int8 part and the caller must add ``x[:, cols] @ w_cols.T`` and the
    bias. Same codes and int32 sums as the eager path; see ``csrc/int8_gemm_avx2.c``.
    """
    layer = MixedLinear(weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)
    x_, _ = _rows_operand(x)
    out, nc = layer(x_)
    return out, layer.last_columns(nc), nc <= MAX_FUSED_COLS


# ---------------------------------------------------------------------------------------------
# Backward through the frozen weight: bfloat16 x int8 -> float32 (llm_int8_grad_bf16_s8, needs
# AVX-512 BF16). Self-contained: it only asks the loader above for the library's path.

_GRAD_SYMBOL = "llm_int8_grad_bf16_s8"
_grad_lock = threading.Lock()
_grad_state: dict = {"tried": False, "fn": None}


def _grad_fn():
    """The library's ``llm_int8_grad_bf16_s8``, or None (no native library, or a CPU without AVX-512 BF16)."""
    if not _grad_state["tried"]:
        path = library_path()  # builds and loads the library (under the loader's own lock)
        with _grad_lock:
            if not _grad_state["tried"]:
                fn = None
                if path is not None:
                    lib = ctypes.CDLL(path)
                    if lib.llm_int8_cpu_has_avx512bf16():
                        fn = getattr(lib, _GRAD_SYMBOL)
                        p, i64 = ctypes.c_void_p, ctypes.c_int64
                        # A, lda, W, ldw, C, ldc, M, N, K, threads
                        fn.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, ctypes.c_int]
                        fn.restype = ctypes.c_int
                _grad_state["fn"] = fn
                _grad_state["tried"] = True
    return _grad_state["fn"]


def grad_bf16_available() -> bool:
    """True when :func:`grad_bf16_s8` runs natively on this machine (AVX-512 BF16)."""
    return _grad_fn() is not None


def grad_bf16_s8(a: torch.Tensor, weight_int8: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] = a[:, :N] @ weight_int8, accumulated in float32 (vdpbf16ps).

    a: bfloat16 [M, N2], rows contiguous, N2 = N rounded up to even with the extra column zero;
    weight_int8: int8 [N, K] (rows may be strided). Call only when :func:`grad_bf16_available`.
    """
    fn = _grad_fn()
    n, k = weight_int8.shape
    m, n2 = a.shape
    if fn is None or a.dtype != torch.bfloat16 or weight_int8.dtype != torch.int8 or n2 != n + n % 2:
        raise ValueError(
            f"grad_bf16_s8 needs the native kernel, a bf16 [M, {n + n % 2}] and an int8 [N, K] weight; "
            f"got {a.dtype} {tuple(a.shape)} and {weight_int8.dtype} {tuple(weight_int8.shape)}"
        )
    if a.stride(1) != 1 or (m > 1 and a.stride(0) < n2):
        a = a.contiguous()
    w, ldw = _rows_operand(weight_int8)
    out = torch.empty((m, k), dtype=torch.float32)
    rc = fn(a.data_ptr(), a.stride(0) if m > 1 else n2, w.data_ptr(), ldw, out.data_ptr(), max(k, 1),
            m, n, k, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the native backward kernel could not allocate its 32 KiB packing buffer")
    return out
