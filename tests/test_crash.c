/* A dead worker fails one item, never the pool: real kills, real signals. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <procpool.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define flags (*shared_flags_slot()) /* seen by spawned workers too */

enum { KIND_OK, KIND_KILL, KIND_SEGV, KIND_ABORT, KIND_EXIT, KIND_HANG, KIND_WAIT };

struct job {
    int kind;
    int value;
};

static int run(const void *arg, void *result)
{
    const struct job *j = arg;
    switch (j->kind) {
    case KIND_KILL:
        raise(SIGKILL);
        break;
    case KIND_SEGV:
        raise(SIGSEGV);
        break;
    case KIND_ABORT:
        abort();
    case KIND_EXIT:
        _exit(3);
    case KIND_HANG:
        for (;;)
            pause();
    case KIND_WAIT: /* hold the worker until the test releases it */
        atomic_fetch_add(&flags->started, 1);
        wait_flag(&flags->release, 1);
        break;
    }
    ((int *)result)[0] = j->value * 2;
    ((int *)result)[1] = pp_worker_id();
    return 0;
}

static void setup(void)
{
    flags = shared_flags_new();
}

static void teardown(void)
{
    shared_flags_free(flags);
}

static void check_death(int kind, int status)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 40 };
    struct job in[N];
    int out[N][2];
    for (int i = 0; i < N; i++)
        in[i] = (struct job){KIND_OK, i};
    in[17].kind = kind;
    pp_error err;
    int rc = pp_map(pool, run, in, N, sizeof in[0], out, sizeof out[0], 4, &err);
    cr_assert_eq(rc, PP_ECRASH, "rc %d", rc);
    cr_assert_eq(err.index, 17);
    cr_assert_eq(err.failed, 1);
    cr_assert_eq(err.status, status, "status %d", err.status);
    cr_assert_neq(err.message[0], '\0');
    for (int i = 0; i < N; i++)
        if (i != 17)
            cr_assert_eq(out[i][0], 2 * i, "item %d", i);
    /* The pool is whole again: both workers answer. */
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_eq(st.crashed, 1);
    cr_assert_eq(st.respawned, 1);
    cr_assert_eq(pp_map(pool, run, in, 16, sizeof in[0], out, sizeof out[0], 1, NULL), 0);
    pp_pool_free(pool);
}

Test(crash, sigkill_fails_one_item, .timeout = PP_TEST_TIMEOUT(30))
{
    check_death(KIND_KILL, SIGKILL);
}

Test(crash, sigsegv_fails_one_item, .timeout = PP_TEST_TIMEOUT(30))
{
    check_death(KIND_SEGV, SIGSEGV);
}

Test(crash, abort_fails_one_item, .timeout = PP_TEST_TIMEOUT(30))
{
    check_death(KIND_ABORT, SIGABRT);
}

Test(crash, exit_fails_one_item, .timeout = PP_TEST_TIMEOUT(30))
{
    check_death(KIND_EXIT, 3);
}

Test(crash, chunk_keeps_finished_and_reruns_unstarted, .timeout = PP_TEST_TIMEOUT(30))
{
    /* One chunk of 10 items; item 4 kills its worker. Items 0-3 keep their
     * results from the dead worker; items 5-9 run on the replacement. */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    struct job in[10];
    int out[10][2];
    memset(out, 0, sizeof out);
    for (int i = 0; i < 10; i++)
        in[i] = (struct job){i == 4 ? KIND_KILL : KIND_OK, i};
    pp_error err;
    cr_assert_eq(pp_map(pool, run, in, 10, sizeof in[0], out, sizeof out[0], 10, &err), PP_ECRASH);
    cr_assert_eq(err.index, 4);
    cr_assert_eq(err.failed, 1);
    for (int i = 0; i < 10; i++)
        if (i != 4)
            cr_assert_eq(out[i][0], 2 * i, "item %d", i);
    pp_pool_free(pool);
}

Test(crash, replacement_keeps_worker_id, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 3});
    for (int round = 0; round < 6; round++) {
        struct job kill = {KIND_KILL, 0};
        int out[2];
        cr_assert_eq(pp_apply(pool, run, &kill, sizeof kill, out, sizeof out, NULL), PP_ECRASH);
    }
    struct job in[60];
    int out[60][2];
    for (int i = 0; i < 60; i++)
        in[i] = (struct job){KIND_OK, i};
    cr_assert_eq(pp_map(pool, run, in, 60, sizeof in[0], out, sizeof out[0], 1, NULL), 0);
    for (int i = 0; i < 60; i++)
        cr_assert(out[i][1] >= 0 && out[i][1] < 3, "worker id %d", out[i][1]);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.workers, 3);
    cr_assert_eq(st.respawned, 6);
    pp_pool_free(pool);
}

Test(crash, hard_timeout_kills_and_replaces, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .task_timeout = 0.2});
    struct job in[8];
    int out[8][2];
    for (int i = 0; i < 8; i++)
        in[i] = (struct job){i == 3 ? KIND_HANG : KIND_OK, i};
    pp_error err;
    cr_assert_eq(pp_map(pool, run, in, 8, sizeof in[0], out, sizeof out[0], 2, &err), PP_ETIMEOUT);
    cr_assert_eq(err.index, 3);
    cr_assert_eq(err.status, SIGKILL);
    cr_assert_eq(err.failed, 1);
    for (int i = 0; i < 8; i++)
        if (i != 3)
            cr_assert_eq(out[i][0], 2 * i);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.timed_out, 1);
    cr_assert_eq(pp_map(pool, run, in, 3, sizeof in[0], out, sizeof out[0], 1, NULL), 0);
    pp_pool_free(pool);
}

Test(crash, idle_worker_never_waits_behind_busy_one, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    /* Worker A holds a long task; everything queued after it must still run
     * on the other worker, even if it had been dealt to A's inbox. */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct job hold = {KIND_WAIT, 1};
    pp_async *a = pp_apply_async(pool, run, &hold, sizeof hold, 2 * sizeof(int), NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    enum { N = 200 };
    struct job in[N];
    int out[N][2];
    for (int i = 0; i < N; i++)
        in[i] = (struct job){KIND_OK, i};
    /* Submitted async so the inboxes fill while A is held. */
    pp_async *b = pp_map_async(pool, run, in, N, sizeof in[0], sizeof out[0], 1, NULL, NULL, NULL);
    cr_assert_eq(pp_async_get(b, out, -1, NULL), 0);
    cr_assert_eq(pp_async_ready(a), false);
    atomic_store(&flags->release, 1);
    int held[2];
    cr_assert_eq(pp_async_get(a, held, -1, NULL), 0);
    cr_assert_eq(held[0], 2);
    pp_async_free(a);
    pp_async_free(b);
    pp_pool_free(pool);
}

static char proc_state(int pid)
{
    char path[64], buf[512] = {0};
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = '\0';
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' ? p[2] : 0;
}

/* A worker stopped (SIGSTOP) while idle claims nothing: what the parent
 * deals to it is taken back and run by the other worker, and the map ends.
 * No task_timeout is set, and none could fire: the stopped worker runs no
 * task. */
Test(crash, work_dealt_to_a_stopped_idle_worker_runs_elsewhere, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    int kids[4];
    cr_assert_eq(live_children_of(pool_zygote(), kids, 4), 2);
    cr_assert_eq(kill(kids[0], SIGSTOP), 0);
    while (proc_state(kids[0]) != 'T')
        usleep(1000); /* polling a condition; the test's .timeout is the deadline */
    enum { N = 2 };   /* one each: the stopped worker's is its only entry */
    struct job in[N];
    int out[N][2];
    for (int i = 0; i < N; i++)
        in[i] = (struct job){KIND_OK, i};
    cr_assert_eq(pp_map(pool, run, in, N, sizeof *in, out, sizeof out[0], 1, NULL), 0);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(out[i][0], i * 2, "item %d: %d", i, out[i][0]);
        cr_assert_eq(out[i][1], out[0][1], "item %d ran on worker %d and %d", i, out[0][1],
                     out[i][1]);
    }
    kill(kids[0], SIGCONT);
    pp_pool_free(pool);
}
