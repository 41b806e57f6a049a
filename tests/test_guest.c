/* A good guest in the caller's process: stdio, signals, parent death, leftovers. */
#include "helpers.h"
#include "proc_helpers.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <procpool.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    *(int *)result = x * x;
    return 0;
}

static int own_pid(const void *arg, void *result)
{
    (void)arg;
    *(int *)result = getpid();
    return 0;
}

#define flags (*shared_flags_slot()) /* seen by spawned workers too */

static void setup(void)
{
    flags = shared_flags_new();
}

static void teardown(void)
{
    shared_flags_free(flags);
}

static int hold(const void *arg, void *result)
{
    (void)arg;
    atomic_fetch_add(&flags->started, 1);
    wait_flag(&flags->release, 1);
    *(int *)result = 1;
    return 0;
}

/* Runs fn in a child whose stdout is a pipe; returns what it printed. */
static char *capture_child(void (*fn)(void))
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        fn();
        exit(0); /* flushes stdio, as a normal program ends */
    }
    close(p[1]);
    static char buf[4096];
    size_t len = 0;
    ssize_t got;
    while ((got = read(p[0], buf + len, sizeof buf - 1 - len)) > 0)
        len += (size_t)got;
    buf[len] = '\0';
    close(p[0]);
    int status;
    waitpid(pid, &status, 0);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return buf;
}

static void buffered_then_pool(void)
{
    printf("buffered-before-fork;"); /* a pipe: fully buffered, not yet written */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 3, .max_tasks_per_child = 1});
    int in[12], out[12];
    for (int i = 0; i < 12; i++)
        in[i] = i;
    pp_map(pool, square, in, 12, sizeof(int), out, sizeof(int), 1, NULL);
    pp_pool_free(pool);
}

Test(guest, stdio_buffered_before_fork_appears_once, .timeout = PP_TEST_TIMEOUT(30))
{
    char *out = capture_child(buffered_then_pool);
    char *first = strstr(out, "buffered-before-fork;");
    cr_assert_not_null(first);
    cr_assert_null(strstr(first + 1, "buffered-before-fork;"), "printed twice: %s", out);
}

static int print_in_task(const void *arg, void *result)
{
    (void)result;
    printf("task-%d;", *(const int *)arg); /* buffered in the worker */
    return 0;
}

static void task_output(void)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    int in[4] = {0, 1, 2, 3};
    pp_map(pool, print_in_task, in, 4, sizeof(int), NULL, 0, 1, NULL);
    pp_close(pool);
    pp_join(pool);
    pp_pool_free(pool);
}

Test(guest, task_output_is_not_lost, .timeout = PP_TEST_TIMEOUT(30))
{
    char *out = capture_child(task_output);
    for (int i = 0; i < 4; i++) {
        char want[16];
        snprintf(want, sizeof want, "task-%d;", i);
        cr_assert_not_null(strstr(out, want), "missing %s in %s", want, out);
    }
}

Test(guest, nothing_left_after_free, .timeout = PP_TEST_TIMEOUT(60))
{
    /* The shared arena is the process's, not the pool's: make it first. */
    void *arena = pp_shm_alloc(64);
    cr_assert_not_null(arena);
    int fds = count_fds(), threads = count_threads();
    for (int round = 0; round < 20; round++) {
        pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .task_timeout = 5});
        int in[100], out[100];
        for (int i = 0; i < 100; i++)
            in[i] = i;
        cr_assert_eq(pp_map(pool, square, in, 100, sizeof(int), out, sizeof(int), 0, NULL), 0);
        if (round % 2)
            pp_close(pool); /* half the rounds close, half let free terminate */
        pp_pool_free(pool);
        cr_assert_eq(count_children(), 0, "round %d", round);
        cr_assert_eq(count_fds(), fds, "round %d", round);
        cr_assert_eq(count_threads(), threads, "round %d", round);
        cr_assert_eq(count_mappings_named("procpool-ctl"), 0, "round %d", round);
    }
    pp_shm_free(arena);
}

Test(guest, installs_no_signal_handler, .timeout = PP_TEST_TIMEOUT(30))
{
    struct sigaction before[65], after;
    for (int sig = 1; sig < 65; sig++)
        sigaction(sig, NULL, &before[sig]);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .task_timeout = 1});
    int x = 3, y;
    cr_assert_eq(pp_apply(pool, square, &x, sizeof x, &y, sizeof y, NULL), 0);
    for (int sig = 1; sig < 65; sig++) {
        if (sig >= 32 && sig < SIGRTMIN)
            continue; /* glibc's own (thread cancellation, setxid) */
        sigaction(sig, NULL, &after);
        cr_assert_eq(after.sa_handler, before[sig].sa_handler, "signal %d", sig);
    }
    pp_pool_free(pool);
}

/* The helper blocks SIGCHLD in itself to read it from a signalfd: tasks
 * must still run with the signal mask of the thread that made the pool. */
static int blocked_signals(const void *arg, void *result)
{
    (void)arg;
    sigset_t mask;
    sigprocmask(SIG_SETMASK, NULL, &mask);
    int *out = result;
    out[0] = sigismember(&mask, SIGCHLD);
    out[1] = sigismember(&mask, SIGUSR1);
    return 0;
}

Test(guest, tasks_run_with_the_callers_signal_mask, .timeout = PP_TEST_TIMEOUT(30))
{
    sigset_t usr1, old;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, &old);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    cr_assert_not_null(pool);
    int out[2];
    cr_assert_eq(pp_apply(pool, blocked_signals, NULL, 0, out, sizeof out, NULL), 0);
    cr_assert_eq(out[0], 0, "SIGCHLD is blocked in the worker");
    cr_assert_eq(out[1], 1, "the caller's mask was not inherited");
    pp_pool_free(pool);
}

/* The pool's processes under `parent`: the zygote is its child, the
 * workers are the zygote's. False if they are not all there within 10 s. */
static bool wait_for_pids(int parent, int *pids, int *n)
{
    double give_up = now_s() + 10;
    int z[4];
    *n = 0;
    while (children_of(parent, z, 4) < 1)
        if (now_s() > give_up)
            return false;
        else
            usleep(1000);
    pids[(*n)++] = z[0];
    int w[64];
    int got;
    while ((got = children_of(z[0], w, 64)) < 2)
        if (now_s() > give_up)
            return false;
        else
            usleep(1000);
    for (int i = 0; i < got; i++)
        pids[(*n)++] = w[i];
    return true;
}

static bool flag_within(_Atomic int *flag, int value, double seconds)
{
    double give_up = now_s() + seconds;
    while (atomic_load(flag) < value)
        if (now_s() > give_up)
            return false;
        else
            usleep(200);
    return true;
}

Test(guest, workers_die_with_a_killed_parent, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pid_t child = th_fork(); /* dies with the test, and the pool with it */
    if (child == 0) {
        pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
        pp_async *a = pp_apply_async(pool, hold, NULL, 0, sizeof(int), NULL, NULL, NULL);
        (void)a;
        for (;;)
            pause(); /* killed by the test */
    }
    int pids[70], n;
    bool found = wait_for_pids(child, pids, &n);
    bool running = found && flag_within(&flags->started, 1, 10); /* a worker is inside a task */
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    cr_assert(found, "the pool's zygote and workers did not appear within 10 s");
    cr_assert(running, "the task did not start within 10 s");
    cr_assert(wait_all_dead(pids, n, 1.0), "a process of the pool outlived its parent by 1 s");
}

Test(guest, sigint_to_workers_is_ignored, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    int pids[2];
    cr_assert_eq(pp_map(pool, own_pid, NULL, 2, 0, pids, sizeof(int), 1, NULL), 0);
    pp_async *a = pp_apply_async(pool, hold, NULL, 0, sizeof(int), NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    int z[4], w[8];
    cr_assert_eq(children_of(getpid(), z, 4), 1);
    int nw = children_of(z[0], w, 8);
    cr_assert_eq(nw, 2);
    /* What Ctrl-C would send; the parent decides, not the workers. */
    kill(z[0], SIGINT);
    for (int i = 0; i < nw; i++)
        kill(w[i], SIGINT);
    atomic_store(&flags->release, 1);
    int r;
    cr_assert_eq(pp_async_get(a, &r, -1, NULL), 0);
    cr_assert_eq(r, 1);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.crashed, 0);
    cr_assert_eq(st.respawned, 0);
    pp_async_free(a);
    pp_pool_free(pool);
}

static int fork_and_block(const void *arg, void *result)
{
    (void)arg;
    (void)result;
    signal(SIGTERM, SIG_IGN);
    pid_t grandchild = fork();
    if (grandchild == 0) {
        signal(SIGTERM, SIG_IGN);
        for (;;)
            pause();
    }
    flags->pids[0] = grandchild;
    atomic_fetch_add(&flags->started, 1);
    while (!atomic_load(&flags->release)) /* never set: only a kill ends it */
        pause();
    return 0;
}

Test(guest, terminate_ends_a_stubborn_task_and_its_children, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    pp_async *a = pp_apply_async(pool, fork_and_block, NULL, 0, 0, NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    int z[4], w[4];
    children_of(getpid(), z, 4);
    cr_assert_eq(children_of(z[0], w, 4), 1);
    int pids[2] = {w[0], flags->pids[0]};
    cr_assert(process_alive(pids[1]));
    cr_assert_eq(pp_terminate(pool), 0);
    cr_assert_eq(pp_async_get(a, NULL, -1, NULL), PP_ECLOSED);
    cr_assert_eq(pp_join(pool), 0);
    cr_assert(wait_all_dead(pids, 2, 1.0), "the task or its child survived terminate");
    pp_async_free(a);
    pp_pool_free(pool);
}

/* The tids of this process's threads, at most `max`. */
static int thread_ids(int *out, int max)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    struct dirent *e;
    while (d != NULL && (e = readdir(d)) != NULL && n < max)
        if (e->d_name[0] != '.')
            out[n++] = atoi(e->d_name);
    if (d != NULL)
        closedir(d);
    return n;
}

static long voluntary_switches(int tid)
{
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/self/task/%d/status", tid);
    FILE *f = fopen(path, "r");
    long v = -1;
    while (f != NULL && fgets(line, sizeof line, f))
        sscanf(line, "voluntary_ctxt_switches: %ld", &v);
    if (f != NULL)
        fclose(f);
    return v;
}

static int add_one(const void *arg, void *result)
{
    *(int *)result = *(const int *)arg + 1;
    return 0;
}

/* A loop of blocking calls does not wake the library thread once per call
 * (it naps while a caller pumps; it used to park while the caller waited,
 * be woken when the wait ended, find the next call begun, park again: a
 * context switch per call, and 25 us instead of 1.2 per pp_apply). */
Test(guest, the_library_thread_sleeps_through_a_loop_of_blocking_calls,
     .timeout = PP_TEST_TIMEOUT(60))
{
    int before[64], after[64];
    int nb = thread_ids(before, 64);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    int na = thread_ids(after, 64), lib = -1;
    for (int i = 0; i < na; i++) {
        bool old = false;
        for (int j = 0; j < nb; j++)
            old = old || after[i] == before[j];
        if (!old)
            lib = after[i];
    }
    cr_assert_gt(lib, 0, "the library thread was not found");
    enum { CALLS = 20000 };
    long s0 = voluntary_switches(lib);
    for (int i = 0; i < CALLS; i++) {
        int r = 0;
        cr_assert_eq(pp_apply(pool, add_one, &i, sizeof i, &r, sizeof r, NULL), 0);
        cr_assert_eq(r, i + 1);
    }
    long woken = voluntary_switches(lib) - s0;
    /* It looks every millisecond while the caller pumps: two switches per
     * millisecond of the loop (40-80 here under ASan); woken per call, it
     * slept 3,000-6,000 times. The bound scales under memcheck. */
    cr_assert_lt(woken, CALLS / 40 * (long)slow_factor(), "the library thread slept %ld times",
                 woken);
    pp_pool_free(pool);
}
