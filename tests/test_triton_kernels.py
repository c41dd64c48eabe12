"""The CUDA path's stages against the pure-torch reference: the Triton kernels (``llm_int8.triton``),
their torch-op counterparts (``llm_int8.cuda``), and the guard that falls back from one to the other.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors: ``TRITON_INTERPRET`` is
read when a kernel is decorated, so it is set here before ``llm_int8.triton`` is first imported (nothing
imports it earlier on a machine without CUDA; importing torch or triton first does not matter). On a
CUDA machine the same tests run the compiled kernels on the GPU. Without a GPU, the kernels are also
compiled for Hopper (sm_90) with the local Triton, which catches what the interpreter cannot
(``test_kernels_compile_for_hopper``).

int8 codes, row absmax, outlier columns and int32 accumulators must equal the reference exactly;
float outputs may differ only by the order of float32 additions and one final rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="Triton is not installed (pip install 'llm-int8[triton]')")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import llm_int8.triton as triton_kernels  # noqa: E402
from llm_int8 import cuda, dispatch, reference  # noqa: E402
from llm_int8.triton import int8_matmul, quant  # noqa: E402

# The Triton kernels run here (compiled or interpreted): a GPU test as far as `pytest -m gpu` goes.
pytestmark = pytest.mark.gpu

DEVICE = "cuda" if ON_GPU else "cpu"
# Triton's own helpers (tl.zeros, tl.sum, ...) are decorated when triton is first imported. If another
# test module imported it first (bitsandbytes does) without the interpreter, the kernels cannot run in
# this process: the tests then run in a fresh one (test_triton_kernels_in_a_fresh_process).
IN_PROCESS = ON_GPU or isinstance(tl.zeros, InterpretedFunction)
FRESH_PROCESS_TIMEOUT_S = 600


@pytest.fixture(autouse=True)
def _kernels_runnable_here(request):
    if not IN_PROCESS and request.node.originalname != "test_triton_kernels_in_a_fresh_process":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 before this module; run in a fresh process")


@pytest.fixture
def no_fallbacks_yet(monkeypatch):
    """A fresh record of Triton fallbacks for one test (the real one is per process)."""
    monkeypatch.setattr(dispatch, "_fallbacks", {})


@pytest.mark.slow
@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_triton_kernels_in_a_fresh_process():
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=repo, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=FRESH_PROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS32 = torch.finfo(torch.float32).eps
# (M, K): one row, sizes that are not multiples of the interpreter's 16/32 blocks, several K blocks.
QUANT_SHAPES = [(1, 33), (17, 64), (33, 130)]
# (M, K, N)
GEMM_SHAPES = [(1, 1, 1), (1, 33, 17), (5, 64, 130), (17, 130, 33), (64, 5, 64)]
OUTLIER_COLS = (2, 4)  # columns given values beyond the threshold
# Who runs the stages: the Triton kernels alone, or the torch ops of the safe path alone.
STAGE_SETS = {"triton": triton_kernels.STAGES, "torch": cuda.TORCH_STAGES}


def _x_with_outliers(m, k, dtype, seed):
    """x [M, K] ~ N(0, 1.5^2) in dtype, with columns OUTLIER_COLS (where they exist) holding 9 and -20."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 1.5
    for i, col in enumerate(c for c in OUTLIER_COLS if c < k):
        x[(i * 7) % m, col] = 9.0 if i % 2 == 0 else -20.0
    return x.to(dtype)


def _int8(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


def _on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _assert_close_to_reference(out, ref, magnitude, n_float_terms):
    """|out - ref| <= one rounding of the output dtype + (terms + 4) float32 roundings of the magnitude.

    ``magnitude`` bounds the sum of absolute values entering each output (|x| @ |W|.T + |bias|); the
    float32 parts of kernel and reference differ only in the order of their additions.
    """
    out = out.cpu().float()
    ref_f = ref.float()
    bound = torch.finfo(ref.dtype).eps * ref_f.abs() + (n_float_terms + 4) * EPS32 * magnitude
    bound += torch.finfo(ref.dtype).tiny
    err = (out - ref_f).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} exceeds its bound at {(err - bound).argmax().item()}"


def _flags(x, threshold, stages):
    flags = torch.zeros(x.shape[1], dtype=torch.int32, device=x.device)
    return stages.outlier_column_flags(x, threshold, flags)


# --------------------------------------------------------------------------------------------
# Quantization


@pytest.mark.parametrize("stages", STAGE_SETS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_vectorwise_quant_matches_reference_exactly(stages, dtype, shape, threshold):
    x = _x_with_outliers(*shape, dtype, seed=shape[0] * 1000 + shape[1])
    codes, absmax, cols = cuda.vectorwise_quant(STAGE_SETS[stages], *_on_device(x), threshold)
    ref_codes, ref_absmax, ref_cols = reference.int8_vectorwise_quant(x, threshold)
    if threshold > 0:
        assert ref_cols.numel() >= 1, "the test input must hold outliers"
    assert codes.dtype == torch.int8 and absmax.dtype == torch.float32 and cols.dtype == torch.int64
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(absmax.cpu(), ref_absmax)
    assert torch.equal(cols.cpu(), ref_cols)


# Under the interpreter both branches of tl.where are evaluated in numpy, so 1 / 0 warns there.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("stages", STAGE_SETS)
def test_vectorwise_quant_rounds_ties_to_even_and_handles_nonfinite_rows(stages):
    # Row 0 has absmax 127, so the scale is exactly 1 and x.5 values are ties.
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.25, 0.0])
    x = torch.stack([
        ties,
        torch.zeros(8),                                            # all zero: absmax 0, codes 0
        torch.tensor([1.0, float("nan"), 2.0, 0, 0, 0, 0, 0]),     # NaN: absmax NaN, codes 0
        torch.tensor([1.0, float("inf"), 2.0, 0, 0, 0, 0, 0]),     # Inf at threshold 0: codes 0
    ])
    codes, absmax, _ = cuda.vectorwise_quant(STAGE_SETS[stages], *_on_device(x), 0.0)
    ref_codes, ref_absmax, _ = reference.int8_vectorwise_quant(x, 0.0)
    assert codes[0].tolist() == [127, 0, 2, 2, 0, -2, 3, 0]
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(absmax.cpu(), ref_absmax, rtol=0, atol=0, equal_nan=True)
    assert absmax[2].isnan() and absmax[3].isinf()


@pytest.mark.parametrize("stages", STAGE_SETS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
def test_mixed_row_quant_leaves_flagged_columns_out(stages, dtype, shape):
    # The mixed forward's quantizer: flagged columns leave the row absmax whole and are coded 0.
    x = _x_with_outliers(*shape, dtype, seed=7 + shape[1])
    flags = _flags(*_on_device(x), 6.0, STAGE_SETS[stages])
    found = reference.outlier_columns(x.float(), 6.0)
    assert torch.equal(flags.cpu().nonzero().view(-1), found)
    codes, absmax = STAGE_SETS[stages].quantize_rows(*_on_device(x), flags, exclude_flagged=True)
    ref_codes, ref_absmax, _ = reference.int8_vectorwise_quant(x.float().index_fill(1, found, 0.0), 0.0)
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(absmax.cpu(), ref_absmax)


@pytest.mark.parametrize("stages", STAGE_SETS)
def test_outlier_flags_never_lower_a_calibrated_flag_and_ignore_nan(stages):
    x = torch.tensor([[1.0, 7.0, float("nan"), -30.0], [float("nan"), 0.5, 2.0, 1.0]])
    flags = torch.tensor([cuda.CALIBRATED_COLUMN, 0, 0, cuda.CALIBRATED_COLUMN], dtype=torch.int32)
    flags = STAGE_SETS[stages].outlier_column_flags(*_on_device(x), 6.0, *_on_device(flags))
    assert flags.cpu().tolist() == [cuda.CALIBRATED_COLUMN, cuda.RUNTIME_OUTLIER, 0, cuda.CALIBRATED_COLUMN]


@pytest.mark.parametrize("k", [1, 130, 2500])
def test_triton_compact_columns_lists_flagged_columns_in_order(k):
    gen = torch.Generator().manual_seed(k)
    flags = torch.randint(0, 3, (k,), generator=gen, dtype=torch.int32)
    cols, count = quant.compact_columns(*_on_device(flags), cuda.RUNTIME_OUTLIER)
    expected = (flags == cuda.RUNTIME_OUTLIER).nonzero().view(-1)
    assert count.item() == expected.numel()
    assert torch.equal(cols.cpu()[: count.item()], expected)


# --------------------------------------------------------------------------------------------
# int8 GEMM and dequantization


@pytest.mark.parametrize("stages", STAGE_SETS)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_int8_matmul_int32_accumulator_is_exact(stages, shape):
    m, k, n = shape
    a, b = _int8((m, k), seed=m + k), _int8((n, k), seed=n * k)
    acc = STAGE_SETS[stages].linear_matmul(*_on_device(a, b))
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.cpu(), reference.int8_linear_matmul(a, b))


@pytest.mark.parametrize("stages", STAGE_SETS)
def test_int8_matmul_extreme_codes_and_strided_inputs(stages):
    # All codes -127: every product is 127**2, the largest partial sums; b is a transposed view.
    m, k, n = 17, 130, 33
    a = torch.full((m, k), -127, dtype=torch.int8)
    b = _int8((k, n), seed=3).T
    a_dev, b_dev = _on_device(a, b)
    b_dev = b_dev if ON_GPU else b  # keep the transposed strides on the CPU
    matmul = STAGE_SETS[stages].linear_matmul
    acc = matmul(a_dev, b_dev)
    assert b.stride() == (1, n)
    assert torch.equal(acc.cpu(), reference.int8_linear_matmul(a, b))
    full = torch.full((m, k), -127, dtype=torch.int8)
    assert torch.equal(matmul(*_on_device(full, full)).cpu(), torch.full((m, m), k * 127 * 127, dtype=torch.int32))


class _CublasIntMmRules:
    """Stands in for torch._int_mm, enforcing what cuBLASLt accepts on CUDA (the CPU takes anything)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, a, b):
        self.calls += 1
        assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0]
        assert a.shape[0] >= cuda.INT_MM_MIN_ROWS, f"M = {a.shape[0]}: cuBLAS needs more than 16 rows"
        assert a.shape[1] % cuda.INT_MM_MULTIPLE == 0 and b.shape[1] % cuda.INT_MM_MULTIPLE == 0
        assert a.is_contiguous() and b.stride(0) == 1, "a row-major, b column-major"
        return self.real(a, b)


@pytest.mark.parametrize("shape", GEMM_SHAPES + [(16, 8, 8), (40, 4096, 24)])
def test_torch_gemm_pads_to_cublas_shape_rules_and_stays_exact(shape, monkeypatch):
    m, k, n = shape
    rules = _CublasIntMmRules(torch._int_mm)
    monkeypatch.setattr(torch, "_int_mm", rules)
    a, b = _int8((m, k), seed=m), _int8((n, k), seed=n)
    acc = cuda.linear_matmul(*_on_device(a, b))
    assert rules.calls == 1
    assert acc.is_contiguous() and acc.shape == (m, n)
    assert torch.equal(acc.cpu(), reference.int8_linear_matmul(a, b))


@pytest.mark.parametrize("stages", STAGE_SETS)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_dequant_matches_reference(stages, out_dtype, with_bias):
    m, n = 17, 33
    acc = reference.int8_linear_matmul(_int8((m, 64), 1), _int8((n, 64), 2))
    gen = torch.Generator().manual_seed(5)
    x_absmax, w_absmax = torch.rand(m, generator=gen) * 4, torch.rand(n, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = STAGE_SETS[stages].mm_dequant(*_on_device(acc, x_absmax, w_absmax, bias), out_dtype)
    ref = reference.int8_mm_dequant(acc, x_absmax, w_absmax, bias, out_dtype)
    assert out.dtype == out_dtype
    magnitude = acc.float().abs() * (x_absmax / 127)[:, None] * (w_absmax / 127)[None, :]
    if bias is not None:
        magnitude += bias.abs()
    _assert_close_to_reference(out, ref, magnitude, n_float_terms=0)


# --------------------------------------------------------------------------------------------
# The mixed-precision forward


def _weight(n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    w_int8, w_absmax, _ = reference.int8_vectorwise_quant(w, 0.0)
    return w_int8, w_absmax


def _check_mixed_linear(stages, dtype, m, k, n, with_bias, threshold, seed=0):
    x = _x_with_outliers(m, k, dtype, seed=m * k + seed)
    w_int8, w_absmax = _weight(n, k, dtype, seed=n + seed)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype) if with_bias else None
    out = cuda.mixed_linear(stages, *_on_device(x, w_int8, w_absmax, bias), threshold)
    ref = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, threshold)
    assert out.dtype == dtype and out.shape == (m, n)
    n_cols = reference.outlier_columns(x.float(), threshold).numel() if threshold > 0 else 0
    assert threshold == 0 or n_cols >= 1, "the test input must hold outliers"
    w_deq = w_int8.float() * (w_absmax / 127)[:, None]
    magnitude = x.float().abs() @ w_deq.abs().T + (bias.float().abs() if bias is not None else 0.0)
    _assert_close_to_reference(out, ref, magnitude, n_float_terms=n_cols)


@pytest.mark.parametrize("stages", STAGE_SETS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 33, 17, True), (17, 64, 5, False), (33, 130, 64, True)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_mixed_linear_matches_reference(stages, dtype, shape, threshold):
    _check_mixed_linear(STAGE_SETS[stages], dtype, *shape, threshold)


@pytest.mark.parametrize("stages", STAGE_SETS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mixed_linear_calibrated_fp_columns_and_strided_x(stages, dtype):
    m, k, n = 17, 64, 33
    x = _x_with_outliers(k, m, dtype, seed=11).T  # [M, K] with strides (1, K)
    x_dev = x.to(DEVICE) if ON_GPU else x
    w_int8, w_absmax = _weight(n, k, dtype, seed=12)
    found = reference.outlier_columns(x.float(), 6.0)
    assert found.tolist() == [0, 7]
    fp_cols = torch.tensor([7, 9, 63])  # 7 is also found at run time: it must take the fp_weight path only
    fp_weight = (torch.randn(n, 3, generator=torch.Generator().manual_seed(13)) * 0.05).to(dtype)
    out = cuda.mixed_linear(STAGE_SETS[stages], x_dev, *_on_device(w_int8, w_absmax), None, 6.0,
                            *_on_device(fp_cols, fp_weight))
    ref = reference.int8_mixed_linear(x, w_int8, w_absmax, None, 6.0, fp_cols, fp_weight)
    w_deq = w_int8.float() * (w_absmax / 127)[:, None]
    w_deq[:, fp_cols] = fp_weight.float()
    magnitude = x.float().abs() @ w_deq.abs().T
    n_cols = found.numel() + fp_cols.numel()
    _assert_close_to_reference(out, ref, magnitude, n_float_terms=n_cols)


@pytest.mark.parametrize("stages", STAGE_SETS)
def test_mixed_linear_with_no_rows(stages):
    w_int8, w_absmax = _weight(9, 40, torch.float16, seed=2)
    x = torch.empty(0, 40, dtype=torch.float16)
    out = cuda.mixed_linear(STAGE_SETS[stages], *_on_device(x, w_int8, w_absmax), None, 6.0)
    assert out.shape == (0, 9) and out.dtype == torch.float16


# --------------------------------------------------------------------------------------------
# No host reads: the forward never waits for the device


# Ops whose result the host must read before it can go on (a device sync on CUDA).
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique", "_unique2", "unique_dim",
              "unique_consecutive", "equal", "allclose", "masked_scatter", "repeat_interleave"}


class _HostReads(TorchDispatchMode):
    """Records every op that makes the host read a device value: ``.item()``, ``bool(t)``, ``nonzero``,
    data-dependent shapes, or indexing with a boolean mask."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ()
        )
        if name in HOST_READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _stage_sets_with_guard():
    return {**STAGE_SETS, "guarded": dispatch.guarded_stages(triton_kernels)}


@pytest.mark.parametrize("stages", ["triton", "torch", "guarded"])
def test_forward_and_gemm_ops_read_nothing_on_the_host(stages, no_fallbacks_yet):
    chosen = _stage_sets_with_guard()[stages]
    x = _x_with_outliers(17, 130, torch.float16, seed=3)
    w_int8, w_absmax = _weight(33, 130, torch.float16, seed=4)
    fp_cols, fp_weight = torch.tensor([1, 9]), torch.randn(33, 2).half()
    x, w_int8, w_absmax, fp_cols, fp_weight = _on_device(x, w_int8, w_absmax, fp_cols, fp_weight)
    with _HostReads() as reads:
        cuda.mixed_linear(chosen, x, w_int8, w_absmax, None, 6.0, fp_cols, fp_weight)
        acc = chosen.linear_matmul(w_int8[:5], w_int8)
        chosen.mm_dequant(acc, w_absmax[:5], w_absmax, None, torch.float16)
        cuda.vectorwise_quant(chosen, x, 0.0)
    assert reads.seen == []


def test_the_host_read_detector_sees_reads():
    x = torch.tensor([0.0, 7.0])
    with _HostReads() as reads:
        x.nonzero()
        bool(x.any())
        x[x > 1]
    assert reads.seen == ["nonzero", "_local_scalar_dense", "index"]


# --------------------------------------------------------------------------------------------
# The guard: a Triton kernel that cannot run here falls back to torch ops, once, with a warning


class _FailingKernel:
    """Stands in for a Triton kernel that does not fit this GPU: every launch raises, as ptxas would."""

    def __init__(self, error=None):
        self.launches = 0
        self.error = error or OutOfResources(300_000, 232_448, "shared memory")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error

        return launch


def _break(monkeypatch, module, *names, error=None):
    failing = _FailingKernel(error)
    for name in names:
        monkeypatch.setattr(module, name, failing)
    return failing


GEMM_KERNELS = ("_int8_gemm_kernel", "_decode_kernel", "_prefill_kernel")


def _fallback_warnings(caught):
    return [w for w in caught if issubclass(w.category, dispatch.TritonFallbackWarning)]


def test_a_failing_triton_gemm_falls_back_once_with_a_warning(monkeypatch, no_fallbacks_yet):
    gemm = _break(monkeypatch, int8_matmul, *GEMM_KERNELS)
    stages = dispatch.guarded_stages(triton_kernels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):  # the same numbers on every call, the kernel tried once
            _check_mixed_linear(stages, torch.float16, 17, 130, 33, True, 6.0, seed=seed)
    (warning,) = _fallback_warnings(caught)
    message = str(warning.message)
    assert "int8_linear_dequant" in message and "OutOfResources" in message and "shared memory" in message
    assert "torch._int_mm" in message and "scripts/gpu_check.sh" in message
    assert gemm.launches == 1
    # The epilogue kernel still runs on Triton after torch._int_mm: only the GEMM fell back.
    assert list(dispatch.fallbacks()) == ["int8_linear_dequant"]
    assert dispatch.fallbacks()["int8_linear_dequant"].startswith("OutOfResources: out of resource: shared memory")


def test_every_stage_falls_back_to_torch_ops_and_stays_exact(monkeypatch, no_fallbacks_yet):
    _break(monkeypatch, int8_matmul, *GEMM_KERNELS, "_epilogue_kernel")
    _break(monkeypatch, quant, "_outlier_flags_kernel", "_row_quant_kernel", "_compact_kernel",
           error=RuntimeError("PTXAS error: Internal Triton PTX codegen error"))
    stages = dispatch.guarded_stages(triton_kernels)
    kernels = dispatch.op_kernels(stages)
    x = _x_with_outliers(17, 64, torch.bfloat16, seed=5)
    a, b = _int8((17, 64), 1), _int8((33, 64), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in FLOAT_DTYPES:
            _check_mixed_linear(stages, dtype, 33, 130, 64, True, 6.0)
        codes, absmax, cols = kernels["int8_vectorwise_quant"](*_on_device(x), 6.0)
        acc = kernels["int8_linear_matmul"](*_on_device(a, b))
    assert sorted(dispatch.fallbacks()) == [
        "dequant_epilogue", "int8_linear_dequant", "int8_linear_matmul", "outlier_column_flags", "quantize_rows",
    ]
    assert len(_fallback_warnings(caught)) == 5
    ref_codes, ref_absmax, ref_cols = reference.int8_vectorwise_quant(x, 6.0)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)
    assert torch.equal(cols.cpu(), ref_cols)
    assert torch.equal(acc.cpu(), reference.int8_linear_matmul(a, b))


def test_out_of_memory_is_not_a_kernel_failure(monkeypatch, no_fallbacks_yet):
    _break(monkeypatch, int8_matmul, *GEMM_KERNELS, error=torch.OutOfMemoryError("CUDA out of memory"))
    stages = dispatch.guarded_stages(triton_kernels)
    a, b = _on_device(_int8((3, 16), 1), _int8((5, 16), 2))
    with pytest.raises(torch.OutOfMemoryError):
        stages.linear_matmul(a, b)
    assert dispatch.fallbacks() == {}


def test_a_failing_fallback_fails_loudly(monkeypatch, no_fallbacks_yet):
    _break(monkeypatch, int8_matmul, *GEMM_KERNELS)
    monkeypatch.setattr(torch, "_int_mm", _FailingKernel().__getitem__(None))
    stages = dispatch.guarded_stages(triton_kernels)
    with pytest.raises(OutOfResources), pytest.warns(dispatch.TritonFallbackWarning, match="int8_linear_matmul"):
        stages.linear_matmul(*_on_device(_int8((3, 16), 1), _int8((5, 16), 2)))


# --------------------------------------------------------------------------------------------
# Autotuning and compilation


def test_autotuning_prunes_configs_larger_than_the_problem():
    def kept(configs, m, n, k):
        return int8_matmul.prune_configs(configs, {"M": m, "N": n, "K": k})

    small = kept(int8_matmul.PREFILL_CONFIGS, 17, 64, 130)
    assert [c.kwargs["BLOCK_M"] for c in small] == [32]  # one config: nothing to time
    assert len(kept(int8_matmul.PREFILL_CONFIGS, 4096, 8192, 8192)) == len(int8_matmul.PREFILL_CONFIGS)
    assert len(kept(int8_matmul.DECODE_CONFIGS, 1, 4096, 4096)) == len(int8_matmul.DECODE_CONFIGS)
    volume = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]  # noqa: E731
    (tiny,) = kept(int8_matmul.DECODE_CONFIGS, 1, 1, 1)  # none fits: the smallest tile
    assert volume(tiny) == min(volume(c) for c in int8_matmul.DECODE_CONFIGS)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled for it by the tests above")
def test_kernels_compile_for_hopper():
    # In a fresh process: under the interpreter (this one, without a GPU) kernels cannot be compiled.
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(repo / "scripts" / "compile_kernels.py"), "--quick"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=FRESH_PROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "compiled for sm_90: every kernel" in result.stdout
