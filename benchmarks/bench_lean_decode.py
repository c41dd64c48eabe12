"""Question: what does ``llm_int8.lean_decoding`` gain in ``generate()``, on this machine as it is now?

Loads a named model (default SmolLM2-135M), builds its LLM.int8() version, and times ``generate()`` of
``--tokens`` greedy tokens after the demo prompt for fp32, LLM.int8(), and LLM.int8() under
``lean_decoding`` (torch's own ops of each decoding step on one thread, the int8 kernels on torch's
thread count), in turns, medians of ``--repeats`` rounds after a warm-up round; checks that the lean
model generates the same tokens. Prints the machine's load average before and after: on a machine
whose cores other processes hold, torch's per-op fork-joins are what lean decoding removes.

    python benchmarks/bench_lean_decode.py [--model smollm2-135m] [--tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers

    import llm_int8
    from llm_int8 import _native
    from llm_int8.eval.methods import build_method
    from llm_int8.eval.models import load_model, model_title, tokenize
    from llm_int8.eval.speed import cpu_name

    transformers.utils.logging.disable_progress_bar()
    fp32, tokenizer = load_model(args.model)
    int8 = build_method(fp32, "llm_int8")
    prompt = tokenize(tokenizer, "ROMEO:\nBut, soft! what light through yonder window breaks?").unsqueeze(0)

    def generate(model):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                              min_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    runs = {"fp32": (fp32, False), "int8": (int8, False), "int8 lean": (int8, True)}
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, int8 micro-kernel {_native.default_isa()}; model: {model_title(args.model)}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rates, outputs = {name: [] for name in runs}, {}
    with torch.inference_mode():
        for round_index in range(args.repeats + 1):
            for name, (model, lean) in runs.items():
                llm_int8.lean_decoding(model, enabled=lean)
                start = time.perf_counter()
                outputs[name] = generate(model)
                seconds = time.perf_counter() - start
                if round_index:
                    rates[name].append(args.tokens / seconds)
    llm_int8.lean_decoding(int8, enabled=False)
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"generate() of {args.tokens} greedy tokens (prompt included), tokens/s, medians of {args.repeats} rounds "
          "in turns:")
    base = statistics.median(rates["fp32"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:<10} {median:7.2f}  {median / base:5.2f}x fp32   rounds: "
              f"{' '.join(f'{v:.2f}' for v in values)}")
    print(f"lean tokens equal to int8's: {torch.equal(outputs['int8 lean'], outputs['int8'])}")


if __name__ == "__main__":
    main()
