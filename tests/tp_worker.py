"""One rank of the tensor-parallel checks in tests/test_distributed.py (run under torchrun, 2 processes).

    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py CHECKPOINT OUT.json
    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py CHECKPOINT --missing-rank=1   (must fail)

Writes OUT.json (``{rank}`` replaced) with what each check measured; the test asserts on it. Each
check that must fail records the error class and message instead of raising.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from llm_int8 import Linear8bitLt
from llm_int8.parallel import (
    Int8ColwiseParallel,
    Int8RowwiseParallel,
    default_plan,
    int8_weight_bytes,
    keep_frozen_local,
    tensor_parallel,
)
from llm_int8._ops import INT8_MAX

U32 = 2.0**-24
THRESHOLD = 3.0  # puts a few columns of the random model's activations on the float path


def _error(fn) -> str | None:
    try:
        fn()
    except (ValueError, RuntimeError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def layer_checks(out: dict, calibrated: bool) -> None:
    """One Linear8bitLt (96 x 128, x with outlier columns; ``calibrated``: with fp columns too) sharded
    each way, against the whole layer. Results go under keys suffixed ``_fp`` when calibrated."""
    from torch.distributed.tensor.parallel import parallelize_module

    key = (lambda name: name + "_fp") if calibrated else (lambda name: name)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(5, 128, generator=gen)
    x[:, [3, 70, 100]] *= 20  # outlier columns in both halves of K
    full = Linear8bitLt.from_weight(weight, bias, threshold=THRESHOLD)
    float_cols = (x.abs() >= THRESHOLD).any(dim=0)
    if calibrated:
        fp_cols = torch.tensor([5, 64, 127])  # calibrated columns in both halves, one on the boundary
        full.set_fp_columns(fp_cols, weight)
        float_cols[fp_cols] = True
    with torch.no_grad():
        y_full = full(x)
        world, rank = dist.get_world_size(), dist.get_rank()

        col = parallelize_module(copy.deepcopy(full), _mesh(), Int8ColwiseParallel())
        parts = [torch.empty(5, 96 // world) for _ in range(world)]
        dist.all_gather(parts, col(x).contiguous())
        out[key("colwise_equal")] = torch.equal(torch.cat(parts, dim=1), y_full)
        out[key("colwise_scb_is_slice")] = torch.equal(col.SCB, full.SCB[rank * 48 : (rank + 1) * 48])

        row = parallelize_module(copy.deepcopy(full), _mesh(), Int8RowwiseParallel())
        k = 128 // world
        y_row = row(x[:, rank * k : (rank + 1) * k])
        out[key("rowwise_codes_are_slice")] = torch.equal(row.weight, full.weight[:, rank * k : (rank + 1) * k])
        out[key("rowwise_scb_whole")] = torch.equal(row.SCB, full.SCB)
        # Derived bound: both runs take the same columns in float (the outlier test is per column; fp
        # columns are fixed); on the others each x element is rounded to its row's grid, off by at most
        # half a step: absmax/254 for one process, shard absmax/254 with two. So
        # |y_row - y_full| <= sum_j (s_i + s_i,r(j))/254 * |w_dq,kj|, plus float32 rounding of both
        # (K * 2^-24 relative to |x| @ |w|.T).
        xm = x.masked_fill(float_cols, 0).abs()
        s_full = xm.amax(dim=1, keepdim=True)
        s_shard = torch.cat([xm[:, r * k : (r + 1) * k].amax(dim=1, keepdim=True).expand(-1, k) for r in range(world)], 1)
        w_dq = full.dequantize().double()
        step = ((s_full + s_shard) / (2 * INT8_MAX)).double().masked_fill(float_cols, 0)
        bound = step @ w_dq.abs().T + 2 * 128 * U32 * (x.double().abs() @ w_dq.abs().T)
        diff = (y_row.double() - y_full.double()).abs()
        out[key("rowwise_within_bound")] = bool((diff <= bound).all())
        out[key("rowwise_max_diff_over_bound")] = float((diff / bound).max())
        out[key("rowwise_differs")] = not torch.equal(y_row, y_full)  # the shards' own x scales were used
        if calibrated:
            lo = rank * k
            expected = fp_cols[(fp_cols >= lo) & (fp_cols < lo + k)] - lo
            out["rowwise_fp_cols_local"] = torch.equal(row.fp_cols, expected)
            return

        out["indivisible"] = _error(lambda: parallelize_module(
            Linear8bitLt.from_weight(torch.randn(5, 8)), _mesh(), Int8ColwiseParallel()))
        out["indivisible_rowwise"] = _error(lambda: parallelize_module(
            Linear8bitLt.from_weight(torch.randn(8, 5)), _mesh(), Int8RowwiseParallel()))
        out["not_int8"] = _error(lambda: parallelize_module(nn.Linear(8, 8), _mesh(), Int8RowwiseParallel()))
        out["twice"] = _error(lambda: parallelize_module(col, _mesh(), Int8ColwiseParallel()))


def model_checks(checkpoint: str, out: dict) -> None:
    import transformers

    from llm_int8 import LLMInt8Config
    from llm_int8.eval.data import load_corpus, split_tokens, token_windows

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=LLMInt8Config(threshold=THRESHOLD)).eval()

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = torch.tensor(tokenizer(load_corpus("shakespeare")[-200_000:], add_special_tokens=False)["input_ids"])
    windows = token_windows(split_tokens(ids)[1], n_windows=8, seq_len=32)

    model = load()
    weight_only = copy.deepcopy(model)  # C: the same int8 weights, x not quantized (the reference of the bound)
    for name, layer in list(weight_only.named_modules()):
        if isinstance(layer, Linear8bitLt):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.data = layer.dequantize()
            if layer.bias is not None:
                linear.bias.data = layer.bias.data.float()
            weight_only.set_submodule(name, linear)

    def nll_per_token(m):
        with torch.no_grad():
            logits = m(input_ids=windows).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                          reduction="none")
        return logits, nll

    logits_one, nll_one = nll_per_token(model)
    logits_c, nll_c = nll_per_token(weight_only)
    bytes_before = int8_weight_bytes(model)
    scb_before = sum(layer.SCB.numel() * 4 for layer in model.modules() if isinstance(layer, Linear8bitLt))
    tensor_parallel(model)
    logits_tp, nll_tp = nll_per_token(model)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    out.update(
        bytes_before=bytes_before, bytes_after=int8_weight_bytes(model),
        scb_bytes_before=scb_before,
        scb_bytes_after=sum(layer.SCB.numel() * 4 for layer in model.modules() if isinstance(layer, Linear8bitLt)),
        sharded_layers=sum(getattr(m, "tp_style", None) is not None for m in model.modules()),
        rel_tp_vs_one=rel(logits_tp, logits_one), rel_one_vs_weight_only=rel(logits_one, logits_c),
        nll_one=float(nll_one.mean()), nll_tp=float(nll_tp.mean()), nll_weight_only=float(nll_c.mean()),
        nll_std_error=float(nll_one.std() / nll_one.numel() ** 0.5), n_tokens=nll_one.numel(),
        logits_tp_equal_on_ranks=None,
    )
    gathered = [torch.empty_like(logits_tp) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, logits_tp.contiguous())
    out["logits_tp_equal_on_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)

    # bad setups: each must fail on every rank, with the reason
    rank = dist.get_rank()
    other = load()
    if rank == 1:
        other.model.layers[0].mlp.up_proj.threshold = 4.0
    out["threshold_mismatch"] = _error(lambda: tensor_parallel(other))
    other = load()
    if rank == 1:
        with torch.no_grad():
            other.model.layers[1].self_attn.k_proj.weight[0, 0] += 1
    out["weights_mismatch"] = _error(lambda: tensor_parallel(other))
    other = load()
    if rank == 1:
        other.model.layers[1].self_attn.k_proj.threshold = 4.0
    for p in other.parameters():
        p.requires_grad_(False)
    other.lm_head.weight.requires_grad_(True)
    out["ddp_threshold_mismatch"] = _error(lambda: keep_frozen_local(other))
    other = load()
    if rank == 1:  # a rank that loaded one layer in float (another quantization config): another model
        layer = other.model.layers[1].mlp.down_proj
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight.data = layer.dequantize()
        other.model.layers[1].mlp.down_proj = linear
    out["model_mismatch"] = _error(lambda: tensor_parallel(other))
    other = load()
    other.config.num_attention_heads, other.config.num_key_value_heads = 3, 3
    out["heads"] = _error(lambda: tensor_parallel(other))
    out["mlp_only_plan_keys"] = sorted(k for k in default_plan(other) if "mlp" in k)


def missing_checkpoint(checkpoint: str, missing_rank: int) -> None:
    """Rank ``missing_rank`` is pointed at a checkpoint folder that does not exist; the others load theirs and
    go on to shard. The launch must fail (that rank's error, the others stopped), not hang."""
    import transformers

    from llm_int8 import LLMInt8Config

    path = checkpoint + "-missing" if dist.get_rank() == missing_rank else checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=LLMInt8Config(threshold=THRESHOLD))
    tensor_parallel(model)  # the other ranks wait here for the missing one: torchrun must stop them
    raise AssertionError("tensor_parallel returned on a rank although another rank has no checkpoint")


def main():
    checkpoint, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if out_path.startswith("--missing-rank="):
        missing_checkpoint(checkpoint, int(out_path.split("=", 1)[1]))
    out: dict = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    layer_checks(out, calibrated=False)
    layer_checks(out, calibrated=True)
    model_checks(checkpoint, out)
    with open(out_path.replace("{rank}", str(dist.get_rank())), "w") as f:
        json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
