"""Calibrated 16-bit columns (beyond bitsandbytes): which input columns leave the int8 product for good.

A calibrated column of a layer is stored with its fp16 weight column (``Linear8bitLt.set_fp_columns``)
and always takes the 16-bit path; the run-time decomposition (|x| >= alpha, the paper's alpha = 6)
works as before on the other columns. This module decides which columns, from a few held-out
calibration windows run through the float model. Why this rule, and what it measured (the error
breakdown, the budget's choice on validation windows, the perplexities), is in ``docs/eval.md``.

The rule: spend a memory budget on the columns that remove the most estimated output noise.
For a layer with float weight W [N, K] and output y, over the calibration positions t (position 0 of
every window excluded, see below), with the columns that become outliers at run time in that window
(any |x| >= alpha) taken out as the forward takes them out:

* activation noise: rounding row t to int8 adds noise of variance (m_t / 127)^2 / 12 to each of its
  inputs, m_t = max |x_t| over the columns left in int8, hence ||W||_F^2 (m_t / 127)^2 / 12 to the
  output. Keeping column k in fp16 lowers m_t to the row's next largest value where k holds it.
* weight noise: rounding row n of W adds variance (SCB_n / 127)^2 / 12 per weight; column k's share
  of the output noise is sum_t x_tk^2 * sum_n (SCB_n / 127)^2 / 12, removed when k is kept in fp16.

A column's gain is that noise reduction over the layer's signal sum_t ||y_t||^2 (a noise-to-signal
ratio, so that layers of any scale compare), its cost the fp16 column and its index (2 N + 8 bytes).
Columns are taken greedily, best gain per byte first over all layers, a layer's gains recomputed after
each pick, until ``budget`` (a share of the int8 model's bytes, default 0.5 %) is spent.

Position 0 is left out of the statistics: it carries the attention sink's activations, far larger than
at any other position, at one position of each window. Where they reach alpha their columns leave the
int8 product at run time in that window anyway (the run-time mask above sees position 0); counted in
the statistics they would rank the columns by one token per window.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

import torch
from torch import nn

from ..convert import Int8Config, QuantizeReport, linear_weight, memory_footprint, quantize_
from .._ops import INT8_MAX
from ..nn import Linear8bitLt
from ..reference import outlier_column_mask
from .hooks import LinearInputHooks, Site, linear_layers
from .outliers import OUTLIER_MAGNITUDE
from .perplexity import Progress, _identity

MEMORY_BUDGET = 0.005  # fp16 columns may cost this share of the int8 model's bytes
TOP_VALUES = 64  # per calibration row, the largest |x| kept for the greedy (exact below 63 picks per layer)
FP_COLUMN_EXTRA_BYTES = 8  # the int64 index of a column (fp_cols)


@dataclass
class CalibrationPlan:
    """Per linear layer (qualified name), the input columns kept in 16 bit, and how they were chosen.

    ``budget`` and ``fp_bytes`` / ``int8_bytes`` are set by the noise rule (``calibration_plan``),
    ``min_position_share`` by the earlier count rule (kept for comparison in ``tests/helpers.py``).
    """

    threshold: float
    min_position_share: float | None
    n_positions: int
    columns: dict[str, list[int]]
    budget: float | None = None
    fp_bytes: int = 0  # bytes of the fp16 columns and their indices
    int8_bytes: int = 0  # the whole int8 model without them

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "min_position_share": self.min_position_share,
            "budget": self.budget,
            "n_positions": self.n_positions,
            "fp_bytes": self.fp_bytes,
            "int8_bytes": self.int8_bytes,
            "n_columns": sum(len(c) for c in self.columns.values()),
            "columns": self.columns,
        }


def fp_column_bytes(out_features: int) -> int:
    """Bytes one calibrated column costs: its fp16 weight column [out_features] and its int64 index."""
    return 2 * out_features + FP_COLUMN_EXTRA_BYTES


def int8_model_bytes(model: nn.Module, layers=None) -> int:
    """Bytes of ``model`` once ``layers`` (default: those ``quantize_`` converts) hold int8 weights:
    the float weights replaced by int8 codes, a float32 scale per row and the format byte."""
    layers = linear_layers(model) if layers is None else layers
    total = memory_footprint(model)
    for _name, module, _width in layers:
        weight = module.weight
        n = linear_weight(module).shape[0]
        total += weight.numel() + 4 * n + 1 - weight.numel() * weight.element_size()
    return total


@dataclass
class _Layer:
    name: str
    site: Site  # its stats: "values" / "indices" (per forward, float32 / int64 [T, m], the largest |x| of
    # each calibration row, descending, the window's run-time outlier columns taken out), "sumsq"
    # (float64 [K], sum x^2 per column), "n_positions"
    out_features: int
    weight_energy: float  # ||W||_F^2
    weight_noise: float  # sum_n (SCB_n / 127)^2 / 12
    signal: float = 0.0  # sum_t ||y_t||^2


class _Collector(LinearInputHooks):
    """Forward hooks gathering what the noise rule needs (per site the row maxima and column energies,
    per layer its output energy)."""

    def __init__(self, model: nn.Module, threshold: float, top: int = TOP_VALUES):
        super().__init__(model)
        self.threshold, self.top = float(threshold), top
        self.layers: dict[str, _Layer] = {}

    def check_layers(self, layers):
        if any(isinstance(module, Linear8bitLt) for _, module, _ in layers):
            raise ValueError("calibrate the float model: it already holds Linear8bitLt layers")

    def site_input(self, site: Site, x: torch.Tensor) -> None:
        width = site.in_features
        seqs = x.float().reshape(-1, x.shape[-2] if x.dim() > 2 else x.shape[0], width)
        magnitude = seqs.abs()
        if self.threshold > 0:
            # the forward takes a window's outlier columns (position 0 included) out of the int8 product
            runtime = outlier_column_mask(magnitude, self.threshold, dim=1, keepdim=True)
            kept = magnitude.masked_fill(runtime, 0.0)
        else:
            kept = magnitude
        kept = kept[:, 1:].reshape(-1, width)  # position 0: the attention sink, see the module docstring
        top = kept.topk(min(self.top, width), dim=1)
        stats = site.stats
        if not stats:
            stats.update(values=[], indices=[], sumsq=torch.zeros(width, dtype=torch.float64), n_positions=0)
        stats["values"].append(top.values)
        stats["indices"].append(top.indices)
        stats["sumsq"] += (seqs[:, 1:].double() ** 2).sum(dim=(0, 1))
        stats["n_positions"] += top.values.shape[0]

    def layer_output(self, name: str, module: nn.Module, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        layer = self.layers.get(name)
        if layer is None:
            weight = linear_weight(module).detach().float()
            scale = weight.abs().amax(dim=1) / INT8_MAX
            layer = self.layers[name] = _Layer(
                name, site, weight.shape[0], float((weight.double() ** 2).sum()), float((scale.double() ** 2).sum() / 12.0)
            )
        y = y.float()
        y = y.reshape(-1, y.shape[-2] if y.dim() > 2 else y.shape[0], y.shape[-1])[:, 1:]
        layer.signal += float((y.double() ** 2).sum())


class _Greedy:
    """One layer's state in the greedy: the columns taken and the current gain of every other column."""

    def __init__(self, layer: _Layer):
        self.layer = layer
        stats = layer.site.stats
        self.values = torch.cat(stats["values"])  # [T, m] descending
        self.indices = torch.cat(stats["indices"])
        self.width = stats["sumsq"].numel()
        self.taken = torch.zeros(self.width, dtype=torch.bool)
        self.cost = fp_column_bytes(layer.out_features)
        self.weight_gain = stats["sumsq"] * layer.weight_noise

    def best(self) -> tuple[float, int]:
        """(gain per byte, column) of the best column not taken yet; gain <= 0 when none helps."""
        rows = torch.arange(self.values.shape[0])
        left = ~self.taken[self.indices]  # [T, m]
        has_first = left.any(dim=1)
        first = left.int().argmax(dim=1)
        left[rows, first] = False
        has_second = left.any(dim=1)
        second = left.int().argmax(dim=1)
        m1 = self.values[rows, first]
        if self.values.shape[1] == self.width:
            m2 = torch.where(has_second, self.values[rows, second], torch.zeros_like(m1))
        else:  # the next value is at most the last one kept: a lower bound of the gain
            m2 = torch.where(has_second, self.values[rows, second], self.values[:, -1])
        drop = (m1.double() ** 2 - m2.double() ** 2).clamp_min(0.0) * has_first
        act_gain = torch.zeros(self.width, dtype=torch.float64).index_add_(0, self.indices[rows, first], drop)
        act_gain *= self.layer.weight_energy / (INT8_MAX**2 * 12.0)
        gain = (act_gain + self.weight_gain) / max(self.layer.signal, 1e-30)
        gain[self.taken] = -1.0
        column = int(gain.argmax())
        return float(gain[column]) / self.cost, column


def select_columns(layers: dict[str, _Layer], budget_bytes: int) -> tuple[dict[str, list[int]], int]:
    """The greedy: best estimated noise-to-signal reduction per byte first, until the budget is spent."""
    states = {name: _Greedy(layer) for name, layer in layers.items()}
    heap = []
    for order, (name, state) in enumerate(states.items()):
        gain, column = state.best()
        heapq.heappush(heap, (-gain, order, name, column))
    order_of = {name: i for i, name in enumerate(states)}
    columns = {name: [] for name in states}
    spent = 0
    while heap:
        neg_gain, _, name, column = heapq.heappop(heap)
        state = states[name]
        if -neg_gain <= 0.0:
            break  # nothing left that lowers the estimated noise
        if spent + state.cost > budget_bytes:
            continue  # this layer's columns no longer fit; cheaper layers' may
        columns[name].append(column)
        spent += state.cost
        state.taken[column] = True
        if not bool(state.taken.all()):
            gain, column = state.best()
            heapq.heappush(heap, (-gain, order_of[name], name, column))
    return {name: sorted(cols) for name, cols in columns.items()}, spent


@torch.inference_mode()
def calibration_plan(
    model: nn.Module,
    batches: torch.Tensor,
    threshold: float = OUTLIER_MAGNITUDE,
    budget: float = MEMORY_BUDGET,
    progress: Progress | None = None,
) -> CalibrationPlan:
    """Run the float ``model`` on ``batches`` (int64 [n, seq_len], held-out text) and choose, within
    ``budget`` (a share of the int8 model's bytes), the columns kept in 16 bit (module docstring).

    ``threshold`` is the run-time alpha the model will be quantized with (0: no decomposition).
    """
    if batches.dim() != 2 or batches.numel() == 0:
        raise ValueError(f"batches must be int64 [n_windows, seq_len], got shape {tuple(batches.shape)}")
    if batches.shape[1] < 2:
        raise ValueError(f"calibration windows need >= 2 tokens (position 0 is left out), got {batches.shape[1]}")
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget is a share of the int8 model's bytes in [0, 1), got {budget}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    with _Collector(model, threshold) as collector:
        for window in (progress or _identity)(list(batches)):
            model(input_ids=window.unsqueeze(0))
    int8_bytes = int8_model_bytes(model)
    columns, spent = select_columns(collector.layers, int(budget * int8_bytes))
    n_positions = max((layer.site.stats["n_positions"] for layer in collector.layers.values()), default=0)
    return CalibrationPlan(float(threshold), None, n_positions, columns, budget, spent, int8_bytes)


def quantize_with_plan(model: nn.Module, plan: CalibrationPlan, config: Int8Config | None = None) -> QuantizeReport:
    """``quantize_`` with the planned columns of each converted layer kept in 16 bit (``Int8Config.fp_columns``)."""
    config = config or Int8Config()
    columns = {name: cols for name, cols in plan.columns.items() if cols}
    return quantize_(model, dataclasses.replace(config, fp_columns=columns))


def quantize_calibrated(
    model: nn.Module,
    batches: torch.Tensor,
    config: Int8Config | None = None,
    budget: float = MEMORY_BUDGET,
    progress: Progress | None = None,
) -> tuple[QuantizeReport, CalibrationPlan]:
    """Calibrate on ``batches``, then quantize ``model`` in place keeping the chosen columns in 16 bit.

    The plan is made for ``config.threshold`` (alpha; the paper's 6 by default).
    """
    config = config or Int8Config()
    plan = calibration_plan(model, batches, config.threshold, budget, progress)
    return quantize_with_plan(model, plan, config), plan
