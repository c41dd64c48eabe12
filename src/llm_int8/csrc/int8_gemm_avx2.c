/*
 * int8_gemm_avx2.c -- exact int8 x int8 -> int32 GEMM and the fused LLM.int8() forward for x86-64
 * CPUs with AVX2, with an AVX-512 VNNI micro-kernel where the CPU has one.
 *
 *     C[M, N] (int32) = A[M, K] (int8) @ B[N, K]^T (int8)
 *
 * Both A and B are row-major with K contiguous ("NT" layout: every output element is a dot
 * product of a row of A with a row of B).  Rows may be strided (lda / ldb >= K, or any value
 * when there is a single row); C is row-major with row stride ldc.  A is the activation side
 * (x's codes), B the weight.
 *
 * Plain C (gnu11) with GCC intrinsics and one inline-assembly loop; no Python or torch headers,
 * no OpenMP (the threads are our own, see "Threads" below).  It is loaded with ctypes by
 * llm_int8/_native.py, which compiles it with gcc on first use.  The file is compiled for baseline
 * x86-64; the kernel sections are compiled for their instruction sets with target pragmas, so the
 * CPU probe llm_int8_cpu_features() can run safely anywhere, and every entry point takes the
 * instruction set to use (ISA_AVX2 or ISA_VNNI) and refuses one the CPU lacks.
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
 * ---------------------------------------------------------------------------------------------
 * The multiply tricks
 * ---------------------------------------------------------------------------------------------
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
 * Throughput: on Zen 3 vpmaddubsw and vpmaddwd share two pipes, so the AVX2 loop peaks at 32
 * MAC/cycle (the old 2 x 4 kernel reached about 21); fp32 FMA peaks at 16.  One vpdpbusd does 64
 * MACs (zmm) and replaces three instructions: on Zen 4, one thread measured about 50 GMAC/s with the
 * AVX2 kernel and 130-200 with the VNNI one.
 *
 * ---------------------------------------------------------------------------------------------
 * Blocking
 * ---------------------------------------------------------------------------------------------
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
 * ---------------------------------------------------------------------------------------------
 * Threads (see parallel_for)
 * ---------------------------------------------------------------------------------------------
 * A call is first sized: a second thread is only asked for when every thread gets at least about
 * 50 us of work (gemm_threads), so small calls, e.g. a small model's decoding layers, run on the
 * calling thread alone and never wait for another thread.  That sizing is what keeps a decode-sized
 * layer fast beside another busy process (before it, every call was an OpenMP fork-join whose
 * barrier waits for every team thread to be scheduled: measured 7-15 ms instead of 35 us).
 *
 * The work is cut into chunks (ranges of B rows, or of A rows when N is small) taken in order from
 * an atomic counter, by one of two runners:
 *
 *   * torch's OpenMP threads (the default where torch runs on libgomp): the library calls
 *     GOMP_parallel of the runtime torch loaded, so its chunks run on the threads torch's own ops
 *     run on.  Inside a model those threads are awake (libgomp spins a while after each parallel
 *     region): measured on Qwen2.5-1.5B decoding, 2 threads, the int8 layers took 71 ms per token
 *     this way against 110 ms with the library's own pool, whose sleeping helper had to wait for
 *     the core that torch's spinning thread held.  The team joins at the region's end, like
 *     torch's ops, and OMP_WAIT_POLICY / OMP_NUM_THREADS act on both alike.
 *   * the library's own pool (LLM_INT8_THREADS=own, or where torch has no libgomp): the CALLING
 *     thread takes chunks itself and never waits for a helper that has not started: helpers are
 *     woken when a call begins and take whatever chunks are left when they get a core.  The caller
 *     waits only for chunks a helper has claimed and not yet finished, first spinning for a few
 *     microseconds, then sleeping on a futex.  Idle helpers sleep on a futex; they never spin.
 */

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LLM_INT8_MAX_K 133144 /* floor((2^31 - 1) / (127 * 127)) */

/* The library is built with -fvisibility=hidden; only these entry points are exported. */
#define EXPORT __attribute__((visibility("default")))

/* Instruction sets of the kernels; llm_int8_cpu_features() returns the bits the CPU has. */
enum { ISA_AVX2 = 1, ISA_VNNI = 2 };
/* And the backward kernel's (bf16 x int8, vdpbf16ps). */
enum { FEATURE_AVX512_BF16 = 4 };
/* Return codes of the entry points. */
enum { ERR_ARGS = -1, ERR_K = -2, ERR_ISA = -3, ERR_NOMEM = -4 };

/* ---- CPU feature probe: compiled for baseline x86-64, safe to call on any x86-64 CPU. ---- */

EXPORT int llm_int8_cpu_features(void)
{
    int f = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init(); /* F16C (half <-> float) and FMA came with or before AVX2 on every x86 CPU line */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma")) {
        f |= ISA_AVX2;
        /* libgcc also checks that the OS saves the AVX-512 state (XCR0) */
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            f |= ISA_VNNI;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
            f |= FEATURE_AVX512_BF16;
    }
#endif
    return f;
}

static int isa_ok(int isa)
{
    return (isa == ISA_AVX2 || isa == ISA_VNNI) && (llm_int8_cpu_features() & isa) == isa;
}

/* =============================================================================================
 * Threads: parallel_for(fn, arg, nchunks, nthreads) runs fn(arg, c) for c in [0, nchunks).
 *
 * One pool per process, started lazily (nthreads - 1 helpers at most, never more than asked for
 * by any call).  A call that finds the pool held by another thread of the process (several Python
 * threads calling at once) runs on its own thread.  The job is published through `next`, which
 * holds the job's id (high 32 bits) and the next chunk to take (low 32 bits): a helper claims chunk
 * k with a compare-and-swap on the whole word, so a late helper can never take a chunk of a job
 * other than the one whose function and argument it read.  pthread_atfork resets the pool in a
 * forked child, which has none of the parent's helper threads.
 * ============================================================================================= */

typedef void (*task_fn)(void *arg, int64_t chunk);

#define MAX_THREADS 256
/* How long a caller whose chunks are all claimed spins before sleeping (pause iterations, about
 * 40 ns each): a helper that claimed the last chunk usually finishes within a few microseconds. */
#define CALLER_SPINS 200

static struct {
    task_fn fn;              /* the current job (written while `busy` is held, before `next`) */
    void *arg;
    uint32_t nchunks;
    uint64_t next;           /* job id << 32 | next chunk */
    uint32_t done;           /* chunks finished; the caller sleeps on it */
    uint32_t caller_sleeps;
    int32_t slots;           /* helpers that may still join the current job */
    uint32_t epoch;          /* bumped for every job; idle helpers sleep on it */
    uint32_t sleepers;
    int busy;                /* a caller holds the pool */
    int nhelpers;
    pthread_mutex_t start_lock;
} pool = {.start_lock = PTHREAD_MUTEX_INITIALIZER};

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)

/* The other runner: the OpenMP runtime the host process already uses (torch's libgomp), set by
 * llm_int8_set_omp_runner with that library's GOMP_parallel.  Its team threads are the ones torch's
 * own ops run on, so a call right after a torch op finds them awake instead of holding the cores. */
typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
static gomp_parallel_fn omp_runner = NULL;

static void pool_after_fork_child(void);
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_after_fork_child); }

EXPORT void llm_int8_set_omp_runner(void *gomp_parallel)
{
    pthread_once(&atfork_once, register_atfork);
    STORE(&omp_runner, (gomp_parallel_fn)gomp_parallel);
}

/* A team thread that reaches the region late keeps the caller at the region's closing barrier: on
 * a machine whose cores another process holds, for a scheduler time slice (milliseconds), where the
 * pool's caller would just have done the work alone.  So when the caller waits there longer than
 * OMP_LATE_NS, and longer than half its own work, the next OMP_BACKOFF_NS of calls go to the pool,
 * then the team is tried again. */
#define OMP_LATE_NS 200000
#define OMP_BACKOFF_NS 200000000
static int64_t omp_backoff_until = 0; /* CLOCK_MONOTONIC ns */

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

typedef struct {
    task_fn fn;
    void *arg;
    int64_t nchunks;
    int64_t next;
    pthread_t caller;
    int64_t caller_done; /* when the calling thread found no chunk left (ns) */
} omp_job;

static void omp_body(void *p)
{
    omp_job *j = p;
    for (int64_t k; (k = __atomic_fetch_add(&j->next, 1, __ATOMIC_SEQ_CST)) < j->nchunks;) j->fn(j->arg, k);
    if (pthread_equal(pthread_self(), j->caller)) j->caller_done = now_ns();
}

static void futex_wait(uint32_t *addr, uint32_t expected)
{
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(uint32_t *addr, int count)
{
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
}

static inline void cpu_relax(void) { __builtin_ia32_pause(); }

/* Take chunks of the current job while there are any (helpers). */
static void pool_help(void)
{
    uint64_t v = LOAD(&pool.next);
    const uint64_t id = v >> 32;
    if ((uint32_t)v >= LOAD(&pool.nchunks) || __atomic_fetch_sub(&pool.slots, 1, __ATOMIC_SEQ_CST) <= 0)
        return;
    for (;;) {
        v = LOAD(&pool.next);
        if (v >> 32 != id) return; /* only the job whose slot it took */
        const task_fn fn = __atomic_load_n(&pool.fn, __ATOMIC_SEQ_CST);
        void *const arg = __atomic_load_n(&pool.arg, __ATOMIC_SEQ_CST);
        const uint32_t n = LOAD(&pool.nchunks);
        const uint32_t k = (uint32_t)v;
        if (k >= n) return;
        /* succeeds only while chunk k of this very job is still untaken: then the job cannot have
         * finished, so fn, arg and n read above are this job's */
        if (!__atomic_compare_exchange_n(&pool.next, &v, v + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            continue;
        fn(arg, k);
        if (__atomic_add_fetch(&pool.done, 1, __ATOMIC_SEQ_CST) == n && LOAD(&pool.caller_sleeps))
            futex_wake(&pool.done, 1);
    }
}

static void *helper_main(void *unused)
{
    (void)unused;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals go to the application's own threads */
    uint32_t seen = LOAD(&pool.epoch);
    for (;;) {
        pool_help();
        /* sleep until the next job; the caller wakes sleepers after bumping the epoch */
        __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
        while (LOAD(&pool.epoch) == seen) futex_wait(&pool.epoch, seen);
        __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
        seen = LOAD(&pool.epoch);
    }
    return NULL;
}

static void pool_after_fork_child(void)
{
    /* the child has only the thread that forked: no helpers, nobody holding the pool */
    pool.nhelpers = 0;
    pool.busy = 0;
    pool.sleepers = 0;
    pool.caller_sleeps = 0;
    pthread_mutex_init(&pool.start_lock, NULL);
    /* nor any of the parent's OpenMP team threads: libgomp in a forked child can wait for them */
    omp_runner = NULL;
}

/* Make sure `want` helpers exist; returns how many do. */
static int pool_start(int want)
{
    if (LOAD(&pool.nhelpers) >= want) return want;
    pthread_mutex_lock(&pool.start_lock);
    pthread_once(&atfork_once, register_atfork);
    while (pool.nhelpers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 1 << 20); /* the kernels keep little on the stack */
        const int rc = pthread_create(&t, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        STORE(&pool.nhelpers, pool.nhelpers + 1);
    }
    const int have = pool.nhelpers;
    pthread_mutex_unlock(&pool.start_lock);
    return have < want ? have : want;
}

static void parallel_for(task_fn fn, void *arg, int64_t nchunks, int nthreads)
{
    const gomp_parallel_fn omp = LOAD(&omp_runner);
    if (omp && nthreads > 1 && nchunks > 1) {
        const int64_t start = now_ns();
        if (start >= LOAD(&omp_backoff_until)) {
            omp_job job = {fn, arg, nchunks, 0, pthread_self(), start};
            omp(omp_body, &job, (unsigned)(nchunks < nthreads ? nchunks : nthreads), 0);
            const int64_t end = now_ns(), waited = end - job.caller_done;
            if (waited > OMP_LATE_NS && 2 * waited > job.caller_done - start)
                STORE(&omp_backoff_until, end + OMP_BACKOFF_NS);
            return;
        }
    }
    int expected = 0;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    int helpers = nthreads - 1;
    if (nchunks < helpers + 1) helpers = (int)nchunks - 1;
    if (helpers > 0 && !__atomic_compare_exchange_n(&pool.busy, &expected, 1, 0, __ATOMIC_SEQ_CST,
                                                    __ATOMIC_SEQ_CST))
        helpers = 0; /* another thread of this process holds the pool */
    else if (helpers > 0 && (helpers = pool_start(helpers)) == 0)
        STORE(&pool.busy, 0);
    if (helpers <= 0) {
        for (int64_t c = 0; c < nchunks; c++) fn(arg, c);
        return;
    }

    const uint32_t n = (uint32_t)nchunks;
    __atomic_store_n(&pool.fn, fn, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.arg, arg, __ATOMIC_SEQ_CST);
    STORE(&pool.nchunks, n);
    STORE(&pool.done, 0);
    STORE(&pool.caller_sleeps, 0);
    STORE(&pool.slots, helpers);
    STORE(&pool.next, ((LOAD(&pool.next) >> 32) + 1) << 32); /* a new job id, chunk 0 */
    __atomic_add_fetch(&pool.epoch, 1, __ATOMIC_SEQ_CST);
    if (LOAD(&pool.sleepers)) futex_wake(&pool.epoch, helpers);

    for (;;) {
        const uint32_t k = (uint32_t)__atomic_fetch_add(&pool.next, 1, __ATOMIC_SEQ_CST);
        if (k >= n) break;
        fn(arg, k);
        __atomic_add_fetch(&pool.done, 1, __ATOMIC_SEQ_CST);
    }
    /* all chunks are claimed; wait for the ones helpers are still working on */
    for (int i = 0; i < CALLER_SPINS && LOAD(&pool.done) != n; i++) cpu_relax();
    if (LOAD(&pool.done) != n) {
        STORE(&pool.caller_sleeps, 1);
        uint32_t d;
        while ((d = LOAD(&pool.done)) != n) futex_wait(&pool.done, d);
    }
    STORE(&pool.busy, 0);
}

/* =============================================================================================
 * Kernels.  Everything below runs only after llm_int8_cpu_features() said yes to its ISA.
 * ============================================================================================= */
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

/* Tuning parameters (measured on a 2-core Zen 3, see the header).  K blocks are only used when
 * M * K exceeds the L2 budget for A. */
#define L2_A_BUDGET (256 * 1024)
#define KC_DEFAULT 8192
#define PF_STEPS 8 /* 32-byte steps of the AVX2 2 x 4 loop per prefetch chunk (4 lines per row) */
#define MC_MAX 128

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

/* =============================================================================================
 * The blocked GEMM driver, the fused epilogue and the entry points (AVX2 + F16C code; the
 * micro-kernels are called through the kernel set).
 * ============================================================================================= */
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")

static const kernel_set *kernels_for(int isa) { return isa == ISA_VNNI ? &KERNELS_VNNI : &KERNELS_AVX2; }

enum { FP_F32 = 0, FP_F16 = 1, FP_BF16 = 2 }; /* dtypes of float operands read in place */

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
static int gemm_run(const kernel_set *ks, const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb,
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

/* comp[i] = 128 * sum_k A[i, k] (mod 2^32), for the VNNI kernels. */
static void row_comp(const int8_t *A, int64_t lda, int64_t M, int64_t K, int32_t *comp)
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
