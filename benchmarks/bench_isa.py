"""Question: on this CPU, how many int8 multiply-adds per second can an AVX2 (or AVX-512 VNNI) int8
product reach, against float32 FMA's — the ceiling of int8 prefill over fp32 prefill?

Compiles a few loops of one instruction each (eight or ten independent instructions per iteration,
no memory traffic) and times them in thread CPU time on one thread, interleaved over ``--repeats``
rounds (medians), so other processes' preemption does not count. Prints each instruction's
throughput in instructions per nanosecond and what it means in multiply-adds:

* AVX2 int8 (our kernel, and llama.cpp's Q8_0 on AVX2): ``vpmaddubsw`` (32 byte products summed in
  pairs to int16) then ``vpmaddwd`` (pairs to int32): 32 multiply-adds per two instructions; timed
  together, since on some CPUs the two share one pipe;
* float32: ``vfmadd231ps`` (8 multiply-adds per instruction, 256-bit);
* AVX-512 VNNI where the CPU has it: ``vpdpbusd`` zmm (64 multiply-adds per instruction).

The int8/fp32 ratio of these ceilings bounds what an int8 GEMM can gain over torch's float32 GEMM on a
compute-bound prefill (both kernels also load, sign-fix and add; the ceiling ignores that).

    python benchmarks/bench_isa.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics

from bench_gemv import compiled_library  # (the benchmarks folder is on sys.path when a script runs)

SOURCE = r"""
#include <stdint.h>
#include <time.h>
static double thread_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
#define LOOP(name, isa, body)                                                                   \
    __attribute__((target(isa))) double name(int64_t iters)                                       \
    {                                                                                             \
        double t = thread_seconds();                                                              \
        __asm__ volatile(body_prefix "1:\n\t" body "dec %0\n\tjnz 1b" : "+r"(iters)::              \
            "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",         \
            "xmm10", "xmm11", "cc");                                                               \
        return (thread_seconds() - t);                                                            \
    }
#define body_prefix "vpxor %%xmm0, %%xmm0, %%xmm0\n\tvpxor %%xmm1, %%xmm1, %%xmm1\n\t"
#define I8(op, d) op " %%ymm0, %%ymm1, %%ymm" #d "\n\t"
#define PAIR(d1, d2) I8("vpmaddubsw", d1) I8("vpmaddwd", d2)
/* 4 vpmaddubsw + 4 vpmaddwd per iteration (independent destinations) */
LOOP(int8_avx2, "avx2", PAIR(2, 3) PAIR(4, 5) PAIR(6, 7) PAIR(8, 9))
/* 10 vfmadd231ps per iteration: ten accumulators cover the FMA latency */
#define F(d) "vfmadd231ps %%ymm0, %%ymm1, %%ymm" #d "\n\t"
LOOP(fp32_fma, "avx2,fma", F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11))
/* 10 vpdpbusd zmm per iteration */
#define V(d) "vpdpbusd %%zmm0, %%zmm1, %%zmm" #d "\n\t"
LOOP(int8_vnni, "avx512f,avx512vnni", V(2) V(3) V(4) V(5) V(6) V(7) V(8) V(9) V(10) V(11))
"""

# name: (instructions per iteration, multiply-adds per iteration, label)
LOOPS = {
    "int8_avx2": (8, 4 * 32, "AVX2 int8: vpmaddubsw + vpmaddwd (32 MACs per pair)"),
    "fp32_fma": (10, 10 * 8, "float32: vfmadd231ps ymm (8 MACs)"),
    "int8_vnni": (10, 10 * 64, "AVX-512 VNNI int8: vpdpbusd zmm (64 MACs)"),
}


def compiled():
    lib = compiled_library(SOURCE, "bench_isa_")
    fns = {}
    for name in LOOPS:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.c_int64], ctypes.c_double
        fns[name] = fn
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=20_000_000)
    args = parser.parse_args()

    import torch  # only for the machine line: the same names as the other benchmarks

    from llm_int8 import _native
    from llm_int8.eval.speed import cpu_name

    isas = _native.isas() if _native.available() else ("avx2",)
    names = [n for n in LOOPS if n != "int8_vnni" or "avx512_vnni" in isas]
    fns = compiled()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, ISAs {', '.join(isas)}; "
          f"one thread, thread CPU time, medians of {args.repeats} interleaved rounds")
    seconds = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            seconds[n].append(fns[n](args.iterations))
    rate = {}
    for n in names:
        per_iter, macs, label = LOOPS[n]
        s = statistics.median(seconds[n])
        rate[n] = macs * args.iterations / s / 1e9
        print(f"{label:<52} {per_iter * args.iterations / s / 1e9:6.2f} instr/ns  {rate[n]:7.1f} GMAC/s")
    print(f"ceiling int8 (AVX2) / fp32: {rate['int8_avx2'] / rate['fp32_fma']:.2f}x"
          + (f";  int8 (VNNI) / fp32: {rate['int8_vnni'] / rate['fp32_fma']:.2f}x" if "int8_vnni" in rate else ""))


if __name__ == "__main__":
    main()
