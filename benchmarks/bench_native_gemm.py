"""Benchmark the native int8 GEMM (each micro-kernel this CPU runs) against fp32 F.linear and torch._int_mm.

    python benchmarks/bench_native_gemm.py [--reps 7] [--threads T] [--m 1,16,128,512]

For each shape C[M, N] = A[M, K] @ B[N, K]^T it times, in interleaved rounds (the order rotates
every round, so drifting machine load hits all contenders alike):

* ``fp32``   torch.nn.functional.linear(x_fp32 [M, K], w_fp32 [N, K])
* ``int_mm`` torch._int_mm(a_int8, b_int8.T)  (a scalar loop on CPUs without AVX-512 VNNI, so there
  it is only timed up to --int-mm-max-macs multiply-adds, with fewer repeats)
* ``avx2`` / ``avx512_vnni``  llm_int8._native.int8_gemm_nt(a_int8, b_int8, isa=...), every
  micro-kernel this CPU runs

and prints medians (and minimums) in milliseconds plus the ratio of the package's default kernel
(marked *) to fp32.  The machine may be
shared: the load average is printed before and after; trust medians over single numbers.

Caches: by default the same weight is multiplied again and again, so a weight that fits the
last-level cache (the 16 MiB int8 4096 x 4096 one does on a 32 MiB L3; its 64 MiB fp32 twin does
not) is partly served from cache, which flatters the int8 kernel at small M.  --flush-cache reads
a large buffer before every timed call, which is closer to running a model whose layers do not
fit in cache together.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from llm_int8 import _native  # noqa: E402
from llm_int8.eval.speed import cpu_name  # noqa: E402

SHAPES_KN = [(576, 1536), (4096, 4096), (4096, 11008)]
M_DEFAULT = [1, 16, 128, 512]


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


_FLUSH: torch.Tensor | None = None


def timed(fn) -> float:
    if _FLUSH is not None:
        _FLUSH.sum()  # stream a buffer much larger than the last-level cache
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds per shape (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    p.add_argument("--m", default=",".join(map(str, M_DEFAULT)), help="comma-separated M values")
    p.add_argument("--int-mm-max-macs", type=float, default=1e9,
                   help="time torch._int_mm only up to this many multiply-adds (0: never)")
    p.add_argument("--int-mm-reps", type=int, default=2, help="rounds for torch._int_mm (default 2)")
    p.add_argument("--flush-cache", action="store_true",
                   help="evict the caches (read a 256 MiB buffer) before every timed call")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_cache:
        global _FLUSH
        _FLUSH = torch.ones(64 * 2**20, dtype=torch.float32)
    ms = [int(v) for v in args.m.split(",") if v]

    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs), "
          f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")
    if not _native.available():
        print(f"native kernel unavailable: {_native.unavailable_reason()}")
        sys.exit(1)
    isas, default = _native.isas(), _native.default_isa()
    int_mm_fast = torch.backends.cpu.get_cpu_capability() == "AVX512"
    print(f"native library: {_native.library_path()}; micro-kernels {', '.join(isas)} (default * {default})")
    print(f"load average before: {load_avg()}; caches flushed before each call: {args.flush_cache}")
    print(f"median of {args.reps} interleaved rounds (min in brackets), milliseconds\n")

    cols = ["fp32", "int_mm", *isas]
    hdr = f"{'M':>5} {'K':>5} {'N':>6} | " + " | ".join(f"{c + ('*' if c == default else ''):>19}" for c in cols)
    hdr += f" | {'*/fp32':>7} | {'*/int_mm':>8} | {'* GMAC/s':>9}"
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES_KN:
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        w = b.float()
        for m in ms:
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
            x = a.float()
            macs = m * n * k
            runs = {"fp32": lambda: F.linear(x, w)}
            if k > 1 and (int_mm_fast or 0 < macs <= args.int_mm_max_macs):
                runs["int_mm"] = lambda: torch._int_mm(a, b.T)
            for isa in isas:
                runs[isa] = lambda isa=isa: _native.int8_gemm_nt(a, b, isa=isa)
            for fn in runs.values():  # warm-up (and first-use build of the library)
                fn()
            times: dict[str, list[float]] = {key: [] for key in runs}
            names = list(runs)
            int_mm_reps = args.reps if int_mm_fast else args.int_mm_reps
            for r in range(args.reps):
                order = names[r % len(names):] + names[: r % len(names)]
                for key in order:
                    if key == "int_mm" and len(times[key]) >= int_mm_reps:
                        continue
                    times[key].append(timed(runs[key]))

            def cell(key: str) -> str:
                if key not in times:
                    return f"{'skipped':>19}"
                t = times[key]
                return f"{statistics.median(t) * 1e3:9.2f} [{min(t) * 1e3:7.2f}]"

            ours = statistics.median(times[default])
            fp32 = statistics.median(times["fp32"])
            vs_int_mm = f"{ours / statistics.median(times['int_mm']):8.3f}" if "int_mm" in times else f"{'':>8}"
            print(f"{m:5d} {k:5d} {n:6d} | " + " | ".join(cell(c) for c in cols)
                  + f" | {ours / fp32:7.3f} | {vs_int_mm} | {macs / ours / 1e9:9.1f}", flush=True)
    print(f"\nload average after: {load_avg()}")


if __name__ == "__main__":
    main()
