"""Question: where does a decoding step's time go, fp32 vs LLM.int8(), on a real model?

Loads a model (default: Qwen2.5-Coder-1.5B, a third-party GGUF repack whose 4-6-bit quants are
dequantized to float32 on load), builds its LLM.int8() version (alpha = 6, the library's defaults),
and times ``generate()`` of ``--tokens`` greedy tokens after a short prompt, the two models in turns,
at each thread count asked for. Forward hooks split each step's wall time into the converted linear
layers (nn.Linear in fp32, Linear8bitLt in int8), the output head (float in both) and the rest
(attention, norms, embedding, the model's Python); the figures are per generated token, medians over
``--repeats`` rounds. The hooks themselves cost a few microseconds per layer call, the same for both.
Then, with ``--prefill T`` (default 512; 0 skips it), one forward over the first T tokens of
Shakespeare, split the same way, at the default thread count.

    python benchmarks/bench_decode.py [--model qwen2.5-1.5b] [--threads 2 1] [--repeats 3] [--tokens 16] [--prefill 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


class StepTimer:
    """Wall time spent inside the hooked modules, by kind, while active."""

    def __init__(self, kinds: dict[str, list[torch.nn.Module]]):
        self.seconds = dict.fromkeys(kinds, 0.0)
        self._start = {}
        self._handles = []
        for kind, modules in kinds.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave(kind)))

    def _enter(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _leave(self, kind):
        def hook(module, args, output):
            self.seconds[kind] += time.perf_counter() - self._start.pop(id(module))

        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512, help="tokens of the prefill forward (0: skip it)")
    args = parser.parse_args()

    import transformers

    from llm_int8 import Linear8bitLt, memory_footprint
    from llm_int8.convert import select_layers
    from llm_int8.eval.methods import build_method
    from llm_int8.eval.models import load_model, model_title, tokenize
    from llm_int8.eval.data import load_corpus
    from llm_int8.eval.speed import cpu_name

    transformers.utils.logging.disable_progress_bar()
    fp32, tokenizer = load_model(args.model)
    int8 = build_method(fp32, "llm_int8")
    head = fp32.get_output_embeddings()
    converted = set(select_layers(fp32)[0])
    kinds = {
        "fp32": {"linears": [m for n, m in fp32.named_modules() if n in converted], "head": [head]},
        "int8": {"linears": [m for m in int8.modules() if isinstance(m, Linear8bitLt)], "head": [int8.get_output_embeddings()]},
    }
    models = {"fp32": fp32, "int8": int8}
    prompt = tokenize(tokenizer, "ROMEO:\nBut, soft! what light through yonder window breaks?").unsqueeze(0)

    def generate(model):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                       min_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"model: {model_title(args.model)}; memory fp32 {memory_footprint(fp32) / 2**20:.0f} MiB, "
          f"int8 {memory_footprint(int8) / 2**20:.0f} MiB (embedding and head float)")
    print(f"per generated token (ms), generate() of {args.tokens} tokens, medians of {args.repeats} rounds in turns:")
    header = f"{'threads':>7} {'model':>5} {'total':>8} {'linears':>8} {'head':>7} {'rest':>7} {'tokens/s':>9} {'vs fp32':>8}"
    print(header)
    default_threads = torch.get_num_threads()

    def split_rounds(run, threads: int) -> dict[str, tuple[float, float, float]]:
        """Median seconds (total, linears, head) of run(model) per model, in turns, round 0 a warm-up."""
        torch.set_num_threads(threads)
        rounds = {name: [] for name in models}
        for round_index in range(args.repeats + 1):
            for name, model in models.items():
                timer = StepTimer(kinds[name])
                start = time.perf_counter()
                run(model)
                total = time.perf_counter() - start
                timer.remove()
                if round_index:
                    rounds[name].append((total, timer.seconds["linears"], timer.seconds["head"]))
        torch.set_num_threads(default_threads)
        return {name: tuple(statistics.median(r[i] for r in runs) for i in range(3)) for name, runs in rounds.items()}

    def print_rows(threads: int, medians, per: int) -> None:
        rates = {name: per / total for name, (total, _, _) in medians.items()}
        for name, (total, linears, head) in medians.items():
            total, linears, head = (v / per * 1e3 for v in (total, linears, head))
            print(f"{threads:>7} {name:>5} {total:>8.2f} {linears:>8.2f} {head:>7.2f} {total - linears - head:>7.2f} "
                  f"{rates[name]:>9.2f} {rates[name] / rates['fp32']:>7.2f}x")

    with torch.inference_mode():
        for threads in args.threads:
            print_rows(threads, split_rounds(generate, threads), args.tokens)
        print("(the prompt's prefill is included in the total, spread over the tokens; 'rest' is everything outside the "
              "converted linears and the head)")
        if args.prefill:
            ids = tokenize(tokenizer, load_corpus()[:20 * args.prefill])[: args.prefill].unsqueeze(0)
            print(f"\nprefill: one forward over {ids.shape[1]} tokens of Shakespeare, per token (ms), medians of "
                  f"{args.repeats} rounds in turns:")
            print(header)
            print_rows(default_threads, split_rounds(lambda model: model(input_ids=ids), default_threads), ids.shape[1])


if __name__ == "__main__":
    main()
