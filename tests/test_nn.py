"""Linear8bitLt: construction, forward, state dict, memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import LAYER_DEFECTS, layer_state, make_input
from llm_int8 import Linear8bitLt
from llm_int8 import functional as F


def linear(k=64, n=32, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_from_linear_quantizes_from_the_weights_own_dtype(dtype):
    lin = linear(dtype=dtype)
    layer = Linear8bitLt.from_linear(lin)
    codes, absmax = F.quantize_weight(lin.weight)
    assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert torch.equal(layer.weight, codes) and torch.equal(layer.SCB, absmax)
    assert layer.SCB.dtype == torch.float32 and layer.bias.dtype == dtype
    assert torch.equal(layer.SCB, lin.weight.float().abs().amax(1))


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 64)])
def test_forward_dtypes_and_shapes(x_dtype, shape):
    layer = Linear8bitLt.from_linear(linear())
    x = make_input(int(torch.tensor(shape[:-1]).prod()), 64, x_dtype, n_outlier_cols=2, shape=shape)
    out = layer(x)
    assert out.dtype == x_dtype and out.shape == (*shape[:-1], 32)
    want = F.int8_mixed_linear(x, layer.weight, layer.SCB, layer.bias, 6.0)
    assert torch.equal(out, want)


def test_state_dict_keys_dtypes_and_round_trip():
    layer = Linear8bitLt.from_linear(linear())
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "SCB", "weight_format"]
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32
    assert sd["weight_format"].dtype == torch.uint8 and int(sd["weight_format"]) == 0
    fresh = Linear8bitLt(64, 32)
    fresh.load_state_dict(sd)
    x = make_input(4, 64, n_outlier_cols=1)
    assert torch.equal(fresh(x), layer(x))


def test_loading_a_float_linear_state_dict_quantizes_it():
    lin = linear()
    layer = Linear8bitLt(64, 32)
    layer.load_state_dict(lin.state_dict())
    ref = Linear8bitLt.from_linear(lin)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.SCB, ref.SCB)
    assert torch.equal(layer.bias, lin.bias)


def test_load_state_dict_with_assign_onto_meta():
    layer = Linear8bitLt.from_linear(linear())
    meta = Linear8bitLt(64, 32, device="meta")
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert not meta.weight.is_meta and torch.equal(meta.weight, layer.weight)
    x = torch.randn(3, 64)
    assert torch.equal(meta(x), layer(x))


@pytest.mark.parametrize("defect", sorted(LAYER_DEFECTS))
def test_invalid_int8_states_are_refused_naming_the_layer(defect):
    """The state-dict path refuses what llm_int8.checkpoint refuses, with the same message."""
    edit, message = LAYER_DEFECTS[defect]
    model = nn.Sequential(Linear8bitLt(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {f"0.{k}": v for k, v in _edited(layer_state(), edit).items()}
    with pytest.raises(RuntimeError, match=rf"(?s)\n\t0: .*{message}"):
        model.load_state_dict(state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused state must not touch the layer"


def _edited(state, edit):
    edit(state)
    return state


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda sd: sd.update(weight=sd["weight"][:, :10]), r"weight has shape \(32, 10\)"),
        (lambda sd: sd.update(weight=sd["weight"].int()), "weight must be int8"),
        (lambda sd: sd.update(weight=sd["weight"].float()), "float weight together with SCB"),
    ],
)
def test_state_dicts_that_do_not_fit_the_layer_raise_with_the_reason(mutate, message):
    sd = dict(Linear8bitLt.from_linear(linear()).state_dict())
    mutate(sd)
    with pytest.raises(RuntimeError, match=message):
        Linear8bitLt(64, 32).load_state_dict(sd)


def test_missing_and_unexpected_keys_are_reported():
    sd = dict(Linear8bitLt.from_linear(linear()).state_dict())
    sd["extra"] = torch.zeros(1)
    del sd["bias"]
    result = Linear8bitLt(64, 32).load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]
    with pytest.raises(RuntimeError, match="extra"):
        Linear8bitLt(64, 32).load_state_dict(sd)


def test_has_fp16_weights_is_refused_clearly():
    with pytest.raises(ValueError, match="has_fp16_weights=True is not supported.*LoRA"):
        Linear8bitLt(8, 8, has_fp16_weights=True)


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        Linear8bitLt(8, 8, threshold=-1)


def test_memory_is_a_quarter_of_fp32():
    lin = linear(4096, 1024)
    layer = Linear8bitLt.from_linear(lin)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))  # noqa: E731
    weight_and_scales = layer.weight.numel() + layer.SCB.numel() * 4
    assert weight_and_scales <= 0.26 * lin.weight.numel() * 4
    assert nbytes(layer) <= 0.26 * nbytes(lin)


def test_train_and_eval_modes_compute_the_same():
    layer = Linear8bitLt.from_linear(linear())
    x = make_input(4, 64, n_outlier_cols=2)
    train_out = layer.train()(x)
    assert torch.equal(layer.eval()(x), train_out)


def test_half_keeps_the_scales_in_float32():
    layer = Linear8bitLt.from_linear(linear()).half()
    assert layer.SCB.dtype == torch.float32 and layer.weight.dtype == torch.int8
    assert layer.bias.dtype == torch.float16


def test_fresh_module_is_a_quantized_random_linear():
    torch.manual_seed(0)
    layer = Linear8bitLt(64, 32)
    assert layer.weight.abs().max() == 127 and (layer.SCB > 0).all()
    assert layer(torch.randn(2, 64)).shape == (2, 32)


def test_fp_columns_take_the_float_weight():
    lin = linear()
    layer = Linear8bitLt.from_linear(lin)
    cols = torch.tensor([3, 17])
    layer.set_fp_columns(cols, lin.weight)
    x = torch.zeros(2, 64)
    x[:, 3] = torch.tensor([1.5, -2.0])
    want = x[:, 3:4].double() @ lin.weight[:, 3:4].double().T + lin.bias.double()
    assert torch.allclose(layer(x).double(), want, rtol=1e-6, atol=1e-6)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "SCB", "weight_format", "fp_cols", "fp_weight"}
    fresh = Linear8bitLt(64, 32)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), layer(x))


def test_eager_fast_path_equals_the_op_and_steps_aside_when_needed():
    from torch.utils._python_dispatch import TorchDispatchMode

    from llm_int8 import functional as F

    layer = Linear8bitLt.from_linear(nn.Linear(40, 24))
    x = torch.randn(3, 5, 40)
    x[..., 7] *= 30  # an outlier column
    with torch.no_grad():
        direct = layer(x)
    with torch.no_grad():
        assert F.plain_eager_call(x, layer.bias)
    assert not F.plain_eager_call(x, layer.bias)  # the bias wants a gradient
    via_op = F.int8_mixed_linear(x, layer.weight, layer.SCB, layer.bias, layer.threshold)
    assert torch.equal(direct, via_op)

    # gradients needed: the op (and its autograd formula) runs
    xg = x.clone().requires_grad_()
    assert not F.plain_eager_call(xg, layer.bias)
    layer(xg).sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen():  # a dispatch mode must see the op, not be bypassed
        assert torch.equal(layer(x), direct)
    assert any("llm_int8.int8_mixed_linear" in op for op in Seen.ops)


def _via_op(layer, x):
    return F.int8_mixed_linear(x, layer.weight, layer.SCB, layer.bias, layer.threshold, layer.fp_cols, layer.fp_weight)


def test_fast_path_follows_every_change_of_the_layer():
    """The fast path reads the layer's tensors on every call; each way of changing them must be seen."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    layer = Linear8bitLt.from_linear(lin)
    x = torch.randn(2, 3, 48)
    x[..., 5] *= 20  # an outlier column at the default threshold
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(first, _via_op(layer, x))

        layer.bias.add_(1.0)  # in place
        assert torch.equal(layer(x), _via_op(layer, x)) and not torch.equal(layer(x), first)

        layer.threshold = 0.0  # the outlier column is no longer decomposed
        assert torch.equal(layer(x), _via_op(layer, x))

        other = Linear8bitLt.from_linear(nn.Linear(48, 20))
        layer.weight.data = other.weight.data.clone()  # same Parameter object, other memory
        assert torch.equal(layer(x), _via_op(layer, x))
        layer.SCB = other.SCB.clone()
        assert torch.equal(layer(x), _via_op(layer, x))

        layer.set_fp_columns(torch.tensor([2, 9]), lin.weight)
        assert torch.equal(layer(x), _via_op(layer, x))

        layer.half()  # fp16 bias, read in its own dtype
        xh = x.half()
        assert layer(xh).dtype == torch.float16 and torch.equal(layer(xh), _via_op(layer, xh))
        layer.bias.add_(1.0)
        assert torch.equal(layer(xh), _via_op(layer, xh))


def test_fast_path_survives_copies_and_pickling():
    import copy
    import io

    layer = Linear8bitLt.from_linear(nn.Linear(32, 16))
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = layer(x)
        twin = copy.deepcopy(layer)  # after a forward: the copy reads its own tensors
        assert torch.equal(twin(x), want)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), want)
        del layer, twin
        assert torch.equal(loaded(x), want)


@pytest.mark.parametrize("shape", [(7, 40), (2, 3, 40), (2, 2, 2, 40), (0, 40), (2, 0, 40)])
def test_fast_path_shapes_and_many_outlier_columns(shape):
    """N-D and empty inputs, and more decomposed columns than the fused epilogue takes (the addmm)."""
    torch.manual_seed(1)
    layer = Linear8bitLt.from_linear(nn.Linear(40, 12))
    x = torch.randn(shape)
    with torch.no_grad():
        for threshold in (6.0, 0.5):  # 0.5: most of the 40 columns (> 64 only with more) ...
            layer.threshold = threshold
            out = layer(x)
            assert out.shape == (*shape[:-1], 12) and torch.equal(out, _via_op(layer, x))
    wide = Linear8bitLt.from_linear(nn.Linear(200, 12), threshold=0.5)  # ... here > 64 columns
    xw = torch.randn(*shape[:-1], 200)
    with torch.no_grad():
        assert torch.equal(wide(xw), _via_op(wide, xw))
        if xw.numel():
            assert torch.allclose(wide(xw), xw @ wide.dequantize().T + wide.bias, atol=1e-3, rtol=1e-3)


def test_fast_path_skips_meta_weights_and_other_devices():
    layer = Linear8bitLt(16, 8, device="meta")
    with torch.no_grad():
        out = layer(torch.randn(3, 16, device="meta"))
    assert out.is_meta and out.shape == (3, 8)
    cpu_layer = Linear8bitLt(16, 8)
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError)):
        cpu_layer(torch.randn(3, 16, device="meta"))  # a meta input never reaches the CPU kernel


MOVES = {
    ".half()": lambda m: m.half(),
    ".bfloat16()": lambda m: m.bfloat16(),
    ".float()": lambda m: m.float(),
    ".double()": lambda m: m.double(),
    ".to(torch.float16)": lambda m: m.to(torch.float16),
    ".to(torch.bfloat16)": lambda m: m.to(torch.bfloat16),
    ".to('cpu', torch.float16)": lambda m: m.to("cpu", torch.float16),
    ".to(dtype=torch.float64)": lambda m: m.to(dtype=torch.float64),
}


@pytest.mark.parametrize("move", sorted(MOVES))
def test_dtype_moves_keep_the_quantized_state_bit_identical(move):
    """.half() / .to(dtype) convert the bias, as for nn.Linear; never the int8 codes, the float32 scales or
    the stored fp columns (converting the scales rounded every row's: outputs changed by up to 2e-3)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    layer = Linear8bitLt.from_linear(lin)
    layer.set_fp_columns(torch.tensor([3, 100]), lin.weight.detach().half())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    model = nn.Sequential(layer)
    MOVES[move](model)
    after = layer.state_dict()
    for key in ("weight", "SCB", "weight_format", "fp_cols", "fp_weight"):
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    dtype = layer.bias.dtype
    assert dtype != torch.float32 or move in (".float()",)
    assert torch.equal(layer.bias, before["bias"].to(dtype))
    x = make_input(3, 256, n_outlier_cols=1).to(dtype if dtype != torch.float64 else torch.float32)
    want = F.int8_mixed_linear(x, before["weight"], before["SCB"], before["bias"].to(dtype), 6.0,
                               before["fp_cols"], before["fp_weight"])
    assert torch.equal(model(x), want)
