"""Build, cache and load the native CPU library (``csrc/*.c``); which threads run its parallel parts.

On CPUs without AVX-512 VNNI ``torch._int_mm`` is a slow scalar fallback, and on every CPU an
unfused ``_int_mm`` leaves the quantization and dequantization to a dozen torch ops, so we ship a
small C library (``csrc/llm_int8_cpu.h`` lists its files) and build it with the system C compiler the
first time it is needed:

* The shared library is cached per user in ``$LLM_INT8_CACHE_DIR`` (default
  ``$XDG_CACHE_HOME/llm_int8`` or ``~/.cache/llm_int8``), under a name that contains a hash of the
  C sources, the compiler command line and the compiler's version, so an edited source or another
  compiler gets its own build.
* The build writes to a temporary file in the cache directory and then ``os.replace``-s it into
  place, so concurrent processes never load a half-written library (at worst both compile).
* Loading is lazy and guarded by a lock.  Nothing here raises at import time: if the machine is
  not x86-64 Linux, has no AVX2, has no compiler, or the build fails, ``available()`` returns False
  and ``unavailable_reason()`` says why.  ``LLM_INT8_DISABLE_NATIVE=1`` turns the kernels off.

The library holds two micro-kernels, chosen per call: ``"avx2"`` (every AVX2 CPU) and
``"avx512_vnni"`` (CPUs with AVX-512 VNNI); :func:`isas` lists those this CPU runs and
:func:`default_isa` is the one the package uses.  Calls large enough for a second thread run on
torch's OpenMP threads, or on the library's own pool (:func:`set_thread_runner`; ``csrc/threads.c``
says when and why). The torch-facing wrappers are in :mod:`llm_int8._native`.
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
from pathlib import Path

import torch



_CSRC = Path(__file__).resolve().parent / "csrc"
#: The library's sources, compiled together (the header is hashed with them).
_SOURCES = sorted(_CSRC.glob("*.c"))
_HEADERS = sorted(_CSRC.glob("*.h"))
# -ffp-contract=off: a * b + c stays two roundings unless the source asks for an FMA (the fused
# forward matches the eager path's float32 operations bit for bit)
_CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-ffp-contract=off"]
#: Instruction-set names and the codes the C entry points take (bits of llm_int8_cpu_features()).
ISA_CODES = {"avx2": 1, "avx512_vnni": 2}

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
    name = f"llm_int8_cpu-{key.hexdigest()[:20]}.so"

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
            cmd = [cc, *_CFLAGS, "-o", tmp, *map(str, _SOURCES)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"compiling {' '.join(p.name for p in _SOURCES)} failed ({' '.join(cmd)}):\n{proc.stderr.strip()}"
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
    path = _build(cc, b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in (*_SOURCES, *_HEADERS)))
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
