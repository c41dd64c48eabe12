"""Question: does the int8 forward at M = 1 ... 8 rows (decoding) stream its weight at the machine's
read bandwidth?

For each layer shape, enough copies of an int8 weight to exceed the last-level cache (``--mib``,
default 384 MiB in all) are called in turn, as a model's layers are during a decoding step, so every
call reads its weight from memory. Beside them, interleaved round by round, a plain read of the same
number of bytes (``torch.sum`` over float32 buffers of the same size, on the same threads): the
machine's read bandwidth as torch's own vectorized loop reaches it. Both are medians over
``--repeats`` rounds; the table gives GB/s of weight read per call and its ratio to the plain read.
On a busy machine both drop together; the ratio is what the kernel controls.

    python benchmarks/bench_gemv.py [--threads 2 1] [--rows 1 2 4 8] [--isa avx2 avx512_vnni] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# (K, N): Qwen2.5-1.5B's linears (q/o, k/v, gate/up, down), SmolLM2-135M's MLP, a 4096 x 4096 layer.
SHAPES = [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536), (576, 1536), (4096, 4096)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--isa", nargs="+", default=None, help="micro-kernels (default: every one this CPU runs)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mib", type=int, default=384, help="weight bytes per shape, in MiB (> last-level cache)")
    args = parser.parse_args()

    from llm_int8 import _native
    from llm_int8.eval.speed import cpu_name

    if not _native.available():
        raise SystemExit(f"the native kernels are unavailable: {_native.unavailable_reason()}")
    isas = args.isa or list(_native.isas())
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, micro-kernels {', '.join(isas)}")
    print(f"each shape: {args.mib} MiB of int8 weights called in turn (read from memory), medians of {args.repeats} "
          "rounds; read = torch.sum over float32 buffers of the same bytes, same threads, interleaved")
    print(f"{'threads':>7} {'K':>5} {'N':>5} {'M':>2} {'read GB/s':>9} " + " ".join(
        f"{isa + ' GB/s':>16} {'/read':>5}" for isa in isas))
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    for k, n in SHAPES:
        copies = max(2, args.mib * 2**20 // (n * k))
        weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
        scales = torch.rand(n) + 0.5
        floats = [torch.randn(n * k // 4) for _ in range(copies)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.rows:
                x = torch.randn(m, k)
                runs = {"read": lambda: [f.sum() for f in floats]}
                for isa in isas:
                    runs[isa] = lambda isa=isa: [
                        _native.mixed_linear(x, w, scales, None, 6.0, isa=isa) for w in weights]
                times = {name: [] for name in runs}
                for round_index in range(args.repeats + 1):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run()
                        if round_index:  # round 0 warms up (and checks each layer once)
                            times[name].append((time.perf_counter() - start) / copies)
                rate = {name: n * k / statistics.median(t) / 1e9 for name, t in times.items()}
                print(f"{threads:>7} {k:>5} {n:>5} {m:>2} {rate['read']:>9.1f} " + " ".join(
                    f"{rate[isa]:>16.1f} {rate[isa] / rate['read']:>5.2f}" for isa in isas), flush=True)
        del weights, floats
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
