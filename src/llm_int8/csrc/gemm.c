/*
 * gemm.c -- the blocked GEMM driver (cache blocking, threads), the fused dequantization epilogue of
 * the LLM.int8() forward, and the exact GEMM entry point llm_int8_gemm_nt_s8s8s32.
 *
 * Blocking.
 * Micro-kernel: an MR x NR block of dot products (MR rows of A, NR rows of B) kept in MR * NR
 * vector accumulators while walking K; each loaded A vector is reused NR times and each B vector MR
 * times.  AVX2: 4 x 4, run as two 4 x 2 passes of an inline-assembly loop that uses all 16 ymm
 * registers without spills.  VNNI: 4 x 4 in zmm registers (32 of them).  Smaller
 * instances of the same templates cover M = 1 and the M / N edges.  A K remainder is read through a
 * zero-padded buffer (AVX2) or a masked load (AVX-512), never past the end of a row.  The lanes of
 * each accumulator are summed horizontally once per K block.
 *
 * Cache blocking (no packing, rows are read in place): M is cut into blocks of MC rows so that an
 * MC x KC block of A (<= 256 KiB) stays in L2 while all of B's rows stream past it; within that, NR
 * rows of B are reused from L1/L2 against every MR-row group of the A block.  K is only cut
 * (KC = 8192) when a single block would not fit; every K block costs a horizontal reduction and a
 * read-modify-write of C.  When all of A fits (small M, e.g. decoding), B is streamed from memory
 * exactly once, which is what matters in the memory-bound M = 1 case.  While the row groups of an A
 * block work on a panel of NR rows of B, each software-prefetches its share of the next panel.
 *
 */
#include "llm_int8_cpu.h"

/* Cache blocking (measured on a 2-core Zen 3).  K blocks are only used when M * K exceeds the L2
 * budget for A. */
#define L2_A_BUDGET (256 * 1024)
#define KC_DEFAULT 8192
#define MC_MAX 128

/* =============================================================================================
 * The blocked GEMM driver, the fused epilogue and the entry points (AVX2 + F16C code; the
 * micro-kernels are called through the kernel set).
 * ============================================================================================= */
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")



AI float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

AI float bf16_to_float(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Element i of a float vector of dtype FP_*, as float32 (exact). */
AI float load_float(const void *p, int dtype, int64_t i)
{
    if (dtype == FP_F16) return half_to_float(((const uint16_t *)p)[i]);
    if (dtype == FP_BF16) return bf16_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* Elements i .. i + 3 of a float vector of dtype FP_*, as float32 (exact). */
AI __m128 load_float4(const void *p, int dtype, int64_t i)
{
    if (dtype == FP_F16) return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)p + i)));
    if (dtype == FP_BF16)
        return _mm_castsi128_ps(_mm_slli_epi32(
            _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm_loadu_ps((const float *)p + i);
}


typedef struct {
    const kernel_set *ks;
    const int8_t *A;
    const int8_t *B;
    int32_t *C;
    int64_t lda, ldb, ldc;
    int64_t M, N, K;
    const int32_t *comp;   /* [M] 128 * rowsum(A) for kernel sets that need it */
    const epilogue *epi;   /* NULL: plain int32 output */
    int64_t row0, col0;    /* global index of this sub-problem's first row / column */
} gemm_args;

/* Row length of the gathered columns: ncols rounded up to a whole vector of 8. */
AI int64_t wc_stride(int64_t ncols) { return (ncols + 7) & ~(int64_t)7; }

/* wc[j * ncp + c] for the nb outputs gj .. gj + nb - 1 (see the epilogue above), zero for c >= ncols.
 * Called once the rows are in cache (see gemm_serial); a plain loop measured as fast as a vector
 * gather there. */
static void gather_wc(const epilogue *e, int64_t gj, int nb, float *wc)
{
    const int64_t nc = e->ncols, ni = e->n_int8, nfp = nc - ni, ncp = wc_stride(nc);
    for (int j = 0; j < nb; j++) {
        const int64_t n = gj + j;
        const int8_t *wrow = e->W + n * e->ldw;
        const float s = e->sw[n];
        float *w = wc + j * ncp;
        for (int64_t c = 0; c < ni; c++) w[c] = (float)wrow[e->cols[c]] * s;
        for (int64_t c = 0; c < nfp; c++) w[ni + c] = load_float(e->fpw, e->fpw_dtype, n * nfp + c);
        for (int64_t c = nc; c < ncp; c++) w[c] = 0.0f;
    }
}

/* The four sums over c of xc[c] * wc[j * ncp + c], j = 0 .. 3 (wc zero-padded to ncp). */
AI __m128 dot4(const float *xc, const float *wc, int64_t nc, int64_t ncp)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 8 <= nc; c += 8) {
        const __m256 x = _mm256_loadu_ps(xc + c);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + c), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + ncp + c), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + 2 * ncp + c), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + 3 * ncp + c), a3);
    }
    if (c < nc) { /* the last columns of this row of xc (never read past it), wc's padding is zero */
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 x = _mm256_maskload_ps(xc + c, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(nc - c)), lane));
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + c), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + ncp + c), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + 2 * ncp + c), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(wc + 3 * ncp + c), a3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Apply the epilogue to the finished m x nb tile at C (global row gi, column gj) with the gathered
 * wc; C holds int32 sums and becomes float32 in place. */
static void apply_epilogue(const epilogue *e, const float *wc, int32_t *C, int64_t ldc, int64_t gi, int m,
                           int64_t gj, int nb)
{
    const int64_t nc = e->ncols, ncp = wc_stride(nc);
    for (int i = 0; i < m; i++) {
        const float sx = e->sx[gi + i];
        const float *xc = e->xc + (gi + i) * nc;
        int32_t *ci = C + i * ldc;
        float *oi = (float *)ci;
        if (nb == NR) { /* the same operations as below, four outputs at a time (no FMA contraction) */
            __m128 v = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)ci)),
                                             _mm_set1_ps(sx)),
                                  _mm_loadu_ps(e->sw + gj));
            if (nc) v = _mm_add_ps(v, dot4(xc, wc, nc, ncp));
            if (e->bias) v = _mm_add_ps(v, load_float4(e->bias, e->bias_dtype, gj));
            _mm_storeu_ps(oi, v);
            continue;
        }
        for (int j = 0; j < nb; j++) {
            int32_t a;
            memcpy(&a, ci + j, sizeof a);
            float v = ((float)a * sx) * e->sw[gj + j];
            if (nc) {
                float dot = 0.0f;
                for (int64_t c = 0; c < nc; c++) dot += xc[c] * wc[j * ncp + c];
                v += dot;
            }
            if (e->bias) v += load_float(e->bias, e->bias_dtype, gj + j);
            memcpy(oi + j, &v, sizeof v);
        }
    }
}

/* Single-threaded blocked GEMM on one sub-problem.  Returns 0, or ERR_NOMEM. */
static int gemm_serial(const gemm_args *g)
{
    const int64_t M = g->M, N = g->N, K = g->K;
    const int mr = g->ks->mr;
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        for (int64_t i = 0; i < M; i++) memset(g->C + i * g->ldc, 0, (size_t)N * sizeof(int32_t));
        return 0;
    }
    const int64_t ncols = g->epi ? g->epi->ncols : 0;
    float wc_stack[64 * NR];
    float *wc = wc_stack;
    if (wc_stride(ncols) > 64 && !(wc = malloc((size_t)wc_stride(ncols) * NR * sizeof(float)))) return ERR_NOMEM;

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
            /* every row group prefetches its share of the next B panel, so that the panel arrives
             * spread over the whole block instead of in the first group's time */
            const int64_t groups = (mb + mr - 1) / mr;
            const int64_t share = ((kb + groups - 1) / groups + 63) & ~(int64_t)63;
            for (int64_t j = 0; j < N; j += NR) {
                const int nb = (N - j) < NR ? (int)(N - j) : NR;
                const int8_t *Bj = g->B + j * g->ldb + k0;
                const int last = g->epi && k0 + kb == K;
                for (int64_t i = i0; i < i0 + mb; i += mr) {
                    const int m = (i0 + mb - i) < mr ? (int)(i0 + mb - i) : mr;
                    const int64_t pf_off = (i - i0) / mr * share;
                    const int8_t *pf = (j + 2 * NR <= N && pf_off < kb) ? Bj + NR * g->ldb + pf_off : NULL;
                    g->ks->uk[m - 1][nb - 1](g->A + i * g->lda + k0, g->lda, Bj, g->ldb, kb,
                                             g->C + i * g->ldc + j, g->ldc, accumulate, pf,
                                             kb - pf_off < share ? kb - pf_off : share,
                                             g->comp ? g->comp + i : NULL);
                    if (last) {
                        /* gathered after the first micro-kernel call, which has just brought these
                         * rows of B into cache (a gather before it would fetch them from memory) */
                        if (ncols && i == i0) gather_wc(g->epi, g->col0 + j, nb, wc);
                        apply_epilogue(g->epi, wc, g->C + i * g->ldc + j, g->ldc, g->row0 + i, m,
                                       g->col0 + j, nb);
                    }
                }
            }
        }
    }
    if (wc != wc_stack) free(wc);
    return 0;
}

/* The N (or M) range cut into chunks for parallel_for. */
typedef struct {
    gemm_args base;
    int split_n;     /* 1: chunks are ranges of B rows (N); 0: ranges of A rows (M) */
    int64_t total;   /* N or M */
    int64_t chunk;   /* rows per chunk, a multiple of the block size */
    int failed;      /* a chunk ran out of memory */
} gemm_job;

static void gemm_chunk(void *arg, int64_t c)
{
    gemm_job *job = arg;
    const int64_t lo = c * job->chunk;
    const int64_t hi = (lo + job->chunk) < job->total ? (lo + job->chunk) : job->total;
    gemm_args g = job->base;
    if (job->split_n) {
        g.B += lo * g.ldb;
        g.C += lo;
        g.N = hi - lo;
        g.col0 += lo;
    } else {
        g.A += lo * g.lda;
        g.C += lo * g.ldc;
        g.M = hi - lo;
        g.row0 += lo;
        if (g.comp) g.comp += lo;
    }
    if (gemm_serial(&g)) __atomic_store_n(&job->failed, 1, __ATOMIC_SEQ_CST);
}

#define CHUNKS_PER_THREAD 8
/* A helper pays off when each thread gets at least this much work: a sleeping helper takes tens of
 * microseconds to get a core (and may not get one at all on a busy machine, where the caller then
 * does the work alone), and the wake-up costs the caller a system call. */
#define MIN_US_PER_THREAD 50.0
/* A few rows of A (decoding) are bound by streaming B from memory, not by arithmetic: one thread
 * reads it at about this rate from DRAM (a model's layers do not stay in cache between tokens). */
#define B_BYTES_PER_US 20e3
#define FEW_ROWS 4

/* Threads for an M x N x K product with kernel set ks, at most nthreads. */
static int gemm_threads(const kernel_set *ks, int64_t M, int64_t N, int64_t K, int nthreads)
{
    int64_t nt = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    const double us = M <= FEW_ROWS ? (double)N * (double)K / B_BYTES_PER_US
                                    : (double)M * (double)N * (double)K / ks->macs_per_us;
    while (nt > 1 && us / (double)nt < MIN_US_PER_THREAD) nt--;
    return (int)nt;
}

/* C = A @ B^T (with the epilogue, if any) on up to nthreads threads.  Returns 0 or ERR_NOMEM. */
int gemm_run(const kernel_set *ks, const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb,
                    int32_t *C, int64_t ldc, int64_t M, int64_t N, int64_t K, const int32_t *comp,
                    int nthreads, const epilogue *epi)
{
    gemm_job job = {{ks, A, B, C, lda, ldb, ldc, M, N, K, comp, epi, 0, 0}, 1, N, N, 0};
    int nt = gemm_threads(ks, M, N, K, nthreads);
    if (nt > 1) {
        if (N >= (int64_t)nt * NR * 4) {
            job.split_n = 1;
        } else if (M >= (int64_t)nt * ks->mr * 4) {
            job.split_n = 0;
        } else {
            nt = 1;
        }
    }
    if (nt == 1) return gemm_serial(&job.base);

    /* about CHUNKS_PER_THREAD chunks per thread, each a whole number of blocks */
    job.total = job.split_n ? N : M;
    const int64_t unit = job.split_n ? NR : ks->mr;
    const int64_t units = (job.total + unit - 1) / unit;
    int64_t per = units / ((int64_t)nt * CHUNKS_PER_THREAD);
    if (per < 1) per = 1;
    job.chunk = per * unit;
    parallel_for(gemm_chunk, &job, (job.total + job.chunk - 1) / job.chunk, nt);
    return job.failed ? ERR_NOMEM : 0;
}


/*
 * C = A @ B^T, exact within the input contract (see the header), with the given ISA on up to
 * nthreads threads.  Returns 0 on success, ERR_ARGS on bad arguments, ERR_K if K > LLM_INT8_MAX_K,
 * ERR_ISA if the CPU lacks the ISA, ERR_NOMEM.
 */
EXPORT int llm_int8_gemm_nt_s8s8s32(
    const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb, int32_t *C, int64_t ldc,
    int64_t M, int64_t N, int64_t K, int nthreads, int isa)
{
    if (M < 0 || N < 0 || K < 0) return ERR_ARGS;
    if (M == 0 || N == 0) return 0;
    if (K > LLM_INT8_MAX_K) return ERR_K;
    if (!C || ldc < N || (K > 0 && (!A || !B))) return ERR_ARGS;
    if (!isa_ok(isa)) return ERR_ISA;
    const kernel_set *ks = kernels_for(isa);
    int32_t *comp = NULL;
    if (ks->needs_comp) {
        if (!(comp = malloc((size_t)M * sizeof(int32_t)))) return ERR_NOMEM;
        row_comp(A, lda, M, K, comp);
    }
    const int rc = gemm_run(ks, A, lda, B, ldb, C, ldc, M, N, K, comp, nthreads, NULL);
    free(comp);
    return rc;
}


#pragma GCC pop_options
