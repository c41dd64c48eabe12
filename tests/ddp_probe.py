"""Run examples/finetune_lora.py counting what DistributedDataParallel sends (tests/test_distributed.py).

    torchrun --nproc-per-node 2 tests/ddp_probe.py PROBE.json -- <finetune_lora.py arguments>

Counts, per rank, the bytes DDP broadcasts (``torch.distributed._broadcast_coalesced``: the module
state at construction and the buffers before each forward) and the bytes its gradient all-reduce
sends (a comm hook around torch's default ``allreduce_hook``, which computes what the built-in
reduction computes) and the calls of ``PeftModel.save_pretrained``, and writes them with the names DDP ignores to PROBE.json (``{rank}`` in the
name is replaced). With ``LLM_INT8_PROBE_DEFAULT_DDP=1``, ``keep_frozen_local`` is skipped: plain DDP.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import llm_int8.parallel

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_lora.py"
counts = {"adapter_saves": 0, "broadcast_bytes": 0, "frozen_broadcast_bytes": 0, "broadcast_calls": 0, "allreduce_bytes": 0, "allreduce_calls": 0}
frozen_ptrs: set[int] = set()  # storage of the frozen tensors (llm_int8.parallel.frozen_state_names)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_broadcast_coalesced = dist._broadcast_coalesced


def counting_broadcast(process_group, tensors, buffer_size, src=0):
    counts["broadcast_bytes"] += _nbytes(tensors)
    counts["frozen_broadcast_bytes"] += _nbytes([t for t in tensors if t.data_ptr() in frozen_ptrs])
    counts["broadcast_calls"] += 1
    return _broadcast_coalesced(process_group, tensors, buffer_size, src)


def counting_hook(state, bucket):
    counts["allreduce_bytes"] += _nbytes([bucket.buffer()])
    counts["allreduce_calls"] += 1
    return allreduce_hook(state, bucket)


_ddp_init = DistributedDataParallel.__init__


def ddp_init(self, module, *args, **kwargs):
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    frozen_ptrs.update(state[name].data_ptr() for name in llm_int8.parallel.frozen_state_names(module))
    _ddp_init(self, module, *args, **kwargs)
    self.register_comm_hook(None, counting_hook)
    counts["ignored"] = sorted(self.parameters_to_ignore)
    synced = [(n, p) for n, p in module.named_parameters() if n not in self.parameters_to_ignore]
    counts["synced_param_names"] = [n for n, _ in synced]
    counts["synced_param_bytes"] = _nbytes([p for _, p in synced])
    counts["trainable_param_bytes"] = _nbytes([p for p in module.parameters() if p.requires_grad])
    unique = {t.data_ptr(): t for t in module.state_dict(keep_vars=True).values()}  # a tied head counts once
    counts["model_state_bytes"] = _nbytes(list(unique.values()))
    counts["other_buffer_bytes"] = _nbytes([b for n, b in module.named_buffers() if n not in self.parameters_to_ignore])


def main():
    probe_path, rest = sys.argv[1], sys.argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    dist._broadcast_coalesced = counting_broadcast
    DistributedDataParallel.__init__ = ddp_init
    save_pretrained = PeftModel.save_pretrained

    def counting_save(self, *args, **kwargs):
        counts["adapter_saves"] += 1
        return save_pretrained(self, *args, **kwargs)

    PeftModel.save_pretrained = counting_save
    if os.environ.get("LLM_INT8_PROBE_DEFAULT_DDP") == "1":
        llm_int8.parallel.keep_frozen_local = lambda model, *a, **k: []
    sys.argv = [str(EXAMPLE), *rest]
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    rank = dist.get_rank() if dist.is_initialized() else 0
    counts["threads"] = torch.get_num_threads()
    Path(probe_path.replace("{rank}", str(rank))).write_text(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
