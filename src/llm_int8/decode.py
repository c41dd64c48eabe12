"""A lean decoding step: torch's small ops on one thread, the int8 layers on all of them.

A decoding step is a few hundred tiny torch ops (norms, rotary embedding, attention over the cache,
activations) around the int8 layers. With two or more torch threads each of them that torch runs in
parallel is an OpenMP fork-join whose closing barrier waits until every team thread has been
scheduled: on a machine where other processes hold the cores, a slice of the scheduler for an op worth
microseconds (SmolLM2's attention measured 27 ms a call beside other work). The int8 layers are the
step's real work: they stream the weights and keep every thread (their own sizing decides when a
second thread pays, see the C kernel's header).

:func:`lean_decoding` makes a model's decoding (every forward of at most ``max_tokens`` tokens, also
of a small batch, and ``generate()``'s own loop) run torch's own ops on one thread while the int8
kernels keep the thread count torch had; a longer forward (a long prompt's prefill) keeps torch's
count for every op. ``generate()`` gets it without any other change.
"""

from __future__ import annotations

import threading
import types

import torch
from torch import nn

from . import _native

__all__ = ["lean_decoding"]

_HOOKS = "_llm_int8_lean_decoding"
_active = threading.local()  # .stack: the kernel_threads_kept contexts of the forwards in progress


def _step_tokens(args, kwargs) -> int | None:
    """Tokens in this forward: input_ids [B, T] (B * T) or inputs_embeds [B, T, H]; None if neither."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 1:
        return embeds.numel() // max(embeds.shape[-1], 1)
    return None


def _lean_generate(self, *args, **kwargs):
    """``generate`` of a model under :func:`lean_decoding`: the loop's own ops (stopping criteria,
    logits processing, cache bookkeeping) on one thread too."""
    with _native.kernel_threads_kept(torch_threads=1):
        return type(self).generate(self, *args, **kwargs)


def lean_decoding(model: nn.Module, enabled: bool = True, max_tokens: int = 64) -> nn.Module:
    """Run ``model``'s decoding with torch's own ops on one thread and the int8 kernels on torch's
    thread count; forwards of more than ``max_tokens`` tokens (a long prompt's prefill) keep torch's
    thread count for every op. Returns ``model``.

    Covers ``model(...)`` and, for a model with ``generate``, the whole ``generate()`` loop (whose own
    per-token ops would otherwise fork too). ``lean_decoding(model, enabled=False)`` removes it.
    Outputs are unchanged (the same ops, on fewer threads); only where the time goes changes. torch's
    thread count is process-wide: another Python thread running torch ops meanwhile runs them on one
    thread too.
    """
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    for handle in getattr(model, _HOOKS, ()):
        handle.remove()
    model.__dict__.pop(_HOOKS, None)
    model.__dict__.pop("generate", None)
    if not enabled:
        return model

    def enter(module, args, kwargs):
        tokens = _step_tokens(args, kwargs)
        want = _native.kernel_threads() if tokens is None or tokens > max_tokens else 1
        context = None
        if want != torch.get_num_threads():
            context = _native.kernel_threads_kept(torch_threads=want)
            context.__enter__()
        if not hasattr(_active, "stack"):
            _active.stack = []
        _active.stack.append(context)

    def leave(module, args, kwargs, output):
        context = _active.stack.pop()
        if context is not None:
            context.__exit__(None, None, None)

    model.__dict__[_HOOKS] = (
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, with_kwargs=True, always_call=True),
    )
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(_lean_generate, model)  # a copy binds to itself
    return model
