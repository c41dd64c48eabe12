"""Safe checkpoints for quantized models: safetensors files, validated on load, written atomically.

    from llm_int8.checkpoint import save_checkpoint, load_checkpoint
    save_checkpoint(model, "model.safetensors")        # model converted by llm_int8.quantize_
    load_checkpoint(model, "model.safetensors")        # a model of the same architecture

Safety, point by point:

* Loading never runs code: a safetensors file is read with ``safetensors``; a PyTorch file
  (``torch.save`` output, zip or legacy) only with ``torch.load(weights_only=True)``. The format is
  recognised from the file's first bytes, not from its name.
* Every checkpoint this module writes carries a SHA-256 of its tensors (names, dtypes, shapes
  and bytes) in the safetensors metadata; a file whose tensors do not match it is reported corrupt.
* Before a state dict is used, each int8 linear layer in it (a ``weight`` with an ``SCB``) is
  checked by :func:`llm_int8.saved_format.validate_int8_layer`, the validator every load path
  shares: int8 codes in [-127, 127] of shape [N, K], float scales of shape [N] that are finite
  and >= 0, a row-major ``weight_format``, bias and calibrated columns of matching shapes. Given
  the module, every key, shape and dtype kind is checked against it as well.
* A save writes a temporary file in the destination's directory, fsyncs it, and renames it over
  the destination (``os.replace``, atomic on POSIX and Windows), then fsyncs the directory. A save
  interrupted at any point (an exception, a kill, a power cut after the rename's fsync) leaves
  the previous checkpoint whole; at worst a ``.<name>.*.tmp`` file remains beside it.

safetensors belongs to the ``hf`` extra (``pip install 'llm-int8[hf]'``); it is imported in
``_safetensors`` and nowhere else.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import secrets
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import saved_format
from .saved_format import CheckpointError

# Metadata keys written into every checkpoint (safetensors metadata is str -> str).
META_FORMAT = "format"  # "pt", as transformers writes it
META_VERSION = "llm_int8.version"
META_SHA256 = "llm_int8.sha256"
META_ALIASES = "llm_int8.aliases"  # JSON {dropped_key: kept_key} for tensors that share memory
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTO_MAGIC = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode
SAFETENSORS_HEADER_BYTES = 8  # little-endian u64 header length, then a JSON header starting with "{"
HASH_CHUNK_BYTES = 1 << 24


def _safetensors():
    """The ``safetensors`` package (with ``safetensors.torch`` loaded), or an ImportError naming its extra."""
    if importlib.util.find_spec("safetensors") is None:
        raise ImportError(
            "llm_int8.checkpoint needs the safetensors package: install it with pip install 'llm-int8[hf]'"
        )
    importlib.import_module("safetensors.torch")
    return importlib.import_module("safetensors")


# --------------------------------------------------------------------------------------------
# Validation


def _int8_layer_prefixes(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Prefixes ("" or "a.b.") of the int8 linear layers: those with an ``SCB`` or an int8 ``weight``."""
    prefixes = set()
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        prefix = prefix + "." if prefix else ""
        if leaf == saved_format.SCALE or (leaf == saved_format.WEIGHT and value.dtype == torch.int8):
            prefixes.add(prefix)
    return sorted(prefixes)


def _validate_int8_layer(state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    tensors = {leaf: state_dict.get(prefix + leaf) for leaf in saved_format.LAYER_KEYS}
    saved_format.validate_int8_layer(tensors, prefix[:-1] or "the top-level module")


def _validate_against_module(state_dict: Mapping[str, torch.Tensor], module: nn.Module, strict: bool) -> None:
    expected = module.state_dict(keep_vars=True)
    # A calibrated Linear8bitLt holds fp_cols/fp_weight; an uncalibrated one accepts them on load.
    optional = {p + leaf for p in _int8_layer_prefixes(expected) for leaf in (saved_format.FP_COLS, saved_format.FP_WEIGHT)}
    if strict:
        missing = sorted(set(expected) - set(state_dict) - optional)
        unexpected = sorted(set(state_dict) - set(expected) - optional)
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint does not match the module: missing keys {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}; build the same architecture (and convert it with "
                "llm_int8.quantize_ with the same config) before loading, or pass strict=False"
            )
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is None or key in optional:
            continue
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{key}: the checkpoint holds shape {tuple(value.shape)}, the module expects {tuple(target.shape)}"
            )
        if value.is_floating_point() != target.is_floating_point() or (
            not target.is_floating_point() and value.dtype != target.dtype
        ):
            raise CheckpointError(
                f"{key}: the checkpoint holds {value.dtype}, the module expects {target.dtype}; an int8 checkpoint "
                "loads into a model converted with llm_int8.quantize_, a float one into the float model"
            )


def validate_state_dict(
    state_dict: Mapping[str, torch.Tensor], module: nn.Module | None = None, strict: bool = True
) -> None:
    """Check a state dict before use; raise :class:`CheckpointError` saying what is wrong.

    Always: every value is a tensor, and every int8 linear layer (see the module docstring) is
    well formed with finite, non-negative scales. With ``module``: keys (when ``strict``), shapes
    and dtype kinds (integer dtypes exactly, float as float) match ``module.state_dict()``.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"a state dict must map names to tensors, got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"a state dict must map str names to tensors, got {key!r}: {type(value).__name__}; "
                "nested checkpoints (e.g. {'state_dict': ...}) must be unpacked first"
            )
        if value.is_meta:
            raise CheckpointError(
                f"{key} is a meta tensor (it has no data); load or materialize the weights before saving or loading"
            )
    for prefix in _int8_layer_prefixes(state_dict):
        _validate_int8_layer(state_dict, prefix)
    if module is not None:
        _validate_against_module(state_dict, module, strict)


# --------------------------------------------------------------------------------------------
# Saving


def _tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), HASH_CHUNK_BYTES):
            digest.update(memoryview(raw[start : start + HASH_CHUNK_BYTES].numpy()))
    return digest.hexdigest()


def _deduplicate(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous tensors to write, and {alias: kept_key} for entries that are the same tensor view.

    safetensors refuses tensors that share memory; tied weights (an embedding and the output head)
    are stored once and restored under both names on load. Overlapping but different views are
    copied.
    """
    tensors, aliases, seen = {}, {}, {}
    for key, value in state_dict.items():
        value = value.detach()
        view = None
        if value.numel():
            storage = value.untyped_storage().data_ptr()
            view = (value.device, storage, value.storage_offset(), value.dtype, tuple(value.shape), value.stride())
        if view is not None and view in seen:
            aliases[key] = seen[view]
            continue
        if view is not None:
            seen[view] = key
        tensors[key] = value.contiguous()  # a copy only when the view is not contiguous
    # Distinct views of one storage (e.g. two slices): give each its own memory.
    storages: dict[tuple, str] = {}
    for key, value in list(tensors.items()):
        if not value.numel():
            continue
        storage = (value.device, value.untyped_storage().data_ptr())
        if storage in storages:
            tensors[key] = value.clone()
        else:
            storages[storage] = key
    return tensors, aliases


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    obj: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``obj``'s state dict (or ``obj`` itself, a state dict) to ``path`` as safetensors, atomically.

    The state dict is validated first (a model with corrupt scales is never written). ``metadata``
    (str -> str) is stored in the file beside the checksum. Returns the path written.
    """
    safetensors = _safetensors()
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the path of the file to write, e.g. {path / 'model.safetensors'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: the directory {path.parent} does not exist; create it first")
    state_dict = obj.state_dict() if isinstance(obj, nn.Module) else obj
    validate_state_dict(state_dict)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str (safetensors stores text metadata only)")
    from . import __version__  # at call time: the package may import this module before defining it

    tensors, aliases = _deduplicate(state_dict)
    meta = dict(metadata or {})
    meta.update({
        META_FORMAT: "pt",
        META_VERSION: __version__,
        META_SHA256: _tensors_sha256(tensors),
        META_ALIASES: json.dumps(aliases, sort_keys=True),
    })
    # Created exclusively and like any new file (mode 0o666 less the umask); safetensors may
    # recreate it with 0o600, so that mode is put back before the rename.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        _fsync_path(path.parent, directory=True)
    return path


# --------------------------------------------------------------------------------------------
# Loading

#: What to do about a damaged checkpoint file, at the end of every message that reports one.
DAMAGED_FILE_REMEDY = "copy or download it again, or restore it from a backup (or re-save it, if you wrote it)"


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets; plus ``__metadata__``) and
    the byte where its data begins, after checking that the file holds every byte the header promises.

    The one reader of safetensors headers in the package (``load_state_dict`` here; the transformers
    integration checks every checkpoint shard with it before loading). Raises :class:`CheckpointError`
    naming the file, what is wrong (not safetensors, header unreadable, truncated) and what to do.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(SAFETENSORS_HEADER_BYTES)
        if len(prefix) < SAFETENSORS_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is not a safetensors file ({size} bytes, shorter than the 8-byte header length); it is "
                f"truncated or not a checkpoint: {DAMAGED_FILE_REMEDY}"
            )
        length = int.from_bytes(prefix, "little")
        if length > size - SAFETENSORS_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is not a readable safetensors file: its first 8 bytes announce a {length}-byte header but "
                f"the file has {size} bytes (truncated, or not a safetensors file): {DAMAGED_FILE_REMEDY}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path}: the safetensors header is unreadable (not JSON: {err}); the file is corrupt or not a "
            f"safetensors file: {DAMAGED_FILE_REMEDY}"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is unreadable (a JSON {type(header).__name__}, not a table of tensors); "
            f"the file is corrupt or not a safetensors file: {DAMAGED_FILE_REMEDY}"
        )
    data_start = SAFETENSORS_HEADER_BYTES + length
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(
                f"{path}: the safetensors header is unreadable (tensor {key!r} has no data offsets); the file is "
                f"corrupt: {DAMAGED_FILE_REMEDY}"
            )
        if data_start + offsets[1] > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {key!r} ends at byte {data_start + offsets[1]} but the file has {size} "
                f"bytes: {DAMAGED_FILE_REMEDY}"
            )
    return header, data_start


def _read_safetensors(path: Path, map_location) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    safetensors = _safetensors()
    read_safetensors_header(path)  # the messages for a damaged file: truncated, header unreadable
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (corrupt: {err}): {DAMAGED_FILE_REMEDY}"
        ) from err
    if map_location is not None:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, metadata


def _read_torch(path: Path, map_location) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, which torch.load(weights_only=True) "
            f"refuses to unpickle ({err}); re-save only the state dict, ideally with save_checkpoint"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: {err}); re-save it or restore a backup"
        ) from err
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors)")
    return dict(loaded)


def load_state_dict(path: str | os.PathLike, map_location=None, verify_checksum: bool = True) -> dict[str, torch.Tensor]:
    """Read and validate a state dict from a safetensors file or a ``torch.save`` file.

    The format is recognised from the first bytes. Tied entries saved once are restored under all
    their names. If the file carries this package's checksum it is verified (``verify_checksum``).
    Raises :class:`CheckpointError` for unreadable, corrupt or invalid contents.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_HEADER_BYTES + 1)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO_MAGIC):
        state_dict, metadata = _read_torch(path, map_location), {}
    elif len(head) == SAFETENSORS_HEADER_BYTES + 1 and head[SAFETENSORS_HEADER_BYTES:] == b"{":
        state_dict, metadata = _read_safetensors(path, map_location)
    else:
        raise CheckpointError(
            f"{path} is neither a safetensors file nor a torch.save file (it starts with {head[:8]!r}); "
            f"it may be truncated or corrupt: {DAMAGED_FILE_REMEDY}"
        )
    expected = metadata.get(META_SHA256)
    if verify_checksum and expected is not None and _tensors_sha256(state_dict) != expected:
        raise CheckpointError(
            f"{path}: the tensors do not match the checksum written with them; the file is corrupt, "
            "restore it from a backup or re-save it"
        )
    aliases = json.loads(metadata.get(META_ALIASES, "{}"))
    for alias, kept in aliases.items():
        if kept not in state_dict:
            raise CheckpointError(f"{path}: {alias} is stored as an alias of {kept}, which is missing; the file is corrupt")
        state_dict[alias] = state_dict[kept]
    validate_state_dict(state_dict)
    return state_dict


def load_checkpoint(module: nn.Module, path: str | os.PathLike, strict: bool = True, map_location=None):
    """Load a checkpoint into ``module`` after validating it against the module; returns load_state_dict's result.

    ``module`` must have the checkpoint's architecture: for an int8 checkpoint, a model converted
    with ``llm_int8.quantize_`` (the same config), or one built on the meta device and converted.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"load_checkpoint expects an nn.Module to load into, got {type(module).__name__}")
    state_dict = load_state_dict(path, map_location=map_location)
    validate_state_dict(state_dict, module, strict=strict)
    # A module on the meta device has no memory to copy into: its tensors are assigned instead.
    assign = any(t.is_meta for t in module.state_dict().values())
    tied = _tied_parameter_names(module)
    result = module.load_state_dict(state_dict, strict=strict, assign=assign)
    if assign:  # assignment gives each name its own Parameter: tie them again
        for names in tied:
            shared = module.get_parameter(names[0])
            for name in names[1:]:
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner), leaf, shared)
    return result


def _tied_parameter_names(module: nn.Module) -> list[list[str]]:
    """Groups of qualified names that refer to one Parameter object (e.g. a tied output head)."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
