"""``dispatch.py``: which kernel serves each device, and what it says when the GPU path is missing. (The
per-stage guard around the Triton kernels is exercised with those kernels, in ``test_triton_kernels.py``.)"""

from __future__ import annotations

import pytest
import torch

from llm_int8 import cuda, dispatch

ON_GPU = torch.cuda.is_available()


def test_dispatch_routes_by_device_and_explains_a_missing_gpu_path(monkeypatch):
    assert dispatch.kernel_backend("cpu") == "cpu"
    if ON_GPU:
        assert dispatch.kernel_backend("cuda") == "triton"
        dispatch.require_gpu_path()
    else:
        assert dispatch.kernel_backend("cuda") == "reference" and dispatch.registered_cuda_kernels() == {}
        with pytest.raises(RuntimeError, match="GPU path is unavailable: PyTorch sees no CUDA device"):
            dispatch.require_gpu_path()
    monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name: None)
    assert "pip install 'llm-int8[triton]'" in dispatch.gpu_path_unavailable_reason()


def test_without_triton_the_cuda_path_runs_on_torch_ops(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 1 and name == "" and "triton" in (fromlist or ()):
            raise ImportError("No module named 'triton'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    monkeypatch.setattr(dispatch, "_triton_import_error", None)
    backend, stages = dispatch.cuda_stages()
    assert backend == "torch" and stages is cuda.TORCH_STAGES
    assert "ImportError: No module named 'triton'" in dispatch._triton_import_error
