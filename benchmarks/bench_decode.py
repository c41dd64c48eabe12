"""Question: where does a decoding step's time go, fp32 vs LLM.int8(), on a real model?

Loads a model (default: Qwen2.5-Coder-1.5B, a third-party GGUF repack whose 4-6-bit quants are
dequantized to float32 on load), builds its LLM.int8() version (alpha = 6, the library's defaults),
and times ``generate()`` of ``--tokens`` greedy tokens after a short prompt, the two models in turns,
at each thread count asked for. Forward hooks split each step's wall time into the converted linear
layers (nn.Linear in fp32, Linear8bitLt in int8), the output head (float in both) and the rest
(attention, norms, embedding, the model's Python); the figures are per generated token, medians over
``--repeats`` rounds. The hooks themselves cost a few microseconds per layer call, the same for both.
Exactly ``--tokens`` tokens come out of every ``generate()`` here because the end-of-text tokens are
masked (``llm_int8.eval.speed.exact_length``), not through ``min_new_tokens``, whose processor builds a
vocabulary-wide mask every step (~1.4 ms on Qwen's 151936 ids): harness cost that llama.cpp's loop has
not either.
Then, with ``--prefill T`` (default 512; 0 skips it), one forward over the first T tokens of
Shakespeare, split the same way, at the default thread count. ``--no-split`` skips these tables.

Last, side by side at the default thread count, every engine once per round in turns: decode
tokens/s with the prompt excluded (the time from the first new token to the last, over the tokens
after the first: each is one decode step), the T-token prefill (logits of the last position only, as
``generate()`` and llama.cpp compute them), and a batch-``--batch`` decode row (that many prompts of
different lengths, left padded, through one ``generate()``; 0 skips it), fp32 against int8.
``--anchor llama.cpp`` adds llama.cpp's Q8_0 and F32 of the same GGUF file (requantized by llama.cpp
and cached beside it; llama.cpp tokenizes the same text itself, and the token counts are printed).
It needs llama-cpp-python, which builds llama.cpp from source (several minutes; not part of CI):
``bash scripts/setup.sh --bench``.

    python benchmarks/bench_decode.py [--model qwen2.5-1.5b] [--threads 2 1] [--repeats 3] [--tokens 16] [--prefill 512]
                                      [--anchor llama.cpp] [--anchor-types Q8_0 F32] [--batch 8] [--no-split]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

DEMO_TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?"


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
    parser.add_argument("--anchor", choices=["llama.cpp"], default=None,
                        help="time llama.cpp on the same GGUF file side by side (needs llama-cpp-python: bash scripts/setup.sh --bench)")
    parser.add_argument("--anchor-types", nargs="+", choices=["Q8_0", "F32"], default=["Q8_0", "F32"],
                        help="the llama.cpp file types to time (default: both)")
    parser.add_argument("--batch", type=int, default=8, help="sequences of the batched decode row (0: skip it)")
    parser.add_argument("--no-split", action="store_true", help="skip the per-part tables, only the side-by-side one")
    parser.add_argument("--int8-head", action="store_true", help="the int8 model's output head in int8 too "
                        "(quantize_head; an untied head only)")
    parser.add_argument("--lean", action="store_true", help="the int8 model decodes under llm_int8.lean_decoding "
                        "(torch's small ops on one thread, the int8 kernels on all)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a run cut short by a time limit keeps what it printed
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (the decode rate is timed after the first new token)")
    if args.anchor:
        from llm_int8.eval import llamacpp

        if not llamacpp.available():
            parser.exit(2, f"bench_decode.py: error: {llamacpp.INSTALL}\n")

    import transformers

    from llm_int8 import Linear8bitLt, memory_footprint
    from llm_int8.convert import output_head_name, select_layers
    from llm_int8.eval.methods import build_method
    from llm_int8.eval.models import load_model, model_title, tokenize
    from llm_int8.eval.data import load_corpus
    from llm_int8.eval.speed import cpu_name, exact_length

    transformers.utils.logging.disable_progress_bar()
    fp32, tokenizer = load_model(args.model)
    int8 = build_method(fp32, "llm_int8")
    if args.int8_head:
        head_name = output_head_name(int8)
        float_head = int8.get_submodule(head_name)
        if any(float_head.weight is m.weight for m in int8.modules() if isinstance(m, torch.nn.Embedding)):
            parser.exit(2, "bench_decode.py: error: --int8-head takes an untied head; this model's is tied to its "
                           "embedding (quantize it with Int8Config(quantize_head=True) instead)\n")
        parent, _, child = head_name.rpartition(".")
        setattr(int8.get_submodule(parent), child, Linear8bitLt.from_linear(float_head))
    if args.lean:
        import llm_int8

        llm_int8.lean_decoding(int8)
    head = fp32.get_output_embeddings()
    converted = set(select_layers(fp32)[0])
    int8_head = int8.get_output_embeddings()  # (with --int8-head a Linear8bitLt, timed as the head only)
    kinds = {
        "fp32": {"linears": [m for n, m in fp32.named_modules() if n in converted], "head": [head]},
        "int8": {"linears": [m for m in int8.modules() if isinstance(m, Linear8bitLt) and m is not int8_head],
                 "head": [int8_head]},
    }
    models = {"fp32": fp32, "int8": int8}
    prompt = tokenize(tokenizer, DEMO_TEXT).unsqueeze(0)

    def generate(model):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       pad_token_id=tokenizer.eos_token_id, **exact_length(model, args.tokens))

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"model: {model_title(args.model)}; memory fp32 {memory_footprint(fp32) / 2**20:.0f} MiB, "
          f"int8 {memory_footprint(int8) / 2**20:.0f} MiB (embedding float, head {'int8' if args.int8_head else 'float'})")
    if args.no_split:
        side_by_side(args, fp32, int8, tokenizer, prompt)
        return
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
    print()
    side_by_side(args, fp32, int8, tokenizer, prompt)


BATCH_PROMPTS = [  # lines of different lengths: the batched row pads them on the left
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
    "HAMLET:\nTo be, or not to be, that is the question:",
    "MACBETH:\nTomorrow, and tomorrow, and tomorrow,",
    "PORTIA:\nThe quality of mercy is not strain'd,",
    "KING RICHARD III:\nNow is the winter of our discontent",
    "PUCK:\nIf we shadows have offended,",
    "LEAR:\nBlow, winds, and crack your cheeks!",
]


def common_prefix(a, b) -> int:
    a, b = list(map(int, a)), list(map(int, b))
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def side_by_side(args, fp32, int8, tokenizer, prompt) -> None:
    """fp32, int8 and (with --anchor) llama.cpp: decode with the prompt excluded, prefill, and the
    batched decode row; every engine once per round, in turns, a warm-up round first."""
    from llm_int8.cpu import gemm_paths
    from llm_int8.eval.data import load_corpus
    from llm_int8.eval.models import resolve_model, tokenize
    from llm_int8.eval.speed import cpu_name, generate_token_times, steady_decode_rate, timed_rounds, token_time_rounds

    threads = torch.get_num_threads()
    eos = tokenizer.eos_token_id
    text = load_corpus()[: 20 * max(args.prefill, 1)]
    ids = tokenize(tokenizer, text)[: args.prefill].unsqueeze(0) if args.prefill else None
    if ids is not None and ids.shape[1] < args.prefill:
        raise SystemExit(f"the corpus gave {ids.shape[1]} tokens, fewer than --prefill {args.prefill}")
    decode = {name: (lambda m=m: generate_token_times(m, prompt, args.tokens, pad_token_id=eos))
              for name, m in (("transformers fp32", fp32), ("llm-int8 LLM.int8()", int8))}
    prefill = {name: (lambda m=m: m(input_ids=ids, logits_to_keep=1))
               for name, m in (("transformers fp32", fp32), ("llm-int8 LLM.int8()", int8))}
    print(f"side by side: {cpu_name()}, {threads} threads (torch and llama.cpp), int8 GEMM path {gemm_paths()[0]}")
    engines = []
    if args.anchor:
        from llm_int8.eval import llamacpp

        directory, gguf = resolve_model(args.model)
        if gguf is None:
            raise SystemExit(f"--anchor llama.cpp needs a GGUF model; {args.model} is not one")
        print(llamacpp.describe())
        n_ctx = max(args.prefill, prompt.shape[1] + args.tokens) + 16
        for file_type in args.anchor_types:
            start = time.perf_counter()
            path = llamacpp.requantize(directory / gguf, file_type, threads)
            engine = llamacpp.LlamaCppModel(path, threads, n_ctx=n_ctx, n_batch=max(args.prefill, prompt.shape[1]))
            engines.append(engine)
            print(f"llama.cpp {file_type}: {path} ({path.stat().st_size / 2**20:.0f} MiB; requantized or found and "
                  f"loaded in {time.perf_counter() - start:.0f} s)")
            name = f"llama.cpp {file_type}"
            prompt_tokens = engine.tokenize(DEMO_TEXT)
            decode[name] = lambda e=engine, p=prompt_tokens: e.token_times(p, args.tokens)
            if ids is not None:
                prefill_tokens = engine.tokenize(text)[: args.prefill]
                if len(prefill_tokens) < args.prefill:
                    raise SystemExit(f"llama.cpp made {len(prefill_tokens)} tokens of the prefill text, fewer than {args.prefill}")
                prefill[name] = lambda e=engine, t=prefill_tokens: e.prefill(t)
        ours_prompt, ours_text = prompt[0].tolist(), ids[0].tolist() if ids is not None else []
        same = "the same ids" if prompt_tokens == ours_prompt else f"ids differ from token {common_prefix(prompt_tokens, ours_prompt)}"
        print(f"prompt {DEMO_TEXT!r}: {len(ours_prompt)} tokens (transformers' tokenizer), {len(prompt_tokens)} (llama.cpp's), {same}")
        if ids is not None:
            same = ("the same ids" if prefill_tokens == ours_text
                    else f"ids differ from token {common_prefix(prefill_tokens, ours_text)}")
            print(f"prefill text: first {len(ours_text)} tokens of Shakespeare (transformers' tokenizer), {len(prefill_tokens)} "
                  f"of llama.cpp's tokens of the same text, {same}")
    with torch.inference_mode():
        times, tokens = token_time_rounds(decode, args.repeats)
        rates = {"decode": {name: statistics.median(steady_decode_rate(t) for t in runs) for name, runs in times.items()}}
        if ids is not None:
            rates["prefill"] = {name: args.prefill / statistics.median(t)
                                for name, t in timed_rounds(prefill, args.repeats).items()}
        batch_rates = batch_decode(args, fp32, int8, tokenizer) if args.batch else None
    for engine in engines:
        engine.close()

    reference = tokens["transformers fp32"][0]
    agree = ", ".join(f"{name} {common_prefix(reference, t if isinstance(t, list) else t[0])}"
                      for name, t in tokens.items() if name != "transformers fp32")
    print(f"greedy new tokens equal to transformers fp32's, from the first (of {args.tokens}): {agree}")
    print(f"medians of {args.repeats} rounds in turns, after a warm-up round:")
    print(f"  decode  = tokens/s after the first of {args.tokens} greedy new tokens (the prompt's prefill and the first token "
          "excluded: (n - 1) / (t_n - t_1)), batch 1")
    if ids is not None:
        print(f"  prefill = one forward over {args.prefill} tokens from an empty KV cache, logits of the last position only")
    int8_name = "llm-int8 LLM.int8()"
    header = f"{'engine':<20} {'decode tok/s':>12} {'int8/this':>9}"
    if ids is not None:
        header += f" {f'prefill {args.prefill} tok/s':>17} {'int8/this':>9}"
    print(header)
    for name in decode:
        row = f"{name:<20} {rates['decode'][name]:>12.2f} {rates['decode'][int8_name] / rates['decode'][name]:>8.2f}x"
        if ids is not None:
            row += f" {rates['prefill'][name]:>17.2f} {rates['prefill'][int8_name] / rates['prefill'][name]:>8.2f}x"
        print(row)
    if batch_rates:
        (lengths, rates_b) = batch_rates
        print(f"batch-{args.batch} decode ({args.batch} prompts of {min(lengths)}-{max(lengths)} tokens, left padded, one generate(), "
              f"tokens/s over all sequences, prompt excluded): transformers fp32 {rates_b['fp32']:.2f}, "
              f"llm-int8 {rates_b['int8']:.2f} = {rates_b['int8'] / rates_b['fp32']:.2f}x")


def batch_decode(args, fp32, int8, tokenizer):
    """(prompt lengths, {fp32, int8: tokens/s}) of --batch prompts decoded together, prompt excluded."""
    from llm_int8.eval.speed import generate_token_times, steady_decode_rate, token_time_rounds

    texts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(args.batch)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    calls = {name: (lambda m=m: generate_token_times(m, ids, args.tokens, mask, pad)) for name, m in (("fp32", fp32), ("int8", int8))}
    times, _ = token_time_rounds(calls, args.repeats)
    return [len(e) for e in encoded], {name: statistics.median(steady_decode_rate(t, args.batch) for t in runs)
                                       for name, runs in times.items()}


if __name__ == "__main__":
    main()
