/*
 * crash: what happens when tasks go wrong, where Python's Pool would hang.
 *
 * With multiprocessing.Pool, a worker killed in the middle of a task (a
 * segfault in a C extension, abort(), the OOM killer) is replaced, but its
 * task is never reported: pool.map() waits forever. A task that hangs makes
 * map() hang too; Pool has no per-task timeout.
 *
 * Here one map has an item that dereferences NULL, one that calls abort(),
 * one that fails with pp_fail() and one that never finishes. Every other
 * result arrives; the four failures come back as PP_ECRASH (the signal in
 * `status`), PP_ETASK (the task's status and message) and PP_ETIMEOUT; the
 * dead and killed workers are replaced and the pool keeps working. Exits
 * non-zero on any unexpected outcome.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

enum mode { WORK, SEGFAULT, ABORT, FAIL, HANG };

struct job {
    int x;
    enum mode mode;
    const int *ptr; /* read by a SEGFAULT item: NULL there */
};

static void sleep_ms(long ms)
{
    nanosleep(&(struct timespec){.tv_sec = ms / 1000, .tv_nsec = ms % 1000 * 1000000}, NULL);
}

static int task(const void *arg, void *result)
{
    const struct job *j = arg;
    switch (j->mode) {
    case WORK:
        break;
    case SEGFAULT:
        *(int *)result = *j->ptr; /* a NULL pointer: SIGSEGV kills this worker */
        break;
    case ABORT:
        abort(); /* SIGABRT, as a failed assert() would */
    case FAIL:
        return pp_fail(42, "cannot handle x = %d", j->x); /* an ordinary error */
    case HANG:
        for (;;)
            sleep_ms(1000); /* never ends: past task_timeout the worker is killed */
    }
    sleep_ms(20);
    *(int *)result = j->x * j->x;
    return 0;
}

/* The initializer runs once in every worker (the replacements too): no core
 * files from the workers we crash on purpose. */
static int no_core_dumps(void *unused)
{
    (void)unused;
    return setrlimit(RLIMIT_CORE, &(struct rlimit){0, 0}) == 0 ? 0 : 1;
}

static int status; /* the exit status: 1 once anything unexpected happened */

/* Records an unexpected outcome, saying what it was. */
static void expect(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "crash: unexpected: %s\n", what);
        status = 1;
    }
}

static const char *code_name(int code)
{
    switch (code) {
    case 0:
        return "ok";
    case PP_ETASK:
        return "PP_ETASK";
    case PP_ECRASH:
        return "PP_ECRASH";
    case PP_ETIMEOUT:
        return "PP_ETIMEOUT";
    }
    return pp_strerror(code);
}

enum { N = 8 };
static const int expect_code[N] = {0, 0, PP_ECRASH, PP_ETASK, 0, PP_ETIMEOUT, PP_ECRASH, 0};
static const int expect_status[N] = {0, 0, SIGSEGV, 42, 0, SIGKILL, SIGABRT, 0};

int main(int argc, char **argv)
{
    /* The limit is short so the tour stays quick. Under valgrind a dying
     * worker takes seconds to exit (its leak check scans the pool's
     * mappings), which a short limit would report as PP_ETIMEOUT: run
     * `valgrind ./crash 10` there. */
    double task_timeout = argc > 1 ? strtod(argv[1], NULL) : 0.25;
    if (!(task_timeout > 0)) {
        fprintf(stderr, "usage: %s [task_timeout_seconds]\n", argv[0]);
        return 2;
    }

    struct job jobs[N];
    for (int i = 0; i < N; i++)
        jobs[i] = (struct job){.x = i + 1, .mode = WORK};
    jobs[2].mode = SEGFAULT;
    jobs[3].mode = FAIL;
    jobs[5].mode = HANG;
    jobs[6].mode = ABORT;

    pp_pool *pool = pp_pool_new(
        &(pp_options){.workers = 2, .task_timeout = task_timeout, .initializer = no_core_dumps});
    if (pool == NULL) {
        perror("pp_pool_new");
        return 1;
    }

    /* 1. pp_map: it returns (Python's would not), with every good result. */
    int results[N];
    for (int i = 0; i < N; i++)
        results[i] = -1; /* a failed item's slot is left as it was */
    pp_error err;
    int rc = pp_map(pool, task, jobs, N, sizeof jobs[0], results, sizeof results[0], 1, &err);
    printf("pp_map returned %s: %zu of %d items failed, the first at index %zu (%s)\n",
           code_name(rc), err.failed, N, err.index, err.message);
    expect(rc == PP_ECRASH && err.code == PP_ECRASH && err.index == 2 && err.failed == 4 &&
               err.status == SIGSEGV,
           "pp_map's code or pp_error");
    printf("results:");
    for (int i = 0; i < N; i++) {
        if (results[i] >= 0)
            printf(" %d", results[i]);
        else
            printf(" -");
        if (expect_code[i] == 0)
            expect(results[i] == (i + 1) * (i + 1), "a good item's result");
        else
            expect(results[i] == -1, "a failed item's result slot was written");
    }
    printf("\n");

    /* 2. pp_imap reports each failed item in its place, and goes on. */
    printf("each item, through pp_imap:\n");
    pp_iter *it = pp_imap(pool, task, jobs, N, sizeof jobs[0], sizeof(int), 1);
    if (it == NULL) {
        perror("pp_imap");
        status = 1;
    }
    for (size_t count = 0; it != NULL; count++) {
        int result = -1;
        size_t index;
        rc = pp_iter_next(it, &result, &index, -1, &err);
        if (rc == 0) {
            expect(count == N, "pp_imap's number of items");
            break;
        }
        if (rc == 1) {
            printf("  item %zu: %d\n", index, result);
            expect(index == count && index < N && expect_code[index] == 0 &&
                       result == (int)((index + 1) * (index + 1)),
                   "an item of pp_imap");
        } else {
            printf("  item %zu: %s, status %d: %s\n", err.index, code_name(rc), err.status,
                   err.message);
            expect(err.index == count && err.index < N && rc == expect_code[err.index] &&
                       err.code == rc && err.status == expect_status[err.index],
                   "a failed item of pp_imap");
        }
    }
    pp_iter_free(it);

    /* 3. The dead and killed workers were replaced: the pool still works. */
    for (int i = 0; i < N; i++)
        jobs[i].mode = WORK;
    rc = pp_map(pool, task, jobs, N, sizeof jobs[0], results, sizeof results[0], 0, &err);
    printf("after the failures, pp_map over %d good items: %s\n", N, code_name(rc));
    expect(rc == 0, "pp_map after the failures");
    for (int i = 0; i < N; i++)
        expect(results[i] == (i + 1) * (i + 1), "a result after the failures");

    pp_stats st;
    if ((rc = pp_pool_stats(pool, &st)) != 0) {
        fprintf(stderr, "pp_pool_stats: %s\n", pp_strerror(rc));
        status = 1;
    } else {
        printf("stats: %llu completed, %llu failed, %llu crashed, %llu timed out, "
               "%llu workers replaced, %d alive\n",
               (unsigned long long)st.completed, (unsigned long long)st.failed,
               (unsigned long long)st.crashed, (unsigned long long)st.timed_out,
               (unsigned long long)st.respawned, st.workers);
        /* Two runs with 4 failures each; every death replaced its worker. */
        expect(st.completed == 3 * N - 8 && st.failed == 2 && st.crashed == 4 &&
                   st.timed_out == 2 && st.respawned == 6 && st.workers == 2,
               "pp_pool_stats");
    }

    if ((rc = pp_close(pool)) != 0 || (rc = pp_join(pool)) != 0) {
        fprintf(stderr, "pp_close/pp_join: %s\n", pp_strerror(rc));
        status = 1;
    }
    pp_pool_free(pool);
    return status;
}
