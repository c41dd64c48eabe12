"""The ``llm-int8`` CLI end to end on a tiny random Llama with a character tokenizer (fast)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from llm_int8 import cli
from llm_int8.checkpoint import load_state_dict

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, corpus file) for a 2-layer Llama with hidden size 32."""
    root = tmp_path_factory.mktemp("tiny")
    chars = sorted(set(TEXT))
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), "isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # plant an outlier dim in the residual stream, as large models grow one
        model.model.embed_tokens.weight[:, 5] = 40.0
        for layer in model.model.layers:  # RMSNorm would shrink it to ~sqrt(hidden); its gain lifts it
            layer.input_layernorm.weight[5] = 4.0
            layer.post_attention_layernorm.weight[5] = 4.0
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    return str(root / "model"), str(corpus)


def _run(tiny, *args):
    model, corpus = tiny
    return cli.main([*args, "--model", model, "--corpus", corpus, "--windows", "2", "--seq-len", "16", "--no-progress"])


def test_ppl_prints_a_table_and_writes_json(tiny, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert _run(tiny, "ppl", "--methods", "fp32", "absmax_tensor", "llm_int8", "--json", str(out)) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "LLM.int8() absmax (alpha=6)" in text
    result = json.loads(out.read_text())
    assert result["n_windows"] == 2 and result["seq_len"] == 16
    assert set(result["perplexity"]) == {"fp32", "absmax_tensor", "llm_int8"}
    assert all(math.isfinite(r["perplexity"]) and r["n_tokens"] == 30 for r in result["perplexity"].values())
    assert result["perplexity"]["fp32"]["top1_agreement"] == 1.0
    assert all(0.0 <= r["top1_agreement"] <= 1.0 for r in result["perplexity"].values())
    assert "top-1 = fp32" in text
    # every change against fp32 comes with its 95 % interval, which holds the change
    assert "vs fp32 [95 % interval]" in text and "t over 2 windows" in text
    for name in ("absmax_tensor", "llm_int8"):
        c = result["perplexity"][name]["change"]
        assert c["low"] <= c["change"] <= c["high"] and c["n_windows"] == 2 and c["n_tokens"] == 30
        assert f"{100 * c['change']:+.2f} % [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]" in text


def test_ppl_runs_the_gptq_methods_beside_w8_only(tiny, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert _run(tiny, "ppl", "--methods", "fp32", "w8_only", "w8_gptq", "llm_int8", "llm_int8_gptq",
                "--calib-windows", "2", "--json", str(out)) == 0
    text = capsys.readouterr().out
    assert "GPTQ codes calibrated on 32 held-out tokens" in text and "LLM.int8() + GPTQ-rounded codes" in text
    result = json.loads(out.read_text())["perplexity"]
    assert set(result) == {"fp32", "w8_only", "w8_gptq", "llm_int8", "llm_int8_gptq"}
    assert all(r["change"]["low"] <= r["change"]["change"] <= r["change"]["high"] for r in result.values())


def test_outliers_finds_the_planted_dim_and_writes_pngs(tiny, tmp_path):
    out = tmp_path / "o.json"
    assert _run(tiny, "outliers", "--out", str(tmp_path), "--json", str(out)) == 0
    result = json.loads(out.read_text())
    assert 5 in result["report"]["dims"]
    assert result["ablation"]["random_dims"] and 5 not in result["ablation"]["random_dims"]
    for name in ("outliers_heatmap.png", "outliers_per_layer.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_sweep_covers_every_alpha(tiny, tmp_path):
    out = tmp_path / "s.json"
    assert _run(tiny, "sweep", "--out", str(tmp_path), "--json", str(out)) == 0
    rows = json.loads(out.read_text())["sweep"]
    assert [r["alpha"] for r in rows] == [0, 1, 2, 3, 4, 6, 8, "inf"]
    assert rows[0]["decomposed_share"] == 0.0 and rows[-1]["decomposed_share"] == 0.0
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_weights_orders_the_errors(tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "w.json"
    argv = ["plot-weights", "--model", model, "--layer", "model.layers.0.mlp.down_proj", "--out", str(tmp_path)]
    assert cli.main([*argv, "--json", str(out), "--no-progress"]) == 0
    errors = json.loads(out.read_text())["relative_error"]
    assert errors["vector-wise absmax"] < errors["absmax per-tensor"]
    assert (tmp_path / "weights.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_weights_unknown_layer_lists_some(tiny, capsys):
    model, _ = tiny
    assert cli.main(["plot-weights", "--model", model, "--layer", "nope", "--no-progress"]) == 2
    assert "no linear layer named 'nope'; some are: model.layers.0" in capsys.readouterr().err


def test_calibrate_saves_a_loadable_checkpoint(tiny, tmp_path):
    save, out = tmp_path / "int8.safetensors", tmp_path / "c.json"
    assert _run(tiny, "calibrate", "--save", str(save), "--json", str(out), "--calib-budget", "5") == 0
    result = json.loads(out.read_text())
    plan, memory = result["plan"], result["memory_bytes"]
    for layer in (0, 1):  # the planted dim is worth its bytes in every layer fed the residual stream
        assert plan["columns"][f"model.layers.{layer}.self_attn.q_proj"] == [5]
    assert 0 < plan["fp_bytes"] <= 0.05 * plan["int8_bytes"]
    assert plan["int8_bytes"] == memory["int8"]  # the budget is counted on the real int8 footprint
    assert memory["int8_calibrated"] == memory["int8"] + plan["fp_bytes"]
    with open(save, "rb") as f:  # written by the safe writer: safetensors with our checksum
        assert f.read(9)[8:] == b"{"
    state = load_state_dict(save)  # validated, checksum verified
    assert state["model.layers.0.self_attn.q_proj.fp_cols"].tolist() == [5]
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8


def test_demo_runs_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "d.json"
    assert _run(tiny, "demo", "--methods", "fp32", "llm_int8_calibrated", "bnb_emulated", "--json", str(out)) == 0
    text = capsys.readouterr().out
    for expected in ("2 windows x 16 tokens", "tokens/s", "outlier feature dims", "greedy continuation", "wall time"):
        assert expected in text
    result = json.loads(out.read_text())
    assert set(result["generations"]) == {"fp32", "int8"}
    assert 0 <= result["generation_common_prefix"] <= result["generation_tokens"] <= 24
    assert result["memory_bytes"]["int8"] < result["memory_bytes"]["fp32"]


def test_demo_shows_progress_for_every_slow_step(tiny, capsys):
    model, corpus = tiny
    argv = ["demo", "--model", model, "--corpus", corpus, "--windows", "2", "--seq-len", "16", "--methods", "fp32"]
    assert cli.main(argv) == 0
    bars = capsys.readouterr().err
    for step in ("outlier statistics", "calibration", "fp32", "decode tokens/s", "prefill tokens/s", "greedy continuation"):
        assert f"{step}:" in bars, step


def test_missing_corpus_is_a_clear_error(tiny, tmp_path, capsys):
    model, _ = tiny
    argv = ["ppl", "--model", model, "--corpus", str(tmp_path / "none.txt"), "--no-progress"]
    assert cli.main(argv) == 2
    assert "neither one of shakespeare, kjv nor an existing text file" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["ppl", "--model", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "neither one of smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b nor a local directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["ppl", "--windows", "0"], ["ppl", "--methods", "int4"], ["frobnicate"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


# --------------------------------------------------------------------------------------------
# quantize --save: refused before loading where it would overwrite or cannot write; written whole or not at all


def _model_only(tiny, tmp_path):
    """The tiny model's folder without its tokenizer (config and weights only)."""
    import shutil

    model, _ = tiny
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{model}/{name}", folder / name)
    return folder


def test_quantize_save_refuses_to_overwrite_and_writes_nothing(tiny, tmp_path, capsys):
    model, _ = tiny
    a_file = tmp_path / "int8"
    a_file.write_text("precious")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    for target, message in [
        (a_file, "it is a file, and the model is saved as a directory"),
        (busy, r"the directory is not empty \(1 entry: keep.txt\); give a new or empty directory, or pass --force"),
        (a_file / "sub", ".*/int8 is not a directory this process can write to; choose a directory you can write to"),
    ]:
        assert cli.main(["quantize", "--model", model, "--save", str(target), "--no-progress"]) == 2
        captured = capsys.readouterr()
        assert re.search(rf"llm-int8 quantize: error: cannot save to {re.escape(str(target))}: {message}", captured.err)
        assert "wrote" not in captured.out and "Traceback" not in captured.err
    assert a_file.read_text() == "precious" and [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "int8"]  # no temporary folder left behind


def test_quantize_save_force_replaces_a_directory_whole(tiny, tmp_path, capsys):
    model, _ = tiny
    target = tmp_path / "int8"
    target.mkdir()
    (target / "old.txt").write_text("old")
    assert cli.main(["quantize", "--model", model, "--save", str(target), "--force", "--no-progress"]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert not (target / "old.txt").exists() and (target / "model.safetensors").is_file()
    assert (target / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.int8


def test_a_failing_save_leaves_nothing_half_written(tiny, tmp_path, monkeypatch, capsys):
    """The tokenizer's save fails after the model's was written: neither the target nor a temporary folder
    remains, and the error is one line (exit 2), not a traceback."""
    model, _ = tiny

    def broken_save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", broken_save)
    assert cli.main(["quantize", "--model", model, "--save", str(tmp_path / "int8"), "--no-progress"]) == 2
    assert "llm-int8 quantize: error: [Errno 28] No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quantize_needs_no_tokenizer(tiny, tmp_path, capsys):
    folder = _model_only(tiny, tmp_path)
    target = tmp_path / "int8"
    assert cli.main(["quantize", "--model", str(folder), "--save", str(target), "--no-progress"]) == 0
    assert "the model folder has no tokenizer, so none was saved" in capsys.readouterr().out
    assert (target / "model.safetensors").is_file() and not (target / "tokenizer.json").exists()


def test_no_progress_silences_transformers_bars_too(tiny, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    model, _ = tiny
    assert hf_logging.is_progress_bar_enabled()
    assert cli.main(["quantize", "--model", model, "--save", str(tmp_path / "a"), "--no-progress"]) == 0
    quiet = capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # only for the command's run
    assert cli.main(["quantize", "--model", model, "--save", str(tmp_path / "b")]) == 0
    loud = capsys.readouterr().err
    assert "Loading weights" in loud and "Writing model shards" in loud  # what --no-progress must hide
    assert "Loading weights" not in quiet and "Writing model shards" not in quiet and "it/s" not in quiet


@pytest.mark.parametrize("command", ["demo", "ppl", "quantize"])
def test_out_is_refused_where_no_figures_are_written(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # (a missing --model: were --out accepted, the run would stop there)
        cli.main([command, "--out", str(tmp_path / "figures"), "--model", str(tmp_path / "none")])
    assert exc.value.code == 2
    assert "unrecognized arguments: --out" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()
