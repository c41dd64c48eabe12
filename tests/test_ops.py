"""``_ops.py``: the op contract. Its fake implementations let torch.compile(fullgraph=True) trace the ops and
modules live on the meta device."""

from __future__ import annotations

import pytest
import torch

from helpers import make_input
from llm_int8 import functional as F


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated columns"])
@pytest.mark.parametrize("n_outliers", [0, 3])
def test_compile_fullgraph_matches_eager(n_outliers, calibrated):
    """Calibrated 16-bit columns are checked when set, never per call: no host sync, no graph break."""
    from llm_int8 import Linear8bitLt

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Linear8bitLt.from_linear(linear)
    if calibrated:
        layer.set_fp_columns(torch.tensor([5, 9, 60]), linear.weight.detach().half())
    compiled = torch.compile(layer, fullgraph=True)
    for seed in (0, 1):  # a second input must not recompile into something different
        x = make_input(5, 64, n_outlier_cols=n_outliers, seed=seed)
        assert torch.equal(compiled(x), layer(x))


def test_compile_fullgraph_of_the_functional_op_with_calibrated_columns():
    weight = torch.randn(32, 64)
    weight_int8, weight_absmax = F.quantize_weight(weight)
    fp_cols, fp_weight = torch.tensor([1, 7]), weight[:, [1, 7]].half()

    def f(x):
        return F.int8_mixed_linear(x, weight_int8, weight_absmax, None, 6.0, fp_cols, fp_weight)

    x = make_input(4, 64, n_outlier_cols=2)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_meta_device_shapes():
    from llm_int8 import Linear8bitLt

    layer = Linear8bitLt(64, 32, device="meta")
    out = layer(torch.empty(3, 7, 64, device="meta", dtype=torch.bfloat16))
    assert out.shape == (3, 7, 32) and out.dtype == torch.bfloat16 and out.is_meta
