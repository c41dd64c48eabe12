"""peft integration: LoRA and DoRA adapters on a frozen ``Linear8bitLt``.

This is the only file of the package that imports peft. ``import llm_int8`` calls :func:`register`
once peft is imported (right away if it already is), after which

* ``get_peft_model(model, LoraConfig(...))`` wraps every targeted ``Linear8bitLt`` in
  :class:`LoraLinear8bitLt` (LoRA, or DoRA with ``use_dora=True``), and ``PeftModel.from_pretrained``
  reloads saved adapters the same way. The adapters are float; the int8 weight stays frozen and the
  gradient reaches the input through it (``llm_int8.functional``'s backward);
* ``merge()`` / ``merge_and_unload()`` dequantize the weight, add the adapter's delta in float32 and
  quantize the result again, so a merged model runs at int8 speed; its outputs differ from the
  unmerged model's by the int8 rounding of the merged weight. Calibrated 16-bit columns
  (``fp_cols`` / ``fp_weight``) take their delta in float, without int8 rounding;
* ``unmerge()`` puts back the very tensors the layer held before merging (int8 weight, ``SCB``,
  16-bit columns, bias): bit for bit, not re-derived;
* DoRA's weight norm is taken from the dequantized weight (16-bit columns included), not from the
  int8 codes.

peft has no plug-in point for new layer types: its LoRA model picks a layer class from a fixed list
of dispatchers (``LoraModel._create_new_module``), and ``target_modules="all-linear"`` picks the layers
that are ``nn.Linear`` (bitsandbytes' 8-bit layer is one; ours is not). :func:`register` puts one
dispatcher for ``Linear8bitLt`` in front of that list, adds ``Linear8bitLt`` to what "all-linear"
selects (so it targets the same layers as on a bitsandbytes 8-bit model), and leaves every other
layer to peft. Tested with peft 0.21.2.
"""

from __future__ import annotations

import importlib.util
import warnings

if importlib.util.find_spec("peft") is None:
    raise ImportError("llm_int8.integrations.peft needs peft; install it: pip install peft")

import torch
from peft.tuners import tuners_utils
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from .. import functional as F
from ..nn import Linear8bitLt


# --------------------------------------------------------------------------------------------
# DoRA: the weight norm from the dequantized weight


class Int8DoraLinearLayer(DoraLinearLayer):
    """DoRA's magnitude vector for a ``Linear8bitLt``: ``m * (W + s*B@A) / ||W + s*B@A||_row``.

    peft's own layer reads the base weight as it is stored; here W is the dequantized weight
    [out_features, in_features] in float32, with the calibrated 16-bit columns in place. The norm is
    a constant of the forward (no gradient), as in the DoRA paper (section 4.3) and peft.
    """

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        weight = base_layer.dequantize(torch.float32).to(lora_A.device)
        lora_weight = lora_B.float() @ lora_A.float()  # [out, r] @ [r, in]
        weight_norm = self.get_weight_norm(weight=weight, lora_weight=lora_weight, scaling=scaling)
        if place_on_cpu:
            weight_norm = weight_norm.to("cpu")
        self.weight = nn.Parameter(weight_norm.to(lora_A.dtype), requires_grad=True)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        """The DoRA output minus the base layer's: added to ``base_layer(x)`` by the caller.

        x [..., in] (float, the adapters' dtype); base_result [..., out] is ``base_layer(x)`` when the
        caller has it (no dropout), else the int8 layer is run on x here.
        """
        lora_weight = self.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name).to(x.dtype)
        weight = base_layer.dequantize(x.dtype)
        weight_norm = self.get_weight_norm(
            weight=weight, lora_weight=lora_weight.detach(), scaling=scaling, adapter_name=adapter_name
        ).detach()
        scale = (self.weight / weight_norm).view(1, -1)  # m / ||W + s*B@A||, one per output
        if base_result is None:
            base_result = base_layer(x)  # x went through dropout: the int8 product of what the adapter sees
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias
        return (scale - 1) * base_result + scale * lora_B(lora_A(x)) * scaling


class Int8DoraLinearVariant(DoraLinearVariant):
    """peft's DoRA variant with :class:`Int8DoraLinearLayer`; merging is done by :class:`LoraLinear8bitLt`."""

    @staticmethod
    def init(module: "LoraLinear8bitLt", adapter_name: str, **kwargs) -> None:
        if not module.lora_magnitude_vector:
            # the first DoRA adapter of this layer: its magnitude vector is a trainable adapter weight
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        dora_layer = Int8DoraLinearLayer(fan_in_fan_out=False)
        dora_layer.update_layer(
            base_layer=module.get_base_layer(),
            lora_A=module.lora_A[adapter_name].weight,
            lora_B=module.lora_B[adapter_name].weight,
            scaling=module.scaling[adapter_name],
        )
        module.lora_magnitude_vector[adapter_name] = dora_layer

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        raise NotImplementedError("LoraLinear8bitLt.merge merges DoRA adapters itself")

    merge_unsafe = unmerge = merge_safe


# --------------------------------------------------------------------------------------------
# LoRA layer


class LoraLinear8bitLt(LoraLinear):
    """peft's LoRA ``Linear`` around a frozen ``Linear8bitLt`` (forward, adapters and saving as peft's).

    ``y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``, with the base layer's int8 forward
    and the adapters in float (float32 unless cast). What differs from peft's layer is how the
    adapters are merged into the int8 weight (see the module docstring).
    """

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # The tensors the base layer held before the first merge: (weight, SCB, fp_weight, bias);
        # unmerge puts them back. None while nothing is merged.
        self._unmerged_state: tuple | None = None

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): Int8DoraLinearVariant}

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the int8 weight: dequantize, add their deltas in float32, quantize again.

        The merged float weight is rebuilt from the weight the layer held before its first merge, with
        every merged adapter applied in order, and quantized once, so merging adapters one call at a
        time rounds no more than merging them together. A merged weight or bias that is not finite
        raises ``ValueError`` and leaves the layer as it was (``safe_merge`` is always on).
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if self._unmerged_state is None:
            bias = None if base.bias is None else base.bias.data
            self._unmerged_state = (base.weight.data, base.SCB, base.fp_weight, bias)
        merged = self.merged_adapters + adapter_names
        weight, bias = self._merged_weight_and_bias(merged)
        if not bool(torch.isfinite(weight).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
            if not self.merged_adapters:
                self._unmerged_state = None
            raise ValueError(
                f"merging adapter(s) {adapter_names} gives non-finite weights in this layer; the adapter is broken "
                "(check its weights for NaN/Inf). Nothing was merged."
            )
        weight_int8, weight_absmax = F.quantize_weight(weight)
        base.weight.data = weight_int8
        base.SCB = weight_absmax
        if base.fp_cols is not None:
            # the calibrated columns keep their float path: their merged values in their stored dtype
            base.fp_weight = weight[:, base.fp_cols].to(base.fp_weight.dtype)
        if bias is not None:
            base.bias.data = bias
        self.merged_adapters.extend(adapter_names)

    def _merged_weight_and_bias(self, adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 weight [out, in] (and bias [out] where an adapter has one, else None) of the
        original layer with ``adapter_names`` merged in order."""
        weight_int8, weight_absmax, fp_weight, bias = self._unmerged_state
        base = self.get_base_layer()
        original = F.dequantize_weight(weight_int8, weight_absmax, torch.float32)
        if fp_weight is not None:
            original[:, base.fp_cols] = fp_weight.float()
        weight, new_bias = original, None
        for name in adapter_names:
            delta = self.get_delta_weight(name).float().to(weight.device)
            if name in self.lora_variant:
                # DoRA: m / ||W + delta||_row, the norm from the unmerged weight as in the forward
                dora = self.lora_magnitude_vector[name]
                norm = dora.get_weight_norm(original, delta, scaling=1).detach()
                factor = (dora.weight.detach().float().to(weight.device) / norm).view(-1, 1)
                weight = factor * (weight + delta)
            else:
                weight = weight + delta
            if self.lora_bias[name]:
                if bias is None:
                    raise RuntimeError("cannot merge a LoRA bias (lora_bias=True) into a layer without a bias")
                base_bias = bias if new_bias is None else new_bias
                lora_bias = self.lora_B[name].bias.detach() * self.scaling[name]
                new_bias = (base_bias.float() + lora_bias.float().to(bias.device)).to(bias.dtype)
        return weight.to(base.weight.device), new_bias

    def unmerge(self) -> None:
        """Put back the int8 weight, scales, 16-bit columns and bias held before merging, bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight_int8, weight_absmax, fp_weight, bias = self._unmerged_state
        base = self.get_base_layer()
        base.weight.data = weight_int8
        base.SCB = weight_absmax
        base.fp_weight = fp_weight
        if bias is not None:
            base.bias.data = bias
        self._unmerged_state = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + nn.Module.__repr__(self)


def dispatch_linear8bitlt(target: nn.Module, adapter_name: str, config, **kwargs) -> LoraLinear8bitLt | None:
    """peft dispatcher: a :class:`LoraLinear8bitLt` when ``target`` is (or wraps) a ``Linear8bitLt``, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, Linear8bitLt):
        return None
    if config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out=True does not apply to Linear8bitLt (its weight is [out, in]); setting it to False"
        )
        config.fan_in_fan_out = False
    return LoraLinear8bitLt(target, adapter_name, config=config, **kwargs)


# --------------------------------------------------------------------------------------------
# Registration


def _int8_all_linear_names(model: nn.Module) -> set[str]:
    """The ``Linear8bitLt`` layers ``target_modules="all-linear"`` should select, by peft's own rules for
    ``nn.Linear``: all but the output head and layers already inside an adapter layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = [prefix + "." for prefix, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return {
        name for name, m in model.named_modules()
        if isinstance(m, Linear8bitLt) and m is not head and not name.startswith(tuple(wrapped))
    }


def _register_all_linear() -> None:
    """Make peft's "all-linear" shorthand select ``Linear8bitLt`` layers too (idempotent)."""
    original = tuners_utils._maybe_include_all_linear_layers
    if getattr(original, "_llm_int8_all_linear", False):
        return

    def _maybe_include_all_linear_layers(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
        peft_config = original(peft_config, model)
        if all_linear:
            peft_config.target_modules = set(peft_config.target_modules) | _int8_all_linear_names(model)
        return peft_config

    _maybe_include_all_linear_layers._llm_int8_all_linear = True
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers


def register() -> None:
    """Put :func:`dispatch_linear8bitlt` in front of peft's LoRA dispatchers and make "all-linear" select
    ``Linear8bitLt`` (idempotent).

    Layer types a user registered with ``LoraConfig._register_custom_module`` keep precedence.
    """
    _register_all_linear()
    original = LoraModel._create_new_module
    if getattr(original, "_llm_int8_dispatch", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        custom = getattr(lora_config, "_custom_modules", None) or {}
        if not any(isinstance(base, cls) for cls in custom):
            new_module = dispatch_linear8bitlt(target, adapter_name, config=lora_config, **kwargs)
            if new_module is not None:
                return new_module
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._llm_int8_dispatch = True
    LoraModel._create_new_module = staticmethod(_create_new_module)
