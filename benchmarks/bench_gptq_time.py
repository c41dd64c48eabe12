"""How long does the GPTQ calibration of a model take on this machine? Measured on its first decoder blocks.

The rounding (llm_int8.eval.rounding.gptq_rounding, block by block) costs: one pass of the
calibration windows up to the first decoder block, then per block the block's forward over the
windows (accumulating H) and the solve of its layers (factorization of H and the column loop). The
blocks of a transformer all have the same shapes, so the whole model's time is the first pass plus
n_blocks x the per-block time; this script measures the first ``--blocks`` blocks exactly as
gptq_rounding runs them (wall time and this process's CPU time, split into forward and solve) and
prints that extrapolation beside the load average (on a shared machine the wall time is mostly
waiting; the CPU time is what the work costs).

    python benchmarks/bench_gptq_time.py --model qwen2.5-1.5b [--blocks 2] [--calib-windows 16] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from llm_int8.eval import rounding as R
from llm_int8.eval.data import SHAKESPEARE, load_corpus, split_tokens, token_windows
from llm_int8.eval.models import bos_token_id, load_model, tokenize
from llm_int8.eval.speed import cpu_name


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load {load_average()}", flush=True)
    lm, tokenizer = load_model(args.model)
    _, held_out = split_tokens(tokenize(tokenizer, load_corpus(SHAKESPEARE)))
    windows = token_windows(held_out, args.calib_windows, args.seq_len, bos_token_id(args.model, tokenizer))
    modules = {name: module for name, module, _ in R.linear_layers(lm)}
    blocks = R.decoder_blocks(lm, set(modules))
    if blocks is None:
        raise SystemExit("the model's layers are not all in one list of decoder blocks")
    result = R.RoundingResult({}, {}, {}, {}, 0, 0.0)
    with torch.inference_mode():
        w0, c0 = clock()
        inputs = R._block_inputs(lm, blocks[0][1], windows, None)
        w1, c1 = clock()
        print(f"first pass (to block 0) over {windows.shape[0]} x {windows.shape[1]} tokens: {w1 - w0:.1f} s wall, "
              f"{c1 - c0:.1f} s CPU", flush=True)
        per_block = []
        for block_name, block in blocks[: args.blocks]:
            wanted = {name for name in modules if name.startswith(f"{block_name}.")}
            fw0, fc0 = clock()
            outputs = []
            with R.HessianHooks(lm, wanted) as hooks:
                for block_args, kwargs in inputs:
                    out = block(*block_args, **kwargs)
                    outputs.append(R._with_hidden(block_args, kwargs, out[0] if isinstance(out, tuple) else out))
            inputs = outputs
            fw1, fc1 = clock()
            R._solve_sites(hooks, modules, R.DAMP, result)
            sw1, sc1 = clock()
            per_block.append((fw1 - fw0, fc1 - fc0, sw1 - fw1, sc1 - fc1))
            print(f"{block_name}: forward + H {fw1 - fw0:.1f} s wall / {fc1 - fc0:.1f} s CPU; solve {sw1 - fw1:.1f} s wall / "
                  f"{sc1 - fc1:.1f} s CPU (load {load_average()})", flush=True)
    n = len(blocks)
    mean = [sum(column) / len(per_block) for column in zip(*per_block)]
    wall = (w1 - w0) + n * (mean[0] + mean[2])
    cpu = (c1 - c0) + n * (mean[1] + mean[3])
    print(f"{args.model}: {n} blocks; whole-model GPTQ calibration extrapolated from {len(per_block)} measured blocks: "
          f"{cpu / 60:.1f} min of CPU ({n} x {mean[1]:.1f} s forward + {mean[3]:.1f} s solve, plus the first pass), "
          f"{wall / 60:.1f} min wall at this load ({load_average()}); threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
