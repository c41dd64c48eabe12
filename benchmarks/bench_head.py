"""Question: what does an int8 output head (``Int8Config(quantize_head=True)``) cost in perplexity, and
what does it gain in decoding speed and memory, against LLM.int8() with the head in float (the default)?

Per model: the int8 model with a float head is loaded by the streaming loader (``load_int8_model``, the
float model never whole in memory); the int8-head model is a copy of it sharing every int8 layer, whose
head (and tied input embedding) ``quantize_`` converts. Both are scored on the same Shakespeare windows
as ``llm-int8 scale`` (the first 95 % of the corpus, ``--windows`` x ``--seq-len`` tokens). Each window's
mean next-token NLL is paired between the two, so the noise printed is the spread of those per-window
differences (the standard error of their mean; the two forwards are deterministic, so running again
gives the same figures). Then ``generate()`` of ``--tokens`` greedy tokens after a short prompt, the two
models in turns, medians of ``--repeats`` rounds after a warm-up round.

    python benchmarks/bench_head.py [--models smollm2-135m qwen2.5-0.5b qwen2.5-1.5b] [--windows 8] [--seq-len 512]
        [--int8-embedding]

``--int8-embedding`` adds a third model for untied models (the Qwen2.5 GGUF files): the int8-head model with its
input embedding in int8 rows too (``Embedding8bit.from_embedding``, what ``llm-int8 serve --int8-embedding``
does), paired against the float-head model like the int8-head one.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch


@torch.inference_mode()
def window_nlls(model, windows: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """(mean next-token NLL per window, argmax predictions [n_windows, seq_len - 1])."""
    nlls, predictions = [], []
    for window in windows:
        ids = window.unsqueeze(0)
        logits = model(input_ids=ids).logits.float()
        nlls.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))
        predictions.append(logits[0, :-1].argmax(dim=-1))
    return nlls, torch.stack(predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8-embedding", action="store_true", help="also the int8 head with an int8 untied embedding")
    args = parser.parse_args()

    import transformers

    from llm_int8 import Embedding8bit, Int8Config, memory_footprint, quantize_
    from llm_int8.eval.data import load_corpus, split_tokens, token_windows
    from llm_int8.eval.methods import shared_copy
    from llm_int8.eval.models import load_int8_model, model_title, tokenize
    from llm_int8.eval.speed import cpu_name

    transformers.utils.logging.disable_progress_bar()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine)")
    text = load_corpus("shakespeare")
    for name in args.models:
        head_float, tokenizer = load_int8_model(name)
        head_int8 = shared_copy(head_float)
        report = quantize_(head_int8, Int8Config(quantize_head=True))
        head_int8.eval()
        evaluation, _ = split_tokens(tokenize(tokenizer, text))
        windows = token_windows(evaluation, args.windows, args.seq_len)
        models = {"head float": head_float, "head int8": head_int8}
        if args.int8_embedding and not report.int8_embeddings:  # untied: the embedding is still float
            small = shared_copy(head_int8)
            small.set_input_embeddings(Embedding8bit.from_embedding(head_int8.get_input_embeddings()))
            models["head+embedding int8"] = small.eval()
        head = head_float.get_output_embeddings()
        print(f"\n{model_title(name)}: head {head.out_features} x {head.in_features}, "
              f"tied to the embedding: {bool(report.int8_embeddings)}")
        print("memory (MiB): " + ", ".join(f"{label} {memory_footprint(model) / 2**20:.0f}" for label, model in models.items()))

        start = time.perf_counter()
        scored = {label: window_nlls(model, windows) for label, model in models.items()}
        nll_f, pred_f = scored["head float"]
        ppl_f = math.exp(statistics.mean(nll_f))
        print(f"perplexity, {args.windows} x {args.seq_len} tokens ({time.perf_counter() - start:.0f} s): head float {ppl_f:.3f}")
        for label, (nll_i, pred_i) in list(scored.items())[1:]:
            diffs = [b - a for a, b in zip(nll_f, nll_i)]
            mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
            ppl_i = math.exp(statistics.mean(nll_i))
            print(f"  {label} {ppl_i:.3f} ({(ppl_i / ppl_f - 1) * 100:+.3f} %); "
                  f"per-window NLL difference {mean * 1e3:+.3f} +- {se * 1e3:.3f} mnats (mean +- standard error; "
                  f"range {min(diffs) * 1e3:+.3f} .. {max(diffs) * 1e3:+.3f}), perplexity change within 2 s.e.: "
                  f"{math.exp(mean - 2 * se) * 100 - 100:+.3f} .. {math.exp(mean + 2 * se) * 100 - 100:+.3f} %; "
                  f"top-1 agreement with head float {float((pred_f == pred_i).double().mean()) * 100:.2f} %")

        prompt = tokenize(tokenizer, "ROMEO:\nBut, soft! what light through yonder window breaks?").unsqueeze(0)
        seconds = {label: [] for label in models}
        with torch.inference_mode():
            for round_index in range(args.repeats + 1):
                for label, model in models.items():
                    start = time.perf_counter()
                    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                                   min_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                    if round_index:
                        seconds[label].append(time.perf_counter() - start)
        rates = {label: args.tokens / statistics.median(s) for label, s in seconds.items()}
        print(f"decode (generate {args.tokens} tokens, prompt included, medians of {args.repeats} interleaved "
              f"rounds): head float {rates['head float']:.2f} tok/s, " + ", ".join(
                  f"{label} {rate:.2f} tok/s = {rate / rates['head float']:.2f}x" for label, rate in list(rates.items())[1:]))
        del head_float, head_int8, models
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
