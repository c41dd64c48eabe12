"""llm_int8.decode.lean_decoding: which thread counts torch's ops and the int8 kernels run on, and that
nothing else changes."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm_int8 import Int8Config, _native, lean_decoding, quantize_  # noqa: E402


def tiny_int8_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    quantize_(model, Int8Config())
    return model


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def record_threads(model):
    """(tokens, torch threads, kernel threads) seen by every decoder layer's forward."""
    seen = []

    def hook(module, args):
        seen.append((args[0].shape[0] * args[0].shape[1], torch.get_num_threads(), _native.kernel_threads()))

    handles = [layer.register_forward_pre_hook(hook) for layer in model.model.layers]
    return seen, handles


def test_small_steps_run_torch_on_one_thread_and_the_kernels_on_all(two_threads):
    model = lean_decoding(tiny_int8_llama(), max_tokens=4)
    seen, _ = record_threads(model)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 3)))  # 3 tokens: a decoding-sized step
        model(torch.randint(0, 256, (2, 5)))  # 10 tokens: a prefill keeps torch's count
    assert seen == [(3, 1, 2), (3, 1, 2), (10, 2, 2), (10, 2, 2)]
    assert torch.get_num_threads() == 2 and _native.kernel_threads() == 2  # restored


def test_generate_gives_the_same_tokens_and_restores_the_threads(two_threads):
    model = tiny_int8_llama()
    prompt = torch.randint(0, 256, (1, 6))
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(prompt, **kwargs)
        lean_decoding(model)
        seen, _ = record_threads(model)
        got = model.generate(prompt, **kwargs)
    assert torch.equal(got, want)
    assert seen and all((t, k) == (1, 2) for _, t, k in seen)  # the prompt (6 tokens) too: <= 64
    assert torch.get_num_threads() == 2


def test_an_error_in_the_forward_restores_the_threads(two_threads):
    model = lean_decoding(tiny_int8_llama())
    with torch.no_grad(), pytest.raises(IndexError):
        model(torch.tensor([[300]]))  # out of the vocabulary
    assert torch.get_num_threads() == 2 and _native.kernel_threads() == 2


def test_disable_and_copies(two_threads):
    model = lean_decoding(tiny_int8_llama())
    twin = copy.deepcopy(model)
    assert twin.generate.__self__ is twin  # a copy's generate runs the copy
    lean_decoding(model, enabled=False)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks
    seen, _ = record_threads(model)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 1)))
    assert seen == [(1, 2, 2), (1, 2, 2)]
    with pytest.raises(ValueError, match="max_tokens"):
        lean_decoding(model, max_tokens=0)
