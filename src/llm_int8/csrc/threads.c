/*
 * threads.c -- parallel_for(fn, arg, nchunks, nthreads): who runs the kernels' parallel parts.
 *
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
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "llm_int8_cpu.h"

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

void parallel_for(task_fn fn, void *arg, int64_t nchunks, int nthreads)
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
