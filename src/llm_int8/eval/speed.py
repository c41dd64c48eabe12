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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; platform's guess elsewhere): benchmark figures say
    which CPU they came from."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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
    pad_token_id: int | None = None, progress: Progress | None = None,
) -> dict[str, float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt_ids`` (int64 [1, T]).

    Returns new tokens per second (the prompt's prefill included in the time, as a user sees it).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be int64 [1, T], got shape {tuple(prompt_ids.shape)}")
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens and repeats must be >= 1, got {new_tokens} and {repeats}")

    def call(model):
        return lambda: model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
        )

    times = timed_rounds({name: call(m) for name, m in models.items()}, repeats, progress=progress)
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def prefill_tokens_per_second(
    models: Mapping[str, nn.Module], ids: torch.Tensor, repeats: int = 5, warmup: int = 1,
    progress: Progress | None = None,
) -> dict[str, float]:
    """One forward over ``ids`` (int64 [B, T]); returns tokens (B * T) per second."""
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty int64 [B, T], got shape {tuple(ids.shape)}")
    times = timed_rounds({name: (lambda m=m: m(input_ids=ids)) for name, m in models.items()}, repeats, warmup, progress)
    return {name: ids.numel() / statistics.median(t) for name, t in times.items()}
