"""SmoothQuant-style migration of activation scale into the preceding norm and the int8 weight, in the saved format.

LLM.int8() quantizes each row of a layer's input x (after the columns with |x| >= alpha leave) to 127
steps of that row's absmax: one large channel coarsens every other channel's steps. For a layer fed
directly by a norm (q/k/v by the attention norm, gate/up by the MLP norm in Llama-like models), the
per-channel scale s [K] can move from x into the weight exactly, as SmoothQuant (Xiao et al. 2022)
does:

    x W^T = (x / s) (W s)^T,   x / s = norm(h; gamma / s)   (the norm's output is linear in its weight)

so the checkpoint keeps its format: the norm's float weight becomes gamma / s and the layers' int8
codes and row absmax (``SCB``) are those of W s. bitsandbytes loads it unchanged. With strength m,
s_j = amax(x_j)^m / amax(W_j)^(1 - m) (amax over the calibration tokens and over the rows of every
layer the norm feeds), divided by its geometric mean so that the input's overall size, and with it
what the threshold alpha = 6 takes out, stays comparable.

Whether it helps is an empirical question per model: smaller activation steps against larger weight
rows. :func:`choose_activation_setting` picks the strength and alpha on calibration windows, and the
choice is kept only where it improves held-out windows (:func:`llm_int8.eval.experiments.check_calibration`).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .hooks import LinearInputHooks, Site, linear_layers

MIN_SCALE = 1e-5


@dataclass
class Migration:
    """Per norm (qualified name): the layers it feeds and the scale s [K] moved from its output into their weights."""

    norms: dict[str, list[str]]  # norm name -> names of the linear layers fed its output
    scales: dict[str, torch.Tensor]  # norm name -> s, float32 [K]
    strength: float

    def layer_scales(self) -> dict[str, torch.Tensor]:
        """Linear layer name -> the s its weight's columns are multiplied by."""
        return {layer: self.scales[norm] for norm, layers in self.norms.items() for layer in layers}

    def to_dict(self) -> dict:
        return {"strength": self.strength, "norms": {n: list(layers) for n, layers in self.norms.items()}}


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and "norm" in type(module).__name__.lower()
            and not any(True for _ in module.children()))


class _NormFedInputs(LinearInputHooks):
    """Which linear inputs are a norm's output object, and their per-channel absmax over every position."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._norm_out: tuple | None = None  # (weak reference to the last norm output, its name)
        self._norm_handles = []
        self.norm_of_site: dict[int, str] = {}

    def __enter__(self):
        super().__enter__()
        for name, module in self.model.named_modules():
            if _is_norm(module):
                self._norm_handles.append(module.register_forward_hook(self._norm_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._norm_handles:
            handle.remove()
        self._norm_handles.clear()
        return super().__exit__(*exc)

    def _norm_hook(self, name):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor):
                self._norm_out = (weakref.ref(output), name)
        return hook

    def site_input(self, site: Site, x: torch.Tensor) -> None:
        # x is the hooked input detached (a new tensor object on the same memory); while the norm's output
        # is alive its memory cannot be another tensor's, so the same data pointer and shape mean the same tensor.
        out = None if self._norm_out is None else self._norm_out[0]()
        fed = out is not None and out.data_ptr() == x.data_ptr() and out.shape == x.shape
        if not fed:
            self.norm_of_site[id(site)] = ""  # fed by anything else once: not migratable
            return
        if self.norm_of_site.setdefault(id(site), self._norm_out[1]) != self._norm_out[1]:
            self.norm_of_site[id(site)] = ""
        amax = x.reshape(-1, site.in_features).abs().amax(dim=0).float()
        site.stats["amax"] = torch.maximum(site.stats["amax"], amax) if "amax" in site.stats else amax


def _norm_is_linear_in_weight(norm: nn.Module, width: int) -> bool:
    """Whether norm(h; gamma / s) == norm(h; gamma) / s (RMSNorm, LayerNorm with its bias divided too): checked
    on a random input and scale, so norms computing (1 + gamma) or anything else are refused."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, width, generator=gen)
    s = torch.rand(width, generator=gen) + 0.5
    trial = copy.deepcopy(norm).float()
    with torch.no_grad():
        expected = trial(h) / s
        trial.weight.div_(s)
        if getattr(trial, "bias", None) is not None:
            trial.bias.div_(s)
        got = trial(h)
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5))


@torch.no_grad()
def migration_scales(model: nn.Module, windows: torch.Tensor, strength: float) -> Migration:
    """The migration of strength ``strength`` in [0, 1] for every site fed directly by a norm whose output is
    linear in its weight, from the input absmax on the calibration ``windows`` (int64 [n, seq_len])."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"the migration strength must lie in [0, 1], got {strength}")
    modules = {name: module for name, module, _ in linear_layers(model)}
    with _NormFedInputs(model) as hooks, torch.inference_mode():
        for window in windows:
            model(input_ids=window.unsqueeze(0))
    norms, scales = {}, {}
    for site in hooks.sites:
        norm_name = hooks.norm_of_site.get(id(site), "")
        if not norm_name or "amax" not in site.stats or norm_name in norms:
            continue
        norm = model.get_submodule(norm_name)
        if norm.weight.shape[0] != site.in_features or not _norm_is_linear_in_weight(norm, site.in_features):
            continue
        if any(not isinstance(modules[n], nn.Linear) for n in site.names):
            continue
        w_amax = torch.stack([modules[n].weight.detach().abs().amax(dim=0).float() for n in site.names]).amax(dim=0)
        x_amax = site.stats["amax"].clone()  # a normal tensor (the hooks ran in inference mode)
        s = x_amax.clamp_min(MIN_SCALE).pow(strength) / w_amax.clamp_min(MIN_SCALE).pow(1.0 - strength)
        s = torch.where((x_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
        s = (s / s.log().mean().exp()).clamp_min(MIN_SCALE)  # geometric mean 1: the input keeps its overall size
        norms[norm_name], scales[norm_name] = list(site.names), s
    return Migration(norms, scales, strength)


def migrate_norms(model: nn.Module, migration: Migration) -> None:
    """Replace, in place, each migrated norm's weight (and bias) by a new parameter divided by its s (the
    previous tensors are not written to, so a ``shared_copy`` leaves the original model as it was)."""
    for norm_name, s in migration.scales.items():
        norm = model.get_submodule(norm_name)
        norm.weight = nn.Parameter(norm.weight.detach() / s.to(norm.weight.dtype), requires_grad=False)
        if getattr(norm, "bias", None) is not None:
            norm.bias = nn.Parameter(norm.bias.detach() / s.to(norm.bias.dtype), requires_grad=False)


def migrated_weight(weight: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """W s: the float weight [N, K] with its columns multiplied by s [K] (a new tensor), or W itself if s is None."""
    return weight if s is None else weight.detach() * s.to(weight.dtype)
