"""Exactness and input handling of the native int8 GEMM (llm_int8._native), every micro-kernel
this CPU runs (the others are skipped with the reason)."""

from __future__ import annotations

import threading

import pytest
import torch

from llm_int8 import _native

pytestmark = pytest.mark.skipif(
    not _native.available(),
    reason=f"native int8 GEMM unavailable: {_native.unavailable_reason()}",
)

#: Every micro-kernel of the library; a CPU without one skips its tests.
ALL_ISAS = ["avx2", "avx512_vnni"]
ISAS = [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in _native.isas(), reason=f"this CPU has no {isa}"))
    for isa in ALL_ISAS
]

M_SIZES = [0, 1, 2, 3, 5, 16, 17, 33, 128]
K_SMALL = [0, 1, 2, 31, 32, 33, 63, 64, 65, 100]
N_SIZES = [0, 1, 3, 7, 8, 9, 65, 257]


def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int64 reference, narrowed to int32 (exact in the tested range)."""
    return (a.long() @ b.long().T).int()


def codes(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)


def check(a: torch.Tensor, b: torch.Tensor, isa: str | None = None) -> None:
    got = _native.int8_gemm_nt(a, b, isa=isa)
    assert got.dtype == torch.int32
    assert got.shape == (a.shape[0], b.shape[0])
    want = ref(a, b)
    assert torch.equal(got, want), (
        f"mismatch for a {tuple(a.shape)}, b {tuple(b.shape)}: "
        f"max |diff| {(got.long() - want.long()).abs().max().item()}"
    )


@pytest.mark.parametrize("k", K_SMALL)
@pytest.mark.parametrize("isa", ISAS)
def test_random_codes_all_small_shapes(k, isa):
    gen = torch.Generator().manual_seed(1000 + k)
    for m in M_SIZES:
        a = codes(m, k, gen=gen)
        for n in N_SIZES:
            check(a, codes(n, k, gen=gen), isa)


@pytest.mark.parametrize("k", [4096, 8192])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("isa", ISAS)
def test_random_codes_large_k(m, k, isa):
    gen = torch.Generator().manual_seed(m * 7 + k)
    for n in (1, 9, 65):
        check(codes(m, k, gen=gen), codes(n, k, gen=gen), isa)


@pytest.mark.parametrize("isa", ISAS)
def test_large_mn_both_thread_splits(isa):
    gen = torch.Generator().manual_seed(5)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # large enough for a helper thread: wide N, the kernel splits N; tall M with tiny N, it splits M
        check(codes(66, 2048, gen=gen), codes(1029, 2048, gen=gen), isa)
        check(codes(2049, 1024, gen=gen), codes(11, 1024, gen=gen), isa)
        check(codes(1, 4096, gen=gen), codes(1021, 4096, gen=gen), isa)  # decoding: N split, B streamed
        check(codes(128, 129, gen=gen), codes(130, 129, gen=gen), isa)
    finally:
        torch.set_num_threads(old)


def _pattern(kind: str, rows: int, k: int, sign: int = 1) -> torch.Tensor:
    if kind == "pos":
        v = torch.full((rows, k), 127)
    elif kind == "neg":
        v = torch.full((rows, k), -127)
    elif kind == "alt":  # +127, -127, +127, ...
        v = torch.where(torch.arange(k) % 2 == 0, 127, -127).expand(rows, k)
    elif kind == "alt_pairs":  # +127, +127, -127, -127, ...: same signs inside each byte pair
        v = torch.where(torch.arange(k) // 2 % 2 == 0, 127, -127).expand(rows, k)
    else:
        raise ValueError(kind)
    return (sign * v).to(torch.int8).contiguous()


@pytest.mark.parametrize("ka", ["pos", "neg", "alt", "alt_pairs"])
@pytest.mark.parametrize("kb", ["pos", "neg", "alt", "alt_pairs"])
@pytest.mark.parametrize("isa", ISAS)
def test_adversarial_full_range(ka, kb, isa):
    # every product is +-127**2: the largest int16 pair sums maddubs can see, and the largest
    # int32 accumulations for this K
    for m, n, k in [(1, 3, 8192), (5, 9, 4095), (4, 2, 33)]:
        check(_pattern(ka, m, k), _pattern(kb, n, k), isa)


@pytest.mark.parametrize("isa", ISAS)
def test_exact_at_max_k(isa):
    k = _native.MAX_K  # 127 * 127 * K still fits int32
    a = _pattern("pos", 1, k)
    b = torch.cat([_pattern("pos", 1, k), _pattern("neg", 1, k), _pattern("alt", 1, k)])
    got = _native.int8_gemm_nt(a, b, isa=isa)
    assert got.tolist() == [[127 * 127 * k, -127 * 127 * k, 127 * 127 * (k % 2)]]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (2, 33, 5), (5, 100, 9), (17, 4096, 33), (3, 8192, 6)])
def test_min_code_in_b_is_exact(m, k, n, isa):
    """-128 in the weight operand: |b| = 128 (unsigned) against A's signs, pair sums up to 32512."""
    gen = torch.Generator().manual_seed(m + k + n)
    a = codes(m, k, gen=gen)
    a[0] = 127  # with b = -128 below: every maddubs pair at -2 * 127 * 128
    b = codes(n, k, gen=gen)
    b[0] = -128
    b[-1, ::3] = -128
    check(a, b, isa)
    check(_pattern("neg", m, k), b, isa)


def test_min_code_in_both_operands_vnni():
    """The VNNI kernel takes every code in both operands (A as is, B + 128; see the C header)."""
    if "avx512_vnni" not in _native.isas():
        pytest.skip("this CPU has no avx512_vnni")
    gen = torch.Generator().manual_seed(4)
    a = torch.full((1, 64), -128, dtype=torch.int8)
    assert _native.int8_gemm_nt(a, a, isa="avx512_vnni").item() == 64 * 128 * 128
    for m, k, n in [(1, 1, 1), (3, 65, 7), (17, 4096, 33)]:
        a, b = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8), codes(n, k, gen=gen)
        a[:, ::2] = -128
        b[:, 1::4] = -128
        check(a, b, "avx512_vnni")


@pytest.mark.parametrize("isa", ISAS)
def test_exact_at_max_k_with_min_codes(isa):
    k = _native.MAX_K_FULL_RANGE  # 128 * 128 * K still fits int32
    b = torch.full((2, k), -128, dtype=torch.int8)
    b[1, ::2] = 127
    a = torch.cat([_pattern("pos", 1, k), _pattern("neg", 1, k)])
    want = (a.long() @ b.long().T)
    assert torch.equal(_native.int8_gemm_nt(a, b, isa=isa).long(), want)
    if isa == "avx512_vnni":
        assert _native.int8_gemm_nt(b[:1], b[:1], isa=isa).item() == 128 * 128 * k


def test_unknown_or_missing_isa_is_an_error():
    a = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="not available on this CPU"):
        _native.int8_gemm_nt(a, a, isa="avx512_amx")


@pytest.mark.parametrize("isa", ISAS)
def test_threads_work_in_a_forked_child(isa):
    """The kernel's helper threads do not survive fork(); the child starts its own (and never
    waits for the parent's)."""
    import multiprocessing

    gen = torch.Generator().manual_seed(11)
    a, b = codes(40, 2048, gen=gen), codes(600, 2048, gen=gen)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(a, b, isa)  # the parent's pool is running now
        # the child runs no torch op that could use torch's own OpenMP pool (not fork-safe)
        child = multiprocessing.get_context("fork").Process(target=_child_gemm, args=(a, b, ref(a, b), isa))
        child.start()
        child.join(timeout=120)
        alive = child.is_alive()
        if alive:
            child.kill()
    finally:
        torch.set_num_threads(old)
    assert not alive, "the forked child hung in the native GEMM"
    assert child.exitcode == 0


def _child_gemm(a, b, want, isa):
    for _ in range(3):
        if _native.int8_gemm_nt(a, b, isa=isa).tolist() != want.tolist():
            raise SystemExit(1)


def test_k_too_large_raises():
    k = _native.MAX_K + 1
    with pytest.raises(ValueError, match="exceeds"):
        _native.int8_gemm_nt(torch.zeros(1, k, dtype=torch.int8), torch.zeros(1, k, dtype=torch.int8))


def test_zero_k_gives_zeros_even_into_dirty_out():
    out = torch.full((3, 4), 7, dtype=torch.int32)
    res = _native.int8_gemm_nt(
        torch.empty(3, 0, dtype=torch.int8), torch.empty(4, 0, dtype=torch.int8), out=out
    )
    assert res is out
    assert torch.equal(out, torch.zeros(3, 4, dtype=torch.int32))


@pytest.mark.parametrize("isa", ISAS)
def test_non_contiguous_inputs(isa):
    gen = torch.Generator().manual_seed(7)
    m, n, k = 17, 65, 100
    a_t = codes(k, m, gen=gen).T  # strides (1, m): copied by the wrapper
    b_t = codes(k, n, gen=gen).T
    assert not a_t.is_contiguous() and not b_t.is_contiguous()
    check(a_t, b_t, isa)
    # rows strided but K contiguous: used in place (row stride > K)
    a_wide = codes(m, k + 37, gen=gen)[:, 5 : 5 + k]
    b_wide = codes(n, 2 * k, gen=gen)[:, k:]
    assert a_wide.stride() == (k + 37, 1)
    check(a_wide, b_wide, isa)
    # broadcast rows (row stride 0) and a column slice with step 2 (copied)
    a_bc = codes(1, k, gen=gen).expand(5, k)
    check(a_bc, codes(2 * n, 2 * k, gen=gen)[::2, ::2], isa)


@pytest.mark.parametrize("isa", ISAS)
def test_out_argument_strided_rows(isa):
    gen = torch.Generator().manual_seed(8)
    a, b = codes(9, 70, gen=gen), codes(11, 70, gen=gen)
    big = torch.full((9, 20), -5, dtype=torch.int32)
    out = big[:, 3:14]
    res = _native.int8_gemm_nt(a, b, out=out, isa=isa)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, ref(a, b))
    assert torch.all(big[:, :3] == -5) and torch.all(big[:, 14:] == -5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("isa", ISAS)
def test_thread_counts_agree(threads, isa):
    gen = torch.Generator().manual_seed(9)
    a, b = codes(40, 2000, gen=gen), codes(1500, 2000, gen=gen)  # 120 M multiply-adds: every thread works
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(a, b, isa)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ISAS)
def test_concurrent_python_threads(isa):
    gen = torch.Generator().manual_seed(10)
    cases = [(codes(8, 700, gen=gen), codes(90, 700, gen=gen)) for _ in range(4)]
    want = [ref(a, b) for a, b in cases]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(5):
            if not torch.equal(_native.int8_gemm_nt(*cases[i], isa=isa), want[i]):
                errors.append(f"case {i} mismatched")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_bad_inputs_raise_clear_errors():
    a = torch.zeros(2, 8, dtype=torch.int8)
    b = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        _native.int8_gemm_nt(a.float(), b)
    with pytest.raises(ValueError, match="int8"):
        _native.int8_gemm_nt(a, b.to(torch.int32))
    with pytest.raises(ValueError, match="inner dimensions"):
        _native.int8_gemm_nt(a, torch.zeros(3, 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        _native.int8_gemm_nt(torch.zeros(8, dtype=torch.int8), b)
    with pytest.raises(ValueError, match="2-D"):
        _native.int8_gemm_nt(a, torch.zeros(1, 3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="out"):
        _native.int8_gemm_nt(a, b, out=torch.empty(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="out"):
        _native.int8_gemm_nt(a, b, out=torch.empty(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError):
        _native.int8_gemm_nt(a.numpy(), b)


def test_unavailable_raises_runtime_error(monkeypatch):
    monkeypatch.setitem(_native._state, "fns", None)
    monkeypatch.setitem(_native._state, "reason", "pretend: no AVX2")
    assert not _native.available()
    assert _native.unavailable_reason() == "pretend: no AVX2"
    a = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="pretend: no AVX2"):
        _native.int8_gemm_nt(a, a)
