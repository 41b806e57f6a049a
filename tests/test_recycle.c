/*
 * Beyond Python: workers recycled by resident memory (max_memory_per_child),
 * and crash loops that end (PP_ESPAWN) instead of respawning forever.
 * Real workers, real leaks, real deaths.
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <procpool.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

static long resident_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, rss = 0;
    if (f == NULL || fscanf(f, "%ld %ld", &size, &rss) != 2)
        rss = 0;
    if (f)
        fclose(f);
    return rss * sysconf(_SC_PAGESIZE);
}

/* ---- max_memory_per_child -------------------------------------------------------- */

enum { LEAK_MIB = 16 };

struct mem_res {
    long rss_before; /* when the task began */
    int pid;
};

/* arg: bytes to leak (touched, so resident); mmap, not malloc, so that a
 * sanitizer's allocator does not change the numbers. */
static int leak(const void *arg, void *result)
{
    size_t bytes = *(const size_t *)arg;
    struct mem_res *r = result;
    r->rss_before = resident_bytes();
    r->pid = getpid();
    if (bytes) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return pp_fail(1, "mmap failed");
        memset(p, 0xab, bytes); /* never unmapped: the leak */
    }
    return 0;
}

/* A worker's resident size right after it starts, measured in a pool of
 * its own (a worker starts as a copy of this process). */
static long worker_baseline(void)
{
    pp_pool *probe = pp_pool_new(&(pp_options){.workers = 1});
    size_t none = 0;
    struct mem_res r;
    cr_assert_eq(pp_apply(probe, leak, &none, sizeof none, &r, sizeof r, NULL), 0);
    pp_pool_free(probe);
    return r.rss_before;
}

Test(recycle, worker_past_max_memory_is_replaced, .timeout = PP_TEST_TIMEOUT(60))
{
    long limit = worker_baseline() + 3L * LEAK_MIB * (1 << 20);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .max_memory_per_child = (size_t)limit});
    cr_assert_not_null(pool);
    enum { N = 24 };
    size_t in[N];
    struct mem_res out[N];
    for (int i = 0; i < N; i++)
        in[i] = (size_t)LEAK_MIB << 20;
    pp_error err;
    cr_assert_eq(pp_map(pool, leak, in, N, sizeof in[0], out, sizeof out[0], 1, &err), 0,
                 "no item fails: %s", err.message);

    int pids[N], npids = 0;
    for (int i = 0; i < N; i++) {
        /* The limit is checked after every task: no task starts in a
         * worker already past it (a page or two of slack for the rings). */
        cr_assert_leq(out[i].rss_before, limit + (1L << 20),
                      "item %d started in a worker of %ld KiB, past the limit of %ld KiB", i,
                      out[i].rss_before >> 10, limit >> 10);
        int same = 0;
        for (int j = 0; j < N; j++)
            same += out[j].pid == out[i].pid;
        cr_assert_leq(same, 4, "pid %d ran %d leaking tasks", out[i].pid, same);
        bool known = false;
        for (int k = 0; k < npids; k++)
            known |= pids[k] == out[i].pid;
        if (!known)
            pids[npids++] = out[i].pid;
    }
    cr_assert_geq(npids, N / 4, "leaky workers were replaced: %d pids", npids);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_geq(st.respawned, (uint64_t)(npids - 2));
    cr_assert_eq(st.completed, N);
    cr_assert_eq(st.failed + st.crashed + st.timed_out + st.cancelled, 0,
                 "recycling fails nothing");
    pp_pool_free(pool);
}

Test(recycle, worker_under_max_memory_is_kept, .timeout = PP_TEST_TIMEOUT(60))
{
    long limit = worker_baseline() + 64L * (1 << 20);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .max_memory_per_child = (size_t)limit});
    enum { N = 200 };
    size_t in[N];
    struct mem_res out[N];
    memset(in, 0, sizeof in); /* no leak */
    cr_assert_eq(pp_map(pool, leak, in, N, sizeof in[0], out, sizeof out[0], 1, NULL), 0);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.respawned, 0, "nothing to recycle");
    pp_pool_free(pool);
}

/* ---- crash loops ------------------------------------------------------------------- */

enum { POISON_EXIT = 1, POISON_SEGV = 2, POISON_KILL = 3 };

/* The environment turns bad once the test sets flags->release: every new
 * worker then dies while starting, without its initializer returning. */
static int poisoned_init(void *arg)
{
    int how = atomic_load(&flags->release) ? *(const int *)arg : 0;
    if (how == POISON_EXIT)
        _exit(3);
    if (how == POISON_SEGV)
        raise(SIGSEGV);
    if (how == POISON_KILL)
        raise(SIGKILL);
    return 0;
}

enum { T_OK, T_KILL, T_HOLD, T_MS };

static int work(const void *arg, void *result)
{
    int mode = *(const int *)arg;
    if (mode == T_KILL)
        raise(SIGKILL);
    if (mode == T_MS) /* a task that takes a millisecond */
        usleep(1000);
    if (mode == T_HOLD) {
        atomic_fetch_add(&flags->started, 1);
        wait_flag(&flags->count, 1);
    }
    *(int *)result = getpid();
    return 0;
}

static void crash_loop_ends(int how)
{
    /* Read by the initializer in every worker: in the arena, so that a
     * spawned worker sees what was set here (a static would cross with its
     * initial value). */
    int *poison = pp_shm_alloc(sizeof *poison);
    *poison = how;
    atomic_store(&flags->release, 0);
    pp_pool *pool =
        pp_pool_new(&(pp_options){.workers = 1, .initializer = poisoned_init, .initarg = poison});
    cr_assert_not_null(pool);
    atomic_store(&flags->release, 1); /* from now on no new worker survives its start */

    int kill = T_KILL, ok = T_OK, r;
    pp_async *killer = pp_apply_async(pool, work, &kill, sizeof kill, sizeof r, NULL, NULL, NULL);
    enum { N = 20 };
    int in[N] = {0};
    pp_async *pending =
        pp_map_async(pool, work, in, N, sizeof in[0], sizeof r, 1, NULL, NULL, NULL);
    pp_error err;
    cr_assert_eq(pp_async_get(killer, &r, -1, &err), PP_ECRASH, "the task that killed its worker");
    int out[N];
    cr_assert_eq(pp_async_get(pending, out, -1, &err), PP_ESPAWN);
    cr_assert_eq(err.failed, N, "everything pending fails");
    cr_assert(strstr(err.message, "dying before finishing any task") != NULL, "says why: %s",
              err.message);
    cr_assert(strstr(err.message, "stopped") != NULL, "says what it did: %s", err.message);
    cr_assert_eq(pp_strerror(PP_ESPAWN)[0] != '\0', true);

    /* Bounded: it gave up, and stays given up. */
    pp_stats st;
    pp_pool_stats(pool, &st);
    uint64_t respawned = st.respawned;
    cr_assert_leq(respawned, 10, "respawns are bounded: %llu", (unsigned long long)respawned);
    cr_assert_eq(st.workers, 0);
    cr_assert_eq(pp_apply(pool, work, &ok, sizeof ok, &r, sizeof r, NULL), PP_ESPAWN);
    errno = 0;
    cr_assert_null(pp_apply_async(pool, work, &ok, sizeof ok, sizeof r, NULL, NULL, NULL));
    cr_assert_eq(errno, ECHILD);
    errno = 0;
    cr_assert_null(pp_imap(pool, work, in, N, sizeof in[0], sizeof r, 1));
    cr_assert_eq(errno, ECHILD);
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.respawned, respawned, "no respawn after giving up");
    cr_assert_eq(st.submitted, 1 + N);
    cr_assert_eq(st.crashed + st.failed, 1 + N);

    pp_async_free(killer);
    pp_async_free(pending);
    pp_close(pool);
    cr_assert_eq(pp_join(pool), 0);
    pp_pool_free(pool);
    pp_shm_free(poison);
    cr_assert_eq(count_children(), 0, "nothing left behind");
}

Test(crash_loop, workers_exiting_at_start_end_in_espawn, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    crash_loop_ends(POISON_EXIT);
}

Test(crash_loop, workers_segfaulting_at_start_end_in_espawn, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    crash_loop_ends(POISON_SEGV);
}

Test(crash_loop, workers_killed_at_start_end_in_espawn, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    crash_loop_ends(POISON_KILL);
}

Test(crash_loop, tasks_that_crash_are_not_a_crash_loop, .timeout = PP_TEST_TIMEOUT(60))
{
    /* Every death here is charged to the item that caused it: the pool
     * replaces the worker each time, far past the crash-loop bound. */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 30 };
    int in[N], out[N];
    for (int i = 0; i < N; i++)
        in[i] = T_KILL;
    pp_error err;
    cr_assert_eq(pp_map(pool, work, in, N, sizeof in[0], out, sizeof out[0], 1, &err), PP_ECRASH);
    cr_assert_eq(err.failed, N);
    int ok = T_OK, r;
    cr_assert_eq(pp_apply(pool, work, &ok, sizeof ok, &r, sizeof r, NULL), 0, "still usable");
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.crashed, N);
    cr_assert_eq(st.respawned, N);
    pp_pool_free(pool);
}

/*
 * Regression (fixed; it was in src/supervise.c on_exit_, src/dispatch.c settle_done): the
 * crash-loop counter is one for the whole pool and any finished chunk resets it
 * (pool->consecutive_deaths = 0 in settle_done). So when the environment is
 * poisoned but one old worker is still healthy, the other slot is respawned
 * without end: every chunk the healthy worker finishes forgives the deaths,
 * and the zygote forks a doomed worker again and again, as fast as it can,
 * for as long as there is work. Fix: count deaths-before-first-chunk per
 * slot (struct pp_worker, reset only by that slot's own success), give up
 * on a slot after PP_CRASH_LOOP_LIMIT of them (the pool runs degraded, and
 * pp_pool_stats.workers says so), and go PP_ESPAWN only when no slot is
 * left; a growing delay before each respawn would also bound the churn.
 */
Test(crash_loop, poisoned_slot_beside_a_healthy_worker_is_bounded, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    static int poison = POISON_EXIT;
    atomic_store(&flags->release, 0);
    pp_pool *pool =
        pp_pool_new(&(pp_options){.workers = 2, .initializer = poisoned_init, .initarg = &poison});
    atomic_store(&flags->release, 1);
    int kill = T_KILL, r;
    cr_assert_eq(pp_apply(pool, work, &kill, sizeof kill, &r, sizeof r, NULL), PP_ECRASH);
    /* The healthy worker runs a map of a few seconds alone, a chunk at a time. */
    enum { N = 2000 };
    int *in = calloc(N, sizeof *in), *out = calloc(N, sizeof *out);
    for (int i = 0; i < N; i++)
        in[i] = T_MS;
    cr_assert_eq(pp_map(pool, work, in, N, sizeof in[0], out, sizeof out[0], 1, NULL), 0);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_leq(st.respawned, 10, "a doomed slot was respawned %llu times",
                  (unsigned long long)st.respawned);
    free(in);
    free(out);
    pp_pool_free(pool);
}
