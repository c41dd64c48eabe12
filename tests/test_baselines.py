"""``eval/baselines.py``: the W8A8 baselines' quantizers (absmax, zeropoint) round-trip within their step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_cases import FLOAT_DTYPES, HALF_CODE_STEP, QUANT_SLACK, gamma
from llm_int8._ops import INT8_MAX
from llm_int8.eval import baselines

pytestmark = pytest.mark.usefixtures("restore_torch_rng")  # leave the global RNG as found


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=st.sampled_from(((7,), (3, 5), (4, 1), (2, 3, 6), (0, 4))),
    dim=st.sampled_from((None, -1, 0)),
    scale=st.sampled_from((1e-3, 1.0, 500.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_absmax_and_zeropoint_round_trip(dtype, shape, dim, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    x64 = x.double()
    codes, absmax = baselines.absmax_quantize(x, dim=dim)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert bool(((codes >= -INT8_MAX) & (codes <= INT8_MAX)).all())
    if x.numel():
        expected = x64.abs().amax() if dim is None else x64.abs().amax(dim=dim, keepdim=True)
        assert torch.equal(absmax.double(), expected)
    deq = baselines.absmax_dequantize(codes, absmax, torch.float32).double()
    step = absmax.double() * HALF_CODE_STEP * QUANT_SLACK
    # absmax_dequantize rounds codes * fl(absmax / 127) twice in float32.
    assert bool(((deq - x64).abs() <= step + gamma(2) * x64.abs().add(step)).all())

    if x.numel() == 0:
        return
    zcodes, zscale, zero_point = baselines.zeropoint_quantize(x, dim=dim)
    lo = x64.amin() if dim is None else x64.amin(dim=dim, keepdim=True)
    hi = x64.amax() if dim is None else x64.amax(dim=dim, keepdim=True)
    # codes - zero_point = round(fl(scale * x)) (integers below 2**24 are exact in float32), so the
    # round trip is within half a step 1/scale, plus float32 roundings: scale*x, the division, and
    # the step itself, which fl(255 / fl(hi - lo)) knows to 2 roundings. Clamping to [-128, 127]
    # can only move a code back toward the true value.
    zdeq = baselines.zeropoint_dequantize(zcodes, zscale, zero_point).double()
    mag = torch.maximum(lo.abs(), hi.abs())
    bound = 0.5 / zscale.double() * (1 + gamma(2)) + gamma(3) * mag
    assert bool(((zdeq - x64).abs() <= bound).all())
