"""Hugging Face transformers integration: ``from_pretrained(..., quantization_config=LLMInt8Config())``.

The quantizer; its config is ``hf_config.py``. Like the other modules of ``integrations/`` (and
``eval/models.py``) it imports transformers (and, through it, accelerate); the core never does.
``import llm_int8`` imports it when transformers is imported (:func:`llm_int8.integrations.call_when_imported`),
which registers the ``llm_int8`` quantization method with transformers, so that

* ``AutoModelForCausalLM.from_pretrained(path, quantization_config=LLMInt8Config())`` builds the
  model skeleton on the meta device, swaps its ``nn.Linear`` / GPT-2 ``Conv1D`` layers for
  ``llm_int8.nn.Linear8bitLt`` (via ``llm_int8.quantize_``), and quantizes each weight as it
  streams in from the checkpoint: the float model never exists in memory as a whole;
* ``save_pretrained`` writes the int8 ``weight``, float32 ``SCB`` and ``weight_format`` tensors
  (bitsandbytes' keys) and the config, and ``from_pretrained`` on that folder needs no config;
* accelerate device maps (``"auto"``, explicit maps with ``"cpu"`` and ``"disk"`` entries,
  ``max_memory``) place int8 layers anywhere: they stay int8 on every device, disk included;
* once a weight is quantized, the pages of the memory-mapped checkpoint shard it was read from are
  dropped from the process, and the heap space of the quantization's temporaries is returned
  (Linux; see :class:`llm_int8._memory.CheckpointPages`), so a load's peak RSS follows
  the int8 model, not the float checkpoint.

Models transformers cannot load with a quantization config (GGUF files) are quantized after
loading with :func:`quantize_model`, which records the config so that ``save_pretrained`` works too.
"""

from __future__ import annotations

import os
import weakref
from types import SimpleNamespace

from .hf_config import QUANT_METHOD, LLMInt8Config  # (first: raises the ImportError that says what transformers lacks)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers.core_model_loading import ConversionOps, dot_natural_key  # noqa: E402
from transformers.integrations.accelerate import offload_weight  # noqa: E402
from transformers.quantizers import HfQuantizer, register_quantizer  # noqa: E402
from transformers.quantizers.base import get_keys_to_not_convert  # noqa: E402
from transformers.quantizers.quantizers_utils import get_module_from_name  # noqa: E402

from .. import _memory, saved_format  # noqa: E402
from .. import functional as F  # noqa: E402
from ..checkpoint import read_safetensors_header  # noqa: E402
from ..convert import (  # noqa: E402
    Int8Config, QuantizeReport, default_skip_modules, is_convertible, linear_weight, memory_footprint, output_head_name,
    quantize_, replace_modules, share_tied_scales,
)
from ..nn import Embedding8bit, Linear8bitLt  # noqa: E402

# Quantize-on-load gives memory back after each weight it quantizes: the weight's pages of the mapped
# checkpoint (llm_int8._memory.CheckpointPages) and the C heap's free pages (llm_int8._memory.trim_heap).
# False keeps transformers' own behaviour: the pages stay resident as long as the shard stays mapped.
RELEASE_MEMORY_WHILE_LOADING = True



# --------------------------------------------------------------------------------------------
# Quantize-on-load: one checkpoint weight in, the int8 weight and its scales out


class _QuantizeWeightOnLoad(ConversionOps):
    """Turns a float ``<module>.weight`` from the checkpoint into ``weight``, ``SCB``, ``weight_format``.

    transformers calls it once per weight as the checkpoint streams in (sequentially when
    quantizing on the fly), on the weight's target device, so only one float weight is alive.
    """

    def __init__(self, hf_quantizer: "LLMInt8HfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        (name, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        module_name = name.rpartition(".")[0]
        value = self.hf_quantizer.oriented(module_name, value)
        try:
            weight_int8, weight_absmax = F.quantize_weight(value, name)
        except ValueError as err:
            # transformers would log this into its load report and raise a generic error at the end; the
            # refusal is collected instead (every bad layer, not only the first) and raised, as it is, once
            # loading is over. Zeros stand in meanwhile; the model is never returned.
            self.hf_quantizer.refused.append(str(err))
            weight_int8 = torch.zeros(value.shape, dtype=torch.int8, device=value.device)
            weight_absmax = torch.zeros(value.shape[0], dtype=torch.float32, device=value.device)
        weight_format = saved_format.weight_format_tensor(weight_int8.device)
        quantized = {name: weight_int8, f"{module_name}.SCB": weight_absmax}
        head = self.hf_quantizer.int8_embeddings.get(module_name)
        if head is None:
            quantized[f"{module_name}.weight_format"] = weight_format
        else:  # an Embedding8bit (no weight_format) and its tied int8 head, which has no tensor of its own to load
            quantized[f"{head}.SCB"] = weight_absmax
            quantized[f"{head}.weight_format"] = weight_format
        if self.hf_quantizer.checkpoint_pages is not None:
            # The float weight is consumed: its pages of the mapped checkpoint shard are no longer needed,
            # nor the heap space of the temporaries its quantization freed.
            source = kwargs.get("source_patterns")
            if source is not None and len(source) == 1:
                self.hf_quantizer.checkpoint_bytes_released += self.hf_quantizer.checkpoint_pages.release_through(source[0])
            _memory.trim_heap()
        return quantized


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def _checkpoint_headers(checkpoint_files) -> dict[str, dict]:
    """The header of every safetensors shard among ``checkpoint_files`` (path -> header), each checked by
    :func:`llm_int8.checkpoint.read_safetensors_header`: a truncated or unreadable shard is refused here,
    naming the file, instead of failing somewhere inside transformers' loading."""
    return {
        str(file): read_safetensors_header(file)[0] for file in checkpoint_files or () if str(file).endswith(".safetensors")
    }


def _check_int8_keys(model, headers: dict[str, dict]) -> None:
    """A saved int8 checkpoint must hold ``weight`` and ``SCB`` for every int8 layer; say which is missing.

    transformers leaves a tensor absent from the checkpoint as the skeleton allocated it (uninitialized
    memory), which the value checks would then report as nonsense scales or -128 codes.
    """
    keys = {key for header in headers.values() for key in header}
    layers = [name for name, m in model.named_modules() if isinstance(m, Linear8bitLt)]
    if not any(f"{name}.{leaf}" in keys for name in layers for leaf in (saved_format.WEIGHT, saved_format.SCALE)):
        return  # the checkpoint names its tensors otherwise (transformers renames them on load)
    for name in layers:
        missing = [leaf for leaf in (saved_format.WEIGHT, saved_format.SCALE) if f"{name}.{leaf}" not in keys]
        if missing:
            files = ", ".join(sorted(os.path.basename(f) for f in headers))
            raise saved_format.invalid(
                name,
                f"the checkpoint ({files}) has no {' and no '.join(missing)} for this int8 layer "
                f"({saved_format.WEIGHT}: int8 codes, {saved_format.SCALE}: their float32 row scales; both are needed)",
                "the file is incomplete: restore it from a backup, or re-save the model with save_pretrained",
            )


def _expect_calibrated_columns(model, headers: dict[str, dict]) -> None:
    """Give each int8 layer whose checkpoint holds calibrated columns (``fp_cols`` / ``fp_weight``) meta
    buffers of the saved shapes and dtypes, so that transformers loads them (a layer has none until
    calibrated, and transformers drops checkpoint tensors that the model does not hold)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear8bitLt)}
    for header in headers.values():
        for key, info in header.items():
            prefix, _, leaf = key.rpartition(".")
            module = layers.get(prefix)
            if module is None or leaf not in (saved_format.FP_COLS, saved_format.FP_WEIGHT):
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise saved_format.invalid(prefix, f"{leaf} is stored as {info.get('dtype')}, which is not a tensor dtype of this format")
            module.register_buffer(leaf, torch.empty(info["shape"], dtype=dtype, device="meta"))


def _validate_loaded_layers(model) -> None:
    """Check every int8 layer of a model loaded from a saved int8 checkpoint with the format's validator,
    so that a checkpoint transformers accepted tensor by tensor (a -128 code, a NaN scale, repeated
    columns) is refused before use, naming the layer. Layers offloaded to disk are read back once."""
    for name, module in model.named_modules():
        if not isinstance(module, Linear8bitLt):
            continue
        tensors = {leaf: getattr(module, leaf, None) for leaf in saved_format.LAYER_KEYS}
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:  # offloaded: the module holds meta tensors, the map holds the values
            for leaf in saved_format.LAYER_KEYS:
                if tensors[leaf] is not None and tensors[leaf].is_meta and leaf in weights_map:
                    tensors[leaf] = weights_map[leaf]
        saved_format.validate_int8_layer(tensors, name, shape=(module.out_features, module.in_features))


# --------------------------------------------------------------------------------------------
# Quantizer


@register_quantizer(QUANT_METHOD)
class LLMInt8HfQuantizer(HfQuantizer):
    """Drives ``from_pretrained`` for :class:`LLMInt8Config`; users never build it themselves.

    After loading, ``model.hf_quantizer.report`` is the :class:`llm_int8.QuantizeReport` of the
    conversion (converted and skipped layer names; ``bytes_before`` the float model's footprint, taken
    on the meta skeleton, ``bytes_after`` the loaded model's, both :func:`llm_int8.memory_footprint`),
    and ``model.hf_quantizer.checkpoint_bytes_released`` the bytes of mapped checkpoint pages given
    back as the weights were quantized (0 where unsupported or disabled).
    """

    requires_calibration = False
    quantization_config: LLMInt8Config

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.float_layers: dict[str, nn.Module] = {}  # the skeleton's convertible layers, before the swap
        self.report: QuantizeReport | None = None
        self.load_dtype: torch.dtype | None = None
        self.checkpoint_pages: _memory.CheckpointPages | None = None
        self.checkpoint_bytes_released = 0
        self.refused: list[str] = []  # why weights could not be quantized (NaN/Inf), raised after loading
        self.int8_embeddings: dict[str, str] = {}  # Embedding8bit name -> its int8 head (quantize_head=True)
        self._model = None  # weakref to the model, for is_serializable

    def update_dtype(self, dtype):
        # Weights are cast to this dtype as they stream in, before we quantize them; the disk
        # re-quantization below must start from the same values.
        if dtype not in F.FLOAT_DTYPES:
            raise ValueError(
                f"LLMInt8Config quantizes float16, bfloat16 or float32 weights, and from_pretrained was asked for "
                f"dtype={dtype}; pass dtype=torch.float32 (or torch.bfloat16 / torch.float16) to from_pretrained: the "
                "weights are quantized from that dtype and the layers that stay float (embeddings, norms, head) keep it"
            )
        self.load_dtype = dtype
        return dtype

    @property
    def quantized_element_size(self) -> float:
        return 1  # int8 weights: what accelerate's device-map planning should count

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # A pre-quantized checkpoint already holds int8 weights; answering False there also keeps
        # transformers' shape check on the loaded tensors.
        if self.pre_quantized:
            return False
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, (Linear8bitLt, Embedding8bit)) and name == "weight"

    def modules_to_not_convert(self, model) -> list[str]:
        """The config's skip list (default: the head and embedding-tied layers) plus fp32-pinned modules."""
        skip = self.quantization_config.skip_modules
        if skip is None:
            skip = default_skip_modules(model)
            if getattr(model, "all_tied_weights_keys", None) is not None:
                skip += [name.removesuffix(".weight") for name in get_keys_to_not_convert(model)]
            if self.quantization_config.quantize_head:  # the head converts (its tied embedding with it)
                head = output_head_name(model)
                skip = [name for name in skip if name != head]
        skip = list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return sorted(set(skip))

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        headers = _checkpoint_headers(checkpoint_files)  # a damaged shard is refused before anything loads
        if RELEASE_MEMORY_WHILE_LOADING and not self.pre_quantized and checkpoint_files and _memory.supported():
            self.checkpoint_pages = _memory.CheckpointPages(checkpoint_files, order_key=dot_natural_key)
        self.float_layers = {name: m for name, m in model.named_modules() if is_convertible(m)}
        qc = self.quantization_config
        # A saved model names its float layers: exactly those stay float, whatever the defaults say today.
        skip = qc.unconverted_modules if self.pre_quantized and qc.unconverted_modules is not None else None
        if qc.quantize_head:
            _tie_skeleton_head(model)
        config = Int8Config(
            threshold=qc.threshold, skip_modules=skip if skip is not None else self.modules_to_not_convert(model),
            quantize_head=qc.quantize_head,
        )
        self.report = quantize_(model, config)
        head = output_head_name(model)
        self.int8_embeddings = {name: head for name in self.report.int8_embeddings}
        self._model = weakref.ref(model)
        qc.unconverted_modules = sorted(self.report.skipped)
        for module in model.modules():
            if isinstance(module, Linear8bitLt):
                # transformers' weight init must never draw into an int8 weight: it either loads from the
                # checkpoint or, mapped to disk, stays meta here and is read back from the offload index.
                module.weight._is_hf_initialized = True
        if self.pre_quantized and headers:
            _check_int8_keys(model, headers)
            _expect_calibrated_columns(model, headers)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.checkpoint_pages = None  # loading is over: the shards are closed
        if self.refused:
            more = len(self.refused) - 1
            raise ValueError(self.refused[0] + (f" ({more} more weight(s) of this checkpoint likewise)" if more else ""))
        tie_int8_head(model)
        if self.report is not None:
            self.report.bytes_after = memory_footprint(model)  # the loaded model itself, as every report counts it
        # What peft's prepare_model_for_kbit_training (gradient checkpointing, input grads) and the
        # Trainer (no DataParallel over int8 layers) look for in an 8-bit model.
        model.is_loaded_in_8bit = True
        # accelerate's offload hook (AlignDevicesHook.post_forward) recognises bitsandbytes' layer by
        # its class name, "Linear8bitLt", which ours shares, and clears ``module.state.SCB`` after
        # each offloaded forward. Our scales are a buffer the hook manages itself; the namespace
        # only gives that clean-up somewhere harmless to write.
        for module in model.modules():
            if isinstance(module, Linear8bitLt) and getattr(getattr(module, "_hf_hook", None), "offload", False):
                module.state = SimpleNamespace(SCB=None, CxB=None)
        if self.pre_quantized:
            _validate_loaded_layers(model)
        else:
            self._store_disk_offloaded_weights_int8(model)
        return model

    def _store_disk_offloaded_weights_int8(self, model) -> None:
        """Point the disk-offload index of every quantized weight at an int8 copy.

        For weights mapped to ``"disk"``, transformers indexes the tensor where it already lies in
        the float checkpoint (and drops what our quantize op returned for it); read back through
        that index, it would be cast to int8 without scales. So each such weight is quantized
        once more, from the checkpoint, and saved int8 into the offload folder. Its ``SCB`` was
        set at load time from the same float weight, so the pair matches exactly.
        """
        for name, module in model.named_modules():
            weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
            loader = getattr(weights_map, "dataset", None)  # accelerate's PrefixedDataset over its loader
            if not isinstance(module, Linear8bitLt) or getattr(loader, "index", None) is None:
                continue
            key = weights_map.prefix + "weight"
            entry = loader.index.get(key)
            if entry is None or entry.get("safetensors_file") is None:
                continue
            with safe_open(entry["safetensors_file"], framework="pt") as f:
                weight = f.get_tensor(entry.get("weight_name", key))
            if not weight.is_floating_point():
                continue  # already int8 (a bitsandbytes-format checkpoint)
            if loader.save_folder is None:
                raise ValueError(
                    "quantizing while offloading layers to disk needs a folder for their int8 weights: "
                    "pass offload_folder=... to from_pretrained"
                )
            if self.load_dtype is not None:
                weight = weight.to(self.load_dtype)
            weight = self.oriented(name, weight)
            weight_int8, _ = F.quantize_weight(weight)
            offload_weight(weight_int8.contiguous(), key, loader.save_folder, loader.index)

    def oriented(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor:
        """A checkpoint weight of layer ``layer_name`` as ``Linear8bitLt`` holds it, [out, in]
        (:func:`llm_int8.convert.linear_weight`: GPT-2 ``Conv1D`` stores its transpose)."""
        layer = self.float_layers.get(layer_name)
        return weight if layer is None else linear_weight(layer, weight)

    def get_quantize_ops(self):
        return _QuantizeWeightOnLoad(self)

    def is_serializable(self, *args, **kwargs) -> bool:
        model = self._model() if self._model is not None else None
        if self.int8_embeddings and not getattr(model, "_hf_peft_config_loaded", False):
            # Raised here, before save_pretrained writes anything. bitsandbytes has no int8 embedding: a file
            # holding one would load there as int8 codes read into a float table, so none is written.
            raise ValueError(
                f"this model's input embedding ({', '.join(sorted(self.int8_embeddings))}) is int8, sharing the "
                "output head's codes (LLMInt8Config(quantize_head=True) on a model with tied embeddings), and "
                "save_pretrained cannot write it: its checkpoints are bitsandbytes 8-bit checkpoints, which keep "
                "embeddings in float. Save the float model, or quantize with quantize_head=False, and apply "
                "quantize_head=True again when loading (loading quantizes the head and embedding as it streams in)"
            )
        return True

    @property
    def is_trainable(self) -> bool:
        # Weights are frozen, but gradients reach the inputs and biases, so adapters (LoRA) train.
        return True

    def _dequantize(self, model, dtype=None):
        """Replace every ``Linear8bitLt`` by an ``nn.Linear`` holding its dequantized weight."""
        tables = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, Embedding8bit)}

        def float_embedding(module, name):
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
            embedding.weight = nn.Parameter(module.dequantize(dtype or module.dtype), requires_grad=False)
            return embedding

        def float_linear(module, name):
            weight = module.dequantize(dtype or torch.float32)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
            if id(module.weight) in tables:  # an int8 head tied to an int8 embedding: tied again, in float
                linear.weight = model.get_submodule(tables[id(module.weight)]).weight
            return linear

        replace_modules(model, lambda module, name: isinstance(module, Embedding8bit), float_embedding)
        replace_modules(model, lambda module, name: isinstance(module, Linear8bitLt), float_linear)
        return model


# --------------------------------------------------------------------------------------------
# Quantizing a model that is already loaded (GGUF files)


def quantize_model(model, config: LLMInt8Config | None = None) -> QuantizeReport:
    """Quantize, in place, a transformers model that is already loaded in float; returns the report.

    This is the path for checkpoints transformers will not combine with a quantization config,
    such as GGUF files (``from_pretrained(..., gguf_file=...)`` dequantizes them to float). The same
    layers are converted as ``from_pretrained(..., quantization_config=config)`` would convert, and
    the config is recorded on the model, so ``save_pretrained`` writes a pre-quantized checkpoint
    that ``from_pretrained`` reloads without arguments.
    """
    config = config or LLMInt8Config()
    if not isinstance(config, LLMInt8Config):
        raise TypeError(f"config must be an LLMInt8Config, got {type(config).__name__}")
    if not hasattr(model, "config"):
        raise TypeError(
            f"quantize_model expects a transformers PreTrainedModel, got {type(model).__name__}; "
            "for any other nn.Module use llm_int8.quantize_(module, llm_int8.Int8Config(...))"
        )
    # A GGUF model is float once loaded (transformers dequantizes it); other quantizers leave
    # integer weights behind, which cannot be quantized again.
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, Linear8bitLt) or (is_convertible(module) and not weight.is_floating_point()):
            raise ValueError(
                f"the model is already quantized ({name} holds a {weight.dtype} weight); load it in float "
                "(without quantization_config) before calling quantize_model"
            )
        if is_convertible(module) and weight.dtype not in F.FLOAT_DTYPES:
            raise ValueError(
                f"quantize_model quantizes float16, bfloat16 or float32 weights, and {name} holds {weight.dtype}; "
                "cast the model first (model.float(), or model.to(torch.bfloat16)), or load it with dtype=torch.float32"
            )
    quantizer = prepare_int8_model(model, config)
    finish_int8_model(model, quantizer)
    return quantizer.report


def _tie_skeleton_head(model) -> None:
    """Tie the head of a model skeleton to its embedding as transformers will after loading
    (``all_tied_weights_keys``: ``{"lm_head.weight": "model.embed_tokens.weight"}``), so that ``quantize_``
    sees the tie and gives the embedding the int8 head's own tensors (``Embedding8bit``)."""
    head = output_head_name(model)
    source = (getattr(model, "all_tied_weights_keys", None) or {}).get(f"{head}.weight")
    if head is None or source is None:
        return
    owner, _, leaf = source.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, nn.Embedding) and leaf == "weight":
        model.get_submodule(head).weight = module.weight


def tie_int8_head(model) -> None:
    """After a loader tied the weights (``tie_weights``): each int8 head whose ``weight`` is an
    ``Embedding8bit``'s takes that embedding's ``SCB`` too, and an int8 embedding left without its head is
    an error (the head would otherwise multiply by codes the embedding no longer shares)."""
    tied = {embedding for _, embedding in share_tied_scales(model)}
    untied = [name for name, m in model.named_modules() if isinstance(m, Embedding8bit) and name not in tied]
    if untied:
        raise RuntimeError(
            f"the int8 embedding {', '.join(untied)} is no longer tied to the int8 output head after loading; "
            "this is a bug of llm_int8 (please report it); load with quantize_head=False meanwhile"
        )


def prepare_int8_model(model, config: LLMInt8Config) -> LLMInt8HfQuantizer:
    """Swap the linear layers of a transformers model for ``Linear8bitLt`` as ``from_pretrained`` would,
    and mark the model quantized; returns the quantizer (its ``report`` names the converted layers).

    The model may hold float weights (:func:`quantize_model`) or be a skeleton whose linear weights
    are still on the meta device and are filled afterwards (``llm_int8.integrations.gguf``); either
    way the same layers are converted. Call :func:`finish_int8_model` once every weight is in place.
    """
    quantizer = LLMInt8HfQuantizer(config, pre_quantized=False)
    quantizer._process_model_before_weight_loading(model)  # raises with the model left as it was
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return quantizer


def finish_int8_model(model, quantizer: LLMInt8HfQuantizer) -> None:
    """Record the config on a model converted by :func:`prepare_int8_model`, so that ``save_pretrained``
    writes a pre-quantized checkpoint that ``from_pretrained`` reloads without arguments."""
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
