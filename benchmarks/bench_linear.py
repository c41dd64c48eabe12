"""How fast is our LLM.int8() Linear on the CPU, next to fp32, bf16, its own int8 GEMM, torch._int_mm and bitsandbytes?

One process, interleaved repeats (every implementation runs once per round), medians. alpha = 6
with ~0.1 % of the input columns planted as outliers (values x30), as in a >6.7B model's hidden
states. Prints a table of ratios: ours / baseline (below 1 means ours is faster). ``gemm`` is the int8
GEMM path ours took; ``int_mm+epi`` (AVX-512 CPUs) is the same forward in eager torch around
``torch._int_mm`` (what the package would run without its native kernel there).

    python benchmarks/bench_linear.py [--repeats 7] [--shapes 4096x4096,4096x11008] [--ms 1,16,128,512]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

import torch
from torch import nn

import llm_int8
from llm_int8 import cpu, reference
from llm_int8.eval.speed import cpu_name, timed_rounds
from llm_int8.functional import quantize_weight

OUTLIER_SHARE = 0.001
OUTLIER_SCALE = 30.0
THRESHOLD = 6.0


def make_inputs(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    n_out = max(1, round(OUTLIER_SHARE * k))
    x[:, torch.randperm(k, generator=g)[:n_out]] *= OUTLIER_SCALE
    return x


def gemm_path(m: int, k: int, n: int) -> str:
    """The path ``int8_linear_matmul`` takes for an [m, k] x [n, k]^T product (codes in [-127, 127])."""
    path = cpu.gemm_paths()[0]
    return path if path != "int_mm" or (k > 1 and m > 0 and n > 0) else "fp32"


def int_mm_forward(x, weight_int8, weight_absmax, bias):
    """The forward in eager torch around ``torch._int_mm`` and a torch epilogue (no calibrated columns)."""
    xf = x.float()
    cols, w_cols = reference.decomposed_columns(xf, weight_int8, weight_absmax, THRESHOLD, None, None)
    x_main = xf.index_fill(1, cols, 0.0) if cols.numel() else xf
    x_absmax = reference.row_absmax(x_main)
    acc = cpu.int8_gemm(reference.quantize_rows(x_main, x_absmax), weight_int8, "int_mm")
    out = cpu.int8_mm_dequant(acc, x_absmax, weight_absmax, bias)
    return out.addmm_(xf[:, cols], w_cols.T) if cols.numel() else out


def bnb_layer(linear):
    import bitsandbytes as bnb  # optional: only the comparison column needs it

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=THRESHOLD)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()


def bench_shape(m, k, n, repeats, with_bnb, with_int_mm):
    torch.manual_seed(0)
    linear = nn.Linear(k, n)
    linear_bf16 = nn.Linear(k, n).to(torch.bfloat16)
    ours = llm_int8.Linear8bitLt.from_linear(linear, threshold=THRESHOLD)
    x = make_inputs(m, k)
    x_bf16 = x.bfloat16()
    a_int8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w_int8, _ = quantize_weight(linear.weight)
    impls = {
        "ours": lambda: ours(x),
        "fp32": lambda: linear(x),
        "bf16": lambda: linear_bf16(x_bf16),
        "int8_gemm": lambda: torch.ops.llm_int8.int8_linear_matmul(a_int8, w_int8),
    }
    if with_int_mm:
        weight_absmax, bias = ours.SCB, ours.bias
        impls["int_mm"] = lambda: int_mm_forward(x, w_int8, weight_absmax, bias)
    if with_bnb:
        theirs = bnb_layer(linear)
        impls["bnb"] = lambda: theirs(x)
    with torch.inference_mode():
        times = timed_rounds(impls, repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN list")
    parser.add_argument("--ms", default="1,16,128,512")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if installed")
    args = parser.parse_args(argv)

    with_bnb = not args.no_bnb
    if with_bnb:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            with_bnb = False
    with_int_mm = "int_mm" in cpu.gemm_paths()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, int8 GEMM paths {', '.join(cpu.gemm_paths())}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"ours: llm_int8 {llm_int8.__version__}, alpha = {THRESHOLD}, {OUTLIER_SHARE:.1%} outlier columns x{OUTLIER_SCALE:g}; "
          f"medians of {args.repeats} interleaved repeats; ratio = ours / baseline (lower is better)")
    header = f"{'K':>5} {'N':>6} {'M':>4} {'gemm':>11} {'ours ms':>9} {'fp32 ms':>9} {'/fp32':>6} {'/bf16':>6} {'/int8 gemm':>10}"
    if with_int_mm:
        header += f" {'/int_mm+epi':>11}"
    if with_bnb:
        header += f" {'bnb ms':>9} {'/bnb':>6} {'bnb/fp32':>8}"
    print(header)
    for k, n in shapes:
        for m in ms:
            t = bench_shape(m, k, n, args.repeats, with_bnb, with_int_mm)
            row = (f"{k:>5} {n:>6} {m:>4} {gemm_path(m, k, n):>11} {t['ours'] * 1e3:>9.2f} {t['fp32'] * 1e3:>9.2f} "
                   f"{t['ours'] / t['fp32']:>6.2f} {t['ours'] / t['bf16']:>6.2f} {t['ours'] / t['int8_gemm']:>10.2f}")
            if with_int_mm:
                row += f" {t['ours'] / t['int_mm']:>11.2f}"
            if with_bnb:
                row += f" {t['bnb'] * 1e3:>9.2f} {t['ours'] / t['bnb']:>6.2f} {t['bnb'] / t['fp32']:>8.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
