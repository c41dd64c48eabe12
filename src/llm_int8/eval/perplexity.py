"""Perplexity over fixed token windows, and forward throughput."""

from __future__ import annotations

import math
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
    token_nll: torch.Tensor | None = field(default=None, repr=False)  # float64 [n_windows, seq_len - 1], nats
    change: PerplexityChange | None = None  # against a reference model on the same tokens (see paired_change)

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
            "change": None if self.change is None else self.change.to_dict(),
        }


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; beyond, the Cornish-Fisher
# expansion around the normal quantile (error < 1e-4 from 30 on).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` >= 1 degrees of freedom (a 95 % two-sided interval)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 windows), got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class PerplexityChange:
    """ppl / ppl_ref - 1 on the same tokens, with 95 % intervals from the paired NLL differences.

    ``low``/``high``: from the per-window mean differences (Student's t over the windows: tokens of
    one window are correlated, windows are far apart, so this is the interval to trust).
    ``token_low``/``token_high``: treating every token's difference as independent (narrower; shown
    for comparison, it understates the uncertainty where errors cluster within windows).
    """

    change: float
    low: float
    high: float
    token_low: float
    token_high: float
    n_windows: int
    n_tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def separated_from(self, other: PerplexityChange) -> bool:
        """True when the two intervals do not overlap (an ordering may then be claimed)."""
        return self.high < other.low or other.high < self.low


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
    total_nll, n_tokens, seconds, predictions, token_nll = 0.0, 0, [], [], []
    for window in (progress or _identity)(list(windows)):
        ids = window.unsqueeze(0)
        start = time.perf_counter()
        logits = window_logits(model, ids)
        seconds.append(time.perf_counter() - start)
        per_token = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        nll = per_token.sum()
        if not torch.isfinite(nll):
            raise FloatingPointError("the model produced non-finite logits; perplexity is undefined")
        token_nll.append(per_token.double())
        total_nll += float(nll)
        n_tokens += ids.shape[1] - 1
        predictions.append(logits[0, :-1].argmax(dim=-1))
    mean_nll = total_nll / n_tokens
    return PerplexityResult(
        float(torch.tensor(mean_nll).exp()), mean_nll, n_tokens, seconds, torch.stack(predictions),
        token_nll=torch.stack(token_nll),
    )


def paired_change(result: PerplexityResult, reference: PerplexityResult) -> PerplexityChange:
    """How much ``result``'s perplexity differs from ``reference``'s on the same windows, with 95 % intervals.

    ppl / ppl_ref = exp(mean(d)) with d = nll - nll_ref per token: the interval of the mean paired
    difference (windows as the independent units, Student's t; and per token, for comparison) maps
    through exp(.) - 1. Paired, so the text's own difficulty (most of each model's spread) cancels.
    """
    if result.token_nll is None or reference.token_nll is None:
        raise ValueError("both results need their per-token NLLs (results of perplexity())")
    if result.token_nll.shape != reference.token_nll.shape:
        raise ValueError(
            f"the results come from different windows: {tuple(result.token_nll.shape)} vs {tuple(reference.token_nll.shape)}"
        )
    diff = result.token_nll - reference.token_nll  # float64 [W, T]
    n_windows, per_window = diff.shape
    mean = float(diff.mean())
    if n_windows > 1:
        half = t_quantile_975(n_windows - 1) * float(diff.mean(dim=1).std()) / math.sqrt(n_windows)
    else:
        half = math.inf  # one window: no spread between windows to estimate
    n = diff.numel()
    token_half = _Z975 * float(diff.flatten().std()) / math.sqrt(n) if n > 1 else math.inf
    ratio = lambda d: math.exp(d) - 1.0  # noqa: E731
    return PerplexityChange(
        ratio(mean), ratio(mean - half), ratio(mean + half), ratio(mean - token_half), ratio(mean + token_half),
        n_windows, n,
    )


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
