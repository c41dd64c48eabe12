/*
 * llm_int8_cpu.h -- what the files of the native CPU library share (internal; no Python or torch
 * headers).  The library: exact int8 x int8 -> int32 GEMM and the fused LLM.int8() forward for x86-64
 * CPUs with AVX2, with an AVX-512 VNNI micro-kernel where the CPU has one, and the bf16 backward where
 * the CPU has AVX-512 BF16.  It is loaded with ctypes by llm_int8/_native_lib.py, which compiles every
 * .c file of csrc into one shared library with gcc on first use.  The files:
 *
 *   cpu_features.c   the CPU probe (baseline x86-64, safe anywhere) and the ISA check
 *   threads.c        parallel_for: torch's OpenMP threads or the library's own pool
 *   gemm_kernels.c   the micro-kernels (AVX2, AVX-512 VNNI) and the multiply tricks they use
 *   gemm.c           the blocked GEMM driver, the fused dequantization epilogue, the GEMM entry point
 *   mixed_linear.c   the whole LLM.int8() forward for float32 x in one call
 *   grad_bf16.c      the backward through the frozen weight (AVX-512 BF16)
 *
 * Plain C (gnu11) with GCC intrinsics and one inline-assembly loop.  Everything is compiled for
 * baseline x86-64; the kernel code is compiled for its instruction set with target pragmas, so the
 * CPU probe llm_int8_cpu_features() can run safely anywhere, and every entry point takes the
 * instruction set to use (ISA_AVX2 or ISA_VNNI) and refuses one the CPU lacks.
 *
 *     C[M, N] (int32) = A[M, K] (int8) @ B[N, K]^T (int8)
 *
 * Both A and B are row-major with K contiguous ("NT" layout: every output element is a dot
 * product of a row of A with a row of B).  Rows may be strided (lda / ldb >= K, or any value
 * when there is a single row); C is row-major with row stride ldc.  A is the activation side
 * (x's codes), B the weight.
 *
 * ---------------------------------------------------------------------------------------------
 * INPUT CONTRACT
 * ---------------------------------------------------------------------------------------------
 * AVX2 kernel: A's codes in [-127, 127]; B's codes anywhere in [-128, 127].
 * VNNI kernel: A's and B's codes anywhere in [-128, 127].
 * Within that, C is exact (equal to the int64 result) whenever the true result fits int32: every
 * int32 addition below wraps (two's complement, never undefined), so the int32 output is the
 * true result modulo 2^32.  K <= LLM_INT8_MAX_K = floor((2^31 - 1) / 127^2) guarantees the fit
 * for codes in [-127, 127]; with -128 present, K <= 131071 = floor((2^31 - 1) / 128^2) does
 * (the Python side enforces both).  A -128 in A on the AVX2 kernel gives a wrong number (never an
 * out-of-bounds access); it is not checked here because the fused forward quantizes x itself into
 * [-127, 127], and the Python op routes an A holding -128 elsewhere.
 *
 * The outlier rule of the fused forward (a column of x is decomposed when max |x| >= threshold) is
 * the one llm_int8.functional documents for every Python path; mixed_linear.c implements it here.
 */
#ifndef LLM_INT8_CPU_H
#define LLM_INT8_CPU_H

#include <errno.h>
#include <immintrin.h> /* intrinsics carry their own target attributes; the files set the targets */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LLM_INT8_MAX_K 133144 /* floor((2^31 - 1) / (127 * 127)) */

/* The library is built with -fvisibility=hidden; only these entry points are exported. */
#define EXPORT __attribute__((visibility("default")))
#define AI static inline __attribute__((always_inline))

/* Instruction sets of the kernels; llm_int8_cpu_features() returns the bits the CPU has. */
enum { ISA_AVX2 = 1, ISA_VNNI = 2 };
/* And the backward kernel's (bf16 x int8, vdpbf16ps). */
enum { FEATURE_AVX512_BF16 = 4 };
/* Return codes of the entry points. */
enum { ERR_ARGS = -1, ERR_K = -2, ERR_ISA = -3, ERR_NOMEM = -4 };
/* dtypes of float operands read in place */
enum { FP_F32 = 0, FP_F16 = 1, FP_BF16 = 2 };

/* ---- cpu_features.c ---- */
int llm_int8_cpu_features(void);
int isa_ok(int isa); /* the CPU runs this ISA_* */

/* ---- threads.c ---- */
#define MAX_THREADS 256
typedef void (*task_fn)(void *arg, int64_t chunk);
/* fn(arg, c) for c in [0, nchunks), on up to nthreads threads (the caller's included). */
void parallel_for(task_fn fn, void *arg, int64_t nchunks, int nthreads);

/* ---- gemm_kernels.c ---- */
/* The micro-kernel interface: C[i, j] (+)= dot(A[i, 0:kb], B[j, 0:kb]) for i < mr, j < nr.
 * accumulate: add to C (a later K block) instead of storing.  pf, pf_len: bytes pf[j * ldb + 0 ..
 * pf_len) of each of the NR rows of B at pf are prefetched into L1 while this block runs (pf NULL:
 * none); the driver points them at this row group's share of the next panel.  comp (VNNI only):
 * per row of A, the term subtracted once (on the first K block) to undo the +128 on B. */
typedef void (*ukernel_fn)(const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb, int64_t kb,
                           int32_t *C, int64_t ldc, int accumulate, const int8_t *pf, int64_t pf_len,
                           const int32_t *comp);

#define MR_MAX 4
#define NR 4 /* rows of B per micro-kernel, for every ISA (the epilogue works on NR outputs) */

typedef struct {
    int mr;                       /* rows of A per full micro-kernel */
    int needs_comp;               /* the kernels need comp = 128 * rowsum(A) */
    double macs_per_us;           /* one thread's compute-bound rate (Zen 4), to size the threads */
    ukernel_fn uk[MR_MAX][NR];    /* uk[m - 1][n - 1]: an m x n block */
} kernel_set;

const kernel_set *kernels_for(int isa);
/* comp[i] = 128 * sum_k A[i, k] (mod 2^32), for the VNNI kernels. */
void row_comp(const int8_t *A, int64_t lda, int64_t M, int64_t K, int32_t *comp);

/* ---- gemm.c ---- */
/* Fused dequantization epilogue of the LLM.int8() forward (see llm_int8_mixed_linear_f32).  The
 * GEMM writes int32 sums into the float32 output buffer; on the last K block each finished tile is
 * turned in place into
 *
 *     out[i, j] = ((float)acc[i, j] * sx[i]) * sw[j]  +  sum_c xc[i, c] * wc[j, c]  +  bias[j]
 *
 * (the same float32 operations, in the same order, as the eager torch path), where the decomposed
 * columns c < n_int8 multiply the dequantized int8 weight column, wc[j, c] = (float)W[j, col_c] * sw[j],
 * and the others the stored float columns fpw[j, c - n_int8], read in place in their dtype.  wc is
 * gathered once per group of NR outputs (row j of the group at wc + j * ncp, ncp = ncols rounded up
 * to 8 with zeros) and reused for all the rows of the block; the sum over c runs eight columns at a
 * time with FMA, one accumulator per output, so many columns (Qwen2.5's inputs exceed the threshold
 * in ~180 dims) cost about what a float32 GEMM of those columns costs.  Any number of columns is
 * handled here. */
typedef struct {
    const float *sx;       /* [M] x_absmax / 127 */
    const float *sw;       /* [N] w_absmax / 127 */
    const void *bias;      /* [N] or NULL, dtype bias_dtype */
    int bias_dtype;
    int64_t ncols;         /* decomposed columns (0: none) */
    int64_t n_int8;        /* the first n_int8 of them use the int8 weight */
    const int64_t *cols;   /* [ncols] their indices in K */
    const float *xc;       /* [M, ncols] x at those columns */
    const int8_t *W;       /* [N, ldw] the int8 weight */
    int64_t ldw;
    const void *fpw;       /* [N, ncols - n_int8] the stored float weight columns */
    int fpw_dtype;
} epilogue;

/* C = A @ B^T (with the epilogue, if any) on up to nthreads threads.  Returns 0 or ERR_NOMEM. */
int gemm_run(const kernel_set *ks, const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb,
             int32_t *C, int64_t ldc, int64_t M, int64_t N, int64_t K, const int32_t *comp,
             int nthreads, const epilogue *e);

#endif
