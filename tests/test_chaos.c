/*
 * Chaos: 200,000 items through pp_map, pp_imap_unordered, pp_map_batch and
 * pp_apply_async (the last two under SIGKILL only) while another
 * thread SIGKILLs random workers 200 times, or freezes them with SIGSTOP
 * under task_timeout. Every item comes back exactly once, with its correct
 * result or charged to a fault; no more charged items than faults; the pool
 * ends whole; nothing hangs.
 *
 * Pacing, without sleeping on a guess: item i may finish only once the
 * fault thread has struck floor(i * (FAULTS + 1) / N) times (a gate word in
 * MAP_SHARED memory, futex-woken), so the work cannot run out before the
 * faults do, and the faults are spread over the whole input. The fault
 * thread strikes only workers that are inside a task (each task publishes
 * its pid while it runs), so every fault lands on real work.
 *
 * Under SIGSTOP the striker freezes every task that waits at the gate. On a
 * loaded machine it may still be late, and a task then really runs past
 * task_timeout unfrozen: that task counts itself as a fault ("overdue")
 * before its timeout, so the books still balance.
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <limits.h>
#include <linux/futex.h>
#include <procpool.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NMAX 200000
#define W    4

/* Under valgrind (make check-valgrind sets PP_VALGRIND) the same test runs
 * at a tenth of the size. */
static size_t N = NMAX;
static int FAULTS = 200;

struct chaos {
    size_t n; /* N and FAULTS, for workers that did not run setup (spawn) */
    int faults;
    _Atomic int gate;         /* strikes so far (items wait on it) */
    _Atomic int stop;         /* the test is over */
    _Atomic int in_task[W];   /* a worker's pid while it runs a task, else 0 */
    _Atomic int double_start; /* an item started twice */
    _Atomic int overdue;      /* tasks that waited at the gate near task_timeout, unfrozen */
    double timeout;           /* the pool's task_timeout; 0: none */
    _Atomic unsigned char started[NMAX];
};

/* In the arena: workers of a spawn pool (PROCPOOL_START=spawn) see it too. */
#define C (*(struct chaos **)test_global("C"))

static uint64_t expect(uint64_t i)
{
    return (i + 1) * 0x9E3779B97F4A7C15ull; /* never ~0: the "no result" sentinel */
}

/* flag_wait_ge() on the gate, counting this task as overdue once it has
 * waited 80 % of task_timeout (it will be killed as a real timeout). */
static void wait_gate(int target)
{
    double start = now_s();
    bool noted = false;
    while (atomic_load(&C->gate) < target) {
        if (!noted && C->timeout > 0 && now_s() - start > 0.8 * C->timeout) {
            atomic_fetch_add(&C->overdue, 1);
            noted = true;
        }
        struct timespec ts = {0, 5000000};
        syscall(SYS_futex, (int *)&C->gate, FUTEX_WAIT, atomic_load(&C->gate), &ts, NULL, 0);
    }
}

static int task(const void *arg, void *result)
{
    uint64_t i = *(const uint64_t *)arg;
    int id = pp_worker_id();
    atomic_store(&C->in_task[id], getpid());
    if (atomic_fetch_add(&C->started[i], 1) != 0)
        atomic_store(&C->double_start, 1);
    wait_gate((int)(i * (uint64_t)(C->faults + 1) / C->n));
    *(uint64_t *)result = expect(i);
    atomic_store(&C->in_task[id], 0);
    return 0;
}

enum { MODE_KILL, MODE_STOP };

struct striker {
    int mode;
    int strikes; /* signals sent */
    uint64_t rng;
};

/* Waits until some worker is inside a task; its index, or -1 at stop. */
static int wait_busy_worker(struct striker *s)
{
    for (;;) {
        if (atomic_load(&C->stop))
            return -1;
        int ids[W], n = 0;
        for (int id = 0; id < W; id++) {
            int p = atomic_load(&C->in_task[id]);
            if (p != 0 && process_alive(p))
                ids[n++] = id;
        }
        if (n > 0)
            return ids[xorshift64(&s->rng) % (uint64_t)n];
        usleep(200); /* polling a condition; the test's .timeout is the deadline */
    }
}

static void wait_dead(int pid)
{
    while (process_alive(pid) && !atomic_load(&C->stop))
        usleep(200);
}

/* After a SIGSTOP: whether worker `id` (process pid) stopped inside a task.
 * A worker stopped between tasks is no task's timeout: the pool has nothing
 * to kill it for, and the striker would wait for its death for ever. */
static bool frozen_in_task(int id, int pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    for (;;) { /* until the signal has landed: state T, or gone */
        FILE *f = fopen(path, "r");
        if (f == NULL)
            return false;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = '\0';
        const char *close = strrchr(buf, ')');
        if (close == NULL || close[1] == '\0' || close[2] == 'Z' || close[2] == 'X')
            return false;
        if (close[2] == 'T' || close[2] == 't')
            break;
        sched_yield();
    }
    return atomic_load(&C->in_task[id]) == pid;
}

static void *strike(void *arg)
{
    struct striker *s = arg;
    for (int step = 0; step < FAULTS && s->strikes < FAULTS; step++) {
        int id = wait_busy_worker(s);
        if (id < 0)
            break;
        if (s->mode == MODE_KILL) {
            int pid = atomic_load(&C->in_task[id]);
            if (pid == 0 || kill(pid, SIGKILL) != 0) {
                step--;
                continue;
            }
            s->strikes++;
            wait_dead(pid);
        } else {
            /* Freeze every worker inside a task, and any that enters one
             * while the frozen ones wait for their timeout (a task waiting
             * at the gate would otherwise time out unfrozen). */
            int frozen[64], nf = 0;
            for (;;) {
                for (int k = 0; k < W && s->strikes < FAULTS && nf < 64; k++) {
                    int pid = atomic_load(&C->in_task[k]);
                    bool known = false;
                    for (int j = 0; j < nf; j++)
                        known |= frozen[j] == pid;
                    if (pid != 0 && !known && process_alive(pid) && kill(pid, SIGSTOP) == 0) {
                        if (!frozen_in_task(k, pid)) { /* its task ended first */
                            kill(pid, SIGCONT);
                            continue;
                        }
                        frozen[nf++] = pid;
                        s->strikes++;
                    }
                }
                bool any = false;
                for (int j = 0; j < nf; j++)
                    any |= process_alive(frozen[j]);
                if (!any || atomic_load(&C->stop))
                    break;
                if (s->strikes >= FAULTS)
                    break; /* the last ones: open the gate, nobody else may wait */
                usleep(500);
            }
        }
        atomic_store(&C->gate, step + 1);
        flag_wake(&C->gate);
    }
    atomic_store(&C->gate, INT_MAX);
    flag_wake(&C->gate);
    return NULL;
}

static uint64_t *args;

static void setup(void)
{
    if (getenv("PP_VALGRIND")) {
        N = NMAX / 10;
        FAULTS = 20;
    }
    test_share("C", pp_shm_alloc(sizeof *C));
    cr_assert_not_null(C);
    C->n = N;
    C->faults = FAULTS;
    args = malloc(N * sizeof *args);
    for (uint64_t i = 0; i < N; i++)
        args[i] = i;
}

static void teardown(void)
{
    pp_shm_free(C);
    test_share("C", NULL);
    free(args);
}

static void start_striker(pthread_t *t, struct striker *s, int mode, double timeout)
{
    C->timeout = timeout;
    atomic_store(&C->overdue, 0);
    *s = (struct striker){.mode = mode, .rng = 0x1234567 + (uint64_t)getpid()};
    cr_assert_eq(pthread_create(t, NULL, strike, s), 0);
}

static void stop_striker(pthread_t t)
{
    atomic_store(&C->stop, 1);
    pthread_join(t, NULL);
}

/* The pool is whole again: every worker slot has a live process. Every
 * charged item cost its worker, and only faults cost workers. (A SIGSTOP
 * that lands just after a task ended freezes an idle worker: no timeout
 * runs, so nothing is charged and it is not replaced.) */
static void assert_whole(pp_pool *pool, const pp_stats *before, int strikes, size_t failed)
{
    int overdue = atomic_load(&C->overdue);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_eq(st.workers, W, "workers %d", st.workers);
    uint64_t respawned = st.respawned - before->respawned;
    cr_assert(respawned >= failed && respawned <= (uint64_t)(strikes + overdue),
              "respawned %llu, strikes %d (+%d overdue)", (unsigned long long)respawned, strikes,
              overdue);
    int z = pool_zygote(), kids[64];
    cr_assert_gt(z, 0);
    double end = now_s() + 10;
    while (live_children_of(z, kids, 64) != W && now_s() < end)
        usleep(1000);
    cr_assert_eq(live_children_of(z, kids, 64), W);
    /* And it works: a clean map after the storm. */
    uint64_t out[64];
    atomic_store(&C->gate, INT_MAX);
    cr_assert_eq(pp_map(pool, task, args, 64, sizeof *args, out, sizeof *out, 1, NULL), 0);
    for (int i = 0; i < 64; i++)
        cr_assert_eq(out[i], expect((uint64_t)i));
}

/* The books balance after a storm: no item started twice, every fault was
 * struck, `failed` items were charged to faults and no more than there
 * were, and the pool is whole again. */
static void assert_books(pp_pool *pool, const pp_stats *before, const struct striker *s,
                         size_t failed, const char *what, double took)
{
    cr_assert_eq(atomic_load(&C->double_start), 0, "an item started twice");
    cr_assert_eq(s->strikes, FAULTS, "strikes %d", s->strikes);
    pp_stats st;
    pp_pool_stats(pool, &st);
    uint64_t charged =
        s->mode == MODE_KILL ? st.crashed - before->crashed : st.timed_out - before->timed_out;
    cr_assert_eq(failed, charged, "failed %zu, charged %llu", failed, (unsigned long long)charged);
    int overdue = atomic_load(&C->overdue);
    cr_assert_leq(failed, (size_t)(s->strikes + overdue),
                  "more failed items (%zu) than faults (%d + %d overdue)", failed, s->strikes,
                  overdue);
    cr_assert_gt(failed, 0);
    fprintf(stderr, "chaos %s %s: %d faults (+%d overdue), %zu charged, %.1f s\n", what,
            s->mode == MODE_KILL ? "SIGKILL" : "SIGSTOP", s->strikes, overdue, failed, took);
    assert_whole(pool, before, s->strikes, failed);
}

static void map_under(int mode, double timeout, int code)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = W, .task_timeout = timeout});
    cr_assert_not_null(pool);
    pp_stats before;
    pp_pool_stats(pool, &before);
    uint64_t *out = malloc(N * sizeof *out);
    memset(out, 0xff, N * sizeof *out);
    pthread_t t;
    struct striker s;
    double t0 = now_s();
    start_striker(&t, &s, mode, timeout);
    pp_error err;
    int rc = pp_map(pool, task, args, N, sizeof *args, out, sizeof *out, 0, &err);
    stop_striker(t);
    double took = now_s() - t0;

    size_t failed = 0, lowest = SIZE_MAX;
    for (size_t i = 0; i < N; i++) {
        if (out[i] == ~(uint64_t)0) {
            failed++;
            if (lowest == SIZE_MAX)
                lowest = i;
            continue;
        }
        cr_assert_eq(out[i], expect(i), "item %zu: wrong result", i);
        cr_assert_eq(atomic_load(&C->started[i]), 1, "item %zu ran but never started?", i);
    }
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.failed - before.failed, 0);
    cr_assert_eq(mode == MODE_KILL ? st.timed_out : st.crashed, 0);
    cr_assert_eq(rc, code, "rc %d", rc);
    cr_assert_eq(err.code, code);
    cr_assert_eq(err.index, lowest);
    cr_assert_eq(err.failed, failed);
    cr_assert_eq(err.status, SIGKILL);
    assert_books(pool, &before, &s, failed, "map", took);
    free(out);
    pp_pool_free(pool);
}

static void imap_under(int mode, double timeout, int code)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = W, .task_timeout = timeout});
    cr_assert_not_null(pool);
    pp_stats before;
    pp_pool_stats(pool, &before);
    unsigned char *seen = calloc(N, 1);
    pthread_t t;
    struct striker s;
    double t0 = now_s();
    start_striker(&t, &s, mode, timeout);
    pp_iter *it = pp_imap_unordered(pool, task, args, N, sizeof *args, sizeof(uint64_t), 16);
    cr_assert_not_null(it);
    size_t ok = 0, failed = 0;
    for (;;) {
        uint64_t r;
        size_t idx = SIZE_MAX;
        pp_error err;
        int rc = pp_iter_next(it, &r, &idx, -1, &err);
        if (rc == 0)
            break;
        cr_assert(idx < N, "index %zu", idx);
        cr_assert_eq(seen[idx], 0, "item %zu came back twice", idx);
        seen[idx] = 1;
        if (rc == 1) {
            cr_assert_eq(r, expect(idx), "item %zu: wrong result", idx);
            ok++;
        } else {
            cr_assert_eq(rc, code, "item %zu: rc %d (%s)", idx, rc, err.message);
            cr_assert_eq(err.code, code);
            cr_assert_eq(err.index, idx);
            cr_assert_eq(err.status, SIGKILL);
            failed++;
        }
    }
    stop_striker(t);
    double took = now_s() - t0;
    pp_iter_free(it);
    cr_assert_eq(ok + failed, N, "ok %zu + failed %zu", ok, failed);
    assert_books(pool, &before, &s, failed, "imap_unordered", took);
    free(seen);
    pp_pool_free(pool);
}

/* As map_under, one apply_async per item, all submitted before any is
 * collected: most submissions deal by the parent's books alone, so jobs
 * are dealt to workers already dead that the books have not caught up
 * with; each must still come back exactly once. */
static void apply_async_under(int mode, double timeout, int code)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = W, .task_timeout = timeout});
    cr_assert_not_null(pool);
    pp_stats before;
    pp_pool_stats(pool, &before);
    pp_async **jobs = malloc(N * sizeof *jobs);
    pthread_t t;
    struct striker s;
    double t0 = now_s();
    start_striker(&t, &s, mode, timeout);
    for (size_t i = 0; i < N; i++) {
        jobs[i] =
            pp_apply_async(pool, task, &args[i], sizeof *args, sizeof(uint64_t), NULL, NULL, NULL);
        cr_assert_not_null(jobs[i], "job %zu not submitted", i);
    }
    size_t failed = 0;
    for (size_t i = 0; i < N; i++) {
        uint64_t r = ~(uint64_t)0;
        pp_error err = {0};
        int rc = pp_async_get(jobs[i], &r, -1, &err);
        /* A failed job may not have reached its first line: a kill aimed
         * at the task before may land just after its worker claimed this
         * one, which is then the item that was running. */
        if (rc == 0) {
            cr_assert_eq(r, expect(i), "job %zu: wrong result", i);
            cr_assert_eq(atomic_load(&C->started[i]), 1, "job %zu ran but never started?", i);
        } else {
            cr_assert_eq(rc, code, "job %zu: rc %d (%s)", i, rc, err.message);
            cr_assert_eq(err.status, SIGKILL);
            failed++;
        }
        pp_async_free(jobs[i]);
    }
    stop_striker(t);
    double took = now_s() - t0;
    assert_books(pool, &before, &s, failed, "apply_async", took);
    free(jobs);
    pp_pool_free(pool);
}

/* The same items through pp_map_batch: each call publishes its pid while it
 * runs its run through the gate. A kill inside a call of several items
 * charges nothing and runs the call's items again one per call, so here an
 * item may start twice (it still ends once); a kill in such a one-item call
 * charges its item, as in map_under. */
static int batch_task(const void *args, void *results, size_t count)
{
    const uint64_t *in = args;
    uint64_t *out = results;
    int id = pp_worker_id();
    atomic_store(&C->in_task[id], getpid());
    for (size_t k = 0; k < count; k++) {
        atomic_fetch_add(&C->started[in[k]], 1);
        wait_gate((int)(in[k] * (uint64_t)(C->faults + 1) / C->n));
        out[k] = expect(in[k]);
    }
    atomic_store(&C->in_task[id], 0);
    return 0;
}

static void batch_map_under_kills(void)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = W});
    cr_assert_not_null(pool);
    pp_stats before, st;
    pp_pool_stats(pool, &before);
    uint64_t *out = malloc(N * sizeof *out);
    memset(out, 0xff, N * sizeof *out);
    pthread_t t;
    struct striker s;
    double t0 = now_s();
    start_striker(&t, &s, MODE_KILL, 0);
    pp_error err;
    int rc = pp_map_batch(pool, batch_task, args, N, sizeof *args, out, sizeof *out, 0, &err);
    stop_striker(t);
    double took = now_s() - t0;
    size_t failed = 0, lowest = SIZE_MAX, restarted = 0;
    for (size_t i = 0; i < N; i++) {
        restarted += atomic_load(&C->started[i]) > 1;
        if (out[i] == ~(uint64_t)0) {
            failed++;
            lowest = lowest == SIZE_MAX ? i : lowest;
            continue;
        }
        cr_assert_eq(out[i], expect(i), "item %zu: wrong result", i);
        cr_assert_geq(atomic_load(&C->started[i]), 1, "item %zu ran but never started?", i);
    }
    cr_assert_eq(s.strikes, FAULTS, "strikes %d", s.strikes);
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.crashed - before.crashed, failed);
    cr_assert_eq(st.completed - before.completed, N - failed);
    cr_assert_leq(failed, (size_t)s.strikes);
    cr_assert_eq(rc, failed ? PP_ECRASH : 0, "rc %d", rc);
    if (failed) {
        cr_assert_eq(err.index, lowest);
        cr_assert_eq(err.failed, failed);
    }
    fprintf(stderr,
            "chaos map_batch SIGKILL: %d faults, %zu charged, %zu items started again, %.1f s\n",
            s.strikes, failed, restarted, took);
    assert_whole(pool, &before, s.strikes, failed);
    free(out);
    pp_pool_free(pool);
}

#define STOP_TIMEOUT 0.25

Test(chaos, map_200k_items_200_sigkills, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(240))
{
    map_under(MODE_KILL, 0, PP_ECRASH);
}

Test(chaos, imap_unordered_200k_items_200_sigkills, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(240))
{
    imap_under(MODE_KILL, 0, PP_ECRASH);
}

Test(chaos, map_200k_items_200_sigstops_time_out, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(240))
{
    map_under(MODE_STOP, STOP_TIMEOUT, PP_ETIMEOUT);
}

Test(chaos, imap_unordered_200k_items_200_sigstops_time_out, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(240))
{
    imap_under(MODE_STOP, STOP_TIMEOUT, PP_ETIMEOUT);
}

Test(chaos, map_batch_200k_items_200_sigkills, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(240))
{
    batch_map_under_kills();
}

Test(chaos, apply_async_200k_jobs_200_sigkills, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(240))
{
    apply_async_under(MODE_KILL, 0, PP_ECRASH);
}
