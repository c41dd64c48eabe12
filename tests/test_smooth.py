"""Migration of activation scale into the norms and the int8 weights (llm_int8.eval.smooth).

In float the migration changes nothing (x W^T = (x / s)(W s)^T, the norm's output divided by s); it finds
exactly the layers fed by a norm's output, refuses norms whose output is not linear in their weight, and
its GPTQ codes are those of W s with the norms migrated with them; a migration that makes held-out
perplexity worse is not kept.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_int8 import Int8Config, Linear8bitLt, quantize_
from llm_int8 import functional as F
from llm_int8.eval import smooth as S
from llm_int8.eval.methods import build_method, shared_copy
from llm_int8.eval.rounding import apply_rounding, gptq_rounding

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms with spread gains and one large input channel, as trained models have
        gen = torch.Generator().manual_seed(1)
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 + 0.1)
                module.weight[5] = 12.0
    return model


def windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


def test_migration_finds_the_norm_fed_layers_and_changes_nothing_in_float():
    model = tiny_llama()
    migration = S.migration_scales(model, windows(3, 0), 0.5)
    assert migration.norms == {
        f"model.layers.{i}.{norm}": [f"model.layers.{i}.{layer}" for layer in layers]
        for i in range(2)
        for norm, layers in (("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                             ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]))
    }
    for s in migration.scales.values():
        assert s.shape == (64,) and bool((s > 0).all())
        assert float(s.log().mean()) == pytest.approx(0.0, abs=1e-5)  # geometric mean 1
        assert float(s[5]) > float(s.median())  # the large channel moves into the weights most
    migrated = shared_copy(model)
    S.migrate_norms(migrated, migration)
    for name, s in migration.layer_scales().items():
        layer = migrated.get_submodule(name)
        layer.weight = nn.Parameter(S.migrated_weight(layer.weight, s), requires_grad=False)
    ids = windows(2, 9)
    with torch.no_grad():
        ref, got = model(ids).logits, migrated(ids).logits
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    for name in migration.norms:  # the original model is untouched
        assert float(model.get_submodule(name).weight.detach()[5]) == 12.0


class OffsetNorm(nn.Module):
    """A norm computing (1 + gamma) * x / rms(x) (as Gemma's): dividing gamma by s does not divide its output by s."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_norms_not_linear_in_their_weight_are_not_migrated():
    model = tiny_llama(layers=1)
    model.model.layers[0].input_layernorm = OffsetNorm(64)
    migration = S.migration_scales(model, windows(2, 0), 0.5)
    assert list(migration.norms) == ["model.layers.0.post_attention_layernorm"]
    assert S._norm_is_linear_in_weight(model.model.layers[0].post_attention_layernorm, 64)
    assert not S._norm_is_linear_in_weight(OffsetNorm(64), 64)
    with pytest.raises(ValueError, match="strength"):
        S.migration_scales(model, windows(1, 0), 1.5)


def test_smooth_method_holds_the_codes_of_the_migrated_weight():
    model = tiny_llama(layers=1)
    migration = S.migration_scales(model, windows(2, 0), 0.5)
    int8 = build_method(model, "llm_int8_smooth", {"migration": migration, "threshold": 4.0})
    for name, s in migration.layer_scales().items():
        layer = int8.get_submodule(name)
        codes, absmax = F.quantize_weight(model.get_submodule(name).weight.detach() * s)
        assert isinstance(layer, Linear8bitLt) and layer.threshold == 4.0
        assert torch.equal(layer.weight, codes) and torch.equal(layer.SCB, absmax)
    for name, s in migration.scales.items():
        assert torch.equal(int8.get_submodule(name).weight, model.get_submodule(name).weight.detach() / s)
    with pytest.raises(ValueError, match="needs a migration"):
        build_method(model, "llm_int8_smooth")


def test_gptq_under_a_migration_rounds_the_migrated_weight_and_migrates_the_norms():
    model = tiny_llama(layers=1)
    calibration = windows(3, 0)
    migration = S.migration_scales(model, calibration, 0.5)
    rounding = gptq_rounding(model, calibration, migration=migration)
    scales = migration.layer_scales()
    for name in rounding.codes:
        weight = model.get_submodule(name).weight.detach()
        expected_absmax = F.quantize_weight(weight * scales[name] if name in scales else weight)[1]
        assert torch.equal(rounding.absmax[name], expected_absmax)
        assert rounding.error_gptq[name] <= rounding.error_rtn[name] + 1e-12
    assert rounding.to_dict()["migration"]["strength"] == 0.5
    int8 = shared_copy(model)
    quantize_(int8, Int8Config())
    apply_rounding(int8, rounding)
    for name, s in migration.scales.items():
        assert torch.equal(int8.get_submodule(name).weight, model.get_submodule(name).weight.detach() / s)
    via_method = build_method(model, "llm_int8_gptq", {"rounding": rounding})
    ids = windows(1, 5)
    with torch.no_grad():
        assert torch.equal(via_method(ids).logits, int8(ids).logits)


def test_a_migration_that_would_hurt_is_not_kept():
    """Scales with a huge spread make a few columns dominate each weight row's absmax, so every other
    weight is rounded coarsely: held-out perplexity gets worse, and the check refuses the migration."""
    from llm_int8.eval.experiments import check_calibration

    model = tiny_llama()
    good = S.migration_scales(model, windows(2, 0), 0.5)
    gen = torch.Generator().manual_seed(3)
    bad = S.Migration(good.norms, {n: torch.exp(torch.randn(64, generator=gen) * 4) for n in good.norms}, 0.5)
    check = check_calibration(model, "llm_int8_smooth", "llm_int8", windows(4, 7), {"migration": bad})
    assert check.change.change > 0 and not check.kept


def test_choose_activation_setting_picks_the_best_calibration_score_and_checks_it():
    from llm_int8.eval.experiments import choose_activation_setting

    model = tiny_llama()
    choice = choose_activation_setting(model, windows(2, 0), windows(2, 1), strengths=(0.5,), thresholds=(6.0, 1.0))
    assert len(choice.candidates) == 4
    best = min(choice.candidates, key=lambda c: c["perplexity"])
    assert (choice.strength, choice.threshold) == (best["strength"], best["threshold"])
    if (choice.strength, choice.threshold) == (0.0, 6.0):
        assert choice.check is None and not choice.kept
    else:
        assert choice.check is not None and choice.kept == (choice.check.change.change < 0)
    assert choice.to_dict()["kept"] == choice.kept
