"""The bad-input catalogue (docs/bad-inputs.md) as tests: each invalid input, its exception and message.

``CATALOGUE`` is the list the documentation is written from: every entry calls the public API
with one thing wrong and names the exception type and a fragment of the message that says what
was wrong and what to do. ``GAPS`` are the inputs the first fuzzing round found without such an
error (raw IndexError/AttributeError or silent acceptance); they are checked like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import llm_int8
import llm_int8.functional as F
from llm_int8.eval import baselines
from llm_int8 import Int8Config, Linear8bitLt
from llm_int8.checkpoint import CheckpointError, load_checkpoint, load_state_dict, save_checkpoint

pytestmark = pytest.mark.usefixtures("restore_torch_rng")  # leave the global RNG as found

N, K = 4, 8


@dataclass(frozen=True)
class BadInput:
    api: str  # the call, as documented
    what: str  # what is wrong with the input
    call: Callable[[], object]
    error: type[BaseException]
    message: str  # a regex fragment of the message


def weight():
    return F.quantize_weight(torch.randn(N, K, generator=torch.Generator().manual_seed(0)))


def x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (3, K)), generator=torch.Generator().manual_seed(1)).to(dtype)


def layer_state(**changes):
    state = dict(Linear8bitLt(K, N).state_dict())
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def mixed(**kwargs):
    weight_int8, weight_absmax = weight()
    args = dict(x=x(), weight_int8=weight_int8, weight_absmax=weight_absmax)
    args.update(kwargs)
    return F.int8_mixed_linear(**args)


CATALOGUE = [
    # -- functional: quantization primitives
    BadInput("absmax_quantize(x)", "x is not a tensor", lambda: baselines.absmax_quantize([1.0, 2.0]),
             TypeError, "x must be a torch.Tensor, got list"),
    BadInput("absmax_quantize(x)", "x is an integer tensor", lambda: baselines.absmax_quantize(torch.ones(3, dtype=torch.int32)),
             TypeError, r"must be float16, bfloat16 or float32, got torch.int32; cast it first"),
    BadInput("absmax_quantize(x)", "x is float64", lambda: baselines.absmax_quantize(torch.ones(3, dtype=torch.float64)),
             TypeError, r"got torch.float64; cast it first, e.g. x.float\(\)"),
    BadInput("absmax_quantize(x)", "x is a 0-d scalar", lambda: baselines.absmax_quantize(torch.tensor(1.0)),
             ValueError, "at least one dimension"),
    BadInput("zeropoint_quantize(x)", "x is empty", lambda: baselines.zeropoint_quantize(torch.ones(0, 3)),
             ValueError, "cannot choose a zero point for an empty tensor"),
    BadInput("int8_vectorwise_quant(x, threshold)", "threshold < 0",
             lambda: F.int8_vectorwise_quant(x(), threshold=-1.0), ValueError, "threshold must be >= 0"),
    BadInput("int8_vectorwise_quant(x, threshold)", "threshold is NaN",
             lambda: F.int8_vectorwise_quant(x(), threshold=float("nan")), ValueError, "threshold must be >= 0"),
    BadInput("quantize_weight(weight)", "weight is not 2-D", lambda: F.quantize_weight(torch.ones(K)),
             ValueError, r"weight must be 2-D \[N, K\]"),
    BadInput("quantize_weight(weight)", "weight is already int8",
             lambda: F.quantize_weight(torch.ones(N, K, dtype=torch.int8)), TypeError, "weight must be float16"),
    BadInput("dequantize_weight(weight_int8, weight_absmax)", "weight_int8 is float",
             lambda: F.dequantize_weight(torch.ones(N, K), torch.ones(N)), TypeError,
             r"weight_int8 must be int8.*quantize_weight\(weight\)"),
    BadInput("dequantize_weight(weight_int8, weight_absmax)", "weight_int8 is not 2-D",
             lambda: F.dequantize_weight(torch.ones(N, K, 1, dtype=torch.int8), torch.ones(N)), ValueError,
             r"weight_int8 must be 2-D \[N, K\]"),
    BadInput("dequantize_weight(weight_int8, weight_absmax)", "weight_absmax has the wrong shape",
             lambda: F.dequantize_weight(weight()[0], torch.ones(K)), ValueError,
             r"weight_absmax must have shape \[N\] = \[4\]"),
    BadInput("dequantize_weight(weight_int8, weight_absmax)", "weight_absmax is an integer tensor",
             lambda: F.dequantize_weight(weight()[0], torch.ones(N, dtype=torch.int64)), TypeError,
             "weight_absmax must be a float tensor"),
    # -- functional: int8 GEMM and dequantization
    BadInput("int8_linear_matmul(a, b)", "a is not int8", lambda: F.int8_linear_matmul(x(), weight()[0]),
             TypeError, "a must be an int8 tensor, got torch.float32"),
    BadInput("int8_linear_matmul(a, b)", "b is not 2-D",
             lambda: F.int8_linear_matmul(weight()[0], torch.ones(K, dtype=torch.int8)), ValueError,
             r"b must be 2-D \[N, K\]"),
    BadInput("int8_linear_matmul(a, b)", "inner dimensions differ",
             lambda: F.int8_linear_matmul(torch.ones(3, K + 1, dtype=torch.int8), weight()[0]), ValueError,
             r"inner dimensions differ.*need a\[..., K\], b\[N, K\]"),
    BadInput("int8_mm_dequant(acc, x_absmax, w_absmax)", "acc is not a 2-D int32 tensor",
             lambda: F.int8_mm_dequant(torch.ones(3, N), torch.ones(3), torch.ones(N)), TypeError,
             r"acc must be a 2-D int32 tensor \[M, N\]"),
    BadInput("int8_mm_dequant(acc, x_absmax, w_absmax)", "a scale vector has the wrong length",
             lambda: F.int8_mm_dequant(torch.ones(3, N, dtype=torch.int32), torch.ones(2), torch.ones(N)), ValueError,
             r"x_absmax must be \[M\] \(or \[M, 1\]\) = \[3\] and w_absmax \[N\] \(or \[N, 1\]\) = \[4\]"),
    BadInput("int8_mm_dequant(..., bias)", "bias has the wrong shape",
             lambda: F.int8_mm_dequant(torch.ones(3, N, dtype=torch.int32), torch.ones(3), torch.ones(N), torch.ones(N + 1)),
             ValueError, r"bias must have shape \[N\] = \[4\]"),
    # -- functional: the mixed-precision forward
    BadInput("int8_mixed_linear(x, ...)", "x is not a tensor", lambda: mixed(x=[1.0] * K),
             TypeError, "x must be a torch.Tensor"),
    BadInput("int8_mixed_linear(x, ...)", "x is an integer tensor", lambda: mixed(x=torch.ones(3, K, dtype=torch.int64)),
             TypeError, "x must be float16, bfloat16 or float32, got torch.int64"),
    BadInput("int8_mixed_linear(x, ...)", "x has the wrong number of features", lambda: mixed(x=x(3, K + 1)),
             ValueError, r"x has 9 features in its last dim but the weight expects K = 8"),
    BadInput("int8_mixed_linear(..., bias)", "bias has the wrong shape", lambda: mixed(bias=torch.ones(N + 1)),
             ValueError, r"bias must have shape \[N\] = \[4\]"),
    BadInput("int8_mixed_linear(..., threshold)", "threshold < 0", lambda: mixed(threshold=-6.0),
             ValueError, r"threshold must be >= 0 \(0 disables the outlier decomposition"),
    BadInput("int8_mixed_linear(..., fp_cols, fp_weight)", "fp_cols without fp_weight",
             lambda: mixed(fp_cols=torch.tensor([1])), ValueError, "fp_cols and fp_weight go together"),
    BadInput("int8_mixed_linear(..., fp_cols, fp_weight)", "fp_weight has the wrong shape",
             lambda: mixed(fp_cols=torch.tensor([1, 2]), fp_weight=torch.ones(N, 1)), ValueError,
             r"fp_weight must be a float tensor \[N, len\(fp_cols\)\] = \[4, 2\]"),
    BadInput("int8_mixed_linear(..., fp_cols, fp_weight)", "a column twice",
             lambda: mixed(fp_cols=torch.tensor([1, 1]), fp_weight=torch.ones(N, 2)), ValueError,
             "fp_cols holds repeated columns"),
    BadInput("int8_mixed_linear(x, weight_int8, ...)", "x and the weight on different devices",
             lambda: mixed(x=torch.ones(3, K, device="meta")), ValueError,
             r"x is on meta but the weight is on cpu; move them with .to\(device\)"),
    # -- nn.Linear8bitLt
    BadInput("Linear8bitLt(..., has_fp16_weights=True)", "asks for a trainable float weight",
             lambda: Linear8bitLt(K, N, has_fp16_weights=True), ValueError,
             r"has_fp16_weights=True is not supported.*LoRA"),
    BadInput("Linear8bitLt(in_features, out_features)", "a negative size", lambda: Linear8bitLt(-1, N),
             ValueError, "in_features and out_features must be >= 0"),
    BadInput("Linear8bitLt(..., threshold)", "threshold < 0", lambda: Linear8bitLt(K, N, threshold=-1),
             ValueError, "threshold must be >= 0"),
    BadInput("Linear8bitLt.from_weight(weight)", "weight is not 2-D", lambda: Linear8bitLt.from_weight(torch.ones(K)),
             ValueError, r"weight must be 2-D \[out_features, in_features\]"),
    BadInput("Linear8bitLt.from_linear(linear)", "not an nn.Linear",
             lambda: Linear8bitLt.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "from_linear expects an nn.Linear, got Conv1d"),
    BadInput("Linear8bitLt.set_fp_columns(cols, weight)", "a column outside [0, in_features)",
             lambda: Linear8bitLt(K, N).set_fp_columns(torch.tensor([K]), torch.ones(N, K)), ValueError,
             r"fp_cols must lie in \[0, 8\), got \[8\]; pass input column indices in \[0, in_features = 8\)"),
    BadInput("Linear8bitLt.set_fp_columns(cols, weight)", "weight is not the full float weight",
             lambda: Linear8bitLt(K, N).set_fp_columns(torch.tensor([1]), torch.ones(N, 1)), ValueError,
             r"weight must be the float weight \(4, 8\)"),
    BadInput("Linear8bitLt(...)(x)", "x has the wrong number of features", lambda: Linear8bitLt(K, N)(x(3, K + 1)),
             ValueError, "x has 9 features in its last dim but the weight expects K = 8"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "SCB holds NaN",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(SCB=torch.full((N,), float("nan")))), RuntimeError,
             r"SCB must be finite and >= 0 \(a row absmax\), but rows \[0, 1, 2, 3\] hold \[nan"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "SCB is negative",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(SCB=-torch.ones(N))), RuntimeError,
             "must be finite and >= 0"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "an int8 weight without SCB",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(SCB=None)), RuntimeError,
             r"int8 weight without its scales \(no SCB\)"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "a weight holding the code -128 (another tool's int8 range)",
             lambda: nn.Sequential(Linear8bitLt(K, N)).load_state_dict(
                 {f"0.{k}": v for k, v in layer_state(weight=torch.full((N, K), -128, dtype=torch.int8)).items()}),
             RuntimeError, r"0: weight holds the code -128 \(first at row 0, column 0\), outside \[-127, 127\]"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "fp_cols holding a column twice",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(fp_cols=torch.tensor([2, 2]), fp_weight=torch.ones(N, 2))),
             RuntimeError, "fp_cols holds repeated columns"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "a float weight together with SCB",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(weight=torch.ones(N, K))), RuntimeError,
             "found a float weight together with SCB"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "an int16 weight",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(weight=torch.ones(N, K, dtype=torch.int16))),
             RuntimeError, r"weight must be int8 \(quantized\) or float \(to quantize\), got torch.int16"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "a weight of the wrong shape",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(weight=torch.ones(N, K + 1, dtype=torch.int8))),
             RuntimeError, r"weight has shape \(4, 9\), the layer expects \[out_features, in_features\] = \[4, 8\]"),
    BadInput("Linear8bitLt.load_state_dict(sd)", "weight_format other than row-major",
             lambda: Linear8bitLt(K, N).load_state_dict(layer_state(weight_format=torch.tensor(1, dtype=torch.uint8))),
             RuntimeError, r"weight_format must be 0 \(row-major\), got 1"),
    # -- convert
    BadInput("Int8Config(threshold)", "threshold < 0", lambda: Int8Config(threshold=-1.0), ValueError,
             "Int8Config.threshold must be a number >= 0"),
    BadInput("Int8Config(threshold)", "threshold is a string", lambda: Int8Config(threshold="6"), ValueError,
             "Int8Config.threshold must be a number >= 0, got '6'"),
    BadInput("Int8Config(skip_modules)", "one string instead of a list", lambda: Int8Config(skip_modules="lm_head"),
             TypeError, "skip_modules must be a list of module names"),
    BadInput("quantize_(model, config)", "config is not an Int8Config",
             lambda: llm_int8.quantize_(nn.Sequential(nn.Linear(2, 2)), {"threshold": 6.0}), TypeError,
             "config must be an llm_int8.Int8Config, got dict"),
    BadInput("quantize_(model)", "the model is itself one nn.Linear", lambda: llm_int8.quantize_(nn.Linear(2, 2)),
             TypeError, r"convert it with Linear8bitLt.from_linear\(layer\)"),
]


def _checkpoint_cases(tmp_path):
    """Checkpoint entries need files; tests/test_checkpoint.py covers each defect in depth."""
    missing = tmp_path / "absent.safetensors"
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not tensors")
    good = save_checkpoint(Linear8bitLt(K, N), tmp_path / "layer.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    return [
        BadInput("load_state_dict(path)", "no such file", lambda: load_state_dict(missing), FileNotFoundError,
                 "no checkpoint file at"),
        BadInput("load_state_dict(path)", "not a checkpoint", lambda: load_state_dict(junk), CheckpointError,
                 "neither a safetensors file nor a torch.save file"),
        BadInput("load_state_dict(path)", "a truncated file", lambda: load_state_dict(truncated), CheckpointError,
                 "not a readable safetensors file .truncated or corrupt.*re-save it or restore a backup"),
        BadInput("load_checkpoint(module, path)", "module of another shape",
                 lambda: load_checkpoint(Linear8bitLt(K + 1, N), good), CheckpointError,
                 r"the checkpoint holds shape \(4, 8\), the module expects \(4, 9\)"),
        BadInput("load_checkpoint(module, path)", "module is not an nn.Module", lambda: load_checkpoint("model", good),
                 TypeError, "expects an nn.Module to load into"),
        BadInput("save_checkpoint(obj, path)", "the directory does not exist",
                 lambda: save_checkpoint(Linear8bitLt(K, N), tmp_path / "nope" / "x.safetensors"), FileNotFoundError,
                 "does not exist; create it first"),
    ]


def _id(entry: BadInput) -> str:
    return f"{entry.api} | {entry.what}"


@pytest.mark.parametrize("entry", CATALOGUE, ids=_id)
def test_catalogue(entry):
    with pytest.raises(entry.error, match=entry.message):
        entry.call()


def test_checkpoint_catalogue(tmp_path):
    for entry in _checkpoint_cases(tmp_path):
        with pytest.raises(entry.error, match=entry.message):
            entry.call()


# --------------------------------------------------------------------------------------------
# Known gaps: invalid inputs without a clear error yet (fixes proposed in the reliability report)

GAPS = [
    BadInput("int8_mixed_linear(..., fp_cols)", "a column outside [0, K)",
             lambda: mixed(fp_cols=torch.tensor([K + 90]), fp_weight=torch.ones(N, 1)), ValueError,
             r"fp_cols must .*\[0, 8\)"),
    BadInput("int8_mixed_linear(..., fp_cols)", "float column indices",
             lambda: mixed(fp_cols=torch.tensor([1.0]), fp_weight=torch.ones(N, 1)), ValueError,
             "fp_cols must be a 1-D int64 tensor, got torch.float32"),
    BadInput("int8_mixed_linear(..., fp_weight)", "an int8 fp_weight (codes taken for floats)",
             lambda: mixed(fp_cols=torch.tensor([1]), fp_weight=torch.ones(N, 1, dtype=torch.int8)), ValueError,
             "fp_weight must be a float tensor"),
    BadInput("int8_mixed_linear(x, weight_int8, ...)", "weight_int8 is not a tensor", lambda: mixed(weight_int8="w"),
             TypeError, "weight_int8 must be a torch.Tensor"),
    BadInput("int8_mixed_linear(..., threshold)", "threshold is not a number", lambda: mixed(threshold=None),
             TypeError, "threshold must be a number"),
    BadInput("int8_mm_dequant(..., out_dtype)", "an integer out_dtype",
             lambda: F.int8_mm_dequant(torch.ones(3, N, dtype=torch.int32), torch.ones(3), torch.ones(N), None,
                                       torch.int32), TypeError, "out_dtype must be"),
    BadInput("quantize_(model)", "model is not an nn.Module", lambda: llm_int8.quantize_("model"), TypeError,
             "model must be an nn.Module"),
]


@pytest.mark.parametrize(
    "entry",
    GAPS,
    ids=[_id(g) for g in GAPS],
)
def test_gap(entry):
    with pytest.raises(entry.error, match=entry.message):
        entry.call()
