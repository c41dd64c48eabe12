"""Pinned to bitsandbytes 0.50.2 itself (it runs on the CPU): weight codes, state-dict interop,
and output error no larger than its own on inputs with outlier columns."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from helpers import make_input
from llm_int8 import Linear8bitLt
from llm_int8 import functional as F

bnb = pytest.importorskip("bitsandbytes", reason="install the 'dev' extra for bitsandbytes==0.50.2")

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every non-fp16 input


def bnb_layer(lin: nn.Linear, threshold=6.0):
    """bitsandbytes' Linear8bitLt holding lin's weight, quantized, in eval mode (in training mode
    its CPU path dequantizes the whole weight and computes in float instead)."""
    layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu").eval()


def make_linear(k, n, dtype, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
    return lin.to(dtype)


@pytest.mark.parametrize("k,n", [(64, 32), (257, 130), (4096, 64)])
def test_fp16_weight_codes_and_scales_are_bit_identical(k, n):
    lin = make_linear(k, n, torch.float16)
    theirs = bnb_layer(lin)
    ours = Linear8bitLt.from_linear(lin)
    assert torch.equal(ours.weight, theirs.weight.data)
    assert torch.equal(ours.SCB, theirs.weight.SCB)
    codes, absmax, _ = bnb.functional.int8_vectorwise_quant(lin.weight.data)
    assert torch.equal(F.quantize_weight(lin.weight)[0], codes) and torch.equal(F.quantize_weight(lin.weight)[1], absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_weight_dtypes_are_quantized_from_their_own_values(dtype):
    """bitsandbytes casts to fp16 first; we do not. Codes differ by at most one step, in a small
    share of places, and ours are never further from the original weight."""
    lin = make_linear(512, 256, dtype)
    theirs = bnb_layer(lin)
    ours = Linear8bitLt.from_linear(lin)
    diff = (ours.weight.int() - theirs.weight.data.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05
    w = lin.weight.double()
    dequant = lambda codes, absmax: codes.double() * absmax.double()[:, None] / 127  # noqa: E731
    err_ours = (dequant(ours.weight, ours.SCB) - w).abs().sum()
    err_theirs = (dequant(theirs.weight.data, theirs.weight.SCB) - w).abs().sum()
    assert err_ours <= err_theirs


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_state_dicts_move_both_ways_with_identical_outputs(threshold):
    lin = make_linear(128, 48, torch.float16)
    theirs = bnb_layer(lin, threshold)
    ours = Linear8bitLt.from_linear(lin, threshold)
    x = make_input(6, 128, torch.float16, n_outlier_cols=2)

    # bitsandbytes -> ours: same tensors, same outputs as our own conversion
    loaded = Linear8bitLt(128, 48, threshold=threshold)
    loaded.load_state_dict(theirs.state_dict())
    assert torch.equal(loaded.weight, ours.weight) and torch.equal(loaded.SCB, ours.SCB)
    assert torch.equal(loaded(x), ours(x))

    # ours -> bitsandbytes (it must be quantized before loading, as its docs say)
    target = bnb.nn.Linear8bitLt(128, 48, has_fp16_weights=False, threshold=threshold).to("cpu").eval()
    target.load_state_dict(ours.state_dict())
    assert torch.equal(target.weight.data, theirs.weight.data)
    assert torch.equal(target(x), theirs(x))
    assert set(theirs.state_dict()) == set(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].dtype == value.dtype, key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [20.0, 40.0, 60.0])
def test_error_no_larger_than_bitsandbytes_with_planted_outliers(dtype, scale):
    k, n, m = 1024, 256, 64
    lin = make_linear(k, n, torch.float16 if dtype == torch.float16 else dtype, seed=1)
    x = make_input(m, k, dtype, n_outlier_cols=4, scale=scale, seed=2)
    true = x.double() @ lin.weight.double().T + lin.bias.double()
    with torch.no_grad():
        ours = Linear8bitLt.from_linear(lin)(x)
        theirs = bnb_layer(lin)(x)
    rel = lambda out: ((out.double() - true).norm() / true.norm()).item()  # noqa: E731
    assert torch.isfinite(theirs).all()
    assert rel(ours) <= rel(theirs), (rel(ours), rel(theirs))


def test_bitsandbytes_reference_path_gives_nan_for_a_zero_row_and_we_do_not():
    lin = make_linear(64, 16, torch.float16)
    x = make_input(3, 64, torch.float16)
    x[1] = 0
    ours = Linear8bitLt.from_linear(lin)(x)
    assert torch.equal(ours[1], lin.bias)
    codes, _, _ = bnb.functional.int8_vectorwise_quant(x)  # 0 * (127 / 0) = NaN before the int8 cast
    theirs_codes = F.int8_vectorwise_quant(x)[0]
    assert torch.equal(theirs_codes[1], torch.zeros(64, dtype=torch.int8))


def test_api_shapes_match_bitsandbytes_functional():
    """Code written against bitsandbytes.functional runs unchanged: row stats come back flat [M] for an
    N-D input, as bitsandbytes returns them, and int8_mm_dequant takes its [M, 1] / [N, 1] stats."""
    x = make_input(6, 64, torch.float16).reshape(2, 3, 64)
    codes, stats, _ = F.int8_vectorwise_quant(x)
    their_codes, their_stats, _ = bnb.functional.int8_vectorwise_quant(x.reshape(6, 64))
    assert codes.shape == x.shape and stats.shape == their_stats.shape == (6,)
    assert torch.equal(codes.reshape(6, 64), their_codes) and torch.equal(stats, their_stats)
    weight_int8, weight_absmax = F.quantize_weight(make_input(8, 64, seed=3))
    acc = F.int8_linear_matmul(codes.reshape(6, 64), weight_int8)
    flat = F.int8_mm_dequant(acc, stats, weight_absmax)
    assert torch.equal(F.int8_mm_dequant(acc, stats.view(6, 1), weight_absmax.view(8, 1)), flat)
