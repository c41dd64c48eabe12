"""The batch-invariant decomposition (``Linear8bitLt.batch_invariant``, ``functional.int8_mixed_linear_per_row``):
a row's output is the same bit for bit whatever other rows share its batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llm_int8
from llm_int8 import Linear8bitLt
from llm_int8 import functional as F
from llm_int8 import reference

K, N, M = 200, 96, 8
U32 = 2.0**-24


def layer_and_rows(dtype=torch.float32, bias=True, threshold=6.0, seed=0):
    """A layer and M rows whose outliers sit in different columns (row i: column 13 i, value 7 + i)."""
    gen = torch.Generator().manual_seed(seed)
    layer = Linear8bitLt.from_weight(torch.randn(N, K, generator=gen), torch.randn(N, generator=gen) if bias else None,
                                     threshold=threshold)
    x = torch.randn(M, K, generator=gen)
    for i in range(M):
        x[i, 13 * i] = 7.0 + i
    return layer, x.to(dtype)


def alone(layer, x):
    return torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])


def test_the_paper_decomposition_depends_on_the_batch():
    """The premise: with whole-column decomposition, a row alone and in the batch differ (else the test below proves nothing)."""
    layer, x = layer_and_rows()
    with torch.no_grad():
        assert not torch.equal(layer(x), alone(layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("bias", [True, False])
def test_each_row_is_the_same_alone_and_in_any_batch(dtype, threshold, bias):
    layer, x = layer_and_rows(dtype, bias, threshold)
    layer.batch_invariant = True
    with torch.no_grad():
        batched = layer(x)
        assert batched.dtype == dtype and batched.shape == (M, N)
        assert torch.equal(batched, alone(layer, x))
        assert torch.equal(batched[2:5], layer(x[2:5]))  # any sub-batch
        assert torch.equal(batched[[5, 0]], layer(x[[5, 0]]))  # other order, other neighbours
        assert torch.equal(batched.view(2, 4, N), layer(x.view(2, 4, K)))  # 3-D input


def test_fp_columns_stay_float_for_every_row():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(N, K, generator=gen)
    layer, x = layer_and_rows()
    layer.set_fp_columns(torch.tensor([5, 64, 199]), weight)
    layer.batch_invariant = True
    with torch.no_grad():
        assert torch.equal(layer(x), alone(layer, x))


@pytest.mark.parametrize("with_fp_cols", [False, True])
def test_a_row_computes_what_the_paper_computes_for_that_row_alone(with_fp_cols):
    """For one row, the paper's decomposed columns are that row's own outliers, so per-row mode on a batch
    must give each row the reference's result for the row alone: the int32 products are exact in both; the
    float part may differ by float32 rounding of its few terms and of the scales (bounded by
    (C + 4) * 2^-24 * sum |x| |w| per element)."""
    layer, x = layer_and_rows()
    gen = torch.Generator().manual_seed(2)
    if with_fp_cols:
        layer.set_fp_columns(torch.tensor([3, 100]), torch.randn(N, K, generator=gen))
    layer.batch_invariant = True
    with torch.no_grad():
        got = layer(x)
        for i in range(M):
            want = reference.int8_mixed_linear(x[i : i + 1], layer.weight, layer.SCB, layer.bias, 6.0, layer.fp_cols,
                                               layer.fp_weight)
            scale = x[i : i + 1].abs() @ layer.dequantize().abs().T + layer.bias.abs()
            cols = int((x[i].abs() >= 6).sum()) + (2 if with_fp_cols else 0)
            assert ((got[i : i + 1] - want).abs() <= (cols + 4) * U32 * scale).all()


def test_the_functional_form_checks_its_arguments_and_equals_the_layer():
    layer, x = layer_and_rows()
    layer.batch_invariant = True
    with torch.no_grad():
        assert torch.equal(F.int8_mixed_linear_per_row(x, layer.weight, layer.SCB, layer.bias, 6.0), layer(x))
    with pytest.raises(ValueError, match="x has 7 features"):
        F.int8_mixed_linear_per_row(torch.randn(2, 7), layer.weight, layer.SCB)
    with pytest.raises(ValueError, match="threshold"):
        F.int8_mixed_linear_per_row(x, layer.weight, layer.SCB, threshold=-1.0)
    with pytest.raises(ValueError, match="x has 7 features"):
        layer(torch.randn(2, 7))


def test_gradients_reach_x_and_bias():
    layer, x = layer_and_rows()
    layer.batch_invariant = True
    layer.bias.requires_grad_(True)
    x = x.clone().requires_grad_(True)
    layer(x).sum().backward()
    w = layer.dequantize()
    # d/dx of sum(y) is the column sums of the weight the row is multiplied by: dequantized int8 for
    # its quantized entries and for its outliers alike
    assert torch.allclose(x.grad, w.sum(0).expand(M, K), rtol=0, atol=K * U32 * w.abs().sum(0).max())
    assert torch.equal(layer.bias.grad, torch.full((N,), float(M)))


def test_set_batch_invariant_switches_every_int8_layer_and_keeps_the_state():
    model = nn.Sequential(Linear8bitLt(16, 8), nn.ReLU(), Linear8bitLt(8, 4), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert llm_int8.set_batch_invariant(model) == 2
    assert model[0].batch_invariant and model[2].batch_invariant
    assert Linear8bitLt.batch_invariant is False  # the class default is untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == state.keys()
    assert llm_int8.set_batch_invariant(model, False) == 2 and not model[0].batch_invariant
    with pytest.raises(TypeError, match="True or False"):
        llm_int8.set_batch_invariant(model, "yes")
