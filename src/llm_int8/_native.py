"""Loader and wrappers for the native int8 kernels (``csrc/int8_gemm_avx2.c``).

On CPUs without AVX-512 VNNI ``torch._int_mm`` is a slow scalar fallback, and on every CPU an
unfused ``_int_mm`` leaves the quantization and dequantization to a dozen torch ops, so we ship a
small C library and build it with the system C compiler the first time it is needed:

* The shared library is cached per user in ``$LLM_INT8_CACHE_DIR`` (default
  ``$XDG_CACHE_HOME/llm_int8`` or ``~/.cache/llm_int8``), under a name that contains a hash of the
  C source, the compiler command line and the compiler's version, so an edited source or another
  compiler gets its own build.
* The build writes to a temporary file in the cache directory and then ``os.replace``-s it into
  place, so concurrent processes never load a half-written library (at worst both compile).
* Loading is lazy and guarded by a lock.  Nothing here raises at import time: if the machine is
  not x86-64 Linux, has no AVX2, has no compiler, or the build fails, ``available()`` returns False
  and ``unavailable_reason()`` says why.  ``LLM_INT8_DISABLE_NATIVE=1`` turns the kernels off.

The library holds two micro-kernels, chosen per call: ``"avx2"`` (every AVX2 CPU) and
``"avx512_vnni"`` (CPUs with AVX-512 VNNI); :func:`isas` lists those this CPU runs and
:func:`default_isa` is the one the package uses.  Calls large enough for a second thread run on
torch's OpenMP threads, or on the library's own pool (:func:`set_thread_runner`; the C header says
when and why).

The kernels are called through :mod:`ctypes`, which releases the GIL for the duration of a call.
Only the standard library and torch are imported.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import torch

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

_SOURCE = Path(__file__).resolve().parent / "csrc" / "int8_gemm_avx2.c"
# -ffp-contract=off: a * b + c stays two roundings unless the source asks for an FMA (the fused
# forward matches the eager path's float32 operations bit for bit)
_CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-ffp-contract=off"]
#: Instruction-set names and the codes the C entry points take (bits of llm_int8_cpu_features()).
ISA_CODES = {"avx2": 1, "avx512_vnni": 2}
_FP_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: Every exported function the loader binds: name -> (argument types, return type). A kernel added
#: to the C source adds its line here and is then reached through :func:`function`.
SYMBOLS = {
    "llm_int8_cpu_features": ([], _INT),
    # A, lda, B, ldb, C, ldc, M, N, K, threads, isa
    "llm_int8_gemm_nt_s8s8s32": ([_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT, _INT], _INT),
    # W, ldw, N, K, scb, bias (or NULL), bias dtype, threshold, fp_cols (or NULL), nfp, fpw (or NULL), fpw dtype,
    # isa, x, ldx, M, out, cols_out (or NULL), threads
    "llm_int8_mixed_linear_f32": ([_P, _I64, _I64, _I64, _P, _P, _INT, ctypes.c_float, _P, _I64, _P, _INT, _INT,
                                   _P, _I64, _I64, _P, _P, _INT], _I64),
    # A (bf16), lda, W (int8), ldw, C (float32), ldc, M, N, K, threads
    "llm_int8_grad_bf16_s8": ([_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT], _INT),
    "llm_int8_set_omp_runner": ([_P], None),
}
#: llm_int8_cpu_features() bit for AVX-512 BF16 (the backward kernel), beside ISA_CODES' bits.
_FEATURE_AVX512_BF16 = 4

#: Who runs the kernels' parallel parts (see set_thread_runner); LLM_INT8_THREADS overrides the default.
RUNNERS = ("torch", "own")
DEFAULT_RUNNER = "torch"

_lock = threading.Lock()
_state: dict = {"tried": False, "fns": None, "isas": (), "reason": None, "path": None, "runner": None,
                "isa": None, "isa_code": 0}


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
    """Build and load the library once; record its functions or the reason it is unavailable."""
    if _state["tried"]:
        return
    with _lock:
        if _state["tried"]:
            return
        try:
            _state["fns"], _state["isas"], _state["path"] = _try_load()
        except Exception as exc:  # noqa: BLE001 - any failure just means "not available"
            _state["reason"] = f"{type(exc).__name__}: {exc}"
        _state["tried"] = True


def _try_load():
    if os.environ.get("LLM_INT8_DISABLE_NATIVE", "").strip() not in ("", "0"):
        raise RuntimeError("disabled by LLM_INT8_DISABLE_NATIVE")
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        raise RuntimeError(f"needs Linux on an x86-64 CPU with AVX2, this is {sys.platform} on {platform.machine()!r}")
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        # torch probes the CPU too; "DEFAULT" means no AVX2 (or ATEN_CPU_CAPABILITY forced it).
        raise RuntimeError(f"CPU capability is {cap!r}, the kernel needs AVX2")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (gcc/cc, or $CC)")
    path = _build(cc, _SOURCE.read_bytes())
    lib = ctypes.CDLL(str(path))
    fns = {}
    for name, (argtypes, restype) in SYMBOLS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        fns[name] = fn
    features = fns["llm_int8_cpu_features"]()  # authoritative: cpuid via __builtin_cpu_supports
    isas = tuple(name for name, code in ISA_CODES.items() if features & code)
    if "avx2" not in isas:
        raise RuntimeError("the CPU does not support AVX2, F16C and FMA")
    runner = os.environ.get("LLM_INT8_THREADS", DEFAULT_RUNNER).strip() or DEFAULT_RUNNER
    if runner not in RUNNERS:  # a typo must not turn the kernels off: say so, use the default
        warnings.warn(f"LLM_INT8_THREADS must be one of {', '.join(RUNNERS)}, got {runner!r}; "
                      f"using {DEFAULT_RUNNER!r}", RuntimeWarning, stacklevel=2)
        runner = DEFAULT_RUNNER
    _use_runner(fns["llm_int8_set_omp_runner"], runner)
    best = "avx512_vnni" if "avx512_vnni" in isas else "avx2"
    isa = os.environ.get("LLM_INT8_ISA", "").strip() or best
    if isa not in isas:  # e.g. avx512_vnni asked for on an AVX2-only CPU: say so, run what the CPU has
        warnings.warn(f"LLM_INT8_ISA must be one of this CPU's micro-kernels {', '.join(isas)}, got {isa!r}; "
                      f"using {best!r}", RuntimeWarning, stacklevel=2)
        isa = best
    _state["isa"], _state["isa_code"] = isa, ISA_CODES[isa]
    return fns, isas, path


def available() -> bool:
    """True if the native kernels could be built and loaded on this machine (builds them if needed)."""
    _load()
    return _state["fns"] is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when the kernels are available)."""
    _load()
    return _state["reason"]


def library_path() -> str | None:
    """Path of the loaded shared library, or None."""
    _load()
    return None if _state["path"] is None else str(_state["path"])


def isas() -> tuple[str, ...]:
    """The micro-kernels this CPU runs, e.g. ``("avx2", "avx512_vnni")``; empty when unavailable."""
    _load()
    return _state["isas"]


def default_isa() -> str | None:
    """The micro-kernel the package uses: AVX-512 VNNI where the CPU has it (on Zen 4 it measured
    1.5-2.9x faster than the AVX2 kernel, see the README), else AVX2; ``LLM_INT8_ISA=avx2``, read when
    the library loads, forces the AVX2 one (to measure what an AVX2-only CPU runs). None when
    unavailable."""
    _load()
    return _state["isa"]


def function(name: str):
    """The bound ctypes function ``name`` of :data:`SYMBOLS`; RuntimeError when unavailable."""
    fns = _state["fns"]
    if fns is None:
        _load()
        fns = _state["fns"]
        if fns is None:
            raise RuntimeError(f"native int8 kernels unavailable: {_state['reason']}")
    return fns[name]


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



def _torch_gomp_parallel() -> int | None:
    """Address of GOMP_parallel in the OpenMP runtime torch runs on (its libgomp), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = set(re.findall(r"(/\S*/libgomp[^/\s]*\.so[^/\s]*)", f.read()))
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    ours = [p for p in paths if p.startswith(torch_dir)] or sorted(paths)
    if not ours or not torch.backends.openmp.is_available():
        return None
    lib = ctypes.CDLL(ours[0])  # already loaded: the same runtime and thread pool as torch's
    return ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value


def set_thread_runner(runner: str) -> str:
    """"torch": the kernels' threads are torch's OpenMP threads (when torch runs on libgomp);
    "own": the library's pool. Returns the runner in effect."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    return _use_runner(function("llm_int8_set_omp_runner"), runner)


def _use_runner(set_omp_runner, runner: str) -> str:
    address = _torch_gomp_parallel() if runner == "torch" else None
    set_omp_runner(address)
    _state["runner"] = "torch" if address else "own"
    return _state["runner"]


def thread_runner() -> str | None:
    """The runner in effect ("torch" or "own"), None when the kernels are unavailable."""
    _load()
    return _state["runner"] if _state["fns"] is not None else None
