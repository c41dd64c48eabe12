"""Is llm-int8 still faster than fp32 when the machine is busy?

Layer calls (M = 1, 16, 512; K x N = 576x1536, 4096x4096, 4096x11008, alpha = 6 with 0.1 % outlier
columns x30) and SmolLM2-135M greedy decoding (tokens/s), fp32 ``nn.Linear`` vs ``Linear8bitLt``,
in three conditions:

* ``idle``: nothing of ours running beside the measurement;
* ``busy-int8``: another process loops a ``Linear8bitLt`` 576 -> 1536 at M = 512 (a second
  llm-int8 worker, a test run beside a server);
* ``busy-fp32``: another process loops a float32 ``nn.Linear`` 576 -> 1536 at M = 512 (plain
  PyTorch work).

The busy processes use torch's default threads, are started and stopped here, and end on their own
after --busy-limit seconds whatever happens to this one. Within a condition fp32 and int8 calls
alternate (per-call times, medians); ratio = int8 / fp32 time, so below 1 means int8 is faster
(decode: int8 tokens/s over fp32 tokens/s, above 1 means faster). Other programs on the machine
also count as load: the header prints the load average and the busiest other processes.

    python benchmarks/bench_contention.py [--repeats 7] [--no-model] [--conditions idle,busy-int8,busy-fp32]
                                          [--shapes 576x1536,4096x4096,4096x11008] [--ms 1,16,512]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import llm_int8
from llm_int8 import _native, cpu
from llm_int8.eval.speed import cpu_name

SHAPES_KN = [(576, 1536), (4096, 4096), (4096, 11008)]
MS = [1, 16, 512]
OUTLIER_SHARE = 0.001
OUTLIER_SCALE = 30.0
THRESHOLD = 6.0
BUSY_K, BUSY_N, BUSY_M = 576, 1536, 512
CELL_SECONDS = 1.5  # time budget per (shape, M, condition) cell, both implementations together
MAX_CALLS = 200


def other_load() -> str:
    """The load average and the other processes using a CPU right now (what else runs here)."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu", "--no-headers"],
                            capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"load average {load}"
    busy = [" ".join(line.split()[1:]) + "%" for line in ps
            if line.split()[0] != str(os.getpid()) and float(line.split()[1]) >= 5.0][:4]
    return f"load average {load}; other processes over 5% CPU: {', '.join(busy) or 'none'}"


def make_input(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: max(1, round(OUTLIER_SHARE * k))]] *= OUTLIER_SCALE
    return x


# ---------------------------------------------------------------------------------------------
# The busy processes


def busy_worker(kind: str, seconds: float) -> None:
    """Loop one layer at M = BUSY_M until `seconds` have passed (run in a child process)."""
    torch.manual_seed(0)
    layer = nn.Linear(BUSY_K, BUSY_N)
    if kind == "int8":
        layer = llm_int8.Linear8bitLt.from_linear(layer, threshold=THRESHOLD)
    x = make_input(BUSY_M, BUSY_K)
    end = time.monotonic() + seconds
    with torch.inference_mode():
        layer(x)
        print("ready", flush=True)
        while time.monotonic() < end:
            layer(x)


class Busy:
    """Context manager: a busy process of `kind` ("int8", "fp32" or None for idle) while inside."""

    def __init__(self, kind: str | None, limit: float):
        self.kind, self.limit, self.proc = kind, limit, None

    def __enter__(self):
        if self.kind is not None:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--busy-worker", self.kind, "--busy-limit", str(self.limit)],
                stdout=subprocess.PIPE, text=True,
            )
            if self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the busy {self.kind} process did not start")
            time.sleep(1.0)  # let it settle into its loop
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Measurements


def interleaved_median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Per-call times, the functions alternating; as many calls as fit CELL_SECONDS (at least
    `repeats`, at most MAX_CALLS each); medians in seconds."""
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    one_round = time.perf_counter() - start
    calls = max(repeats, min(MAX_CALLS, int(CELL_SECONDS / max(one_round, 1e-9))))
    times = {name: [] for name in fns}
    for r in range(calls):
        names = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def layer_cells(shapes, ms, repeats: int) -> dict:
    results = {}
    with torch.inference_mode():
        for k, n in shapes:
            torch.manual_seed(0)
            fp32 = nn.Linear(k, n)
            int8 = llm_int8.Linear8bitLt.from_linear(fp32, threshold=THRESHOLD)
            for m in ms:
                x = make_input(m, k)
                results[(k, n, m)] = interleaved_median_times({"fp32": lambda: fp32(x), "int8": lambda: int8(x)}, repeats)
    return results


def load_models():
    from llm_int8.eval.experiments import DEMO_PROMPT
    from llm_int8.eval.models import load_model, tokenize

    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader's progress bars
        fp32, tokenizer = load_model()
        int8, _ = load_model()
    llm_int8.quantize_(int8, llm_int8.Int8Config(threshold=THRESHOLD))
    prompt = tokenize(tokenizer, DEMO_PROMPT).unsqueeze(0)
    return {"fp32": fp32, "int8": int8}, prompt, tokenizer.eos_token_id


def decode_cell(models, prompt, pad_id, tokens: int, repeats: int) -> dict[str, float]:
    from llm_int8.eval.speed import decode_tokens_per_second

    return decode_tokens_per_second(models, prompt, tokens, repeats, pad_id)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="fewest calls per layer cell, and decode repeats")
    parser.add_argument("--conditions", default="idle,busy-int8,busy-fp32")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES_KN), help="KxN list")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--no-model", action="store_true", help="skip the SmolLM2 decode rows")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per decode")
    parser.add_argument("--busy-limit", type=float, default=600.0, help="seconds after which a busy process ends itself")
    parser.add_argument("--busy-worker", choices=["int8", "fp32"], help=argparse.SUPPRESS)
    parser.add_argument("--threads-runner", choices=["torch", "own"],
                        help="LLM_INT8_THREADS for this run and its busy processes (default: the library's)")
    args = parser.parse_args(argv)
    if args.threads_runner:  # read when the kernel loads, in this process and the busy ones it starts
        os.environ["LLM_INT8_THREADS"] = args.threads_runner
    if args.busy_worker:
        busy_worker(args.busy_worker, args.busy_limit)
        return

    conditions = args.conditions.split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    kinds = {"idle": None, "busy-int8": "int8", "busy-fp32": "fp32"}
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, llm_int8 {llm_int8.__version__}, "
          f"int8 GEMM path {cpu.gemm_paths()[0]}, kernel threads: {_native.thread_runner()}")
    print(f"busy processes: {BUSY_K} -> {BUSY_N} layer at M = {BUSY_M} in a loop, torch's default threads; "
          f"alpha = {THRESHOLD}, {OUTLIER_SHARE:.1%} outlier columns x{OUTLIER_SCALE:g}")
    print(f"before: {other_load()}")
    models = None if args.no_model else load_models()

    layer_results, decode_results = {}, {}
    for cond in conditions:
        with Busy(kinds[cond], args.busy_limit):
            layer_results[cond] = layer_cells(shapes, ms, args.repeats)
            if models is not None:
                decode_results[cond] = decode_cell(*models, args.tokens, args.repeats)
        print(f"  measured {cond}; {other_load()}", flush=True)

    print("\nlayer call, median ms (ratio = int8 / fp32, lower is better)")
    head = f"{'K':>5} {'N':>6} {'M':>4} "
    head += " ".join(f"{c + ' fp32':>15} {c + ' int8':>15} {'ratio':>6}" for c in conditions)
    print(head)
    for k, n in shapes:
        for m in ms:
            row = f"{k:>5} {n:>6} {m:>4} "
            cells = []
            for c in conditions:
                t = layer_results[c][(k, n, m)]
                cells.append(f"{t['fp32'] * 1e3:>15.3f} {t['int8'] * 1e3:>15.3f} {t['int8'] / t['fp32']:>6.2f}")
            print(row + " ".join(cells))
    if decode_results:
        print(f"\nSmolLM2-135M greedy decode, {args.tokens} new tokens, tokens/s (ratio = int8 / fp32, higher is better)")
        print(" ".join(f"{c:>10}: fp32 {r['fp32']:6.2f}  int8 {r['int8']:6.2f}  ratio {r['int8'] / r['fp32']:5.2f}"
                       for c, r in decode_results.items()))
    print(f"after: {other_load()}")


if __name__ == "__main__":
    main()
