"""The quantization methods of the paper's Table 1, as real W8A8 computations.

Every int8 method quantizes the activations too, at every forward: the input of each linear layer
is turned into int8 codes, the codes are multiplied as integers (exactly) against int8 weight codes,
and the integer product is scaled back. Nothing is simulated by rounding weights alone, except
``w8_only``, which exists to show that floor.

Granularity (x [M, K] the layer input, weight [N, K], out = x @ weight.T):

* ``tensor``: one scale for all of x and one for all of the weight (the naive baseline);
* ``row``: one scale per row of x (per token), one for the whole weight;
* ``vector``: one scale per row of x and one per row of the weight (per output feature), i.e. the
  outer product of two scale vectors dequantizes the int32 product (vector-wise quantization).

``decomp`` adds the mixed-precision decomposition: every input column holding a value with
|x| >= threshold is taken out of the int8 product and multiplied in float32 against the original
float weight columns (the paper's semantics). ``llm_int8`` is our :class:`~llm_int8.Linear8bitLt`,
which multiplies the runtime outlier columns against dequantized int8 weight columns as
bitsandbytes does, unless calibrated columns are stored (``llm_int8_calibrated``, see
``calibrate.py``). The output head and embedding-tied layers stay in float for every method, as
``quantize_`` does by default.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import functional as F
from ..convert import Int8Config, convert_module, default_skip_modules, is_convertible, quantize_

PAPER_THRESHOLD = 6.0
BNB_PIP = "pip install bitsandbytes==0.50.2 (the 'dev' extra of llm-int8)"
# Integers below 2**24 in magnitude are exact in float32: the largest K-chunk for an exact float32
# GEMM of integer operands bounded by max_abs is 2**24 // max_abs**2.
FLOAT32_EXACT_INT = 2**24


def exact_integer_matmul(a: torch.Tensor, b: torch.Tensor, max_abs: int) -> torch.Tensor:
    """``a @ b.T`` for integer-valued float32 a [M, K], b [N, K] with |entries| <= max_abs, exactly.

    Used for zero-point codes shifted by their zero point (|values| <= 255 when the slice holds 0,
    more otherwise: outside the [-127, 127] contract of ``int8_linear_matmul``). float32 GEMMs over K-chunks whose partial sums stay below
    2**24, summed in int64. Returns float32 [M, N] (exact up to the final float32 rounding).
    """
    chunk = max(1, FLOAT32_EXACT_INT // (max_abs * max_abs))
    acc = torch.zeros((a.shape[0], b.shape[0]), dtype=torch.int64)
    for start in range(0, a.shape[1], chunk):
        acc += (a[:, start : start + chunk] @ b[:, start : start + chunk].T).to(torch.int64)
    return acc.float()


class QuantLinearW8A8(nn.Module):
    """A linear layer computed in int8 from int8 activations and int8 weights (Table 1 baselines).

    scheme: ``"absmax"`` (symmetric codes in [-127, 127]) or ``"zeropoint"`` (asymmetric, [-128, 127]).
    granularity: ``"tensor"``, ``"row"`` or ``"vector"`` (see the module docstring).
    threshold: > 0 adds the mixed-precision decomposition against the float weight columns.
    """

    def __init__(self, weight: torch.Tensor, bias, scheme: str, granularity: str, threshold: float = 0.0):
        super().__init__()
        if scheme not in ("absmax", "zeropoint"):
            raise ValueError(f"scheme must be 'absmax' or 'zeropoint', got {scheme!r}")
        if granularity not in ("tensor", "row", "vector"):
            raise ValueError(f"granularity must be 'tensor', 'row' or 'vector', got {granularity!r}")
        self.scheme, self.granularity, self.threshold = scheme, granularity, float(threshold)
        weight = weight.detach().float()
        self.register_buffer("weight_float", weight if threshold > 0 else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        w_dim = -1 if granularity == "vector" else None
        if scheme == "absmax":
            codes, absmax = F.absmax_quantize(weight, dim=w_dim)
            self.register_buffer("weight_int8", codes)
            self.register_buffer("weight_scale", absmax.reshape(1, -1) / F.INT8_MAX)  # [1, N] or [1, 1]
        else:
            codes, scale, zero_point = F.zeropoint_quantize(weight, dim=w_dim)
            self.register_buffer("weight_int8", codes)
            self.register_buffer("weight_shifted", codes.float() - zero_point)  # integer-valued
            self.weight_shifted_max = int(self.weight_shifted.abs().max()) if weight.numel() else 0
            self.register_buffer("weight_scale", 1.0 / scale.reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        out = None
        if self.threshold > 0:
            cols = (xf.abs() >= self.threshold).any(dim=0).nonzero().view(-1)
            if cols.numel():
                out = xf[:, cols] @ self.weight_float[:, cols].T
                xf = xf.index_fill(1, cols, 0.0)
        x_dim = None if self.granularity == "tensor" else -1
        if self.scheme == "absmax":
            x_int8, x_absmax = F.absmax_quantize(xf, dim=x_dim)
            acc = F.int8_linear_matmul(x_int8, self.weight_int8).float()
            main = acc * (x_absmax.reshape(-1, 1) / F.INT8_MAX) * self.weight_scale
        else:
            x_codes, x_scale, x_zero = F.zeropoint_quantize(xf, dim=x_dim)
            x_shifted = x_codes.float() - x_zero
            bound = max(int(x_shifted.abs().max()) if x_shifted.numel() else 0, self.weight_shifted_max, 1)
            acc = exact_integer_matmul(x_shifted, self.weight_shifted, bound)
            main = acc / x_scale.reshape(-1, 1) * self.weight_scale
        out = main if out is None else out + main
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], -1)


class WeightOnlyInt8Linear(nn.Module):
    """Vector-wise int8 weights dequantized to float; activations stay float (not W8A8: the floor)."""

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        weight_int8, weight_absmax = F.quantize_weight(weight.detach())
        self.register_buffer("weight_dequant", F.dequantize_weight(weight_int8, weight_absmax, weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight_dequant.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class CastThroughFp16(nn.Module):
    """Runs ``inner`` on x cast to float16 and casts the result back: bitsandbytes' LLM.int8() path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.half()).to(x.dtype)


def _float_weight(module: nn.Module) -> torch.Tensor:
    # transformers' GPT-2 Conv1D stores [in, out]; every method works on the [out, in] weight.
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def replace_linears(model: nn.Module, make: Callable[[nn.Module, str], nn.Module]) -> list[str]:
    """Replace, in place, every convertible layer not skipped by default by ``make(layer, name)``."""
    skip = default_skip_modules(model)
    names = [
        name
        for name, module in model.named_modules()
        if is_convertible(module) and name and not any(name == s or name.startswith(s + ".") for s in skip)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        with torch.no_grad():
            setattr(parent, child, make(getattr(parent, child), name))
    return names


def _w8a8(scheme: str, granularity: str, threshold: float = 0.0):
    def build(model, context):
        replace_linears(
            model, lambda m, _: QuantLinearW8A8(_float_weight(m), m.bias, scheme, granularity, threshold)
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
        weight = _float_weight(module)
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
    replace_linears(model, lambda m, _: WeightOnlyInt8Linear(_float_weight(m), m.bias))
    return model


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    build: Callable  # (model copy, context dict) -> model


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fp32", "fp32", lambda model, context: model),
        Method("bf16", "bf16 (whole model)", _cast(torch.bfloat16)),
        Method("fp16", "fp16 (whole model)", _cast(torch.float16)),
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
    ]
}
TABLE1_METHODS = [
    "fp32", "bf16", "absmax_tensor", "zeropoint_tensor", "absmax_row", "absmax_vector", "zeropoint_vector",
    "absmax_row_decomp", "llm_int8", "llm_int8_zeropoint",
]


def build_method(model: nn.Module, name: str, context: dict | None = None) -> nn.Module:
    """A deep copy of the float ``model`` converted by method ``name`` (the original is untouched).

    ``context`` carries what some methods need: ``calibration`` (a :class:`CalibrationPlan`) for
    ``llm_int8_calibrated``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    return METHODS[name].build(copy.deepcopy(model), context or {}).eval()
