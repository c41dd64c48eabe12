"""The quantization methods of the paper's Table 1 and ours, each a way to convert a float model.

Every int8 method is W8A8 except ``w8_only``: the input of each linear layer is quantized at every
forward, the codes are multiplied as integers (exactly) against int8 weight codes, and the integer
product is scaled back. The per-tensor, row-wise and zero-point baselines are in :mod:`.baselines`;
``llm_int8`` is our :class:`~llm_int8.Linear8bitLt` (vector-wise, the run-time outlier columns
multiplied against dequantized int8 weight columns, as bitsandbytes does), ``llm_int8_calibrated``
adds calibrated 16-bit columns (``calibrate.py``), ``bitsandbytes`` runs bitsandbytes itself.

Every method converts the layers ``quantize_`` converts (:func:`llm_int8.convert.select_layers`: the
output head and embedding-tied layers stay float) by swapping modules in a copy of the float model
that shares its tensors (:func:`shared_copy`), so the float model is never duplicated in memory and
never changed; methods that cast the whole model (``bf16``, ``fp16``) work on a deep copy.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import functional as F
from ..convert import Int8Config, convert_module, linear_weight, quantize_, replace_modules, select_layers
from .baselines import QuantLinearW8A8

PAPER_THRESHOLD = 6.0
BNB_PIP = "pip install bitsandbytes==0.50.2 (the 'dev' extra of llm-int8)"


class WeightOnlyInt8Linear(nn.Module):
    """Vector-wise int8 weights dequantized to float; activations stay float (not W8A8: the floor).

    Holds the int8 codes and row absmax and dequantizes them at each forward (to the float weight's
    dtype, then x's), so the method costs a quarter of the float weight's memory beside the float
    model, not a second float copy of it."""

    def __init__(
        self, weight: torch.Tensor | None, bias, codes: tuple[torch.Tensor, torch.Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        """From the float ``weight`` [N, K] (rounded to nearest), or from ``codes`` (int8 [N, K], absmax [N])
        with ``weight`` None and the float ``dtype`` they dequantize to."""
        super().__init__()
        if codes is None and weight is None:
            raise ValueError("WeightOnlyInt8Linear needs a float weight or int8 codes with their row absmax")
        weight_int8, weight_absmax = F.quantize_weight(weight.detach()) if codes is None else codes
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_absmax", weight_absmax)
        self.weight_dtype = dtype if weight is None else weight.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        weight = F.dequantize_weight(self.weight_int8, self.weight_absmax, self.weight_dtype).to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


class CastThroughFp16(nn.Module):
    """Runs ``inner`` on x cast to float16 and casts the result back: bitsandbytes' LLM.int8() path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.half()).to(x.dtype)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the original's own tensors.

    Swapping modules in the copy leaves the original untouched and costs no weight memory; only code
    that writes into a tensor (``.to(dtype)`` casts parameters in place) must use a deep copy.
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def replace_linears(model: nn.Module, make: Callable[[nn.Module, str], nn.Module]) -> list[str]:
    """Replace, in place, every layer ``quantize_`` would convert by ``make(layer, name)``."""
    chosen = set(select_layers(model)[0])
    return replace_modules(model, lambda module, name: name in chosen, make)


def _w8a8(scheme: str, granularity: str, threshold: float = 0.0):
    def build(model, context):
        replace_linears(
            model, lambda m, _: QuantLinearW8A8(linear_weight(m), m.bias, scheme, granularity, threshold)
        )
        return model

    return build


def _cast(dtype):
    def build(model, context):
        return model.to(dtype)

    return build


def _llm_int8(threshold: float):
    def build(model, context):
        quantize_(model, Int8Config(threshold=threshold))
        return model

    return build


def _llm_int8_calibrated(model, context):
    plan = context.get("calibration")
    if plan is None:
        raise ValueError("the method 'llm_int8_calibrated' needs a calibration plan (see llm_int8.eval.calibrate)")
    from .calibrate import quantize_with_plan

    quantize_with_plan(model, plan, Int8Config(threshold=context.get("threshold", PAPER_THRESHOLD)))
    return model


def _bnb_emulated(model, context):
    replace_linears(model, lambda m, _: CastThroughFp16(convert_module(m, PAPER_THRESHOLD)))
    return model


def _bitsandbytes_module():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"the method 'bitsandbytes' runs bitsandbytes itself; install it with: {BNB_PIP}")
    # bitsandbytes logs at every call that it casts fp32 inputs to fp16; the results table says so once.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return importlib.import_module("bitsandbytes")


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _bitsandbytes(model, context):
    bnb = _bitsandbytes_module()

    def make(module, _name):
        weight = linear_weight(module)
        layer = bnb.nn.Linear8bitLt(
            weight.shape[1], weight.shape[0], bias=module.bias is not None, has_fp16_weights=False,
            threshold=PAPER_THRESHOLD,
        )
        state = {"weight": weight.detach().clone()}
        if module.bias is not None:
            state["bias"] = module.bias.detach().clone()
        layer.load_state_dict(state)
        return layer.eval()

    replace_linears(model, make)
    return model


def _w8_only(model, context):
    replace_linears(model, lambda m, _: WeightOnlyInt8Linear(linear_weight(m), m.bias))
    return model


def _rounding(context, method: str):
    rounding = context.get("rounding")
    if rounding is None:
        raise ValueError(f"the method {method!r} needs GPTQ codes (see llm_int8.eval.rounding.gptq_rounding)")
    return rounding


def _llm_int8_gptq(model, context):
    from .rounding import apply_rounding

    rounding = _rounding(context, "llm_int8_gptq")
    quantize_(model, Int8Config(threshold=context.get("threshold", PAPER_THRESHOLD)))
    apply_rounding(model, rounding)  # with the rounding's migration, if any (its norms are migrated too)
    return model


def _llm_int8_smooth(model, context):
    """LLM.int8() with the activation scale migrated into the norms and the int8 weights (:mod:`.smooth`),
    round-to-nearest codes of W s, at ``context['threshold']`` (default 6)."""
    from ..nn import Linear8bitLt
    from .smooth import migrate_norms, migrated_weight

    migration = context.get("migration")
    if migration is None:
        raise ValueError("the method 'llm_int8_smooth' needs a migration (see llm_int8.eval.smooth.migration_scales)")
    threshold = context.get("threshold", PAPER_THRESHOLD)
    scales = migration.layer_scales()
    migrate_norms(model, migration)
    replace_linears(model, lambda m, name: Linear8bitLt.from_weight(
        migrated_weight(linear_weight(m), scales.get(name)), m.bias, threshold, name=f"{name}.weight"))
    return model


def _w8_gptq(model, context):
    rounding = _rounding(context, "w8_gptq")
    replace_linears(model, lambda m, name: WeightOnlyInt8Linear(
        linear_weight(m), m.bias, (rounding.codes[name], rounding.absmax[name])))
    return model


def _bitsandbytes_gptq(model, context):
    """bitsandbytes' own Linear8bitLt holding our GPTQ codes and SCB (what it loads from our checkpoint)."""
    bnb = _bitsandbytes_module()
    rounding = _rounding(context, "bitsandbytes_gptq")

    def make(module, name):
        weight = linear_weight(module)
        layer = bnb.nn.Linear8bitLt(
            weight.shape[1], weight.shape[0], bias=module.bias is not None, has_fp16_weights=False,
            threshold=PAPER_THRESHOLD,
        ).to("cpu")  # quantized (moved to a device) before a quantized state dict loads, as bitsandbytes requires
        state = {"weight": rounding.codes[name].clone(), "SCB": rounding.absmax[name].clone()}
        if module.bias is not None:
            state["bias"] = module.bias.detach().clone()
        layer.load_state_dict(state, strict=False)
        if not (torch.equal(layer.weight.data, state["weight"]) and torch.equal(layer.weight.SCB, state["SCB"])):
            raise RuntimeError(f"{name}: bitsandbytes did not keep the int8 codes and SCB it was given")
        return layer.eval()

    replace_linears(model, make)
    return model


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    build: Callable  # (model copy, context dict) -> model
    shares_weights: bool = True  # builds by swapping modules (a shared_copy will do), not by casting


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fp32", "fp32", lambda model, context: model),
        Method("bf16", "bf16 (whole model)", _cast(torch.bfloat16), shares_weights=False),
        Method("fp16", "fp16 (whole model)", _cast(torch.float16), shares_weights=False),
        Method("absmax_tensor", "int8 absmax per-tensor", _w8a8("absmax", "tensor")),
        Method("zeropoint_tensor", "int8 zeropoint per-tensor", _w8a8("zeropoint", "tensor")),
        Method("absmax_row", "int8 absmax row-wise", _w8a8("absmax", "row")),
        Method("absmax_vector", "int8 absmax vector-wise (alpha=0)", _llm_int8(0.0)),
        Method("zeropoint_vector", "int8 zeropoint vector-wise", _w8a8("zeropoint", "vector")),
        Method("absmax_row_decomp", "int8 absmax row-wise + decomp", _w8a8("absmax", "row", PAPER_THRESHOLD)),
        Method("llm_int8", "LLM.int8() absmax (alpha=6)", _llm_int8(PAPER_THRESHOLD)),
        Method(
            "llm_int8_zeropoint", "LLM.int8() zeropoint (alpha=6)", _w8a8("zeropoint", "vector", PAPER_THRESHOLD)
        ),
        Method("llm_int8_calibrated", "LLM.int8() + calibrated 16-bit cols", _llm_int8_calibrated),
        Method("bitsandbytes", "bitsandbytes 0.50.2 LLM.int8()", _bitsandbytes),
        Method("bnb_emulated", "bitsandbytes semantics (our ops, x via fp16)", _bnb_emulated),
        Method("w8_only", "int8 weights only, fp32 activations", _w8_only),
        Method("llm_int8_gptq", "LLM.int8() + GPTQ-rounded codes", _llm_int8_gptq),
        Method("w8_gptq", "GPTQ int8 weights only, fp32 activations", _w8_gptq),
        Method("llm_int8_smooth", "LLM.int8() + migrated activation scale", _llm_int8_smooth),
        Method("bitsandbytes_gptq", "bitsandbytes 0.50.2 on our GPTQ codes", _bitsandbytes_gptq),
    ]
}
TABLE1_METHODS = [
    "fp32", "bf16", "absmax_tensor", "zeropoint_tensor", "absmax_row", "absmax_vector", "zeropoint_vector",
    "absmax_row_decomp", "llm_int8", "llm_int8_zeropoint",
]


def build_method(model: nn.Module, name: str, context: dict | None = None) -> nn.Module:
    """The float ``model`` converted by method ``name``, in a copy (the original is untouched; the copy
    shares its float tensors unless the method casts them).

    ``context`` carries what some methods need: ``calibration`` (a :class:`CalibrationPlan`) for
    ``llm_int8_calibrated``; ``rounding`` (a :class:`.rounding.RoundingResult`) for the ``*_gptq`` methods;
    ``migration`` (a :class:`.smooth.Migration`) for ``llm_int8_smooth``; ``threshold`` (alpha, default 6)
    for ``llm_int8_smooth``, ``llm_int8_gptq`` and ``llm_int8_calibrated``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    method = METHODS[name]
    work = shared_copy(model) if method.shares_weights else copy.deepcopy(model)
    return method.build(work, context or {}).eval()
