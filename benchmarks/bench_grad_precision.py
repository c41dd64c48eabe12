"""How precise is the input gradient through a frozen int8 weight: ours (both backward paths) vs bitsandbytes?

For weights of SmolLM2-135M's and Qwen2.5-1.5B's linear shapes (random normal, std K^-1/2, with a few
large columns as trained weights have), each quantized once (the same int8 codes and SCB for every
backend), and inputs with a random output gradient (float32, or --dtype), the input gradient
``grad_x = grad_out @ W^`` (W^ = codes * SCB / 127, the dequantized weight) is computed

* by our op's backward where the AVX-512 BF16 kernel runs (the scaled gradient rounded to bfloat16);
* by our op's backward on the float32 path (what every CPU without AVX-512 BF16 runs: AVX2), forced
  here by reporting the kernel unavailable;
* by bitsandbytes' ``Linear8bitLt`` loaded with the same state dict (eval mode and training mode);

and compared with the float64 product of the same gradient and W^. Printed per shape: the relative
Frobenius error ``||grad_x - ref|| / ||ref||`` and the largest error per element relative to
``sum_n |g_n| |W^_nk|`` (the scale the rounding bounds are stated in).

    python benchmarks/bench_grad_precision.py [--rows 256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import logging
from unittest import mock

import torch

from llm_int8 import Linear8bitLt, _native
from llm_int8.eval.speed import cpu_name

SHAPES = [  # (K in, N out)
    (576, 576), (576, 1536), (1536, 576),  # SmolLM2-135M: q/o, gate/up, down
    (1536, 1536), (1536, 8960), (8960, 1536),  # Qwen2.5-1.5B
]


def make_weight(k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen) * k**-0.5
    cols = torch.randperm(k, generator=gen)[:4]
    w[:, cols] *= 8.0  # a few large input columns, as in trained weights
    return w


def errors(grad_x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    diff = grad_x.double() - ref
    return float(diff.norm() / ref.norm()), float((diff.abs() / scale).max())


def ours(layer: Linear8bitLt, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    layer(x).backward(g)
    return x.grad


def bnb_grad(bnb_layer, x: torch.Tensor, g: torch.Tensor, train: bool) -> torch.Tensor:
    bnb_layer.train(train)
    x = x.clone().requires_grad_(True)
    bnb_layer(x).backward(g)
    return x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="rows M of x and of the output gradient")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of x and of the output gradient (the gradient comes back in it)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    try:
        import bitsandbytes as bnb

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    except ImportError:
        bnb = None
    print(f"machine: {cpu_name()}; AVX-512 BF16 backward kernel: {_native.grad_bf16_available()}")
    print(f"M = {args.rows} rows, {args.dtype} input and output gradient; errors against float64 grad_out @ W^")
    print("relative Frobenius error (max per-element error / sum |g||W^|)")
    cols = ["ours bf16 kernel", "ours float32 (AVX2)", "bnb eval", "bnb train"]
    print(f"{'K x N':>12}  " + "  ".join(f"{c:>24}" for c in cols))
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w = make_weight(k, n, gen)
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        layer = Linear8bitLt.from_linear(lin).eval()
        x = torch.randn(args.rows, k, generator=gen).to(dtype)
        g = torch.randn(args.rows, n, generator=gen).to(dtype)
        w_hat = layer.weight.double() * (layer.SCB.double() / 127)[:, None]
        ref, scale = g.double() @ w_hat, g.double().abs() @ w_hat.abs()
        row = []
        row.append(errors(ours(layer, x, g), ref, scale) if _native.grad_bf16_available() else None)
        with mock.patch.object(_native, "grad_bf16_available", lambda: False):
            row.append(errors(ours(layer, x, g), ref, scale))
        if bnb is not None:
            # quantized (moved to a device) before loading, as bitsandbytes requires
            b = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0).to("cpu")
            b.load_state_dict(layer.state_dict())
            assert torch.equal(b.weight.data, layer.weight) and torch.equal(b.weight.SCB, layer.SCB)
            row += [errors(bnb_grad(b, x, g, False), ref, scale), errors(bnb_grad(b, x, g, True), ref, scale)]
        else:
            row += [None, None]
        cells = ["n/a" if r is None else f"{r[0]:.2e} ({r[1]:.1e})" for r in row]
        print(f"{k:>5} x {n:<5}  " + "  ".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
