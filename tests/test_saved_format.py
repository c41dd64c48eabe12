"""``saved_format.py``: the one validator of a saved int8 layer, on every load path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llm_int8 import Linear8bitLt

pytestmark = pytest.mark.usefixtures("restore_torch_rng")  # leave the global RNG as found


LOAD_PATHS = ("Linear8bitLt.load_state_dict", "checkpoint.load_checkpoint", "from_pretrained")


@pytest.fixture(scope="module")
def saved_int8_model(tmp_path_factory):
    """A tiny int8 Llama saved with save_pretrained: (folder, its tensors, its int8 layer names)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from llm_int8.integrations.hf import LLMInt8Config

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fuzz-int8")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "fp32", quantization_config=LLMInt8Config())
    model.save_pretrained(folder / "int8")
    tensors = load_file(folder / "int8" / "model.safetensors")
    layers = sorted(name for name, m in model.named_modules() if isinstance(m, Linear8bitLt))
    return folder / "int8", tensors, layers


@given(
    path=st.sampled_from(LOAD_PATHS),
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    n_codes=st.integers(1, 5),
    layer_pick=st.integers(0, 10**6),
    seed=st.integers(0, 2**31 - 1),
)
def test_weights_holding_minus_128_are_refused_on_every_load_path(
    saved_int8_model, tmp_path_factory, path, n, k, n_codes, layer_pick, seed
):
    from safetensors.torch import save_file

    from llm_int8.checkpoint import load_checkpoint
    from llm_int8.saved_format import CheckpointError

    gen = torch.Generator().manual_seed(seed)
    tmp = tmp_path_factory.mktemp("minus128")
    if path == "from_pretrained":
        folder, tensors, layers = saved_int8_model
        name = layers[layer_pick % len(layers)]
        tensors = dict(tensors)
        weight = tensors[f"{name}.weight"] = tensors[f"{name}.weight"].clone()
    else:
        name = "block.proj"
        layer = Linear8bitLt.from_weight(torch.randn(n, k, generator=gen))
        tensors = {f"{name}.{key}": v.clone() for key, v in layer.state_dict().items()}
        weight = tensors[f"{name}.weight"]
    flat = torch.randperm(weight.numel(), generator=gen)[:n_codes]
    weight.view(-1)[flat] = -128
    first = int(flat.min())
    row, col = divmod(first, weight.shape[1])
    message = rf"{name}: weight holds the code -128 \(first at row {row}, column {col}\)"

    if path == "Linear8bitLt.load_state_dict":
        module = torch.nn.ModuleDict({"block": torch.nn.ModuleDict({"proj": Linear8bitLt(k, n)})})
        with pytest.raises(RuntimeError, match=message):
            module.load_state_dict(tensors)
    elif path == "checkpoint.load_checkpoint":
        file = tmp / "layer.safetensors"
        save_file(tensors, file)
        module = torch.nn.ModuleDict({"block": torch.nn.ModuleDict({"proj": Linear8bitLt(k, n)})})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(module, file)
    else:
        import transformers

        (tmp / "config.json").write_text((folder / "config.json").read_text())
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=message):
            transformers.AutoModelForCausalLM.from_pretrained(tmp)
