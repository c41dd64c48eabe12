/*
 * int8_gemm_avx2.c -- exact int8 x int8 -> int32 GEMM for x86-64 CPUs with AVX2.
 *
 *     C[M, N] (int32) = A[M, K] (int8) @ B[N, K]^T (int8)
 *
 * Both A and B are row-major with K contiguous ("NT" layout: every output element is a dot
 * product of a row of A with a row of B).  Rows may be strided (lda / ldb >= K, or any value
 * when there is a single row); C is row-major with row stride ldc.
 *
 * Plain C (gnu11) with GCC intrinsics and one inline-assembly loop; no Python or torch headers.
 * It is loaded with ctypes by llm_int8/_native.py, which compiles it with gcc on first use.  The
 * file is compiled for baseline x86-64; only the kernel section is compiled for AVX2 (target
 * and F16C, target pragma), so the CPU probe llm_int8_cpu_has_avx2() can run safely anywhere.
 *
 * ---------------------------------------------------------------------------------------------
 * The multiply trick (AVX2 has no signed x signed byte multiply)
 * ---------------------------------------------------------------------------------------------
 * vpmaddubsw (_mm256_maddubs_epi16) multiplies UNSIGNED bytes by SIGNED bytes and adds adjacent
 * pairs into saturating int16.  We feed it
 *
 *     u = |a|              (vpabsb)       -- unsigned, in [0, 127]
 *     s = sign(b, a)       (vpsignb)      -- b negated where a < 0, zeroed where a == 0
 *
 * so that u * s == a * b for every byte.  With |a|, |b| <= 127 a pair sum is at most
 * 2 * 127 * 127 = 32258 < 32767, so the int16 saturation can never trigger and the result is
 * exact.  vpmaddwd (_mm256_madd_epi16) against a vector of int16 ones then adds neighbouring
 * int16 pairs into int32 lanes, which we accumulate with vpaddd.  Per 32 bytes of K and per
 * (row of A, row of B) pair that is sign + maddubs + madd + add.
 *
 * Throughput (measured on Zen 3 with a micro-benchmark): vpmaddubsw and vpmaddwd share two pipes
 * (2 per cycle together), vpsignb issues on two other pipes, vpaddd on any of four.  The two
 * multiplies bound the loop at one (pair, 32-byte) step per cycle = 32 MAC/cycle; the 2 x 4
 * kernel below reaches about 21 MAC/cycle on one core with data in L1/L2 (fp32 FMA peaks at
 * 16 MAC/cycle on the same core).
 *
 * INPUT CONTRACT: all codes must lie in [-127, 127].  The value -128 is NOT supported: vpsignb
 * cannot negate it (-(-128) wraps back to -128), so a -128 in B that meets a negative code in A
 * gives a wrong product, and the no-saturation argument above assumes magnitudes <= 127.  It
 * never causes an out-of-bounds access, only a wrong number.  The codes are not checked (that
 * would cost a pass over the weight).  Symmetric absmax quantization, as in LLM.int8(), never
 * produces -128.
 *
 * ---------------------------------------------------------------------------------------------
 * Exactness bound
 * ---------------------------------------------------------------------------------------------
 * Every product is at most 127 * 127 = 16129 in magnitude, so any partial sum over k terms is at
 * most 16129 * k.  All partial sums we form (int16 pairs, int32 lanes, horizontal sums, the
 * running C values between K blocks) are sums over a subset of the K products, so if
 *
 *     16129 * K <= 2^31 - 1,   i.e.  K <= 133144  (LLM_INT8_MAX_K)
 *
 * nothing ever overflows and C equals the exact (int64) result.  Larger K is rejected (return
 * code -2) because the true result may not fit the int32 output at all.
 *
 * ---------------------------------------------------------------------------------------------
 * Blocking and threading
 * ---------------------------------------------------------------------------------------------
 * Micro-kernel: an MR x NR block of dot products (MR rows of A, NR rows of B) kept in MR * NR
 * ymm accumulators while walking K in 32-byte steps; each loaded A vector is reused NR times and
 * each B vector MR times.  The main block is 2 x 4 (8 accumulators; its inner loop is inline
 * assembly so that all 16 ymm registers are used without spills); M = 1 uses 1 x 4, and the
 * M / N edges use smaller instances of the same template.  A K remainder (K % 32 != 0) is handled
 * by copying the last partial chunk of each row into a zero-padded 32-byte buffer (zeros add
 * nothing), so we never read past the end of a row.  The 8 int32 lanes of each accumulator are
 * summed horizontally once per K block.
 *
 * Cache blocking (no packing, rows are read in place): M is cut into blocks of MC rows so that
 * an MC x KC block of A (<= 256 KiB) stays in L2 while all of B's rows stream past it; within
 * that, NR rows of B (NR x KC bytes) are reused from L1/L2 against every MR-row group of the A
 * block, whose rows come from L2.  K is only cut (KC = 8192) when a single block would not fit;
 * splitting K = 4096 measured slower, because every K block costs a horizontal reduction and a
 * read-modify-write of C.  When all of A fits (small M, e.g. decoding), B is streamed from memory
 * exactly once, which is what matters in the memory-bound M = 1 case.  While the first row group
 * works on a group of NR rows of B, it software-prefetches the next NR rows.
 *
 * Threads: the caller passes the thread count (the Python side uses torch.get_num_threads()).
 * N is cut into NR-aligned chunks (about 8 per thread; M is cut instead when N is too small)
 * that the threads take in order from an atomic counter, so a thread the OS deschedules on a
 * busy machine does not stall the others.  The threads are OpenMP's, so that inside a torch
 * process they are torch's own pool.  Tiny problems run single-threaded.
 */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LLM_INT8_MAX_K 133144 /* floor((2^31 - 1) / (127 * 127)) */

/* The library is built with -fvisibility=hidden; only these entry points are exported. */
#define EXPORT __attribute__((visibility("default")))

/* ---- CPU feature probe: compiled for baseline x86-64, safe to call on any x86-64 CPU. ---- */

EXPORT int llm_int8_cpu_has_avx2(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init(); /* F16C (half <-> float) came before AVX2 on every x86 CPU line */
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") ? 1 : 0;
#else
    return 0;
#endif
}

EXPORT int llm_int8_max_k(void) { return LLM_INT8_MAX_K; }

/* Everything below is only executed after the probe above said yes. */
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

/* Tuning parameters (measured on a 2-core Zen 3, see the header).  K blocks are only used when
 * M * K exceeds the L2 budget for A. */
#ifndef L2_A_BUDGET
#define L2_A_BUDGET (256 * 1024)
#endif
#ifndef KC_DEFAULT
#define KC_DEFAULT 8192
#endif
#ifndef PF_STEPS
#define PF_STEPS 8 /* 32-byte steps of the 2 x 4 loop per prefetch chunk (4 lines per row) */
#endif
#ifndef PF_PANELS
#define PF_PANELS 1 /* prefetch the B panel this many panels ahead */
#endif
#ifndef MC_MAX
#define MC_MAX 128
#endif

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

/* acc += sum over byte pairs of a * b (see the header); u = |a|. */
#define DOT_STEP(acc, u, a, b, ones)                                                              \
    (acc) = _mm256_add_epi32(                                                                     \
        (acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), _mm256_sign_epi8((b), (a))), (ones)))

/*
 * Main loop of the 2 x 4 micro-kernel in inline assembly: nsteps 32-byte steps of K for rows
 * A0, A1 of A and B0..B3 of B, accumulating into acc[0..3] (row A0) and acc[4..7] (row A1).
 * Written by hand because gcc's register allocation of the intrinsics version spills
 * accumulators to the stack inside the loop; here the 16 ymm registers are exactly
 *   8 accumulators + ones + |a0|, |a1|, a0, a1 + one B vector + two temporaries.
 * Per step: 2 + 4 loads, 2 vpabsb and 8 x (vpsignb, vpmaddubsw, vpmaddwd, vpaddd).
 */
AI void loop_2x4(const int8_t *A0, const int8_t *A1, const int8_t *B0, const int8_t *B1,
                 const int8_t *B2, const int8_t *B3, int64_t nsteps, __m256i acc[8])
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c00 = acc[0], c01 = acc[1], c02 = acc[2], c03 = acc[3];
    __m256i c10 = acc[4], c11 = acc[5], c12 = acc[6], c13 = acc[7];
    int64_t off = 0;
    /* AT&T operand order: "op src2, src1, dst".  vpsignb %a, %b, %t: t = b with a's signs;
     * vpmaddubsw %t, %u, %t: u (unsigned) times t (signed), pairwise summed. */
#define STEP_J(bp, c0, c1)                                                                        \
    "vmovdqu (%[" #bp "],%[off]), %%ymm13\n\t"                                                    \
    "vpsignb %%ymm10, %%ymm13, %%ymm14\n\t"                                                       \
    "vpsignb %%ymm11, %%ymm13, %%ymm15\n\t"                                                       \
    "vpmaddubsw %%ymm14, %%ymm8, %%ymm14\n\t"                                                     \
    "vpmaddubsw %%ymm15, %%ymm9, %%ymm15\n\t"                                                     \
    "vpmaddwd %[ones], %%ymm14, %%ymm14\n\t"                                                      \
    "vpmaddwd %[ones], %%ymm15, %%ymm15\n\t"                                                      \
    "vpaddd %%ymm14, %[" #c0 "], %[" #c0 "]\n\t"                                                  \
    "vpaddd %%ymm15, %[" #c1 "], %[" #c1 "]\n\t"
    __asm__ volatile(
        "1:\n\t"
        "vmovdqu (%[a0],%[off]), %%ymm10\n\t"
        "vmovdqu (%[a1],%[off]), %%ymm11\n\t"
        "vpabsb %%ymm10, %%ymm8\n\t"
        "vpabsb %%ymm11, %%ymm9\n\t"
        STEP_J(b0, c00, c10)
        STEP_J(b1, c01, c11)
        STEP_J(b2, c02, c12)
        STEP_J(b3, c03, c13)
        "add $32, %[off]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        : [c00] "+x"(c00), [c01] "+x"(c01), [c02] "+x"(c02), [c03] "+x"(c03),
          [c10] "+x"(c10), [c11] "+x"(c11), [c12] "+x"(c12), [c13] "+x"(c13),
          [off] "+r"(off), [n] "+r"(nsteps)
        : [a0] "r"(A0), [a1] "r"(A1), [b0] "r"(B0), [b1] "r"(B1), [b2] "r"(B2), [b3] "r"(B3),
          [ones] "x"(ones)
        : "xmm8", "xmm9", "xmm10", "xmm11", "xmm13", "xmm14", "xmm15", "memory", "cc");
#undef STEP_J
    acc[0] = c00; acc[1] = c01; acc[2] = c02; acc[3] = c03;
    acc[4] = c10; acc[5] = c11; acc[6] = c12; acc[7] = c13;
}

/*
 * C[i, j] (+)= dot(A[i, 0:kb], B[j, 0:kb]) for i < MR, j < NR (MR <= 2, NR <= 4).  MR and NR
 * are compile-time constants at every call site, so the loops unroll and the accumulators live
 * in registers.  The full 2 x 4 block runs its main loop in assembly (loop_2x4); the smaller
 * edge blocks use intrinsics, where the register pressure is low enough for gcc.
 *
 * pf, when not NULL, points at the first of the NR rows of B that the caller will use next
 * (same K offset); we prefetch them into L1 while working on this block.  The hardware
 * prefetcher alone restarts slowly on every new group of row streams, which showed up as a
 * large loss in the memory-bound small-M cases.
 */
AI void ukernel(const int MR, const int NR, const int8_t *A, int64_t lda, const int8_t *B,
                int64_t ldb, int64_t kb, int32_t *C, int64_t ldc, int accumulate,
                const int8_t *pf)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[2][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_si256();

    int64_t k = 0;
    if (MR == 2 && NR == 4) {
        if (kb >= 32) {
            __m256i t[8];
            for (int q = 0; q < 8; q++) t[q] = _mm256_setzero_si256();
            const int64_t nsteps = kb / 32;
            /* with pf: run the assembly loop in chunks of PF_STEPS steps, prefetching the
             * matching part of the next 4 rows of B before each chunk */
            const int64_t chunk = pf ? PF_STEPS : nsteps;
            for (int64_t s0 = 0; s0 < nsteps; s0 += chunk) {
                const int64_t o = s0 * 32, n = (nsteps - s0) < chunk ? (nsteps - s0) : chunk;
                if (pf)
                    for (int j = 0; j < 4; j++)
                        for (int64_t l = 0; l < n * 32; l += 64)
                            _mm_prefetch((const char *)(pf + j * ldb + o + l), _MM_HINT_T0);
                loop_2x4(A + o, A + lda + o, B + o, B + ldb + o, B + 2 * ldb + o, B + 3 * ldb + o,
                         n, t);
            }
            for (int q = 0; q < 4; q++) {
                acc[0][q] = t[q];
                acc[1][q] = t[4 + q];
            }
            k = kb & ~(int64_t)31;
        }
    } else {
        for (; k + 32 <= kb; k += 32) {
            __m256i a[2], u[2];
            for (int i = 0; i < MR; i++) {
                a[i] = _mm256_loadu_si256((const __m256i *)(A + i * lda + k));
                u[i] = _mm256_abs_epi8(a[i]);
            }
            for (int j = 0; j < NR; j++) {
                if (pf) _mm_prefetch((const char *)(pf + j * ldb + k), _MM_HINT_T0);
                const __m256i b = _mm256_loadu_si256((const __m256i *)(B + j * ldb + k));
                for (int i = 0; i < MR; i++) DOT_STEP(acc[i][j], u[i], a[i], b, ones);
            }
        }
    }
    if (k < kb) { /* K remainder: 1..31 bytes, zero padded */
        const int rem = (int)(kb - k);
        __m256i a[2], u[2];
        for (int i = 0; i < MR; i++) {
            a[i] = load_tail(A + i * lda + k, rem);
            u[i] = _mm256_abs_epi8(a[i]);
        }
        for (int j = 0; j < NR; j++) {
            const __m256i b = load_tail(B + j * ldb + k, rem);
            for (int i = 0; i < MR; i++) DOT_STEP(acc[i][j], u[i], a[i], b, ones);
        }
    }

    if (NR == 4) { /* four dot products at once: a transposing add tree, then one 4-wide update */
        for (int i = 0; i < MR; i++) {
            const __m128i s = hsum4_epi32(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            int32_t *c = C + i * ldc;
            const __m128i prev = accumulate ? _mm_loadu_si128((const __m128i *)c) : _mm_setzero_si128();
            _mm_storeu_si128((__m128i *)c, _mm_add_epi32(prev, s)); /* wraps, never within MAX_K */
        }
        return;
    }
    for (int i = 0; i < MR; i++) {
        for (int j = 0; j < NR; j++) {
            const int32_t s = hsum_epi32(acc[i][j]);
            int32_t *c = C + i * ldc + j;
            /* unsigned add: wraps instead of UB; never wraps within LLM_INT8_MAX_K anyway */
            *c = accumulate ? (int32_t)((uint32_t)*c + (uint32_t)s) : s;
        }
    }
}

typedef void (*ukernel_fn)(const int8_t *, int64_t, const int8_t *, int64_t, int64_t, int32_t *,
                           int64_t, int, const int8_t *);

#define DEFINE_UKERNEL(mr, nr)                                                                    \
    static void ukernel_##mr##x##nr(const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb,   \
                                    int64_t kb, int32_t *C, int64_t ldc, int accumulate,          \
                                    const int8_t *pf)                                             \
    {                                                                                             \
        ukernel(mr, nr, A, lda, B, ldb, kb, C, ldc, accumulate, pf);                                \
    }

DEFINE_UKERNEL(1, 1) DEFINE_UKERNEL(1, 2) DEFINE_UKERNEL(1, 3) DEFINE_UKERNEL(1, 4)
DEFINE_UKERNEL(2, 1) DEFINE_UKERNEL(2, 2) DEFINE_UKERNEL(2, 3) DEFINE_UKERNEL(2, 4)

/* Block shape: BLOCK_M rows of A x BLOCK_N rows of B; UKERNELS[mr - 1][nr - 1] covers the edges. */
#define BLOCK_M 2
#define BLOCK_N 4
#define BLOCK_N_EPI BLOCK_N
static const ukernel_fn UKERNELS[BLOCK_M][BLOCK_N] = {
    {ukernel_1x1, ukernel_1x2, ukernel_1x3, ukernel_1x4},
    {ukernel_2x1, ukernel_2x2, ukernel_2x3, ukernel_2x4},
};

/* Fused dequantization epilogue of the LLM.int8() forward (see llm_int8_mixed_linear_f32).  The
 * GEMM writes int32 sums into the float32 output buffer; on the last K block each finished tile is
 * turned in place into
 *
 *     out[i, j] = ((float)acc[i, j] * sx[i]) * sw[j]  +  sum_c xc[i, c] * wc[j, c]  +  bias[j]
 *
 * (the same float32 operations, in the same order, as the eager torch path), where the decomposed
 * columns c < n_int8 multiply the dequantized int8 weight column, wc[j, c] = (float)W[j, col_c] * sw[j],
 * and the others the stored float columns fpw[j, c - n_int8], read in place in their dtype.  wc is
 * gathered once per group of BLOCK_N outputs and reused for all the rows of the block. */
typedef struct {
    const float *sx;       /* [M] x_absmax / 127 */
    const float *sw;       /* [N] w_absmax / 127 */
    const float *bias;     /* [N] or NULL */
    int64_t ncols;         /* decomposed columns handled here (0: none) */
    int64_t n_int8;        /* the first n_int8 of them use the int8 weight */
    const int64_t *cols;   /* [ncols] their indices in K */
    const float *xc;       /* [M, ncols] x at those columns */
    const int8_t *W;       /* [N, ldw] the int8 weight */
    int64_t ldw;
    const void *fpw;       /* [N, ncols - n_int8] the stored float weight columns */
    int fpw_dtype;         /* FP_F32 / FP_F16 / FP_BF16 */
} epilogue;

typedef struct {
    const int8_t *A;
    const int8_t *B;
    int32_t *C;
    int64_t lda, ldb, ldc;
    int64_t M, N, K;
    const epilogue *epi;   /* NULL: plain int32 output */
    int64_t row0, col0;    /* global index of this sub-problem's first row / column */
} gemm_args;

#define EPI_MAX_COLS 64 /* most decomposed columns the epilogue handles; more go to the caller */
enum { FP_F32 = 0, FP_F16 = 1, FP_BF16 = 2 };

/* wc[c][j] for the nb outputs gj .. gj + nb - 1 (see the epilogue above); exact conversions. */
static void gather_wc(const epilogue *e, int64_t gj, int nb, float wc[][BLOCK_N_EPI])
{
    const int64_t nc = e->ncols, ni = e->n_int8, nfp = nc - ni;
    for (int j = 0; j < nb; j++) {
        const int64_t n = gj + j;
        const int8_t *wrow = e->W + n * e->ldw;
        for (int64_t c = 0; c < ni; c++) wc[c][j] = (float)wrow[e->cols[c]] * e->sw[n];
        if (e->fpw_dtype == FP_F16) {
            const uint16_t *f = (const uint16_t *)e->fpw + n * nfp;
            for (int64_t c = 0; c < nfp; c++) wc[ni + c][j] = _cvtsh_ss(f[c]);
        } else if (e->fpw_dtype == FP_BF16) {
            const uint16_t *f = (const uint16_t *)e->fpw + n * nfp;
            for (int64_t c = 0; c < nfp; c++) {
                const uint32_t bits = (uint32_t)f[c] << 16;
                memcpy(&wc[ni + c][j], &bits, sizeof bits);
            }
        } else {
            const float *f = (const float *)e->fpw + n * nfp;
            for (int64_t c = 0; c < nfp; c++) wc[ni + c][j] = f[c];
        }
    }
}

/* Apply the epilogue to the finished m x nb tile at C (global row gi, column gj) with the gathered
 * wc; C holds int32 sums and becomes float32 in place. */
static void apply_epilogue(const epilogue *e, const float wc[][BLOCK_N_EPI], int32_t *C, int64_t ldc,
                           int64_t gi, int m, int64_t gj, int nb)
{
    const int64_t nc = e->ncols;
    for (int i = 0; i < m; i++) {
        const float sx = e->sx[gi + i];
        const float *xc = e->xc + (gi + i) * nc;
        int32_t *ci = C + i * ldc;
        float *oi = (float *)ci;
        if (nb == 4) { /* the same operations as below, four outputs at a time (no FMA contraction) */
            __m128 v = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)ci)),
                                             _mm_set1_ps(sx)),
                                  _mm_loadu_ps(e->sw + gj));
            if (nc) {
                __m128 dot = _mm_setzero_ps();
                for (int64_t c = 0; c < nc; c++)
                    dot = _mm_add_ps(dot, _mm_mul_ps(_mm_set1_ps(xc[c]), _mm_loadu_ps(wc[c])));
                v = _mm_add_ps(v, dot);
            }
            if (e->bias) v = _mm_add_ps(v, _mm_loadu_ps(e->bias + gj));
            _mm_storeu_ps(oi, v);
            continue;
        }
        for (int j = 0; j < nb; j++) {
            int32_t a;
            memcpy(&a, ci + j, sizeof a);
            float v = ((float)a * sx) * e->sw[gj + j];
            if (nc) {
                float dot = 0.0f;
                for (int64_t c = 0; c < nc; c++) dot += xc[c] * wc[c][j];
                v += dot;
            }
            if (e->bias) v += e->bias[gj + j];
            memcpy(oi + j, &v, sizeof v);
        }
    }
}

/* Single-threaded blocked GEMM on one sub-problem. */
static void gemm_serial(const gemm_args *g)
{
    const int64_t M = g->M, N = g->N, K = g->K;
    const int mr = BLOCK_M, nr = BLOCK_N;
    float wc[EPI_MAX_COLS][BLOCK_N_EPI];
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int64_t i = 0; i < M; i++) memset(g->C + i * g->ldc, 0, (size_t)N * sizeof(int32_t));
        return;
    }

    int64_t kc, mc;
    if (M * K <= L2_A_BUDGET) { /* all of A fits in L2: one K block, B streamed once */
        kc = K;
        mc = M;
    } else {
        kc = K < KC_DEFAULT ? K : KC_DEFAULT;
        mc = L2_A_BUDGET / kc;
        if (mc > MC_MAX) mc = MC_MAX;
        mc -= mc % mr;
        if (mc < mr) mc = mr;
    }

    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kb = (K - k0) < kc ? (K - k0) : kc;
        const int accumulate = k0 > 0;
        for (int64_t i0 = 0; i0 < M; i0 += mc) {
            const int64_t mb = (M - i0) < mc ? (M - i0) : mc;
            for (int64_t j = 0; j < N; j += nr) {
                const int nb = (N - j) < nr ? (int)(N - j) : nr;
                const int8_t *Bj = g->B + j * g->ldb + k0;
                const int last = g->epi && k0 + kb == K;
                if (last && g->epi->ncols) gather_wc(g->epi, g->col0 + j, nb, wc);
                for (int64_t i = i0; i < i0 + mb; i += mr) {
                    const int m = (i0 + mb - i) < mr ? (int)(i0 + mb - i) : mr;
                    /* the first row group of a B panel prefetches the next full panel */
                    const int8_t *pf = (i == i0 && j + (PF_PANELS + 1) * nr <= N)
                                           ? Bj + PF_PANELS * nr * g->ldb : NULL;
                    UKERNELS[m - 1][nb - 1](g->A + i * g->lda + k0, g->lda, Bj, g->ldb, kb,
                                            g->C + i * g->ldc + j, g->ldc, accumulate, pf);
                    if (last)
                        apply_epilogue(g->epi, (const float(*)[BLOCK_N_EPI])wc, g->C + i * g->ldc + j,
                                       g->ldc, g->row0 + i, m, g->col0 + j, nb);
                }
            }
        }
    }
}

/* Work shared by the threads of one call: the N (or M) range cut into chunks, handed out in
 * order through an atomic counter, so a thread that the OS deschedules (a busy machine) does not
 * hold everyone else up at the join. */
typedef struct {
    gemm_args base;
    int split_n;     /* 1: chunks are ranges of B rows (N); 0: ranges of A rows (M) */
    int64_t total;   /* N or M */
    int64_t chunk;   /* rows per chunk, a multiple of the block size */
    int64_t nchunks;
    int64_t next;    /* next chunk to hand out (atomic) */
} gemm_shared;

static void gemm_worker(gemm_shared *sh)
{
    for (;;) {
        const int64_t c = __atomic_fetch_add(&sh->next, 1, __ATOMIC_RELAXED);
        if (c >= sh->nchunks) return;
        const int64_t lo = c * sh->chunk;
        const int64_t hi = (lo + sh->chunk) < sh->total ? (lo + sh->chunk) : sh->total;
        gemm_args g = sh->base;
        if (sh->split_n) {
            g.B += lo * g.ldb;
            g.C += lo;
            g.N = hi - lo;
            g.col0 += lo;
        } else {
            g.A += lo * g.lda;
            g.C += lo * g.ldc;
            g.M = hi - lo;
            g.row0 += lo;
        }
        gemm_serial(&g);
    }
}

#define MAX_THREADS 256
#define CHUNKS_PER_THREAD 8
/* Below this many multiply-adds, starting threads costs more than it saves. */
#define MIN_MACS_PER_THREAD (1 << 20)
/* A few rows of A (decoding) are bound by streaming B from memory, not by arithmetic: there a
 * thread pays off from this many bytes of B on.  Measured in a decoding pattern (every layer of a
 * model once per token, so each weight comes from DRAM): SmolLM2's 110 KiB k/v projections are
 * 5 % faster per token on two threads than on one.  (Timing one layer in a loop, with its weight
 * hot in L2, would favour one thread.) */
#ifndef MIN_B_BYTES_PER_THREAD
#define MIN_B_BYTES_PER_THREAD (32 * 1024)
#endif
#define FEW_ROWS 4

/*
 * C = A @ B^T, exact, for codes in [-127, 127] and K <= LLM_INT8_MAX_K.
 * Returns 0 on success, -1 on bad arguments, -2 if K is too large for an exact int32 result,
 * -3 if the CPU lacks AVX2.
 */
static void gemm_run(const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb, int32_t *C,
                     int64_t ldc, int64_t M, int64_t N, int64_t K, int nthreads, const epilogue *epi);

EXPORT int llm_int8_gemm_nt_s8s8s32(
    const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb, int32_t *C, int64_t ldc,
    int64_t M, int64_t N, int64_t K, int nthreads)
{
    if (M < 0 || N < 0 || K < 0) return -1;
    if (M == 0 || N == 0) return 0;
    if (K > LLM_INT8_MAX_K) return -2;
    if (!C || ldc < N || (K > 0 && (!A || !B))) return -1;
    if (!llm_int8_cpu_has_avx2()) return -3;
    gemm_run(A, lda, B, ldb, C, ldc, M, N, K, nthreads, NULL);
    return 0;
}

static void gemm_run(const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb, int32_t *C,
                     int64_t ldc, int64_t M, int64_t N, int64_t K, int nthreads, const epilogue *epi)
{
    const gemm_args base = {A, B, C, lda, ldb, ldc, M, N, K, epi, 0, 0};

    /* thread count: caller's choice, capped so every thread gets a decent amount of work */
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    const double macs = (double)M * (double)N * (double)(K > 0 ? K : 1);
    if (M <= FEW_ROWS)
        while (nt > 1 && (double)N * (double)K / (double)nt < (double)MIN_B_BYTES_PER_THREAD) nt--;
    else
        while (nt > 1 && macs / (double)nt < (double)MIN_MACS_PER_THREAD) nt--;

    int split_n = 1;
    if (nt > 1) {
        if (N >= nt * BLOCK_N * 4) {
            split_n = 1;
        } else if (M >= nt * BLOCK_M * 4) {
            split_n = 0;
        } else {
            nt = 1;
        }
    }
    if (nt == 1) {
        gemm_serial(&base);
        return;
    }

    /* about CHUNKS_PER_THREAD chunks per thread, each a whole number of blocks */
    gemm_shared sh;
    sh.base = base;
    sh.split_n = split_n;
    sh.total = split_n ? N : M;
    const int64_t unit = split_n ? BLOCK_N : BLOCK_M;
    const int64_t units = (sh.total + unit - 1) / unit;
    int64_t per = units / (nt * CHUNKS_PER_THREAD);
    if (per < 1) per = 1;
    sh.chunk = per * unit;
    sh.nchunks = (sh.total + sh.chunk - 1) / sh.chunk;
    sh.next = 0;

    /* OpenMP, not threads of our own: loaded into a torch process, this library binds to the
     * libgomp torch already loaded (same soname), so the GEMM runs on torch's thread pool. Threads
     * of our own competed with torch's OpenMP workers, which spin for a while after every torch op,
     * and made a whole layer up to 3x slower than its parts. */
    #pragma omp parallel num_threads((int)nt)
    gemm_worker(&sh);
}


/* =============================================================================================
 * The whole LLM.int8() forward for float32 x, in one call (llm_int8_mixed_linear_f32).
 *
 *   1. decomposed columns: every column of x with max_m |x[m, c]| >= threshold (NaN counted as 0,
 *      so it never hides an Inf elsewhere in the column), then the calibrated fp_cols;
 *   2. per row: those columns set to 0, absmax (NaN propagates), codes round-half-even(x * 127/absmax)
 *      (a row of zeros gets codes 0; a row whose absmax is not finite gets codes 0 and an absmax that
 *      carries the NaN / Inf into its outputs);
 *   3. the int8 GEMM with the fused epilogue above (dequantization, decomposed columns, bias).
 *
 * This is the eager path of llm_int8/cpu.py (and the reference kernel) in three passes over x and
 * one over the output instead of about twenty.  Codes and int32 sums are identical; the float
 * output can differ in the last bits where a sum of the decomposed columns is formed in another
 * order than a BLAS would.
 * ============================================================================================= */

/* Column-wise max |x| over the rows, NaN ignored: cmax[c] for c in [c0, c1). */
static void column_absmax(const float *x, int64_t ldx, int64_t M, int64_t c0, int64_t c1, float *cmax)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t c = c0;
    for (; c + 64 <= c1; c += 64) {
        __m256 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_ps();
        for (int64_t m = 0; m < M; m++) {
            const float *row = x + m * ldx + c;
            for (int q = 0; q < 8; q++) /* max(a, acc) returns acc when a is NaN */
                acc[q] = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row + 8 * q), absmask), acc[q]);
        }
        for (int q = 0; q < 8; q++) _mm256_storeu_ps(cmax + c + 8 * q, acc[q]);
    }
    for (; c < c1; c++) {
        float a = 0.0f;
        for (int64_t m = 0; m < M; m++) {
            const float v = __builtin_fabsf(x[m * ldx + c]);
            if (v > a) a = v; /* false for NaN */
        }
        cmax[c] = a;
    }
}

/* Codes of one row (decomposed columns already zeroed in src); returns the row's absmax. */
static float quantize_row(const float *src, int64_t K, int8_t *codes)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(src + k);
        vmax = _mm256_max_ps(_mm256_and_ps(v, absmask), vmax);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float absmax = 0.0f;
    for (int q = 0; q < 8; q++) absmax = lanes[q] > absmax ? lanes[q] : absmax;
    int nan = _mm256_movemask_ps(vnan) != 0;
    for (; k < K; k++) {
        const float v = __builtin_fabsf(src[k]);
        if (v != v) nan = 1;
        else if (v > absmax) absmax = v;
    }
    if (nan) absmax = __builtin_nanf("");

    if (!(absmax > 0.0f) || !__builtin_isfinite(absmax)) { /* zeros, NaN or Inf: codes 0 */
        memset(codes, 0, (size_t)K);
        return absmax;
    }
    /* as torch evaluates `127 / absmax` (reciprocal, then times 127): bit-identical codes */
    const float scale = (1.0f / absmax) * 127.0f;
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i q[4];
        for (int t = 0; t < 4; t++) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + k + 8 * t), vs);
            q[t] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        const __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
        const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), perm);
        _mm256_storeu_si256((__m256i *)(codes + k), b);
    }
    for (; k < K; k++) codes[k] = (int8_t)__builtin_rintf(src[k] * scale); /* rint: half to even */
    return absmax;
}

/* Below this many elements of x per thread, the quantization passes run on one thread. */
#define MIN_QUANT_PER_THREAD (1 << 16)

/* One layer's weight side of the LLM.int8() forward, as the caller binds it once (the Python side
 * mirrors this struct with ctypes; keep the two in the same order). */
typedef struct {
    const int8_t *W;          /* [N, K] int8 codes, row stride ldw */
    int64_t ldw, N, K;
    const float *scb;         /* [N] weight row absmax */
    const float *bias;        /* [N] or NULL */
    float threshold;          /* run-time outlier threshold (<= 0: none) */
    const int64_t *fp_cols;   /* [nfp] calibrated columns kept in float, or NULL */
    int64_t nfp;
    const void *fpw;          /* [N, nfp] row-major, their float weight columns */
    int fpw_dtype;            /* FP_F32 / FP_F16 / FP_BF16 */
    int max_cols;             /* most decomposed columns fused here (<= EPI_MAX_COLS) */
} llm_int8_layer;

/*
 * out [M, N] (float32, contiguous) = LLM.int8() forward of x [M, K] (float32, row stride ldx) through
 * the layer L.  cols_out (capacity K + nfp) receives the decomposed columns, found ones (ascending,
 * those not in fp_cols) first, then fp_cols.
 *
 * Returns their number nc >= 0.  When nc <= max_cols, out is complete; otherwise out holds the
 * dequantized int8 part only and the caller adds x[:, cols] @ wcols.T and the bias.  Errors:
 * -1 bad arguments, -2 K too large, -3 no AVX2, -4 out of memory.
 */
EXPORT int64_t llm_int8_mixed_linear_f32(const llm_int8_layer *L, const float *x, int64_t ldx, int64_t M,
                                         float *out, int64_t *cols_out, int nthreads)
{
    if (!L) return -1;
    const int64_t N = L->N, K = L->K, nfp = L->nfp, ldw = L->ldw;
    const int8_t *W = L->W;
    const int64_t *fp_cols = L->fp_cols;
    if (M <= 0 || N <= 0 || K <= 0 || nfp < 0 || ldx < K || ldw < K) return -1;
    if (!x || !W || !L->scb || !out || !cols_out || (nfp && (!fp_cols || !L->fpw))) return -1;
    if (L->fpw_dtype != FP_F32 && L->fpw_dtype != FP_F16 && L->fpw_dtype != FP_BF16) return -1;
    if (K > LLM_INT8_MAX_K) return -2;
    if (!llm_int8_cpu_has_avx2()) return -3;
    const int max_cols = L->max_cols > EPI_MAX_COLS ? EPI_MAX_COLS : L->max_cols;
    int nt = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    while (nt > 1 && (double)M * (double)K / nt < MIN_QUANT_PER_THREAD) nt--;

    int64_t rc = -4;
    int8_t *codes = NULL;
    float *sx = NULL, *sw = NULL, *xc = NULL, *cmax = NULL, *tmp = NULL;
    uint8_t *is_fp = NULL;
    codes = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    sx = malloc((size_t)M * sizeof(float));
    sw = malloc((size_t)N * sizeof(float));
    is_fp = calloc((size_t)K, 1);
    if (!codes || !sx || !sw || !is_fp) goto done;

    /* 1. the decomposed columns */
    for (int64_t f = 0; f < nfp; f++) {
        if (fp_cols[f] < 0 || fp_cols[f] >= K) { rc = -1; goto done; }
        is_fp[fp_cols[f]] = 1;
    }
    int64_t nc = 0;
    if (L->threshold > 0.0f) {
        cmax = malloc((size_t)K * sizeof(float));
        if (!cmax) goto done;
        if (nt > 1) {
            const int64_t blocks = (K + 63) / 64;
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t b = 0; b < blocks; b++)
                column_absmax(x, ldx, M, b * 64, (b + 1) * 64 < K ? (b + 1) * 64 : K, cmax);
        } else {
            column_absmax(x, ldx, M, 0, K, cmax);
        }
        for (int64_t c = 0; c < K; c++)
            if (cmax[c] >= L->threshold && !is_fp[c]) cols_out[nc++] = c;
    }
    const int64_t n_int8 = nc;
    for (int64_t f = 0; f < nfp; f++) cols_out[nc++] = fp_cols[f];
    const int fused = nc <= max_cols;

    /* 2. row quantization, and x at the decomposed columns */
    if (nc) {
        tmp = malloc((size_t)nt * (size_t)K * sizeof(float));
        if (!tmp) goto done;
        if (fused) {
            xc = malloc((size_t)M * (size_t)nc * sizeof(float));
            if (!xc) goto done;
        }
    }
    #pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        const float *src = row;
        if (nc) {
            float *t = tmp + (int64_t)omp_get_thread_num() * K;
            memcpy(t, row, (size_t)K * sizeof(float));
            for (int64_t c = 0; c < nc; c++) t[cols_out[c]] = 0.0f;
            if (xc)
                for (int64_t c = 0; c < nc; c++) xc[m * nc + c] = row[cols_out[c]];
            src = t;
        }
        sx[m] = quantize_row(src, K, codes + m * K) / 127.0f;
    }
    for (int64_t n = 0; n < N; n++) sw[n] = L->scb[n] / 127.0f;

    /* 3. GEMM + epilogue */
    const epilogue e = {sx, sw, fused ? L->bias : NULL, fused ? nc : 0, n_int8, cols_out, xc, W, ldw,
                        L->fpw, L->fpw_dtype};
    gemm_run(codes, K, W, ldw, (int32_t *)out, N, M, N, K, nthreads, &e);
    rc = nc;

done:
    free(codes);
    free(sx);
    free(sw);
    free(xc);
    free(cmax);
    free(tmp);
    free(is_fp);
    return rc;
}

#pragma GCC pop_options


/* =============================================================================================
 * Backward through the frozen weight (llm_int8_grad_bf16_s8), AVX-512 BF16.
 *
 *     C[M, K] (float32) = A[M, N] (bfloat16) @ W[N, K] (int8)
 *
 * A is the gradient of the layer's output scaled by each weight row's absmax / 127 and rounded
 * to bfloat16 (by the caller); W is the int8 weight as stored ([out, in], K contiguous); C is the
 * gradient of the layer's input.  Every int8 code is exactly a bfloat16, so the only rounding
 * before the float32 accumulation is that of A.
 *
 * vdpbf16ps multiplies pairs of bf16 and adds both products to a float32 lane: lane j of
 * C[m, k0:k0+16] gets A[m, n] * W[n, k0+j] + A[m, n+1] * W[n+1, k0+j] per instruction, 32
 * multiply-adds against 16 for a float32 FMA.  So the reduction dim N is taken in pairs:
 *
 *   * A is read in place, one 32-bit word (A[m, n], A[m, n+1]) per broadcast.  The caller
 *     passes an even row length (a zero column appended when N is odd), so a pair never
 *     reads past a row;
 *   * W is packed per tile: for a block of BWD_NB pairs of rows and BWD_NR = 64 columns, lane j
 *     of pair p holds (bf16 W[2p, k0+j], bf16 W[2p+1, k0+j]); rows past N and columns past K are
 *     packed as zeros (they add nothing).  A small integer's float32 has zero low 16 bits, so its
 *     bf16 is the float32's high half.
 *
 * Micro-kernel: BWD_MR = 6 rows x 64 columns in 24 zmm accumulators; per pair of N it loads four
 * packed W vectors and broadcasts six A words.  Tiles of BWD_MB rows x 64 columns are shared out
 * to the threads (OpenMP, torch's pool), each tile walking N in blocks of BWD_NB pairs (32 KiB
 * packed, L1-resident) and adding into C.  Denormals: vdpbf16ps treats bf16 denormal inputs and
 * float32 denormal results as zero (|values| < 2^-126), an absolute error below 2^-126 * 128 * N.
 * ============================================================================================= */

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512bf16")

#define BWD_MR 6
#define BWD_NR 64   /* output columns per micro-tile: four zmm of 16 float32 */
#define BWD_MB 96   /* rows of A per tile (a multiple of BWD_MR) */
#define BWD_NB 128  /* pairs of W rows per packed block: 128 * 64 * 4 bytes = 32 KiB */

EXPORT int llm_int8_cpu_has_avx512bf16(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16")
               ? 1
               : 0;
#else
    return 0;
#endif
}

/* 16 int8 codes -> their float32 values' bits (exact). */
static inline __m512i bwd_codes_f32(__m128i codes)
{
    return _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)));
}

/* Pack W[n0 : n0 + 2 * np, k0 : k0 + kw] (rows past N zero) into bp[np][64] pair lanes. */
static void bwd_pack_w(const int8_t *W, int64_t ldw, int64_t N, int64_t n0, int64_t np, int64_t k0, int64_t kw,
                       uint32_t *bp)
{
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t p = 0; p < np; p++) {
        const int64_t n = n0 + 2 * p;
        const int8_t *r0 = W + n * ldw + k0;
        const int8_t *r1 = n + 1 < N ? r0 + ldw : NULL;
        for (int64_t j = 0; j < BWD_NR; j += 16) {
            const int64_t left = kw - j;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            const __m512i lo = bwd_codes_f32(_mm_maskz_loadu_epi8(mask, r0 + j));
            const __m512i hi = r1 ? bwd_codes_f32(_mm_maskz_loadu_epi8(mask, r1 + j)) : _mm512_setzero_si512();
            const __m512i pair = _mm512_or_si512(_mm512_and_si512(hi, high), _mm512_srli_epi32(lo, 16));
            _mm512_store_si512((__m512i *)(bp + p * BWD_NR + j), pair);
        }
    }
}

/* C[rows, 64] (+)= A[rows, 2 * np] @ packed W; rows <= BWD_MR, columns masked by cmask[4]. */
static inline __attribute__((always_inline)) void bwd_kernel(const uint16_t *A, int64_t lda, const uint32_t *bp,
                                                             int64_t np, float *C, int64_t ldc, const int rows,
                                                             const __mmask16 cmask[4], int accumulate)
{
    __m512 acc[BWD_MR][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++)
            acc[r][j] = accumulate ? _mm512_maskz_loadu_ps(cmask[j], C + r * ldc + 16 * j) : _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        const uint32_t *b = bp + p * BWD_NR;
        const __m512bh b0 = (__m512bh)_mm512_load_si512((const __m512i *)(b + 0));
        const __m512bh b1 = (__m512bh)_mm512_load_si512((const __m512i *)(b + 16));
        const __m512bh b2 = (__m512bh)_mm512_load_si512((const __m512i *)(b + 32));
        const __m512bh b3 = (__m512bh)_mm512_load_si512((const __m512i *)(b + 48));
        for (int r = 0; r < rows; r++) {
            uint32_t word;
            memcpy(&word, A + r * lda + 2 * p, sizeof word);
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)word);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) _mm512_mask_storeu_ps(C + r * ldc + 16 * j, cmask[j], acc[r][j]);
}

/* One tile: rows [m0, m1) x columns [k0, k0 + kw) of C, over all of N. */
static void bwd_tile(const uint16_t *A, int64_t lda, const int8_t *W, int64_t ldw, float *C, int64_t ldc,
                     int64_t N, int64_t m0, int64_t m1, int64_t k0, int64_t kw, uint32_t *bp)
{
    __mmask16 cmask[4];
    for (int j = 0; j < 4; j++) {
        const int64_t left = kw - 16 * j;
        cmask[j] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    }
    const int64_t pairs = (N + 1) / 2;
    for (int64_t p0 = 0; p0 < pairs; p0 += BWD_NB) {
        const int64_t np = pairs - p0 < BWD_NB ? pairs - p0 : BWD_NB;
        bwd_pack_w(W, ldw, N, 2 * p0, np, k0, kw, bp);
        const int accumulate = p0 > 0;
        for (int64_t m = m0; m < m1; m += BWD_MR) {
            const uint16_t *a = A + m * lda + 2 * p0;
            float *c = C + m * ldc + k0;
            switch (m1 - m < BWD_MR ? (int)(m1 - m) : BWD_MR) {  /* constant row counts: unrolled kernels */
            case 6: bwd_kernel(a, lda, bp, np, c, ldc, 6, cmask, accumulate); break;
            case 5: bwd_kernel(a, lda, bp, np, c, ldc, 5, cmask, accumulate); break;
            case 4: bwd_kernel(a, lda, bp, np, c, ldc, 4, cmask, accumulate); break;
            case 3: bwd_kernel(a, lda, bp, np, c, ldc, 3, cmask, accumulate); break;
            case 2: bwd_kernel(a, lda, bp, np, c, ldc, 2, cmask, accumulate); break;
            default: bwd_kernel(a, lda, bp, np, c, ldc, 1, cmask, accumulate); break;
            }
        }
    }
}

/* C = A @ W as above.  A: bf16 bits, row stride lda (elements) >= N rounded up to even, the
 * padding column zero; W: int8, row stride ldw >= K; C: float32, row stride ldc >= K.
 * Returns 0, or -1 when a buffer could not be allocated (C is then incomplete). */
EXPORT int llm_int8_grad_bf16_s8(const uint16_t *A, int64_t lda, const int8_t *W, int64_t ldw, float *C,
                                 int64_t ldc, int64_t M, int64_t N, int64_t K, int nthreads)
{
    if (M <= 0 || K <= 0) return 0;
    if (N <= 0) {
        for (int64_t m = 0; m < M; m++) memset(C + m * ldc, 0, (size_t)K * sizeof(float));
        return 0;
    }
    const int64_t mtiles = (M + BWD_MB - 1) / BWD_MB, ktiles = (K + BWD_NR - 1) / BWD_NR;
    const int64_t tiles = mtiles * ktiles;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > tiles) nt = (int)tiles;
    int failed = 0;
    #pragma omp parallel num_threads(nt)
    {
        uint32_t *bp = aligned_alloc(64, (size_t)BWD_NB * BWD_NR * sizeof(uint32_t));
        if (!bp) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tiles; t++) {
            if (!bp) continue;
            const int64_t m0 = (t / ktiles) * BWD_MB, k0 = (t % ktiles) * BWD_NR;
            const int64_t m1 = m0 + BWD_MB < M ? m0 + BWD_MB : M;
            const int64_t kw = K - k0 < BWD_NR ? K - k0 : BWD_NR;
            bwd_tile(A, lda, W, ldw, C, ldc, N, m0, m1, k0, kw, bp);
        }
        free(bp);
    }
    return failed ? -1 : 0;
}

#pragma GCC pop_options
