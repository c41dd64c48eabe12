/*
 * gemm_kernels.c -- the int8 micro-kernels: an MR x NR block of exact int8 dot products, AVX2 and
 * AVX-512 VNNI, and the kernel sets the driver (gemm.c) calls them through.
 *
 * The multiply tricks.
 * AVX2 has no signed x signed byte multiply.  vpmaddubsw (_mm256_maddubs_epi16) multiplies
 * UNSIGNED bytes by SIGNED bytes and adds adjacent pairs into saturating int16.  We feed it
 *
 *     u = |b|              (vpabsb)       -- unsigned, in [0, 128] (|-128| = 0x80 read unsigned)
 *     s = sign(a, b)       (vpsignb)      -- a negated where b < 0, zeroed where b == 0
 *
 * so that u * s == a * b for every byte.  The absolute value goes on the weight B, the sign on A:
 * vpsignb cannot negate -128, and A (x's codes) never holds it.  A pair sum is then at most
 * 2 * 128 * 127 = 32512 < 32767, so the int16 saturation never triggers.  vpmaddwd
 * (_mm256_madd_epi16) against int16 ones adds neighbouring pairs into int32 lanes, accumulated with
 * vpaddd.  Per 32 bytes of K and per (row of A, row of B) pair: sign + maddubs + madd + add, plus
 * one abs per 32 bytes of a B row, shared by the four rows of A of the micro-kernel (see loop_4x2:
 * with the abs on B the kernel measured as fast as the old abs-on-A one).
 *
 * AVX-512 VNNI's vpdpbusd multiplies unsigned by signed bytes and adds groups of four products
 * straight into int32 lanes, without an int16 step.  We feed it u = b XOR 0x80 = b + 128 (in
 * [0, 255]) and A as it is, so every lane gains sum (b + 128) * a = sum a * b + 128 * sum a; the
 * 128 * rowsum(A) term is subtracted once per output.  Per 64 bytes of K and pair: one vpdpbusd,
 * plus one XOR per 64 bytes of a B row.  Every code of both operands is allowed.
 *
 * Throughput: vpmaddubsw and vpmaddwd are both multiplies; where they share one pipe, the AVX2 loop
 * does 32 MACs per two multiply slots, which is no more than float32 FMA's 8 per slot on a CPU with
 * two FMA pipes.  benchmarks/bench_isa.py measures it: on this project's 2-core Zen 3 (a shared
 * virtual machine) one thread reached 19.3 GMAC/s with the pair and 20.0 with vfmadd231ps, so a
 * compute-bound int8 product there is only as fast as float32, and the kernel's own loop (sign,
 * maddubs, madd, add) measured 15-16 GMAC/s.  One vpdpbusd does 64 MACs (zmm) and replaces three
 * instructions: on Zen 4, one thread measured about 50 GMAC/s with the AVX2 kernel and 130-200 with
 * the VNNI one.
 *
 */
#include "llm_int8_cpu.h"

/* =============================================================================================
 * Kernels.  Everything below runs only after llm_int8_cpu_features() said yes to its ISA.
 * ============================================================================================= */
#pragma GCC push_options
#pragma GCC target("avx2,f16c")

#define PF_STEPS 8 /* 32-byte steps of the AVX2 2 x 4 loop per prefetch chunk (4 lines per row) */


/* ---------------------------------------------------------------------------------------------
 * AVX2 micro-kernels
 * --------------------------------------------------------------------------------------------- */

/* Zero-padded copy of the last (n < 32) bytes of a row, as a vector. */
AI __m256i load_tail(const int8_t *p, int n)
{
    int8_t buf[32] __attribute__((aligned(32)));
    memset(buf, 0, sizeof buf);
    memcpy(buf, p, (size_t)n);
    return _mm256_load_si256((const __m256i *)buf);
}

AI int32_t hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* The horizontal sums of a, b, c, d as the four lanes of one vector. */
AI __m128i hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i d)
{
    const __m256i ab = _mm256_hadd_epi32(a, b), cd = _mm256_hadd_epi32(c, d);
    const __m256i abcd = _mm256_hadd_epi32(ab, cd); /* per 128-bit half: partial a, b, c, d */
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* acc += sum over byte pairs of a * b (see the header); ub = |b|. */
#define DOT_STEP(acc, ub, a, b, ones)                                                             \
    (acc) = _mm256_add_epi32(                                                                     \
        (acc), _mm256_madd_epi16(_mm256_maddubs_epi16((ub), _mm256_sign_epi8((a), (b))), (ones)))

/*
 * Main loop of the AVX2 micro-kernel in inline assembly: nsteps 32-byte steps of K for rows A0..A3
 * of A and B0, B1 of B, accumulating into acc[2 * i + j] (row Ai, row Bj).  Written by hand because
 * gcc's register allocation of the intrinsics version spills accumulators to the stack inside the
 * loop; here the 16 ymm registers are 8 accumulators + ones + a0..a3 + b, |b| + one temporary.
 * Per step: 4 + 2 loads, 2 vpabsb and 8 x (vpsignb, vpmaddubsw, vpmaddwd, vpaddd).  Four rows of
 * A against two of B (not two against four) keep the vpabsb on B at two per step, the count the
 * old abs-on-A 2 x 4 loop had: with four B rows the extra two measured 5-10 % slower on Zen 4.
 */
AI void loop_4x2(const int8_t *A0, int64_t lda, const int8_t *B0, const int8_t *B1, int64_t nsteps,
                 __m256i acc[8])
{
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *A1 = A0 + lda, *A2 = A0 + 2 * lda, *A3 = A0 + 3 * lda;
    __m256i c00 = acc[0], c01 = acc[1], c10 = acc[2], c11 = acc[3];
    __m256i c20 = acc[4], c21 = acc[5], c30 = acc[6], c31 = acc[7];
    int64_t off = 0;
    /* AT&T operand order: "op src2, src1, dst".  vpsignb %b, %a, %t: t = a with b's signs;
     * vpmaddubsw %t, %u, %t: u = |b| (unsigned) times t (signed), pairwise summed. */
#define STEP_I(ai, c)                                                                             \
    "vpsignb %%ymm12, " ai ", %%ymm14\n\t"                                                        \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm14\n\t"                                                    \
    "vpmaddwd %[ones], %%ymm14, %%ymm14\n\t"                                                      \
    "vpaddd %%ymm14, %[" #c "], %[" #c "]\n\t"
#define STEP_J(bp, c0, c1, c2, c3)                                                                \
    "vmovdqu (%[" #bp "],%[off]), %%ymm12\n\t"                                                    \
    "vpabsb %%ymm12, %%ymm13\n\t"                                                                 \
    STEP_I("%%ymm8", c0) STEP_I("%%ymm9", c1) STEP_I("%%ymm10", c2) STEP_I("%%ymm11", c3)
    __asm__ volatile(
        "1:\n\t"
        "vmovdqu (%[a0],%[off]), %%ymm8\n\t"
        "vmovdqu (%[a1],%[off]), %%ymm9\n\t"
        "vmovdqu (%[a2],%[off]), %%ymm10\n\t"
        "vmovdqu (%[a3],%[off]), %%ymm11\n\t"
        STEP_J(b0, c00, c10, c20, c30)
        STEP_J(b1, c01, c11, c21, c31)
        "add $32, %[off]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11),
          [c20] "+x"(c20), [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31),
          [off] "+r"(off), [n] "+r"(nsteps)
        : [a0] "r"(A0), [a1] "r"(A1), [a2] "r"(A2), [a3] "r"(A3), [b0] "r"(B0), [b1] "r"(B1),
          [ones] "x"(ones)
        : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "memory", "cc");
#undef STEP_J
#undef STEP_I
    acc[0] = c00; acc[1] = c01; acc[2] = c10; acc[3] = c11;
    acc[4] = c20; acc[5] = c21; acc[6] = c30; acc[7] = c31;
}

/* Store (or add) the MR x NR_ block of accumulators into C: one horizontal sum per accumulator. */
AI void store_block_avx2(const int MR, const int NR_, __m256i acc[4][4], int32_t *C, int64_t ldc, int accumulate)
{
    if (NR_ == 4) { /* four dot products at once: a transposing add tree, then one 4-wide update */
        for (int i = 0; i < MR; i++) {
            const __m128i s = hsum4_epi32(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            int32_t *c = C + i * ldc;
            const __m128i prev = accumulate ? _mm_loadu_si128((const __m128i *)c) : _mm_setzero_si128();
            _mm_storeu_si128((__m128i *)c, _mm_add_epi32(prev, s)); /* wraps (see the contract) */
        }
        return;
    }
    for (int i = 0; i < MR; i++) {
        for (int j = 0; j < NR_; j++) {
            const int32_t s = hsum_epi32(acc[i][j]);
            int32_t *c = C + i * ldc + j;
            /* unsigned add: wraps instead of undefined behaviour */
            *c = accumulate ? (int32_t)((uint32_t)*c + (uint32_t)s) : s;
        }
    }
}

/*
 * The AVX2 MR x NR_ block (MR, NR_ <= 4, compile-time constants at every call site, so the loops
 * unroll).  The full 4 x 4 block runs the assembly loop twice, once per pair of B rows (the four
 * rows of A come from L1 the second time); the edge blocks use intrinsics (M = 1 decoding is bound
 * by streaming B, not by registers).  The hardware prefetcher alone restarts slowly on every new
 * group of row streams, which showed up as a large loss in the memory-bound small-M cases, hence pf.
 */
AI void ukernel_avx2(const int MR, const int NR_, const int8_t *A, int64_t lda, const int8_t *B,
                     int64_t ldb, int64_t kb, int32_t *C, int64_t ldc, int accumulate, const int8_t *pf,
                     int64_t pf_len)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR_; j++) acc[i][j] = _mm256_setzero_si256();

    int64_t k = 0;
    if (MR == 4 && NR_ == 4) {
        if (kb >= 32) {
            const int64_t nsteps = kb / 32;
            /* with pf: run the assembly loop in chunks of PF_STEPS steps, prefetching the
             * matching part of the next panel's two rows before each chunk */
            const int64_t chunk = pf ? PF_STEPS : nsteps;
            for (int h = 0; h < 2; h++) {
                __m256i t[8];
                for (int q = 0; q < 8; q++) t[q] = _mm256_setzero_si256();
                const int8_t *Bh = B + 2 * h * ldb;
                for (int64_t s0 = 0; s0 < nsteps; s0 += chunk) {
                    const int64_t o = s0 * 32, n = (nsteps - s0) < chunk ? (nsteps - s0) : chunk;
                    if (pf)
                        for (int j = 2 * h; j < 2 * h + 2; j++)
                            for (int64_t l = o; l < o + n * 32 && l < pf_len; l += 64)
                                _mm_prefetch((const char *)(pf + j * ldb + l), _MM_HINT_T0);
                    loop_4x2(A + o, lda, Bh + o, Bh + ldb + o, n, t);
                }
                for (int i = 0; i < 4; i++) {
                    acc[i][2 * h] = t[2 * i];
                    acc[i][2 * h + 1] = t[2 * i + 1];
                }
            }
            k = kb & ~(int64_t)31;
        }
    } else {
        for (; k + 32 <= kb; k += 32) {
            __m256i a[4];
            for (int i = 0; i < MR; i++) a[i] = _mm256_loadu_si256((const __m256i *)(A + i * lda + k));
            for (int j = 0; j < NR_; j++) {
                if (pf && k < pf_len) _mm_prefetch((const char *)(pf + j * ldb + k), _MM_HINT_T0);
                const __m256i b = _mm256_loadu_si256((const __m256i *)(B + j * ldb + k));
                const __m256i ub = _mm256_abs_epi8(b);
                for (int i = 0; i < MR; i++) DOT_STEP(acc[i][j], ub, a[i], b, ones);
            }
        }
    }
    if (k < kb) { /* K remainder: 1..31 bytes, zero padded */
        const int rem = (int)(kb - k);
        __m256i a[4];
        for (int i = 0; i < MR; i++) a[i] = load_tail(A + i * lda + k, rem);
        for (int j = 0; j < NR_; j++) {
            const __m256i b = load_tail(B + j * ldb + k, rem);
            const __m256i ub = _mm256_abs_epi8(b);
            for (int i = 0; i < MR; i++) DOT_STEP(acc[i][j], ub, a[i], b, ones);
        }
    }
    store_block_avx2(MR, NR_, acc, C, ldc, accumulate);
}

#define DEFINE_UKERNEL_AVX2(mr, nr)                                                               \
    static void ukernel_avx2_##mr##x##nr(const int8_t *A, int64_t lda, const int8_t *B,           \
                                         int64_t ldb, int64_t kb, int32_t *C, int64_t ldc,        \
                                         int accumulate, const int8_t *pf, int64_t pf_len,        \
                                         const int32_t *comp)                                     \
    {                                                                                             \
        (void)comp;                                                                               \
        ukernel_avx2(mr, nr, A, lda, B, ldb, kb, C, ldc, accumulate, pf, pf_len);                 \
    }

DEFINE_UKERNEL_AVX2(1, 1) DEFINE_UKERNEL_AVX2(1, 2) DEFINE_UKERNEL_AVX2(1, 3) DEFINE_UKERNEL_AVX2(1, 4)
DEFINE_UKERNEL_AVX2(2, 1) DEFINE_UKERNEL_AVX2(2, 2) DEFINE_UKERNEL_AVX2(2, 3) DEFINE_UKERNEL_AVX2(2, 4)
DEFINE_UKERNEL_AVX2(3, 1) DEFINE_UKERNEL_AVX2(3, 2) DEFINE_UKERNEL_AVX2(3, 3) DEFINE_UKERNEL_AVX2(3, 4)
DEFINE_UKERNEL_AVX2(4, 1) DEFINE_UKERNEL_AVX2(4, 2) DEFINE_UKERNEL_AVX2(4, 3) DEFINE_UKERNEL_AVX2(4, 4)

static const kernel_set KERNELS_AVX2 = {
    4, 0, 50e3,
    {{ukernel_avx2_1x1, ukernel_avx2_1x2, ukernel_avx2_1x3, ukernel_avx2_1x4},
     {ukernel_avx2_2x1, ukernel_avx2_2x2, ukernel_avx2_2x3, ukernel_avx2_2x4},
     {ukernel_avx2_3x1, ukernel_avx2_3x2, ukernel_avx2_3x3, ukernel_avx2_3x4},
     {ukernel_avx2_4x1, ukernel_avx2_4x2, ukernel_avx2_4x3, ukernel_avx2_4x4}},
};

#pragma GCC pop_options

/* ---------------------------------------------------------------------------------------------
 * AVX-512 VNNI micro-kernels (zmm, 64 bytes of K per step)
 * --------------------------------------------------------------------------------------------- */
#pragma GCC push_options
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>

/* The lane sums of a, b, c, d as the four lanes of one vector (10 instructions instead of 4 x 9). */
AI __m128i hsum4_epi512(__m512i a, __m512i b, __m512i c, __m512i d)
{
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    /* per 128-bit lane: partial sums of a, b, c, d */
    const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* The VNNI MR x NR_ block (MR <= 4, NR_ <= 4): acc[i][j] += (B[j] + 128) . A[i] over 64-byte steps,
 * then C = lane sum - comp[i] (first K block) or C += lane sum (later K blocks).  Intrinsics only:
 * an inline-assembly 4 x 4 loop with the accumulators pinned to zmm16..31 (no register copies)
 * measured 20-27 % slower on Zen 4 than what gcc makes of this. */
AI void ukernel_vnni(const int MR, const int NR_, const int8_t *A, int64_t lda, const int8_t *B,
                     int64_t ldb, int64_t kb, int32_t *C, int64_t ldc, int accumulate, const int8_t *pf,
                     int64_t pf_len, const int32_t *comp)
{
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR_; j++) acc[i][j] = _mm512_setzero_si512();

    int64_t k = 0;
    for (; k + 64 <= kb; k += 64) {
        __m512i a[4];
        for (int i = 0; i < MR; i++) a[i] = _mm512_loadu_si512((const void *)(A + i * lda + k));
        for (int j = 0; j < NR_; j++) {
            if (pf && k < pf_len) _mm_prefetch((const char *)(pf + j * ldb + k), _MM_HINT_T0);
            const __m512i ub = _mm512_xor_si512(_mm512_loadu_si512((const void *)(B + j * ldb + k)), bias);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], ub, a[i]);
        }
    }
    if (k < kb) { /* K remainder: masked loads read only the row's bytes; B's zeros + 128 meet A's zeros */
        const __mmask64 mask = (1ULL << (kb - k)) - 1; /* kb - k < 64 */
        __m512i a[4];
        for (int i = 0; i < MR; i++) a[i] = _mm512_maskz_loadu_epi8(mask, A + i * lda + k);
        for (int j = 0; j < NR_; j++) {
            const __m512i ub = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, B + j * ldb + k), bias);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], ub, a[i]);
        }
    }

    for (int i = 0; i < MR; i++) {
        int32_t *c = C + i * ldc;
        const uint32_t base = accumulate ? 0u : (uint32_t)comp[i];
        if (NR_ == 4) { /* the four row sums at once: a transposing add tree, one 4-wide update */
            const __m128i s = hsum4_epi512(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            const __m128i prev = accumulate ? _mm_loadu_si128((const __m128i *)c) : _mm_set1_epi32(-(int32_t)base);
            _mm_storeu_si128((__m128i *)c, _mm_add_epi32(prev, s)); /* wraps (see the contract) */
            continue;
        }
        for (int j = 0; j < NR_; j++) {
            const uint32_t s = (uint32_t)_mm512_reduce_add_epi32(acc[i][j]);
            /* unsigned arithmetic: wraps instead of undefined behaviour (see the contract) */
            c[j] = accumulate ? (int32_t)((uint32_t)c[j] + s) : (int32_t)(s - base);
        }
    }
}

#define DEFINE_UKERNEL_VNNI(mr, nr)                                                               \
    static void ukernel_vnni_##mr##x##nr(const int8_t *A, int64_t lda, const int8_t *B,           \
                                         int64_t ldb, int64_t kb, int32_t *C, int64_t ldc,        \
                                         int accumulate, const int8_t *pf, int64_t pf_len,        \
                                         const int32_t *comp)                                     \
    {                                                                                             \
        ukernel_vnni(mr, nr, A, lda, B, ldb, kb, C, ldc, accumulate, pf, pf_len, comp);           \
    }

DEFINE_UKERNEL_VNNI(1, 1) DEFINE_UKERNEL_VNNI(1, 2) DEFINE_UKERNEL_VNNI(1, 3) DEFINE_UKERNEL_VNNI(1, 4)
DEFINE_UKERNEL_VNNI(2, 1) DEFINE_UKERNEL_VNNI(2, 2) DEFINE_UKERNEL_VNNI(2, 3) DEFINE_UKERNEL_VNNI(2, 4)
DEFINE_UKERNEL_VNNI(3, 1) DEFINE_UKERNEL_VNNI(3, 2) DEFINE_UKERNEL_VNNI(3, 3) DEFINE_UKERNEL_VNNI(3, 4)
DEFINE_UKERNEL_VNNI(4, 1) DEFINE_UKERNEL_VNNI(4, 2) DEFINE_UKERNEL_VNNI(4, 3) DEFINE_UKERNEL_VNNI(4, 4)

static const kernel_set KERNELS_VNNI = {
    4, 1, 150e3,
    {{ukernel_vnni_1x1, ukernel_vnni_1x2, ukernel_vnni_1x3, ukernel_vnni_1x4},
     {ukernel_vnni_2x1, ukernel_vnni_2x2, ukernel_vnni_2x3, ukernel_vnni_2x4},
     {ukernel_vnni_3x1, ukernel_vnni_3x2, ukernel_vnni_3x3, ukernel_vnni_3x4},
     {ukernel_vnni_4x1, ukernel_vnni_4x2, ukernel_vnni_4x3, ukernel_vnni_4x4}},
};

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

void row_comp(const int8_t *A, int64_t lda, int64_t M, int64_t K, int32_t *comp)
{
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < M; i++) {
        const int8_t *a = A + i * lda;
        __m256i acc = _mm256_setzero_si256();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + k))), ones));
        uint32_t s = (uint32_t)hsum_epi32(acc);
        for (; k < K; k++) s += (uint32_t)(int32_t)a[k];
        comp[i] = (int32_t)(s << 7);
    }
}

#pragma GCC pop_options

const kernel_set *kernels_for(int isa) { return isa == ISA_VNNI ? &KERNELS_VNNI : &KERNELS_AVX2; }
