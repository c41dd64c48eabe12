"""One place chooses the kernel behind every ``llm_int8`` op.

* CPU tensors: ``cpu.py`` (registered for "cpu").
* CUDA tensors: the Triton kernels in ``llm_int8.triton`` when Triton is installed and CUDA is
  available; registered here, at import, by :func:`register_cuda_kernels`.
* Anything else (or CUDA without Triton): ``reference.py``, registered for every device.

Callers never choose: they call ``torch.ops.llm_int8.*`` (or ``llm_int8.functional``) and the
dispatcher routes by device. :func:`require_gpu_path` is for code that wants the fast GPU path and
would rather fail loudly than fall back to the slow reference.
"""

from __future__ import annotations

import importlib.util

import torch

from . import cpu, reference  # noqa: F401  (importing them registers their kernels)
from ._ops import NAMESPACE

TRITON_INSTALL_HINT = "pip install 'llm-int8[triton]'"

_cuda_registered = False


def gpu_path_unavailable_reason() -> str | None:
    """Why the Triton GPU path cannot run here, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return f"Triton is not installed ({TRITON_INSTALL_HINT}; it ships with PyTorch's CUDA wheels on Linux)"
    if not torch.cuda.is_available():
        return (
            f"PyTorch sees no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none: a CPU-only build'}); install a CUDA build of PyTorch and check the driver"
        )
    return None


def register_cuda_kernels() -> bool:
    """Register the Triton launchers as the "cuda" kernels of the llm_int8 ops; True if they are.

    Idempotent. Returns False, registering nothing, when :func:`gpu_path_unavailable_reason` says
    why not; CUDA tensors then run the reference kernels.
    """
    global _cuda_registered
    if _cuda_registered:
        return True
    if gpu_path_unavailable_reason() is not None:
        return False
    from .triton import KERNELS  # the only import of the Triton kernels

    for name, kernel in KERNELS.items():
        torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda", kernel)
    _cuda_registered = True
    return True


def require_gpu_path() -> None:
    """Raise a RuntimeError saying what is missing unless the Triton CUDA kernels are registered."""
    if not register_cuda_kernels():
        raise RuntimeError(
            f"the llm_int8 GPU path is unavailable: {gpu_path_unavailable_reason()}. "
            "Without it, CUDA tensors would run the slow pure-torch reference kernels."
        )


def kernel_backend(device: torch.device | str) -> str:
    """Which implementation serves tensors on ``device``: "triton", "cpu" or "reference"."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda" and register_cuda_kernels():
        return "triton"
    return "reference"


register_cuda_kernels()
