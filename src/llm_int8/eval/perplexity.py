"""Perplexity over fixed token windows, and forward throughput."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .speed import Progress, _identity, prefill_tokens_per_second


@dataclass
class PerplexityResult:
    """exp(mean next-token NLL) over every predicted token of every window."""

    perplexity: float
    nll: float  # mean negative log-likelihood per token, nats
    n_tokens: int
    window_seconds: list[float] = field(default_factory=list)  # forward wall time per window
    predictions: torch.Tensor | None = field(default=None, repr=False)  # int64 [n_windows, seq_len - 1]: argmax
    top1_agreement: float | None = None  # share of predictions equal to a reference model's (see top1_agreement)

    @property
    def seconds_per_window(self) -> float:
        return statistics.median(self.window_seconds)

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "n_tokens": self.n_tokens,
            "median_seconds_per_window": self.seconds_per_window,
            "top1_agreement": self.top1_agreement,
        }


@torch.inference_mode()
def window_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, T, vocab] of a causal LM for input_ids [B, T]."""
    return model(input_ids=input_ids).logits.float()


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (int64 [n_windows, seq_len]), one window per forward.

    Every window is scored independently: token t is predicted from tokens < t of its own window,
    so each window contributes seq_len - 1 predictions.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be int64 [n_windows, seq_len >= 2], got shape {tuple(windows.shape)}")
    total_nll, n_tokens, seconds, predictions = 0.0, 0, [], []
    for window in (progress or _identity)(list(windows)):
        ids = window.unsqueeze(0)
        start = time.perf_counter()
        logits = window_logits(model, ids)
        seconds.append(time.perf_counter() - start)
        nll = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError("the model produced non-finite logits; perplexity is undefined")
        total_nll += float(nll)
        n_tokens += ids.shape[1] - 1
        predictions.append(logits[0, :-1].argmax(dim=-1))
    mean_nll = total_nll / n_tokens
    return PerplexityResult(float(torch.tensor(mean_nll).exp()), mean_nll, n_tokens, seconds, torch.stack(predictions))


def top1_agreement(result: PerplexityResult, reference: PerplexityResult) -> float:
    """Share of next-token predictions (argmax) of ``result`` equal to those of ``reference`` on the same
    windows: how often a quantized model would pick the token the float model picks, given the same text."""
    if result.predictions is None or reference.predictions is None:
        raise ValueError("both results need their predictions (results of perplexity())")
    if result.predictions.shape != reference.predictions.shape:
        raise ValueError(
            f"the results come from different windows: predictions {tuple(result.predictions.shape)} "
            f"vs {tuple(reference.predictions.shape)}"
        )
    return float((result.predictions == reference.predictions).double().mean())


@torch.inference_mode()
def tokens_per_second(model: nn.Module, input_ids: torch.Tensor, repeats: int = 3, warmup: int = 1) -> float:
    """Prefill throughput: input_ids.numel() / median wall time of one forward, after ``warmup`` runs."""
    return prefill_tokens_per_second({"model": model}, input_ids, repeats, warmup)["model"]
