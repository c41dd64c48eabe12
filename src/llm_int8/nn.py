"""``Linear8bitLt``: a drop-in replacement for ``nn.Linear`` holding an LLM.int8() weight."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as F
from . import saved_format
from ._ops import INT8_MAX
from .functional import _check_threshold
from .saved_format import FP_COLS, FP_WEIGHT, LAYER_KEYS, SCALE, WEIGHT, weight_format_tensor


class Linear8bitLt(nn.Module):
    """``y = x @ W.T + b`` with W stored as vector-wise int8 and the LLM.int8() decomposition.

    State (the state-dict keys are bitsandbytes' ``Linear8bitLt`` keys, so checkpoints move both ways;
    :mod:`llm_int8.saved_format` owns them and the rules every load path checks):

    * ``weight``: int8 [out_features, in_features], a frozen parameter (so device maps move it);
    * ``SCB``: float32 [out_features], each weight row's absmax (bitsandbytes' historical name for
      the weight scale; :attr:`weight_absmax` is the same tensor);
    * ``weight_format``: uint8 scalar 0 (row-major), written for bitsandbytes;
    * ``bias``: float [out_features] or None, kept in its own dtype;
    * ``fp_cols`` / ``fp_weight`` (optional, None unless calibrated): input columns that always
      take the 16/32-bit path, and the float weight columns [out_features, F] they multiply.

    Inputs may be fp16, bf16 or fp32, 2-D or N-D; the output has x's dtype. Train and eval modes
    run the same code. Loading an ``nn.Linear`` state dict (float ``weight``) quantizes it. Moving the
    module to another dtype (``.half()``, ``.to(torch.bfloat16)``) converts the bias only: the int8
    weight, the float32 scales and the stored fp columns keep their dtypes, bit for bit.

    Defaults differ from bitsandbytes' ``Linear8bitLt`` on purpose: ``threshold=6.0`` (the paper's
    alpha; bitsandbytes defaults to 0.0, no decomposition) and ``has_fp16_weights=False`` (the int8
    weight is frozen; bitsandbytes defaults to True, a trainable 16-bit weight quantized per call).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        has_fp16_weights: bool = False,
        threshold: float = 6.0,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if has_fp16_weights:
            raise ValueError(
                "has_fp16_weights=True is not supported: Linear8bitLt keeps a frozen int8 weight. To fine-tune, "
                "train adapters (e.g. LoRA) on top of it (gradients reach the input and the bias), or train an "
                "nn.Linear and convert it afterwards with Linear8bitLt.from_linear(linear)."
            )
        for size in (in_features, out_features):
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(
                    f"in_features and out_features must be ints, got {in_features!r}, {out_features!r}; "
                    "to convert a layer use Linear8bitLt.from_linear(linear), to call one pass a tensor to the module"
                )
        if in_features < 0 or out_features < 0:
            raise ValueError(f"in_features and out_features must be >= 0, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = threshold  # checked by __setattr__
        self.has_fp16_weights = False
        self.weight = nn.Parameter(
            torch.empty((out_features, in_features), dtype=torch.int8, device=device), requires_grad=False
        )
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_format", weight_format_tensor(device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("fp_cols", None)
        self.register_buffer("fp_weight", None)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def __setattr__(self, name, value):
        # The threshold is checked wherever it is set (constructor or ``layer.threshold = ...``), by the
        # validator every entry point shares, so the forward never sees an invalid one.
        if name == "threshold":
            value = _check_threshold(value, "Linear8bitLt.threshold")
        super().__setattr__(name, value)

    # ----------------------------------------------------------------------------------------
    # Construction

    def reset_parameters(self) -> None:
        """Draw a float weight as ``nn.Linear`` does and quantize it (a fresh module is usable)."""
        weight = torch.empty(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._set_weight(weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 6.0, *, name: str = "weight"
    ) -> "Linear8bitLt":
        """Quantize a float weight [out_features, in_features] (and copy the bias) into a new module;
        ``name`` is what an error calls the weight (e.g. its qualified name in a model)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias=bias is not None, threshold=threshold, device="meta")
        module._set_weight(weight.detach(), name)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Linear8bitLt":
        """Quantize an ``nn.Linear`` (weight from its own dtype; bias kept as is) on its device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, threshold)

    def _set_weight(self, weight: torch.Tensor, name: str = "weight") -> None:
        weight_int8, weight_absmax = F.quantize_weight(weight, name)
        self.weight = nn.Parameter(weight_int8, requires_grad=False)
        self.SCB = weight_absmax
        self.weight_format = weight_format_tensor(weight.device)

    def set_fp_columns(self, cols: torch.Tensor, weight: torch.Tensor) -> None:
        """Keep input columns ``cols`` always in float, multiplied by ``weight[:, cols]`` (float [N, K]).

        The columns are checked here, once (distinct after sorting, in [0, in_features)), so that the
        forward does not have to look at their values on every call.
        """
        cols = torch.as_tensor(cols, dtype=torch.int64, device=self.weight.device).unique()
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight must be the float weight {tuple(self.weight.shape)}, got {tuple(weight.shape)}")
        saved_format.validate_fp_columns(  # before indexing the weight with them
            cols, torch.empty(self.out_features, cols.numel(), dtype=weight.dtype, device="meta"),
            self.out_features, self.in_features, "Linear8bitLt.set_fp_columns",
            remedy=f"pass input column indices in [0, in_features = {self.in_features})", error=ValueError,
        )
        self.fp_cols, self.fp_weight = cols, weight.detach()[:, cols]

    # ----------------------------------------------------------------------------------------
    # Forward

    @property
    def weight_absmax(self) -> torch.Tensor:
        return self.SCB

    #: Batch-invariant mode (:func:`set_batch_invariant`): each row of x decomposes only its own outliers
    #: (:func:`llm_int8.functional.int8_mixed_linear_per_row`), so that a row's output does not depend on
    #: the other rows of the batch. Off by default: the paper's decomposition takes whole columns.
    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            F.check_linear_input(x, (self.out_features, self.in_features), self.weight.device)
            return F.per_row_mixed_linear_op(x, self.weight, self.SCB, self.bias, self.threshold, self.fp_cols, self.fp_weight)
        params, buffers = self._parameters, self._buffers  # (nn.Module.__getattr__ is slow per layer call)
        weight, bias = params["weight"], params.get("bias")
        kernel = F.eager_kernel(x, weight, bias)
        if kernel is not None and x.ndim and x.shape[-1] == self.in_features:
            # eager inference: the device's kernel of the op, called directly (a decoding step calls
            # every layer with one row, where the dispatcher's round trip adds up); the layer's own
            # tensors were checked when they were set
            return kernel(x, weight, buffers["SCB"], bias, self.threshold, buffers["fp_cols"], buffers["fp_weight"])
        # autograd, torch.compile, modes, or an x to check: the op (the same kernel behind the dispatcher)
        F.check_linear_input(x, (self.out_features, self.in_features), self.weight.device)
        return F.mixed_linear_op(x, self.weight, self.SCB, self.bias, self.threshold, self.fp_cols, self.fp_weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] this module multiplies by (fp columns included)."""
        weight = F.dequantize_weight(self.weight, self.SCB, dtype)
        if self.fp_cols is not None:
            weight[:, self.fp_cols] = self.fp_weight.to(dtype)
        return weight

    def extra_repr(self) -> str:
        fp = f", fp_cols={self.fp_cols.numel()}" if self.fp_cols is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}{fp}"
        )

    def _apply(self, fn, recurse=True):
        # Module._apply converts every float tensor (.half(), .to(dtype)); the quantized state keeps its
        # dtypes bit for bit (SCB float32, fp_weight as stored) and only follows device moves.
        kept = {name: self._buffers[name] for name in (SCALE, FP_WEIGHT) if self._buffers.get(name) is not None}
        for name in kept:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(kept)
            raise
        for name, tensor in kept.items():
            moved = fn(tensor)
            self._buffers[name] = moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)
        return self

    # ----------------------------------------------------------------------------------------
    # State dict: bitsandbytes' keys (llm_int8.saved_format); a float nn.Linear state dict is quantized on load.

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in LAYER_KEYS:
                    unexpected_keys.append(key)
        assign = local_metadata.get("assign_to_params_buffers", False)
        try:
            tensors = self._state_to_load(state_dict, prefix, missing_keys, unexpected_keys)
        except (TypeError, ValueError) as err:
            error_msgs.append(str(err))
            return
        with torch.no_grad():
            for name, value in tensors.items():
                if value is None:  # no fp columns in the state: the layer has none either
                    setattr(self, name, None)
                    continue
                current = getattr(self, name)
                if assign or current is None or current.is_meta or name in (FP_COLS, FP_WEIGHT):
                    # Take the tensor as it comes (assign, meta skeletons); fp columns vary in size.
                    if not assign and not self.weight.is_meta:
                        value = value.to(self.weight.device)
                    if name in ("weight", "bias"):
                        value = nn.Parameter(value, requires_grad=name == "bias" and value.is_floating_point())
                    setattr(self, name, value)
                else:
                    current.copy_(value)

    def _state_to_load(self, state_dict, prefix, missing_keys, unexpected_keys) -> dict:
        """The tensors to load from ``state_dict``, checked by :func:`saved_format.validate_int8_layer`."""
        where = prefix[:-1] or "Linear8bitLt"
        saved = {leaf: state_dict.get(prefix + leaf) for leaf in LAYER_KEYS}
        weight, bias = saved[WEIGHT], saved["bias"]
        out = {}
        if weight is None:
            missing_keys.append(prefix + WEIGHT)
        elif weight.is_floating_point():  # an nn.Linear state dict: quantize it
            extra = [leaf for leaf in (SCALE, FP_COLS, FP_WEIGHT) if saved[leaf] is not None]
            if extra:
                raise ValueError(
                    f"{where}: found a float weight together with {', '.join(extra)}; a quantized checkpoint stores "
                    "an int8 weight (an nn.Linear state dict holds only weight and bias)"
                )
            if tuple(weight.shape) != (self.out_features, self.in_features):
                raise ValueError(
                    f"{where}: weight has shape {tuple(weight.shape)}, expected [out_features, in_features] = "
                    f"[{self.out_features}, {self.in_features}]"
                )
            out[WEIGHT], out[SCALE] = F.quantize_weight(weight, f"{where}.{WEIGHT}")
            out["weight_format"] = weight_format_tensor()
            out[FP_COLS] = out[FP_WEIGHT] = None
        elif weight.dtype != torch.int8:
            raise TypeError(f"{where}: weight must be int8 (quantized) or float (to quantize), got {weight.dtype}")
        else:
            present = {leaf: t for leaf, t in saved.items() if t is not None}
            saved_format.validate_int8_layer(present, where, shape=(self.out_features, self.in_features))
            out.update({leaf: saved[leaf] for leaf in (WEIGHT, SCALE, FP_COLS, FP_WEIGHT)})
            out[SCALE] = out[SCALE].float()  # a foreign fp16 / bf16 scale converts exactly
            out["weight_format"] = weight_format_tensor()
        if self.bias is None and bias is not None:
            unexpected_keys.append(prefix + "bias")
        elif self.bias is not None:
            if bias is None:
                missing_keys.append(prefix + "bias")
            elif tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"{where}: bias has shape {tuple(bias.shape)}, expected [{self.out_features}]")
            else:
                out["bias"] = bias
        return out


def set_batch_invariant(model: nn.Module, enabled: bool = True) -> int:
    """Switch every ``Linear8bitLt`` of ``model`` to (or back from) the batch-invariant decomposition.

    With it, each row of a layer's input decomposes only its own outlier entries, so the int8
    layers give a row the same output bit for bit whatever other rows share its batch (continuous
    batching in a server, padding, a larger eval batch); what else in the model sums across rows
    (attention over a paged cache, float layers whose kernel depends on the batch size) is not
    changed by it (docs/serve.md). Costs a little speed; the state dict is unchanged.
    Returns the number of layers switched.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    layers = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    for layer in layers:
        layer.batch_invariant = enabled
    return len(layers)


class Embedding8bit(nn.Module):
    """An ``nn.Embedding`` whose table is stored as vector-wise int8: row ``i`` is ``weight[i] * SCB[i] / 127``.

    Made for an output head quantized with ``Int8Config(quantize_head=True)`` whose weight is tied to the
    input embedding (SmolLM2, Qwen2.5): the embedding then holds the *same* tensors as the head's
    ``Linear8bitLt`` (``weight`` int8 [num_embeddings, embedding_dim], ``SCB`` float32 [num_embeddings]),
    so no float copy of the table is kept and the tie stays a tie. A lookup dequantizes the rows it reads,
    exactly as :func:`llm_int8.functional.dequantize_weight` does (``codes * (SCB / 127)`` in float32),
    and returns them in ``dtype``, the model's float dtype.

    Loading a float ``weight`` (an ``nn.Embedding`` state dict, a checkpoint tensor streaming in) quantizes
    it; an int8 ``weight`` with its ``SCB`` is checked by :func:`saved_format.validate_int8_layer`.
    Moving the module to another dtype (``.half()``) changes ``dtype``, never the codes or the scales.
    bitsandbytes keeps embeddings (and the head) in float and has no counterpart to this module.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_embeddings < 0 or embedding_dim < 0:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 0, got {num_embeddings}, {embedding_dim}")
        dtype = dtype or torch.float32
        if not dtype.is_floating_point:
            raise TypeError(f"Embedding8bit's dtype is the float dtype of its output, got {dtype}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.weight = nn.Parameter(
            torch.zeros((num_embeddings, embedding_dim), dtype=torch.int8, device=device), requires_grad=False
        )
        self.register_buffer("SCB", torch.zeros(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Embedding8bit":
        """A float ``nn.Embedding`` quantized into a new module (each row with its own absmax), for a table
        no head shares (an untied one; a tied one goes with its head: :meth:`tied_to`)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta",
                     dtype=embedding.weight.dtype)
        weight_int8, weight_absmax = F.quantize_weight(embedding.weight.detach(), "embedding.weight")
        module.weight = nn.Parameter(weight_int8, requires_grad=False)
        module.SCB = weight_absmax
        return module

    @classmethod
    def tied_to(cls, head: Linear8bitLt, embedding: nn.Embedding) -> "Embedding8bit":
        """The int8 version of ``embedding`` (an ``nn.Embedding`` tied to ``head``'s float weight before
        ``head`` was quantized) that holds ``head``'s own ``weight`` and ``SCB`` tensors."""
        if not isinstance(head, Linear8bitLt):
            raise TypeError(f"tied_to expects the quantized head, a Linear8bitLt, got {type(head).__name__}")
        if (embedding.num_embeddings, embedding.embedding_dim) != (head.out_features, head.in_features):
            raise ValueError(
                f"the embedding ({embedding.num_embeddings} x {embedding.embedding_dim}) is not the head's transposed "
                f"shape ({head.out_features} x {head.in_features}): they cannot share a weight"
            )
        if head.fp_cols is not None:
            raise ValueError("a head with calibrated fp columns cannot share its int8 weight with an embedding")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta",
                     dtype=embedding.weight.dtype)
        module.weight = head.weight  # the same Parameter: the tie is kept (and counted once)
        module.SCB = head.SCB
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Embedding8bit looks up integer token ids (int64 or int32), got {input_ids.dtype}")
        codes = nn.functional.embedding(input_ids, self.weight)  # int8 [..., embedding_dim]
        scale = nn.functional.embedding(input_ids, self.SCB.unsqueeze(1))  # float32 [..., 1]
        # the same float32 arithmetic as F.dequantize_weight, so a row equals the dequantized head row
        return (codes.float() * (scale / INT8_MAX)).to(self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float table [num_embeddings, embedding_dim] this module looks rows up in."""
        return F.dequantize_weight(self.weight, self.SCB, dtype or self.dtype)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, dtype={self.dtype}"

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) set the output dtype; the codes and float32 scales only follow device moves.
        probe = fn(torch.empty(0, dtype=self.dtype))  # what fn does to a float tensor (on the CPU: never meta)
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        scale = self._buffers["SCB"]
        self._buffers["SCB"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(scale)
            self._buffers["SCB"] = moved if moved.dtype == scale.dtype else scale.to(device=moved.device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        where = prefix[:-1] or "Embedding8bit"
        weight, scale = state_dict.get(prefix + WEIGHT), state_dict.get(prefix + SCALE)
        if strict:
            unexpected_keys.extend(
                key for key in state_dict
                if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in (WEIGHT, SCALE)
            )
        if weight is None:
            missing_keys.append(prefix + WEIGHT)
            return
        shape = (self.num_embeddings, self.embedding_dim)
        try:
            if weight.is_floating_point():  # an nn.Embedding state dict or a float checkpoint tensor: quantize it
                if scale is not None:
                    raise ValueError(f"{where}: found a float weight together with {SCALE}; an int8 table stores int8 codes")
                if tuple(weight.shape) != shape:
                    raise ValueError(f"{where}: weight has shape {tuple(weight.shape)}, expected {list(shape)}")
                weight, scale = F.quantize_weight(weight)
            else:
                if scale is None:
                    missing_keys.append(prefix + SCALE)
                    return
                saved_format.validate_int8_layer({WEIGHT: weight, SCALE: scale}, where, shape=shape)
        except (TypeError, ValueError) as err:
            error_msgs.append(str(err))
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            if assign or self.weight.is_meta:
                device = None if assign else self.weight.device
                self.weight = nn.Parameter(weight.to(device) if device else weight, requires_grad=False)
                self.SCB = scale.float().to(device) if device else scale.float()
            else:
                self.weight.copy_(weight)
                self.SCB.copy_(scale)
