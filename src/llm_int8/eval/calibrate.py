"""Calibrated 16-bit outlier columns (beyond bitsandbytes).

bitsandbytes multiplies the outlier columns it finds at run time against *dequantized int8* weight
columns; the paper keeps them in 16 bit. Outlier dims are systematic (the same dims in every layer
and at most tokens), so a short calibration finds them: every input column whose magnitude reaches
the threshold at >= ``min_position_share`` of the calibration positions is stored with its float
weight column (``Linear8bitLt.set_fp_columns``) and always takes the 16-bit path. Columns that
become outliers only at run time still work, through the dequantized int8 columns.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import torch
from torch import nn

from ..convert import Int8Config, QuantizeReport, quantize_
from .outliers import OUTLIER_MAGNITUDE, InputTracker
from .perplexity import Progress, _identity

# A column is calibrated when it is an outlier at >= 1 % of the calibration positions: rare
# outliers (the huge activation at position 0) are left to the run-time path.
MIN_POSITION_SHARE = 0.01
FP_COLUMN_DTYPE = torch.float16  # the paper's 16-bit outlier path


@dataclass
class CalibrationPlan:
    """Per linear layer (qualified name), the input columns kept in 16 bit."""

    threshold: float
    min_position_share: float
    n_positions: int
    columns: dict[str, list[int]]

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "min_position_share": self.min_position_share,
            "n_positions": self.n_positions,
            "columns": self.columns,
        }


@torch.inference_mode()
def calibration_plan(
    model: nn.Module,
    batches: torch.Tensor,
    threshold: float = OUTLIER_MAGNITUDE,
    min_position_share: float = MIN_POSITION_SHARE,
    progress: Progress | None = None,
) -> CalibrationPlan:
    """Run the float ``model`` on ``batches`` (int64 [n, seq_len]) and pick each layer's outlier columns."""
    if batches.dim() != 2 or batches.numel() == 0:
        raise ValueError(f"batches must be int64 [n_windows, seq_len], got shape {tuple(batches.shape)}")
    if not 0.0 <= min_position_share <= 1.0:
        raise ValueError(f"min_position_share must lie in [0, 1], got {min_position_share}")
    with InputTracker(model, threshold) as tracker:
        for window in (progress or _identity)(list(batches)):
            model(input_ids=window.unsqueeze(0))
    return plan_from_tracker(tracker, min_position_share)


def plan_from_tracker(tracker: InputTracker, min_position_share: float = MIN_POSITION_SHARE) -> CalibrationPlan:
    """The calibration plan given by the statistics an :class:`InputTracker` gathered."""
    columns = {}
    for site in tracker.sites:
        share = site.count_large.double() / max(site.n_positions, 1)
        # share 0 would select every column: min_position_share = 0 means "seen at least once".
        selected = (share >= min_position_share) & (site.count_large > 0)
        cols = selected.nonzero().view(-1).tolist()
        for name in site.names:
            columns[name] = cols
    n_positions = max((site.n_positions for site in tracker.sites), default=0)
    return CalibrationPlan(tracker.threshold, min_position_share, n_positions, columns)


def quantize_with_plan(
    model: nn.Module, plan: CalibrationPlan, config: Int8Config | None = None, dtype: torch.dtype = FP_COLUMN_DTYPE
) -> QuantizeReport:
    """``quantize_`` with the planned columns of each converted layer kept in 16 bit (``Int8Config.fp_columns``)."""
    config = config or Int8Config()
    if dtype != FP_COLUMN_DTYPE:
        raise ValueError(f"calibrated columns are stored in {FP_COLUMN_DTYPE}, got dtype={dtype}")
    return quantize_(model, dataclasses.replace(config, fp_columns=dict(plan.columns)))


def quantize_calibrated(
    model: nn.Module,
    batches: torch.Tensor,
    config: Int8Config | None = None,
    min_position_share: float = MIN_POSITION_SHARE,
    progress: Progress | None = None,
) -> tuple[QuantizeReport, CalibrationPlan]:
    """Calibrate on ``batches``, then quantize ``model`` in place keeping the outlier columns in 16 bit."""
    config = config or Int8Config()
    threshold = config.threshold if config.threshold > 0 else OUTLIER_MAGNITUDE
    plan = calibration_plan(model, batches, threshold, min_position_share, progress)
    return quantize_with_plan(model, plan, config), plan
