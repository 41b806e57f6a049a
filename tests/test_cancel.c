/*
 * Beyond Python: cancellation (pp_async_cancel, freeing a handle early) and
 * the cooperative stop (pp_task_should_stop, task_soft_timeout). Real
 * workers, real kills; tasks are held with flags in MAP_SHARED memory.
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <procpool.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Shared with every worker: made before the pool. */
struct shared {
    _Atomic int started;       /* held tasks that began */
    _Atomic int release;       /* held tasks may return */
    _Atomic int ran;           /* MARK tasks that ran */
    _Atomic int observed_stop; /* a task saw pp_task_should_stop() */
    _Atomic int pid;           /* the last held task's worker */
    _Atomic int pulled;        /* items taken from a source */
    _Atomic int linger_ns;     /* how long a LINGER task runs on after it starts */
};
#define sh (*(struct shared **)test_global("sh")) /* seen by spawned workers too */

static void setup(void)
{
    test_share("sh", pp_shm_alloc(sizeof *sh));
    cr_assert(sh != NULL);
}

static void teardown(void)
{
    pp_shm_free(sh);
    test_share("sh", NULL);
}

enum { MARK, HOLD, FOREVER, UNTIL_STOP, EXIT_WHEN_RELEASED, CRASH, NAP, FAIL_ON_STOP, LINGER };

struct res {
    int value;
    int pid;
    int first_stop; /* pp_task_should_stop() when the task began */
    int polls;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int task(const void *arg, void *result)
{
    int mode = *(const int *)arg;
    struct res *r = result;
    r->pid = getpid();
    r->first_stop = pp_task_should_stop();
    switch (mode) {
    case MARK:
        atomic_fetch_add(&sh->ran, 1);
        break;
    case HOLD:
        atomic_store(&sh->pid, getpid());
        atomic_fetch_add(&sh->started, 1);
        wait_flag(&sh->release, 1);
        break;
    case FOREVER:
        atomic_store(&sh->pid, getpid());
        atomic_fetch_add(&sh->started, 1);
        for (;;)
            pause();
    case UNTIL_STOP:
        atomic_store(&sh->pid, getpid());
        atomic_fetch_add(&sh->started, 1);
        while (!pp_task_should_stop()) {
            r->polls++;
            usleep(1000);
        }
        atomic_store(&sh->observed_stop, 1);
        break;
    case CRASH:
        raise(SIGKILL);
        break;
    case FAIL_ON_STOP:
        atomic_fetch_add(&sh->started, 1);
        while (!pp_task_should_stop())
            usleep(1000);
        return pp_fail(5, "asked to stop");
    case LINGER: { /* says it started, returns linger_ns later */
        double end = now() + atomic_load(&sh->linger_ns) * 1e-9;
        atomic_fetch_add(&sh->started, 1);
        while (now() < end)
            ;
        break;
    }
    case NAP: /* 50 ms, half the grace a cancelled task has to return */
        usleep(50000);
        break;
    case EXIT_WHEN_RELEASED:
        atomic_store(&sh->pid, getpid());
        atomic_fetch_add(&sh->started, 1);
        wait_flag(&sh->release, 1);
        _exit(3);
    }
    r->value = mode * 10 + 7;
    return 0;
}

/* Polls the pool's stats until `field` reaches `value`, or 20 s pass. */
#define WAIT_STAT(pool, field, value)                                                              \
    do {                                                                                           \
        pp_stats st_;                                                                              \
        double end_ = now() + 20;                                                                  \
        for (;;) {                                                                                 \
            cr_assert_eq(pp_pool_stats((pool), &st_), 0);                                          \
            if (st_.field == (value))                                                              \
                break;                                                                             \
            cr_assert(now() < end_, #field " stays %llu, not %llu", (unsigned long long)st_.field, \
                      (unsigned long long)(value));                                                \
            usleep(1000);                                                                          \
        }                                                                                          \
    } while (0)

struct seen {
    _Atomic int ok, errors, last_code;
};

static void on_ok(const void *result, void *userdata)
{
    (void)result;
    atomic_fetch_add(&((struct seen *)userdata)->ok, 1);
}

static void on_err(const pp_error *err, void *userdata)
{
    struct seen *s = userdata;
    atomic_store(&s->last_code, err->code);
    atomic_fetch_add(&s->errors, 1);
}

/* ---- pp_async_cancel ------------------------------------------------------ */

Test(cancel, queued_task_never_runs, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    cr_assert_not_null(pool);
    int hold = HOLD, mark = MARK;
    pp_async *running =
        pp_apply_async(pool, task, &hold, sizeof hold, sizeof(struct res), NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    struct seen seen = {0};
    pp_async *queued =
        pp_apply_async(pool, task, &mark, sizeof mark, sizeof(struct res), on_ok, on_err, &seen);
    cr_assert_not_null(queued);

    cr_assert_eq(pp_async_cancel(queued), 0);
    struct res r;
    pp_error err;
    cr_assert_eq(pp_async_get(queued, &r, -1, &err), PP_ECANCELED);
    cr_assert_eq(err.code, PP_ECANCELED);
    cr_assert_eq(err.status, 0, "it never ran: no signal");
    cr_assert(pp_async_ready(queued));
    cr_assert(!pp_async_successful(queued));
    cr_assert_eq(atomic_load(&seen.errors), 1, "the error callback ran once");
    cr_assert_eq(atomic_load(&seen.last_code), PP_ECANCELED);
    cr_assert_eq(atomic_load(&seen.ok), 0);
    cr_assert_eq(pp_async_cancel(queued), -EALREADY, "already finished (cancelled)");

    /* The running task was not touched. */
    atomic_store(&sh->release, 1);
    cr_assert_eq(pp_async_get(running, &r, -1, NULL), 0);
    cr_assert_eq(r.pid, atomic_load(&sh->pid));
    /* The same worker runs the next task: it passed the cancelled entry. */
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    cr_assert_eq(r.pid, atomic_load(&sh->pid), "no worker was killed");
    cr_assert_eq(atomic_load(&sh->ran), 1, "the cancelled task never ran");

    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_eq(st.cancelled, 1);
    cr_assert_eq(st.respawned, 0);
    cr_assert_eq(st.completed, 2);
    pp_async_free(running);
    pp_async_free(queued);
    pp_pool_free(pool);
}

Test(cancel, running_task_kills_and_replaces_its_worker, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    int forever = FOREVER, mark = MARK;
    struct seen seen = {0};
    pp_async *a = pp_apply_async(pool, task, &forever, sizeof forever, sizeof(struct res), on_ok,
                                 on_err, &seen);
    wait_flag(&sh->started, 1);
    int victim = atomic_load(&sh->pid);
    cr_assert(process_alive(victim));

    cr_assert_eq(pp_async_cancel(a), 0);
    struct res r;
    pp_error err;
    cr_assert_eq(pp_async_get(a, &r, -1, &err), PP_ECANCELED);
    cr_assert_eq(err.code, PP_ECANCELED);
    cr_assert_eq(err.status, SIGKILL, "its worker was killed");
    cr_assert(strstr(err.message, "cancel") != NULL, "says why: %s", err.message);
    cr_assert_eq(atomic_load(&seen.errors), 1);
    cr_assert_eq(atomic_load(&seen.last_code), PP_ECANCELED);
    cr_assert(wait_all_dead(&victim, 1, 10), "the worker is gone");
    cr_assert_eq(pp_async_cancel(a), -EALREADY);

    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_eq(st.cancelled, 1);
    cr_assert_eq(st.crashed, 0, "a cancel is not a crash");
    cr_assert_eq(st.respawned, 1, "replaced");
    WAIT_STAT(pool, workers, 2);

    /* The pool goes on with a new worker; the cancelled task is not retried. */
    enum { N = 40 };
    int in[N];
    struct res out[N];
    for (int i = 0; i < N; i++)
        in[i] = MARK;
    cr_assert_eq(pp_map(pool, task, in, N, sizeof in[0], out, sizeof out[0], 1, NULL), 0);
    for (int i = 0; i < N; i++) {
        cr_assert_neq(out[i].pid, victim);
        cr_assert_eq(out[i].value, MARK * 10 + 7);
    }
    cr_assert_eq(atomic_load(&sh->started), 1, "run once, never again");
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    pp_async_free(a);
    pp_pool_free(pool);
}

/* The task ends its worker by itself just as it is cancelled: a cancel
 * that said 0 fails it PP_ECANCELED, even when the death comes to light
 * only after (the zygote, which reports deaths, is stopped meanwhile); one
 * that came too late says -EALREADY and the crash stands. */
Test(cancel, a_death_seen_after_the_cancel_still_fails_it_cancelled, .init = setup,
     .fini = teardown, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    cr_assert_not_null(pool);
    int zygote = pool_zygote(), mode = EXIT_WHEN_RELEASED;
    cr_assert_gt(zygote, 0);
    for (int round = 0; round < 5; round++) {
        atomic_store(&sh->started, 0);
        atomic_store(&sh->release, 0);
        pp_async *a =
            pp_apply_async(pool, task, &mode, sizeof mode, sizeof(struct res), NULL, NULL, NULL);
        wait_flag(&sh->started, 1);
        int victim = atomic_load(&sh->pid);
        cr_assert_eq(kill(zygote, SIGSTOP), 0);
        atomic_store(&sh->release, 1);
        cr_assert(wait_all_dead(&victim, 1, 10), "the task ended its worker");
        int rc = pp_async_cancel(a);
        kill(zygote, SIGCONT);
        struct res r;
        pp_error err;
        int got = pp_async_get(a, &r, -1, &err);
        if (rc == 0) {
            cr_assert_eq(got, PP_ECANCELED, "round %d: %s", round, pp_strerror(got));
            cr_assert(strstr(err.message, "cancel") && strstr(err.message, "exit status 3"),
                      "says both: %s", err.message);
        } else {
            cr_assert_eq(rc, -EALREADY);
            cr_assert_eq(got, PP_ECRASH);
        }
        pp_async_free(a);
    }
    pp_pool_free(pool);
}

/* The task fails by itself once asked to stop: a cancel that said 0 still
 * fails it PP_ECANCELED; its own message is kept in the error's. */
Test(cancel, a_task_failing_after_the_cancel_fails_it_cancelled, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int mode = FAIL_ON_STOP;
    pp_async *a =
        pp_apply_async(pool, task, &mode, sizeof mode, sizeof(struct res), NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    cr_assert_eq(pp_async_cancel(a), 0);
    struct res r;
    pp_error err;
    cr_assert_eq(pp_async_get(a, &r, -1, &err), PP_ECANCELED);
    cr_assert(strstr(err.message, "cancelled") && strstr(err.message, "asked to stop"), "%s",
              err.message);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.cancelled, 1);
    cr_assert_eq(st.failed, 0);
    pp_async_free(a);
    pp_pool_free(pool);
}

Test(cancel, finished_task_is_ealready, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    int mark = MARK;
    pp_async *a =
        pp_apply_async(pool, task, &mark, sizeof mark, sizeof(struct res), NULL, NULL, NULL);
    struct res r, again;
    cr_assert_eq(pp_async_get(a, &r, -1, NULL), 0);
    cr_assert_eq(pp_async_cancel(a), -EALREADY);
    cr_assert_eq(pp_async_get(a, &again, -1, NULL), 0, "the result stands");
    cr_assert_eq(again.value, r.value);
    cr_assert(pp_async_successful(a));
    cr_assert_eq(pp_async_cancel(NULL), -EINVAL);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.cancelled, 0);
    cr_assert_eq(st.completed, 1);
    pp_async_free(a);
    pp_pool_free(pool);
}

/* A task that returns while pp_async_cancel runs: its DONE may be read
 * after the cancel's first look. Whatever the moment, the return value says
 * how the apply ended. Without the check after the cancel, 1-2 % of the
 * tries said 0 and then succeeded (the task returning 0-16 us after the
 * parent sees it start). */
Test(cancel, a_cancel_racing_the_end_says_how_it_ended, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int mode = LINGER, counts[2] = {0, 0};
    for (int i = 0; i < 4000; i++) {
        atomic_store(&sh->started, 0);
        atomic_store(&sh->linger_ns, (i % 64) * 250);
        pp_async *a =
            pp_apply_async(pool, task, &mode, sizeof mode, sizeof(struct res), NULL, NULL, NULL);
        cr_assert_not_null(a);
        double end = now() + 10;
        while (atomic_load(&sh->started) == 0) /* no sleep: the race is microseconds wide */
            cr_assert(now() < end, "the task never started");
        int crc = pp_async_cancel(a);
        struct res r;
        int g = pp_async_get(a, &r, -1, NULL);
        cr_assert(crc == 0 || crc == -EALREADY, "try %d: cancel said %d", i, crc);
        cr_assert_eq(g, crc == 0 ? PP_ECANCELED : 0,
                     "try %d: pp_async_cancel said %d, then pp_async_get %d", i, crc, g);
        counts[crc == 0]++;
        pp_async_free(a);
    }
    cr_log_info("cancelled %d, already complete %d", counts[1], counts[0]);
    pp_pool_free(pool);
}

Test(cancel, map_running_item_killed_queued_items_never_run, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 10 };
    int in[N];
    for (int i = 0; i < N; i++)
        in[i] = MARK;
    in[0] = FOREVER;
    /* chunksize 1: item 0 runs, the other nine wait in the worker's inbox
     * and in the queue. */
    pp_async *a =
        pp_map_async(pool, task, in, N, sizeof in[0], sizeof(struct res), 1, NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    cr_assert_eq(pp_async_cancel(a), 0);
    struct res out[N];
    pp_error err;
    cr_assert_eq(pp_async_get(a, out, -1, &err), PP_ECANCELED);
    cr_assert_eq(err.index, 0);
    cr_assert_eq(err.failed, N);
    cr_assert_eq(err.status, SIGKILL);
    cr_assert_eq(atomic_load(&sh->ran), 0, "no queued item ran");
    int mark = MARK;
    struct res r;
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    cr_assert_eq(atomic_load(&sh->ran), 1);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.cancelled, N);
    cr_assert_eq(st.respawned, 1);
    pp_async_free(a);
    pp_pool_free(pool);
}

/* The running item stops by itself when asked (no kill): the items of its
 * entry that had finished before the cancel still count as completed, with
 * their results; it and those after it fail PP_ECANCELED. Chunks of one
 * (dealt several to an entry) and one chunk of all. */
Test(cancel, a_cooperative_stop_keeps_what_its_entry_finished_before, .init = setup,
     .fini = teardown, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 10, RUNNING = 4 };
    int in[N];
    for (int i = 0; i < N; i++)
        in[i] = i == RUNNING ? UNTIL_STOP : MARK;
    size_t chunks[2] = {1, N};
    for (int c = 0; c < 2; c++) {
        atomic_store(&sh->started, 0);
        atomic_store(&sh->ran, 0);
        pp_stats before;
        pp_pool_stats(pool, &before);
        pp_async *a = pp_map_async(pool, task, in, N, sizeof in[0], sizeof(struct res), chunks[c],
                                   NULL, NULL, NULL);
        wait_flag(&sh->started, 1);
        cr_assert_eq(pp_async_cancel(a), 0);
        struct res out[N];
        memset(out, 0, sizeof out);
        pp_error err;
        cr_assert_eq(pp_async_get(a, out, -1, &err), PP_ECANCELED);
        cr_assert_eq(err.index, RUNNING, "chunks of %zu: the running item, not %zu", chunks[c],
                     err.index);
        cr_assert_eq(err.failed, N - RUNNING);
        for (int i = 0; i < RUNNING; i++)
            cr_assert_eq(out[i].value, MARK * 10 + 7, "item %d finished before", i);
        pp_stats st;
        pp_pool_stats(pool, &st);
        cr_assert_eq(st.completed - before.completed, RUNNING, "chunks of %zu", chunks[c]);
        cr_assert_eq(st.cancelled - before.cancelled, N - RUNNING, "chunks of %zu", chunks[c]);
        cr_assert_eq(st.respawned, 0, "it stopped by itself");
        pp_async_free(a);
    }
    pp_pool_free(pool);
}

/* Freeing the handle cancels what is queued, and what runs finishes and
 * counts as cancelled; chunks that finished before count as completed,
 * not cancelled (they are settled before the cancel). */
Test(cancel, freeing_early_counts_what_finished_as_completed, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 12, RUNNING = 6 };
    int in[N];
    for (int i = 0; i < N; i++)
        in[i] = i == RUNNING ? HOLD : MARK;
    pp_async *a = /* chunks of 2: items 0-5 in three finished chunks */
        pp_map_async(pool, task, in, N, sizeof in[0], sizeof(struct res), 2, NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    pp_async_free(a);
    atomic_store(&sh->release, 1);
    WAIT_STAT(pool, cancelled, N - RUNNING);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.completed, RUNNING);
    pp_pool_free(pool);
}

/* Maps `in` (one chunk) on a one-worker pool, cancels it once an item
 * has started, and checks that the items before `running` completed and
 * the others failed PP_ECANCELED. Returns the pool's stats. */
static pp_stats cancel_one_chunk(const int *in, int n, int running, pp_error *err)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    pp_async *a = pp_map_async(pool, task, in, (size_t)n, sizeof in[0], sizeof(struct res),
                               (size_t)n, NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    cr_assert_eq(pp_async_cancel(a), 0);
    struct res out[64];
    cr_assert_leq(n, 64);
    cr_assert_eq(pp_async_get(a, out, -1, err), PP_ECANCELED);
    cr_assert_eq(err->index, (size_t)running);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.completed, (uint64_t)running);
    cr_assert_eq(st.cancelled, (uint64_t)(n - running));
    pp_async_free(a);
    pp_pool_free(pool);
    return st;
}

/* A chunk of 32 is claimed two items at a time: the item after the running
 * one is already taken when the cancel comes, runs after it, and crashes
 * its worker. The items before the cut stay completed; the running one,
 * which returned when asked, and the crashed one fail PP_ECANCELED, as a
 * chunk that ends without a death would fail them. */
Test(cancel, a_death_after_the_cut_fails_what_ran_after_the_cancel, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    enum { N = 32, RUNNING = 4 };
    int in[N];
    for (int i = 0; i < N; i++)
        in[i] = i == RUNNING ? UNTIL_STOP : i == RUNNING + 1 ? CRASH : MARK;
    pp_error err;
    pp_stats st = cancel_one_chunk(in, N, RUNNING, &err);
    cr_assert_eq(err.failed, N - RUNNING);
    cr_assert_eq(st.crashed, 0, "a cancelled item's death is the cancel's");
}

/* A chunk of 64 is claimed four items at a time: at the cancel the worker
 * has taken three more after the running one. Each returns within the
 * grace (50 ms of 100), together not: each gets its own, and the worker
 * is not killed. */
Test(cancel, items_taken_before_the_cancel_each_get_the_grace, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    enum { N = 64, RUNNING = 4 };
    int in[N];
    for (int i = 0; i < N; i++)
        in[i] = i == RUNNING ? UNTIL_STOP : i > RUNNING && i < RUNNING + 4 ? NAP : MARK;
    pp_error err;
    pp_stats st = cancel_one_chunk(in, N, RUNNING, &err);
    cr_assert_eq(st.respawned, 0, "every task returned within its grace: %s", err.message);
}

Test(cancel, chunk_keeps_finished_items_and_drops_the_rest, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 6 };
    int in[N] = {MARK, FOREVER, MARK, MARK, MARK, MARK};
    pp_async *a = /* one chunk of six */
        pp_map_async(pool, task, in, N, sizeof in[0], sizeof(struct res), N, NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    cr_assert_eq(pp_async_cancel(a), 0);
    struct res out[N];
    memset(out, 0, sizeof out);
    pp_error err;
    cr_assert_eq(pp_async_get(a, out, -1, &err), PP_ECANCELED);
    cr_assert_eq(err.index, 1, "the running item");
    cr_assert_eq(err.failed, N - 1, "it and the four after it");
    cr_assert_eq(out[0].value, MARK * 10 + 7, "item 0 finished before: its result is kept");
    cr_assert_eq(atomic_load(&sh->ran), 1, "items 2..5 never ran");
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.completed, 1);
    cr_assert_eq(st.cancelled, N - 1);
    pp_async_free(a);
    pp_pool_free(pool);
}

/* ---- freeing a handle early ------------------------------------------------ */

/* Frees a map of n items (chunksize 1) while the only worker is held: its
 * items wait in the worker's inbox and, past the inbox's depth, in the
 * pool's queue. None may run and no callback may be called. */
static void free_map_while_queued(int n)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int hold = HOLD;
    pp_async *running =
        pp_apply_async(pool, task, &hold, sizeof hold, sizeof(struct res), NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    int *in = calloc((size_t)n, sizeof *in); /* all MARK */
    struct seen seen = {0};
    pp_async *a =
        pp_map_async(pool, task, in, n, sizeof in[0], sizeof(struct res), 1, on_ok, on_err, &seen);
    cr_assert_not_null(a);
    pp_async_free(a);
    free(in);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.cancelled, (uint64_t)n);
    cr_assert_eq(st.queued, 0);

    atomic_store(&sh->release, 1);
    struct res r;
    cr_assert_eq(pp_async_get(running, &r, -1, NULL), 0);
    int mark = MARK;
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    cr_assert_eq(atomic_load(&sh->ran), 1, "none of the freed map's items ran");
    pp_close(pool);
    cr_assert_eq(pp_join(pool), 0);
    cr_assert_eq(atomic_load(&seen.ok) + atomic_load(&seen.errors), 0, "no callback after free");
    pp_async_free(running);
    pp_pool_free(pool);
}

Test(cancel, async_free_before_done_cancels_work_in_the_inbox, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    free_map_while_queued(20); /* every item fits the worker's inbox */
}

/*
 * Regression (fixed; it was in src/async.c pp_async_free -> src/pool.c pp__job_maybe_free): a job
 * still linked in the pool's job queue (pool->qhead, items not yet dealt
 * because the inboxes are full) is freed when its handle is freed: the
 * queue keeps a dangling pointer. ASan: heap-use-after-free in
 * pp_pool_stats (walks pool->qhead) and, at the next deal, in next_piece.
 * The same happens after pp_async_cancel followed at once by
 * pp_async_free, and after pp_iter_free of an iterator with nothing in
 * flight. Fix: pp__job_cancel_queued should unlink the job from
 * pool->qhead/qtail (and clear job->queued), or pp__job_maybe_free should
 * refuse to free a queued job.
 */
Test(cancel, async_free_before_done_cancels_work_in_the_queue, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    free_map_while_queued(500); /* most items wait in the pool's queue */
}

Test(cancel, cancel_then_free_at_once, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int hold = HOLD;
    pp_async *running =
        pp_apply_async(pool, task, &hold, sizeof hold, sizeof(struct res), NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    enum { N = 500 };
    int *in = calloc(N, sizeof *in);
    pp_async *a =
        pp_map_async(pool, task, in, N, sizeof in[0], sizeof(struct res), 1, NULL, NULL, NULL);
    cr_assert_eq(pp_async_cancel(a), 0);
    pp_async_free(a);
    free(in);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.cancelled, N);
    atomic_store(&sh->release, 1);
    struct res r;
    int mark = MARK;
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    cr_assert_eq(atomic_load(&sh->ran), 1);
    pp_async_free(running);
    pp_pool_free(pool);
}

struct gen {
    int first_mode; /* item 0 */
    long n;
    long taken;
};

static int gen_source(void *state, void *arg)
{
    struct gen *g = state;
    if (g->taken >= g->n)
        return 0;
    *(int *)arg = g->taken == 0 ? g->first_mode : MARK;
    g->taken++;
    atomic_fetch_add(&sh->pulled, 1);
    return 1;
}

Test(cancel, iter_free_before_done_cancels_queued_work, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { WINDOW = 16 };
    struct gen g = {.first_mode = HOLD, .n = 1000000};
    pp_iter *it = pp_imap_source(pool, task, gen_source, &g, sizeof(int), sizeof(struct res), 1,
                                 WINDOW, true);
    cr_assert_not_null(it);
    wait_flag(&sh->started, 1);
    struct res r;
    cr_assert_eq(pp_iter_next(it, &r, NULL, 0, NULL), -ETIMEDOUT, "item 0 is held");
    cr_assert_eq(g.taken, WINDOW, "the window is full and no more");
    pp_iter_free(it);
    cr_assert_eq(g.taken, WINDOW, "never pulled after free");
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.cancelled, WINDOW - 1, "all but the running item");
    cr_assert_eq(st.queued, 0);
    cr_assert_eq(st.running, 1);

    atomic_store(&sh->release, 1);
    int mark = MARK;
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    cr_assert_eq(atomic_load(&sh->ran), 1, "none of the freed iterator's queued items ran");
    pp_pool_free(pool);
}

/* ---- the cooperative stop ---------------------------------------------------- */

Test(cancel, should_stop_is_false_outside_a_task_and_in_a_plain_one, .init = setup,
     .fini = teardown, .timeout = PP_TEST_TIMEOUT(30))
{
    cr_assert(!pp_task_should_stop(), "in the parent");
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    cr_assert(!pp_task_should_stop(), "in the parent, with a pool");
    int mark = MARK;
    struct res r;
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    cr_assert_eq(r.first_stop, 0, "no cancel, no soft limit: never true");
    pp_pool_free(pool);
}

Test(cancel, soft_timeout_lets_a_task_return_cleanly, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    /* The hard limit is far away: the task ends because it polled. */
    pp_pool *pool =
        pp_pool_new(&(pp_options){.workers = 1, .task_soft_timeout = 1.0, .task_timeout = 50});
    int until_stop = UNTIL_STOP;
    struct res r;
    pp_error err;
    cr_assert_eq(pp_apply(pool, task, &until_stop, sizeof until_stop, &r, sizeof r, &err), 0, "%s",
                 err.message);
    cr_assert_eq(r.first_stop, 0, "false when the task began");
    cr_assert_gt(r.polls, 0);
    cr_assert_eq(r.value, UNTIL_STOP * 10 + 7, "its own result");
    cr_assert_eq(atomic_load(&sh->observed_stop), 1);
    int worker = r.pid;

    /* Every item of a chunk gets its own soft limit. */
    enum { N = 3 };
    int in[N] = {UNTIL_STOP, UNTIL_STOP, UNTIL_STOP};
    struct res out[N];
    cr_assert_eq(pp_map(pool, task, in, N, sizeof in[0], out, sizeof out[0], N, NULL), 0);
    for (int i = 0; i < N; i++)
        cr_assert_eq(out[i].pid, worker, "nothing was killed");
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.timed_out, 0);
    cr_assert_eq(st.respawned, 0);
    cr_assert_eq(st.completed, 1 + N);
    pp_pool_free(pool);
}

Test(cancel, soft_timeout_ignored_then_hard_timeout_kills, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool =
        pp_pool_new(&(pp_options){.workers = 1, .task_soft_timeout = 0.1, .task_timeout = 0.5});
    int forever = FOREVER;
    struct res r;
    pp_error err;
    cr_assert_eq(pp_apply(pool, task, &forever, sizeof forever, &r, sizeof r, &err), PP_ETIMEOUT);
    cr_assert_eq(err.status, SIGKILL);
    pp_pool_free(pool);
}

/*
 * Regression (fixed; it was in src/dispatch.c, pp__job_cancel): cancelling a running task stores
 * slot->stop = 1 and, in the same breath, asks the zygote to SIGKILL the
 * worker, so the task has no time to see pp_task_should_stop() and return
 * cleanly: "true once cancel was asked" is unobservable in practice. This
 * test states the cooperative contract (the task returns on its own, its
 * worker survives, the item still fails PP_ECANCELED).
 */
Test(cancel, cancel_is_seen_by_should_stop_before_the_kill, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int until_stop = UNTIL_STOP;
    pp_async *a = pp_apply_async(pool, task, &until_stop, sizeof until_stop, sizeof(struct res),
                                 NULL, NULL, NULL);
    wait_flag(&sh->started, 1);
    int worker = atomic_load(&sh->pid);
    cr_assert_eq(pp_async_cancel(a), 0);
    struct res r;
    cr_assert_eq(pp_async_get(a, &r, -1, NULL), PP_ECANCELED);
    cr_assert_eq(atomic_load(&sh->observed_stop), 1, "the task saw the cancel");
    int mark = MARK;
    cr_assert_eq(pp_apply(pool, task, &mark, sizeof mark, &r, sizeof r, NULL), 0);
    cr_assert_eq(r.pid, worker, "the worker returned cleanly and was kept");
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.respawned, 0);
    cr_assert_eq(st.cancelled, 1);
    pp_async_free(a);
    pp_pool_free(pool);
}
