"""Is our LLM.int8() faster than fp16 on the GPU, and than bitsandbytes, per layer and in generate?

Question (issue 16's goals): at alpha = 6 with 0.1 % outlier feature columns, the forward time of one
linear layer with K = N = hidden in {4096, 8192} and M in {1, 16, 512, 4096} rows, for

    fp16    F.linear on fp16 weights (cuBLAS): the baseline of every ratio
    ours    llm_int8's CUDA kernel for int8_mixed_linear (Triton; what Linear8bitLt calls)
    bnb     bitsandbytes 0.50.2 Linear8bitLt (has_fp16_weights=False, eval)
    safe    our torch-op fallback path (cuda.TORCH_STAGES), for reference only

printed as ratios ours/fp16, ours/bnb (below 1 is faster), also with ours and fp16 replayed from a
CUDA graph (no launch overhead; bitsandbytes cannot be captured: it reads the outlier count on the
host). Then whole-model generate: tokens/s and GPU memory for fp16, ours and bitsandbytes on a model
with the architecture of Qwen2.5-1.5B (random weights: no checkpoint reaches the GPU machine; RMSNorm
weights plant outlier features at alpha = 6 as LLMs have them). Last, the goals, met or not:

    alpha = 6 layer <= 0.8x fp16 at M >= 512; decode (M <= 16) <= 0.7x fp16; >= 3x faster than bitsandbytes.

Method: every method reads its weights from several copies that together exceed 4x the L2 cache
(decode is bound by reading the weight from memory, not from L2); each sample times a burst of calls
between CUDA events; methods are interleaved repeat by repeat; medians. Before timing, our output is
checked against the reference kernel at every shape. ``--json`` writes every figure.

    python benchmarks/bench_gpu.py                     # everything (~3 minutes on an H200)
    python benchmarks/bench_gpu.py --dry-run           # on the CPU: tiny shapes, our kernels under the
                                                       # Triton interpreter, the tables' structure
"""

from __future__ import annotations

import os
import sys

DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:  # read by Triton when a kernel is decorated: before anything imports it (bitsandbytes does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm_int8 import cuda, dispatch, reference  # noqa: E402
from llm_int8.functional import quantize_weight  # noqa: E402

THRESHOLD = 6.0
OUTLIER_FRACTION = 0.001  # share of x's feature columns holding outliers
OUTLIER_MAGNITUDE = 20.0  # |x| in those columns, well past alpha = 6
INLIER_CLAMP = 5.5  # every other value stays below alpha, so the outlier count is exactly as set
HIDDEN = [4096, 8192]
M_VALUES = [1, 16, 512, 4096]
DECODE_MAX_M = 16
# Weights are cycled through copies that together hold at least this many L2 caches.
L2_MULTIPLE = 4
MAX_COPIES = 32
TARGET_SAMPLE_MS = 2.0  # one timed burst of calls
# |ours - reference| / |reference| above this is a wrong result, not rounding (fp16 rounds at 2**-11).
MAX_REL_ERR = 1e-3
GOALS = {"prefill": 0.8, "decode": 0.7, "bnb_speedup": 3.0}

# Model shapes for generate (random weights). Qwen2.5-1.5B and SmolLM2-135M as published; "tiny" for the dry run.
MODELS = {
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
# The dry run: one burst of one call per sample (interpreted kernels take a second a call).
DRY = dict(hidden=[64], m_values=[1, 17], repeats=2, model="tiny", prompt=8, new_tokens=8, batches=[1])


# --------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Milliseconds per call of ``fn(i)`` for i in range(calls): CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, calls: int) -> float:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                fn(i)
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / calls
        begin = time.perf_counter()
        for i in range(calls):
            fn(i)
        return (time.perf_counter() - begin) * 1e3 / calls


def interleaved_medians(timer: Timer, methods: dict, calls: int, repeats: int) -> dict:
    """Median ms per call of each method, sampling the methods in turn, repeat after repeat."""
    samples = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            samples[name].append(timer(fn, calls))
    return {name: statistics.median(values) for name, values in samples.items()}


def graph_of(fn, calls: int):
    """A CUDA graph replaying ``fn(i)`` for i in range(calls); returns a callable taking an ignored index."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return lambda _: graph.replay()


# --------------------------------------------------------------------------------------------
# Inputs and the methods compared


def make_x(m: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    """fp16 x [M, K] ~ N(0, 1) clamped below alpha, with 0.1 % of its columns (at least one) at +-20."""
    x = torch.randn(m, k, generator=gen).clamp_(-INLIER_CLAMP, INLIER_CLAMP)
    n_cols = max(1, round(OUTLIER_FRACTION * k))
    cols = torch.randperm(k, generator=gen)[:n_cols]
    x[:, cols] = OUTLIER_MAGNITUDE * torch.sign(torch.randn(m, n_cols, generator=gen))
    return x.half().to(device)


def copies_for(weight_bytes: int, l2_bytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(L2_MULTIPLE * l2_bytes / weight_bytes)))


def first_line(err: BaseException) -> str:
    return (f"{type(err).__name__}: {err}".splitlines() or [type(err).__name__])[0]


def load_bitsandbytes(device):
    """The bitsandbytes module once one small layer of it has run here, or None and the reason it
    cannot (the benchmark then goes on without it)."""
    try:
        import bitsandbytes

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every non-fp16 input
        gen = torch.Generator().manual_seed(0)
        layer = bnb_layer(bitsandbytes, torch.randn(64, 256, generator=gen).half(), device)
        with torch.inference_mode():
            layer(make_x(17, 256, gen, device))
        return bitsandbytes, None
    except Exception as err:  # not installed, no library for this CUDA, a kernel that does not run
        return None, first_line(err)


def bnb_layer(bnb, weight: torch.Tensor, device):
    n, k = weight.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=THRESHOLD)
    layer.load_state_dict({"weight": weight.cpu()})
    return layer.to(device).eval()  # quantized on the move to the device


def ours_kernel(device: torch.device):
    """The int8_mixed_linear kernel Linear8bitLt calls for tensors on ``device``: the registered Triton
    kernel on CUDA; in the dry run, the same guarded stages on CPU tensors under the Triton interpreter."""
    if device.type == "cuda":
        dispatch.require_gpu_path()
        return dispatch.registered_cuda_kernels()["int8_mixed_linear"]
    backend, stages = dispatch.cuda_stages()
    if backend != "triton":
        raise SystemExit(f"the dry run needs Triton (pip install 'llm-int8[triton]'): {dispatch.gpu_path_unavailable_reason()}")
    return dispatch.op_kernels(stages)["int8_mixed_linear"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# Question 1: one layer


@dataclass
class LayerRow:
    hidden: int
    m: int
    fp16_ms: float
    ours_ms: float
    bnb_ms: float | None
    safe_ms: float
    graph_fp16_ms: float | None
    graph_ours_ms: float | None
    ours_rel_err: float
    copies: int
    calls: int

    @property
    def ours_over_fp16(self):
        return self.ours_ms / self.fp16_ms

    @property
    def ours_over_bnb(self):
        return self.ours_ms / self.bnb_ms if self.bnb_ms else None

    @property
    def graph_ratio(self):
        return self.graph_ours_ms / self.graph_fp16_ms if self.graph_ours_ms else None


@dataclass
class LayerWeights:
    """One hidden size's weights, each method's in ``copies`` copies (see ``copies_for``)."""

    hidden: int
    copies: int
    fp16: list
    int8: list  # (weight_int8, weight_absmax) pairs
    bnb: list

    @classmethod
    def build(cls, hidden: int, device, bnb, gen, l2_bytes: int) -> "LayerWeights":
        weight = torch.randn(hidden, hidden, generator=gen).div_(math.sqrt(hidden)).half()
        w_int8, w_absmax = quantize_weight(weight)
        copies = copies_for(w_int8.numel(), l2_bytes)  # the int8 weight is the smallest: it sets the rotation
        return cls(
            hidden, copies,
            [weight.to(device) for _ in range(copies)],
            [(w_int8.to(device), w_absmax.to(device)) for _ in range(copies)],
            [bnb_layer(bnb, weight, device) for _ in range(copies)] if bnb is not None else [],
        )


def bench_layer(weights: LayerWeights, m: int, repeats: int, device, gen, dry_run: bool) -> LayerRow:
    copies = weights.copies
    x = make_x(m, weights.hidden, gen, device)
    kernel = ours_kernel(device)

    def fp16(i):
        return F.linear(x, weights.fp16[i % copies])

    def ours(i):
        w, s = weights.int8[i % copies]
        return kernel(x, w, s, None, THRESHOLD)

    def safe(i):
        w, s = weights.int8[i % copies]
        return cuda.mixed_linear(cuda.TORCH_STAGES, x, w, s, None, THRESHOLD)

    def bnb_forward(i):
        return weights.bnb[i % copies](x)

    with torch.inference_mode():
        ours_out = ours(0)  # also compiles and tunes our kernel for this shape
        err = rel_err(ours_out, reference.int8_mixed_linear(x, *weights.int8[0], None, THRESHOLD))
        if not err < MAX_REL_ERR:
            raise AssertionError(f"WRONG RESULT: ours differs from the reference by {err:.3g} (relative)")
        methods = {"fp16": fp16, "ours": ours, "safe": safe}
        if weights.bnb:
            methods["bnb"] = bnb_forward
        timer = Timer(device)
        for fn in methods.values():  # warm up: every copy once
            for i in range(copies):
                fn(i)
        timer.sync()
        # one burst lasts about TARGET_SAMPLE_MS of fp16 time, and covers every copy
        calls = 1 if dry_run else copies * max(1, round(TARGET_SAMPLE_MS / (timer(fp16, copies) * copies)))
        times = interleaved_medians(timer, methods, calls, repeats)
        graph = {}
        if device.type == "cuda":
            graphs = {"fp16": graph_of(fp16, calls), "ours": graph_of(ours, calls)}
            graph = {name: ms / calls for name, ms in interleaved_medians(timer, graphs, 1, repeats).items()}
            del graphs
    row = LayerRow(weights.hidden, m, times["fp16"], times["ours"], times.get("bnb"), times["safe"],
                   graph.get("fp16"), graph.get("ours"), err, copies, calls)
    del methods, x
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt(value, digits=2, width=6):
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def print_layer_table(rows: list[LayerRow], bnb_note: str | None) -> None:
    print(f"\nlayer time, alpha = {THRESHOLD}, {OUTLIER_FRACTION:.1%} outlier columns, K = N = hidden, fp16 x; "
          "ratio = time / baseline time (below 1 is faster)")
    if bnb_note:
        print(f"bitsandbytes: not run ({bnb_note})")
    header = (f"{'hidden':>6} {'M':>5} | {'fp16 ms':>8} {'ours ms':>8} {'bnb ms':>8} | {'ours/fp16':>9} {'ours/bnb':>8} "
              f"{'bnb/fp16':>8} | {'graph ours/fp16':>15} | {'safe/fp16':>9} | {'err':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        bnb_over_fp16 = r.bnb_ms / r.fp16_ms if r.bnb_ms else None
        print(f"{r.hidden:6d} {r.m:5d} | {r.fp16_ms:8.4f} {r.ours_ms:8.4f} {fmt(r.bnb_ms, 4, 8)} | "
              f"{r.ours_over_fp16:9.2f} {fmt(r.ours_over_bnb, 2, 8)} {fmt(bnb_over_fp16, 2, 8)} | "
              f"{fmt(r.graph_ratio, 2, 15)} | {r.safe_ms / r.fp16_ms:9.2f} | {r.ours_rel_err:7.1e}")


# --------------------------------------------------------------------------------------------
# Question 2: generate


@dataclass
class GenerateRow:
    method: str
    batch: int
    weights_mib: float
    peak_mib: float | None
    prefill_ms: float
    decode_tokens_per_s: float | None  # None: generating more tokens did not take measurably longer
    note: str = ""


def build_checkpoint(name: str, device, folder: str) -> None:
    """Save a random-init fp16 model of the named architecture, outlier features planted in its norms."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    fields = dict(MODELS[name])
    arch = fields.pop("arch")
    config_class = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch]
    config = config_class(**fields, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    n_dims = max(1, round(OUTLIER_FRACTION * config.hidden_size))
    dims = torch.randperm(config.hidden_size, generator=torch.Generator().manual_seed(0))[:n_dims]
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight[dims.to(module.weight.device)] = OUTLIER_MAGNITUDE
    model.save_pretrained(folder)
    del model


def load_for(method: str, folder: str, device):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from llm_int8.integrations.hf import LLMInt8Config

    config = {
        "fp16": None,
        "ours": LLMInt8Config(threshold=THRESHOLD),
        "bnb": transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=THRESHOLD),
    }[method]
    device_map = {"": 0} if device.type == "cuda" else None
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float16, quantization_config=config, device_map=device_map
    ).eval()


def allocated(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def generate_seconds(model, prompt: torch.Tensor, new_tokens: int, timer: Timer) -> float:
    timer.sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=1)
    timer.sync()
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - start


def bench_generate(name: str, methods: list[str], batches: list[int], prompt_len: int, new_tokens: int,
                   repeats: int, device) -> list[GenerateRow]:
    """Prefill time (generate of 1 token) and decode tokens/s ((new_tokens - 1) / (t_new - t_1)), medians
    over repeats interleaved across the methods; weights = memory the loaded model holds; peak = the most
    memory allocated during its generate calls beyond that."""
    folder = tempfile.mkdtemp(prefix="bench_gpu_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    rows = []
    try:
        build_checkpoint(name, device, folder)
        timer = Timer(device)
        models, weights, notes = {}, {}, {}
        for method in methods:
            before = allocated(device)
            try:
                models[method] = load_for(method, folder, device)
            except Exception as err:
                notes[method] = first_line(err)
                print(f"generate: {method} not run ({notes[method]})")
                continue
            weights[method] = (allocated(device) - before) if device.type == "cuda" else model_bytes(models[method])
        vocab = MODELS[name]["vocab_size"]
        for batch in batches:
            prompt = torch.randint(2, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
            prompt = prompt.to(device)
            samples = {method: ([], []) for method in models}
            peaks = {}
            for method, model in models.items():  # warm up (compiles and tunes our kernels), peak memory
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                base = allocated(device)
                generate_seconds(model, prompt, new_tokens, timer)
                peaks[method] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
            for _ in range(repeats):
                for method, model in models.items():
                    samples[method][0].append(generate_seconds(model, prompt, 1, timer))
                    samples[method][1].append(generate_seconds(model, prompt, new_tokens, timer))
            for method in models:
                t_first, t_all = (statistics.median(s) for s in samples[method])
                tokens_per_s = batch * (new_tokens - 1) / (t_all - t_first) if t_all > t_first else None
                rows.append(GenerateRow(method, batch, weights[method] / 2**20, peaks[method], t_first * 1e3,
                                        tokens_per_s))
        for method, note in notes.items():
            rows.append(GenerateRow(method, 0, float("nan"), None, float("nan"), None, note))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_generate_table(name: str, rows: list[GenerateRow], prompt_len: int, new_tokens: int) -> None:
    print(f"\ngenerate: {name} architecture, random weights with planted outlier features, fp16 activations, "
          f"greedy, prompt {prompt_len} tokens, {new_tokens} new; tokens/s = decode tokens per second "
          "(all sequences), ratio = ours or bnb / fp16")
    header = (f"{'method':>6} {'batch':>5} | {'weights MiB':>11} {'peak MiB':>9} | {'prefill ms':>10} | "
              f"{'tokens/s':>9} {'vs fp16':>7}")
    print(header)
    print("-" * len(header))
    fp16 = {r.batch: r for r in rows if r.method == "fp16"}
    for r in rows:
        if r.note:
            print(f"{r.method:>6}   n/a | not run: {r.note}")
            continue
        base = fp16.get(r.batch)
        ratio = None
        if base and base.decode_tokens_per_s and r.decode_tokens_per_s:
            ratio = r.decode_tokens_per_s / base.decode_tokens_per_s
        print(f"{r.method:>6} {r.batch:5d} | {r.weights_mib:11.1f} {fmt(r.peak_mib, 1, 9)} | {r.prefill_ms:10.2f} | "
              f"{fmt(r.decode_tokens_per_s, 1, 9)} {fmt(ratio, 2, 7)}")


# --------------------------------------------------------------------------------------------
# Goals


def print_goals(rows: list[LayerRow], dry_run: bool) -> list[str]:
    """The goals of issue 16, met or not, from this run's layer table (eager ratios; graph in brackets)."""
    lines = []

    def verdict(ok):
        return "n/a (dry run)" if dry_run else ("met" if ok else "NOT met")

    def worst(selected, key):
        values = [(key(r), r) for r in selected if key(r) is not None]
        return max(values, key=lambda v: v[0]) if values else (None, None)

    for label, selected, goal in (
        ("prefill: ours/fp16 <= 0.8 at M >= 512", [r for r in rows if r.m >= 512], GOALS["prefill"]),
        ("decode: ours/fp16 <= 0.7 at M <= 16", [r for r in rows if r.m <= DECODE_MAX_M], GOALS["decode"]),
    ):
        ratio, row = worst(selected, lambda r: r.ours_over_fp16)
        graph, _ = worst(selected, lambda r: r.graph_ratio)
        if row is None:
            continue
        lines.append(f"goal {label}: worst {ratio:.2f} (hidden {row.hidden}, M {row.m}; CUDA graph worst "
                     f"{fmt(graph, 2, 4).strip()}): {verdict(ratio <= goal)}")
    ratio, row = worst(rows, lambda r: r.ours_over_bnb)
    if row is None:
        lines.append("goal >= 3x faster than bitsandbytes: n/a (bitsandbytes not run)")
    else:
        lines.append(f"goal >= 3x faster than bitsandbytes: slowest {1 / ratio:.2f}x (hidden {row.hidden}, M {row.m}): "
                     f"{verdict(1 / ratio >= GOALS['bnb_speedup'])}")
    print("\n" + "\n".join(lines))
    return lines


# --------------------------------------------------------------------------------------------


def machine(device, bnb) -> str:
    triton_version = importlib.metadata.version("triton") if importlib.util.find_spec("triton") else "none"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = (f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
               f"{props.total_memory / 2**30:.0f} GiB, L2 {props.L2_cache_size / 2**20:.0f} MiB), CUDA {torch.version.cuda}")
    else:
        gpu = f"no GPU: dry run on the CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    return (f"{gpu} | torch {torch.__version__} | triton {triton_version} | "
            f"bitsandbytes {getattr(bnb, '__version__', 'not run')} | "
            f"transformers {importlib.metadata.version('transformers')} | python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: tiny shapes, our kernels interpreted")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved samples per method (median)")
    parser.add_argument("--hidden", type=int, nargs="+", default=HIDDEN)
    parser.add_argument("--m", type=int, nargs="+", default=M_VALUES, dest="m_values")
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-1.5b", help="architecture for generate")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="generate batch sizes")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens for generate")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--generate-repeats", type=int, default=3)
    parser.add_argument("--skip", choices=["layers", "generate"], action="append", default=[])
    parser.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    if args.dry_run:
        args.hidden, args.m_values, args.repeats = DRY["hidden"], DRY["m_values"], DRY["repeats"]
        args.model, args.prompt, args.new_tokens, args.batches = DRY["model"], DRY["prompt"], DRY["new_tokens"], DRY["batches"]
        args.generate_repeats = 1
        device = torch.device("cpu")
        l2_bytes = 0
    else:
        if not torch.cuda.is_available():
            raise SystemExit(f"this benchmark needs a CUDA GPU (or --dry-run): {dispatch.gpu_path_unavailable_reason()}")
        device = torch.device("cuda")
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size

    bnb, bnb_note = (None, "--no-bnb") if args.no_bnb else load_bitsandbytes(device)
    print(("DRY RUN (no GPU; the figures mean nothing) | " if args.dry_run else "") + machine(device, bnb))
    results = {"machine": machine(device, bnb), "dry_run": args.dry_run, "layers": [], "generate": [], "goals": []}

    rows, failures = [], []
    if "layers" not in args.skip:
        gen = torch.Generator().manual_seed(0)
        for hidden in args.hidden:
            weights = LayerWeights.build(hidden, device, bnb, gen, l2_bytes)
            for m in args.m_values:
                try:
                    rows.append(bench_layer(weights, m, args.repeats, device, gen, args.dry_run))
                    print(f"  timed hidden {hidden}, M {m}", flush=True)
                except Exception as err:  # one shape's failure must not cost the others' figures
                    traceback.print_exc()
                    failures.append(f"layer hidden {hidden}, M {m}: {first_line(err)}")
            del weights
            gc.collect()
        print_layer_table(rows, bnb_note)
        results["layers"] = [asdict(r) for r in rows]

    if "generate" not in args.skip:
        methods = ["fp16", "ours"] + (["bnb"] if bnb is not None else [])
        try:
            gen_rows = bench_generate(args.model, methods, args.batches, args.prompt, args.new_tokens,
                                      args.generate_repeats, device)
        except Exception as err:  # the layer figures above still stand
            traceback.print_exc()
            failures.append(f"generate: {first_line(err)}")
        else:
            print_generate_table(args.model, gen_rows, args.prompt, args.new_tokens)
            results["generate"] = [asdict(r) for r in gen_rows]

    if rows:
        results["goals"] = print_goals(rows, args.dry_run)
    results["fallbacks"] = dispatch.fallbacks()
    results["failures"] = failures
    print(f"Triton kernels that fell back to torch ops: {results['fallbacks'] or 'none'}")
    for failure in failures:
        print(f"FAILED {failure} (traceback above)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
