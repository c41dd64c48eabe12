"""A saved int8 model as the person it is shared with loads it: in a fresh process, with or without llm_int8.

``save_pretrained`` declares the checkpoint in bitsandbytes' 8-bit format (its tensors are bitsandbytes'
tensors) with llm-int8's own fields beside (``LLMInt8Config.to_dict``). So:

* a process that never imports llm_int8 loads it through bitsandbytes: the same int8 codes and scales,
  bitsandbytes' LLM.int8() forward, logits as close to fp32 as int8 allows;
* a process without bitsandbytes installed fails loudly, naming the package to install;
* a process that imports llm_int8 loads it through llm_int8: bit-identical logits, calibrated columns included;
* and in this process every invalid layer a checkpoint can hold is refused with the layer's name.

"Not installed" is real: the subprocess runs with ``python -S`` on a copy of this venv's site-packages
(symbolic links) without the hidden packages, so neither ``import`` nor package metadata can find them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from helpers import LAYER_DEFECTS  # noqa: E402
from llm_int8 import Linear8bitLt  # noqa: E402
from llm_int8._ops import INT8_MAX  # noqa: E402
from llm_int8.integrations.hf import LLMInt8Config  # noqa: E402
from llm_int8.saved_format import CheckpointError  # noqa: E402

VOCAB, HIDDEN, LAYERS, SEQ = 256, 64, 2, 12
# As in test_hf.py: two int8 steps per matmul, four matmuls per layer, independent errors add in quadrature.
# Reading the int8 codes as float weights (what transformers did before) is off by a factor of ~100.
LOGITS_REL_ERR_BOUND = 2 * math.sqrt(4 * LAYERS) / INT8_MAX
CALIBRATED_LAYER = {"llama": "model.layers.0.mlp.up_proj", "gpt2": "transformer.h.0.mlp.c_fc"}
CALIBRATED_COLS = [3, 17, 40]


def _tiny(arch: str):
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        )
    else:
        config = transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
            eos_token_id=1, pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Per arch: the fp32 and int8 logits of this process, an int8 save, and a calibrated int8 save."""
    root = tmp_path_factory.mktemp("shared")
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    out = {"root": root, "ids": ids}
    for arch in ("llama", "gpt2"):
        fp32_dir = root / f"{arch}-fp32"
        _tiny(arch).save_pretrained(fp32_dir)
        fp32 = AutoModelForCausalLM.from_pretrained(fp32_dir).eval()
        int8 = AutoModelForCausalLM.from_pretrained(fp32_dir, quantization_config=LLMInt8Config()).eval()
        int8.save_pretrained(root / f"{arch}-int8")
        layer = int8.get_submodule(CALIBRATED_LAYER[arch])
        float_weight = fp32.get_submodule(CALIBRATED_LAYER[arch]).weight.detach()
        if arch == "gpt2":
            float_weight = float_weight.T  # Conv1D stores [in, out]
        layer.set_fp_columns(torch.tensor(CALIBRATED_COLS), float_weight.half())
        int8.save_pretrained(root / f"{arch}-int8-calibrated")
        with torch.no_grad():
            out[arch] = {"fp32": fp32(ids).logits, "calibrated": int8(ids).logits}
            layer.fp_cols = layer.fp_weight = None
            out[arch]["int8"] = int8(ids).logits
    return out


def _site_without(tmp_path: Path, hidden: tuple[str, ...]) -> Path:
    """A folder holding links to every entry of this venv's site-packages except the ``hidden`` packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / ("site-without-" + "-".join(hidden))
    farm.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower().replace("-", "_")
        if any(name.startswith(h) or name.startswith(f"__editable__.{h}") for h in hidden):
            continue
        (farm / entry.name).symlink_to(entry)
    return farm


def _python(code: str, tmp_path: Path, hidden: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; with ``hidden``, those packages are not installed there."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    args = [sys.executable]
    if hidden:
        env["PYTHONPATH"] = str(_site_without(tmp_path, hidden))
        args.append("-S")  # no site: only the folder above and the standard library
    elif "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # (a checkout run with PYTHONPATH=src)
    return subprocess.run(args + ["-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)


LOAD_AND_RUN = """
    import json, sys, torch
    {imports}
    from transformers import AutoModelForCausalLM
    ids = torch.load({ids!r})
    report = {{}}
    for name, path in {paths!r}.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        layer = model.get_submodule({probe!r}[name])
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
        # bitsandbytes keeps the scales on its weight (Int8Params.SCB) or, after a forward, on layer.state
        scb = layer.SCB if hasattr(layer, "fp_cols") else next(
            t for t in (layer.weight.SCB, layer.state.SCB) if t is not None)
        torch.save({{"logits": logits, "weight": layer.weight.data.clone(), "SCB": scb}}, name + ".pt")
        report[name] = {{"class": type(layer).__module__ + "." + type(layer).__name__,
                        "generated": generated.shape[1],
                        "fp_cols": None if getattr(layer, "fp_cols", None) is None else layer.fp_cols.tolist()}}
    report["llm_int8 imported"] = "llm_int8" in sys.modules
    print(json.dumps(report))
"""


def _load_in_fresh_process(shared, tmp_path, names, imports="", hidden=()):
    root = shared["root"]
    code = LOAD_AND_RUN.format(
        imports=imports, ids=str(root / "ids.pt"), paths={n: str(root / n) for n in names},
        probe={n: "model.layers.0.self_attn.q_proj" if n.startswith("llama") else "transformer.h.0.attn.c_attn"
               for n in names},
    )
    proc = _python(code, tmp_path, hidden)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_without_llm_int8_bitsandbytes_loads_the_same_int8_model(shared, tmp_path):
    names = ["llama-int8", "gpt2-int8", "llama-int8-calibrated"]
    report = _load_in_fresh_process(shared, tmp_path, names, hidden=("llm_int8",))
    assert report["llm_int8 imported"] is False
    for name in names:
        arch = name.split("-")[0]
        assert report[name]["class"] == "bitsandbytes.nn.modules.Linear8bitLt", report[name]
        assert report[name]["generated"] == 8
        got = torch.load(tmp_path / f"{name}.pt")
        saved = load_file(shared["root"] / name / "model.safetensors")
        prefix = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
        # the very codes and scales llm_int8 saved, read as int8 weights with their scales
        assert torch.equal(got["weight"], saved[f"{prefix}.weight"]) and torch.equal(got["SCB"], saved[f"{prefix}.SCB"])
        # bitsandbytes' own LLM.int8() forward (fp16 casts, its outlier path): as close to fp32 as int8 allows
        assert _rel_err(got["logits"], shared[arch]["fp32"]) < LOGITS_REL_ERR_BOUND
        assert _rel_err(got["logits"], shared[arch]["int8"]) < LOGITS_REL_ERR_BOUND


def test_without_llm_int8_and_bitsandbytes_loading_fails_loudly(shared, tmp_path):
    code = f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(shared['root'] / 'llama-int8')!r})
    """
    proc = _python(code, tmp_path, hidden=("llm_int8", "bitsandbytes"))
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "requires bitsandbytes" in proc.stderr and "pip install" in proc.stderr


def test_with_llm_int8_imported_a_fresh_process_loads_its_own(shared, tmp_path):
    names = ["llama-int8", "gpt2-int8-calibrated", "llama-int8-calibrated"]
    report = _load_in_fresh_process(shared, tmp_path, names, imports="import llm_int8")
    for name in names:
        arch, calibrated = name.split("-")[0], name.endswith("calibrated")
        assert report[name]["class"] == "llm_int8.nn.Linear8bitLt"
        got = torch.load(tmp_path / f"{name}.pt")
        assert torch.equal(got["logits"], shared[arch]["calibrated" if calibrated else "int8"])
    calibrated = load_file(shared["root"] / "llama-int8-calibrated" / "model.safetensors")
    assert calibrated[f"{CALIBRATED_LAYER['llama']}.fp_cols"].tolist() == CALIBRATED_COLS


def test_calibrated_columns_survive_save_and_from_pretrained(shared):
    for arch in ("llama", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(shared["root"] / f"{arch}-int8-calibrated").eval()
        layer = model.get_submodule(CALIBRATED_LAYER[arch])
        assert layer.fp_cols.tolist() == CALIBRATED_COLS and layer.fp_weight.dtype == torch.float16
        with torch.no_grad():
            assert torch.equal(model(shared["ids"]).logits, shared[arch]["calibrated"])


def test_half_precision_load_keeps_the_scales_float32(shared):
    model = AutoModelForCausalLM.from_pretrained(shared["root"] / "llama-int8-calibrated", dtype=torch.float16)
    saved = load_file(shared["root"] / "llama-int8-calibrated" / "model.safetensors")
    for name, module in model.named_modules():
        if isinstance(module, Linear8bitLt):
            assert module.SCB.dtype == torch.float32 and torch.equal(module.SCB, saved[f"{name}.SCB"]), name
            if module.fp_weight is not None:
                assert torch.equal(module.fp_weight, saved[f"{name}.fp_weight"])


def _fp_columns(cols):
    def edit(state):
        state["fp_cols"] = torch.tensor(cols, dtype=torch.int64)
        state["fp_weight"] = torch.zeros(state["weight"].shape[0], len(cols), dtype=torch.float16)

    return edit


# The defects of tests/helpers.py that transformers' own per-tensor shape checks do not catch, applied to a
# layer of the tiny model (K = 128), with the same expected message.
SHAPE_AGNOSTIC = ("code -128", "nan scale", "inf scale", "negative scale", "weight_format")
LOADED_DEFECTS = {name: LAYER_DEFECTS[name] for name in SHAPE_AGNOSTIC} | {
    "fp_cols repeated": (_fp_columns([3, 3]), "fp_cols holds repeated columns"),
    "fp_cols range": (_fp_columns([200]), r"fp_cols must lie in \[0, 128\)"),
    "fp_cols negative": (_fp_columns([-1]), r"fp_cols must lie in \[0, 128\)"),
}


@pytest.mark.parametrize("defect", sorted(LOADED_DEFECTS))
def test_from_pretrained_refuses_an_invalid_layer_naming_it(shared, defect, tmp_path):
    """The third load path (after load_state_dict and llm_int8.checkpoint): the same validator, the same words."""
    edit, message = LOADED_DEFECTS[defect]
    source, target = shared["root"] / "llama-int8", tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    layer = "model.layers.1.mlp.down_proj"
    state = {leaf: tensors.pop(f"{layer}.{leaf}") for leaf in ("weight", "SCB", "weight_format")}
    edit(state)
    tensors.update({f"{layer}.{leaf}": t for leaf, t in state.items()})
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{layer}: .*{message}"):
        AutoModelForCausalLM.from_pretrained(target)


def test_from_pretrained_checks_layers_offloaded_to_disk_too(shared, tmp_path):
    """A layer mapped to "disk" holds meta tensors; its saved values are read back once and checked."""
    source, target = shared["root"] / "llama-int8", tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    layer = "model.layers.1.mlp.down_proj"
    tensors[f"{layer}.weight"][0, 7] = -128
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(CheckpointError, match=rf"{layer}: weight holds the code -128 \(first at row 0, column 7\)"):
        AutoModelForCausalLM.from_pretrained(target, device_map=device_map, offload_folder=tmp_path / "offload")
