"""Question: with continuous batching (what ``llm-int8 serve --continuous-batching`` runs), how often does a
greedy reply change because other requests share its batch, for fp32, llm-int8, llm-int8 in batch-invariant
mode (``--batch-invariant``) and bitsandbytes 8-bit; and what does the batch-invariant mode cost in speed
and in perplexity?

Each method's model is built as the server builds it (``llm_int8.integrations.serve.load_for_serving``),
one at a time (llm-int8 and its batch-invariant mode are the same model with the layers switched). For the
prompts of ``bench_serve.py``, greedy, ``--max-tokens`` new tokens:

* offline: ``model.generate()`` of each prompt by itself (no continuous batching: the reference);
* alone: each prompt alone through transformers' continuous-batching manager (``generate_batch([p])``,
  the bounded cache of ``llm-int8 serve``);
* together: all prompts in one ``generate_batch`` (they are batched together step by step).

It counts the replies (token ids) equal between these, and times ``together`` (tokens/s) in ``--rounds``
rounds, llm-int8 and its batch-invariant mode interleaved. Perplexity: the int8 model in both modes on
``--windows`` x ``--seq-len`` tokens of the demo corpus (held-out Shakespeare, as ``llm-int8 demo``).

    python benchmarks/bench_invariance.py [--model smollm2-135m] [--prompts 8] [--max-tokens 12] [--rounds 2]
        [--methods fp32 llm-int8 llm-int8-invariant bnb-8bit] [--windows 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import prompt  # noqa: E402  (the same prompts as the server benchmark)

METHODS = ("fp32", "llm-int8", "llm-int8-invariant", "bnb-8bit")


def cb_config():
    from transformers import ContinuousBatchingConfig

    from llm_int8.integrations.serve import CB_MAX_BATCH_TOKENS, CB_NUM_BLOCKS

    return ContinuousBatchingConfig(num_blocks=CB_NUM_BLOCKS, max_batch_tokens=CB_MAX_BATCH_TOKENS)


def generate_batch(model, inputs: list[list[int]], max_tokens: int) -> list[tuple[int, ...]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
    out = model.generate_batch(inputs, generation_config=config, continuous_batching_config=cb_config(), warmup=False)
    replies = list(out.values())  # in the order of the inputs
    if len(replies) != len(inputs) or any(r.error for r in replies):
        raise RuntimeError(f"generate_batch answered {len(replies)} of {len(inputs)}: {[r.error for r in replies if r.error]}")
    return [tuple(r.generated_tokens) for r in replies]


@torch.inference_mode()
def offline(model, inputs: list[list[int]], max_tokens: int) -> list[tuple[int, ...]]:
    replies = []
    for ids in inputs:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        replies.append(tuple(out[0, len(ids):].tolist()))
    return replies


def measure(model, inputs, max_tokens: int) -> dict:
    """Replies offline, alone and together through continuous batching, and the time of together."""
    ref = offline(model, inputs, max_tokens)
    alone = [generate_batch(model, [ids], max_tokens)[0] for ids in inputs]
    start = time.perf_counter()
    together = generate_batch(model, inputs, max_tokens)
    seconds = time.perf_counter() - start
    return {"offline": ref, "alone": alone, "together": together, "seconds": seconds,
            "tokens": sum(len(r) for r in together)}


def same(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the llm-int8 modes, interleaved (the others: one)")
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows (0: skip perplexity)")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    import logging

    from transformers.utils import logging as hf_logging

    from llm_int8 import set_batch_invariant
    from llm_int8.eval.speed import cpu_name
    from llm_int8.integrations.serve import load_for_serving

    hf_logging.set_verbosity_error()  # no line per generate_batch ("eos_token_id not set ...")
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    began = time.perf_counter()
    print(f"bench_invariance: {args.model}, {args.prompts} prompts, {args.max_tokens} greedy tokens, continuous batching "
          f"(transformers' manager, the server's bounded cache); CPU: {cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    results: dict[str, list[dict]] = {}
    ppl = {}
    for quantization in dict.fromkeys("llm-int8" if m.startswith("llm-int8") else m for m in args.methods):
        served = load_for_serving(args.model, quantization)
        model, tokenizer = served.model, served.tokenizer
        inputs = [tokenizer(prompt(i))["input_ids"] for i in range(args.prompts)]
        modes = [m for m in args.methods if m == quantization or (quantization == "llm-int8" and m.startswith("llm-int8"))]
        for r in range(args.rounds if quantization == "llm-int8" else 1):  # the rounds time the two int8 modes
            for method in modes:
                if quantization == "llm-int8":
                    set_batch_invariant(model, method == "llm-int8-invariant")
                results.setdefault(method, []).append(measure(model, inputs, args.max_tokens))
                st = results[method][-1]
                print(f"  round {r + 1} {method}: together {st['tokens'] / st['seconds']:.2f} tokens/s", flush=True)
        if quantization == "llm-int8" and args.windows:
            from llm_int8.eval.data import load_corpus, split_tokens, token_windows
            from llm_int8.eval.models import bos_token_id, tokenize
            from llm_int8.eval.perplexity import perplexity

            evaluation, _ = split_tokens(tokenize(tokenizer, load_corpus("shakespeare")))
            windows = token_windows(evaluation, args.windows, args.seq_len, bos_token_id(args.model, tokenizer))
            for method in modes:
                set_batch_invariant(model, method == "llm-int8-invariant")
                ppl[method] = perplexity(model, windows)
        del model, served

    print()
    header = ["method", "alone = offline", "together = offline", "together = alone", "tok/s together", "perplexity"]
    rows = []
    for method, runs in results.items():
        first = runs[0]
        n = len(first["offline"])
        stable = all(run["together"] == first["together"] and run["alone"] == first["alone"] for run in runs)
        tps = statistics.median(run["tokens"] / run["seconds"] for run in runs)
        rows.append([
            method + ("" if stable else " (*)"), f"{same(first['alone'], first['offline'])}/{n}",
            f"{same(first['together'], first['offline'])}/{n}", f"{same(first['together'], first['alone'])}/{n}",
            f"{tps:.2f}", f"{ppl[method].perplexity:.4f}" if method in ppl else "-",
        ])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"(replies compared as token ids, first round; (*): a later round's replies differed from the first; tok/s: "
          f"all prompts together, median over the rounds: {args.rounds} for llm-int8's modes, 1 for the others)")
    if "llm-int8" in ppl and "llm-int8-invariant" in ppl:
        a, b = ppl["llm-int8"], ppl["llm-int8-invariant"]
        t = {m: statistics.median(run["tokens"] / run["seconds"] for run in results[m]) for m in ("llm-int8", "llm-int8-invariant")}
        print(f"batch-invariant / standard: tokens/s together {t['llm-int8-invariant'] / t['llm-int8']:.2f}x; perplexity "
              f"{b.perplexity:.4f} vs {a.perplexity:.4f} ({100 * (b.perplexity / a.perplexity - 1):+.2f} %) on "
              f"{args.windows} x {args.seq_len} tokens")
    print(f"wall time {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
