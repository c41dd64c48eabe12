/* mixed_linear.c -- the whole LLM.int8() forward for float32 x in one call. */
#include "llm_int8_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")
#include <immintrin.h>

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
#define QUANT_ROWS_PER_CHUNK 8

/* One layer's weight side of the LLM.int8() forward (filled from llm_int8_mixed_linear_f32's
 * arguments; internal to this file). */
typedef struct {
    const int8_t *W;          /* [N, K] int8 codes, row stride ldw */
    int64_t ldw, N, K;
    const float *scb;         /* [N] weight row absmax, float32 */
    const void *bias;         /* [N] or NULL, dtype bias_dtype (FP_*) */
    int bias_dtype;
    float threshold;          /* run-time outlier threshold (<= 0: none) */
    const int64_t *fp_cols;   /* [nfp] calibrated columns kept in float, or NULL */
    int64_t nfp;
    const void *fpw;          /* [N, nfp] row-major, their float weight columns, dtype fpw_dtype */
    int fpw_dtype;
    int isa;                  /* ISA_AVX2 or ISA_VNNI */
} llm_int8_layer;

/* Work of the column-absmax and quantization passes, shared by their chunks. */
typedef struct {
    const llm_int8_layer *L;
    const float *x;
    int64_t ldx, M, nc;
    const int64_t *cols;
    float *cmax, *xc, *sx;
    int8_t *codes;
    int32_t *comp;            /* NULL unless the kernel set needs it */
    int failed;
} quant_job;

static void absmax_chunk(void *arg, int64_t c)
{
    const quant_job *q = arg;
    const int64_t K = q->L->K, c0 = c * 64, c1 = (c0 + 64) < K ? (c0 + 64) : K;
    column_absmax(q->x, q->ldx, q->M, c0, c1, q->cmax);
}

static void quant_chunk(void *arg, int64_t c)
{
    quant_job *q = arg;
    const int64_t K = q->L->K, nc = q->nc;
    const int64_t m0 = c * QUANT_ROWS_PER_CHUNK;
    const int64_t m1 = (m0 + QUANT_ROWS_PER_CHUNK) < q->M ? (m0 + QUANT_ROWS_PER_CHUNK) : q->M;
    float *tmp = NULL;
    if (nc && !(tmp = malloc((size_t)K * sizeof(float)))) {
        __atomic_store_n(&q->failed, 1, __ATOMIC_SEQ_CST);
        return;
    }
    for (int64_t m = m0; m < m1; m++) {
        const float *row = q->x + m * q->ldx;
        const float *src = row;
        if (nc) {
            memcpy(tmp, row, (size_t)K * sizeof(float));
            for (int64_t i = 0; i < nc; i++) {
                q->xc[m * nc + i] = row[q->cols[i]];
                tmp[q->cols[i]] = 0.0f;
            }
            src = tmp;
        }
        q->sx[m] = quantize_row(src, K, q->codes + m * K) / 127.0f;
    }
    if (q->comp) row_comp(q->codes + m0 * K, K, m1 - m0, K, q->comp + m0);
    free(tmp);
}

/*
 * out [M, N] (float32, contiguous) = LLM.int8() forward of x [M, K] (float32, row stride ldx) through
 * one layer: W [N, K] int8 (row stride ldw), scb [N] float32, bias [N] (dtype FP_*) or NULL, the
 * outlier threshold, calibrated columns fp_cols [nfp] with their float weight fpw [N, nfp] (dtype
 * FP_*) or none, on the micro-kernels of isa, on up to nthreads threads.  cols_out, when not NULL (capacity K + nfp), receives the
 * decomposed columns: found ones (ascending, those not in fp_cols) first, then fp_cols.
 *
 * Returns their number nc >= 0, or ERR_ARGS (bad arguments, an fp column outside [0, K)), ERR_K,
 * ERR_ISA, ERR_NOMEM.
 */
static int64_t mixed_linear(const llm_int8_layer *L, const float *x, int64_t ldx, int64_t M, float *out,
                            int64_t *cols_out, int nthreads)
{
    const int64_t N = L->N, K = L->K, nfp = L->nfp, ldw = L->ldw;
    const int8_t *W = L->W;
    const int64_t *fp_cols = L->fp_cols;
    if (M <= 0 || N <= 0 || K <= 0 || nfp < 0 || ldx < K || ldw < K) return ERR_ARGS;
    if (!x || !W || !L->scb || !out || (nfp && (!fp_cols || !L->fpw))) return ERR_ARGS;
    for (int d = 0; d < 2; d++) {
        const int dt = d ? L->fpw_dtype : L->bias_dtype;
        if (dt != FP_F32 && dt != FP_F16 && dt != FP_BF16) return ERR_ARGS;
    }
    if (K > LLM_INT8_MAX_K) return ERR_K;
    if (!isa_ok(L->isa)) return ERR_ISA;
    const kernel_set *ks = kernels_for(L->isa);
    int nt = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    while (nt > 1 && (double)M * (double)K / nt < MIN_QUANT_PER_THREAD) nt--;

    int64_t rc = ERR_NOMEM;
    quant_job q = {L, x, ldx, M, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0};
    int64_t *cols = malloc((size_t)(K + nfp) * sizeof(int64_t));
    uint8_t *is_fp = calloc((size_t)K, 1);
    float *sw = malloc((size_t)N * sizeof(float));
    q.codes = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    q.sx = malloc((size_t)M * sizeof(float));
    if (ks->needs_comp) q.comp = malloc((size_t)M * sizeof(int32_t));
    if (!cols || !is_fp || !sw || !q.codes || !q.sx || (ks->needs_comp && !q.comp)) goto done;

    /* 1. the decomposed columns */
    for (int64_t f = 0; f < nfp; f++) {
        if (fp_cols[f] < 0 || fp_cols[f] >= K) { rc = ERR_ARGS; goto done; }
        is_fp[fp_cols[f]] = 1;
    }
    int64_t nc = 0;
    if (L->threshold > 0.0f) {
        if (!(q.cmax = malloc((size_t)K * sizeof(float)))) goto done;
        parallel_for(absmax_chunk, &q, (K + 63) / 64, nt);
        for (int64_t c = 0; c < K; c++)
            if (q.cmax[c] >= L->threshold && !is_fp[c]) cols[nc++] = c;
    }
    const int64_t n_int8 = nc;
    for (int64_t f = 0; f < nfp; f++) cols[nc++] = fp_cols[f];
    if (cols_out) memcpy(cols_out, cols, (size_t)nc * sizeof(int64_t));

    /* 2. row quantization, and x at the decomposed columns */
    q.nc = nc;
    q.cols = cols;
    if (nc && !(q.xc = malloc((size_t)M * (size_t)nc * sizeof(float)))) goto done;
    parallel_for(quant_chunk, &q, (M + QUANT_ROWS_PER_CHUNK - 1) / QUANT_ROWS_PER_CHUNK, nt);
    if (q.failed) goto done;
    { /* vdivps rounds as the scalar division does: the same sw as torch's weight_absmax / 127 */
        int64_t n = 0;
        for (; n + 8 <= N; n += 8)
            _mm256_storeu_ps(sw + n, _mm256_div_ps(_mm256_loadu_ps(L->scb + n), _mm256_set1_ps(127.0f)));
        for (; n < N; n++) sw[n] = L->scb[n] / 127.0f;
    }

    /* 3. GEMM + epilogue */
    const epilogue e = {q.sx, sw, L->bias, L->bias_dtype, nc, n_int8, cols, q.xc, W, ldw, L->fpw, L->fpw_dtype};
    rc = gemm_run(ks, q.codes, K, W, ldw, (int32_t *)out, N, M, N, K, q.comp, nthreads, &e);
    if (rc == 0) rc = nc;

done:
    free(cols);
    free(is_fp);
    free(sw);
    free(q.codes);
    free(q.sx);
    free(q.comp);
    free(q.cmax);
    free(q.xc);
    return rc;
}

EXPORT int64_t llm_int8_mixed_linear_f32(const int8_t *W, int64_t ldw, int64_t N, int64_t K, const float *scb,
                                         const void *bias, int bias_dtype, float threshold, const int64_t *fp_cols,
                                         int64_t nfp, const void *fpw, int fpw_dtype, int isa, const float *x,
                                         int64_t ldx, int64_t M, float *out, int64_t *cols_out, int nthreads)
{
    const llm_int8_layer L = {W, ldw, N, K, scb, bias, bias_dtype, threshold, fp_cols, nfp, fpw, fpw_dtype, isa};
    return mixed_linear(&L, x, ldx, M, out, cols_out, nthreads);
}

#pragma GCC pop_options
