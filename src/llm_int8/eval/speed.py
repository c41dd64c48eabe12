"""Tokens per second of several models on this machine, measured side by side.

Two regimes, because they are bound by different things:

* **decode** (``generate``, one new token per forward, KV cache): every layer's weight is read once
  per token, so the time follows the bytes of the weights (int8 reads a quarter of fp32's) plus the
  fixed cost of each op;
* **prefill** (one forward over a whole window): a few large matrix products, bound by arithmetic,
  where int8 gains at most the ratio of the CPU's int8 to float32 multiply-add rate.

Models are timed in turns (A, B, A, B, ...) after a warm-up each, and the median per model is
reported, so a machine whose load changes during the run favours no model.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

Progress = Callable[[Iterable], Iterable]


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` of ``/proc/cpuinfo`` ("model name", "flags"); None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; platform's guess elsewhere): benchmark figures say
    which CPU they came from."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


# x86 flags of bfloat16 arithmetic (AVX-512 BF16, AMX); on ARM, "bf16" among the Features.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (``/proc/cpuinfo``); without it torch emulates
    bf16 matmuls through float32 conversions, slower than float32 itself. Assumed True where it
    cannot tell (no ``/proc/cpuinfo``)."""
    flags = _cpuinfo("flags") or _cpuinfo("Features")
    return flags is None or any(flag in flags.split() for flag in NATIVE_BF16_FLAGS)


def _identity(iterable):
    return iterable


def timed_rounds(
    calls: Mapping[str, callable], repeats: int, warmup: int = 1, progress: Progress | None = None
) -> dict[str, list[float]]:
    """Wall times of ``repeats`` rounds, each calling every function once in turn, after ``warmup``
    untimed rounds (first-call allocations, lazy kernel builds). ``progress`` wraps the rounds."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = {name: [] for name in calls}
    for round_index in (progress or _identity)(range(warmup + repeats)):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def decode_tokens_per_second(
    models: Mapping[str, nn.Module], prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 5,
    pad_token_id: int | None = None, progress: Progress | None = None, others: Mapping[str, Callable] | None = None,
) -> dict[str, float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt_ids`` (int64 [1, T]).

    Returns new tokens per second (the prompt's prefill included in the time, as a user sees it).
    ``others`` are more engines timed in the same rounds: each a function doing the same work (e.g.
    :meth:`llm_int8.eval.llamacpp.LlamaCppModel.token_times` of the same prompt).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be int64 [1, T], got shape {tuple(prompt_ids.shape)}")
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens and repeats must be >= 1, got {new_tokens} and {repeats}")

    def call(model):
        return lambda: model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, pad_token_id=pad_token_id,
            **exact_length(model, new_tokens),
        )

    calls = {name: call(m) for name, m in models.items()} | dict(others or {})
    times = timed_rounds(calls, repeats, progress=progress)
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def prefill_tokens_per_second(
    models: Mapping[str, nn.Module], ids: torch.Tensor, repeats: int = 5, warmup: int = 1,
    progress: Progress | None = None, others: Mapping[str, Callable] | None = None, logits_to_keep: int | None = None,
) -> dict[str, float]:
    """One forward over ``ids`` (int64 [B, T]); returns tokens (B * T) per second. ``logits_to_keep``
    (a transformers forward argument) limits the head to the last positions, as ``generate()``'s
    prefill and llama.cpp do (None: every position's logits). ``others`` are more engines timed in
    the same rounds, each a function doing the same work."""
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty int64 [B, T], got shape {tuple(ids.shape)}")
    kwargs = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    calls = {name: (lambda m=m: m(input_ids=ids, **kwargs)) for name, m in models.items()} | dict(others or {})
    times = timed_rounds(calls, repeats, warmup, progress)
    return {name: ids.numel() / statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------
# Decode with the prompt excluded: the time of each new token


class _EndOfTextMasked:
    """A ``generate()`` logits processor that keeps the end-of-text tokens from being chosen, so that
    exactly ``max_new_tokens`` come out: what ``min_new_tokens`` asks for, without the mask over the
    whole vocabulary that transformers' processor builds on every step (``isin`` over 151936 ids,
    about 1.4 ms per step on a 2-core Zen 3: harness cost, not the model's, and absent from
    llama.cpp's loop)."""

    def __init__(self, eos_token_id):
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.ids = torch.tensor(ids, dtype=torch.int64)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.ids.numel():
            scores[:, self.ids] = -float("inf")
        return scores


def exact_length(model: nn.Module, new_tokens: int) -> dict:
    """``generate()`` keyword arguments for exactly ``new_tokens`` greedy tokens (see :class:`_EndOfTextMasked`)."""
    config = getattr(model, "generation_config", None)
    return {"max_new_tokens": new_tokens, "logits_processor": [_EndOfTextMasked(getattr(config, "eos_token_id", None))]}


class _TokenClock:
    """A ``generate()`` stopping criterion that never stops: it records when each new token was chosen
    (generate calls it once per step, after appending the step's token)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_token_times(
    model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt_ids`` (int64 [B, T], left
    padded with ``attention_mask`` when B > 1): the new tokens (int64 [B, new_tokens]), and the start
    time followed by the ``time.perf_counter()`` at which each step's tokens were chosen (the first
    after the prompt's prefill)."""
    clock = _TokenClock()
    mask = torch.ones_like(prompt_ids) if attention_mask is None else attention_mask
    start = time.perf_counter()
    out = model.generate(
        prompt_ids, attention_mask=mask, do_sample=False, pad_token_id=pad_token_id, stopping_criteria=[clock],
        **exact_length(model, new_tokens),
    )
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"generate() made {len(clock.times)} steps, not the {new_tokens} asked for")
    return out[:, prompt_ids.shape[1]:], [start, *clock.times]


def steady_decode_rate(times: list[float], batch: int = 1) -> float:
    """Tokens per second after the first new token, from :func:`generate_token_times`-style times
    ``[start, t_1, ..., t_n]``: ``batch * (n - 1) / (t_n - t_1)``, so the prompt's prefill (and the
    first token it yields) is excluded."""
    if len(times) < 3:
        raise ValueError(f"need at least 2 new tokens to time a decode step, got {len(times) - 1}")
    return batch * (len(times) - 2) / (times[-1] - times[1])


def token_time_rounds(
    calls: Mapping[str, Callable[[], tuple[object, list[float]]]], repeats: int, warmup: int = 1,
    progress: Progress | None = None,
) -> tuple[dict[str, list[list[float]]], dict[str, object]]:
    """``repeats`` rounds each calling every function once in turn, after ``warmup`` untimed rounds;
    each call returns (tokens, token times) as :func:`generate_token_times` does. Returns the times
    of the timed rounds per call, and the tokens of each call's first round."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rounds, tokens = {name: [] for name in calls}, {}
    for round_index in (progress or _identity)(range(warmup + repeats)):
        for name, fn in calls.items():
            new_tokens, times = fn()
            tokens.setdefault(name, new_tokens)
            if round_index >= warmup:
                rounds[name].append(times)
    return rounds, tokens
