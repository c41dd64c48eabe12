"""The experiments behind the CLI subcommands: pure functions returning plain data."""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .. import _memory
from .. import functional as F
from ..checkpoint import save_checkpoint
from ..convert import memory_footprint
from ..nn import Linear8bitLt
from ..reference import outlier_column_mask
from . import baselines
from .calibrate import MEMORY_BUDGET, CalibrationPlan, calibration_plan
from .data import load_corpus, split_tokens, token_windows
from .hooks import LinearInputHooks
from .methods import METHODS, PAPER_THRESHOLD, bitsandbytes_available, build_method
from .models import (
    bos_token_id, common_prefix_length, greedy_tokens, load_int8_model, load_model, model_title, resolve_model, tokenize,
)
from .outliers import InputTracker, find_outliers, random_dims, zero_input_dims
from .perplexity import PerplexityChange, PerplexityResult, paired_change, perplexity, top1_agreement
from .speed import decode_tokens_per_second, native_bf16, prefill_tokens_per_second

ProgressFactory = Callable[[str], Callable[[Iterable], Iterable]]
SWEEP_ALPHAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, math.inf)
DEMO_PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?"
DECODE_TOKENS = 32  # new tokens per timed generate() in the decode throughput
GENERATION_TOKENS = 24  # new tokens of the greedy continuation shown fp32 vs int8
DEMO_METHODS = ["fp32", "bf16", "absmax_tensor", "zeropoint_tensor", "absmax_vector", "llm_int8_calibrated", "bitsandbytes"]
DEMO_WINDOWS = 16
DEMO_REPEATS = 5  # timed rounds per engine in the tokens/s table
CALIBRATION_WINDOWS = 2
# The demo on a CPU without AVX-512 (torch's capability AVX2 or less), where the whole of it takes minutes
# more than on AVX-512 machines (what each part costs and why these cuts: docs/eval.md).
SHORT_DEMO_METHODS = ["fp32", "absmax_vector", "llm_int8_calibrated", "bitsandbytes"]
SHORT_DEMO_WINDOWS = 8
SHORT_DEMO_REPEATS = 3


@dataclass
class DemoSettings:
    """What ``llm-int8 demo`` runs on this machine, and what it left out of the whole demo (sentences it prints)."""

    methods: list[str]
    n_windows: int
    repeats: int
    cuts: list[str]


def demo_settings(full: bool = False, methods: list[str] | None = None, n_windows: int | None = None) -> DemoSettings:
    """The demo's perplexity methods, windows and tokens/s rounds: ``full`` or on an AVX-512 CPU the whole demo
    (less the bf16 row on a CPU without bfloat16 instructions), else the short one; ``methods`` and
    ``n_windows``, where given, are the caller's and are never cut."""
    short = not full and torch.backends.cpu.get_cpu_capability() != "AVX512"
    cuts = []
    if methods is None:
        methods = list(SHORT_DEMO_METHODS if short else DEMO_METHODS)
        if short:
            cuts.append("the per-tensor int8 rows (absmax, zeropoint), each slower per window than fp32 here, which show "
                        "what the paper's Table 1 shows (per-tensor int8 fails: +75 to +118 % on the whole demo); "
                        "llm-int8 ppl prints them")
        if not full and not native_bf16():
            if "bf16" in methods:
                methods.remove("bf16")
            cuts.append("the bf16 row: this CPU has no bfloat16 instructions (no AVX512_BF16 / AMX), so torch "
                        "emulates its matmuls, 2.6x slower than fp32 here, to show that bf16 is as accurate as fp32")
    if n_windows is None:
        n_windows = SHORT_DEMO_WINDOWS if short else DEMO_WINDOWS
        if short:
            cuts.append(f"{SHORT_DEMO_WINDOWS} evaluation windows instead of {DEMO_WINDOWS} (95 % intervals about "
                        f"{math.sqrt(DEMO_WINDOWS / SHORT_DEMO_WINDOWS):.1f}x wider)")
    repeats = SHORT_DEMO_REPEATS if short else DEMO_REPEATS
    if short:
        cuts.append(f"tokens/s the median of {SHORT_DEMO_REPEATS} rounds instead of {DEMO_REPEATS}")
    return DemoSettings(list(methods), n_windows, repeats, cuts)


def _no_progress(_desc):
    return lambda iterable: iterable


@dataclass
class Workload:
    """A model, its tokenizer and the fixed evaluation and calibration windows."""

    model: nn.Module
    tokenizer: object
    windows: torch.Tensor  # int64 [n_windows, seq_len], from the first 95 % of the corpus
    calibration: torch.Tensor  # int64 [CALIBRATION_WINDOWS, seq_len], from the held-out tail
    bos_token_id: int | None = None  # the first token of every window (models trained with a BOS), else None
    held_out: torch.Tensor | None = None  # int64 [T]: the held-out tail (last 5 %) the calibration windows come from


def prepare(model: str, gguf_file: str | None, corpus: str, n_windows: int, seq_len: int) -> Workload:
    """Load the fp32 model, tokenize the corpus and cut the deterministic windows (each starting with
    the model's BOS token where it has one: :func:`.models.bos_token_id`), for evaluation, calibration
    and outlier statistics alike."""
    text = load_corpus(corpus)  # first: a missing corpus fails before the slow model load
    lm, tokenizer = load_model(model, gguf_file)
    evaluation, held_out = split_tokens(tokenize(tokenizer, text))
    bos = bos_token_id(model, tokenizer)
    return Workload(
        lm, tokenizer, token_windows(evaluation, n_windows, seq_len, bos),
        token_windows(held_out, CALIBRATION_WINDOWS, seq_len, bos), bos, held_out,
    )


GPTQ_METHODS = ("llm_int8_gptq", "w8_gptq", "bitsandbytes_gptq")


def rounding_for(work: Workload, methods: list[str], progress: ProgressFactory = _no_progress, n_windows: int | None = None):
    """The GPTQ codes the ``*_gptq`` methods among ``methods`` need (None if there are none), calibrated on
    windows of the first half of the held-out tail (:func:`calibration_split`; never an evaluation window)."""
    if not any(m in GPTQ_METHODS for m in methods):
        return None
    from .rounding import gptq_rounding

    calibration, _ = calibration_split(work.held_out, n_windows or GPTQ_WINDOWS, VALIDATION_WINDOWS,
                                       work.windows.shape[1], work.bos_token_id)
    return gptq_rounding(work.model, calibration, progress=progress("GPTQ calibration"))


def calibrate(
    work: Workload, progress: ProgressFactory = _no_progress, budget: float = MEMORY_BUDGET
) -> CalibrationPlan:
    """The 16-bit columns of ``calibrate.calibration_plan`` chosen on the held-out calibration windows."""
    return calibration_plan(work.model, work.calibration, budget=budget, progress=progress("calibration"))


def compare_methods(
    work: Workload, methods: list[str], plan: CalibrationPlan | None = None, progress: ProgressFactory = _no_progress,
    done: dict[str, PerplexityResult] | None = None, rounding=None,
) -> dict[str, PerplexityResult]:
    """Perplexity of every method on the same windows; each method runs on its own converted copy of the
    model. ``done``: results already measured on these windows (not run again). ``rounding``: the GPTQ
    codes the ``*_gptq`` methods use (:func:`.rounding.gptq_rounding`).

    With ``fp32`` among the methods, every result also gets its ``top1_agreement`` with fp32 and its
    ``change`` against fp32 on the same tokens, with 95 % intervals (:func:`.perplexity.paired_change`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from: {', '.join(METHODS)}")
    results = {}
    for name in methods:
        if done and name in done:
            results[name] = done[name]
            continue
        model = build_method(work.model, name, {"calibration": plan, "rounding": rounding})
        results[name] = perplexity(model, work.windows, progress(name))
        del model
        _memory.trim_heap()  # the method's weights are freed: give their heap pages back before the next
    if "fp32" in results:
        for result in results.values():
            result.top1_agreement = top1_agreement(result, results["fp32"])
            result.change = paired_change(result, results["fp32"])
    return results


def weight_memory(model: nn.Module, plan: CalibrationPlan | None = None) -> dict[str, int]:
    """Bytes of the whole model (parameters and buffers) in fp32, bf16, int8, int8 + calibrated columns."""
    fp32 = memory_footprint(model)
    sizes = {"fp32": fp32, "bf16": fp32 // 2, "int8": memory_footprint(build_method(model, "llm_int8"))}
    if plan is not None:
        sizes["int8_calibrated"] = memory_footprint(build_method(model, "llm_int8_calibrated", {"calibration": plan}))
    return sizes


def outlier_analysis(
    work: Workload, windows: torch.Tensor | None = None, ablation: bool = True, progress: ProgressFactory = _no_progress
) -> dict:
    """§4.1 outlier dims of the fp32 model on ``windows`` (default: the evaluation windows) and the
    ablation: perplexity with those dims zeroed at every hidden-width linear input vs as many random dims."""
    windows = work.windows if windows is None else windows
    with InputTracker(work.model) as tracker, torch.inference_mode():
        for window in progress("outlier statistics")(list(windows)):
            work.model(input_ids=window.unsqueeze(0))
    report = find_outliers(tracker)
    result = {"report": report}
    if ablation and report.dims:
        baseline = perplexity(work.model, work.windows, progress("ablation: none zeroed"))
        with zero_input_dims(work.model, report.dims, report.width):
            zeroed = perplexity(work.model, work.windows, progress("ablation: outliers zeroed"))
        others = random_dims(report.width, len(report.dims), report.dims)
        with zero_input_dims(work.model, others, report.width):
            rand = perplexity(work.model, work.windows, progress("ablation: random zeroed"))
        result["ablation"] = {
            "baseline": baseline.perplexity,
            "outliers_zeroed": zeroed.perplexity,
            "random_dims": others,
            "random_zeroed": rand.perplexity,
        }
    return result


class _DecompositionCounter(LinearInputHooks):
    """The share of Linear8bitLt input columns decomposed at each layer's threshold, over every layer call
    (counted per layer, not per site: each layer decomposes at its own threshold)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decomposed = self.total = 0

    def layer_output(self, name, module, site, x, y):
        if isinstance(module, Linear8bitLt):
            if module.threshold > 0:
                self.decomposed += int(outlier_column_mask(x.reshape(-1, module.in_features), module.threshold).sum())
            self.total += module.in_features

    @property
    def share(self) -> float:
        return self.decomposed / self.total if self.total else 0.0


def threshold_sweep(
    work: Workload, alphas=SWEEP_ALPHAS, progress: ProgressFactory = _no_progress
) -> list[dict]:
    """Per alpha: perplexity of LLM.int8() (no calibration), share of columns decomposed, s / forward."""
    model = build_method(work.model, "absmax_vector")  # Linear8bitLt everywhere; the threshold is set per alpha
    rows = []
    for alpha in alphas:
        for module in model.modules():
            if isinstance(module, Linear8bitLt):
                module.threshold = float(alpha)
        with _DecompositionCounter(model) as counter:
            result = perplexity(model, work.windows, progress(f"alpha={alpha:g}"))
        rows.append(
            {
                "alpha": alpha,
                "perplexity": result.perplexity,
                "decomposed_share": counter.share,
                "seconds_per_forward": result.seconds_per_window,
            }
        )
    return rows


def weight_versions(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A float weight [N, K] and its dequantized int8 versions: absmax / zero-point per tensor, vector-wise."""
    weight = weight.detach().float()
    codes, absmax = baselines.absmax_quantize(weight)
    zp_codes, scale, zero_point = baselines.zeropoint_quantize(weight)
    vec_codes, vec_absmax = F.quantize_weight(weight)
    return {
        "original": weight,
        "absmax per-tensor": baselines.absmax_dequantize(codes, absmax),
        "zero-point per-tensor": baselines.zeropoint_dequantize(zp_codes, scale, zero_point),
        "vector-wise absmax": F.dequantize_weight(vec_codes, vec_absmax),
    }


def layer_weight(model: str, gguf_file: str | None, layer: str) -> torch.Tensor:
    """The float weight [N, K] of the nn.Linear named ``layer`` of a model."""
    lm, _ = load_model(model, gguf_file)
    names = [n for n, m in lm.named_modules() if isinstance(m, nn.Linear)]
    if layer not in names:
        raise ValueError(f"no linear layer named {layer!r}; some are: {', '.join(names[:6])}, ...")
    return lm.get_submodule(layer).weight.detach()


def save_calibrated(work: Workload, plan: CalibrationPlan, path: str) -> None:
    """Write the int8 model with the planned 16-bit columns as a safe checkpoint (safetensors, validated,
    atomic: see :mod:`llm_int8.checkpoint`); ``load_checkpoint`` reads it back."""
    save_checkpoint(build_method(work.model, "llm_int8_calibrated", {"calibration": plan}), path)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float((approx - reference).norm() / reference.norm())


def throughput(
    work: Workload, methods=("fp32", "llm_int8_calibrated"), plan=None, repeats: int = 5,
    new_tokens: int = DECODE_TOKENS, models: dict | None = None, progress: ProgressFactory = _no_progress,
    single_thread_decode: bool = False, anchors: dict | None = None, prefill_logits_to_keep: int | None = None,
) -> dict[str, dict[str, float]]:
    """Tokens/s of each method, fp32 and int8 timed in turns, medians (see :mod:`.speed`).

    ``decode``: greedy ``generate`` of ``new_tokens`` tokens after the demo prompt (what a user of
    ``generate()`` sees; memory-bound, where int8 reads a quarter of fp32's weight bytes).
    ``prefill``: one forward over the first evaluation window (compute-bound).
    ``single_thread_decode`` adds ``decode, 1 thread``: the same with ``torch.set_num_threads(1)``, where
    no kernel pays for waking or waiting for a second thread (on a machine shared with other work, a
    few-row GEMM split over threads waits for the slowest).
    ``models``, if given, maps method names to already built models. ``anchors`` maps names to
    :class:`~llm_int8.eval.llamacpp.LlamaCppModel` engines of the same GGUF file, timed in the same
    rounds on the same token ids (decode and prefill; not the single-thread row).
    ``prefill_logits_to_keep``: see :func:`~llm_int8.eval.speed.prefill_tokens_per_second`.
    """
    models = dict(models or {})
    for name in methods:
        if name not in models:
            models[name] = build_method(work.model, name, {"calibration": plan})
    models = {name: models[name] for name in methods}
    prompt = tokenize(work.tokenizer, DEMO_PROMPT).unsqueeze(0)
    eos = work.tokenizer.eos_token_id
    anchors = anchors or {}
    window = work.windows[:1]
    decode_others = {name: (lambda e=e: e.token_times(prompt[0].tolist(), new_tokens)) for name, e in anchors.items()}
    prefill_others = {name: (lambda e=e: e.prefill(window[0].tolist())) for name, e in anchors.items()}
    rates = {"decode": decode_tokens_per_second(
        models, prompt, new_tokens, repeats, eos, progress("decode tokens/s"), others=decode_others
    )}
    if single_thread_decode:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rates["decode, 1 thread"] = decode_tokens_per_second(
                models, prompt, new_tokens, repeats, eos, progress("decode tokens/s, 1 thread")
            )
        finally:
            torch.set_num_threads(threads)
    rates["prefill"] = prefill_tokens_per_second(
        models, window, repeats, progress=progress("prefill tokens/s"), others=prefill_others,
        logits_to_keep=prefill_logits_to_keep,
    )
    return rates


def run_demo(
    model: str, gguf_file: str | None, corpus: str, n_windows: int | None, seq_len: int,
    methods: list[str] | None = None, progress: ProgressFactory = _no_progress, budget: float = MEMORY_BUDGET,
    anchor: bool = True, full: bool = False,
) -> dict:
    """Everything ``llm-int8 demo`` prints, as a dict (see ``cli.py`` for the presentation). With
    ``anchor``, a GGUF model and llama-cpp-python installed, the speed table also times llama.cpp's
    Q8_0 and F32 of the same file (:func:`llama_cpp_anchors`). ``n_windows`` and ``methods`` left None
    take :func:`demo_settings`' (the whole demo with ``full``, else what this CPU runs in a few minutes)."""
    start = time.perf_counter()
    settings = demo_settings(full, methods, n_windows)
    methods, n_windows = settings.methods, settings.n_windows
    bnb_mode = "bitsandbytes 0.50.2 itself (eval mode, CPU)"
    if "bitsandbytes" in methods and not bitsandbytes_available():
        methods[methods.index("bitsandbytes")] = "bnb_emulated"
        bnb_mode = "emulated with our ops (bitsandbytes not installed): outlier cols x dequantized int8, x cast via fp16"
    work = prepare(model, gguf_file, corpus, n_windows, seq_len)
    loaded = time.perf_counter()
    with InputTracker(work.model) as tracker, torch.inference_mode():
        for window in progress("outlier statistics")(list(work.calibration)):
            work.model(input_ids=window.unsqueeze(0))
    report = find_outliers(tracker)
    plan = calibrate(work, progress, budget)
    results = compare_methods(work, methods, plan, progress)
    int8_model = build_method(work.model, "llm_int8_calibrated", {"calibration": plan})
    compared = {"fp32": work.model, "llm_int8_calibrated": int8_model}
    anchors, anchor_note = llama_cpp_anchors(model, gguf_file, work, DECODE_TOKENS) if anchor else ({}, "off (--no-anchor)")
    try:
        rates = throughput(work, tuple(compared), plan, settings.repeats, models=compared, progress=progress, anchors=anchors,
                           prefill_logits_to_keep=1)
    finally:
        for engine in anchors.values():
            engine.close()
    continuations = {
        label: greedy_tokens(model, work.tokenizer, DEMO_PROMPT, GENERATION_TOKENS)
        for label, model in progress("greedy continuation")(list(zip(("fp32", "int8"), compared.values())))
    }
    return {
        "n_windows": int(work.windows.shape[0]),
        "seq_len": int(work.windows.shape[1]),
        "calibration_tokens": int(work.calibration.numel()),
        "memory_bytes": weight_memory(work.model, plan),
        "perplexity": {name: r.to_dict() for name, r in results.items()},
        "labels": {name: METHODS[name].label for name in results},
        "bitsandbytes_mode": bnb_mode,
        "cuts": settings.cuts,
        "repeats": settings.repeats,
        "tokens_per_second": rates,
        "threads": torch.get_num_threads(),
        "anchor": anchor_note,
        "outliers": report,
        "calibrated_columns": sum(len(c) for c in plan.columns.values()),
        "calibration": {"budget": plan.budget, "fp_bytes": plan.fp_bytes, "int8_bytes": plan.int8_bytes},
        "prompt": DEMO_PROMPT,
        "generations": {label: work.tokenizer.decode(ids, skip_special_tokens=True) for label, ids in continuations.items()},
        "generation_tokens": len(continuations["fp32"]),
        "generation_common_prefix": common_prefix_length(continuations["fp32"], continuations["int8"]),
        "seconds": {"load": loaded - start, "total": time.perf_counter() - start},
    }


def llama_cpp_anchors(model: str, gguf_file: str | None, work: Workload, new_tokens: int) -> tuple[dict, str]:
    """({"llama.cpp Q8_0": engine, "llama.cpp F32": engine}, a line saying what they are) for the GGUF
    file of ``model``, requantized by llama.cpp (cached) and loaded with torch's thread count; no
    engines, and the line saying why, where llama-cpp-python is not installed or the model is no GGUF."""
    from . import llamacpp

    if not llamacpp.available():
        return {}, f"none: {llamacpp.INSTALL}"
    directory, gguf = resolve_model(model, gguf_file)
    if gguf is None:
        return {}, "none: the model is not a GGUF file"
    threads = torch.get_num_threads()
    n_ctx = max(work.windows.shape[1], len(tokenize(work.tokenizer, DEMO_PROMPT)) + new_tokens) + 16
    engines = {}
    try:
        for file_type in llamacpp.FILE_TYPES:
            path = llamacpp.requantize(directory / gguf, file_type, threads)
            engines[f"llama.cpp {file_type}"] = llamacpp.LlamaCppModel(path, threads, n_ctx, work.windows.shape[1])
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return engines, f"{llamacpp.describe()}; {threads} threads, given the same token ids"


SCALE_MODELS = ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
SCALE_METHODS = [
    "fp32", "absmax_tensor", "zeropoint_tensor", "absmax_vector", "llm_int8", "llm_int8_calibrated", "bitsandbytes",
]
SPEED_METHODS = ("fp32", "llm_int8")  # the streaming loader's int8 model (LLMInt8Config()) against fp32


def parameter_count(model: nn.Module) -> int:
    """Parameters of a float model, each tensor counted once (a tied head is the embedding)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def scale_model(
    model: str, corpus: str, n_windows: int, seq_len: int, methods: list[str], speed: bool = False,
    repeats: int = 5, progress: ProgressFactory = _no_progress, budget: float = MEMORY_BUDGET,
) -> dict:
    """One model's row of the scale study: perplexity of ``methods`` (fp32 first, with the §4.1 outlier
    statistics gathered on the same forward passes), memory footprints and, with ``speed``, tokens/s."""
    start = time.perf_counter()
    work = prepare(model, None, corpus, n_windows, seq_len)
    loaded = time.perf_counter()
    done = {}
    with InputTracker(work.model) as tracker:
        done["fp32"] = perplexity(work.model, work.windows, progress("fp32 + outlier statistics"))
    report = find_outliers(tracker)
    plan = calibrate(work, progress, budget) if "llm_int8_calibrated" in methods else None
    rounding = rounding_for(work, methods, progress)
    results = compare_methods(work, ["fp32", *[m for m in methods if m != "fp32"]], plan, progress, done, rounding)
    row = {
        "model": model,
        "title": model_title(model),
        "parameters": parameter_count(work.model),
        "n_windows": int(work.windows.shape[0]),
        "seq_len": int(work.windows.shape[1]),
        "perplexity": {name: r.to_dict() for name, r in results.items()},
        "labels": {name: METHODS[name].label for name in results},
        "outliers": report,
        "memory_bytes": weight_memory(work.model, plan),
        "calibrated_columns": None if plan is None else sum(len(c) for c in plan.columns.values()),
    }
    if speed:
        row["tokens_per_second"] = throughput(work, SPEED_METHODS, plan, repeats, progress=progress, single_thread_decode=True)
        row["threads"] = torch.get_num_threads()
        row["speed_repeats"] = repeats
    row["seconds"] = {"load": loaded - start, "total": time.perf_counter() - start}
    return row


def run_scale(
    models: list[str], corpus: str, n_windows: int, seq_len: int, methods: list[str] | None = None,
    speed_model: str | None = None, repeats: int = 5, progress: ProgressFactory = _no_progress,
    budget: float = MEMORY_BUDGET,
) -> dict:
    """The paper's Table 1 across model sizes: :func:`scale_model` for each model, one at a time (each is
    freed before the next loads). ``speed_model`` (default: the last) also gets decode/prefill tokens/s."""
    start = time.perf_counter()
    methods = list(methods or SCALE_METHODS)
    if "bitsandbytes" in methods and not bitsandbytes_available():
        methods[methods.index("bitsandbytes")] = "bnb_emulated"
    speed_model = models[-1] if speed_model is None else speed_model
    if speed_model not in models and speed_model != "none":
        raise ValueError(f"--speed-model {speed_model!r} is not among the models {models} (or 'none')")
    speed_index = len(models) - 1 - models[::-1].index(speed_model) if speed_model in models else None
    rows = []
    for index, model in enumerate(models):
        rows.append(scale_model(model, corpus, n_windows, seq_len, methods, index == speed_index, repeats, progress, budget))
        gc.collect()  # the model is freed before the next one loads
        _memory.trim_heap()
    return {"models": rows, "methods": methods, "seconds": time.perf_counter() - start}


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux ``VmHWM``; 0 where unavailable)."""
    return _memory.status_bytes("VmHWM")


GPTQ_WINDOWS = 16  # calibration windows of the GPTQ rounding (16 x 512 = 8,192 held-out tokens by default)
VALIDATION_WINDOWS = 4  # held-out windows, disjoint from the calibration ones, that decide whether a calibration is kept


@dataclass
class CalibrationCheck:
    """Whether a calibrated method beat its uncalibrated baseline on validation windows (held out from the
    same corpus, disjoint from the calibration windows and from every evaluation window)."""

    method: str
    baseline: str
    kept: bool
    change: PerplexityChange  # the method's perplexity against the baseline's, paired, on the validation windows
    n_windows: int

    def to_dict(self) -> dict:
        return {"method": self.method, "baseline": self.baseline, "kept": self.kept, "change": self.change.to_dict(),
                "n_windows": self.n_windows}


def check_calibration(model: nn.Module, method: str, baseline: str, windows: torch.Tensor, context: dict) -> CalibrationCheck:
    """Calibration never hurts: ``method`` (e.g. ``llm_int8_gptq``) is kept only if its perplexity on the
    validation ``windows`` is lower than ``baseline``'s (e.g. ``llm_int8``) on the same tokens."""
    base = perplexity(build_method(model, baseline, context), windows)
    candidate = perplexity(build_method(model, method, context), windows)
    change = paired_change(candidate, base)
    return CalibrationCheck(method, baseline, change.change < 0.0, change, int(windows.shape[0]))


ACTIVATION_STRENGTHS = (0.25, 0.5)  # migration strengths tried (0: none)
ACTIVATION_THRESHOLDS = (4.0, 6.0, 8.0)  # alphas tried


@dataclass
class ActivationChoice:
    """The activation-side setting (migration strength, alpha) that scored best on calibration windows, and
    whether it beat plain LLM.int8() (alpha = 6, no migration) on validation windows: kept only then."""

    strength: float  # 0.0: no migration
    threshold: float
    migration: object | None  # a smooth.Migration (None for strength 0)
    candidates: list[dict]  # {"strength", "threshold", "perplexity"} on the calibration windows
    check: CalibrationCheck | None  # None when plain LLM.int8() itself scored best: nothing to keep

    @property
    def kept(self) -> bool:
        return self.check is not None and self.check.kept

    def to_dict(self) -> dict:
        return {"strength": self.strength, "threshold": self.threshold, "kept": self.kept, "candidates": self.candidates,
                "check": None if self.check is None else self.check.to_dict()}


def choose_activation_setting(
    model: nn.Module, calibration: torch.Tensor, validation: torch.Tensor, strengths=ACTIVATION_STRENGTHS,
    thresholds=ACTIVATION_THRESHOLDS, progress: ProgressFactory = _no_progress,
) -> ActivationChoice:
    """Try each migration strength (with 0, none) and alpha with LLM.int8() and round-to-nearest codes
    (:mod:`.smooth`), pick the lowest perplexity on the ``calibration`` windows, and keep it only if it beats
    LLM.int8() at alpha = 6 without migration on the ``validation`` windows (same tokens, paired)."""
    from .smooth import Migration, migration_scales

    migrations = {0.0: Migration({}, {}, 0.0)}
    for strength in strengths:
        migrations[float(strength)] = migration_scales(model, calibration, float(strength))
    candidates = []
    for strength, migration in migrations.items():
        for threshold in thresholds:
            method = build_method(model, "llm_int8_smooth", {"migration": migration, "threshold": float(threshold)})
            result = perplexity(method, calibration, progress(f"strength {strength:g}, alpha {threshold:g}"))
            candidates.append({"strength": strength, "threshold": float(threshold), "perplexity": result.perplexity})
            del method
    best = min(candidates, key=lambda c: c["perplexity"])
    strength, threshold = best["strength"], best["threshold"]
    migration = migrations[strength] if strength > 0 else None
    check = None
    if strength > 0 or threshold != PAPER_THRESHOLD:
        check = check_calibration(model, "llm_int8_smooth", "llm_int8", validation,
                                  {"migration": migrations[strength], "threshold": threshold})
    return ActivationChoice(strength, threshold, migration, candidates, check)


def calibration_split(held_out: torch.Tensor, n_calibration: int, n_validation: int, seq_len: int, bos: int | None):
    """(calibration windows, validation windows) from the held-out tail: its first half and its second half."""
    calibration_part, validation_part = split_tokens(held_out, 0.5)
    return (token_windows(calibration_part, n_calibration, seq_len, bos),
            token_windows(validation_part, n_validation, seq_len, bos))


ACTIVATION_WINDOWS = 8  # calibration windows the activation setting is chosen on (a subset of the GPTQ ones)


def gptq_calibration(
    model: str, gguf_file: str | None, corpus: str, n_windows: int = GPTQ_WINDOWS, seq_len: int = 512,
    progress: ProgressFactory = _no_progress, n_validation: int = VALIDATION_WINDOWS, activations: bool = False,
):
    """(rounding or None, :class:`CalibrationCheck`, rounding, :class:`ActivationChoice` or None): GPTQ codes
    (:func:`.rounding.gptq_rounding`) of the float ``model`` from ``n_windows`` windows of the first half of
    ``corpus``'s held-out tail (its last 5 %, never an evaluation window), kept only if LLM.int8() with them
    beats round-to-nearest at alpha 6 on ``n_validation`` windows of the tail's second half (else None: the
    caller keeps round-to-nearest). The float model is freed after.

    With ``activations``, the migration strength and alpha are first chosen on the first
    :data:`ACTIVATION_WINDOWS` calibration windows (:func:`choose_activation_setting`); where the choice
    beats plain LLM.int8() on the validation windows, the codes are rounded under its migration and go with
    its alpha (``rounding.migration``, ``rounding.threshold``), and the same never-hurts check decides."""
    from .rounding import gptq_rounding

    text = load_corpus(corpus)
    lm, tokenizer = load_model(model, gguf_file)
    _, held_out = split_tokens(tokenize(tokenizer, text))
    calibration, validation = calibration_split(held_out, n_windows, n_validation, seq_len, bos_token_id(model, tokenizer))
    choice, migration, threshold = None, None, PAPER_THRESHOLD
    if activations:
        choice = choose_activation_setting(lm, calibration[:ACTIVATION_WINDOWS], validation, progress=progress)
        if choice.kept:
            migration, threshold = choice.migration, choice.threshold
    rounding = gptq_rounding(lm, calibration, progress=progress("GPTQ calibration"), migration=migration)
    rounding.threshold = threshold
    check = check_calibration(lm, "llm_int8_gptq", "llm_int8", validation, {"rounding": rounding, "threshold": threshold})
    del lm
    gc.collect()
    _memory.trim_heap()
    return rounding if check.kept else None, check, rounding, choice


def quantize_to_disk(
    model: str, gguf_file: str | None, save: str | None, threshold: float = 6.0, force: bool = False, rounding=None,
) -> dict:
    """Build the int8 model without the float one (:func:`.models.load_int8_model`), write the GPTQ codes
    of ``rounding`` into it if given (:func:`gptq_calibration`), and ``save_pretrained`` it (with the
    tokenizer, where the model has one) to the directory ``save``, if given; returns the load time,
    footprint and this process's peak RSS, and whether a tokenizer was saved.

    ``save`` is checked before the model loads (:func:`check_save_dir`: a file in the way, a non-empty
    directory without ``force``, a place that cannot be written all raise ValueError), and written
    whole or not at all (:func:`save_pretrained_whole`).
    """
    from ..integrations.hf import LLMInt8Config
    from .rounding import apply_rounding

    if save:
        check_save_dir(save, force)
    start = time.perf_counter()
    lm, tokenizer = load_int8_model(model, gguf_file, LLMInt8Config(threshold=threshold), require_tokenizer=False)
    if rounding is not None:
        apply_rounding(lm, rounding)
    seconds = time.perf_counter() - start
    report = lm.hf_quantizer.report
    result = {
        "model": model, "title": model_title(model), "seconds": seconds, "footprint": memory_footprint(lm),
        "converted": len(report.converted), "kept": len(report.skipped), "peak_rss": peak_rss(),
        "tokenizer": tokenizer is not None, "rounding": None if rounding is None else rounding.to_dict(),
    }
    if save:
        save_pretrained_whole([lm] + ([tokenizer] if tokenizer is not None else []), save, force)
    return result


def check_save_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """The directory ``save_pretrained`` may write to, or a ValueError saying why not and what to do.

    Refused: an existing file (save_pretrained writes a directory); a non-empty directory unless
    ``force``; a place this process cannot create or write (its nearest existing parent is not a
    writable directory).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"cannot save to {path}: it is a file, and the model is saved as a directory (config.json, "
            "model.safetensors, ...); give the path of a new directory, or move the file away"
        )
    if path.is_dir() and any(path.iterdir()) and not force:
        entries = sorted(entry.name for entry in path.iterdir())
        raise ValueError(
            f"cannot save to {path}: the directory is not empty ({len(entries)} {'entry' if len(entries) == 1 else 'entries'}: "
            f"{', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); give a new or empty directory, or pass --force to replace its contents"
        )
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (path.is_dir() and not os.access(path, os.W_OK)):
        raise ValueError(
            f"cannot save to {path}: {parent} is not a directory this process can write to; choose a directory you can write to"
        )
    return path


def save_pretrained_whole(objects: list, path: str | os.PathLike, force: bool = False) -> None:
    """``obj.save_pretrained`` of each of ``objects`` into the directory ``path``, whole or not at all.

    Everything is written into a temporary directory beside ``path`` and renamed onto it once complete, so
    an error or an interruption never leaves a half-written model under ``path``; with ``force`` an existing
    directory is replaced (it is moved aside first and deleted once the new one is in place).
    """
    path = check_save_dir(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    except OSError as err:
        raise ValueError(f"cannot save to {path}: {err.strerror or err}; choose a directory you can write to") from None
    old = None
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        if path.is_dir() and any(path.iterdir()):
            old = path.parent / f"{tmp.name[:-len('.partial')]}.old"
            os.replace(path, old)
        os.replace(tmp, path)  # onto a missing or empty directory: atomic
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous contents back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
