"""LLM.int8() models over ``torch.distributed``: data-parallel adapters, tensor-parallel int8 layers.

Both work with any process-group backend (gloo for processes on CPUs, NCCL for GPUs): the code
below calls ``torch.distributed`` collectives only, never a backend by name.

**Data parallel** (:func:`keep_frozen_local`): ``DistributedDataParallel`` broadcasts every
parameter and buffer of rank 0 when it is built and, by default, every buffer again before each
forward. Under an adapter (LoRA) the int8 weights and their scales never change and every rank
loaded the same checkpoint, so this is all wasted traffic (the int8 weights of a 7B model are
7 GB). :func:`keep_frozen_local` names the frozen parameters and the int8 layers' buffers to DDP as
ignored, so that only the trainable parameters (the adapter) take part in synchronisation, and
first checks that every rank holds the same frozen state (a fingerprint of each tensor, gathered
from all ranks) and the same thresholds: what the broadcast would have guaranteed is verified.

**Tensor parallel** (:class:`Int8ColwiseParallel`, :class:`Int8RowwiseParallel`,
:func:`tensor_parallel`): ``ParallelStyle``\\ s for ``torch.distributed.tensor.parallel`` that
shard a ``Linear8bitLt`` in place.

* column-parallel: rank r keeps the output rows ``[r N/W, (r+1) N/W)`` of the int8 weight with
  their ``SCB`` entries and bias (row-wise scales shard with their rows: the codes and scales
  are those of the whole layer); the input is replicated, the output is the local slice of the
  output features.
* row-parallel: rank r keeps the input columns ``[r K/W, (r+1) K/W)`` of the int8 weight and the
  whole ``SCB`` (each row's absmax over all K columns: again the whole layer's codes); the input
  is the local slice of x's features. Each rank quantizes its own slice of x with its own per-row
  absmax and decomposes its own outlier columns (the outlier test is per column, so the union over
  ranks is the single-process set), and the partial outputs are summed with an all-reduce; the
  bias is added once, after the sum.

The shards are plain local tensors in the module (the int8 custom op has no DTensor sharding
rule); the styles use the device mesh for the rank, the size and the process group.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from .nn import Linear8bitLt

#: Elements fingerprinted per chunk (bounds the int64 temporaries).
_FINGERPRINT_CHUNK = 1 << 20
#: Weights of the position-dependent fingerprint sum: i mod this prime, plus one.
_FINGERPRINT_PRIME = 65521
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------------------------------
# Data parallel


def _int8_layers(model: nn.Module) -> list[tuple[str, Linear8bitLt]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear8bitLt)]


def frozen_state_names(model: nn.Module) -> list[str]:
    """Fully qualified names of what DDP need not synchronise in ``model``: every parameter that does
    not require a gradient, and every buffer of a ``Linear8bitLt`` (``SCB``, ``weight_format``, the
    calibrated ``fp_cols`` / ``fp_weight``). Other buffers keep DDP's usual treatment."""
    names = [name for name, p in model.named_parameters() if not p.requires_grad]
    for prefix, layer in _int8_layers(model):
        names += [f"{prefix}.{name}" if prefix else name for name, _ in layer.named_buffers(recurse=False)]
    return names


def _fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """Two int64 sums of ``tensor``'s bit patterns (plain, and weighted by position mod a prime):
    equal tensors give equal pairs; one changed element changes the plain sum, and a tensor from
    another checkpoint, or permuted, changes both but by a coincidence. Not a cryptographic hash:
    it catches mistakes (another file, another config), not tampering."""
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        flat = flat.contiguous().view(_INT_VIEW[flat.element_size()])
    plain = weighted = 0
    for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
        bits = flat[start : start + _FINGERPRINT_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + bits.numel(), dtype=torch.int64, device=bits.device)
        weights = weights.remainder_(_FINGERPRINT_PRIME).add_(1)
        plain += int(bits.sum())
        weighted += int((bits * weights).sum())
    wrap = lambda v: (v + 2**63) % 2**64 - 2**63  # noqa: E731  (Python ints to int64)
    return wrap(plain), wrap(weighted)


def _check_same_on_all_ranks(model: nn.Module, names: list[str], group, device, why: str) -> None:
    """Raise on every rank if any rank's tensors ``names`` or int8 thresholds differ from rank 0's
    (``why``: what depends on them being equal, for the message). The gathered fingerprints live on
    ``device`` (CUDA for NCCL, which gathers nothing else)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    rows = []
    for name in names:
        t = tensors[name]
        rows.append([*_fingerprint(t), t.numel(), zlib.crc32(str(t.dtype).encode())])
    layers = _int8_layers(model)
    thresholds = [layer.threshold for _, layer in layers]
    local = torch.tensor(rows + [[0, 0, 0, 0]], dtype=torch.int64, device=device)  # a row at the end: never empty
    local_thresholds = torch.tensor(thresholds + [0.0], dtype=torch.float64, device=device)
    world = dist.get_world_size(group)
    # the counts first: a rank with another model must get this error, not a shape error in all_gather
    count = torch.tensor([len(names), len(thresholds)], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    if any(not torch.equal(c, counts[0]) for c in counts):
        per_rank = ", ".join(f"rank {r}: {int(c[0])} tensors, {int(c[1])} int8 layers" for r, c in enumerate(counts))
        raise RuntimeError(
            f"the ranks hold different models ({per_rank}); {why}, so every rank must load the same checkpoint "
            "with the same quantization config"
        )
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    gathered_thresholds = [torch.empty_like(local_thresholds) for _ in range(world)]
    dist.all_gather(gathered_thresholds, local_thresholds, group=group)
    for rank in range(1, world):
        differs = (gathered[rank][:-1] != gathered[0][:-1]).any(dim=1).nonzero().flatten().tolist()
        if differs:
            shown = ", ".join(names[i] for i in differs[:3]) + (f" and {len(differs) - 3} more" if len(differs) > 3 else "")
            raise RuntimeError(
                f"rank {rank}'s weights differ from rank 0's ({len(differs)} tensors: {shown}); {why}, so every rank "
                "must load the same checkpoint (same files, same quantization config)"
            )
        mismatch = (gathered_thresholds[rank][:-1] != gathered_thresholds[0][:-1]).nonzero().flatten().tolist()
        if mismatch:
            i = mismatch[0]
            raise RuntimeError(
                f"rank {rank} quantizes with threshold {float(gathered_thresholds[rank][i])} where rank 0 uses "
                f"{float(gathered_thresholds[0][i])} (layer {layers[i][0]}): pass the same threshold on every rank"
            )


def keep_frozen_local(model: nn.Module, group=None, check: bool = True) -> list[str]:
    """Tell ``DistributedDataParallel`` to synchronise only the trainable parameters of ``model``.

    Call it on the model DDP will wrap (for the transformers ``Trainer``: the peft model, after
    ``get_peft_model``), before DDP is built. It sets the names returned by
    :func:`frozen_state_names` as ``model._ddp_params_and_buffers_to_ignore`` (DDP's documented
    hook, ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``): these tensors
    are then neither broadcast at construction nor before each forward, and none of them is in the
    gradient all-reduce (that takes only parameters that require a gradient anyway).

    With ``check`` and an initialized process group, first verifies that every rank holds the same
    frozen tensors and thresholds (one all-gather of a fingerprint per tensor), raising on every
    rank otherwise. Returns the ignored names.
    """
    names = frozen_state_names(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameter: data-parallel training of an int8 model trains adapters; "
            "add them first (e.g. peft.get_peft_model with a LoraConfig)"
        )
    if check and dist.is_available() and dist.is_initialized():
        device = next(model.parameters()).device
        _check_same_on_all_ranks(model, names, group, device, "data-parallel training does not broadcast the frozen weights")
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


# ------------------------------------------------------------------------------------------------
# Tensor parallel

COLWISE = "colwise"
ROWWISE = "rowwise"


def _shard_bounds(size: int, mesh, what: str, where: str) -> tuple[int, int]:
    world, rank = mesh.size(), mesh.get_local_rank()
    if size % world:
        raise ValueError(
            f"{where}: {what} = {size} is not divisible by the tensor-parallel world size {world}; run with a world "
            f"size that divides it, or leave this layer out of the plan (it is then replicated)"
        )
    step = size // world
    return rank * step, (rank + 1) * step


def _check_int8(module: nn.Module, style: str) -> Linear8bitLt:
    if not isinstance(module, Linear8bitLt):
        raise TypeError(
            f"{style} shards a Linear8bitLt, got {type(module).__name__}: quantize the model first "
            "(llm_int8.quantize_ or from_pretrained(..., quantization_config=LLMInt8Config())), or use torch's own "
            "ColwiseParallel / RowwiseParallel for float layers"
        )
    if getattr(module, "tp_style", None) is not None:
        raise ValueError(f"this Linear8bitLt is already sharded ({module.tp_style}); shard each model once")
    return module


class Int8ColwiseParallel(ParallelStyle):
    """Shard a ``Linear8bitLt`` by output features: rank r keeps weight rows, ``SCB`` entries, bias
    entries and calibrated fp-weight rows ``[r N/W, (r+1) N/W)``. Input: the whole x (replicated);
    output: this rank's slice of the output features. The codes and scales are those of the whole
    layer, so each output element is computed exactly as on one process."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        layer = _check_int8(module, COLWISE)
        lo, hi = _shard_bounds(layer.out_features, device_mesh, "out_features", f"{COLWISE} {layer.extra_repr()}")
        with torch.no_grad():
            layer.weight = nn.Parameter(layer.weight[lo:hi].clone(), requires_grad=False)
            layer.SCB = layer.SCB[lo:hi].clone()
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias[lo:hi].clone(), requires_grad=layer.bias.requires_grad)
            if layer.fp_weight is not None:
                layer.fp_weight = layer.fp_weight[lo:hi].clone()
        layer.out_features = hi - lo
        layer._bound = None
        layer.tp_style = f"{COLWISE} rows [{lo}, {hi}) of {device_mesh.size() * (hi - lo)}"
        return layer


class Int8RowwiseParallel(ParallelStyle):
    """Shard a ``Linear8bitLt`` by input features: rank r keeps weight columns ``[r K/W, (r+1) K/W)``
    and the whole ``SCB`` (row absmax over all K: the whole layer's codes); calibrated fp columns
    in its range move along, re-indexed. Input: this rank's slice of x's features (what a
    column-parallel layer before it produced); each rank quantizes it with its own per-row absmax
    and decomposes its own outlier columns. Output: the partial products summed over the ranks by
    an all-reduce (autograd-aware, ``torch.distributed.nn.functional.all_reduce``), then the bias,
    which only rank 0 keeps, so that it is added once."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        layer = _check_int8(module, ROWWISE)
        lo, hi = _shard_bounds(layer.in_features, device_mesh, "in_features", f"{ROWWISE} {layer.extra_repr()}")
        with torch.no_grad():
            layer.weight = nn.Parameter(layer.weight[:, lo:hi].clone(), requires_grad=False)
            if layer.fp_cols is not None:
                keep = (layer.fp_cols >= lo) & (layer.fp_cols < hi)
                fp_cols, fp_weight = layer.fp_cols[keep] - lo, layer.fp_weight[:, keep].clone()
                layer.fp_cols, layer.fp_weight = (fp_cols, fp_weight) if fp_cols.numel() else (None, None)
            if layer.bias is not None and device_mesh.get_local_rank() != 0:
                layer.bias = None
        layer.in_features = hi - lo
        layer._bound = None
        layer.tp_style = f"{ROWWISE} columns [{lo}, {hi}) of {device_mesh.size() * (hi - lo)}"
        group = device_mesh.get_group()
        layer.register_forward_hook(lambda _module, _args, partial: _sum_over_ranks(partial, group))
        return layer


def _sum_over_ranks(partial: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(partial, op=dist.ReduceOp.SUM, group=group)


def default_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The transformers tensor-parallel plan of ``model`` (``config.base_model_tp_plan``, e.g. Llama's
    q/k/v/gate/up column-parallel, o/down row-parallel) as int8 styles, keyed by module path
    patterns from the model's root. Entries that are not "colwise" / "rowwise" are left out (those
    modules stay whole on every rank)."""
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no config.base_model_tp_plan: pass plan={{module pattern: "
            "Int8ColwiseParallel() or Int8RowwiseParallel()}"
        )
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        prefix += "."
    else:
        prefix = ""
    styles = {COLWISE: Int8ColwiseParallel, ROWWISE: Int8RowwiseParallel}
    return {prefix + key: styles[value]() for key, value in plan.items() if value in styles}


def _check_heads(model: nn.Module, plan: dict, world: int) -> None:
    """Attention projections split by output features must split whole heads (and whole KV heads)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if heads is None or not any("attn" in key for key in plan):
        return
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % world or kv_heads % world:
        raise ValueError(
            f"the model has {heads} attention heads and {kv_heads} key/value heads, which {world} ranks cannot split "
            f"evenly: use a world size that divides both, or a plan without the attention projections (e.g. "
            f"{{k: v for k, v in default_plan(model).items() if 'mlp' in k}}: the MLP sharded, attention replicated)"
        )


def tensor_parallel(model: nn.Module, device_mesh=None, plan: dict | None = None, check: bool = True) -> nn.Module:
    """Shard ``model``'s int8 layers over the ranks of ``device_mesh`` (default: all ranks, one
    dimension, on the device type of the model's weights) in place, and return it.

    The model may sit on the CPU while a CUDA mesh shards it: each rank then moves only its shards
    to its GPU (``model.to(f"cuda:{local_rank}")``) and the GPU never holds the whole model.

    Every rank calls it on the same int8 model (each loaded the checkpoint). ``plan`` maps module
    path patterns (``fnmatch``, as ``parallelize_module``) to :class:`Int8ColwiseParallel` /
    :class:`Int8RowwiseParallel`; default :func:`default_plan`. With ``check``, first verifies that
    all ranks hold the same int8 weights, scales and thresholds (raising on every rank otherwise).
    Layers outside the plan, embeddings, norms and the head stay whole on every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "tensor_parallel needs an initialized process group: start the processes with torchrun "
            "(torchrun --nproc-per-node 2 script.py) and call torch.distributed.init_process_group() first"
        )
    if device_mesh is None:
        device_type = next(model.parameters()).device.type
        device_mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    plan = default_plan(model) if plan is None else plan
    _check_heads(model, plan, device_mesh.size())
    if check:
        names = [f"{prefix}.{leaf}" for prefix, layer in _int8_layers(model)
                 for leaf, _ in layer.named_parameters(recurse=False)] + \
                [f"{prefix}.{leaf}" for prefix, layer in _int8_layers(model)
                 for leaf, _ in layer.named_buffers(recurse=False)]
        _check_same_on_all_ranks(model, names, device_mesh.get_group(), device_mesh.device_type,
                                 "each rank keeps its shard of the same layers")
    return parallelize_module(model, device_mesh, plan)


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the int8 weights of ``model``'s ``Linear8bitLt`` layers on this rank."""
    return sum(layer.weight.numel() * layer.weight.element_size() for _, layer in _int8_layers(model))
