"""Activation statistics of every linear layer's input, gathered by forward hooks: the one place that
finds the layers, groups them by shared input and attaches the hooks.

The layers are those ``quantize_`` converts (:func:`llm_int8.convert.select_layers`: not the output
head nor embedding-tied layers) and the model's ``Linear8bitLt`` layers. A *site* is one distinct
linear-layer input: layers fed the same tensor object in a row (q/k/v projections; gate and up) form
one site, so one hidden state is counted once. Subclasses of :class:`LinearInputHooks` say what to
record: :meth:`~LinearInputHooks.site_input` once per site and forward, :meth:`~LinearInputHooks.layer_output`
per layer, :meth:`~LinearInputHooks.forward_end` after each forward of the whole model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..convert import is_convertible, linear_weight, select_layers
from ..nn import Linear8bitLt


def linear_in_features(module: nn.Module) -> int | None:
    """The input width of a linear layer we know how to hook, else None."""
    if isinstance(module, (nn.Linear, Linear8bitLt)):
        return module.in_features
    if is_convertible(module):  # GPT-2 Conv1D
        return linear_weight(module).shape[1]
    return None


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, in_features) of every linear layer ``quantize_`` converts or has converted."""
    converted = set(select_layers(model)[0])
    return [
        (name, module, linear_in_features(module))
        for name, module in model.named_modules()
        if name in converted or isinstance(module, Linear8bitLt)
    ]


@dataclass
class Site:
    """One distinct linear-layer input of width ``in_features``; ``names``: the layers fed it."""

    names: list[str]
    in_features: int
    stats: dict = field(default_factory=dict)  # what a LinearInputHooks subclass records for it


class LinearInputHooks:
    """Context manager attaching a forward hook to every linear layer of ``model`` (see the module docstring).

    Subclasses override :meth:`site_input`, :meth:`layer_output` and :meth:`forward_end` as they need.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites: list[Site] = []
        self.site_of: dict[str, Site] = {}
        self._last = None  # (weak reference to the last input seen, its site)
        self._handles = []

    def __enter__(self):
        layers = linear_layers(self.model)
        if not layers:
            raise ValueError("the model has no linear layers to hook")
        self.check_layers(layers)
        for name, module, width in layers:
            self._handles.append(module.register_forward_hook(self._hook(name, width)))
        self._handles.append(self.model.register_forward_hook(lambda *_: self._forward_end()))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None

    def check_layers(self, layers: list[tuple[str, nn.Module, int]]) -> None:
        """Refuse models the statistics do not apply to (default: accept all)."""

    def site_input(self, site: Site, x: torch.Tensor) -> None:
        """Record a site's input x [..., in_features], once per forward of the model (default: nothing)."""

    def layer_output(self, name: str, module: nn.Module, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        """Record one layer's call: input x [..., in_features], output y [..., out_features] (default: nothing)."""

    def forward_end(self) -> None:
        """Called after every forward of the whole model (default: nothing)."""

    def _forward_end(self):
        self.forward_end()
        self._last = None

    def _hook(self, name: str, width: int):
        def hook(module, args, output):
            x = args[0]
            site = self.site_of.get(name)
            # A weak reference, not a data pointer: a freed input's memory may be reused.
            same_input = self._last is not None and self._last[0]() is x
            if site is None:
                if same_input:
                    site = self._last[1]
                    site.names.append(name)
                else:
                    site = Site([name], width)
                    self.sites.append(site)
                self.site_of[name] = site
            if not (same_input and self._last[1] is site):
                self.site_input(site, x.detach())
            self._last = (weakref.ref(x), site)
            self.layer_output(name, module, site, x.detach(), output.detach())

        return hook
