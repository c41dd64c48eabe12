"""Question: does the int8 forward at M = 1 ... 8 rows (decoding) stream its weight at the machine's
read bandwidth, or, where it cannot, at the kernel's arithmetic bound?

For each layer shape, enough copies of an int8 weight to exceed the last-level cache (``--mib``,
default 384 MiB in all) are called in turn, as a model's layers are during a decoding step, so every
call reads its weight from memory. Beside them, interleaved round by round, a plain read of the same
bytes on as many threads (a vectorized C loop run on Python threads, so no OpenMP fork-join is timed):
the machine's read bandwidth. And the same kernel on one copy of the first rows of the weight (up to 4 MiB),
called over and over so that it stays in cache: the arithmetic bound at this M, as GB/s of weight it
would stream if memory were free. The kernel cannot beat the smaller of the two ("bound"); ``/read`` and
``/bound`` are its ratios to them. All are medians over ``--repeats`` rounds. On a busy machine all
drop together; the ratios are what the kernel controls. With one thread the table also gives GB/s per
second of the process's CPU time (what preemption does not inflate).

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
/* Part `part` of `parts` of each of the `count` buffers of `size` bytes at ptrs: one thread's share of
 * a round over every weight, in one call (so no per-weight Python overhead is timed). */
uint64_t plain_read_parts(const uint8_t **ptrs, int64_t count, int64_t size, int64_t part, int64_t parts)
{
    const int64_t step = (size + parts - 1) / parts, lo = part * step;
    const int64_t n = lo >= size ? 0 : (size - lo < step ? size - lo : step);
    uint64_t r = 0;
    for (int64_t c = 0; c < count; c++) r ^= plain_read(ptrs[c] + lo, n);
    return r;
}
"""


def compiled_library(source: str, prefix: str) -> ctypes.CDLL:
    """C ``source`` compiled with gcc into a library in a new temporary folder, loaded."""
    folder = tempfile.mkdtemp(prefix=prefix)
    path, library = os.path.join(folder, "source.c"), os.path.join(folder, "library.so")
    with open(path, "w") as f:
        f.write(source)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", library, path], check=True)
    return ctypes.CDLL(library)


def plain_reader():
    """The C function plain_read_parts(pointers, count, bytes, part, parts), compiled into a temporary library."""
    fn = compiled_library(READ_SOURCE, "bench_gemv_").plain_read_parts
    fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_uint64
    return fn

# (K, N): Qwen2.5-1.5B's linears (q/o, k/v, gate/up, down), SmolLM2-135M's MLP, a 4096 x 4096 layer.
HOT_BYTES = 4 << 20  # the cached weight: within the last-level cache (and the L2s' sum on small CPUs)
NR_HOT = 128

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
        f"{isa + ' GB/s':>16} {'/read':>5} {'cached':>6} {'/bound':>6}" for isa in isas))
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    read = plain_reader()
    pool = ThreadPoolExecutor(max(args.threads))

    def read_all(weights, threads):
        ptrs = (ctypes.c_void_p * len(weights))(*(w.data_ptr() for w in weights))
        size = weights[0].numel()
        list(pool.map(lambda part: read(ptrs, len(weights), size, part, threads), range(threads)))

    for k, n in SHAPES:
        copies = max(2, args.mib * 2**20 // (n * k))
        weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
        scales = torch.rand(n) + 0.5
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.rows:
                x = torch.randn(m, k)
                runs = {"read": lambda: read_all(weights, threads)}
                # one weight that stays in cache (at most HOT_BYTES of the first rows), called over and over
                hot = weights[0][: max(NR_HOT, min(n, HOT_BYTES // k))].clone()
                for isa in isas:
                    runs[isa] = lambda isa=isa: [
                        _native.mixed_linear(x, w, scales, None, 6.0, isa=isa) for w in weights]
                    runs[isa + " cached"] = lambda isa=isa: [
                        _native.mixed_linear(x, hot, scales[: hot.shape[0]], None, 6.0, isa=isa) for _ in weights]
                times = {name: [] for name in runs}
                cpu = {name: [] for name in runs}
                for round_index in range(args.repeats + 1):
                    for name, run in runs.items():
                        start, start_cpu = time.perf_counter(), time.process_time()
                        run()
                        if round_index:  # round 0 warms up (and checks each layer once)
                            times[name].append((time.perf_counter() - start) / copies)
                            cpu[name].append((time.process_time() - start_cpu) / copies)
                def bytes_read(name):  # per call: the cached runs read their smaller weight
                    return hot.numel() if name.endswith(" cached") else n * k

                rate = {name: bytes_read(name) / statistics.median(t) / 1e9 for name, t in times.items()}
                line = f"{threads:>7} {k:>5} {n:>5} {m:>2} {rate['read']:>9.1f} " + " ".join(
                    f"{rate[isa]:>16.1f} {rate[isa] / rate['read']:>5.2f} {rate[isa + ' cached']:>6.1f} "
                    f"{rate[isa] / min(rate['read'], rate[isa + ' cached']):>6.2f}" for isa in isas)
                if threads == 1:  # one thread: bytes per second of the process's CPU time, which a busy
                    # machine's preemption does not inflate (memory stalls still count)
                    on_cpu = {name: bytes_read(name) / statistics.median(t) / 1e9 for name, t in cpu.items()}
                    line += "   on-CPU GB/s: read " + f"{on_cpu['read']:.1f} " + " ".join(
                        f"{isa} {on_cpu[isa]:.1f} cached {on_cpu[isa + ' cached']:.1f} "
                        f"(/bound {on_cpu[isa] / min(on_cpu['read'], on_cpu[isa + ' cached']):.2f})" for isa in isas)
                print(line, flush=True)
        del weights
    torch.set_num_threads(default_threads)
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
