"""Load a GGUF checkpoint tensor by tensor, straight into an int8 (or float) transformers model.

transformers loads a GGUF file (``from_pretrained(..., gguf_file=...)``) by dequantizing every tensor
into one float state dict and then building the model from it, so the whole float model exists,
often twice over, before :func:`llm_int8.integrations.hf.quantize_model` can shrink it (the measured
peaks are in ``docs/scale.md``; ``benchmarks/bench_load.py --gguf`` prints them). :func:`load_gguf` never
holds the float model:

1. the model is built on the meta device from the config transformers derives from the GGUF
   metadata (``AutoConfig.from_pretrained(dir, gguf_file=...)``, the same code path), with its
   non-persistent buffers (rotary frequencies) real;
2. with a quantization config, its linear layers are swapped for meta ``Linear8bitLt`` by the same
   function ``quantize_model`` uses (:func:`llm_int8.integrations.hf.prepare_int8_model`), so the
   same layers are converted and the same ones (embeddings, head, tied layers) stay float;
3. each tensor is read from the memory-mapped file and dequantized with the ``gguf`` package (what
   transformers' GGUF loader calls, on the same bytes), renamed with transformers' own GGUF name map
   and tensor processors (``get_gguf_hf_weights_map``, ``TENSOR_PROCESSORS``), and put in place; a
   linear weight is quantized to int8 at once through ``Linear8bitLt``'s state-dict loading (the
   ``F.quantize_weight`` that ``quantize_model`` runs), and its float copy dropped. The pages of the
   file each tensor was read from are handed back to the kernel (:mod:`llm_int8._memory`), and large
   tensors are dequantized a slab of rows at a time into their final storage.

So the peak is the int8 model plus one float linear weight, one slab of a large float tensor and the
interpreter. The result is bit-identical to ``quantize_model`` applied to transformers' float32 GGUF
load (``tests/test_gguf.py``), and ``save_pretrained`` writes the same bitsandbytes-format checkpoint.

It imports transformers (as the other modules of ``integrations/`` do) and is the only module importing
``gguf``: it uses transformers' GGUF reader, config path and name mapping rather than a copy of them, and
lives here, beside ``hf.py``, so the core never imports either.
"""

from __future__ import annotations

import importlib.util
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

for _module, _extra in (("transformers", "hf"), ("gguf", "hf")):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"llm_int8.integrations.gguf needs {_module}; install the extra: pip install 'llm-int8[{_extra}]'")

import numpy as np
import torch
from accelerate import init_empty_weights
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
from gguf.quants import quant_shape_to_byte_shape
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

from .. import _memory
from .. import functional as F
from ..checkpoint import DAMAGED_FILE_REMEDY
from ..nn import Linear8bitLt
from ..saved_format import weight_format_tensor
from .hf import LLMInt8Config, finish_int8_model, prepare_int8_model, tie_int8_head

# Large tensors (embeddings, an untied head) are dequantized this many elements at a time (64 MiB of
# float32), straight into their final storage: the gguf package's numpy dequantizers allocate several
# temporaries the size of their input.
DEQUANT_SLAB_ELEMENTS = 1 << 22


def gguf_config(path: str | os.PathLike):
    """The transformers config of a GGUF file, as ``from_pretrained(dir, gguf_file=...)`` derives it."""
    path = Path(path)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf(
    path: str | os.PathLike,
    quantization_config: LLMInt8Config | None = None,
    *,
    config=None,
    dtype: torch.dtype = torch.float32,
    release_pages: bool = True,
    progress: Callable[[str], Callable[[Iterable], Iterable]] | None = None,
):
    """A transformers causal LM built tensor by tensor from the GGUF file ``path``, in eval mode.

    quantization_config: an :class:`LLMInt8Config` gives the int8 model (linear layers converted as
        ``quantize_model`` converts them, quantized as they stream in); ``None`` the float model.
    config: the model's transformers config, if already known (default: derived from the file's
        metadata, as transformers does).
    dtype: the float dtype of every tensor that stays float (embeddings, norms, head, biases).
    release_pages: give each tensor's pages of the mapped file back once it is converted (Linux).
    progress: a factory ``description -> (iterable -> iterable)`` wrapped around the tensors as they
        load (a tqdm bar, as the CLI's ``--no-progress`` factories give); ``None`` shows nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if quantization_config is not None and not isinstance(quantization_config, LLMInt8Config):
        raise TypeError(f"quantization_config must be an LLMInt8Config or None, got {type(quantization_config).__name__}")
    architecture, tensors = _tensor_table(path)
    config = gguf_config(path) if config is None else config
    with init_empty_weights(include_buffers=False):  # parameters on meta, rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)  # gguf name -> transformers name, on the float skeleton
    model.tie_weights()
    expected = [name for name, _ in model.named_parameters()]  # a tied head is the embedding: listed once
    quantizer = prepare_int8_model(model, quantization_config) if quantization_config is not None else None

    loaded = set()
    parsed = {"tensors": {}}  # where transformers' processors would put tensors they split (MoE experts)
    for info in tensors if progress is None else progress(f"loading {path.name}")(tensors):
        values = _dequantize(info.data, info.qtype)
        result = processor.process(weights=values, name=info.name, tensor_key_mapping=names, parsed_parameters=parsed)
        if parsed["tensors"]:
            raise NotImplementedError(
                f"{path.name}: the {architecture} tensor processor splits {info.name} into several tensors, "
                "which the streaming loader does not support; load it with from_pretrained(..., gguf_file=...)"
            )
        if result.name in names:
            tensor = torch.from_numpy(np.ascontiguousarray(result.weights)).to(dtype)
            _put(model, names[result.name], tensor)
            loaded.add(names[result.name])
        del values, result
        if release_pages:
            _memory.release_pages(info.data.ctypes.data, info.data.nbytes)
            _memory.trim_heap()  # the float temporaries' heap pages, which the int8 results would pin
    del tensors

    model.tie_weights()  # a tied head takes the loaded embedding
    if quantizer is not None:
        tie_int8_head(model)  # (quantize_head=True: and the int8 head the int8 embedding's scales)
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise ValueError(
            f"{path.name} holds no tensor for {len(missing)} of the model's weights ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): the file does not match the {config.model_type} architecture"
        )
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the streaming loader left {', '.join(left[:4])} on the meta device; this is a bug")
    if quantizer is not None:
        finish_int8_model(model, quantizer)
    _memory.trim_heap()
    return model.eval()


class _Tensor(NamedTuple):
    name: str
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, bytes per row] (quant_shape_to_byte_shape): a view of the mapped file


def check_gguf_file(path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` if it is not a readable GGUF file: not GGUF, a header cut short, or
    tensor data past the end of the file (truncated); the loaders call it before reading any tensor."""
    _tensor_table(Path(path))


def _tensor_table(path: Path) -> tuple[str, list[_Tensor]]:
    """(architecture, every tensor of the file in file order) from transformers' GGUF header reader,
    each tensor's bytes checked to lie inside the file (see :func:`check_gguf_file`).

    Its public ``GgufHeader`` refuses ggml types it has no packed kernel for (Q5_0, which the Qwen2.5
    files use), and ``gguf.GGUFReader`` turns each of a 151,936-token vocabulary's strings into numpy
    views (~10 s per load); the reader's metadata and tensor-table functions do neither.
    """
    size = path.stat().st_size
    blob = np.asarray(_mapped(str(path))) if size else np.zeros(0, np.uint8)  # (an empty file cannot be mapped)
    # (a plain ndarray view: numpy's memmap subclass costs per slice)
    if bytes(blob[:4]) != b"GGUF":
        raise ValueError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes; {size} bytes): give the path of "
            f"a .gguf file, or, if it is one, it is damaged: {DAMAGED_FILE_REMEDY}"
        )
    try:
        metadata, count, pos = _read_metadata(blob, str(path))
        entries, pos = _read_tensor_table(blob, count, pos)
        architecture = metadata["general.architecture"]
        qtypes = [GGMLQuantizationType(ggml_type) for _, _, ggml_type, _ in entries]
    except (struct.error, IndexError, ValueError, KeyError, UnicodeDecodeError, OverflowError) as err:
        raise ValueError(
            f"{path} is not a readable GGUF file: its header is cut short or corrupt ({err}); "
            f"{DAMAGED_FILE_REMEDY}"
        ) from None
    alignment = metadata.get("general.alignment", 32)
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for (name, shape, _, offset), qtype in zip(entries, qtypes):
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        start = data_start + offset
        nbytes = math.prod(shape) // block * block_bytes
        if start + nbytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {name} needs bytes up to {start + nbytes} but the file has {size} bytes; "
                f"{DAMAGED_FILE_REMEDY}"
            )
        data = blob[start : start + nbytes].reshape(quant_shape_to_byte_shape(shape, qtype))
        tensors.append(_Tensor(name, qtype, data))
    return architecture, tensors


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values of one tensor, dequantized by the gguf package as transformers' GGUF loader
    does, a slab of rows at a time when large."""
    if data.ndim != 2 or data.nbytes <= DEQUANT_SLAB_ELEMENTS // 4:
        values = dequantize(data, qtype)
        # float tensors come back as views of the read-only file mapping: copy them out
        return values.astype(np.float32, copy=np.shares_memory(values, data))
    first = dequantize(data[:1], qtype)  # one row: the row length in elements
    out = np.empty((data.shape[0], first.shape[1]), dtype=np.float32)
    step = max(1, DEQUANT_SLAB_ELEMENTS // first.shape[1])
    for row in range(0, data.shape[0], step):
        out[row : row + step] = dequantize(data[row : row + step], qtype)
    return out


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Load one tensor into ``model`` by its qualified name; an int8 layer's float weight is quantized
    (the same ``F.quantize_weight`` as ``quantize_model``) and loaded with its scales."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    current = getattr(module, leaf, None)
    if not isinstance(current, torch.Tensor):
        raise ValueError(f"the GGUF tensor for {name} has no place in the model")
    if tuple(tensor.shape) != tuple(current.shape):
        raise ValueError(f"the GGUF tensor for {name} has shape {tuple(tensor.shape)}, the model expects {tuple(current.shape)}")
    if isinstance(module, Linear8bitLt) and leaf == "weight":
        # quantized here rather than by the layer's state-dict loading, so that a refusal (NaN/Inf) names the layer
        weight_int8, weight_absmax = F.quantize_weight(tensor, name)
        tensor = {leaf: weight_int8, "SCB": weight_absmax, "weight_format": weight_format_tensor()}
    else:
        tensor = {leaf: tensor}
    errors = module.load_state_dict(tensor, strict=False, assign=True)
    if errors.unexpected_keys:
        raise ValueError(f"cannot load the GGUF tensor for {name}: {errors}")
