/* pp_map_batch and pp_map_batch_async: a batch task runs runs of items in one
 * call; a failure fails its run, a death or a timeout only its own item. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <procpool.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

/* What the tasks record, in the arena (seen by spawned workers too). */
struct shared {
    _Atomic long calls, items;
    _Atomic int runs_across_chunks; /* calls whose run crossed a chunk's end */
    _Atomic long bad_start;         /* the first item of the failing call */
    _Atomic int bad_count;
    size_t chunksize;
    long crash_at, hang_at, fail_at, overrun_at, hold_at;
    _Atomic int held;        /* calls holding at hold_at */
    _Atomic int limit_loose; /* RLIMIT_DATA could not be set, or stopped nothing */
};
#define sh (*(struct shared **)test_global("sh"))

static void setup(void)
{
    sh = test_share("sh", pp_shm_alloc(sizeof *sh));
    sh->crash_at = sh->hang_at = sh->fail_at = sh->overrun_at = sh->hold_at = -1;
}

static void teardown(void)
{
    pp_shm_free(sh);
}

/* Arguments are the items' own indexes: a call sees where its run lies. */
static int square_run(const void *args, void *results, size_t count)
{
    const long *in = args;
    long *out = results;
    atomic_fetch_add(&sh->calls, 1);
    atomic_fetch_add(&sh->items, (long)count);
    if ((size_t)in[0] / sh->chunksize != (size_t)in[count - 1] / sh->chunksize)
        atomic_fetch_add(&sh->runs_across_chunks, 1);
    for (size_t k = 0; k < count; k++) {
        if (in[k] == sh->crash_at)
            raise(SIGKILL);
        if (in[k] == sh->hang_at)
            pause();
        if (in[k] == sh->hold_at) { /* until killed */
            atomic_fetch_add(&sh->held, 1);
            for (;;)
                pause();
        }
        if (in[k] == sh->fail_at) {
            atomic_store(&sh->bad_start, in[0]);
            atomic_store(&sh->bad_count, (int)count);
            return pp_fail(5, "bad item %ld", in[k]);
        }
        if (in[k] == sh->overrun_at)
            memset(out + count, 0x7f, 16); /* past the run: past the chunk's results */
        out[k] = in[k] * in[k];
    }
    return 0;
}

static long *indexes(size_t n)
{
    long *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = (long)i;
    return v;
}

/* Items whose result is not i * i, those in `skip` aside. */
static size_t wrong(const long *out, size_t n, long skip_from, long skip_to)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (((long)i < skip_from || (long)i >= skip_to) && out[i] != (long)(i * i))
            bad++;
    return bad;
}

static pp_pool *pool_of(int workers, double task_timeout)
{
    pp_options o = {.workers = workers, .task_timeout = task_timeout};
    pp_pool *pool = pp_pool_new(&o);
    cr_assert_not_null(pool);
    return pool;
}

TestSuite(batch, .init = setup, .fini = teardown, .timeout = PP_TEST_TIMEOUT(60));

Test(batch, every_item_runs_once_in_runs_inside_its_chunk)
{
    size_t n = 100003;
    sh->chunksize = 1000;
    long *in = indexes(n), *out = calloc(n, sizeof *out);
    pp_pool *pool = pool_of(2, 0);
    pp_error err;
    cr_assert_eq(pp_map_batch(pool, square_run, in, n, sizeof *in, out, sizeof *out, 1000, &err),
                 0);
    cr_expect_eq(wrong(out, n, 0, 0), 0);
    cr_expect_eq(atomic_load(&sh->items), (long)n, "each item once: %ld", atomic_load(&sh->items));
    cr_expect_eq(atomic_load(&sh->runs_across_chunks), 0);
    /* 100 chunks of 16 runs and one of 3 items (runs of one), more where an
     * idle worker took a tail, which then runs in sixteenths of its own:
     * still far fewer calls than items. */
    cr_expect_geq(atomic_load(&sh->calls), 100 * 16 + 3, "%ld calls", atomic_load(&sh->calls));
    cr_expect_leq(atomic_load(&sh->calls), (long)n / 8, "%ld calls", atomic_load(&sh->calls));
    pp_pool_free(pool);
    free(in);
    free(out);
}

Test(batch, default_chunksize_and_arena_arrays)
{
    size_t n = 50000;
    sh->chunksize = (n + 4 * 3 - 1) / (4 * 3); /* CPython's rule for 3 workers */
    long *in = pp_shm_alloc(n * sizeof *in), *out = pp_shm_alloc(n * sizeof *out);
    for (size_t i = 0; i < n; i++)
        in[i] = (long)i;
    pp_pool *pool = pool_of(3, 0);
    cr_assert_eq(pp_map_batch(pool, square_run, in, n, sizeof *in, out, sizeof *out, 0, NULL), 0);
    cr_expect_eq(wrong(out, n, 0, 0), 0);
    cr_expect_eq(atomic_load(&sh->runs_across_chunks), 0);
    pp_pool_free(pool);
    pp_shm_free(in);
    pp_shm_free(out);
}

static int count_calls(const void *args, void *results, size_t count)
{
    if (args != NULL || results != NULL || count == 0)
        return 1;
    atomic_fetch_add(&sh->items, (long)count);
    return 0;
}

Test(batch, sizes_of_zero_pass_null)
{
    pp_pool *pool = pool_of(2, 0);
    cr_assert_eq(pp_map_batch(pool, count_calls, NULL, 777, 0, NULL, 0, 10, NULL), 0);
    cr_expect_eq(atomic_load(&sh->items), 777);
    cr_expect_eq(pp_map_batch(pool, count_calls, NULL, 0, 0, NULL, 0, 0, NULL), 0);
    pp_pool_free(pool);
}

Test(batch, bad_arguments_are_einval)
{
    pp_pool *pool = pool_of(1, 0);
    long x[4] = {0}, y[4];
    cr_expect_eq(pp_map_batch(NULL, square_run, x, 4, sizeof *x, y, sizeof *y, 0, NULL), -EINVAL);
    cr_expect_eq(pp_map_batch(pool, NULL, x, 4, sizeof *x, y, sizeof *y, 0, NULL), -EINVAL);
    cr_expect_eq(pp_map_batch(pool, square_run, NULL, 4, sizeof *x, y, sizeof *y, 0, NULL),
                 -EINVAL);
    cr_expect_eq(pp_map_batch(pool, square_run, x, 4, sizeof *x, NULL, sizeof *y, 0, NULL),
                 -EINVAL);
    cr_expect_eq(pp_map_batch(pool, square_run, x, SIZE_MAX / 2, 8, y, 8, 0, NULL), -EINVAL);
    errno = 0;
    cr_expect_null(pp_map_batch_async(pool, NULL, x, 4, sizeof *x, sizeof *y, 0, NULL, NULL, NULL));
    cr_expect_eq(errno, EINVAL);
    pp_close(pool);
    cr_expect_eq(pp_map_batch(pool, square_run, x, 4, sizeof *x, y, sizeof *y, 0, NULL),
                 PP_ECLOSED);
    pp_pool_free(pool);
}

Test(batch, a_failing_call_fails_its_run_and_nothing_else)
{
    size_t n = 20000;
    sh->chunksize = 2000;
    sh->fail_at = 7777;
    long *in = indexes(n), *out = malloc(n * sizeof *out);
    memset(out, 0xab, n * sizeof *out);
    pp_pool *pool = pool_of(2, 0);
    pp_error err;
    cr_assert_eq(pp_map_batch(pool, square_run, in, n, sizeof *in, out, sizeof *out, 2000, &err),
                 PP_ETASK);
    long from = atomic_load(&sh->bad_start), count = atomic_load(&sh->bad_count);
    cr_assert(from <= 7777 && 7777 < from + count && count > 1, "run [%ld, +%ld)", from, count);
    cr_expect_eq(err.code, PP_ETASK);
    cr_expect_eq(err.status, 5);
    cr_expect_eq(err.index, (size_t)from);
    cr_expect_eq(err.failed, (size_t)count);
    cr_expect_str_eq(err.message, "bad item 7777");
    cr_expect_eq(wrong(out, n, from, from + count), 0);
    for (long i = from; i < from + count; i++) /* a failed item's slot is left as it was */
        cr_expect_eq(out[i], (long)0xababababababababUL);
    pp_pool_free(pool);
    free(in);
    free(out);
}

/* Maps n items (chunks of `chunksize`, 2 workers) through square_run, with
 * item `bad` made to crash or hang by the caller, and expects that item
 * alone to fail, with `code`, though it ran inside a call of many: the
 * call's other items ran again, one per call, and every result is whole. */
static void expect_only(long bad, int code, size_t n, size_t chunksize, double timeout)
{
    sh->chunksize = chunksize;
    long *in = indexes(n), *out = calloc(n, sizeof *out);
    pp_pool *pool = pool_of(2, timeout);
    pp_error err;
    cr_assert_eq(
        pp_map_batch(pool, square_run, in, n, sizeof *in, out, sizeof *out, chunksize, &err), code);
    cr_expect_eq(err.index, (size_t)bad);
    cr_expect_eq(err.failed, 1);
    cr_expect_eq(err.status, SIGKILL);
    cr_expect_eq(wrong(out, n, bad, bad + 1), 0);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_expect_eq(code == PP_ECRASH ? st.crashed : st.timed_out, 1);
    cr_expect_eq(st.completed, n - 1);
    pp_pool_free(pool);
    free(in);
    free(out);
}

Test(batch, a_crash_fails_only_the_item_that_crashes)
{
    sh->crash_at = 5003; /* inside a run of 125, not its first */
    expect_only(5003, PP_ECRASH, 20000, 2000, 0);
}

Test(batch, a_call_past_task_timeout_fails_only_the_item_that_hangs)
{
    sh->hang_at = 2500; /* inside a run of 63 */
    expect_only(2500, PP_ETIMEOUT, 4000, 1000, 0.3);
}

Test(batch, a_write_past_the_chunk_fails_the_chunk_with_eoverflow)
{
    size_t n = 64;
    sh->chunksize = 32;
    sh->overrun_at = 31; /* the last item of the first chunk */
    long *in = indexes(n), *out = calloc(n, sizeof *out);
    pp_pool *pool = pool_of(1, 0);
    pp_error err;
    cr_assert_eq(pp_map_batch(pool, square_run, in, n, sizeof *in, out, sizeof *out, 32, &err),
                 -EOVERFLOW);
    cr_expect_eq(err.index, 0);
    cr_expect_eq(err.failed, 32);
    cr_expect_eq(wrong(out, n, 0, 32), 0); /* the second chunk is whole */
    pp_pool_free(pool);
    free(in);
    free(out);
}

static _Atomic int callbacks;

static void on_done(const void *result, void *userdata)
{
    const long *out = result;
    size_t n = (size_t)(uintptr_t)userdata;
    if (wrong(out, n, 0, 0) == 0)
        atomic_fetch_add(&callbacks, 1);
}

Test(batch, async_map_gives_results_to_get_and_callback)
{
    size_t n = 30000;
    sh->chunksize = 500;
    long *in = indexes(n), *out = calloc(n, sizeof *out);
    pp_pool *pool = pool_of(2, 0);
    pp_async *a = pp_map_batch_async(pool, square_run, in, n, sizeof *in, sizeof *out, 500, on_done,
                                     NULL, (void *)(uintptr_t)n);
    cr_assert_not_null(a);
    memset(in, 0, n * sizeof *in); /* copied at submission */
    cr_assert_eq(pp_async_get(a, out, -1, NULL), 0);
    cr_expect_eq(wrong(out, n, 0, 0), 0);
    cr_expect(pp_async_successful(a));
    pp_async_free(a);
    pp_close(pool);
    pp_join(pool); /* callbacks have returned */
    cr_expect_eq(atomic_load(&callbacks), 1);
    pp_pool_free(pool);
    free(in);
    free(out);
}

/* Cancelling a batch map whose call holds: its worker is killed (nothing is
 * charged to the call's items, which then fail PP_ECANCELED with the rest),
 * and the pool goes on whole. */
Test(batch, a_cancelled_async_map_fails_ecanceled_and_the_pool_goes_on)
{
    size_t n = 4000;
    sh->chunksize = 1000;
    sh->hold_at = 1500;
    long *in = indexes(n), *out = calloc(n, sizeof *out);
    pp_pool *pool = pool_of(2, 0);
    pp_async *a = pp_map_batch_async(pool, square_run, in, n, sizeof *in, sizeof *out, 1000, NULL,
                                     NULL, NULL);
    cr_assert_not_null(a);
    wait_flag(&sh->held, 1);
    cr_assert_eq(pp_async_cancel(a), 0);
    pp_error err;
    cr_expect_eq(pp_async_get(a, out, -1, &err), PP_ECANCELED);
    cr_expect_gt(err.failed, 0);
    pp_async_free(a);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_expect_eq(st.crashed, 0);
    cr_expect_eq(st.completed + st.cancelled, n, "%llu + %llu", (unsigned long long)st.completed,
                 (unsigned long long)st.cancelled);
    sh->hold_at = -1;
    memset(out, 0, n * sizeof *out);
    cr_expect_eq(pp_map_batch(pool, square_run, in, n, sizeof *in, out, sizeof *out, 0, NULL), 0);
    cr_expect_eq(wrong(out, n, 0, 0), 0);
    pp_pool_free(pool);
    free(in);
    free(out);
}

struct blocked_map {
    pp_pool *pool;
    long *in, *out;
    size_t n;
    int rc;
    pp_error err;
};

static void *map_in_thread(void *arg)
{
    struct blocked_map *m = arg;
    m->rc = pp_map_batch(m->pool, square_run, m->in, m->n, sizeof *m->in, m->out, sizeof *m->out,
                         500, &m->err);
    return NULL;
}

/* pp_terminate while a blocking batch map's call holds: the map returns
 * PP_ECLOSED for what had not finished, and every finished run keeps its
 * results. */
Test(batch, terminate_ends_a_blocked_batch_map_with_eclosed)
{
    struct blocked_map m = {.n = 3000};
    sh->chunksize = 500;
    sh->hold_at = 2222;
    m.in = indexes(m.n);
    m.out = malloc(m.n * sizeof *m.out);
    memset(m.out, 0xff, m.n * sizeof *m.out); /* -1: a failed item's slot stays so */
    m.pool = pool_of(2, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, map_in_thread, &m), 0);
    wait_flag(&sh->held, 1);
    cr_assert_eq(pp_terminate(m.pool), 0);
    pthread_join(t, NULL);
    cr_expect_eq(m.rc, PP_ECLOSED, "rc %d", m.rc);
    cr_expect_leq(m.err.index, 2222);
    size_t kept = 0, untouched = 0;
    for (size_t i = 0; i < m.n; i++) {
        kept += m.out[i] == (long)(i * i);
        untouched += m.out[i] == -1;
    }
    cr_expect_eq(kept + untouched, m.n);
    cr_expect_eq(untouched, m.err.failed, "kept %zu, failed %zu", kept, m.err.failed);
    cr_expect_eq(m.out[2222], -1);
    pp_pool_free(m.pool);
    free(m.in);
    free(m.out);
}

/* Fails every item that is a multiple of 7, named from the last to the
 * first, each named twice (the first failure named counts); a name out of
 * range and a status of 0 are ignored. The call itself succeeds. */
static int fail_sevens(const void *args, void *results, size_t count)
{
    const long *in = args;
    long *out = results;
    for (size_t k = count; k-- > 0;) {
        if (in[k] % 7 != 0) {
            out[k] = in[k] * in[k];
            continue;
        }
        cr_assert_eq(pp_fail_item(k, 3, "item %ld", in[k]), 3);
        pp_fail_item(k, 4, "named again");
    }
    pp_fail_item(count, 9, "out of range");
    pp_fail_item(0, 0, "status 0");
    return 0;
}

Test(batch, pp_fail_item_fails_the_items_it_names_and_no_other)
{
    size_t n = 10000;
    long *in = indexes(n), *out = malloc(n * sizeof *out);
    memset(out, 0xff, n * sizeof *out);
    pp_pool *pool = pool_of(2, 0);
    pp_error err;
    cr_assert_eq(pp_map_batch(pool, fail_sevens, in, n, sizeof *in, out, sizeof *out, 1000, &err),
                 PP_ETASK);
    cr_expect_eq(err.index, 0);
    cr_expect_eq(err.status, 3);
    cr_expect_str_eq(err.message, "item 0");
    cr_expect_eq(err.failed, (n + 6) / 7);
    for (size_t i = 0; i < n; i++)
        cr_expect_eq(out[i], i % 7 ? (long)(i * i) : -1, "item %zu: %ld", i, out[i]);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_expect_eq(st.failed, (n + 6) / 7);
    cr_expect_eq(st.completed, n - (n + 6) / 7);
    pp_pool_free(pool);
    free(in);
    free(out);
}

/* Names every item of its call as failed while the worker has no memory
 * to spare: RLIMIT_DATA is set just above what it has mapped, and blocks
 * of 4 KiB are taken until malloc fails, so pp_fail_item cannot start its
 * list of failures (its first block is larger than what is left). If the
 * limit cannot be set or stops nothing (64 MiB taken), that is said in
 * limit_loose (the test is skipped) and nothing is named. Everything is
 * given back before the call returns. */
static int fail_all_without_memory(const void *args, void *results, size_t count)
{
    (void)args;
    (void)results;
    struct rlimit was, low;
    long used_kib = status_kib("VmData"); /* private writable memory: what RLIMIT_DATA bounds */
    low = (struct rlimit){.rlim_cur = (rlim_t)used_kib * 1024 + 64 * 1024};
    if (used_kib <= 0 || getrlimit(RLIMIT_DATA, &was) != 0 || was.rlim_cur < low.rlim_cur) {
        sh->limit_loose = 1; /* a limit already lower than ours: not this test's ground */
        return 0;
    }
    low.rlim_max = was.rlim_max;
    if (setrlimit(RLIMIT_DATA, &low) != 0) {
        sh->limit_loose = 1;
        return 0;
    }
    void **taken = NULL; /* a chain through the blocks themselves */
    int n = 0;
    for (void **b; n < 16384 && (b = malloc(4096)) != NULL; n++) {
        *b = taken;
        taken = b;
    }
    if (n == 16384)
        sh->limit_loose = 1;
    else
        for (size_t k = 0; k < count; k++)
            pp_fail_item(k, 6, "item %zu", k);
    while (taken != NULL) {
        void **next = *taken;
        free(taken);
        taken = next;
    }
    setrlimit(RLIMIT_DATA, &was);
    return 0;
}

/* Run without sanitizers (scripts/check-reliability.sh): ASan's allocator
 * maps memory that RLIMIT_DATA does not count, and its own reports fail to
 * map under the limit. */
Test(batch, failures_that_cannot_be_recorded_fail_the_whole_call)
{
#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("needs glibc's allocator: run in the build without sanitizers");
#endif
    size_t n = 2 * 16 * 100; /* two chunks of 16 calls of 100 items */
    sh->chunksize = n / 2;
    long *in = indexes(n), *out = malloc(n * sizeof *out);
    memset(out, 0xff, n * sizeof *out);
    pp_pool *pool = pool_of(1, 0); /* one worker: no run is split off */
    pp_error err;
    int rc = pp_map_batch(pool, fail_all_without_memory, in, n, sizeof *in, out, sizeof *out,
                          sh->chunksize, &err);
    if (sh->limit_loose)
        cr_skip_test("RLIMIT_DATA cannot be set, or stops no allocation, here");
    cr_assert_eq(rc, PP_ETASK);
    cr_expect_eq(err.index, 0);
    cr_expect_eq(err.status, 6);
    cr_expect_str_eq(err.message,
                     "an item of this call failed with status 6; out of memory to say which");
    cr_expect_eq(err.failed, n);
    for (size_t i = 0; i < n; i++)
        cr_expect_eq(out[i], -1L, "item %zu: %ld", i, out[i]);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_expect_eq(st.failed, n);
    cr_expect_eq(st.completed, 0);
    cr_expect_eq(st.crashed, 0);
    pp_pool_free(pool);
    free(in);
    free(out);
}

/* A per-item task: pp_fail_item names nothing there. */
static int fail_item_outside_batch(const void *arg, void *result)
{
    *(long *)result = pp_fail_item(0, 3, "not a batch call") == 3 ? *(const long *)arg : -1;
    return 0;
}

Test(batch, pp_fail_item_outside_a_batch_task_only_returns_its_status)
{
    long x = 42, r = 0;
    cr_expect_eq(pp_fail_item(0, 5, "in the parent"), 5);
    pp_pool *pool = pool_of(1, 0);
    cr_expect_eq(pp_apply(pool, fail_item_outside_batch, &x, sizeof x, &r, sizeof r, NULL), 0);
    cr_expect_eq(r, 42);
    pp_pool_free(pool);
}
