"""The saved format of an int8 linear layer, and the one validator every load path calls.

A ``Linear8bitLt`` is saved under bitsandbytes' ``Linear8bitLt`` keys, so checkpoints move both ways:

    weight         int8 [N, K]    vector-wise codes in [-127, 127] (never -128), one row per output feature
    SCB            float32 [N]    each weight row's absmax (bitsandbytes' name for the weight scale)
    weight_format  uint8 scalar   0: row-major, the only layout there is
    bias           float [N]      optional, in its own dtype
    fp_cols        int64 [F]      optional (llm-int8 only): calibrated input columns kept in 16/32-bit
    fp_weight      float [N, F]   with fp_cols: the float weight columns they multiply

:func:`validate_int8_layer` is the only place these rules are written down. ``Linear8bitLt``'s state-dict
loading and ``set_fp_columns``, ``llm_int8.checkpoint`` and the transformers integration
(``from_pretrained`` of a saved int8 model) all call it, so every load path accepts and refuses the same
tensors, with an error that names the layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._ops import INT8_MAX

WEIGHT = "weight"
SCALE = "SCB"
WEIGHT_FORMAT = "weight_format"
BIAS = "bias"
FP_COLS = "fp_cols"
FP_WEIGHT = "fp_weight"
#: Every key a ``Linear8bitLt`` may save, in the order of its state dict.
LAYER_KEYS = (WEIGHT, BIAS, SCALE, WEIGHT_FORMAT, FP_COLS, FP_WEIGHT)
#: bitsandbytes' ``weight_format`` code for a row-major int8 weight.
WEIGHT_FORMAT_ROW = 0

INVALID_REMEDY = (
    "the file is corrupt or was not written for this format: restore it from a backup, or re-save it with "
    "llm_int8.checkpoint.save_checkpoint from the model converted by llm_int8.quantize_"
)


class CheckpointError(ValueError):
    """A checkpoint or state dict that cannot be read, or whose tensors are invalid for an int8 model."""


def invalid(where: str, problem: str, remedy: str = INVALID_REMEDY) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}; {remedy}")


def weight_format_tensor(device=None) -> torch.Tensor:
    """The ``weight_format`` buffer: uint8 scalar 0 (row-major)."""
    return torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8, device=device)


def _has_values(t: torch.Tensor) -> bool:
    return t.numel() > 0 and not t.is_meta


def validate_int8_layer(
    tensors: Mapping[str, torch.Tensor | None], where: str, shape: tuple[int, int] | None = None
) -> None:
    """Check one int8 layer's tensors (keyed by :data:`LAYER_KEYS`; absent keys or None: not saved).

    Raises :class:`CheckpointError` starting with ``where`` (the layer's name) and saying what is wrong.
    ``shape`` is the [out_features, in_features] the weight must have, when a module is known. Values are
    checked too (codes, scales, column indices), except on the meta device where there are none.
    """
    weight, scale = tensors.get(WEIGHT), tensors.get(SCALE)
    if weight is None:
        raise invalid(where, f"has {SCALE} but no {WEIGHT}")
    if scale is None:
        raise invalid(where, f"int8 weight without its scales (no {SCALE})")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise invalid(
            where, f"{WEIGHT} must be a 2-D int8 tensor [N, K] next to {SCALE}, got {weight.dtype} {tuple(weight.shape)}"
        )
    if shape is not None and tuple(weight.shape) != tuple(shape):
        raise invalid(
            where, f"{WEIGHT} has shape {tuple(weight.shape)}, the layer expects [out_features, in_features] = "
            f"{list(shape)}", "build the layer with the checkpoint's shape",
        )
    n, k = weight.shape
    if _has_values(weight) and int(weight.min()) < -INT8_MAX:
        row, col = (weight < -INT8_MAX).nonzero()[0].tolist()
        raise invalid(
            where,
            f"{WEIGHT} holds the code -128 (first at row {row}, column {col}), outside [-127, 127], the symmetric "
            "range of absmax quantization that this format (and bitsandbytes') stores",
            "it was not written by LLM.int8() quantization: re-quantize the float weight with llm_int8 "
            "(Linear8bitLt.from_linear or quantize_), or, if its producer meant -127, clamp the codes first "
            "(weight.clamp_(-127, 127))",
        )
    if not scale.is_floating_point() or tuple(scale.shape) != (n,):
        raise invalid(
            where, f"{SCALE} (weight row absmax) must be a float tensor of shape [N] = [{n}], "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )
    if _has_values(scale):
        bad = ~torch.isfinite(scale) | (scale < 0)
        if bool(bad.any()):
            rows = bad.nonzero().view(-1)[:5].tolist()
            raise invalid(
                where, f"{SCALE} must be finite and >= 0 (a row absmax), but rows {rows} hold {scale[bad][:5].tolist()}"
            )
    weight_format = tensors.get(WEIGHT_FORMAT)
    if weight_format is not None and (
        weight_format.numel() != 1 or (not weight_format.is_meta and int(weight_format) != WEIGHT_FORMAT_ROW)
    ):
        raise invalid(
            where, f"{WEIGHT_FORMAT} must be {WEIGHT_FORMAT_ROW} (row-major), got {weight_format.tolist()}; "
            "other layouts (bitsandbytes' col32/turing formats) are not supported"
        )
    bias = tensors.get(BIAS)
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        raise invalid(where, f"{BIAS} must be a float tensor of shape [{n}], got {bias.dtype} {tuple(bias.shape)}")
    validate_fp_columns(tensors.get(FP_COLS), tensors.get(FP_WEIGHT), n, k, where)


def validate_fp_columns(
    fp_cols: torch.Tensor | None, fp_weight: torch.Tensor | None, n: int, k: int, where: str,
    remedy: str = INVALID_REMEDY, check_values: bool = True, error: type[ValueError] = CheckpointError,
) -> None:
    """Check calibrated columns: both or neither; fp_cols int64 [F], distinct, in [0, K); fp_weight float [N, F].

    Raises ``error`` (a :class:`CheckpointError` for the load paths; callers checking their own arguments
    pass ValueError) starting with ``where``, ending with ``remedy``. ``check_values=False`` checks shapes
    and dtypes only (no host sync, e.g. while tracing for torch.compile).
    """

    def invalid(where, problem):
        return error(f"{where}: {problem}; {remedy}")

    if (fp_cols is None) != (fp_weight is None):
        raise invalid(where, f"{FP_COLS} and {FP_WEIGHT} go together; one is missing")
    if fp_cols is None:
        return
    if fp_cols.dtype != torch.int64 or fp_cols.dim() != 1:
        raise invalid(where, f"{FP_COLS} must be a 1-D int64 tensor, got {fp_cols.dtype} {tuple(fp_cols.shape)}")
    if not fp_weight.is_floating_point() or tuple(fp_weight.shape) != (n, fp_cols.numel()):
        raise invalid(
            where, f"{FP_WEIGHT} must be a float tensor [N, len({FP_COLS})] = [{n}, {fp_cols.numel()}], "
            f"got {fp_weight.dtype} {tuple(fp_weight.shape)}"
        )
    if check_values and _has_values(fp_cols):
        if int(fp_cols.min()) < 0 or int(fp_cols.max()) >= k:
            raise invalid(where, f"{FP_COLS} must lie in [0, {k}), got {fp_cols.tolist()[:10]}")
        if fp_cols.unique().numel() != fp_cols.numel():
            raise invalid(where, f"{FP_COLS} holds repeated columns: {fp_cols.tolist()[:10]}")
