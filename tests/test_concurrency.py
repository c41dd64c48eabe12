"""Several threads running one quantized model get the results one thread gets.

The forward path holds no mutable state: ``Linear8bitLt.forward`` reads its buffers and calls a
pure op; the ops allocate their outputs. These tests run one shared model from several threads
at once, each on its own inputs, and compare every output bit for bit with a sequential run, and
check that neither the model's state nor the inputs were touched.
"""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
from torch import nn

import llm_int8
import llm_int8.functional as F
from llm_int8 import _native

pytestmark = pytest.mark.usefixtures("restore_torch_rng")  # leave the global RNG as found

N_THREADS = 6
ROUNDS = 4  # forwards per thread, so threads overlap in every phase of the forward
HIDDEN, FFN = 48, 96


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        return self.out(x + self.down(torch.relu(self.up(x))))


def make_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    """One input per thread, with outlier features (some columns far above the threshold)."""
    gen = torch.Generator().manual_seed(1)
    inputs = []
    for i in range(N_THREADS):
        x = torch.randn((2, 3 + i, HIDDEN), generator=gen)
        x[..., i % HIDDEN] *= 40.0  # a different outlier column per thread
        x[..., 7] += 12.0
        inputs.append(x.to(dtype))
    return inputs


def run_in_threads(fn, n: int) -> list[list[torch.Tensor]]:
    """fn(i) for i in range(n), ROUNDS times each, every i in its own thread, all started together."""
    results: list[list[torch.Tensor]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(ROUNDS):
                results[i].append(fn(i))
        except BaseException as err:  # surfaced below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bits (compared as integers, so -0.0 differs from 0.0 and NaN equals NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_threads_share_one_quantized_model(dtype, threshold):
    torch.manual_seed(0)
    model = Block()
    llm_int8.quantize_(model, llm_int8.Int8Config(threshold=threshold))
    model = model.to(dtype).eval()
    inputs = make_inputs(dtype)
    inputs_before = [x.clone() for x in inputs]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.inference_mode():
        expected = [model(x) for x in inputs]
        results = run_in_threads(lambda i: model(inputs[i]), N_THREADS)

    for want, got in zip(expected, results):
        for out in got:
            assert_bitwise_equal(out, want)
    for x, x0 in zip(inputs, inputs_before):
        assert torch.equal(x, x0), "the forward must not modify its input"
    state_after = model.state_dict()
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), f"the forward modified {key}"


@pytest.mark.parametrize("threshold", [0.0, 2.0, 6.0])
def test_threads_with_different_thresholds_do_not_interfere(threshold):
    """The same op from several threads with per-call arguments: no call sees another's threshold."""
    gen = torch.Generator().manual_seed(2)
    weight_int8, weight_absmax = F.quantize_weight(torch.randn((32, HIDDEN), generator=gen))
    thresholds = [threshold, 0.0, 3.0, 9.0, threshold, 1.0]
    inputs = make_inputs(torch.float32)

    def call(i):
        return F.int8_mixed_linear(inputs[i], weight_int8, weight_absmax, None, thresholds[i])

    expected = [call(i) for i in range(N_THREADS)]
    results = run_in_threads(call, N_THREADS)
    for want, got in zip(expected, results):
        for out in got:
            assert_bitwise_equal(out, want)


def test_threads_share_a_transformers_model():
    """A converted Llama-architecture model (random weights, tiny) run from several threads."""
    transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install 'llm-int8[hf]'")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    llm_int8.quantize_(model, llm_int8.Int8Config(threshold=6.0))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(config.vocab_size, (1, 5 + 2 * i), generator=gen) for i in range(N_THREADS)]

    def logits(i):
        return model(prompts[i]).logits

    with torch.inference_mode():
        expected = [logits(i) for i in range(N_THREADS)]
        results = run_in_threads(logits, N_THREADS)
    for want, got in zip(expected, results):
        for out in got:
            assert_bitwise_equal(out, want)


@pytest.fixture(params=_native.RUNNERS)
def runner(request):
    """The kernels' threads: torch's OpenMP threads, then the library's own pool; restored after."""
    if not _native.available():
        pytest.skip(f"native kernels unavailable: {_native.unavailable_reason()}")
    before = _native.thread_runner()
    got = _native.set_thread_runner(request.param)
    if got != request.param:
        _native.set_thread_runner(before)
        pytest.skip(f"torch does not run on libgomp here (runner {got})")
    yield got
    _native.set_thread_runner(before)


def _big_layer_and_inputs(n_inputs):
    gen = torch.Generator().manual_seed(4)
    layer = llm_int8.Linear8bitLt.from_linear(nn.Linear(1024, 2048))
    inputs = []
    for i in range(n_inputs):
        x = torch.randn((64, 1024), generator=gen)
        x[:, 3 * i] *= 40.0
        x[:, 100 : 100 + 9 * i] *= 20.0  # up to 45 decomposed columns: the gathered-column path
        inputs.append(x)
    return layer, inputs


def test_threads_share_the_kernels_thread_pool(runner):
    """Layers large enough for two kernel threads, called from several Python threads at once (with
    our pool: one call holds it, the others run on their own thread; with torch's OpenMP: a team
    each), all bit-identical to the same calls made one at a time."""
    layer, inputs = _big_layer_and_inputs(N_THREADS)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            expected = [layer(x) for x in inputs]
            results = run_in_threads(lambda i: layer(inputs[i]), N_THREADS)
    finally:
        torch.set_num_threads(old)
    for want, got in zip(expected, results):
        for out in got:
            assert_bitwise_equal(out, want)


def test_runners_give_the_same_bits():
    if not _native.available():
        pytest.skip(f"native kernels unavailable: {_native.unavailable_reason()}")
    layer, inputs = _big_layer_and_inputs(3)
    before, old = _native.thread_runner(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            outs = {}
            for name in _native.RUNNERS:
                outs[_native.set_thread_runner(name)] = [layer(x) for x in inputs]
    finally:
        _native.set_thread_runner(before)
        torch.set_num_threads(old)
    one_thread = None
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            one_thread = [layer(x) for x in inputs]
    finally:
        torch.set_num_threads(old)
    for got in outs.values():
        for a, b in zip(got, one_thread):
            assert_bitwise_equal(a, b)


_FORK_CASE = {}


def _call_in_child(conn):
    # only the layer call: torch's own OpenMP ops can hang in a forked child (libgomp has no fork
    # handler), which is torch's matter; the kernel's call must not
    layer, x = _FORK_CASE["layer"], _FORK_CASE["x"]
    with torch.inference_mode():
        conn.send(layer(x).numpy())  # (a tensor would go through torch's shared-memory pickling)


def test_a_forked_child_runs_the_kernels(runner):
    """After the parent ran two-thread calls, a fork()ed child (no helper or OpenMP team threads of
    the parent's) still runs them, with the same bits."""
    layer, inputs = _big_layer_and_inputs(1)
    _FORK_CASE.update(layer=layer, x=inputs[0])
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            want = layer(inputs[0])
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_call_in_child, args=(child,))
        proc.start()
        ready = parent.poll(120)
        got = torch.from_numpy(parent.recv()) if ready else None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    finally:
        torch.set_num_threads(old)
    assert ready, "the forked child did not finish its layer call within 120 s"
    assert_bitwise_equal(got, want)


def test_a_misspelt_thread_runner_warns_and_keeps_the_kernels(tmp_path):
    """LLM_INT8_THREADS=<typo> in a fresh process: a RuntimeWarning that names the valid values, and
    the native kernels still load (on the default runner)."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "from llm_int8 import _native\n"
        "print(_native.available(), _native.thread_runner() == _native.DEFAULT_RUNNER or _native.thread_runner())\n"
    )
    env = {**os.environ, "LLM_INT8_THREADS": "omp"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LLM_INT8_THREADS must be one of torch, own, got 'omp'" in proc.stderr
    assert proc.stdout.split()[0] == str(_native.available())
