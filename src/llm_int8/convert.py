"""Swap a model's linear layers for ``Linear8bitLt``: one config, one function, one filter."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .functional import _check_threshold
from .nn import Embedding8bit, Linear8bitLt
from .saved_format import weight_format_tensor


@dataclass
class Int8Config:
    """How ``quantize_`` converts a model.

    threshold: the outlier threshold alpha (0 disables the decomposition; the paper uses 6.0).
    skip_modules: names of modules to leave in float. A name matches every module whose qualified
        name contains it as whole dotted parts ("mlp", "lm_head", "layers.0"). ``None`` (the default) skips the
        output head (``model.get_output_embeddings()`` or a module named ``lm_head``) and every
        linear layer whose weight is tied to an embedding; a list replaces that default, except that
        a layer whose weight is tied to an embedding always stays float (see :func:`tied_layers`).
    fp_columns: calibrated outlier columns, ``{layer name: [input column, ...]}`` (see
        ``llm_int8.eval.calibrate``): those input columns of that layer always take the 16-bit path,
        against its weight columns stored in fp16 (``fp_cols`` / ``fp_weight`` in the state dict).
    quantize_head: also convert the output head (``model.get_output_embeddings()``, else a layer named
        ``lm_head``) to a ``Linear8bitLt``, the same LLM.int8() layer as every other. An ``nn.Embedding``
        whose weight *is* the head's weight (a tied input embedding, as in SmolLM2 and Qwen2.5) becomes an
        :class:`~llm_int8.nn.Embedding8bit` holding the head's own int8 codes and ``SCB``: the float table
        goes, and the tie stays. Default ``False``: the head and tied layers stay float, as bitsandbytes
        keeps them by default (and it has no int8 embedding). With an explicit
        ``skip_modules`` the list must not name the head.
    """

    threshold: float = 6.0
    skip_modules: list[str] | None = None
    fp_columns: dict[str, list[int]] | None = None
    quantize_head: bool = False

    def __post_init__(self):
        self.threshold = _check_threshold(self.threshold, "Int8Config.threshold")
        if self.skip_modules is not None:
            if isinstance(self.skip_modules, str) or not all(isinstance(s, str) for s in self.skip_modules):
                raise TypeError(f"Int8Config.skip_modules must be a list of module names, got {self.skip_modules!r}")
            self.skip_modules = list(self.skip_modules)
        if self.fp_columns is not None:
            if not isinstance(self.fp_columns, dict) or not all(
                isinstance(name, str) and all(isinstance(c, int) and c >= 0 for c in cols)
                for name, cols in self.fp_columns.items()
            ):
                raise TypeError(
                    "Int8Config.fp_columns must map layer names to lists of input column indices >= 0, "
                    f"got {self.fp_columns!r}"
                )
        if not isinstance(self.quantize_head, bool):
            raise TypeError(f"Int8Config.quantize_head must be True or False, got {self.quantize_head!r}")


@dataclass
class QuantizeReport:
    """What ``quantize_`` did: the converted and skipped module names and the footprints in bytes."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    int8_embeddings: list[str] = field(default_factory=list)  # Embedding8bit sharing the head's int8 weight

    def __str__(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        tied = f", int8 embeddings tied to the head: {', '.join(self.int8_embeddings)}" if self.int8_embeddings else ""
        return (
            f"converted {len(self.converted)} linear layers to int8, kept {len(self.skipped)} in float "
            f"({', '.join(self.skipped) or 'none'}){tied}; memory {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({ratio:.3f}x)"
        )


def memory_footprint(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once.

    The one footprint every memory report uses (``QuantizeReport``, the transformers integration's
    report, the CLI). Tensors sharing storage (a head tied to the embedding) count once. On the meta
    device, where there is no storage, a parameter counts once per object, and a transformers model's
    declared ties (``all_tied_weights_keys``: tied name -> source name) are honoured, so a meta skeleton
    whose head is not tied yet gives the footprint of the model it becomes.
    """
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
    params = dict(model.named_parameters())
    seen, total = set(), 0
    for name, tensor in list(params.items()) + list(model.named_buffers()):
        if tensor.is_meta:
            source = params.get(ties.get(name, ""))
            key = id(tensor) if source is None or source is tensor else id(source)
        else:
            key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _conv1d_type():
    """transformers' GPT-2 ``Conv1D`` (weight stored [in, out]) if transformers is loaded, else None.

    A model can only hold a Conv1D if transformers was imported, so the core never imports it.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_convertible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The [out, in] weight of a convertible layer: an ``nn.Linear``'s own, the transpose of a GPT-2
    ``Conv1D``'s (which computes ``x @ weight + bias`` with weight stored [in, out]).

    ``weight``: a tensor that stands for this layer's weight, laid out as the layer stores it (a
    checkpoint tensor streaming in); default the layer's own. Every path orients weights here.
    """
    weight = module.weight if weight is None else weight
    return weight.T if _is_conv1d(module) else weight


def replace_modules(
    model: nn.Module, filter: Callable[[nn.Module, str], bool], make: Callable[[nn.Module, str], nn.Module]
) -> list[str]:
    """Replace, in place, every submodule for which ``filter(module, qualified_name)`` is true by
    ``make(module, qualified_name)`` (under ``torch.no_grad()``); returns their names, in module order.

    The names are chosen before anything is replaced. If ``make`` raises, the modules already replaced
    are put back and the error propagates: the model is left as it was. Every module swap of the
    package (``quantize_``, the evaluation's methods, the transformers integration's dequantization)
    goes through here.
    """
    names = [name for name, module in model.named_modules() if filter(module, name)]
    if "" in names:
        raise TypeError("the model itself matches, and a module cannot replace itself in place")
    swapped = []  # (parent, attribute, original): put back if a later make() raises
    try:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            with torch.no_grad():
                setattr(parent, child, make(original, name))
            swapped.append((parent, child, original))
    except BaseException:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)
        raise
    return names


def tied_layers(model: nn.Module) -> list[str]:
    """The convertible layers whose weight is tied to an embedding's: always kept float.

    A tied layer shares its weight with an ``nn.Embedding`` (same tensor or storage; on a transformers
    model also by declaration, ``all_tied_weights_keys``, which covers the meta skeleton of
    ``from_pretrained`` before transformers ties it). The embedding stays float, so converting such a
    layer could only untie it: a second (int8) copy of the weight, and on ``from_pretrained`` a layer
    that transformers' tying then hands the float weight. So every path (``quantize_``,
    ``from_pretrained``, ``quantize_model``, the GGUF loader) keeps them float, whatever ``skip_modules``
    says. To quantize a tied head, untie it first (e.g. ``tie_word_embeddings=False`` in the config).
    """
    embeddings = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    embedding_ids = {id(w) for w in embeddings.values()}
    embedding_storages = {w.untyped_storage().data_ptr() for w in embeddings.values() if not w.is_meta}
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
    declared = {  # the other side of every declared tie whose one side is an embedding's weight
        other.removesuffix(".weight") for a, b in ties.items() for one, other in ((a, b), (b, a)) if one in embeddings
    }
    tied = []
    for name, module in model.named_modules():
        if not is_convertible(module):
            continue
        weight = module.weight
        if (id(weight) in embedding_ids or name in declared
                or (not weight.is_meta and weight.untyped_storage().data_ptr() in embedding_storages)):
            tied.append(name)
    return tied


def default_skip_modules(model: nn.Module) -> list[str]:
    """The output head and every convertible layer whose weight is an embedding's weight."""
    names = {id(m): name for name, m in model.named_modules()}
    skip = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head) in names:
        skip.append(names[id(head)])
    for name in tied_layers(model):
        if name not in skip:
            skip.append(name)
    for name, module in model.named_modules():
        if is_convertible(module) and name not in skip and (name == "lm_head" or name.endswith(".lm_head")):
            skip.append(name)
    return skip


def output_head_name(model: nn.Module) -> str | None:
    """The qualified name of the output head: ``model.get_output_embeddings()`` when the model has one,
    else the first linear layer named ``lm_head`` (float or already int8); None when there is neither."""
    names = {id(m): name for name, m in model.named_modules()}

    def linear(module):
        return is_convertible(module) or isinstance(module, Linear8bitLt)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head) in names and linear(head):
        return names[id(head)]
    for name, module in model.named_modules():
        if linear(module) and (name == "lm_head" or name.endswith(".lm_head")):
            return name
    return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors are one (the same object, or views of the same bytes with one shape)."""
    if a is b:
        return True
    if a.is_meta or b.is_meta or a.device != b.device:
        return False
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def embeddings_tied_to(model: nn.Module, layer_name: str) -> list[str]:
    """Names of the ``nn.Embedding`` modules whose weight is the weight of the layer ``layer_name``."""
    weight = model.get_submodule(layer_name).weight
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and _same_tensor(m.weight, weight)
    ]


def share_tied_scales(model: nn.Module) -> list[tuple[str, str]]:
    """Give every int8 head whose ``weight`` is an :class:`Embedding8bit`'s weight that embedding's ``SCB``
    too; returns the (head, embedding) pairs.

    A loader that re-ties a head to its embedding (transformers' ``tie_weights``, which sets the head's
    ``weight`` to the embedding's Parameter) ties the codes but not the scales; this ties the scales, so
    head and embedding hold one int8 table and one ``SCB`` again.
    """
    embeddings = {id(m.weight): (name, m) for name, m in model.named_modules() if isinstance(m, Embedding8bit)}
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, Linear8bitLt) and id(module.weight) in embeddings:
            embedding_name, embedding = embeddings[id(module.weight)]
            module.SCB = embedding.SCB
            if module.weight_format is None or module.weight_format.is_meta:  # (never loaded: the head had no tensor)
                module.weight_format = weight_format_tensor(module.weight.device)
            pairs.append((name, embedding_name))
    return pairs


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """True when some pattern's dotted parts appear as a run of name's parts ("mlp" matches
    "model.layers.0.mlp.up_proj"; "layers.0" matches everything below it; "proj" matches nothing)."""
    parts = name.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        if any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
            return True
    return False


def select_layers(
    model: nn.Module, skip_modules: list[str] | None = None, filter_fn: Callable[[nn.Module, str], bool] | None = None,
    int8_head: str | None = None,
) -> tuple[list[str], list[str]]:
    """(converted, kept float): the qualified names of the convertible layers (``nn.Linear`` / ``Conv1D``)
    that ``quantize_`` converts and of those it leaves in float, in module order.

    ``skip_modules`` as in :class:`Int8Config` (``None``: the output head and embedding-tied layers);
    ``filter_fn(module, name)`` returning False keeps a layer in float too, and embedding-tied layers
    always stay float (:func:`tied_layers`), except ``int8_head``: the head that ``quantize_head=True``
    converts together with the embeddings tied to it (which then share its int8 codes). Every module swap in the package (``quantize_``,
    ``from_pretrained``, the evaluation's methods and activation hooks) chooses its layers here.
    """
    skip = default_skip_modules(model) if skip_modules is None else skip_modules
    tied = set(tied_layers(model)) - {int8_head}
    targets, skipped = [], []
    for name, module in model.named_modules():
        if not is_convertible(module):
            continue
        if name in tied or _matches(name, skip) or (filter_fn is not None and not filter_fn(module, name)):
            skipped.append(name)
        else:
            targets.append(name)
    return targets, skipped


def convert_module(
    module: nn.Module, threshold: float, fp_cols: list[int] | None = None, name: str = ""
) -> Linear8bitLt:
    """One ``nn.Linear`` or ``Conv1D`` as a ``Linear8bitLt`` on the same device; ``fp_cols`` are
    input columns kept in fp16 (calibrated outlier dims); ``name`` (its qualified name) is what errors call it."""
    weight = linear_weight(module)
    layer = Linear8bitLt.from_weight(weight, module.bias, threshold, name=f"{name}.weight" if name else "weight")
    if fp_cols:
        layer.set_fp_columns(torch.tensor(fp_cols, dtype=torch.int64), weight.detach().to(torch.float16))
    return layer


def quantize_(
    model: nn.Module,
    config: Int8Config | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> QuantizeReport:
    """Replace, in place, every ``nn.Linear`` / ``Conv1D`` of ``model`` by a ``Linear8bitLt``.

    Skipped: the modules named by ``config.skip_modules`` (see :class:`Int8Config` for the default)
    and those for which ``filter_fn(module, qualified_name)`` returns False. Returns a report with
    the converted names and the memory footprint before and after. A layer that cannot be
    converted (a weight holding NaN/Inf) raises, and the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, qualified_name) -> bool, got {type(filter_fn).__name__}")
    config = config or Int8Config()
    if not isinstance(config, Int8Config):
        raise TypeError(f"config must be an llm_int8.Int8Config, got {type(config).__name__}")
    report = QuantizeReport(bytes_before=memory_footprint(model))
    skip_modules, head, tied = config.skip_modules, None, []
    if config.quantize_head:
        skip_modules, head = _skip_modules_with_head(model, skip_modules)
        tied = embeddings_tied_to(model, head)
    targets, report.skipped = select_layers(model, skip_modules, filter_fn, int8_head=head)
    if "" in targets:
        raise TypeError("the model is itself a linear layer; convert it with Linear8bitLt.from_linear(layer)")
    chosen = set(targets)
    fp_columns = config.fp_columns or {}
    report.converted = replace_modules(  # a refused layer raises with the model left as it was given
        model, lambda module, name: name in chosen,
        lambda module, name: convert_module(module, config.threshold, fp_columns.get(name), name),
    )
    if head in targets:  # (a filter_fn may have kept it float: then its tied embeddings stay float too)
        head_module = model.get_submodule(head)
        tied = set(tied)
        report.int8_embeddings = replace_modules(
            model, lambda module, name: name in tied, lambda module, name: Embedding8bit.tied_to(head_module, module)
        )
    report.bytes_after = memory_footprint(model)
    return report


def _skip_modules_with_head(model: nn.Module, skip_modules: list[str] | None) -> tuple[list[str], str]:
    """(the skip list for ``quantize_head=True``, the head's name): the default list without the head, or
    the given list, which must not name the head."""
    head = output_head_name(model)
    if head is None:
        raise ValueError(
            "Int8Config(quantize_head=True), but the model has no output head (no get_output_embeddings() and no "
            "linear layer named lm_head); drop quantize_head, or name the layers to keep float in skip_modules"
        )
    if skip_modules is None:
        return [name for name in default_skip_modules(model) if name != head], head
    if _matches(head, skip_modules):
        raise ValueError(
            f"Int8Config(quantize_head=True) converts the output head {head!r}, but skip_modules "
            f"{skip_modules} keeps it float; drop it from skip_modules or set quantize_head=False"
        )
    return list(skip_modules), head
