"""Is our int8 Linear faster than fp16 on the GPU, and how much faster than bitsandbytes?

Question: for LLM-sized linear layers on a CUDA GPU (written for an H100), the forward time of

    fp16     F.linear on fp16 weights (cuBLAS): the baseline every ratio is taken against
    int_mm   torch._int_mm on int8 codes + eager row quantization and dequantization (alpha = 0 only)
    bnb      bitsandbytes Linear8bitLt (has_fp16_weights=False, eval mode)
    ours     llm_int8.functional.int8_mixed_linear (Triton kernels, registered by llm_int8.dispatch)

at alpha = 6 (x has ~0.1 % outlier feature columns, as in LLMs) and alpha = 0 (no decomposition),
for K = N in {4096, 8192} and 4096 -> 11008, M in {1, 16, 128, 512, 2048, 8192}. Then an end-to-end
forward through a stack of Llama-7B-shaped decoder layers (random weights), fp16 vs ours.

Before timing, it checks that our int32 accumulators equal the reference bit for bit on the GPU.
Times are medians of CUDA-event measurements, all taken in this one run; the table prints ratios
(time / fp16 time; below 1 is faster than fp16) and our speed-up over bitsandbytes.

    python benchmarks/bench_gpu.py                 # everything (about 5-10 minutes on an H100)
    python benchmarks/bench_gpu.py --quick         # fewer shapes
    python benchmarks/bench_gpu.py --no-bnb        # without bitsandbytes
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import math
import platform
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import llm_int8
from llm_int8 import dispatch, reference
from llm_int8.functional import int8_mixed_linear, quantize_weight

SHAPES = [(4096, 4096), (8192, 8192), (4096, 11008)]  # (K, N)
M_VALUES = [1, 16, 128, 512, 2048, 8192]
THRESHOLDS = [6.0, 0.0]
OUTLIER_FRACTION = 0.001  # fraction of x's feature columns that hold outliers at alpha = 6
OUTLIER_MAGNITUDE = 20.0  # |x| in outlier columns, well past alpha = 6
INLIER_CLAMP = 5.5  # keep every other value below alpha, so the outlier count is exactly as set
INT_MM_MIN_M = 17  # torch._int_mm needs more than 16 rows; smaller M is padded to this
# Llama-7B decoder layer shape
LLAMA_HIDDEN = 4096
LLAMA_INTERMEDIATE = 11008
LLAMA_HEADS = 32
RMS_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Timing


def median_ms(fn, repeats: int, warmup: int = 5, inner: int = 1) -> float:
    """Median over ``repeats`` CUDA-event samples of the time of one call (each sample times ``inner`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / inner)
    return statistics.median(samples)


def inner_calls(m: int, k: int, n: int) -> int:
    """Calls per event pair: enough that tiny GEMMs are not dominated by the event resolution."""
    flops = 2 * m * k * n
    return max(1, min(50, int(2e10 // max(flops, 1))))


# --------------------------------------------------------------------------------------------
# Inputs and baselines


def make_x(m: int, k: int, threshold: float, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen, device="cuda").clamp_(-INLIER_CLAMP, INLIER_CLAMP)
    if threshold > 0:
        n_cols = max(1, round(OUTLIER_FRACTION * k))
        cols = torch.randperm(k, generator=gen, device="cuda")[:n_cols]
        x[:, cols] = OUTLIER_MAGNITUDE * torch.sign(torch.randn(m, n_cols, generator=gen, device="cuda"))
    return x.half()


def int_mm_linear(x, w_int8_t, w_scale):
    """Eager baseline: row-quantize x, torch._int_mm, dequantize (no outlier decomposition)."""
    m = x.shape[0]
    if m < INT_MM_MIN_M:
        x = F.pad(x, (0, 0, 0, INT_MM_MIN_M - m))
    x_scale = x.abs().amax(dim=1, keepdim=True).float() / 127
    x_int8 = (x.float() / x_scale).round_().to(torch.int8)
    acc = torch._int_mm(x_int8, w_int8_t)
    return (acc * x_scale * w_scale).half()[:m]


def load_bitsandbytes():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit(
            "bitsandbytes is not installed: pip install 'llm-int8[dev]' (it pins bitsandbytes 0.50.2), "
            "or run with --no-bnb"
        )
    import bitsandbytes

    return bitsandbytes


def bnb_linear(bnb, weight_fp16: torch.Tensor, threshold: float) -> nn.Module:
    n, k = weight_fp16.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(weight_fp16.cpu(), requires_grad=False, has_fp16_weights=False)
    return layer.cuda().eval()


# --------------------------------------------------------------------------------------------
# The questions


def check_exact_accumulators(shapes, m_values) -> None:
    """Our Triton int32 accumulators vs the float64 reference GEMM, bit for bit, on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in shapes:
        b = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
        for m in m_values:
            a = torch.randint(-127, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
            ours = torch.ops.llm_int8.int8_linear_matmul(a, b)
            if not torch.equal(ours, reference.int8_linear_matmul(a, b)):
                raise SystemExit(f"int32 accumulators differ from the reference at M={m}, K={k}, N={n}")
    print(f"int32 accumulators bit-identical to the reference for {len(shapes) * len(m_values)} shapes")


def bench_linear(shapes, m_values, repeats, bnb) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    header = f"{'alpha':>5} {'K':>5} {'N':>6} {'M':>5} | {'fp16 ms':>8} | {'int_mm':>6} {'bnb':>6} {'ours':>6} (x fp16) | ours vs bnb"
    print(header)
    print("-" * len(header))
    for threshold in THRESHOLDS:
        for k, n in shapes:
            weight = torch.randn(n, k, generator=gen, device="cuda").mul_(1 / math.sqrt(k)).half()
            w_int8, w_absmax = quantize_weight(weight)
            w_int8_t, w_scale = w_int8.T, (w_absmax / 127).unsqueeze(0)
            bnb_layer = bnb_linear(bnb, weight, threshold) if bnb is not None else None
            for m in m_values:
                x = make_x(m, k, threshold, gen)
                inner = inner_calls(m, k, n)
                with torch.inference_mode():
                    t_fp16 = median_ms(lambda: F.linear(x, weight), repeats, inner=inner)
                    t_ours = median_ms(lambda: int8_mixed_linear(x, w_int8, w_absmax, None, threshold), repeats, inner=inner)
                    t_int_mm = (
                        median_ms(lambda: int_mm_linear(x, w_int8_t, w_scale), repeats, inner=inner)
                        if threshold == 0 else float("nan")
                    )
                    t_bnb = median_ms(lambda: bnb_layer(x), repeats, inner=inner) if bnb_layer is not None else float("nan")
                print(
                    f"{threshold:5.1f} {k:5d} {n:6d} {m:5d} | {t_fp16:8.4f} | {t_int_mm / t_fp16:6.2f} "
                    f"{t_bnb / t_fp16:6.2f} {t_ours / t_fp16:6.2f}          | {t_bnb / t_ours:6.2f}x"
                )
            del bnb_layer, weight, w_int8
            torch.cuda.empty_cache()


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype) * self.weight


class LlamaShapedLayer(nn.Module):
    """A Llama-7B-shaped decoder layer: pre-norm causal attention and SwiGLU MLP (no rotary embedding:
    it does not touch the linear layers being compared)."""

    def __init__(self):
        super().__init__()
        h, i = LLAMA_HIDDEN, LLAMA_INTERMEDIATE
        self.attn_norm, self.mlp_norm = RMSNorm(h), RMSNorm(h)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        b, s, h = x.shape
        y = self.attn_norm(x)
        q, k, v = (p(y).view(b, s, LLAMA_HEADS, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.o_proj(attn)
        y = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


def bench_end_to_end(n_layers: int, seq_lens, repeats: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(LlamaShapedLayer() for _ in range(n_layers))).half().cuda().eval()
    # LLM-like activations: ~0.1 % of hidden dims carry large values into the projections.
    outlier_dims = torch.randperm(LLAMA_HIDDEN)[: max(1, round(OUTLIER_FRACTION * LLAMA_HIDDEN))]
    for layer in model:
        for norm in (layer.attn_norm, layer.mlp_norm):
            norm.weight.data[outlier_dims] = OUTLIER_MAGNITUDE
    ours = copy.deepcopy(model)
    report = llm_int8.quantize_(ours, llm_int8.Int8Config(threshold=6.0))
    print(f"\nend to end: {n_layers} Llama-7B-shaped decoder layers, batch 1; {report}")
    print(f"{'tokens':>6} | {'fp16 ms':>8} | {'ours ms':>8} | ours / fp16")
    for s in seq_lens:
        x = torch.randn(1, s, LLAMA_HIDDEN, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            t_fp16 = median_ms(lambda: model(x), repeats)
            t_ours = median_ms(lambda: ours(x), repeats)
        print(f"{s:6d} | {t_fp16:8.3f} | {t_ours:8.3f} | {t_ours / t_fp16:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = N = 4096 and 8192 only, M in {1, 16, 512, 2048}")
    parser.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the end-to-end stack")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit(f"this benchmark needs a CUDA GPU: {dispatch.gpu_path_unavailable_reason()}")
    dispatch.require_gpu_path()
    bnb = None if args.no_bnb else load_bitsandbytes()
    shapes = SHAPES[:2] if args.quick else SHAPES
    m_values = [1, 16, 512, 2048] if args.quick else M_VALUES

    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
        f"triton {importlib.metadata.version('triton')} | bitsandbytes {getattr(bnb, '__version__', 'not run')} | "
        f"{platform.python_version()}"
    )
    check_exact_accumulators(shapes, m_values)
    bench_linear(shapes, m_values, args.repeats, bnb)
    bench_end_to_end(args.layers, [1, 16, 512, 2048], args.repeats)


if __name__ == "__main__":
    main()
