/*
 * Signals. Ctrl-C sends SIGINT to the whole foreground process group: the
 * parent decides what happens, workers do not die on their own, and if the
 * parent dies of it, its workers go too. A task that blocks every signal
 * and forks a tree of its own still ends, with its tree, on pp_terminate,
 * on task_timeout and on pp_pool_free.
 */
#include "helpers.h"
#include "proc_helpers.h"

#include <criterion/criterion.h>
#include <procpool.h>
#include <sys/prctl.h>

#define flags (*shared_flags_slot()) /* seen by spawned workers too */

static void setup(void)
{
    flags = shared_flags_new();
    cr_assert_eq(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
}

static void teardown(void)
{
    shared_flags_free(flags);
}

static int hold(const void *arg, void *result)
{
    atomic_fetch_add(&flags->started, 1);
    flag_wait_ge(&flags->release, 1);
    *(int *)result = *(const int *)arg + 1;
    return 0;
}

static volatile sig_atomic_t got_sigint;

static void on_sigint(int sig)
{
    (void)sig;
    got_sigint = 1;
}

/* The "terminal": P leads its own process group, as a shell's foreground
 * job does; the test sends SIGINT to that whole group. */
static pid_t start_foreground_job(bool handle)
{
    pid_t p = th_fork();
    if (p == 0) {
        setpgid(0, 0);
        if (handle)
            signal(SIGINT, on_sigint);
        pp_pool *pool = pp_pool_new(&(pp_options){.workers = 3});
        int in[12], out[12];
        for (int i = 0; i < 12; i++)
            in[i] = i;
        int rc = pp_map(pool, hold, in, 12, sizeof(int), out, sizeof(int), 1, NULL);
        pp_stats st;
        pp_pool_stats(pool, &st);
        pp_pool_free(pool);
        int bad = rc != 0 || st.crashed != 0 || st.respawned != 0 || !got_sigint;
        for (int i = 0; i < 12; i++)
            bad |= out[i] != i + 1;
        _exit(bad ? 1 : 0);
    }
    setpgid(p, p); /* both sides, so the group exists when we signal it */
    return p;
}

Test(signals, ctrl_c_parent_handles_it_workers_carry_on, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pid_t p = start_foreground_job(true);
    flag_wait_ge(&flags->started, 3); /* every worker is inside a task */
    cr_assert_eq(kill(-p, SIGINT), 0);
    /* The parent's handler ran; then the tasks finish normally. */
    atomic_store(&flags->release, 1);
    flag_wake(&flags->release);
    cr_assert_eq(th_wait(p), 0, "the map failed, a worker died, or SIGINT never reached P");
    cr_assert(wait_no_descendants(1.0 * slow_factor()));
}

Test(signals, ctrl_c_kills_parent_and_workers_follow, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pid_t p = start_foreground_job(false);
    flag_wait_ge(&flags->started, 3);
    int before[64];
    cr_assert_geq(live_descendants(before, 64), 5); /* P, the helper, 3 workers */
    double t0 = now_s();
    cr_assert_eq(kill(-p, SIGINT), 0);
    cr_assert_eq(th_wait(p), 128 + SIGINT);
    cr_assert(wait_no_descendants(1.0 * slow_factor() - (now_s() - t0)),
              "processes of the pool outlived a parent killed by Ctrl-C by 1 s");
}

/* Blocks every signal it can, forks a child that forks a grandchild (all
 * blocking signals too), records their pids, then never returns. */
static int stubborn_tree(const void *arg, void *result)
{
    (void)arg;
    (void)result;
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    signal(SIGTERM, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    pid_t child = fork();
    if (child == 0) {
        pid_t grandchild = fork();
        if (grandchild == 0) {
            atomic_store(&flags->pids[2], getpid());
            atomic_fetch_add(&flags->started, 1);
            for (;;)
                pause();
        }
        atomic_store(&flags->pids[1], getpid());
        atomic_fetch_add(&flags->started, 1);
        for (;;)
            pause();
    }
    atomic_store(&flags->pids[0], getpid());
    atomic_fetch_add(&flags->started, 1);
    while (!atomic_load(&flags->release)) /* never set: only a kill ends it */
        pause();
    return 0;
}

static void check_tree_ends(int how)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1, .task_timeout = how == 2 ? 0.5 : 0});
    cr_assert_not_null(pool);
    pp_async *a = pp_apply_async(pool, stubborn_tree, NULL, 0, 0, NULL, NULL, NULL);
    flag_wait_ge(&flags->started, 3);
    int pids[3] = {flags->pids[0], flags->pids[1], flags->pids[2]};
    for (int i = 0; i < 3; i++)
        cr_assert(process_alive(pids[i]));
    pp_error err;
    if (how == 0) { /* pp_terminate */
        cr_assert_eq(pp_terminate(pool), 0);
        cr_assert_eq(pp_async_get(a, NULL, -1, &err), PP_ECLOSED);
        cr_assert_eq(pp_join(pool), 0);
    } else if (how == 2) { /* task_timeout */
        cr_assert_eq(pp_async_get(a, NULL, -1, &err), PP_ETIMEOUT);
    }
    pp_async_free(a);
    if (how == 2)
        cr_assert(wait_all_dead(pids, 3, 1.0 * slow_factor()),
                  "the timed-out task's tree survived");
    pp_pool_free(pool); /* how == 1: pp_pool_free alone */
    cr_assert(wait_all_dead(pids, 3, 1.0 * slow_factor()), "the task or its children survived");
    cr_assert(wait_no_descendants(1.0 * slow_factor()));
}

Test(signals, terminate_ends_task_blocking_signals_and_its_tree, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    check_tree_ends(0);
}

Test(signals, pool_free_ends_task_blocking_signals_and_its_tree, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    check_tree_ends(1);
}

Test(signals, timeout_ends_task_blocking_signals_and_its_tree, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    check_tree_ends(2);
}
