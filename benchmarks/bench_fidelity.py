"""How much perplexity do the int8 methods lose against fp32, with 95 % intervals, on two corpora of different genres?

For each model: the GPTQ rounding of the int8 codes (llm_int8.eval.rounding) is calibrated once on
held-out windows of Shakespeare (the last 5 % of the plays; never an evaluation window), then every
method is scored on evaluation windows of Shakespeare (the first 95 %) and of the King James Bible
(a genre the calibration never saw), all on the same tokens as fp32. Printed per model and corpus:
perplexity, the change against fp32 with the 95 % interval of the paired per-window NLL differences,
the per-token interval, top-1 agreement; and what the activations cost (LLM.int8() against int8
weights with float activations, paired, with the same codes).

One float model is in memory at a time, and never beside a second copy of its weights:

1. the float model: GPTQ calibration (its codes go to OUT/MODEL/gptq_codes.pt), then fp32,
   ``w8_only``, LLM.int8() and bitsandbytes (where installed), each a module swap sharing the float
   tensors;
2. the float model freed, our int8 model streamed from the GGUF file without it
   (``load_int8_model``, bit-identical to quantizing the float model), the GPTQ codes written into it
   and saved as a bitsandbytes-format checkpoint (OUT/MODEL/checkpoint): LLM.int8() + GPTQ codes,
   and int8 weights only with the same codes;
3. bitsandbytes' own ``Linear8bitLt`` loading that checkpoint in a process without llm_int8
   (benchmarks/bnb_checkpoint_nll.py), where bitsandbytes is installed;
4. llama.cpp's Q8_0 (and with --llama-f32 its F32) of the same GGUF file on the same token ids,
   where llama-cpp-python is installed.

Everything measured is also written to OUT/MODEL/results.json and the per-token NLLs to
OUT/MODEL/nll.pt as it is measured, so an interrupted run keeps what it finished.

    python benchmarks/bench_fidelity.py --model qwen2.5-0.5b [--windows 16] [--seq-len 512] --out DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm_int8 import _memory
from llm_int8.cli import _change_text, _ppl_table
from llm_int8.eval import experiments as ex
from llm_int8.eval import llamacpp
from llm_int8.eval.data import KJV, SHAKESPEARE, load_corpus, split_tokens, token_windows
from llm_int8.eval.methods import METHODS, WeightOnlyInt8Linear, bitsandbytes_available, shared_copy
from llm_int8.eval.models import bos_token_id, load_int8_model, load_model, resolve_model, tokenize
from llm_int8.eval.perplexity import PerplexityResult, paired_change, perplexity, top1_agreement
from llm_int8.eval.rounding import RoundingResult, apply_rounding, gptq_rounding
from llm_int8.eval.speed import cpu_name
from llm_int8.integrations.hf import LLMInt8Config
from llm_int8.nn import Linear8bitLt

FLOAT_METHODS = ["fp32", "w8_only", "llm_int8", "bitsandbytes"]
LABELS = {
    **{name: method.label for name, method in METHODS.items()},
    "bnb_checkpoint": "bitsandbytes (own process) loading our GPTQ checkpoint",
    "llama.cpp Q8_0": "llama.cpp Q8_0 of the same GGUF file",
    "llama.cpp F32": "llama.cpp F32 of the same GGUF file",
}
ORDER = ["fp32", "llama.cpp F32", "w8_only", "w8_gptq", "llm_int8", "llm_int8_gptq", "bitsandbytes", "bnb_checkpoint",
         "llama.cpp Q8_0"]
HERE = Path(__file__).resolve().parent


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Record:
    """The results of one model, written to disk after every step."""

    def __init__(self, folder: Path, info: dict, stem: str = "results"):
        self.folder = folder
        self.info = info
        self.stem = stem  # the files: STEM.json and, for the per-token NLLs, nll.pt (results) or STEM-nll.pt
        self.results: dict[str, dict[str, PerplexityResult]] = {}

    def add(self, corpus: str, name: str, result: PerplexityResult) -> None:
        results = self.results.setdefault(corpus, {})
        results[name] = result
        if "fp32" in results and name != "fp32":
            result.change = paired_change(result, results["fp32"])
            if result.predictions is not None:
                result.top1_agreement = top1_agreement(result, results["fp32"])
        elif name == "fp32":
            result.top1_agreement = 1.0
            result.change = paired_change(result, result)
        print(f"  {corpus:11s} {LABELS[name]:55s} ppl {result.perplexity:9.4f}  {_change_text(result.change and result.change.to_dict())}"
              f"  ({sum(result.window_seconds):.0f} s, load {load_average()})", flush=True)
        self.save()

    def extra_changes(self, corpus: str) -> dict:
        """Paired changes other than against fp32: the activations' cost, llama.cpp Q8_0 against its F32."""
        results, out = self.results.get(corpus, {}), {}
        for name, (a, b) in {
            "activations (LLM.int8() vs int8 weights only, round-to-nearest codes)": ("llm_int8", "w8_only"),
            "activations (LLM.int8() vs int8 weights only, GPTQ codes)": ("llm_int8_gptq", "w8_gptq"),
            "GPTQ codes in LLM.int8() (vs round-to-nearest)": ("llm_int8_gptq", "llm_int8"),
            "bitsandbytes on our GPTQ checkpoint (vs its own rounding)": ("bnb_checkpoint", "bitsandbytes"),
            "llama.cpp Q8_0 vs llama.cpp F32": ("llama.cpp Q8_0", "llama.cpp F32"),
            "llama.cpp F32 vs our fp32": ("llama.cpp F32", "fp32"),
        }.items():
            if a in results and b in results:
                out[name] = paired_change(results[a], results[b]).to_dict()
        return out

    def save(self) -> None:
        payload = dict(self.info)
        payload["load_average_now"] = load_average()
        payload["results"] = {c: {n: r.to_dict() for n, r in rs.items()} for c, rs in self.results.items()}
        payload["paired"] = {c: self.extra_changes(c) for c in self.results}
        payload["peak_rss_mib"] = ex.peak_rss() / 2**20
        (self.folder / f"{self.stem}.json").write_text(json.dumps(payload, indent=1, default=str))
        nll_file = "nll.pt" if self.stem == "results" else f"{self.stem}-nll.pt"
        torch.save({c: {n: r.token_nll for n, r in rs.items()} for c, rs in self.results.items()}, self.folder / nll_file)

    def print_tables(self) -> None:
        for corpus, results in self.results.items():
            ordered = {n: results[n].to_dict() for n in ORDER if n in results}
            print(f"\n{self.info['model']}, {corpus}: {self.info['windows']} windows x {self.info['seq_len']} tokens "
                  "(evaluation part; GPTQ calibration: Shakespeare's held-out tail)")
            print(_ppl_table(ordered, LABELS))
            for name, change in self.extra_changes(corpus).items():
                print(f"  {name}: {_change_text(change)}")


def external_result(nll: torch.Tensor, seconds: list[float]) -> PerplexityResult:
    """A PerplexityResult from per-token NLLs [n_windows, seq_len - 1] measured outside ``perplexity()``."""
    return PerplexityResult(float(nll.mean().exp()), float(nll.mean()), nll.numel(), seconds, token_nll=nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=ex.GPTQ_WINDOWS)
    parser.add_argument("--corpus", nargs="+", default=[SHAKESPEARE, KJV])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="results, GPTQ codes and checkpoints go to DIR/MODEL")
    parser.add_argument("--llama-f32", action="store_true", help="also score llama.cpp's F32 of the GGUF file")
    parser.add_argument("--llama-only", action="store_true", help="only add the llama.cpp rows to a finished run in "
                        "OUT/MODEL (its windows.pt and nll.pt), written to OUT/MODEL/llamacpp.json")
    parser.add_argument("--codes", default=None, metavar="FILE", help="GPTQ codes saved by an earlier run (its "
                        "OUT/MODEL/gptq_codes.pt, same model and calibration) instead of calibrating again")
    parser.add_argument("--float-methods", nargs="*", default=FLOAT_METHODS, choices=FLOAT_METHODS,
                        help="the methods run on the float model (fp32 is always run: every change is paired with it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average "
          f"{load_average()}; bitsandbytes {'installed' if bitsandbytes_available() else 'NOT installed'}, "
          f"llama-cpp-python {'installed' if llamacpp.available() else 'NOT installed'}", flush=True)
    for model_name in args.model or ["smollm2-135m"]:
        if args.llama_only:
            llama_rows_only(model_name, args)
            continue
        run_model(model_name, args)
        gc.collect()
        _memory.trim_heap()


def run_model(model_name: str, args) -> None:
    start = time.perf_counter()
    folder = Path(args.out) / model_name
    folder.mkdir(parents=True, exist_ok=True)
    lm, tokenizer = load_model(model_name)
    bos = bos_token_id(model_name, tokenizer)
    texts = {c: split_tokens(tokenize(tokenizer, load_corpus(c))) for c in set(args.corpus) | {SHAKESPEARE}}
    windows = {c: token_windows(texts[c][0], args.windows, args.seq_len, bos) for c in args.corpus}
    calibration = token_windows(texts[SHAKESPEARE][1], args.calib_windows, args.seq_len, bos)
    del texts
    torch.save(torch.cat([windows[c] for c in args.corpus]), folder / "windows.pt")  # for --llama-only later
    record = Record(folder, {"model": model_name, "cpu": cpu_name(), "threads": torch.get_num_threads(), "bos": bos,
                             "windows": args.windows, "seq_len": args.seq_len, "load_average_start": load_average()})
    print(f"\n{model_name}: BOS {bos}; loaded in {time.perf_counter() - start:.0f} s", flush=True)

    # 1. the float model: GPTQ codes, then the methods that need the float weights
    if args.codes:
        if Path(args.codes).resolve() != (folder / "gptq_codes.pt").resolve():
            shutil.copyfile(args.codes, folder / "gptq_codes.pt")
        record.info["gptq"] = {"codes_from": str(args.codes)}
    else:
        calibrate_codes(lm, calibration, folder, record, model_name)
    methods = ["fp32"] + [m for m in args.float_methods if m != "fp32" and (m != "bitsandbytes" or bitsandbytes_available())]
    for corpus in args.corpus:
        work = ex.Workload(lm, tokenizer, windows[corpus], calibration, bos)
        for method in methods:
            record.add(corpus, method, ex.compare_methods(work, [method])[method])
    del lm
    gc.collect()
    _memory.trim_heap()

    # 2. our int8 model without the float one, GPTQ codes written in, saved as a checkpoint
    lm8, tokenizer = load_int8_model(model_name, None, LLMInt8Config(), require_tokenizer=False)
    saved = torch.load(folder / "gptq_codes.pt", mmap=True)
    apply_rounding(lm8, RoundingResult(saved["codes"], saved["absmax"], {}, {}, 0, 0.0))
    del saved
    checkpoint = folder / "checkpoint"
    ex.save_pretrained_whole([lm8] + ([tokenizer] if tokenizer is not None else []), checkpoint, force=True)
    for corpus in args.corpus:
        record.add(corpus, "llm_int8_gptq", perplexity(lm8, windows[corpus]))
    w8 = shared_copy(lm8)
    for name, module in list(w8.named_modules()):
        if isinstance(module, Linear8bitLt):
            parent, _, child = name.rpartition(".")
            setattr(w8.get_submodule(parent), child,
                    WeightOnlyInt8Linear(None, module.bias, (module.weight, module.SCB)))
    for corpus in args.corpus:
        record.add(corpus, "w8_gptq", perplexity(w8, windows[corpus]))
    del lm8, w8
    gc.collect()
    _memory.trim_heap()

    # 3. bitsandbytes alone loading the checkpoint
    if bitsandbytes_available():
        nll, seconds = bnb_checkpoint(checkpoint, torch.cat([windows[c] for c in args.corpus]), folder)
        for i, corpus in enumerate(args.corpus):
            part = slice(i * args.windows, (i + 1) * args.windows)
            record.add(corpus, "bnb_checkpoint", external_result(nll[part], [seconds / nll.shape[0]] * args.windows))

    # 4. llama.cpp on the same token ids
    if llamacpp.available():
        llama_rows(model_name, windows, record, args)
    record.info["seconds"] = time.perf_counter() - start
    record.save()
    record.print_tables()
    print(f"{model_name}: {time.perf_counter() - start:.0f} s, peak RSS {ex.peak_rss() / 2**20:.0f} MiB, load {load_average()}",
          flush=True)


def calibrate_codes(lm, calibration: torch.Tensor, folder: Path, record: Record, model_name: str) -> None:
    """GPTQ codes of the float model on the calibration windows, timed (wall and process CPU), saved to
    FOLDER/gptq_codes.pt."""
    cpu = time.process_time()
    rounding = gptq_rounding(lm, calibration)
    cpu = time.process_time() - cpu
    ratios = sorted(rounding.error_gptq[n] / rounding.error_rtn[n] for n in rounding.error_rtn if rounding.error_rtn[n] > 0)
    record.info["gptq"] = {
        "calibration_windows": int(calibration.shape[0]), "n_positions": rounding.n_positions,
        "seconds": rounding.seconds, "cpu_seconds": cpu, "load_average_after": load_average(),
        "error_ratio_median": ratios[len(ratios) // 2], "error_ratio_min": ratios[0], "error_ratio_max": ratios[-1],
        "layers": rounding.to_dict()["layers"],
    }
    print(f"{model_name}: GPTQ on {rounding.n_positions} held-out Shakespeare tokens: {rounding.seconds:.0f} s wall, "
          f"{cpu:.0f} s CPU (all threads), load {load_average()}; per-layer output error GPTQ / RTN on them: median "
          f"{ratios[len(ratios) // 2]:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}", flush=True)
    torch.save({"codes": rounding.codes, "absmax": rounding.absmax}, folder / "gptq_codes.pt")
    record.save()
    del rounding
    gc.collect()
    _memory.trim_heap()


def llama_rows(model_name: str, windows: dict, record: Record, args) -> None:
    """llama.cpp's Q8_0 (and F32 with --llama-f32) of the model's GGUF file on the same token ids."""
    directory, gguf = resolve_model(model_name, None)
    for file_type in (["F32"] if args.llama_f32 else []) + ["Q8_0"]:
        path = llamacpp.requantize(directory / gguf, file_type, torch.get_num_threads())
        engine = llamacpp.LlamaCppModel(path, torch.get_num_threads(), args.seq_len, args.seq_len, all_logits=True)
        try:
            for corpus in args.corpus:
                nll, seconds = [], []
                for window in windows[corpus]:
                    t = time.perf_counter()
                    nll.append(engine.window_nll(window.tolist()))
                    seconds.append(time.perf_counter() - t)
                record.add(corpus, f"llama.cpp {file_type}", external_result(torch.stack(nll), seconds))
        finally:
            engine.close()
    record.info["llama_cpp"] = llamacpp.describe()


def llama_rows_only(model_name: str, args) -> None:
    """The llama.cpp rows of a finished run (OUT/MODEL: windows.pt, the corpora's windows in order, and
    nll.pt), paired with its results, written to OUT/MODEL/llamacpp.json and llamacpp-nll.pt."""
    folder = Path(args.out) / model_name
    stacked, saved = torch.load(folder / "windows.pt"), torch.load(folder / "nll.pt")
    windows = {c: stacked[i * args.windows:(i + 1) * args.windows] for i, c in enumerate(args.corpus)}
    record = Record(folder, {"model": model_name, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                             "windows": args.windows, "seq_len": args.seq_len, "load_average_start": load_average()},
                    stem="llamacpp")
    for corpus in args.corpus:
        for name, nll in saved[corpus].items():
            record.results.setdefault(corpus, {})[name] = external_result(nll, [0.0])
        record.results[corpus]["fp32"].change = paired_change(record.results[corpus]["fp32"], record.results[corpus]["fp32"])
    llama_rows(model_name, windows, record, args)
    record.print_tables()


def bnb_checkpoint(checkpoint: Path, windows: torch.Tensor, folder: Path) -> tuple[torch.Tensor, float]:
    """Per-token NLLs [n_windows, seq_len - 1] of bitsandbytes running the checkpoint in a process without
    llm_int8, and the seconds it took (load included)."""
    torch.save(windows, folder / "windows.pt")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the checker must not see llm_int8 (it is installed editable too: it checks)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "bnb_checkpoint_nll.py"), str(checkpoint), str(folder / "windows.pt"),
                           str(folder / "bnb_nll.pt")], capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    print("  " + proc.stdout.strip(), flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bitsandbytes failed on the checkpoint:\n{proc.stderr[-3000:]}")
    return torch.load(folder / "bnb_nll.pt"), seconds


if __name__ == "__main__":
    main()
