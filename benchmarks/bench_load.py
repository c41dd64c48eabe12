"""Question: how much memory (and time) does loading a checkpoint as int8 take, compared with fp32?

Two kinds of checkpoint, each load in a fresh subprocess, peak RSS per case:

**float safetensors** (default): writes a random-init, Llama-shaped float32 checkpoint of about 1 GB
(sharded safetensors) to a temp dir, then loads it:

* baseline: the interpreter with torch, transformers and llm_int8 imported, nothing loaded;
* fp32:     ``from_pretrained(path, dtype=torch.float32)``; its weights stay views into the mmap'd
            files until used, so ``fp32-touched`` also reads every weight once, as a forward would;
* int8:     ``from_pretrained(path, quantization_config=LLMInt8Config())``;
* int8-no-release: the same with ``llm_int8.integrations.hf.RELEASE_MEMORY_WHILE_LOADING = False``:
            the checkpoint pages each weight was read from stay mapped until loading ends (transformers'
            own behaviour) and the heap is not trimmed, for comparison.

**GGUF** (``--gguf MODEL``, a name such as ``qwen2.5-1.5b`` or a path to a .gguf file):

* baseline:    the interpreter with torch, transformers, gguf and llm_int8's GGUF loader imported;
* fp32:        transformers' own GGUF load, ``from_pretrained(dir, gguf_file=..., dtype=torch.float32)``
               (every tensor dequantized into one float state dict, then the model built from it);
* fp32+int8:   the same followed by ``quantize_model`` (the int8 route before the streaming loader);
* int8-stream: ``llm_int8.integrations.gguf.load_gguf(path, LLMInt8Config())``: the int8 model built
               tensor by tensor (its config derived from the file's metadata, as transformers does).

Target (issues 3 and 15): int8 peak RSS <= 1.3 x (int8 footprint + baseline RSS), and (GGUF) faster
than transformers' fp32 load. All figures come from one invocation; with ``--repeat N`` the cases run
N times in turns and every figure is the median.

    python benchmarks/bench_load.py [--layers 4] [--keep DIR] [--repeat 3]
    python benchmarks/bench_load.py --gguf qwen2.5-1.5b [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MIB = 2**20
SHARD_BYTES = 256 * MIB
TARGET_RATIO = 1.3
CASES = ("baseline", "fp32", "fp32-touched", "int8-no-release", "int8")
GGUF_CASES = ("baseline", "fp32", "fp32+int8", "int8-stream")
# Llama-shaped; the small vocabulary keeps the (float, unquantized) embeddings from dominating.
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False)


def write_checkpoint(path: str, layers: int) -> int:
    """A random float32 checkpoint in shards of about SHARD_BYTES; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, total, index = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes, index = {}, 0, index + 1

    for key, meta in skeleton.state_dict().items():
        tensor = torch.randn(meta.shape, generator=generator) * 0.02
        if key.endswith("norm.weight"):
            tensor = torch.ones(meta.shape)
        shard[key] = tensor
        shard_bytes += tensor.numel() * 4
        total += tensor.numel() * 4
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(path)
    return total


def child(case: str, path: str) -> None:
    """Runs in a fresh interpreter: load one way, print footprint and this process's RSS figures as JSON."""
    import torch
    import transformers

    import llm_int8
    from llm_int8.integrations import hf

    def read_every_weight(model):
        # Float weights that are views into the mmap'd checkpoint are paged in on first use: read
        # them all, as the first forward pass would.
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.sum()

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sampler = RssSampler()
    sampler.start()
    footprint = released = 0
    model = None
    if case != "baseline":
        kwargs = {"dtype": torch.float32}
        if case.startswith("int8"):
            kwargs["quantization_config"] = llm_int8.LLMInt8Config()
            hf.RELEASE_MEMORY_WHILE_LOADING = case == "int8"
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        footprint = model.get_memory_footprint()
        if case.startswith("int8"):
            released = model.hf_quantizer.checkpoint_bytes_released
        if case == "fp32-touched":
            read_every_weight(model)
    sampler.stop()
    peak = peak_rss()
    if model is not None:
        read_every_weight(model)  # after the peak was taken (except for fp32-touched, where it is part of it)
    print(json.dumps({"footprint": footprint, "peak_rss": peak, "released": released, "in_use": current_rss(),
                      **sampler.peaks}))


def gguf_child(case: str, path: str) -> None:
    """Runs in a fresh interpreter: load the GGUF file one way, print time, footprint and RSS as JSON."""
    import torch
    import transformers

    import llm_int8
    from llm_int8.integrations import gguf
    from llm_int8.integrations.hf import quantize_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    footprint = 0
    if case != "baseline":
        if case == "int8-stream":
            model = gguf.load_gguf(path, llm_int8.LLMInt8Config())
        else:
            folder, name = os.path.split(path)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            if case == "fp32+int8":
                quantize_model(model, llm_int8.LLMInt8Config())
        footprint = model.get_memory_footprint()
    seconds = time.perf_counter() - start
    sampler.stop()
    print(json.dumps({"footprint": footprint, "peak_rss": peak_rss(), "seconds": seconds, **sampler.peaks}))


class RssSampler(threading.Thread):
    """Samples /proc/self/status every few ms: peak anonymous and file-backed resident memory.

    VmHWM gives only their sum; the file-backed part is the mmap'd checkpoint (clean page cache
    the kernel can drop), the anonymous part is memory the load itself allocated.
    """

    def __init__(self, period_s: float = 0.005):
        super().__init__(daemon=True)
        self.period_s, self.peaks, self._done = period_s, {"peak_anon": 0, "peak_file": 0}, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            time.sleep(self.period_s)

    def sample(self):
        from llm_int8 import _memory  # (imported by the children that sample; the parent only writes files)

        for key, field in (("peak_anon", "RssAnon"), ("peak_file", "RssFile")):
            self.peaks[key] = max(self.peaks[key], _memory.status_bytes(field))

    def stop(self):
        self._done.set()
        self.join()
        self.sample()


def peak_rss() -> int:
    """This process's peak resident set in bytes.

    VmHWM belongs to the address space, which exec replaces; getrusage's ru_maxrss would carry
    over the peak of the parent that forked us (the one that wrote the checkpoint).
    """
    from llm_int8 import _memory

    return _memory.status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: KiB


def current_rss() -> int:
    from llm_int8 import _memory

    return _memory.status_bytes("VmRSS")


def measure(case: str, path: str, flag: str = "--child") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, flag, case, path], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (4 gives about 1 GB in fp32)")
    parser.add_argument("--keep", help="write the checkpoint here (and reuse it if present) instead of a temp dir")
    parser.add_argument("--repeat", type=int, default=1, help="run each case this many times; report medians")
    parser.add_argument("--gguf", metavar="MODEL", help="measure a GGUF load instead: a model name (qwen2.5-1.5b) or a .gguf path")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--gguf-child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.gguf_child:
        gguf_child(*args.gguf_child)
        return
    if args.gguf:
        gguf_main(args.gguf, args.repeat)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or tmp
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(os.path.join(path, "config.json")):
            size = write_checkpoint(path, args.layers)
        else:
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        runs = {case: [] for case in CASES}
        for _ in range(args.repeat):  # interleaved, so that drifts in the machine's load hit every case alike
            for case in CASES:
                runs[case].append(measure(case, path))
        results = {case: median_of(r) for case, r in runs.items()}

    base, fp32 = results["baseline"], results["fp32-touched"]
    print(f"machine: {describe_machine()}")
    print(f"checkpoint: {size / MIB:.0f} MiB float32 in {SHARD_BYTES // MIB} MiB shards, Llama-shaped, {args.layers} layers, {SHAPE}")
    what = f"median of {args.repeat} runs" if args.repeat > 1 else "one run"
    print(f"{'case':<17}{'footprint':>10}{'peak RSS':>10}{'anon peak':>11}{'file peak':>11}{'released':>10}"
          f"{'in use':>8}   (MiB, {what})")
    for case in CASES:
        r = results[case]
        print(f"{case:<17}{r['footprint'] / MIB:>10.0f}{r['peak_rss'] / MIB:>10.0f}{r['peak_anon'] / MIB:>11.0f}"
              f"{r['peak_file'] / MIB:>11.0f}{r['released'] / MIB:>10.0f}{r['in_use'] / MIB:>8.0f}")
    print("(peak: during loading; released: resident checkpoint pages given back while loading;\n"
          " in use: RSS once every weight has been read after loading, as a first forward pass would)")
    print(f"footprint int8 / fp32:                    {results['int8']['footprint'] / fp32['footprint']:.3f}")
    for case in ("int8", "int8-no-release"):
        r = results[case]
        budget, anon_budget = r["footprint"] + base["peak_rss"], r["footprint"] + base["peak_anon"]
        print(f"{case}:")
        print(f"  int8 footprint + baseline RSS:          {r['footprint'] / MIB:.0f} + {base['peak_rss'] / MIB:.0f} = {budget / MIB:.0f} MiB")
        print(f"  peak RSS (total) / that:                {r['peak_rss'] / MIB:.0f} / {budget / MIB:.0f} = "
              f"{r['peak_rss'] / budget:.3f}   (target <= {TARGET_RATIO})")
        print(f"  peak anon / (footprint + baseline anon): {r['peak_anon'] / MIB:.0f} / {anon_budget / MIB:.0f} = "
              f"{r['peak_anon'] / anon_budget:.3f}   (the float embeddings and head, in the footprint, are file pages)")
        print(f"  RSS in use / (footprint + baseline RSS): {r['in_use'] / MIB:.0f} / {budget / MIB:.0f} = "
              f"{r['in_use'] / budget:.3f}")
        print(f"  peak RSS / fp32 peak RSS (paged in):    {r['peak_rss'] / fp32['peak_rss']:.3f}")


def describe_machine() -> str:
    from llm_int8.eval.speed import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}"


def gguf_main(model: str, repeat: int) -> None:
    if os.path.isfile(model):
        path, title = model, os.path.basename(model)
    else:
        from llm_int8.eval import models

        directory, name = models.resolve_model(model)
        path, title = os.path.join(directory, name), models.model_title(model)
    runs = {case: [] for case in GGUF_CASES}
    for _ in range(repeat):  # in turns, so that drifts in the machine's load hit every case alike
        for case in GGUF_CASES:
            runs[case].append(measure(case, path, "--gguf-child"))
    results = {case: median_of(r) for case, r in runs.items()}
    base, fp32, stream = results["baseline"], results["fp32"], results["int8-stream"]
    what = f"median of {repeat} runs" if repeat > 1 else "one run"
    print(f"machine: {describe_machine()}")
    print(f"checkpoint: {title}, {os.path.getsize(path) / MIB:.0f} MiB GGUF ({path})")
    print("(a third-party GGUF repack: its 4-6-bit quants are dequantized on load, to float32 or straight to int8)")
    print(f"{'case':<13}{'footprint':>10}{'peak RSS':>10}{'anon peak':>11}{'file peak':>11}{'seconds':>9}   (MiB, {what})")
    for case in GGUF_CASES:
        r = results[case]
        print(f"{case:<13}{r['footprint'] / MIB:>10.0f}{r['peak_rss'] / MIB:>10.0f}{r['peak_anon'] / MIB:>11.0f}"
              f"{r['peak_file'] / MIB:>11.0f}{r['seconds']:>9.1f}")
    budget = stream["footprint"] + base["peak_rss"]
    print(f"int8-stream: int8 footprint + baseline RSS = {stream['footprint'] / MIB:.0f} + {base['peak_rss'] / MIB:.0f} = "
          f"{budget / MIB:.0f} MiB")
    print(f"  peak RSS / that:            {stream['peak_rss'] / MIB:.0f} / {budget / MIB:.0f} = "
          f"{stream['peak_rss'] / budget:.3f}   (target <= {TARGET_RATIO})")
    print(f"  peak RSS vs fp32 load:      {stream['peak_rss'] / fp32['peak_rss']:.3f}x "
          f"(fp32+int8: {results['fp32+int8']['peak_rss'] / fp32['peak_rss']:.3f}x)")
    print(f"  load time vs fp32 load:     {stream['seconds']:.1f} s / {fp32['seconds']:.1f} s = "
          f"{stream['seconds'] / fp32['seconds']:.3f}x (fp32+int8: {results['fp32+int8']['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
