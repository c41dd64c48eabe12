"""torch.distributed with int8 models: data-parallel LoRA (DDP) on 2 gloo processes (llm_int8.parallel).

Every multi-process test starts ``torchrun`` with 2 processes of 1 thread each on a tiny random Llama
(2 layers, hidden 64) with a byte-level tokenizer, so that it runs in seconds on a busy 2-core CPU;
docs/distributed.md has the same recipes measured on SmolLM2-135M. The launches are independent, so
they all start at once (:func:`launches`) and each test waits for its own: most of their time is
Python importing transformers and peft, and the processes overlap where one waits for another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import llm_int8
from llm_int8.parallel import frozen_state_names, keep_frozen_local

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "finetune_lora.py"
PROBE = REPO / "tests" / "ddp_probe.py"
# 3 optimizer steps (the first at learning rate 0: warmup), 2 windows of 16 tokens per process and step;
# threshold 3 puts a few input columns per matmul of the random model on the float path, differently
# in each micro-batch, so the decomposition is part of what must agree.
TRAIN_ARGS = [
    "--steps", "3", "--batch", "2", "--seq-len", "16", "--held-out", "4", "--lora-dropout", "0", "--threshold", "3",
]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


LAUNCH_TIMEOUT_S = 600  # all launches at once, on a busy 2-core machine


class Launch:
    """A command started now, in the background; :meth:`result` waits for it."""

    def __init__(self, args: list, cwd: Path):
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen(self.args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._result = None

    def result(self) -> tuple[int, str, str]:
        if self._result is None:
            try:
                out, err = self.proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"{' '.join(self.args)} did not finish in {LAUNCH_TIMEOUT_S} s:\n{err[-4000:]}")
            self._result = (self.proc.returncode, out, err)
        return self._result

    def check(self) -> None:
        code, out, err = self.result()
        assert code == 0, f"{' '.join(self.args)} failed:\n{out[-3000:]}\n{err[-6000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def torchrun(script: Path, *args, cwd: Path, nproc: int = 2) -> Launch:
    return Launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script,
                   *args], cwd)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A float32 random 2-layer Llama with a byte-level tokenizer (256 tokens), saved as a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    byte_level = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level).save_pretrained(folder)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


# launch -> the tests (name prefixes) that need it
LAUNCH_USERS = {
    "ddp": ("test_ddp_lora",), "one": ("test_ddp_lora",), "tp": ("test_tp_layers", "test_tp_model", "test_tp_bad"),
    "missing": ("test_tp_a_rank",),
}


@pytest.fixture(scope="module")
def launches(request, tiny_checkpoint, tmp_path_factory):
    """The multi-process runs the selected tests of this module need, started together: name -> (Launch, folder)."""
    selected = [item.name for item in request.session.items if item.module is request.module]
    needed = {name for name, users in LAUNCH_USERS.items() if any(t.startswith(users) for t in selected)}
    ddp, tp, missing = (tmp_path_factory.mktemp(name) for name in ("ddp", "tp", "missing"))
    commands = {
        "ddp": (lambda: torchrun(PROBE, ddp / "probe{rank}.json", "--", "--model", tiny_checkpoint, *TRAIN_ARGS,
                                 "--out", ddp / "ddp", "--summary", ddp / "ddp.json", cwd=ddp), ddp),
        "one": (lambda: Launch([sys.executable, EXAMPLE, "--model", tiny_checkpoint, *TRAIN_ARGS, "--grad-accum", "2",
                                "--out", ddp / "one", "--summary", ddp / "one.json"], ddp), ddp),
        "tp": (lambda: torchrun(REPO / "tests" / "tp_worker.py", tiny_checkpoint, tp / "rank{rank}.json", cwd=tp), tp),
        "missing": (lambda: torchrun(REPO / "tests" / "tp_worker.py", tiny_checkpoint, "--missing-rank=1", cwd=missing),
                    missing),
    }
    started = {name: (start(), folder) for name, (start, folder) in commands.items() if name in needed}
    yield started
    for launch, _ in started.values():
        launch.stop()


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter-llm-int8" / "adapter_model.safetensors")


def test_ddp_lora_equals_one_process_and_syncs_only_the_adapter(launches):
    """2 processes x 2 windows == 1 process x 2 windows x 2 accumulation steps, bit for bit.

    Why exactly: each micro-batch (the same windows in the same order: rank r takes batch 2k+r, the
    single process takes them one after the other) runs the same computation on the same rows; DDP's
    gradient is (g0 + g1) / 2 against the accumulated g0 / 2 + g1 / 2 (halving is exact in binary
    floating point and a two-term sum is commutative); the loss scales are the same global token count;
    clipping and AdamW then see the same numbers. So the bound is 0 (with dropout 0; with dropout the
    ranks draw other masks).
    """
    launches["ddp"][0].check()
    launches["one"][0].check()
    tmp_path = launches["ddp"][1]
    ddp, one = (json.loads((tmp_path / f"{run}.json").read_text()) for run in ("ddp", "one"))
    assert (ddp["world_size"], one["world_size"], ddp["global_batch"], one["global_batch"]) == (2, 1, 4, 4)
    assert len(ddp["train_loss"]) == 3 and ddp["train_loss"] == one["train_loss"]
    assert ddp["held_out_after"] == one["held_out_after"] != ddp["held_out_before"]
    adapter_ddp, adapter_one = _adapter(tmp_path / "ddp"), _adapter(tmp_path / "one")
    assert adapter_ddp.keys() == adapter_one.keys() and len(adapter_ddp) == 2 * 4 * 2  # A, B x q/k/v/o x 2 layers
    assert all(torch.equal(adapter_ddp[k], adapter_one[k]) for k in adapter_ddp)
    # the adapter written by rank 0 reloads onto a fresh int8 model with the trained model's loss
    assert ddp["held_out_reloaded"] == ddp["held_out_after"]

    for rank in range(2):
        probe = json.loads((tmp_path / f"probe{rank}.json").read_text())
        assert probe["threads"] == 1
        assert probe["adapter_saves"] == (1 if rank == 0 else 0)
        # synchronised: the LoRA parameters and nothing else; the frozen state (int8 weights, SCB,
        # embeddings, norms) is ignored by DDP, so never broadcast, at construction or before a forward
        assert probe["synced_param_names"] and all(".lora_" in n for n in probe["synced_param_names"])
        assert probe["synced_param_bytes"] == probe["trainable_param_bytes"]
        int8_weights = [n for n in probe["ignored"] if n.endswith(("_proj.weight", "_proj.base_layer.weight"))]
        assert len(int8_weights) == 7 * 2  # q, k, v, o, gate, up, down x 2 layers
        assert sum(n.endswith(".SCB") for n in probe["ignored"]) == 7 * 2
        assert probe["frozen_broadcast_bytes"] == 0
        # what is broadcast: the adapter once at construction, and the buffers outside int8 layers (the
        # rotary inv_freq) at construction and before each of the 3 forwards
        assert probe["other_buffer_bytes"] > 0
        assert probe["broadcast_bytes"] == probe["synced_param_bytes"] + (1 + 3) * probe["other_buffer_bytes"]
        assert probe["broadcast_bytes"] < probe["model_state_bytes"] / 8
        # the gradient all-reduce carries each adapter gradient once per optimizer step
        assert probe["allreduce_bytes"] == 3 * probe["trainable_param_bytes"]


# ------------------------------------------------------------------------------------------------
# Tensor parallel (tests/tp_worker.py: every check runs in one torchrun launch, 2 processes)


@pytest.fixture(scope="module")
def tp_results(launches) -> list[dict]:
    launch, folder = launches["tp"]
    launch.check()
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_tp_layers_shard_codes_and_scales(tp_results):
    """Column-parallel: weight rows with their SCB entries, outputs bit-identical to the whole layer.
    Row-parallel: weight columns with the whole SCB; each rank quantizes its own x slice, so the sum
    differs from the whole layer, but never by more than the derived half-step bound (tp_worker.py)."""
    for out in tp_results:
        for fp in ("", "_fp"):  # without and with calibrated fp columns (in both halves of K)
            assert out["colwise_equal" + fp] and out["colwise_scb_is_slice" + fp]
            assert out["rowwise_codes_are_slice" + fp] and out["rowwise_scb_whole" + fp]
            assert out["rowwise_within_bound" + fp] and out["rowwise_differs" + fp]
        assert out["rowwise_fp_cols_local"]


def test_tp_model_logits_perplexity_and_bytes(tp_results):
    """The tiny Llama split over 2 ranks (q/k/v/gate/up column-, o/down row-parallel).

    Logits bound: call A the one-process int8 model, B the split one, C the same int8 weights with x
    not quantized. A and B differ only in how x is rounded before the row-parallel matmuls, and B's
    rounding steps (shard absmax / 127) are never larger than A's (row absmax / 127), so
    |B - A| <= |B - C| + |A - C| <= ~2 |A - C| (relative Frobenius norm of the logits).
    Perplexity: within the standard error of the mean per-token NLL of the windows.
    """
    for out in tp_results:
        assert out["sharded_layers"] == 7 * 2
        assert out["bytes_after"] * 2 == out["bytes_before"]  # each rank holds half the int8 weight bytes
        assert out["scb_bytes_after"] < out["scb_bytes_before"]
        assert 0 < out["rel_tp_vs_one"] <= 2 * out["rel_one_vs_weight_only"]
        assert abs(out["nll_tp"] - out["nll_one"]) <= out["nll_std_error"]
        assert out["logits_tp_equal_on_ranks"]


def test_tp_bad_setups_fail_loudly_on_every_rank(tp_results):
    for out in tp_results:
        assert "out_features = 5 is not divisible by the tensor-parallel world size 2" in out["indivisible"]
        assert "in_features = 5 is not divisible by the tensor-parallel world size 2" in out["indivisible_rowwise"]
        assert out["model_mismatch"].startswith(
            "RuntimeError: the ranks hold different models (rank 0: 42 tensors, 14 int8 layers, rank 1: 39 tensors, "
            "13 int8 layers)")
        assert out["not_int8"].startswith("TypeError: rowwise shards a Linear8bitLt, got Linear")
        assert "already sharded" in out["twice"]
        assert "rank 1 quantizes with threshold 4.0 where rank 0 uses 3.0 (layer model.layers.0.mlp.up_proj)" in \
            out["threshold_mismatch"]
        assert "rank 1's weights differ from rank 0's (1 tensors: model.layers.1.self_attn.k_proj.weight)" in \
            out["weights_mismatch"]
        assert "rank 1 quantizes with threshold 4.0" in out["ddp_threshold_mismatch"]
        assert "3 attention heads and 3 key/value heads, which 2 ranks cannot split evenly" in out["heads"]
        assert out["mlp_only_plan_keys"] == [f"model.layers.*.mlp.{p}_proj" for p in ("down", "gate", "up")]


def test_tp_a_rank_without_its_checkpoint_stops_the_launch(launches, tiny_checkpoint):
    """Rank 1 has no checkpoint (its folder is missing) while rank 0 loads and goes on to shard, where it
    waits for rank 1 in the first collective: the launch must end (not hang until LAUNCH_TIMEOUT_S) with
    rank 1's error naming the missing folder, and torchrun naming rank 1 as the first failure."""
    code, out, err = launches["missing"][0].result()
    assert code != 0
    assert f"{tiny_checkpoint}-missing" in err and "OSError" in err
    assert "tensor_parallel returned on a rank" not in err
    root = err[err.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1\b", root), root[:2000]


# ------------------------------------------------------------------------------------------------
# In one process (a gloo group of 1): what keep_frozen_local changes in DDP


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _lora_like_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(llm_int8.Linear8bitLt.from_weight(torch.randn(16, 8), torch.randn(16)), nn.Linear(16, 4))
    model[0].bias.requires_grad_(False)
    return model


def test_keep_frozen_local_takes_int8_state_out_of_ddp(single_process_group, monkeypatch):
    broadcast = []
    real = dist._broadcast_coalesced
    monkeypatch.setattr(dist, "_broadcast_coalesced", lambda group, tensors, *a: (broadcast.extend(tensors), real(group, tensors, *a))[1])
    DDP = torch.nn.parallel.DistributedDataParallel

    plain = _lora_like_model()
    DDP(plain)
    assert any(t.dtype == torch.int8 for t in broadcast)  # by default DDP broadcasts the int8 weight

    broadcast.clear()
    model = _lora_like_model()
    names = keep_frozen_local(model)
    assert names == frozen_state_names(model) == ["0.weight", "0.bias", "0.SCB", "0.weight_format"]
    ddp = DDP(model)
    assert not any(t.dtype == torch.int8 or t.dtype == torch.uint8 for t in broadcast)
    assert sum(t.numel() for t in broadcast) == 16 * 4 + 4  # the trainable Linear only
    ddp(torch.randn(3, 8)).sum().backward()
    assert model[1].weight.grad is not None and model[0].weight.grad is None


def test_keep_frozen_local_refuses_a_model_without_trainable_parameters():
    model = _lora_like_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter.*get_peft_model"):
        keep_frozen_local(model)
