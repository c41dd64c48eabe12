"""One place chooses the kernel behind every ``llm_int8`` op.

* CPU tensors: ``cpu.py`` (registered for "cpu").
* CUDA tensors: the CUDA forward of ``cuda.py``, registered here at import when CUDA is available
  (:func:`register_cuda_kernels`). Its stages run on the Triton kernels (``llm_int8.triton``), each
  guarded by its torch-op counterpart: a Triton kernel that fails to compile or launch on the GPU at
  hand hands its stage to the torch ops, once, with a :class:`TritonFallbackWarning` that says why
  (:func:`guarded`; :func:`fallbacks` lists what fell back). Without a working Triton every stage
  runs on the torch ops. Either way the numbers are the reference's; only the speed differs.
* Anything else: ``reference.py``, registered for every device.

Callers never choose: they call ``torch.ops.llm_int8.*`` (or ``llm_int8.functional``) and the
dispatcher routes by device. :func:`require_gpu_path` is for code that wants the Triton path and
would rather fail loudly than run on the slower torch ops.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
import warnings
from typing import Callable

import torch

from . import cpu, cuda, reference  # noqa: F401  (importing cpu and reference registers their kernels)
from ._ops import register_kernels

TRITON_INSTALL_HINT = "pip install 'llm-int8[triton]'"
REPORT_HINT = "please report it with the output of scripts/gpu_check.sh"
# Longest part of an exception message quoted in a warning (compiler errors can run to pages).
REASON_MAX_CHARS = 400


class TritonFallbackWarning(RuntimeWarning):
    """A Triton kernel could not run here; its stage now runs on torch ops (same numbers, slower)."""


_cuda_backend: str | None = None  # "triton" or "torch" once registered
_cuda_kernels: dict[str, Callable] = {}  # op name -> the kernel registered for CUDA tensors
_triton_import_error: str | None = None
_fallbacks: dict[str, str] = {}  # guarded stage name -> why its Triton kernel was given up
_fallback_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# The guard


def fallbacks() -> dict[str, str]:
    """Stage name -> the failure that moved it from Triton to torch ops, for this process."""
    return dict(_fallbacks)


def _where(args) -> str:
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is None or tensor.device.type != "cuda":
        return f"{tensor.device if tensor is not None else 'an unknown device'} (Triton interpreter)"
    major, minor = torch.cuda.get_device_capability(tensor.device)
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "unknown"
    return (
        f"{torch.cuda.get_device_name(tensor.device)} (sm_{major}{minor}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, triton {triton_version})"
    )


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()).rstrip(".")
    if len(text) > REASON_MAX_CHARS:
        text = text[:REASON_MAX_CHARS] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _capturing(args) -> bool:
    return any(
        isinstance(a, torch.Tensor) and a.is_cuda for a in args
    ) and torch.cuda.is_current_stream_capturing()


def guarded(name: str, fast: Callable, safe: Callable, safe_label: str) -> Callable:
    """``fast`` (a Triton launcher) until it first raises; from then on ``safe`` (torch ops), for good.

    The first failure warns once (:class:`TritonFallbackWarning`: which kernel, which GPU, the error)
    and is recorded in :func:`fallbacks`; that call and every later one run ``safe``. Out-of-memory
    errors are not kernel failures and propagate. A failure while a CUDA graph is being captured
    propagates too (the capture is broken either way): run one forward pass before capturing, so
    that Triton compiles and tunes outside it.
    """

    def run(*args, **kwargs):
        if name not in _fallbacks:
            try:
                return fast(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:
                if _capturing(args):
                    raise RuntimeError(
                        f"the llm_int8 Triton kernel for {name} failed while a CUDA graph was being captured "
                        f"({_reason(err)}); run one forward pass before capturing (Triton compiles and tunes "
                        "kernels on first use), then capture"
                    ) from err
                _give_up(name, err, args, safe_label)
        return safe(*args, **kwargs)

    run.__name__ = run.__qualname__ = f"guarded_{name}"
    return run


def _give_up(name: str, err: Exception, args, safe_label: str) -> None:
    with _fallback_lock:
        if name in _fallbacks:
            return
        _fallbacks[name] = _reason(err)
    warnings.warn(
        f"llm_int8: the Triton kernel for {name} failed on {_where(args)}: {_fallbacks[name]}. From now on "
        f"{name} runs on {safe_label} in this process: the same numbers, more slowly; {REPORT_HINT}.",
        TritonFallbackWarning,
        stacklevel=3,
    )


def guarded_stages(kernels) -> cuda.Stages:
    """The CUDA forward's stages on the Triton launchers of ``kernels`` (``llm_int8.triton``), each
    guarded by its torch-op counterpart in ``cuda.py``.

    The fused GEMM falls back to ``torch._int_mm`` followed by the Triton epilogue kernel (itself
    guarded by the torch epilogue), so a GEMM that does not compile keeps a sync-free epilogue.
    """
    epilogue = guarded("dequant_epilogue", kernels.dequant_epilogue, cuda.dequant_epilogue, "torch ops")

    def int_mm_then_epilogue(a, b, x_absmax, w_absmax, bias=None, out_dtype=torch.float32, *, x=None, flags=None,
                             fp_cols=None, fp_weight=None):
        return epilogue(cuda.linear_matmul(a, b), x_absmax, w_absmax, bias, out_dtype, x=x, b=b, flags=flags,
                        fp_cols=fp_cols, fp_weight=fp_weight)

    def mm_dequant(acc, x_absmax, w_absmax, bias=None, out_dtype=None):
        return epilogue(acc, x_absmax, w_absmax, bias, out_dtype or torch.float32)

    return cuda.Stages(
        outlier_column_flags=guarded(
            "outlier_column_flags", kernels.outlier_column_flags, cuda.outlier_column_flags, "torch ops"
        ),
        quantize_rows=guarded("quantize_rows", kernels.quantize_rows, cuda.quantize_rows, "torch ops"),
        linear_dequant=guarded(
            "int8_linear_dequant", kernels.int8_linear_dequant, int_mm_then_epilogue,
            "torch._int_mm and the epilogue kernel",
        ),
        linear_matmul=guarded("int8_linear_matmul", kernels.int8_linear_matmul, cuda.linear_matmul, "torch._int_mm"),
        mm_dequant=mm_dequant,
    )


def op_kernels(stages: cuda.Stages) -> dict[str, Callable]:
    """The four ops' kernels on ``stages`` (op name -> kernel with the op's signature)."""

    def int8_vectorwise_quant(x, threshold=0.0):
        return cuda.vectorwise_quant(stages, x, threshold)

    def int8_mixed_linear(x, weight_int8, weight_absmax, bias=None, threshold=6.0, fp_cols=None, fp_weight=None):
        return cuda.mixed_linear(stages, x, weight_int8, weight_absmax, bias, threshold, fp_cols, fp_weight)

    return {
        "int8_vectorwise_quant": int8_vectorwise_quant,
        "int8_linear_matmul": stages.linear_matmul,
        "int8_mm_dequant": stages.mm_dequant,
        "int8_mixed_linear": int8_mixed_linear,
    }


def cuda_stages() -> tuple[str, cuda.Stages]:
    """("triton", guarded Triton stages) when ``llm_int8.triton`` imports, else ("torch", torch stages)."""
    global _triton_import_error
    try:
        from . import triton as triton_kernels  # the only import of the Triton kernels
    except Exception as err:  # not installed (ImportError), or an install that breaks on import
        _triton_import_error = _reason(err)
        return "torch", cuda.TORCH_STAGES
    return "triton", guarded_stages(triton_kernels)


# --------------------------------------------------------------------------------------------
# Registration


def gpu_path_unavailable_reason() -> str | None:
    """Why the Triton GPU path cannot run here, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return f"Triton is not installed ({TRITON_INSTALL_HINT}; it ships with PyTorch's CUDA wheels on Linux)"
    if not torch.cuda.is_available():
        return (
            f"PyTorch sees no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none: a CPU-only build'}); install a CUDA build of PyTorch and check the driver"
        )
    if _triton_import_error is not None:
        return f"importing llm_int8's Triton kernels failed: {_triton_import_error}"
    return None


def register_cuda_kernels() -> bool:
    """Register the CUDA kernels of the llm_int8 ops; True if their stages run on Triton.

    Idempotent. Without CUDA it registers nothing (CUDA tensors would run the reference kernels).
    Without a working Triton it registers the torch-op stages and warns once.
    """
    global _cuda_backend
    if _cuda_backend is None and torch.cuda.is_available():
        backend, stages = cuda_stages()
        _cuda_kernels.update(op_kernels(stages))
        register_kernels("cuda", _cuda_kernels)
        _cuda_backend = backend
        if backend == "torch":
            warnings.warn(
                f"llm_int8: {gpu_path_unavailable_reason()}. CUDA tensors run on torch ops (torch._int_mm): "
                "the same numbers, more slowly.",
                TritonFallbackWarning,
                stacklevel=2,
            )
    return _cuda_backend == "triton"


def registered_cuda_kernels() -> dict[str, Callable]:
    """Op name -> the kernel CUDA tensors run (what ``Linear8bitLt`` calls in eager inference); empty
    without CUDA."""
    register_cuda_kernels()
    return dict(_cuda_kernels)


def require_gpu_path() -> None:
    """Raise a RuntimeError saying what is missing unless the Triton CUDA kernels are registered."""
    if not register_cuda_kernels():
        raise RuntimeError(
            f"the llm_int8 GPU path is unavailable: {gpu_path_unavailable_reason()}. "
            "Without it, CUDA tensors would run on the slower torch ops."
        )



def kernel_backend(device: torch.device | str) -> str:
    """Which implementation serves tensors on ``device``: "cpu", "triton" (see :func:`fallbacks` for
    stages that fell back to torch ops), "torch" (CUDA without Triton) or "reference". The device check
    (``scripts/gpu_check.sh``) prints it."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda":
        register_cuda_kernels()
        return _cuda_backend or "reference"
    return "reference"


register_cuda_kernels()
