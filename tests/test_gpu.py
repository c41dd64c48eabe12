"""The CUDA path on a real GPU: every op and ``Linear8bitLt`` against the reference, no host syncs, CUDA
graphs, ``torch.compile``, the fallback, and transformers (from_pretrained, generate, a GPU/CPU device map).

Every test needs CUDA and skips cleanly without it; ``scripts/gpu_check.sh`` runs them (``pytest -m
gpu``) on a lent GPU, with ``tests/test_triton_kernels.py`` (the kernels stage by stage).

The oracle is ``reference.py`` on the CPU: int8 codes, outlier columns and int32 accumulators must be
equal, float outputs within float32 rounding of the sum of absolute terms (the bound of
``tests/test_triton_kernels.py``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from llm_int8 import Linear8bitLt, cuda, dispatch, reference
from llm_int8 import functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)"),
]

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS32 = torch.finfo(torch.float32).eps
OUTLIER = 20.0  # planted outlier magnitude, far past alpha = 6
# (M, K, N): ragged shapes that span tile edges, then the LLM-sized ones the benchmark times
# (their compiled kernels and tuning are shared with it through Triton's cache).
RAGGED = [(1, 72, 40), (17, 136, 24), (33, 200, 40)]
LLM_SIZED = [(1, 4096, 4096), (512, 4096, 4096)]


def _x(m, k, dtype, n_outlier_cols=2, seed=0, device="cuda"):
    """x [M, K] ~ N(0, 1) with ``n_outlier_cols`` columns holding +-OUTLIER in every other row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    cols = torch.randperm(k, generator=gen)[:n_outlier_cols]
    x[::2, cols] = OUTLIER * torch.sign(torch.randn(x[::2].shape[0], cols.numel(), generator=gen))
    return x.to(dtype).to(device)


def _weight(n, k, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)


def _assert_close(out, ref, magnitude, n_float_terms):
    """|out - ref| <= one rounding of the output dtype + (terms + 4) float32 roundings of the magnitude."""
    out, ref_f = out.cpu().float(), ref.float()
    bound = torch.finfo(ref.dtype).eps * ref_f.abs() + (n_float_terms + 4) * EPS32 * magnitude.cpu()
    bound += torch.finfo(ref.dtype).tiny
    err = (out - ref_f).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound there {bound.flatten()[(err - bound).argmax()]:.3g}"


def _check_mixed(out, x, w_int8, w_absmax, bias, threshold, fp_cols=None, fp_weight=None):
    """out (CUDA) against reference.int8_mixed_linear on the CPU."""
    x, w_int8, w_absmax = x.cpu(), w_int8.cpu(), w_absmax.cpu()
    bias = bias.cpu() if bias is not None else None
    fp_cols = fp_cols.cpu() if fp_cols is not None else None
    fp_weight = fp_weight.cpu() if fp_weight is not None else None
    ref = reference.int8_mixed_linear(x, w_int8, w_absmax, bias, threshold, fp_cols, fp_weight)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    w_deq = w_int8.float() * (w_absmax / 127)[:, None]
    if fp_cols is not None:
        w_deq[:, fp_cols] = fp_weight.float()
    magnitude = x.float().abs() @ w_deq.abs().T + (bias.float().abs() if bias is not None else 0.0)
    n_cols = reference.outlier_columns(x.float(), threshold).numel() if threshold > 0 else 0
    n_cols += fp_cols.numel() if fp_cols is not None else 0
    _assert_close(out, ref, magnitude, n_cols)


@pytest.fixture
def no_fallbacks_yet(monkeypatch):
    monkeypatch.setattr(dispatch, "_fallbacks", {})


class _SyncIsAnError:
    """Within it, any operation that makes the host wait for the GPU raises (torch's sync debug mode)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------
# The ops through the dispatcher (Triton on CUDA) against the reference on the CPU


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", RAGGED + [(300, 1000, 0)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_vectorwise_quant_is_exact(dtype, shape, threshold):
    m, k, _ = shape
    x = _x(m, k, dtype, seed=m)
    codes, absmax, cols = F.int8_vectorwise_quant(x, threshold)
    ref_codes, ref_absmax, ref_cols = reference.int8_vectorwise_quant(x.cpu(), threshold)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)
    assert torch.equal(cols.cpu(), ref_cols)
    assert threshold == 0 or cols.numel() == 2


@pytest.mark.parametrize("shape", RAGGED + [(16, 1000, 520), (100, 1000, 1001)] + LLM_SIZED[:1])
def test_int8_matmul_is_exact(shape):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m + k)
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    ref = reference.int8_linear_matmul(a, b)
    assert torch.equal(F.int8_linear_matmul(a.cuda(), b.cuda()).cpu(), ref)
    assert torch.equal(cuda.linear_matmul(a.cuda(), b.cuda()).cpu(), ref)  # the safe path's torch._int_mm


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_mm_dequant_matches_reference(out_dtype):
    gen = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (33, 520), generator=gen, dtype=torch.int32)
    x_absmax, w_absmax, bias = torch.rand(33, generator=gen) * 9, torch.rand(520, generator=gen), torch.randn(520)
    out = F.int8_mm_dequant(acc.cuda(), x_absmax.cuda(), w_absmax.cuda(), bias.cuda(), out_dtype)
    ref = reference.int8_mm_dequant(acc, x_absmax, w_absmax, bias, out_dtype)
    magnitude = acc.float().abs() * (x_absmax / 127)[:, None] * (w_absmax / 127)[None, :] + bias.abs()
    _assert_close(out, ref, magnitude, 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", RAGGED)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mixed_linear_ragged_shapes(dtype, shape, threshold, with_bias):
    m, k, n = shape
    x = _x(m, k, dtype, seed=k)
    w_int8, w_absmax = F.quantize_weight(_weight(n, k, dtype).cuda())
    bias = torch.randn(n, dtype=dtype, device="cuda") if with_bias else None
    _check_mixed(F.int8_mixed_linear(x, w_int8, w_absmax, bias, threshold), x, w_int8, w_absmax, bias, threshold)


@pytest.mark.parametrize("dtype,shape", [(torch.float16, s) for s in LLM_SIZED + [(16, 4096, 4096)]]
                         + [(torch.bfloat16, LLM_SIZED[0])])
def test_mixed_linear_llm_sized(dtype, shape):
    m, k, n = shape
    x = _x(m, k, dtype, n_outlier_cols=4, seed=m)
    w_int8, w_absmax = F.quantize_weight(_weight(n, k, dtype).cuda())
    _check_mixed(F.int8_mixed_linear(x, w_int8, w_absmax, None, 6.0), x, w_int8, w_absmax, None, 6.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mixed_linear_calibrated_columns_and_strided_x(dtype):
    m, k, n = 40, 136, 72
    x = _x(k, m, dtype, seed=3).T  # [M, K] with strides (1, K)
    w_int8, w_absmax = F.quantize_weight(_weight(n, k, dtype).cuda())
    fp_cols = torch.tensor([3, 50, 135], device="cuda")
    fp_weight = _weight(n, 3, dtype, seed=9).cuda()
    out = F.int8_mixed_linear(x, w_int8, w_absmax, None, 6.0, fp_cols, fp_weight)
    _check_mixed(out, x, w_int8, w_absmax, None, 6.0, fp_cols, fp_weight)


# --------------------------------------------------------------------------------------------
# Linear8bitLt on CUDA


def _layer(k, n, dtype, bias=True, threshold=6.0):
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_weight(n, k, torch.float32))
    return Linear8bitLt.from_linear(linear.to(dtype).cuda(), threshold=threshold)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear8bitlt_forward_3d_and_the_op_path_agree(dtype):
    layer = _layer(200, 40, dtype)
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.int8
    x = _x(2 * 17, 200, dtype, seed=4).view(2, 17, 200)
    out = layer(x)  # eager fast path: the bound CUDA kernel
    assert out.shape == (2, 17, 40) and out.dtype == dtype
    _check_mixed(out.view(-1, 40), x.view(-1, 200), layer.weight, layer.SCB, layer.bias, 6.0)
    # the same kernel through the op (autograd needs it): bit-identical
    with_grad = x.detach().requires_grad_()
    assert torch.equal(layer(with_grad).detach(), out)


def test_linear8bitlt_moves_to_cuda_and_back():
    cpu_layer = Linear8bitLt.from_linear(nn.Linear(64, 24).half())
    gpu_layer = cpu_layer.cuda()
    assert gpu_layer.weight.is_cuda and gpu_layer.SCB.dtype == torch.float32
    state = {k: v.cpu() for k, v in gpu_layer.state_dict().items()}
    again = Linear8bitLt(64, 24).half()
    again.load_state_dict(state)
    x = _x(5, 64, torch.float16)
    assert torch.equal(again.cuda()(x), gpu_layer(x))


def test_linear8bitlt_gradient_reaches_x_and_bias():
    layer = _layer(136, 40, torch.float32)
    x = _x(9, 136, torch.float32, seed=5).requires_grad_()
    grad_out = torch.randn(9, 40, device="cuda")
    layer(x).backward(grad_out)
    w_deq = layer.dequantize(torch.float64)
    expected = grad_out.double() @ w_deq
    assert ((x.grad.double() - expected).abs() <= 8 * EPS32 * (grad_out.double().abs() @ w_deq.abs())).all()
    assert torch.allclose(layer.bias.grad, grad_out.sum(0))


def test_compile_fullgraph_matches_eager():
    layer = _layer(136, 72, torch.float16)
    compiled = torch.compile(layer, fullgraph=True)
    for m in (1, 33):
        x = _x(m, 136, torch.float16, seed=m)
        assert torch.equal(compiled(x), layer(x))


# --------------------------------------------------------------------------------------------
# The GPU never waits for the host: no syncs, CUDA graphs


@pytest.mark.parametrize("m", [1, 64])
def test_forward_never_syncs(m):
    layer = _layer(1024, 512, torch.float16)
    layer.set_fp_columns(torch.tensor([5, 700]), _weight(512, 1024, torch.float16).cuda())
    inputs = [_x(m, 1024, torch.float16, n_outlier_cols=3, seed=s) for s in range(3)]
    layer(inputs[0])  # compile and tune outside the check
    with _SyncIsAnError():
        outs = [layer(x) for x in inputs]
    for x, out in zip(inputs, outs):
        _check_mixed(out, x, layer.weight, layer.SCB, layer.bias, 6.0, layer.fp_cols, layer.fp_weight)


def _capture(fn, static_x):
    """Warm up on a side stream, then capture ``fn(static_x)`` in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    return graph, static_out


@pytest.mark.parametrize("m", [1, 48])
def test_cuda_graph_replays_with_new_outlier_columns(m):
    layer = _layer(1024, 512, torch.bfloat16)
    static_x = _x(m, 1024, torch.bfloat16, seed=0)
    graph, static_out = _capture(layer, static_x)
    for seed, n_cols in ((1, 1), (2, 7), (3, 0)):  # other outlier columns, more of them, none
        x = _x(m, 1024, torch.bfloat16, n_outlier_cols=n_cols, seed=seed)
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_out, layer(x))
        _check_mixed(static_out, x, layer.weight, layer.SCB, layer.bias, 6.0)


# --------------------------------------------------------------------------------------------
# The safe path on the GPU: a Triton kernel made to fail


class _FailingKernel:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(300_000, 232_448, "shared memory")

        return launch


def test_a_failing_gemm_falls_back_once_and_stays_exact(monkeypatch, no_fallbacks_yet):
    from llm_int8.triton import int8_matmul

    for name in ("_decode_kernel", "_prefill_kernel"):
        monkeypatch.setattr(int8_matmul, name, _FailingKernel())
    layer = _layer(1000, 520, torch.float16)
    inputs = [_x(m, 1000, torch.float16, seed=m) for m in (1, 17, 100)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [layer(x) for x in inputs]
    fallback_warnings = [w for w in caught if issubclass(w.category, dispatch.TritonFallbackWarning)]
    assert len(fallback_warnings) == 1 and "NVIDIA" in str(fallback_warnings[0].message)
    assert list(dispatch.fallbacks()) == ["int8_linear_dequant"]
    for x, out in zip(inputs, outs):
        _check_mixed(out, x, layer.weight, layer.SCB, layer.bias, 6.0)


@pytest.mark.parametrize("m", [1, 40])
def test_torch_stages_are_exact_sync_free_and_capturable(m):
    k, n = 1000, 520
    w_int8, w_absmax = F.quantize_weight(_weight(n, k, torch.float16).cuda())
    bias = torch.randn(n, device="cuda", dtype=torch.float16)

    def forward(x):
        return cuda.mixed_linear(cuda.TORCH_STAGES, x, w_int8, w_absmax, bias, 6.0)

    static_x = _x(m, k, torch.float16, seed=0)
    graph, static_out = _capture(forward, static_x)
    for seed in (1, 2):
        x = _x(m, k, torch.float16, n_outlier_cols=seed * 3, seed=seed)
        with _SyncIsAnError():
            out = forward(x)
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_out, out)
        _check_mixed(out, x, w_int8, w_absmax, bias, 6.0)


# --------------------------------------------------------------------------------------------
# transformers: from_pretrained, generate, a device map across GPU and CPU


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-init Llama checkpoint (fp32) whose norm weights plant outlier features at alpha = 6."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[7, 100]] = OUTLIER
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    from llm_int8.integrations.hf import LLMInt8Config

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=LLMInt8Config(), **kwargs).eval()


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# GPU and CPU int8 models quantize the same way; their float parts differ in accumulation order (~1e-6),
# so now and then an activation lies on a rounding boundary on one device and its code differs by one: that
# row's output moves by one quantization step (~1e-4 of the logits' norm). A real fault (a lost scale, a
# missed outlier column, a wrong tile) costs 1e-2 and more.
DEVICE_REL_ERR = 1e-3


def test_from_pretrained_on_cuda_and_generate(tiny_llama):
    on_gpu = _load(tiny_llama, device_map={"": 0})
    on_cpu = _load(tiny_llama)
    down = on_gpu.model.layers[0].mlp.down_proj
    assert isinstance(down, Linear8bitLt) and down.weight.is_cuda and down.weight.dtype == torch.int8
    prompt = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        generated = on_gpu.generate(prompt.cuda(), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    pad_token_id=1)
        assert generated.shape == (2, 28)
        logits_gpu = on_gpu(generated).logits.cpu()
        logits_cpu = on_cpu(generated.cpu()).logits
    assert _rel_err(logits_gpu, logits_cpu) < DEVICE_REL_ERR


def test_device_map_across_gpu_and_cpu(tiny_llama):
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": 0, "lm_head": 0}
    split = _load(tiny_llama, device_map=device_map)
    on_cpu = _load(tiny_llama)
    assert split.model.layers[0].mlp.down_proj.weight.is_cuda
    assert split.model.layers[1].mlp.down_proj.weight.device.type == "cpu"
    assert split.model.layers[1].mlp.down_proj.weight.dtype == torch.int8
    prompt = torch.randint(2, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        generated = split.generate(prompt.cuda(), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=1)
        assert generated.shape == (1, 18)
        logits = split(generated).logits.cpu()
        ref = on_cpu(generated.cpu()).logits
    assert _rel_err(logits, ref) < DEVICE_REL_ERR


def test_linear8bitlt_calls_the_registered_kernel():
    # the eager fast path calls the kernel dispatch registered for CUDA, and gives the op's numbers
    layer = Linear8bitLt.from_linear(nn.Linear(64, 32)).cuda()
    x = _x(3, 64, torch.float16)
    with torch.no_grad():
        out = layer(x)
        assert F.eager_kernel(x, layer.weight, layer.bias) is dispatch.registered_cuda_kernels()["int8_mixed_linear"]
    ref = F.mixed_linear_op(x, layer.weight, layer.SCB, layer.bias, layer.threshold, None, None)
    assert torch.equal(out, ref)


def test_no_triton_kernel_fell_back_in_this_process():
    # Last in file order: the results above came from the Triton kernels, not the safe path. (gpu_check.sh
    # also turns every TritonFallbackWarning into an error, which names the test it happened in.)
    assert dispatch.kernel_backend("cuda") == "triton", dispatch.gpu_path_unavailable_reason()
    assert dispatch.fallbacks() == {}, f"Triton kernels fell back to torch ops: {dispatch.fallbacks()}"
