"""``import llm_int8`` (``llm_int8/__init__.py``): the public names, and registration with transformers and peft
when they are imported, not before. Each case runs in a fresh interpreter, where nothing is imported yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm_int8

SRC = Path(llm_int8.__file__).resolve().parents[1]


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_public_names():
    assert {"Linear8bitLt", "Embedding8bit", "Int8Config", "quantize_", "functional"} <= set(llm_int8.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llm_int8.nope  # noqa: B018


def test_import_leaves_transformers_and_peft_unimported():
    code = (
        "import sys, llm_int8\n"
        "print(sorted(m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules))\n"
    )
    assert _run(code).stdout.strip() == "[]"


transformers = pytest.importorskip("transformers")

# The child imports llm_int8 and transformers in the given order, loads the saved int8 checkpoint (argv[1]) with
# no quantization_config (that needs the registration: the config.json reads as bitsandbytes' otherwise), then
# quantizes the float checkpoint (argv[2]) on load, and saves both models' logits and int8 state to argv[3].
CHILD = """
import sys
{imports}
import torch
from transformers import AutoModelForCausalLM
from llm_int8 import Linear8bitLt

saved, float_path, out = sys.argv[1:4]
ids = torch.arange(2, 14).view(1, -1)
result = {{}}
for key in ("saved", "on_load"):  # (LLMInt8Config is looked up after the saved load: that import registers too)
    kwargs = {{}} if key == "saved" else {{"quantization_config": llm_int8.LLMInt8Config()}}
    model = AutoModelForCausalLM.from_pretrained(saved if key == "saved" else float_path, **kwargs).eval()
    layers = [name for name, m in model.named_modules() if isinstance(m, Linear8bitLt)]
    assert layers, f"{{key}}: no Linear8bitLt after from_pretrained"
    with torch.no_grad():
        result[key] = {{"logits": model(ids).logits, "state": {{k: v for k, v in model.state_dict().items()
                                                              if v.dtype == torch.int8 or k.endswith("SCB")}}}}
torch.save(result, out)
"""
ORDERS = {
    "llm_int8 first": "import llm_int8\nimport transformers",
    "transformers first": "import transformers\nimport llm_int8",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(int8 checkpoint written by save_pretrained, float32 checkpoint, what this process loads from them)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    float_path, saved = tmp_path_factory.mktemp("float"), tmp_path_factory.mktemp("int8")
    AutoModelForCausalLM.from_config(config).save_pretrained(float_path)
    model = AutoModelForCausalLM.from_pretrained(float_path, quantization_config=llm_int8.LLMInt8Config()).eval()
    model.save_pretrained(saved)
    state = {k: v for k, v in model.state_dict().items() if v.dtype == torch.int8 or k.endswith("SCB")}
    return saved, float_path, state


@pytest.mark.parametrize("order", list(ORDERS))
def test_from_pretrained_registers_in_either_import_order(order, checkpoints, tmp_path):
    saved, float_path, state = checkpoints
    out = tmp_path / "result.pt"
    _run(CHILD.format(imports=ORDERS[order]), str(saved), str(float_path), str(out))
    result = torch.load(out)
    for key in ("saved", "on_load"):  # the same int8 codes and scales as this process quantized
        assert result[key]["state"].keys() == state.keys()
        for name, tensor in state.items():
            assert torch.equal(result[key]["state"][name], tensor), (key, name)
    # Same codes, scales and float layers: the saved model and the one quantized on load compute the same.
    assert torch.equal(result["saved"]["logits"], result["on_load"]["logits"])
