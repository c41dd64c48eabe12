"""Safe checkpoints: round trips, validation before use, corrupt files, atomic saves."""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from torch import nn

import llm_int8
from llm_int8 import Linear8bitLt
from helpers import LAYER_DEFECTS, layer_state
from llm_int8.checkpoint import CheckpointError, load_checkpoint, load_state_dict, save_checkpoint

pytestmark = pytest.mark.usefixtures("restore_torch_rng")  # leave the global RNG as found

VOCAB, HIDDEN = 50, 24


class TinyLM(nn.Module):
    """An embedding, two linear layers and an output head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def quantized_model(seed: int, threshold: float = 6.0) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM()
    llm_int8.quantize_(model, llm_int8.Int8Config(threshold=threshold))
    return model


@pytest.fixture
def saved(tmp_path):
    """(model, path): a quantized TinyLM saved with save_checkpoint."""
    model = quantized_model(0)
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    return model, path


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_round_trip_into_a_fresh_quantized_model(tmp_path, threshold):
    model = quantized_model(0, threshold)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    other = quantized_model(1, threshold)
    load_checkpoint(other, path)
    assert_same_state(model, other)
    assert other.head.weight is other.embed.weight  # the tie survives the load
    ids = torch.randint(VOCAB, (3, 7))
    assert torch.equal(model(ids), other(ids))


def test_tied_weights_are_stored_once_and_restored_under_both_names(saved):
    model, path = saved
    stored = safetensors.torch.load_file(path)
    assert ("embed.weight" in stored) != ("head.weight" in stored)
    state = load_state_dict(path)
    assert torch.equal(state["embed.weight"], state["head.weight"])


def test_load_into_a_meta_model(saved):
    model, path = saved
    with torch.device("meta"):
        other = TinyLM()
    llm_int8.quantize_(other)
    load_checkpoint(other, path)
    assert not any(p.is_meta for p in other.parameters())
    assert not any(layer.SCB.is_meta for layer in (other.up, other.down))
    assert other.head.weight is other.embed.weight
    ids = torch.randint(VOCAB, (2, 5))
    assert torch.equal(model(ids), other(ids))


def test_meta_linear_gets_its_weight_format_on_load():
    state = Linear8bitLt(8, 4).state_dict()
    layer = Linear8bitLt(8, 4, device="meta")
    layer.load_state_dict(state, assign=True)
    assert not layer.weight_format.is_meta


def test_calibrated_columns_round_trip(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = Linear8bitLt.from_linear(linear)
    layer.set_fp_columns(torch.tensor([3, 11]), linear.weight)
    path = save_checkpoint(layer, tmp_path / "layer.safetensors")
    fresh = Linear8bitLt(16, 8)
    load_checkpoint(fresh, path)
    assert torch.equal(fresh.fp_cols, layer.fp_cols) and torch.equal(fresh.fp_weight, layer.fp_weight)
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), layer(x))


def test_user_metadata_is_stored(saved, tmp_path):
    model, _ = saved
    path = save_checkpoint(model, tmp_path / "meta.safetensors", metadata={"run": "42"})
    with safetensors.safe_open(path, "pt") as reader:
        assert reader.metadata()["run"] == "42"


def test_saved_file_gets_ordinary_permissions(saved):
    _, path = saved
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_torch_save_file_loads_weights_only(saved, tmp_path):
    model, _ = saved
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other = quantized_model(1)
    load_checkpoint(other, path)
    assert_same_state(model, other)


class _NotATensor:
    pass


def test_torch_file_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(path)


def test_raw_pickle_is_not_unpickled(tmp_path):
    path = tmp_path / "raw.bin"
    path.write_bytes(pickle.dumps({"w": _NotATensor()}, protocol=2))
    with pytest.raises(CheckpointError):
        load_state_dict(path)


# --------------------------------------------------------------------------------------------
# Corrupt and truncated files


@pytest.mark.parametrize("keep", [0, 4, 8, 20, 0.5, 0.9, -1])
def test_truncated_safetensors_is_a_clear_error(saved, keep):
    _, path = saved
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"truncated.*copy or download it again, or restore it from a backup"):
        load_state_dict(path)


def test_truncated_torch_file_is_a_clear_error(saved, tmp_path):
    model, _ = saved
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict(path)


def test_flipped_byte_in_tensor_data_fails_the_checksum(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not tensors")
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a torch.save file"):
        load_state_dict(path)


def test_missing_file_and_missing_directory(tmp_path, saved):
    model, _ = saved
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(model, tmp_path / "no" / "such" / "dir.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(model, tmp_path)


# --------------------------------------------------------------------------------------------
# Validation before use: files written behind our back (no checksum), one defect each


@pytest.mark.parametrize("defect", sorted(LAYER_DEFECTS))
def test_invalid_contents_are_refused_before_use(tmp_path, defect):
    edit, message = LAYER_DEFECTS[defect]
    state = layer_state()
    edit(state)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, path)
    layer = Linear8bitLt(8, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(layer, path)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint must not touch the module"


def test_save_refuses_corrupt_scales(tmp_path):
    layer = Linear8bitLt(8, 4)
    layer.SCB[0] = float("nan")
    with pytest.raises(CheckpointError, match="finite and >= 0"):
        save_checkpoint(layer, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_foreign_checkpoint_without_checksum_loads(tmp_path):
    """bitsandbytes-style files (same keys, no llm_int8 metadata) load after validation."""
    state = layer_state()
    path = tmp_path / "bnb.safetensors"
    safetensors.torch.save_file(state, path)
    layer = Linear8bitLt(8, 4)
    load_checkpoint(layer, path)
    assert torch.equal(layer.weight, state["weight"]) and torch.equal(layer.SCB, state["SCB"])


def test_mismatch_with_the_module(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(Linear8bitLt(HIDDEN, VOCAB), path)
    torch.manual_seed(0)
    float_model = TinyLM()  # not converted: the checkpoint's int8 weights do not fit
    with pytest.raises(CheckpointError, match="llm_int8.quantize_"):
        load_checkpoint(float_model, path)


def test_shape_mismatch(tmp_path):
    path = save_checkpoint(Linear8bitLt(8, 4), tmp_path / "l.safetensors")
    with pytest.raises(CheckpointError, match=r"shape \(4, 8\), the module expects \(4, 9\)"):
        load_checkpoint(Linear8bitLt(9, 4), path)


# --------------------------------------------------------------------------------------------
# Atomic saves: an interrupted save leaves the previous checkpoint intact


def test_save_failing_midway_keeps_the_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()
    real_save_file = safetensors.torch.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(quantized_model(7), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name], "the temporary file is removed"
    other = quantized_model(1)
    load_checkpoint(other, path)
    assert_same_state(model, other)


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import safetensors.torch
    import torch
    from llm_int8.checkpoint import save_checkpoint

    real_save_file = safetensors.torch.save_file

    def save_then_hang(tensors, filename, metadata=None):
        # Write the real bytes, keep the first half (a write cut short), then wait to be killed.
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        print("midway", flush=True)
        time.sleep(600)

    safetensors.torch.save_file = save_then_hang
    big = {"weight": torch.randint(-127, 128, (2048, 4096), dtype=torch.int8), "SCB": torch.rand(2048)}
    save_checkpoint(big, sys.argv[1])
    """
)


def test_save_killed_midway_keeps_the_previous_checkpoint(saved):
    """A writer process SIGKILLed in the middle of a save: the old file is whole and loads."""
    model, path = saved
    before = path.read_bytes()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = writer.stdout.readline()
        assert line.strip() == "midway", writer.stderr.read()
        temporaries = [p for p in path.parent.iterdir() if p.name != path.name]
        assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0, "the save was under way"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    other = quantized_model(1)
    load_checkpoint(other, path)
    assert_same_state(model, other)
    # The half-written temporary is left behind and is never taken for a checkpoint.
    leftover = next(p for p in path.parent.iterdir() if p.name != path.name)
    assert leftover.name.startswith(f".{path.name}.") and leftover.suffix == ".tmp"
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(leftover)


def test_concurrent_saves_to_one_path_leave_one_whole_file(tmp_path):
    """Two processes saving different models to one path: the result is one of them, whole."""
    path = tmp_path / "shared.safetensors"
    script = textwrap.dedent(
        """
        import sys, torch
        from llm_int8.checkpoint import save_checkpoint
        seed = int(sys.argv[2])
        torch.manual_seed(seed)
        for _ in range(5):
            save_checkpoint({"w": torch.full((256, 256), float(seed))}, sys.argv[1])
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(seed)]) for seed in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    state = load_state_dict(path)
    assert float(state["w"][0, 0]) in (1.0, 2.0)
    assert torch.equal(state["w"], torch.full((256, 256), float(state["w"][0, 0])))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "safetensors" else real_find_spec(name, *args)
    )
    with pytest.raises(ImportError, match=r"pip install 'llm-int8\[hf\]'"):
        save_checkpoint(Linear8bitLt(4, 2), tmp_path / "x.safetensors")
