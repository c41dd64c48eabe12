"""Question: does the int8 forward at M = 1 ... 8 rows (decoding) stream its weight at the machine's
read bandwidth?

For each layer shape, enough copies of an int8 weight to exceed the last-level cache (``--mib``,
default 384 MiB in all) are called in turn, as a model's layers are during a decoding step, so every
call reads its weight from memory. Beside them, interleaved round by round, a plain read of the same
number of bytes (``torch.sum`` over float32 buffers of the same size, on the same threads): the
machine's read bandwidth as torch's own vectorized loop reaches it. Both are medians over
``--repeats`` rounds; the table gives GB/s of weight read per call and its ratio to the plain read.
On a busy machine both drop together; the ratio is what the kernel controls. With one thread the
table also gives GB/s per second of the process's CPU time (what preemption does not inflate).

    python benchmarks/bench_gemv.py [--threads 2 1] [--rows 1 2 4 8] [--isa avx2 avx512_vnni] [--repeats 7]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

READ_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
__attribute__((target("avx2"))) uint64_t plain_read(const uint8_t *p, int64_t n)
{
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(p + i)));
        b = _mm256_xor_si256(b, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        c = _mm256_xor_si256(c, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        d = _mm256_xor_si256(d, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    uint64_t r = (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 3);
    for (; i < n; i++) r ^= p[i];
    return r;
}
"""


def plain_reader():
    """The C function plain_read(pointer, bytes), compiled into a temporary library."""
    folder = tempfile.mkdtemp(prefix="bench_gemv_")
    source, library = os.path.join(folder, "read.c"), os.path.join(folder, "read.so")
    with open(source, "w") as f:
        f.write(READ_SOURCE)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", library, source], check=True)
    fn = ctypes.CDLL(library).plain_read
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_uint64
    return fn

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
          "rounds; read = a plain vectorized read of the same weights on as many threads, interleaved")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'threads':>7} {'K':>5} {'N':>5} {'M':>2} {'read GB/s':>9} " + " ".join(
        f"{isa + ' GB/s':>16} {'/read':>5}" for isa in isas))
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    read = plain_reader()
    pool = ThreadPoolExecutor(max(args.threads))

    def read_all(weights, threads):
        for w in weights:
            size = w.numel()
            step = -(-size // threads)
            list(pool.map(lambda lo: read(w.data_ptr() + lo, min(step, size - lo)), range(0, size, step)))

    for k, n in SHAPES:
        copies = max(2, args.mib * 2**20 // (n * k))
        weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
        scales = torch.rand(n) + 0.5
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.rows:
                x = torch.randn(m, k)
                runs = {"read": lambda: read_all(weights, threads)}
                for isa in isas:
                    runs[isa] = lambda isa=isa: [
                        _native.mixed_linear(x, w, scales, None, 6.0, isa=isa) for w in weights]
                times = {name: [] for name in runs}
                cpu = {name: [] for name in runs}
                for round_index in range(args.repeats + 1):
                    for name, run in runs.items():
                        start, start_cpu = time.perf_counter(), time.process_time()
                        run()
                        if round_index:  # round 0 warms up (and checks each layer once)
                            times[name].append((time.perf_counter() - start) / copies)
                            cpu[name].append((time.process_time() - start_cpu) / copies)
                rate = {name: n * k / statistics.median(t) / 1e9 for name, t in times.items()}
                line = f"{threads:>7} {k:>5} {n:>5} {m:>2} {rate['read']:>9.1f} " + " ".join(
                    f"{rate[isa]:>16.1f} {rate[isa] / rate['read']:>5.2f}" for isa in isas)
                if threads == 1:  # one thread: bytes per second of the process's CPU time, which a busy
                    # machine's preemption does not inflate (memory stalls still count)
                    on_cpu = {name: n * k / statistics.median(t) / 1e9 for name, t in cpu.items()}
                    line += "   on-CPU GB/s: read " + f"{on_cpu['read']:.1f} " + " ".join(
                        f"{isa} {on_cpu[isa]:.1f} ({on_cpu[isa] / on_cpu['read']:.2f})" for isa in isas)
                print(line, flush=True)
        del weights
    torch.set_num_threads(default_threads)
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
