"""Compile every llm_int8 Triton kernel for a GPU target, on any machine: no GPU needed.

Triton compiles ahead of time for a named target with the ptxas it ships. That catches what the
interpreter (TRITON_INTERPRET=1, the CPU tests) cannot: type and layout errors of the compiled path,
configs that need more shared memory than the GPU has (the autotuner skips those GEMM configs
there; any other kernel over the limit is a failure). The local Triton may differ from the GPU
machine's (it is Triton 3.6 on the lent H200), so a pass here is a strong hint, not a proof.

    python scripts/compile_kernels.py           # every autotuning config of the GEMM (a minute or two)
    python scripts/compile_kernels.py --quick   # one prefill and one decode config, fewer variants (tests)
    python scripts/compile_kernels.py --arch 80 # another compute capability (A100)

Prints one line per compiled variant (shared memory in KiB, seconds) and, last,
"compiled for sm_<arch>: every kernel" or the failures; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llm_int8 import cuda  # noqa: E402
from llm_int8.triton import int8_matmul, quant  # noqa: E402

WARP_SIZE = 32
# Hopper (sm_90) allows up to 227 KiB of shared memory per block.
SHARED_LIMIT_KIB = {90: 227, 89: 99, 86: 99, 80: 163}
EPILOGUE_POINTERS = {"x_absmax_ptr": "*fp32", "w_absmax_ptr": "*fp32", "bias_ptr": "*bf16", "x_ptr": "*bf16",
                     "b_ptr": "*i8", "cols_ptr": "*i64", "n_cols_ptr": "*i32", "fp_cols_ptr": "*i64",
                     "fp_weight_ptr": "*bf16"}
ALL_TERMS = {"HAS_OUTLIERS": True, "HAS_FP_COLS": True, "HAS_BIAS": True}
# The specialization an LLM's shapes get at run time: Triton makes integer arguments equal to 1
# constants and marks pointers and integers divisible by 16 (which is what lets it vectorize loads and
# pipeline them through shared memory). "ragged" compiles without either, as odd test shapes run.
UNIT_STRIDES = {"stride_ak", "stride_bk", "stride_on", "stride_an", "stride_xk", "stride_ck", "stride_ff"}
ALIGNED_INTS = {"N", "K", "stride_am", "stride_bn", "stride_om", "stride_xm", "stride_cm"}
DIVISIBLE_BY_16 = [["tt.divisibility", 16]]
NO_TERMS = dict.fromkeys(ALL_TERMS, False)


def compile_kernel(kernel, signature, constexprs, arch, aligned, num_warps=4, num_stages=3, **options):
    """Compile one variant; argument types not in ``signature`` are i32 scalars. Returns shared bytes."""
    names = kernel.arg_names
    constexprs = dict(constexprs)
    if aligned:
        constexprs.update({name: 1 for name in UNIT_STRIDES.intersection(names)})
    types = {name: "constexpr" if name in constexprs else signature.get(name, "i32") for name in names}
    attrs = {}
    if aligned:
        attrs = {(i,): DIVISIBLE_BY_16 for i, name in enumerate(names)
                 if types[name].startswith("*") or name in ALIGNED_INTS}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=types, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, WARP_SIZE),
        options=dict(num_warps=num_warps, num_stages=num_stages, **options),
    )
    return compiled.metadata.shared


def variants(quick: bool):
    """(label, kernel, signature, constexprs, num_warps, num_stages, options) for every kernel to compile."""
    gemm = {**EPILOGUE_POINTERS, "a_ptr": "*i8", "b_ptr": "*i8"}
    prefill = int8_matmul.PREFILL_CONFIGS[:1] if quick else int8_matmul.PREFILL_CONFIGS
    decode = int8_matmul.DECODE_CONFIGS[:1] if quick else int8_matmul.DECODE_CONFIGS
    for kind, configs in (("prefill", prefill), ("decode", decode)):
        for config in configs:
            tile = "x".join(str(config.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            tile += f" s{config.num_stages} w{config.num_warps}"
            yield (f"gemm {kind} {tile} int32", int8_matmul._int8_gemm_kernel, {**gemm, "out_ptr": "*i32"},
                   {"DEQUANT": False, **NO_TERMS, **config.kwargs}, config.num_warps, config.num_stages, {})
            yield (f"gemm {kind} {tile} fused", int8_matmul._int8_gemm_kernel, {**gemm, "out_ptr": "*bf16"},
                   {"DEQUANT": True, **ALL_TERMS, **config.kwargs}, config.num_warps, config.num_stages, {})
    yield ("epilogue", int8_matmul._epilogue_kernel, {**EPILOGUE_POINTERS, "acc_ptr": "*i32", "out_ptr": "*fp16"},
           {**ALL_TERMS, "BLOCK_M": int8_matmul.EPILOGUE_BLOCK_M, "BLOCK_N": int8_matmul.EPILOGUE_BLOCK_N}, 4, 3, {})
    yield ("outlier flags", quant._outlier_flags_kernel, {"x_ptr": "*fp16", "flags_ptr": "*i32", "threshold": "fp32"},
           {"BLOCK_M": quant.FLAGS_BLOCK_M, "BLOCK_K": quant.FLAGS_BLOCK_K}, 4, 3, {})
    yield ("compact columns", quant._compact_kernel, {"flags_ptr": "*i32", "cols_ptr": "*i64", "count_ptr": "*i32"},
           {"FLAG": cuda.RUNTIME_OUTLIER, "BLOCK": quant.COMPACT_BLOCK}, 4, 3, {})
    for block_k, warps in ((quant.ROW_BLOCK_K_MIN, 4), (quant.ROW_BLOCK_K_MAX, 8)):
        yield (f"row quant BLOCK_K={block_k}", quant._row_quant_kernel,
               {"x_ptr": "*bf16", "flags_ptr": "*i32", "codes_ptr": "*i8", "absmax_ptr": "*fp32", "threshold": "fp32"},
               {"HAS_FLAGS": True, "MASK_VALUES": True, "EXCLUDE_FLAGGED": True, "BLOCK_K": block_k}, warps, 3,
               {"enable_fp_fusion": False})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one prefill and one decode GEMM config")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: H100/H200)")
    args = parser.parse_args()
    limit = SHARED_LIMIT_KIB.get(args.arch)
    print(f"triton {triton.__version__}, target sm_{args.arch}" + (f", {limit} KiB shared memory per block" if limit else ""))
    failures = []
    specializations = ("aligned", "ragged")
    for label, kernel, signature, constexprs, warps, stages, options in variants(args.quick):
        for specialization in specializations[:1] if args.quick and "decode" not in label else specializations:
            label_s = f"{label} {specialization}"
            start = time.perf_counter()
            try:
                shared = compile_kernel(kernel, signature, constexprs, args.arch, specialization == "aligned", warps,
                                        stages, **options)
            except Exception as err:  # report every failing variant, not just the first
                failures.append(label_s)
                print(f"FAILED {label_s}: {type(err).__name__}: {err}")
                traceback.print_exc(limit=2, file=sys.stdout)
                continue
            over = limit is not None and shared > limit * 1024
            if over and not label.startswith("gemm"):
                failures.append(label_s)  # only the GEMM is autotuned: its oversized configs are skipped there
            print(f"{label_s:<48} shared {shared / 1024:6.1f} KiB  {time.perf_counter() - start:5.1f} s"
                  + ("  over the limit: never runs there" if over else ""))
    if failures:
        print(f"compiled for sm_{args.arch}: {len(failures)} variant(s) failed: {', '.join(failures)}")
        return 1
    print(f"compiled for sm_{args.arch}: every kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
