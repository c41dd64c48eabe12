"""GPTQ rounding of the int8 codes (llm_int8.eval.rounding): only which codes are stored changes.

Row scales (SCB) are the round-to-nearest ones, bit for bit; with uncorrelated inputs (diagonal H)
there is nothing to compensate and the codes equal round-to-nearest exactly; with correlated inputs
the layer's output error on those inputs is smaller than round-to-nearest's, and the error formula
tr(dW H dW^T) / tr(W H W^T) is the directly measured one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_int8 import Int8Config, Linear8bitLt, quantize_
from llm_int8 import functional as F
from llm_int8.eval import rounding as R


def _correlated(k: int, t: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    return torch.randn(t, k, generator=gen) @ mix


@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (64, 200)])
def test_uncorrelated_inputs_give_round_to_nearest_codes(n, k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=gen)
    hessian = torch.diag(torch.rand(k, generator=gen) + 0.1)
    codes = R.gptq_codes(w, hessian)
    assert torch.equal(codes, F.quantize_weight(w)[0])
    assert torch.equal(R.rtn_codes(w)[0], F.quantize_weight(w)[0]) and torch.equal(R.rtn_codes(w)[1], F.quantize_weight(w)[1])


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("n,k,block", [(48, 96, 128), (30, 300, 64)])
def test_correlated_inputs_lower_the_output_error(n, k, block, act_order):
    x = _correlated(k, 4 * k, seed=n)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * k**-0.5
    w[:, 3] *= 10  # a large column: its row absmax sets the step
    hessian = x.T @ x
    rtn, absmax = R.rtn_codes(w)
    codes = R.gptq_codes(w, hessian, absmax, block=block, act_order=act_order)
    assert codes.dtype == torch.int8 and codes.shape == (n, k)
    assert int(codes.abs().max()) <= 127
    # codes move by a few steps at most (8-bit steps are fine: the compensation is small)
    assert int((codes.int() - rtn.int()).abs().max()) <= 4
    err_rtn, err_gptq = R.output_error(w, rtn, absmax, hessian), R.output_error(w, codes, absmax, hessian)
    assert err_gptq < 0.75 * err_rtn
    # the formula is the output error measured directly, relative to the output's energy
    w_hat = codes.double() * (absmax.double() / 127)[:, None]
    direct = float(((x.double() @ (w.double() - w_hat).T) ** 2).sum() / ((x.double() @ w.double().T) ** 2).sum())
    assert abs(direct - err_gptq) <= 1e-6 * direct


def test_dead_and_zero_rows_and_columns():
    """A column no input reaches is rounded to nearest; an all-zero row stays zero (its absmax is 0)."""
    x = _correlated(20, 80, seed=3)
    x[:, 7] = 0.0
    w = torch.randn(5, 20)
    w[2] = 0.0
    codes = R.gptq_codes(w, x.T @ x)
    rtn = F.quantize_weight(w)[0]
    assert (codes[2] == 0).all()
    # column 7 is decoupled from the others in H (and so in H^-1): nothing moves onto it or off it
    assert torch.equal(codes[:, 7], rtn[:, 7])
    with pytest.raises(ValueError, match="hessian must be"):
        R.gptq_codes(w, torch.eye(19))


class TwoLayer(nn.Module):
    """A causal-LM-shaped stub: embedding, two linear layers fed one input (one site), one after."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.mix = nn.Linear(32, 32, bias=False)
        self.a = nn.Linear(32, 24)
        self.b = nn.Linear(32, 24)
        self.c = nn.Linear(24, 16)

    def forward(self, input_ids):
        h = self.mix(self.embed(input_ids)) * 3
        y = self.c(torch.tanh(self.a(h)) * self.b(h))
        return type("Out", (), {"logits": y})()


def test_model_rounding_applies_to_int8_layers_and_lowers_their_error():
    model = TwoLayer().eval()
    windows = torch.randint(0, 50, (6, 40), generator=torch.Generator().manual_seed(0))
    result = R.gptq_rounding(model, windows)
    assert set(result.codes) == {"mix", "a", "b", "c"} and result.n_positions == 240
    for name in result.codes:
        assert result.error_gptq[name] <= result.error_rtn[name]
        assert torch.equal(result.absmax[name], F.quantize_weight(getattr(model, name).weight)[1])
    assert sum(result.error_gptq.values()) < 0.9 * sum(result.error_rtn.values())
    int8 = TwoLayer().eval()
    quantize_(int8, Int8Config(threshold=6.0))
    scb_before = {n: getattr(int8, n).SCB.clone() for n in result.codes}
    assert sorted(R.apply_rounding(int8, result)) == ["a", "b", "c", "mix"]
    for name in result.codes:
        layer = getattr(int8, name)
        assert isinstance(layer, Linear8bitLt) and torch.equal(layer.weight, result.codes[name])
        assert torch.equal(layer.SCB, scb_before[name])  # only the codes change
    with pytest.raises(ValueError, match="not int8 layers of this model"):
        other = nn.Sequential(nn.Linear(32, 24))
        quantize_(other, Int8Config())
        R.apply_rounding(other, result)


def test_bitsandbytes_runs_the_gptq_codes_it_is_given():
    pytest.importorskip("bitsandbytes", reason="install the 'dev' extra for bitsandbytes==0.50.2")
    from llm_int8.eval.methods import build_method

    model = TwoLayer().eval()
    windows = torch.randint(0, 50, (4, 40), generator=torch.Generator().manual_seed(1))
    result = R.gptq_rounding(model, windows)
    theirs = build_method(model, "bitsandbytes_gptq", {"rounding": result})
    for name in result.codes:
        layer = getattr(theirs, name)
        assert torch.equal(layer.weight.data, result.codes[name]) and torch.equal(layer.weight.SCB, result.absmax[name])
    with pytest.raises(ValueError, match="needs GPTQ codes"):
        build_method(model, "llm_int8_gptq")


class TinyLM(nn.Module):
    """A causal-LM-shaped stub with vocabulary-sized logits, for perplexity."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.b(torch.relu(self.a(h)))
        return type("Out", (), {"logits": self.head(h) * 4})()


def test_calibration_that_would_hurt_is_not_kept():
    """check_calibration keeps a calibrated method only where validation windows improve: codes that make
    held-out perplexity worse (here off by one step at random, as codes fitted to the wrong text can be)
    are refused, and so are codes that change nothing."""
    from llm_int8.eval.experiments import check_calibration

    model = TinyLM().eval()
    gen = torch.Generator().manual_seed(0)
    validation = torch.randint(0, 50, (4, 32), generator=gen)
    names = ["a", "b", "head"]
    rtn = {n: R.rtn_codes(getattr(model, n).weight) for n in names}
    same = R.RoundingResult({n: c for n, (c, _) in rtn.items()}, {n: a for n, (_, a) in rtn.items()}, {}, {}, 0, 0.0)
    noisy = R.RoundingResult(
        {n: (c.int() + torch.randint(-1, 2, c.shape, generator=gen)).clamp(-127, 127).to(torch.int8) for n, (c, _) in rtn.items()},
        same.absmax, {}, {}, 0, 0.0,
    )
    hurt = check_calibration(model, "llm_int8_gptq", "llm_int8", validation, {"rounding": noisy})
    assert hurt.change.change > 0 and not hurt.kept
    unchanged = check_calibration(model, "llm_int8_gptq", "llm_int8", validation, {"rounding": same})
    assert unchanged.change.change == 0.0 and not unchanged.kept


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequential_rounding_gives_the_codes_of_whole_model_passes(family):
    """Block by block (one pass over the windows, one block's H at a time) the layers see the same float
    inputs as in whole-model passes, so the codes, scales and errors are the same; the grouped path with a
    tiny H budget (one pass per layer) is the reference."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256,
        )
        model = transformers.LlamaForCausalLM(config).eval()
    else:
        config = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=64)
        model = transformers.GPT2LMHeadModel(config).eval()
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    blocks = R.decoder_blocks(model, {name for name, _, _ in R.linear_layers(model)})
    assert blocks is not None and len(blocks) == 3
    sequential = R.gptq_rounding(model, windows, sequential=True)
    grouped = R.gptq_rounding(model, windows, sequential=False, budget=1)
    assert sequential.codes.keys() == grouped.codes.keys() and len(sequential.codes) > 0
    assert sequential.n_positions == grouped.n_positions == 72
    for name in grouped.codes:
        assert torch.equal(sequential.codes[name], grouped.codes[name]), name
        assert torch.equal(sequential.absmax[name], grouped.absmax[name])
        assert sequential.error_gptq[name] == pytest.approx(grouped.error_gptq[name], rel=1e-9)
    assert sum(sequential.error_gptq.values()) < sum(sequential.error_rtn.values())


def test_sequential_rounding_needs_decoder_blocks():
    with pytest.raises(ValueError, match="list of decoder blocks"):
        R.gptq_rounding(TwoLayer().eval(), torch.randint(0, 50, (2, 8)), sequential=True)


def test_weight_only_layer_holds_int8_codes_and_runs_their_dequantized_weight():
    from llm_int8.eval.methods import WeightOnlyInt8Linear

    gen = torch.Generator().manual_seed(5)
    w, b, x = torch.randn(12, 20, generator=gen), torch.randn(12, generator=gen), torch.randn(3, 20, generator=gen)
    codes, absmax = F.quantize_weight(w)
    layer = WeightOnlyInt8Linear(w, b)
    assert layer.weight_int8.dtype == torch.int8 and torch.equal(layer.weight_int8, codes)
    assert torch.equal(layer(x), nn.functional.linear(x, F.dequantize_weight(codes, absmax), b))
    from_codes = WeightOnlyInt8Linear(None, b, (codes, absmax))
    assert from_codes.weight_int8 is codes  # shares the codes it is given
    assert torch.equal(from_codes(x), layer(x))
    with pytest.raises(ValueError, match="float weight or int8 codes"):
        WeightOnlyInt8Linear(None, b)
