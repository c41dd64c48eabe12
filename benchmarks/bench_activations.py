"""What do the activations cost, and does migrating their scale (SmoothQuant-style) or another alpha help, on held-out text?

For each model: the migration strength (0: none, and ``--strengths``) and the threshold alpha
(``--alphas``) are chosen with LLM.int8() on calibration windows from the first half of Shakespeare's
held-out tail, and checked against plain LLM.int8() (alpha = 6) on validation windows from its second
half (llm_int8.eval.experiments.choose_activation_setting). Then, on evaluation windows of Shakespeare
(first 95 % of the plays) and of the King James Bible, all paired on the same tokens: fp32, int8
weights only (``w8_only``), LLM.int8(), and LLM.int8() with the chosen setting; printed are each
against fp32, the activations' cost (LLM.int8() against ``w8_only``) and the chosen setting against
LLM.int8(). Round-to-nearest codes throughout (the setting is independent of the GPTQ rounding,
which would be recomputed under it).

    python benchmarks/bench_activations.py --model smollm2-135m [--windows 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from llm_int8 import _memory
from llm_int8.cli import _change_text
from llm_int8.eval import experiments as ex
from llm_int8.eval.data import KJV, SHAKESPEARE, load_corpus, split_tokens, token_windows
from llm_int8.eval.methods import build_method
from llm_int8.eval.models import bos_token_id, load_model, tokenize
from llm_int8.eval.perplexity import paired_change, perplexity
from llm_int8.eval.speed import cpu_name


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--validation-windows", type=int, default=ex.VALIDATION_WINDOWS)
    parser.add_argument("--strengths", type=float, nargs="*", default=list(ex.ACTIVATION_STRENGTHS))
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ex.ACTIVATION_THRESHOLDS))
    parser.add_argument("--corpus", nargs="+", default=[SHAKESPEARE, KJV])
    parser.add_argument("--out", default=None, metavar="DIR", help="write DIR/MODEL-activations.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {load_average()}",
          flush=True)
    for model_name in args.model or ["smollm2-135m"]:
        start = time.perf_counter()
        lm, tokenizer = load_model(model_name)
        bos = bos_token_id(model_name, tokenizer)
        texts = {c: split_tokens(tokenize(tokenizer, load_corpus(c))) for c in set(args.corpus) | {SHAKESPEARE}}
        calibration, validation = ex.calibration_split(texts[SHAKESPEARE][1], args.calib_windows, args.validation_windows,
                                                       args.seq_len, bos)
        choice = ex.choose_activation_setting(lm, calibration, validation, args.strengths, args.alphas)
        print(f"\n{model_name}: on {calibration.shape[0]} calibration windows (LLM.int8() perplexity per migration strength "
              "and alpha):", flush=True)
        for c in choice.candidates:
            print(f"  strength {c['strength']:.2f}  alpha {c['threshold']:g}: {c['perplexity']:.4f}")
        verdict = "none needed (plain LLM.int8() scored best)" if choice.check is None else (
            f"on {choice.check.n_windows} validation windows vs LLM.int8(): {_change_text(choice.check.change.to_dict())}"
            f" -> {'kept' if choice.kept else 'NOT kept'}")
        print(f"chosen: strength {choice.strength:g}, alpha {choice.threshold:g}; {verdict}  (load {load_average()})", flush=True)
        payload = {"model": model_name, "cpu": cpu_name(), "choice": choice.to_dict(), "corpora": {}}
        context = {"migration": choice.migration or ex_empty_migration(), "threshold": choice.threshold}
        for corpus in args.corpus:
            windows = token_windows(texts[corpus][0], args.windows, args.seq_len, bos)
            results = {}
            for name in ["fp32", "w8_only", "llm_int8", "llm_int8_smooth"]:
                model = build_method(lm, name, context)
                results[name] = perplexity(model, windows)
                del model
                _memory.trim_heap()
            changes = {
                "w8_only vs fp32": paired_change(results["w8_only"], results["fp32"]),
                "LLM.int8() vs fp32": paired_change(results["llm_int8"], results["fp32"]),
                "chosen setting vs fp32": paired_change(results["llm_int8_smooth"], results["fp32"]),
                "activations: LLM.int8() vs w8_only": paired_change(results["llm_int8"], results["w8_only"]),
                "activations, chosen setting vs w8_only": paired_change(results["llm_int8_smooth"], results["w8_only"]),
                "chosen setting vs LLM.int8()": paired_change(results["llm_int8_smooth"], results["llm_int8"]),
            }
            print(f"\n{model_name}, {corpus}: {windows.shape[0]} windows x {windows.shape[1]} tokens (evaluation part); "
                  f"fp32 perplexity {results['fp32'].perplexity:.4f}")
            for name, change in changes.items():
                print(f"  {name:42s} {_change_text(change.to_dict())}")
            payload["corpora"][corpus] = {
                "perplexity": {n: r.perplexity for n, r in results.items()},
                "changes": {n: c.to_dict() for n, c in changes.items()},
            }
        payload["seconds"] = time.perf_counter() - start
        print(f"{model_name}: {payload['seconds']:.0f} s, load {load_average()}", flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{model_name}-activations.json").write_text(json.dumps(payload, indent=1))
        del lm
        gc.collect()
        _memory.trim_heap()


def ex_empty_migration():
    from llm_int8.eval.smooth import Migration

    return Migration({}, {}, 0.0)


if __name__ == "__main__":
    main()
