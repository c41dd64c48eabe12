/* grad_bf16.c -- the backward through the frozen int8 weight, AVX-512 BF16. */
#include "llm_int8_cpu.h"

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
 * to the threads (parallel_for, one tile per chunk), each tile walking N in blocks of BWD_NB pairs (32 KiB
 * packed, L1-resident) and adding into C.  Denormals: vdpbf16ps treats bf16 denormal inputs and
 * float32 denormal results as zero (|values| < 2^-126), an absolute error below 2^-126 * 128 * N.
 * ============================================================================================= */

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512bf16")

#define BWD_MR 6
#define BWD_NR 64   /* output columns per micro-tile: four zmm of 16 float32 */
#define BWD_MB 96   /* rows of A per tile (a multiple of BWD_MR) */
#define BWD_NB 128  /* pairs of W rows per packed block: 128 * 64 * 4 bytes = 32 KiB */

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

/* The tiles of one backward call, shared out by parallel_for (one tile per chunk). */
typedef struct {
    const uint16_t *A;
    const int8_t *W;
    float *C;
    int64_t lda, ldw, ldc, M, N, K, ktiles;
    int failed;
} bwd_job;

static void bwd_chunk(void *arg, int64_t t)
{
    bwd_job *j = arg;
    uint32_t *bp = aligned_alloc(64, (size_t)BWD_NB * BWD_NR * sizeof(uint32_t));
    if (!bp) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_SEQ_CST);
        return;
    }
    const int64_t m0 = (t / j->ktiles) * BWD_MB, k0 = (t % j->ktiles) * BWD_NR;
    const int64_t m1 = m0 + BWD_MB < j->M ? m0 + BWD_MB : j->M;
    const int64_t kw = j->K - k0 < BWD_NR ? j->K - k0 : BWD_NR;
    bwd_tile(j->A, j->lda, j->W, j->ldw, j->C, j->ldc, j->N, m0, m1, k0, kw, bp);
    free(bp);
}

/* C = A @ W as above.  A: bf16 bits, row stride lda (elements) >= N rounded up to even, the
 * padding column zero; W: int8, row stride ldw >= K; C: float32, row stride ldc >= K.
 * Returns 0, ERR_ISA on a CPU without AVX-512 BF16, or ERR_NOMEM when a packing buffer could not
 * be allocated (C is then incomplete). */
EXPORT int llm_int8_grad_bf16_s8(const uint16_t *A, int64_t lda, const int8_t *W, int64_t ldw, float *C,
                                 int64_t ldc, int64_t M, int64_t N, int64_t K, int nthreads)
{
    if (!(llm_int8_cpu_features() & FEATURE_AVX512_BF16)) return ERR_ISA;
    if (M <= 0 || K <= 0) return 0;
    if (N <= 0) {
        for (int64_t m = 0; m < M; m++) memset(C + m * ldc, 0, (size_t)K * sizeof(float));
        return 0;
    }
    bwd_job job = {A, W, C, lda, ldw, ldc, M, N, K, (K + BWD_NR - 1) / BWD_NR, 0};
    const int64_t tiles = ((M + BWD_MB - 1) / BWD_MB) * job.ktiles;
    parallel_for(bwd_chunk, &job, tiles, nthreads < 1 ? 1 : nthreads);
    return job.failed ? ERR_NOMEM : 0;
}

#pragma GCC pop_options
