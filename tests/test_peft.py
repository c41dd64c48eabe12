"""peft LoRA / DoRA on Linear8bitLt: dispatch, merge / unmerge, DoRA norms, saving, kbit preparation, Trainer.

Tiny random Llama models (fast); one slow test on SmolLM2-135M.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import llm_int8  # noqa: E402
from llm_int8 import Linear8bitLt  # noqa: E402
from llm_int8 import functional as F  # noqa: E402
from llm_int8.integrations.hf import LLMInt8Config, quantize_model  # noqa: E402
from llm_int8.integrations.peft import LoraLinear8bitLt  # noqa: E402
from llm_int8._ops import INT8_MAX  # noqa: E402

U32 = 2.0**-24
VOCAB, HIDDEN, LAYERS, SEQ = 128, 64, 2, 16
TARGETS = ["q_proj", "v_proj", "down_proj"]


def gamma(n: int) -> float:
    """Higham's gamma_n: relative error bound of n float32 roundings."""
    return n * U32 / (1 - n * U32)


def tiny_config():
    return transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def int8_model(checkpoint, fp_cols: bool = False):
    """The tiny model loaded in int8; ``fp_cols`` gives every int8 layer two calibrated 16-bit columns."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=LLMInt8Config())
    if fp_cols:
        float_model = AutoModelForCausalLM.from_pretrained(checkpoint)
        for name, module in model.named_modules():
            if isinstance(module, Linear8bitLt):
                weight = float_model.get_submodule(name).weight.detach()
                module.set_fp_columns(torch.tensor([1, 5]), weight.to(torch.float16))
    return model


def lora(model, **kwargs):
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("init_lora_weights", False)  # random B as well as A: the adapters change the output
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **kwargs))


def trained_dora(peft_model):
    """DoRA starts at m = ||W + delta||, a factor of 1: move m as training would, so that it counts."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            for m in layer.lora_magnitude_vector.values():
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return peft_model


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear8bitLt)}


# --------------------------------------------------------------------------------------------
# Registration and dispatch


def _adapted(peft_model) -> list[str]:
    """The names (in the base model) of the layers that got an adapter."""
    return sorted(
        name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )


# Every form of target_modules peft documents: the "all-linear" shorthand, a list of name suffixes, a regex
# (full match), and the options that narrow them (exclude_modules, layers_to_transform with layers_pattern).
TARGET_FORMS = {
    "all-linear": dict(target_modules="all-linear"),
    "list of names": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "regex": dict(target_modules=r".*\.mlp\.(up|gate)_proj"),
    "all-linear minus exclude_modules": dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
    "layers_to_transform": dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
}


@pytest.mark.parametrize("form", TARGET_FORMS)
def test_target_modules_pick_the_layers_they_pick_on_bitsandbytes_8bit(checkpoint, form, input_ids):
    bnb = pytest.importorskip("bitsandbytes")
    bnb_model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    assert isinstance(bnb_model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    expected = _adapted(get_peft_model(bnb_model, LoraConfig(r=4, **TARGET_FORMS[form])))
    peft_model = get_peft_model(int8_model(checkpoint), LoraConfig(r=4, init_lora_weights=False, **TARGET_FORMS[form]))
    assert _adapted(peft_model) == expected and expected
    assert sorted(lora_layers(peft_model)) == ["base_model.model." + name for name in expected]
    if form == "all-linear":  # q/k/v/o/gate/up/down of every layer: all but the head
        assert len(expected) == 7 * LAYERS and not any("lm_head" in name for name in expected)
    peft_model(input_ids).logits.float().pow(2).mean().backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in lora_layers(peft_model).values())


@pytest.mark.parametrize("peft_first", [False, True], ids=["llm_int8 first", "peft first"])
def test_import_registers_with_peft(peft_first):
    """``import llm_int8`` does not import peft; importing peft later registers the dispatcher, also
    after an availability check (find_spec) that does not import it; peft imported first: at once."""
    if peft_first:
        code = "import peft, llm_int8\n"
    else:
        code = (
            "import sys, importlib.util, llm_int8\n"
            "assert 'peft' not in sys.modules\n"
            "assert importlib.util.find_spec('peft') is not None\n"
            "import peft\n"
        )
    code += (
        "from peft.tuners.lora.model import LoraModel\n"
        "assert getattr(LoraModel._create_new_module, '_llm_int8_dispatch', False)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("use_dora", [False, True])
def test_dispatch_wraps_int8_layers_without_warnings(checkpoint, input_ids, use_dora):
    model = int8_model(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, inside peft
        peft_model = lora(model, use_dora=use_dora, modules_to_save=["lm_head"])
    layers = lora_layers(peft_model)
    assert len(layers) == LAYERS * len(TARGETS)
    assert all(isinstance(m.base_layer, Linear8bitLt) for m in layers.values())
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in name or "modules_to_save" in name) for name in trainable)
    assert any("lora_magnitude_vector" in name for name in trainable) == use_dora
    assert any("lm_head.modules_to_save" in name for name in trainable)
    out = peft_model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert all(peft_model.get_parameter(name).grad is not None for name in trainable)


def test_modules_to_save_cannot_name_an_int8_layer(checkpoint):
    """Its weight is frozen int8: peft's copy cannot require gradients (as with bitsandbytes' layers)."""
    with pytest.raises(RuntimeError, match="floating point"):
        lora(int8_model(checkpoint), target_modules=["q_proj"], modules_to_save=["o_proj"])


def test_lora_forward_is_base_plus_adapter(checkpoint):
    model = int8_model(checkpoint)
    peft_model = lora(model, target_modules=["q_proj"])
    layer = next(iter(lora_layers(peft_model).values()))
    x = torch.randn(3, 5, HIDDEN)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    expected = layer.base_layer(x) + b(a(x)) * layer.scaling["default"]
    assert torch.equal(layer(x), expected)


def test_custom_registration_keeps_precedence(checkpoint):
    """A layer class registered by the user for Linear8bitLt wins over ours."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    class Custom(PeftLinear):
        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

    config = LoraConfig(r=4, target_modules=["q_proj"])
    config._register_custom_module({Linear8bitLt: Custom})
    peft_model = get_peft_model(int8_model(checkpoint), config)
    wrapped = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(wrapped) is Custom


# --------------------------------------------------------------------------------------------
# DoRA: the weight norm from the dequantized weight


@pytest.mark.parametrize("fp_cols", [False, True])
def test_dora_norm_from_dequantized_weight(checkpoint, fp_cols):
    model = int8_model(checkpoint, fp_cols=fp_cols)
    peft_model = lora(model, use_dora=True)
    for layer in lora_layers(peft_model).values():
        base = layer.base_layer
        w = base.weight.double() * (base.SCB.double() / INT8_MAX)[:, None]
        if fp_cols:
            w[:, base.fp_cols] = base.fp_weight.double()
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        delta = (b @ a) * layer.scaling["default"]
        ref = torch.linalg.norm(w + delta, dim=1)
        magnitude = layer.lora_magnitude_vector["default"].weight.double()
        # float32: dequantization (2 roundings), B@A (r), scaling and add (2), the norm's sum of squares (K + 2)
        k = w.shape[1]
        bound = gamma(k + layer.r["default"] + 8) * torch.linalg.norm(w.abs() + delta.abs(), dim=1)
        assert ((magnitude - ref).abs() <= bound).all()
        # the raw int8 codes would give norms ~100x larger: the check above cannot pass by accident
        assert torch.linalg.norm(base.weight.double(), dim=1).min() > 10 * ref.max()


# --------------------------------------------------------------------------------------------
# merge / unmerge


def merged_reference(layer, names):
    """float64 references for ``layer``'s base with adapters ``names`` merged (LoRA or DoRA):
    (merged weight, the weight the unmerged forward multiplies by the int8 x, the weight it
    multiplies by the float x). The unmerged forward is x^ @ int8_part.T + x @ float_part.T."""
    base = layer.base_layer
    w = base.weight.double() * (base.SCB.double() / INT8_MAX)[:, None]
    if base.fp_cols is not None:
        w[:, base.fp_cols] = base.fp_weight.double()
    merged, int8_part, float_part = w.clone(), w.clone(), torch.zeros_like(w)
    for name in names:
        delta = (layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()) * layer.scaling[name]
        if name in layer.lora_variant:
            factor = layer.lora_magnitude_vector[name].weight.double() / torch.linalg.norm(w + delta, dim=1)
            merged = factor[:, None] * (merged + delta)
            int8_part, float_part = factor[:, None] * int8_part, factor[:, None] * (float_part + delta)
        else:
            merged = merged + delta
            float_part = float_part + delta
    return merged, int8_part, float_part


def snapshot(base):
    return {name: getattr(base, name).detach().clone() for name in ("weight", "SCB", "fp_weight", "bias")
            if getattr(base, name) is not None}


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("fp_cols", [False, True])
def test_merge_requantizes_and_unmerge_restores_bits(checkpoint, use_dora, fp_cols):
    model = int8_model(checkpoint, fp_cols=fp_cols)
    peft_model = trained_dora(lora(model, use_dora=use_dora))
    for layer in lora_layers(peft_model).values():
        base = layer.base_layer
        before = snapshot(base)
        weight_object = base.weight
        ref, _, _ = merged_reference(layer, ["default"])
        layer.merge()
        assert layer.merged and base.weight is weight_object and base.weight.dtype == torch.int8
        # the merged weight, requantized: every code within one step (ties of the float32 rounding) of
        # round(ref * 127 / absmax), and the absmax within float32 rounding of the reference's
        absmax_ref = ref.abs().amax(dim=1)
        assert ((base.SCB.double() - absmax_ref).abs() <= gamma(16) * absmax_ref).all()
        codes_ref = ref * INT8_MAX / absmax_ref[:, None]
        assert ((base.weight.double() - codes_ref).abs() <= 0.5 + gamma(16) * INT8_MAX).all()
        if fp_cols:
            # the calibrated columns take the delta in float, rounded once to their fp16 storage
            fp_ref = ref[:, base.fp_cols]
            assert base.fp_weight.dtype == torch.float16
            fp16_bound = (2**-11 + gamma(16)) * fp_ref.abs() + 2**-25  # fp16 rounding, subnormal floor
            assert ((base.fp_weight.double() - fp_ref).abs() <= fp16_bound).all()
        layer.unmerge()
        assert not layer.merged
        after = snapshot(base)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_merging_one_by_one_rounds_once(checkpoint):
    model = int8_model(checkpoint)
    peft_model = lora(model, target_modules=["q_proj"])
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    layer = next(iter(lora_layers(peft_model).values()))
    layer.merge(adapter_names=["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Already following adapters were merged"
        layer.merge(adapter_names=["second"])
    one_by_one = snapshot(layer.base_layer)
    layer.unmerge()
    layer.merge(adapter_names=["default", "second"])
    together = snapshot(layer.base_layer)
    assert all(torch.equal(one_by_one[k], together[k]) for k in together)


def layer_merge_bound(x, layer, int8_part, float_part):
    """|merged layer(x) - unmerged layer(x)| elementwise, for inputs without outliers (all int8).

    Unmerged: x^ @ int8_part.T + x @ float_part.T (x^ the int8-rounded x; see merged_reference);
    merged: x^ @ W'^.T. The difference is x^ @ (W'^ - int8_part - float_part).T + (x^ - x) @ float_part.T,
    with |x^ - x| <= x_absmax / 254 per element; plus float32 rounding on both sides.
    """
    x64 = x.double().reshape(-1, x.shape[-1])
    half_step = x64.abs().amax(dim=1, keepdim=True) / (2 * INT8_MAX)
    base = layer.base_layer
    merged_hat = base.weight.double() * (base.SCB.double() / INT8_MAX)[:, None]
    if base.fp_cols is not None:
        merged_hat[:, base.fp_cols] = base.fp_weight.double()
    weight_error = merged_hat - int8_part - float_part  # the int8 rounding of the merged weight
    x_hat = x64.abs() + half_step
    bound = x_hat @ weight_error.abs().T + half_step * float_part.abs().sum(dim=1)
    magnitude = x_hat @ (3 * int8_part.abs() + merged_hat.abs() + float_part.abs()).T
    return bound + gamma(x64.shape[1] + 16) * magnitude


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_layer_matches_unmerged_within_int8_rounding(checkpoint, use_dora):
    model = int8_model(checkpoint, fp_cols=True)
    peft_model = trained_dora(lora(model, use_dora=use_dora)).eval()
    x = torch.randn(4, 3, HIDDEN, generator=torch.Generator().manual_seed(2))
    assert x.abs().max() < 6.0  # no outliers: every column takes the int8 path
    for layer in lora_layers(peft_model).values():
        if layer.in_features != HIDDEN:
            continue
        _, int8_part, float_part = merged_reference(layer, ["default"])
        with torch.no_grad():
            unmerged = layer(x).double().reshape(-1, layer.out_features)
            layer.merge()
            merged = layer(x).double().reshape(-1, layer.out_features)
        bound = layer_merge_bound(x, layer, int8_part, float_part)
        assert ((merged - unmerged).abs() <= bound).all(), (merged - unmerged).abs().max()
        layer.unmerge()


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_gives_int8_model_matching_the_adapters(checkpoint, input_ids, use_dora):
    peft_model = trained_dora(lora(int8_model(checkpoint), use_dora=use_dora)).eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=input_ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=input_ids).logits
    layers = [m for m in merged_model.modules() if isinstance(m, Linear8bitLt)]
    assert len(layers) == 7 * LAYERS and not lora_layers(merged_model)
    # per layer the merged weight is off by at most half an int8 step (like the base weight itself):
    # relative logits error within 2 steps per merged matmul, added in quadrature (as in test_hf)
    bound = 2 * math.sqrt(len(TARGETS) * LAYERS) / INT8_MAX
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert rel <= bound
    assert rel > 0  # the weights were requantized, not left alone


# --------------------------------------------------------------------------------------------
# Saving, reloading, preparation, Trainer


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_save_and_reload_bit_identical(checkpoint, input_ids, tmp_path, use_dora):
    peft_model = lora(int8_model(checkpoint), use_dora=use_dora, modules_to_save=["lm_head"])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(int8_model(checkpoint), tmp_path / "adapter").eval()
    assert len(lora_layers(reloaded)) == LAYERS * len(TARGETS)
    saved, loaded = adapter_state(peft_model), adapter_state(reloaded)
    assert saved.keys() == loaded.keys() and saved
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=input_ids).logits, reloaded(input_ids=input_ids).logits)


def test_prepare_model_for_kbit_training(checkpoint, input_ids):
    model = int8_model(checkpoint)
    assert model.is_loaded_in_8bit
    model = prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_input_embeddings()(input_ids).requires_grad  # input grads for reentrant checkpointing
    assert all(m.weight.dtype == torch.int8 for m in model.modules() if isinstance(m, Linear8bitLt))
    peft_model = lora(model)
    peft_model.train()
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [m.lora_A["default"].weight.grad for m in lora_layers(peft_model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_quantize_model_path_is_prepared_too(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    quantize_model(model, LLMInt8Config())
    assert model.is_loaded_in_8bit
    assert prepare_model_for_kbit_training(model).is_gradient_checkpointing


def test_trainer_steps_reduce_the_loss(checkpoint, input_ids, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = prepare_model_for_kbit_training(int8_model(checkpoint))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    data = [{"input_ids": row, "labels": row} for row in input_ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, learning_rate=5e-3, per_device_train_batch_size=2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
    )

    def loss():
        with torch.no_grad():
            return peft_model(input_ids=input_ids, labels=input_ids).loss.item()

    before = loss()
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    after = loss()
    assert after < before - 0.1, (before, after)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M


@pytest.mark.slow
def test_smollm2_lora_trains_saves_and_merges(tmp_path):
    from llm_int8.eval.data import load_corpus
    from llm_int8.eval.models import load_model, tokenize

    model, tokenizer = load_model()
    quantize_model(model, LLMInt8Config())
    ids = tokenize(tokenizer, load_corpus()[:20_000])
    train, held_out = ids[:256].view(2, 128), ids[2048 : 2048 + 256].view(2, 128)
    targets = ["q_proj", "v_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)

    def logits_and_loss(m):
        with torch.no_grad():
            out = m(input_ids=held_out, labels=held_out)
        return out.logits, out.loss.item()

    peft_model.eval()
    _, before = logits_and_loss(peft_model)
    peft_model.train()
    for _ in range(4):
        peft_model(input_ids=train, labels=train).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    unmerged, after = logits_and_loss(peft_model)
    assert after < before, (before, after)

    peft_model.save_pretrained(tmp_path / "adapter")
    base, _ = load_model()
    quantize_model(base, LLMInt8Config())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(logits_and_loss(reloaded)[0], unmerged)

    merged, merged_loss = logits_and_loss(reloaded.merge_and_unload())
    assert all(m.weight.dtype == torch.int8 for m in base.modules() if isinstance(m, Linear8bitLt))
    # each merged weight is requantized: off by at most half a step, like the base weights themselves;
    # 2 steps per merged matmul, added in quadrature over the 60 of them (as in test_hf)
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert 0 < rel <= 2 * math.sqrt(len(targets) * 30) / INT8_MAX, rel
    # merging keeps only what of the adapter crosses int8 steps (docs/finetune.md): part of the gain
    assert merged_loss < before, (before, after, merged_loss)
