/* close / join / terminate, initializer, max_tasks_per_child, threads, crash loops. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <procpool.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define flags (*shared_flags_slot()) /* seen by spawned workers too */

static void setup(void)
{
    flags = shared_flags_new();
}

static void teardown(void)
{
    shared_flags_free(flags);
}

static int init_value;

static int init_sets(void *arg)
{
    init_value = *(int *)arg;
    return 0;
}

static int init_fails(void *arg)
{
    (void)arg;
    return 1;
}

/* Fails once the test has set flags->release: replacements cannot start. */
static int init_fails_after_release(void *arg)
{
    (void)arg;
    return atomic_load(&flags->release) ? 1 : 0;
}

static int report(const void *arg, void *result)
{
    int mode = arg ? *(const int *)arg : 0;
    if (mode == 1) { /* hold */
        atomic_fetch_add(&flags->started, 1);
        wait_flag(&flags->release, 1);
    } else if (mode == 2) {
        raise(SIGKILL);
    } else if (mode == 3) { /* hold forever */
        atomic_fetch_add(&flags->started, 1);
        for (;;)
            pause();
    }
    int *r = result;
    r[0] = init_value;
    r[1] = getpid();
    return 0;
}

Test(lifecycle, initializer_runs_in_every_worker_first, .timeout = PP_TEST_TIMEOUT(30))
{
    static int v = 42; /* static: crosses to spawned workers too, with its initial value */
    pp_pool *pool =
        pp_pool_new(&(pp_options){.workers = 3, .initializer = init_sets, .initarg = &v});
    cr_assert_not_null(pool);
    int out[30][2];
    cr_assert_eq(pp_map(pool, report, NULL, 30, 0, out, sizeof out[0], 1, NULL), 0);
    for (int i = 0; i < 30; i++)
        cr_assert_eq(out[i][0], 42);
    cr_assert_eq(init_value, 0, "the initializer never runs in the parent");
    pp_pool_free(pool);
}

Test(lifecycle, failing_initializer_fails_pool_new, .timeout = PP_TEST_TIMEOUT(30))
{
    int before = count_children();
    errno = 0;
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .initializer = init_fails});
    cr_assert_null(pool);
    cr_assert_eq(errno, ECHILD);
    cr_assert_eq(count_children(), before, "no process left behind");
}

Test(lifecycle, crash_loop_stops_respawning, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool =
        pp_pool_new(&(pp_options){.workers = 1, .initializer = init_fails_after_release});
    cr_assert_not_null(pool);
    atomic_store(&flags->release, 1); /* from now on no worker can start */
    int kill_mode = 2, ok_mode = 0;
    int out[2];
    pp_async *killer =
        pp_apply_async(pool, report, &kill_mode, sizeof kill_mode, sizeof out, NULL, NULL, NULL);
    pp_async *queued =
        pp_apply_async(pool, report, &ok_mode, sizeof ok_mode, sizeof out, NULL, NULL, NULL);
    pp_error err;
    cr_assert_eq(pp_async_get(killer, out, -1, NULL), PP_ECRASH);
    cr_assert_eq(pp_async_get(queued, out, -1, &err), PP_ESPAWN);
    cr_assert(strstr(err.message, "initializer") != NULL, "says why: %s", err.message);
    cr_assert_eq(pp_apply(pool, report, &ok_mode, sizeof ok_mode, out, sizeof out, NULL),
                 PP_ESPAWN);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert(st.respawned < 10, "bounded: %lu", (unsigned long)st.respawned);
    pp_async_free(killer);
    pp_async_free(queued);
    pp_pool_free(pool);
}

Test(lifecycle, max_tasks_per_child_replaces_workers, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .max_tasks_per_child = 3});
    enum { N = 60 };
    int out[N][2];
    cr_assert_eq(pp_map(pool, report, NULL, N, 0, out, sizeof out[0], 1, NULL), 0);
    for (int i = 0; i < N; i++) {
        int same = 0;
        for (int j = 0; j < N; j++)
            same += out[j][1] == out[i][1];
        cr_assert(same <= 3, "pid %d ran %d chunks", out[i][1], same);
    }
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert(st.respawned >= N / 3 - 2);
    cr_assert_eq(st.crashed, 0, "retirement is not a crash");
    pp_pool_free(pool);
}

Test(lifecycle, close_runs_queued_work_then_join, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 100 };
    pp_async *v[N];
    for (int i = 0; i < N; i++)
        v[i] = pp_apply_async(pool, report, NULL, 0, 2 * sizeof(int), NULL, NULL, NULL);
    cr_assert_eq(pp_join(pool), -EINVAL, "join before close");
    cr_assert_eq(pp_close(pool), 0);
    cr_assert_eq(pp_close(pool), 0, "idempotent");
    int out[2];
    cr_assert_eq(pp_apply(pool, report, NULL, 0, out, sizeof out, NULL), PP_ECLOSED);
    errno = 0;
    cr_assert_null(pp_apply_async(pool, report, NULL, 0, sizeof out, NULL, NULL, NULL));
    cr_assert_eq(errno, ESHUTDOWN);
    cr_assert_null(pp_imap(pool, report, NULL, 3, 0, sizeof out, 1));
    cr_assert_eq(errno, ESHUTDOWN);
    cr_assert_eq(pp_join(pool), 0);
    for (int i = 0; i < N; i++) {
        cr_assert(pp_async_ready(v[i]));
        cr_assert_eq(pp_async_get(v[i], out, 0, NULL), 0);
        pp_async_free(v[i]);
    }
    cr_assert_eq(count_children(), 0, "join reaped everything");
    pp_pool_free(pool);
}

static int callbacks_run;
static void count_callback(const void *result, void *userdata)
{
    (void)result;
    (void)userdata;
    __atomic_add_fetch(&callbacks_run, 1, __ATOMIC_SEQ_CST);
}

Test(lifecycle, join_returns_after_every_callback, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 200 };
    pp_async *v[N];
    for (int i = 0; i < N; i++)
        v[i] = pp_apply_async(pool, report, NULL, 0, 2 * sizeof(int), count_callback, NULL, NULL);
    pp_close(pool);
    cr_assert_eq(pp_join(pool), 0);
    cr_assert_eq(__atomic_load_n(&callbacks_run, __ATOMIC_SEQ_CST), N);
    for (int i = 0; i < N; i++)
        pp_async_free(v[i]);
    pp_pool_free(pool);
}

Test(lifecycle, terminate_fails_everything_unfinished, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    int forever = 3;
    pp_async *running[2], *queued[20];
    for (int i = 0; i < 2; i++)
        running[i] = pp_apply_async(pool, report, &forever, sizeof forever, 2 * sizeof(int), NULL,
                                    NULL, NULL);
    wait_flag(&flags->started, 2);
    for (int i = 0; i < 20; i++)
        queued[i] = pp_apply_async(pool, report, NULL, 0, 2 * sizeof(int), NULL, NULL, NULL);
    /* Tasks that never end: terminate must not wait for them. */
    cr_assert_eq(pp_terminate(pool), 0);
    int out[2];
    pp_error err;
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(pp_async_get(running[i], out, -1, &err), PP_ECLOSED);
        cr_assert_eq(err.code, PP_ECLOSED);
        pp_async_free(running[i]);
    }
    for (int i = 0; i < 20; i++) {
        cr_assert_eq(pp_async_get(queued[i], out, -1, NULL), PP_ECLOSED);
        pp_async_free(queued[i]);
    }
    cr_assert_eq(pp_apply(pool, report, NULL, 0, out, sizeof out, NULL), PP_ECLOSED);
    cr_assert_eq(pp_join(pool), 0);
    cr_assert_eq(count_children(), 0);
    pp_pool_free(pool);
}

/* Item 1 fails, item 2 holds until terminate, the others succeed. */
static int fail_then_hold(const void *arg, void *result)
{
    int k = *(const int *)arg;
    if (k == 1)
        return pp_fail(5, "item 1 fails");
    if (k == 2) {
        atomic_fetch_add(&flags->started, 1);
        for (;;)
            pause();
    }
    *(long *)result = 100 + k;
    return 0;
}

struct map_call {
    pp_pool *pool;
    int in[4];
    long out[4];
    pp_error err;
    int rc;
};

static void *map_fail_then_hold(void *arg)
{
    struct map_call *c = arg;
    c->rc =
        pp_map(c->pool, fail_then_hold, c->in, 4, sizeof(int), c->out, sizeof(long), 4, &c->err);
    return NULL;
}

/* One chunk of four on one worker: item 0 finished, item 1 failed (its
 * FAIL seen by the parent), item 2 running, item 3 not started when the
 * pool is terminated. Item 0 keeps its result and counts as completed;
 * item 1 keeps its own failure, which stays the lowest; 2 and 3 fail
 * PP_ECLOSED with their slots untouched. */
Test(lifecycle, terminate_keeps_what_a_chunk_finished_before_a_failure, .init = setup,
     .fini = teardown, .timeout = PP_TEST_TIMEOUT(30))
{
    struct map_call c = {.pool = pp_pool_new(&(pp_options){.workers = 1}),
                         .in = {0, 1, 2, 3},
                         .out = {-1, -1, -1, -1}};
    cr_assert_not_null(c.pool);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, map_fail_then_hold, &c), 0);
    wait_flag(&flags->started, 1); /* item 1's FAIL was posted before item 2 began */
    pp_stats st;
    do { /* the waiting pp_map collects it */
        cr_assert_eq(pp_pool_stats(c.pool, &st), 0);
    } while (st.failed == 0 && usleep(1000) == 0);
    cr_assert_eq(pp_terminate(c.pool), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(c.rc, PP_ETASK);
    cr_assert_eq(c.err.code, PP_ETASK);
    cr_assert_eq(c.err.index, 1);
    cr_assert_eq(c.err.status, 5);
    cr_assert_eq(c.err.failed, 3);
    cr_assert_eq(c.out[0], 100);
    cr_assert_eq(c.out[1], -1);
    cr_assert_eq(c.out[2], -1);
    cr_assert_eq(c.out[3], -1);
    cr_assert_eq(pp_pool_stats(c.pool, &st), 0);
    cr_assert_eq(st.completed, 1);
    cr_assert_eq(st.failed, 3);
    pp_pool_free(c.pool);
}

struct submitter {
    pp_pool *pool;
    int base;
    int ok;
};

static int add_base(const void *arg, void *result)
{
    *(int *)result = *(const int *)arg * 3;
    return 0;
}

static void *submit_many(void *arg)
{
    struct submitter *s = arg;
    int in[64], out[64];
    s->ok = 1;
    for (int round = 0; round < 50; round++) {
        for (int i = 0; i < 64; i++)
            in[i] = s->base + round * 64 + i;
        if (pp_map(s->pool, add_base, in, 64, sizeof(int), out, sizeof(int), 0, NULL) != 0)
            s->ok = 0;
        for (int i = 0; i < 64; i++)
            if (out[i] != in[i] * 3)
                s->ok = 0;
        pp_async *a =
            pp_apply_async(s->pool, add_base, &in[0], sizeof(int), sizeof(int), NULL, NULL, NULL);
        int r = 0;
        if (pp_async_get(a, &r, -1, NULL) != 0 || r != in[0] * 3)
            s->ok = 0;
        pp_async_free(a);
    }
    return NULL;
}

Test(lifecycle, submission_is_thread_safe, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    pthread_t t[4];
    struct submitter s[4];
    for (int i = 0; i < 4; i++) {
        s[i] = (struct submitter){.pool = pool, .base = i * 100000};
        pthread_create(&t[i], NULL, submit_many, &s[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        cr_assert(s[i].ok, "thread %d", i);
    }
    pp_pool_free(pool);
}

/* Whether thread `tid` of this process sleeps (state S in its stat line). */
static bool thread_sleeps(int tid)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    char *got = fgets(line, sizeof line, f);
    fclose(f);
    char *end = got ? strrchr(line, ')') : NULL;
    return end != NULL && end[1] == ' ' && end[2] == 'S';
}

struct joiner {
    pp_pool *pool;
    _Atomic int tid;
    int rc;
};

static void *join_pool(void *arg)
{
    struct joiner *j = arg;
    atomic_store(&j->tid, (int)gettid());
    j->rc = pp_join(j->pool);
    return NULL;
}

/* Two threads join at once, both while a task still runs: each returns 0
 * once everything ended, and neither waits for the other forever. */
Test(lifecycle, join_from_two_threads_at_once_returns_in_both, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int hold = 1, out[2] = {0};
    pp_async *a = pp_apply_async(pool, report, &hold, sizeof hold, sizeof out, NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    pp_close(pool);
    struct joiner j[2] = {{.pool = pool, .rc = 1}, {.pool = pool, .rc = 1}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, join_pool, &j[i]);
    /* Both asleep inside pp_join (the task holds every joiner there). */
    for (int i = 0; i < 2; i++)
        while (atomic_load(&j[i].tid) == 0 || !thread_sleeps(atomic_load(&j[i].tid)))
            sched_yield();
    atomic_store(&flags->release, 1);
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(j[i].rc, 0, "joiner %d", i);
    }
    cr_assert_eq(pp_async_get(a, out, 0, NULL), 0);
    cr_assert_eq(count_children(), 0);
    cr_assert_eq(pp_join(pool), 0, "a third join after the end");
    pp_async_free(a);
    pp_pool_free(pool);
}
