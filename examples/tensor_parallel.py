"""Tensor-parallel LLM.int8() inference: one int8 model split over the processes of torchrun.

Each process loads the int8 model, then ``llm_int8.parallel.tensor_parallel`` keeps its shard of every
layer in the model's tensor-parallel plan (transformers' ``base_model_tp_plan``: q/k/v/gate/up split
by output rows with their SCB scales, o/down by input columns, partial outputs all-reduced) and frees
the rest. Perplexity on the demo windows (Shakespeare), the int8 weight bytes each rank holds, time
per window and peak memory per rank:

    python examples/tensor_parallel.py --model qwen2.5-0.5b                       # one process: the reference
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model qwen2.5-0.5b  # 2 processes (gloo on CPU)
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model smollm2-135m --plan mlp

SmolLM2-135M has 9 attention heads and 3 KV heads, which 2 ranks cannot split: ``--plan mlp`` shards
its MLP only (attention replicated). On GPUs, one process per GPU: the same command; the process
group is NCCL and the mesh CUDA when GPUs are there: each rank shards the model in host memory,
then moves its shards to ``cuda:LOCAL_RANK`` (not tried here: no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llm_int8 import LLMInt8Config
from llm_int8.eval.data import load_corpus, split_tokens, token_windows
from llm_int8.eval.models import load_int8_model, tokenize
from llm_int8.eval.perplexity import perplexity
from llm_int8.parallel import default_plan, int8_weight_bytes, tensor_parallel


def rss_mib() -> float:
    """This process's resident memory now (Linux), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a named model or a local checkpoint folder")
    parser.add_argument("--plan", choices=["auto", "mlp"], default="auto",
                        help="auto: the model's tensor-parallel plan; mlp: its MLP entries only")
    parser.add_argument("--threshold", type=float, default=6.0)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the figures here (rank 0)")
    args = parser.parse_args(argv)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if world_size > 1:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0

    model, tokenizer = load_int8_model(args.model, quantization_config=LLMInt8Config(threshold=args.threshold))
    full_bytes = int8_weight_bytes(model)
    if world_size > 1:
        plan = default_plan(model)
        if args.plan == "mlp":
            plan = {key: style for key, style in plan.items() if ".mlp." in key}
        # sharded where it was loaded (host memory); then each rank moves only its shards to its device
        tensor_parallel(model, init_device_mesh(device.type, (world_size,)), plan)
    model.to(device)
    text = load_corpus("shakespeare")
    evaluation, _ = split_tokens(tokenize(tokenizer, text))
    windows = token_windows(evaluation, args.windows, args.seq_len).to(device)
    result = perplexity(model, windows)

    mine = {
        "rank": rank, "int8_weight_bytes": int8_weight_bytes(model), "median_seconds_per_window": result.seconds_per_window,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_mib": rss_mib(),
    }
    per_rank = [mine]
    if world_size > 1:
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, mine)
    if rank == 0:
        summary = {
            "model": args.model, "world_size": world_size, "plan": args.plan, "threads": torch.get_num_threads(),
            "windows": args.windows, "seq_len": args.seq_len, "perplexity": result.perplexity, "nll": result.nll,
            "n_tokens": result.n_tokens, "int8_weight_bytes_whole": full_bytes, "per_rank": per_rank,
        }
        print(f"{args.model}: {world_size} process(es), plan {args.plan}, {torch.get_num_threads()} threads each: "
              f"perplexity {result.perplexity:.4f} on {args.windows} x {args.seq_len} tokens")
        for entry in per_rank:
            print(f"  rank {entry['rank']}: int8 weights {entry['int8_weight_bytes'] / 2**20:.1f} MiB of "
                  f"{full_bytes / 2**20:.1f}, {entry['median_seconds_per_window']:.3f} s/window, "
                  f"RSS {entry['rss_mib']:.0f} MiB (peak {entry['peak_rss_mib']:.0f} MiB)")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
