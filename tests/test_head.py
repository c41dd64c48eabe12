"""The int8 output head (``quantize_head=True``) and ``Embedding8bit``, the int8 input embedding that shares a
tied head's codes: on ``quantize_``, ``from_pretrained`` and the streaming GGUF loader, with exact comparisons
against the LLM.int8() layer of the same weight, the footprint counted once, and saving (works for an untied
int8 head, refused loudly for an int8 embedding)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import exact_mixed_linear_f64, make_input, rounding_bound
from llm_int8 import Embedding8bit, Int8Config, Linear8bitLt, memory_footprint, quantize_
from llm_int8 import functional as F

transformers = pytest.importorskip("transformers", reason="install the 'hf' extra for transformers")

from llm_int8.integrations.hf import LLMInt8Config, quantize_model  # noqa: E402

VOCAB, HIDDEN = 256, 64
IDS = torch.tensor([[0, 5, 17, 255, 3, 3, 128, 77, 200, 9]])


def tiny_llama(tie: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _float_head_weight(model) -> torch.Tensor:
    return model.lm_head.weight.detach().clone()


# --------------------------------------------------------------------------------------------
# quantize_


@pytest.mark.parametrize("tie", [True, False])
def test_quantize_head_converts_the_head_to_the_same_llm_int8_layer(tie):
    model = tiny_llama(tie)
    weight = _float_head_weight(model)
    report = quantize_(model, Int8Config(quantize_head=True))
    head = model.lm_head
    assert isinstance(head, Linear8bitLt) and "lm_head" in report.converted and "lm_head" not in report.skipped
    codes, absmax = F.quantize_weight(weight)
    assert torch.equal(head.weight, codes) and torch.equal(head.SCB, absmax)  # the codes of that weight, exactly
    x = make_input(6, HIDDEN, n_outlier_cols=2)
    out = head(x)
    assert torch.equal(out, F.int8_mixed_linear(x, codes, absmax, None, 6.0))
    out64, magnitude, n_cols = exact_mixed_linear_f64(x, codes, absmax, None, 6.0)
    assert n_cols == 2
    assert bool(((out.double() - out64).abs() <= rounding_bound(out64, magnitude, n_cols, torch.float32)).all())
    if tie:
        embedding = model.model.embed_tokens
        assert isinstance(embedding, Embedding8bit) and report.int8_embeddings == ["model.embed_tokens"]
        assert embedding.weight is head.weight and embedding.SCB is head.SCB  # one table, one SCB
    else:
        assert type(model.model.embed_tokens) is nn.Embedding and report.int8_embeddings == []


def test_default_keeps_the_head_and_tied_embedding_float():
    model = tiny_llama(tie=True)
    report = quantize_(model, Int8Config())
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert "lm_head" in report.skipped and report.int8_embeddings == []
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tied_embedding_lookup_is_exactly_the_dequantized_rows(dtype):
    model = tiny_llama(tie=True).to(dtype)
    quantize_(model, Int8Config(quantize_head=True))
    embedding = model.model.embed_tokens
    assert embedding.dtype == dtype
    rows = embedding(IDS)
    assert rows.dtype == dtype and rows.shape == (*IDS.shape, HIDDEN)
    table = F.dequantize_weight(model.lm_head.weight, model.lm_head.SCB, dtype)
    assert torch.equal(rows, table[IDS])
    assert torch.equal(embedding.dequantize(), table)
    assert torch.equal(embedding(IDS.int()), rows)
    with pytest.raises(TypeError, match="integer token ids"):
        embedding(IDS.float())


def test_footprint_counts_the_shared_int8_table_once():
    model = tiny_llama(tie=True)
    before = memory_footprint(model)
    quantize_(model, Int8Config(quantize_head=True))
    linears = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    others = [t for name, t in model.named_parameters() if not name.endswith(".weight") or "norm" in name]
    others += [b for name, b in model.named_buffers() if "rotary" in name]
    expected = sum(m.weight.numel() + 4 * m.SCB.numel() + 1 for m in linears)  # int8 + float32 SCB + weight_format
    expected += sum(t.numel() * t.element_size() for t in others)
    after = memory_footprint(model)
    assert after == expected  # the embedding adds no byte: it holds the head's tensors
    assert after == model.get_memory_footprint()
    float_table = VOCAB * HIDDEN * 4
    assert before - after > float_table  # the float table (counted once before) is gone


def test_bad_head_options_are_clear_errors():
    with pytest.raises(TypeError, match="quantize_head must be True or False"):
        Int8Config(quantize_head="yes")
    with pytest.raises(ValueError, match="skip_modules .* keeps it float"):
        quantize_(tiny_llama(tie=True), Int8Config(quantize_head=True, skip_modules=["lm_head"]))
    body = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no output head"):
        quantize_(body, Int8Config(quantize_head=True))


def test_a_filter_that_keeps_the_head_float_keeps_its_embedding_float():
    model = tiny_llama(tie=True)
    report = quantize_(model, Int8Config(quantize_head=True), filter_fn=lambda m, name: name != "lm_head")
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert report.int8_embeddings == [] and model.lm_head.weight is model.model.embed_tokens.weight


def test_checkpoint_round_trip_keeps_the_tie(tmp_path):
    from llm_int8.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_llama(tie=True)
    quantize_(model, Int8Config(quantize_head=True))
    path = tmp_path / "int8-head.safetensors"
    save_checkpoint(model, path)
    fresh = tiny_llama(tie=True)
    with torch.no_grad():
        fresh.model.embed_tokens.weight.normal_()  # other float weights: the load must replace them
    quantize_(fresh, Int8Config(quantize_head=True))
    load_checkpoint(fresh, path)
    assert fresh.model.embed_tokens.weight is fresh.lm_head.weight and fresh.model.embed_tokens.SCB is fresh.lm_head.SCB
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight) and torch.equal(fresh.lm_head.SCB, model.lm_head.SCB)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


# --------------------------------------------------------------------------------------------
# Embedding8bit on its own


def test_embedding8bit_loads_a_float_table_by_quantizing_it_and_refuses_bad_states():
    float_embedding = nn.Embedding(VOCAB, HIDDEN)
    embedding = Embedding8bit(VOCAB, HIDDEN)
    embedding.load_state_dict(float_embedding.state_dict())
    codes, absmax = F.quantize_weight(float_embedding.weight.detach())
    assert torch.equal(embedding.weight, codes) and torch.equal(embedding.SCB, absmax)
    with pytest.raises(RuntimeError, match="code -128"):
        embedding.load_state_dict({"weight": torch.full((VOCAB, HIDDEN), -128, dtype=torch.int8), "SCB": absmax})
    with pytest.raises(RuntimeError, match="expected"):
        embedding.load_state_dict({"weight": torch.zeros(VOCAB, HIDDEN + 1)})
    with pytest.raises(RuntimeError, match="SCB"):
        embedding.load_state_dict({"weight": codes})
    assert torch.equal(embedding.weight, codes), "a refused state must not touch the table"


def test_embedding8bit_half_changes_the_output_dtype_not_the_codes():
    model = tiny_llama(tie=True)
    quantize_(model, Int8Config(quantize_head=True))
    codes, scales = model.lm_head.weight.clone(), model.lm_head.SCB.clone()
    model.half()
    embedding = model.model.embed_tokens
    assert embedding.dtype == torch.float16 and embedding(IDS).dtype == torch.float16
    assert torch.equal(embedding.weight, codes) and embedding.SCB.dtype == torch.float32
    assert torch.equal(embedding.SCB, scales) and embedding.SCB is model.lm_head.SCB


# --------------------------------------------------------------------------------------------
# from_pretrained


@pytest.fixture(scope="module")
def saved_float(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    paths = {}
    for tie in (True, False):
        paths[tie] = root / f"llama-tie{int(tie)}"
        tiny_llama(tie).save_pretrained(paths[tie])
    return paths


def _load(path, **kwargs):
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_from_pretrained_quantize_head_equals_quantize_(saved_float, tie):
    model = _load(saved_float[tie], quantization_config=LLMInt8Config(quantize_head=True))
    reference = _load(saved_float[tie])
    quantize_(reference, Int8Config(quantize_head=True))
    assert isinstance(model.lm_head, Linear8bitLt)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight) and torch.equal(model.lm_head.SCB, reference.lm_head.SCB)
    if tie:
        embedding = model.model.embed_tokens
        assert isinstance(embedding, Embedding8bit)
        assert embedding.weight is model.lm_head.weight and embedding.SCB is model.lm_head.SCB
    else:
        assert type(model.model.embed_tokens) is nn.Embedding
    assert model.get_memory_footprint() == memory_footprint(reference)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
        model.generate(IDS, max_new_tokens=3, do_sample=False)


def test_save_pretrained_refuses_an_int8_embedding_and_writes_nothing(saved_float, tmp_path):
    model = _load(saved_float[True], quantization_config=LLMInt8Config(quantize_head=True))
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="input embedding .* is int8.*bitsandbytes 8-bit checkpoints, which keep embeddings in float"):
        model.save_pretrained(target)
    assert not target.exists() or not any(target.iterdir())


def test_an_untied_int8_head_saves_as_bitsandbytes_8bit_and_reloads_bit_identical(saved_float, tmp_path):
    model = _load(saved_float[False], quantization_config=LLMInt8Config(quantize_head=True))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_8bit"]
    assert "lm_head" not in (saved["llm_int8_skip_modules"] or [])  # bitsandbytes converts the head too
    assert saved["llm_int8"]["quantize_head"] is True
    reloaded = _load(tmp_path)
    assert isinstance(reloaded.lm_head, Linear8bitLt) and reloaded.config.quantization_config.quantize_head
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_bitsandbytes_loads_an_untied_int8_head_with_the_same_codes(saved_float, tmp_path):
    """A process that never imports llm_int8 reads the checkpoint as bitsandbytes 8-bit: its head is
    bitsandbytes' Linear8bitLt holding our codes, and its logits are LLM.int8()'s, not garbage."""
    import math
    import os
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    model = _load(saved_float[False], quantization_config=LLMInt8Config(quantize_head=True))
    model.save_pretrained(tmp_path / "int8")
    with torch.no_grad():
        torch.save({"ids": IDS, "logits": model(IDS).logits, "head": model.lm_head.weight.detach()}, tmp_path / "ours.pt")
    code = f"""
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "int8")!r}).eval()
ours = torch.load({str(tmp_path / "ours.pt")!r})
with torch.no_grad():
    logits = model(ours["ids"]).logits.float()
print(json.dumps({{"class": type(model.lm_head).__module__ + "." + type(model.lm_head).__name__,
                  "same_codes": torch.equal(model.lm_head.weight.data, ours["head"]),
                  "rel_err": float((logits - ours["logits"]).norm() / ours["logits"].norm()),
                  "llm_int8": "llm_int8" in sys.modules}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["class"] == "bitsandbytes.nn.modules.Linear8bitLt" and not report["llm_int8"]
    assert report["same_codes"]
    # as in test_hf_sharing: two int8 steps per matmul, four matmuls per layer (2 layers) and the head
    assert report["rel_err"] < 2 * math.sqrt(4 * 2 + 1) / 127


def test_default_checkpoints_do_not_carry_the_field(saved_float, tmp_path):
    model = _load(saved_float[True], quantization_config=LLMInt8Config())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "quantize_head" not in saved["llm_int8"] and "lm_head" in saved["llm_int8_skip_modules"]


def test_dequantize_gives_a_tied_float_head_and_embedding(saved_float):
    model = _load(saved_float[True], quantization_config=LLMInt8Config(quantize_head=True))
    table = F.dequantize_weight(model.lm_head.weight, model.lm_head.SCB)
    with torch.no_grad():
        int8_logits = model(IDS).logits
    model.hf_quantizer._dequantize(model)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, table)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all() and model(IDS).logits.shape == int8_logits.shape


# --------------------------------------------------------------------------------------------
# The streaming GGUF loader


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: head tied to the embedding; qwen2: untied
def test_gguf_quantize_head_is_bit_identical_to_quantize_model(tmp_path, arch):
    pytest.importorskip("gguf")
    from tiny_gguf import write_tiny_gguf

    from llm_int8.integrations.gguf import load_gguf

    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch)
    model = load_gguf(path, LLMInt8Config(quantize_head=True))
    reference = _load(path.parent, gguf_file=path.name, dtype=torch.float32)
    quantize_model(reference, LLMInt8Config(quantize_head=True))
    assert isinstance(model.lm_head, Linear8bitLt)
    assert model.hf_quantizer.report.converted == reference.hf_quantizer.report.converted
    tied = arch == "llama"
    assert isinstance(model.model.embed_tokens, Embedding8bit) == tied
    if tied:
        assert model.model.embed_tokens.weight is model.lm_head.weight and model.model.embed_tokens.SCB is model.lm_head.SCB
    state, want = model.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(want)
    assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in state)
    assert memory_footprint(model) == memory_footprint(reference)
    ids = torch.tensor([[84, 111, 32, 98, 101, 44, 32, 111, 114]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
