/*
 * mpi_test: the MPI backend, run under `mpirun -n 3 mpi_test SCENARIO`.
 *
 * Plain C, not Criterion: Criterion's sandbox forks every test, which does
 * not mix with MPI. Every rank calls pp_pool_new; ranks 1.. serve the pool
 * and end inside it; rank 0 runs the checks and exits non-zero if one fails.
 * Tasks learn which rank runs them from the launcher's environment
 * (OMPI_COMM_WORLD_RANK, PMI_RANK), so results can say where they ran.
 */
#include "procpool.h"

#include <errno.h>
#include <fcntl.h>
#include <mpi.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int failures;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);               \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

#define WORKERS 2 /* per serving rank */

static int env_rank(void)
{
    const char *v = getenv("OMPI_COMM_WORLD_RANK");
    if (v == NULL)
        v = getenv("PMI_RANK");
    return v ? atoi(v) : -1;
}

static int env_size(void)
{
    const char *v = getenv("OMPI_COMM_WORLD_SIZE");
    if (v == NULL)
        v = getenv("PMI_SIZE");
    return v ? atoi(v) : 3;
}

static void sleep_s(double s)
{
    struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

struct out {
    long value;
    int rank;
    int worker;
};

static int square(const void *arg, void *result)
{
    long x = *(const long *)arg;
    struct out *o = result;
    o->value = x * x;
    o->rank = env_rank();
    o->worker = pp_worker_id();
    return 0;
}

static int fail_some(const void *arg, void *result)
{
    long x = *(const long *)arg;
    if (x == 13 || x == 50)
        return pp_fail(7, "bad item %ld on rank %d", x, env_rank());
    return square(arg, result);
}

static int crash_five(const void *arg, void *result)
{
    long x = *(const long *)arg;
    if (x == 5 && env_rank() != 0)
        raise(SIGKILL);
    return square(arg, result);
}

static int sleep_three(const void *arg, void *result)
{
    long x = *(const long *)arg;
    if (x == 3)
        sleep_s(30);
    return square(arg, result);
}

static int slow(const void *arg, void *result)
{
    sleep_s(0.02);
    return square(arg, result);
}

static int slow_on_rank1(const void *arg, void *result)
{
    if (env_rank() == 1)
        sleep_s(0.02);
    return square(arg, result);
}

/* A batch task (pp_map_batch): item 777 kills its worker, item 1500 fails
 * its whole run, item 2500 fails alone (pp_fail_item). */
static int square_run(const void *args, void *results, size_t count)
{
    const long *in = args;
    for (size_t k = 0; k < count; k++) {
        if (in[k] == 777 && env_rank() != 0)
            raise(SIGKILL);
        if (in[k] == 1500)
            return pp_fail(9, "bad run on rank %d", env_rank());
        if (in[k] == 2500)
            pp_fail_item(k, 11, "bad item on rank %d", env_rank());
        else
            square(in + k, (struct out *)results + k);
    }
    return 0;
}

static long *inputs(size_t n)
{
    long *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = (long)i;
    return v;
}

static void check_squares(const struct out *o, size_t n, const char *what)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (o[i].value != (long)(i * i) || o[i].rank <= 0 || o[i].worker < 0 ||
            o[i].worker >= WORKERS)
            bad++;
    if (bad)
        fprintf(stderr, "%s: %zu of %zu results wrong\n", what, bad, n);
    CHECK(bad == 0);
}

/* ---- scenarios (rank 0) ------------------------------------------------------ */

static void t_map(pp_pool *pool)
{
    size_t n = 1000;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    pp_error err;
    CHECK(pp_map(pool, square, in, n, sizeof *in, o, sizeof *o, 0, &err) == 0);
    check_squares(o, n, "map, chunksize 0");
    int seen[64] = {0}, ranks = 0;
    for (size_t i = 0; i < n; i++)
        if (o[i].rank > 0 && o[i].rank < 64 && !seen[o[i].rank]++)
            ranks++;
    CHECK(ranks == env_size() - 1); /* every serving rank took part */
    memset(o, 0, n * sizeof *o);
    CHECK(pp_map(pool, square, in, n, sizeof *in, o, sizeof *o, 7, &err) == 0);
    check_squares(o, n, "map, chunksize 7");
    struct out one;
    long x = 12;
    CHECK(pp_apply(pool, square, &x, sizeof x, &one, sizeof one, &err) == 0);
    CHECK(one.value == 144 && one.rank > 0);
    CHECK(pp_map(pool, square, in, 0, sizeof *in, o, sizeof *o, 0, &err) == 0);
    pp_stats st;
    CHECK(pp_pool_stats(pool, &st) == 0);
    CHECK(st.workers == (env_size() - 1) * WORKERS);
    CHECK(st.completed == 2 * n + 1);
    free(in);
    free(o);
}

static void t_batch(pp_pool *pool)
{
    size_t n = 3000;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    pp_error err;
    CHECK(pp_map_batch(pool, square_run, in, 700, sizeof *in, o, sizeof *o, 0, &err) == 0);
    check_squares(o, 700, "map_batch");
    memset(o, 0, n * sizeof *o);
    /* The death fails item 777 alone (its serving rank runs the rest of
     * that call again one by one); the failed run fails as a whole, and
     * item 2500 alone. */
    CHECK(pp_map_batch(pool, square_run, in, n, sizeof *in, o, sizeof *o, 250, &err) == PP_ECRASH);
    CHECK(err.index == 777 && err.failed >= 3 && err.failed <= 252);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += o[i].value != (long)(i * i) || o[i].rank <= 0;
    CHECK(bad == err.failed && o[777].rank == 0 && o[1500].rank == 0 && o[2500].rank == 0);
    CHECK(o[2499].rank > 0 && o[2501].rank > 0);
    free(in);
    free(o);
}

static atomic_int cb_ok, cb_err;

static void on_ok(const void *result, void *userdata)
{
    const struct out *o = result;
    long x = (long)(intptr_t)userdata;
    if (o->value == x * x && o->rank > 0)
        atomic_fetch_add(&cb_ok, 1);
}

static void on_err(const pp_error *err, void *userdata)
{
    long x = (long)(intptr_t)userdata;
    if (err->code == PP_ETASK && err->status == 7 && (x == 13 || x == 50) &&
        strstr(err->message, "bad item") != NULL)
        atomic_fetch_add(&cb_err, 1);
}

static void t_async(pp_pool *pool)
{
    enum { N = 60 };
    pp_async *a[N];
    for (long x = 0; x < N; x++)
        a[x] = pp_apply_async(pool, fail_some, &x, sizeof x, sizeof(struct out), on_ok, on_err,
                              (void *)(intptr_t)x);
    for (long x = 0; x < N; x++) {
        struct out o;
        pp_error err;
        int rc = pp_async_get(a[x], &o, -1, &err);
        if (x == 13 || x == 50) {
            CHECK(rc == PP_ETASK && err.status == 7 && err.index == 0);
        } else {
            CHECK(rc == 0 && o.value == x * x);
        }
        CHECK(pp_async_ready(a[x]));
        pp_async_free(a[x]);
    }
    CHECK(atomic_load(&cb_ok) == N - 2);
    CHECK(atomic_load(&cb_err) == 2);

    size_t n = 500;
    long *in = inputs(n);
    pp_async *m =
        pp_map_async(pool, square, in, n, sizeof *in, sizeof(struct out), 0, NULL, NULL, NULL);
    CHECK(m != NULL);
    struct out *o = calloc(n, sizeof *o);
    CHECK(pp_async_get(m, o, 60, NULL) == 0);
    check_squares(o, n, "map_async");
    CHECK(pp_async_successful(m));
    pp_async_free(m);
    free(in);
    free(o);
}

static void t_imap(pp_pool *pool)
{
    size_t n = 300;
    long *in = inputs(n);
    for (int ordered = 1; ordered >= 0; ordered--) {
        pp_iter *it =
            ordered ? pp_imap(pool, fail_some, in, n, sizeof *in, sizeof(struct out), 4)
                    : pp_imap_unordered(pool, fail_some, in, n, sizeof *in, sizeof(struct out), 4);
        CHECK(it != NULL);
        char *seen = calloc(n, 1);
        size_t count = 0, expect = 0, failed = 0;
        for (;;) {
            struct out o;
            size_t idx = (size_t)-1;
            pp_error err;
            int rc = pp_iter_next(it, &o, &idx, 60, &err);
            if (rc == 0)
                break;
            if (rc == -ETIMEDOUT) {
                CHECK(!"imap timed out");
                break;
            }
            CHECK(idx < n && !seen[idx]);
            if (idx >= n)
                break;
            seen[idx] = 1;
            count++;
            if (ordered)
                CHECK(idx == expect++);
            if (rc < 0) {
                failed++;
                CHECK(rc == PP_ETASK && err.index == idx && (idx == 13 || idx == 50) &&
                      err.status == 7);
                char want[64];
                snprintf(want, sizeof want, "bad item %zu on rank", idx);
                CHECK(strstr(err.message, want) != NULL);
            } else {
                CHECK(rc == 1 && o.value == (long)(idx * idx) && o.rank > 0);
            }
        }
        CHECK(count == n && failed == 2);
        free(seen);
        pp_iter_free(it);
    }
    free(in);
}

static void t_error(pp_pool *pool)
{
    size_t n = 200;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    pp_error err;
    int rc = pp_map(pool, fail_some, in, n, sizeof *in, o, sizeof *o, 3, &err);
    CHECK(rc == PP_ETASK);
    CHECK(err.code == PP_ETASK && err.index == 13 && err.failed == 2 && err.status == 7);
    CHECK(strstr(err.message, "bad item 13 on rank") != NULL);
    for (size_t i = 0; i < n; i++)
        if (i != 13 && i != 50)
            CHECK(o[i].value == (long)(i * i));
    CHECK(o[13].value == 0 && o[50].value == 0); /* failed slots left as they were */
    /* A function in no loaded object cannot be named to another rank. */
    void *heap = malloc(64);
    rc = pp_map(pool, (pp_fn *)heap, in, 10, sizeof *in, o, sizeof *o, 0, &err);
    CHECK(rc == PP_ENOTFOUND && err.failed == 10 && err.index == 0);
    free(heap);
    free(in);
    free(o);
}

static void t_crash(pp_pool *pool)
{
    size_t n = 40;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    pp_error err;
    int rc = pp_map(pool, crash_five, in, n, sizeof *in, o, sizeof *o, 4, &err);
    CHECK(rc == PP_ECRASH);
    CHECK(err.code == PP_ECRASH && err.index == 5 && err.failed == 1 && err.status == SIGKILL);
    CHECK(strstr(err.message, "signal 9") != NULL);
    for (size_t i = 0; i < n; i++)
        if (i != 5)
            CHECK(o[i].value == (long)(i * i) && o[i].rank > 0);
    /* The dead worker was replaced: the pool still runs everything. */
    memset(o, 0, n * sizeof *o);
    CHECK(pp_map(pool, square, in, n, sizeof *in, o, sizeof *o, 1, &err) == 0);
    check_squares(o, n, "map after a crash");
    free(in);
    free(o);
}

static void t_timeout(pp_pool *pool)
{
    size_t n = 12;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    pp_error err;
    int rc = pp_map(pool, sleep_three, in, n, sizeof *in, o, sizeof *o, 2, &err);
    CHECK(rc == PP_ETIMEOUT);
    CHECK(err.code == PP_ETIMEOUT && err.index == 3 && err.failed == 1);
    for (size_t i = 0; i < n; i++)
        if (i != 3)
            CHECK(o[i].value == (long)(i * i));
    free(in);
    free(o);
}

static atomic_int close_cb;

static void on_close_ok(const void *result, void *userdata)
{
    (void)result;
    (void)userdata;
    atomic_fetch_add(&close_cb, 1);
}

/* Closed with work still queued: join runs all of it. */
static void t_close_queued(pp_pool *pool)
{
    size_t n = 60;
    long *in = inputs(n);
    pp_async *a =
        pp_map_async(pool, slow, in, n, sizeof *in, sizeof(struct out), 1, on_close_ok, NULL, NULL);
    pp_async *b =
        pp_apply_async(pool, slow, &in[7], sizeof *in, sizeof(struct out), on_close_ok, NULL, NULL);
    CHECK(a != NULL && b != NULL);
    CHECK(pp_close(pool) == 0);
    CHECK(pp_apply_async(pool, slow, in, sizeof *in, sizeof(struct out), NULL, NULL, NULL) ==
              NULL &&
          errno == ESHUTDOWN);
    CHECK(pp_join(pool) == 0);
    CHECK(pp_async_ready(a) && pp_async_ready(b));
    CHECK(atomic_load(&close_cb) == 2);
    struct out *o = calloc(n, sizeof *o);
    CHECK(pp_async_get(a, o, 0, NULL) == 0);
    check_squares(o, n, "closed with work queued");
    pp_async_free(a);
    pp_async_free(b);
    free(o);
    free(in);
}

/* Terminated with work queued and running: all of it fails PP_ECLOSED. */
static void t_terminate(pp_pool *pool)
{
    size_t n = 400;
    long *in = inputs(n);
    pp_async *a =
        pp_map_async(pool, slow, in, n, sizeof *in, sizeof(struct out), 1, NULL, NULL, NULL);
    pp_iter *it = pp_imap(pool, slow, in, n, sizeof *in, sizeof(struct out), 1);
    sleep_s(0.2);
    CHECK(pp_terminate(pool) == 0);
    pp_error err;
    struct out *o = calloc(n, sizeof *o);
    CHECK(pp_async_get(a, o, 10, &err) == PP_ECLOSED);
    CHECK(err.code == PP_ECLOSED && err.failed > 0 && err.failed < n);
    size_t closed = 0;
    for (;;) {
        struct out r;
        int rc = pp_iter_next(it, &r, NULL, 10, &err);
        if (rc == 0 || rc == -ETIMEDOUT)
            break;
        closed += rc == PP_ECLOSED;
    }
    CHECK(closed > 0);
    CHECK(pp_join(pool) == 0);
    pp_iter_free(it);
    pp_async_free(a);
    free(o);
    free(in);
}

/* Rank 1 is slow: pulling work, rank 2 runs most of it. */
static void t_balance(pp_pool *pool)
{
    size_t n = 400;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    CHECK(pp_map(pool, slow_on_rank1, in, n, sizeof *in, o, sizeof *o, 1, NULL) == 0);
    check_squares(o, n, "balance");
    size_t by[3] = {0};
    for (size_t i = 0; i < n; i++)
        if (o[i].rank >= 1 && o[i].rank <= 2)
            by[o[i].rank]++;
    printf("balance: rank 1 (slow) ran %zu items, rank 2 ran %zu\n", by[1], by[2]);
    CHECK(by[1] + by[2] == n);
    CHECK(by[2] > 3 * by[1]);
    free(in);
    free(o);
}

/* Large arguments and results: messages past MPI's eager limit, both ways
 * at once (rendezvous sends must not deadlock). */
enum { BIG = 64 * 1024 };
struct big {
    uint32_t v[BIG];
};

static int reverse_big(const void *arg, void *result)
{
    const struct big *a = arg;
    struct big *r = result;
    for (size_t i = 0; i < BIG; i++)
        r->v[i] = a->v[BIG - 1 - i] + 1;
    return 0;
}

static void t_big(pp_pool *pool)
{
    size_t n = 64;
    struct big *in = malloc(n * sizeof *in), *out = calloc(n, sizeof *out);
    for (size_t k = 0; k < n; k++)
        for (size_t i = 0; i < BIG; i++)
            in[k].v[i] = (uint32_t)(k * BIG + i);
    CHECK(pp_map(pool, reverse_big, in, n, sizeof *in, out, sizeof *out, 3, NULL) == 0);
    size_t bad = 0;
    for (size_t k = 0; k < n; k++)
        for (size_t i = 0; i < BIG; i++)
            bad += out[k].v[i] != in[k].v[BIG - 1 - i] + 1;
    CHECK(bad == 0);
    free(in);
    free(out);
}

/* Started without mpirun: one rank, nobody to serve it: a local pool. */
static void t_singleton(pp_pool *pool)
{
    size_t n = 100;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    CHECK(pp_map(pool, square, in, n, sizeof *in, o, sizeof *o, 0, NULL) == 0);
    for (size_t i = 0; i < n; i++)
        CHECK(o[i].value == (long)(i * i) && o[i].worker >= 0 && o[i].worker < WORKERS);
    pp_stats st;
    CHECK(pp_pool_stats(pool, &st) == 0 && st.workers == WORKERS);
    free(in);
    free(o);
}

/* Rank 2's workers break down: after its first chunk, every new worker
 * fails its initializer (max_tasks_per_child = 1 makes new ones), so its
 * local pool gives up (PP_ESPAWN). What it had not run runs on rank 1. */
static char marker[64];

static void remove_marker(void)
{
    unlink(marker);
}

static int broken_on_rank2(void *initarg)
{
    (void)initarg;
    return env_rank() == 2 && access(marker, F_OK) == 0 ? -1 : 0;
}

static int mark_then_square(const void *arg, void *result)
{
    if (env_rank() == 2)
        close(open(marker, O_CREAT | O_WRONLY, 0600));
    return square(arg, result);
}

static void t_broken(pp_pool *pool)
{
    size_t n = 60;
    long *in = inputs(n);
    struct out *o = calloc(n, sizeof *o);
    pp_error err;
    CHECK(pp_map(pool, mark_then_square, in, n, sizeof *in, o, sizeof *o, 1, &err) == 0);
    check_squares(o, n, "a rank broke down");
    size_t by2 = 0;
    for (size_t i = 0; i < n; i++)
        by2 += o[i].rank == 2;
    printf("broken: rank 2 ran %zu items before it broke down\n", by2);
    CHECK(by2 <= WORKERS);
    memset(o, 0, n * sizeof *o);
    CHECK(pp_map(pool, square, in, n, sizeof *in, o, sizeof *o, 1, &err) == 0);
    for (size_t i = 0; i < n; i++)
        CHECK(o[i].rank == 1); /* rank 2 gets nothing more */
    free(in);
    free(o);
}

static int fail_on_rank2(void *initarg)
{
    (void)initarg;
    return env_rank() == 2 ? -1 : 0;
}

/* A source that closes and joins its own pool at item 40 (window 8): the
 * join returns (on MPI it once waited for a wake-up nobody sent), the items
 * run before it keep their results, the later ones fail PP_ECLOSED, and
 * the iteration ends. */
struct joining_source {
    pp_pool *pool;
    long next;
    int join_rc;
};

static int joining_source(void *state, void *arg)
{
    struct joining_source *s = state;
    if (s->next == 40) {
        pp_close(s->pool);
        s->join_rc = pp_join(s->pool);
    }
    if (s->next >= 100)
        return 0;
    *(long *)arg = s->next++;
    return 1;
}

static int plain_square(const void *arg, void *result)
{
    *(long *)result = *(const long *)arg * *(const long *)arg;
    return 0;
}

static void t_source_join(pp_pool *pool)
{
    struct joining_source s = {.pool = pool, .join_rc = 1};
    pp_iter *it = pp_imap_source(pool, plain_square, joining_source, &s, sizeof(long), sizeof(long),
                                 1, 8, true);
    CHECK(it != NULL);
    size_t ran = 0, closed = 0;
    for (size_t idx, want = 0;; want++) {
        long o;
        int rc = pp_iter_next(it, &o, &idx, 60, NULL);
        if (rc == 0 || rc == -ETIMEDOUT) {
            CHECK(rc == 0);
            break;
        }
        CHECK(idx == want);
        CHECK(rc == 1 || rc == PP_ECLOSED);
        if (rc == 1) {
            CHECK(o == (long)(idx * idx));
            ran++;
        } else {
            closed++;
        }
    }
    CHECK(s.join_rc == 0);
    CHECK(ran + closed == 100 && ran >= 40 - 8 && closed > 0);
    pp_iter_free(it);
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "map";
    bool user_init = strcmp(what, "userinit") == 0;
    if (user_init) { /* the program initializes MPI itself */
        int provided;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    }
    pp_options o = {.workers = WORKERS, .backend = PP_BACKEND_MPI};
    if (strcmp(what, "timeout") == 0)
        o.task_timeout = 0.5;
    if (strcmp(what, "broken") == 0) {
        snprintf(marker, sizeof marker, "/tmp/pp-mpi-test-%d", (int)getpid());
        atexit(remove_marker); /* a serving rank ends with exit(0) */
        o.initializer = broken_on_rank2;
        o.max_tasks_per_child = 1;
    }
    if (strcmp(what, "initfail") == 0) { /* rank 2's workers fail their initializer */
        o.initializer = fail_on_rank2;
        errno = 0;
        pp_pool *p = pp_pool_new(&o);
        if (env_size() >= 3)
            CHECK(p == NULL && errno == ECHILD);
        pp_pool_free(p);
        printf("mpi_test initfail: %s\n", failures ? "FAILED" : "ok");
        return failures ? 1 : 0;
    }
    pp_pool *pool = pp_pool_new(&o);
    /* Only rank 0 gets here. */
    if (pool == NULL) {
        fprintf(stderr, "pp_pool_new: %s\n", strerror(errno));
        return 1;
    }
    CHECK(env_rank() <= 0);
    if (strcmp(what, "map") == 0 || user_init)
        t_map(pool);
    else if (strcmp(what, "async") == 0)
        t_async(pool);
    else if (strcmp(what, "imap") == 0)
        t_imap(pool);
    else if (strcmp(what, "error") == 0)
        t_error(pool);
    else if (strcmp(what, "crash") == 0)
        t_crash(pool);
    else if (strcmp(what, "timeout") == 0)
        t_timeout(pool);
    else if (strcmp(what, "close") == 0)
        t_close_queued(pool);
    else if (strcmp(what, "terminate") == 0)
        t_terminate(pool);
    else if (strcmp(what, "balance") == 0)
        t_balance(pool);
    else if (strcmp(what, "singleton") == 0)
        t_singleton(pool);
    else if (strcmp(what, "broken") == 0)
        t_broken(pool);
    else if (strcmp(what, "big") == 0)
        t_big(pool);
    else if (strcmp(what, "batch") == 0)
        t_batch(pool);
    else if (strcmp(what, "sourcejoin") == 0)
        t_source_join(pool);
    else {
        fprintf(stderr, "unknown scenario %s\n", what);
        failures++;
    }
    pp_pool_free(pool);
    /* One MPI pool per run: its serving ranks have ended with it. */
    errno = 0;
    CHECK(pp_pool_new(&o) == NULL && errno == EALREADY);
    if (user_init)
        MPI_Finalize();
    if (failures)
        fprintf(stderr, "mpi_test %s: %d check(s) failed\n", what, failures);
    else
        printf("mpi_test %s: ok\n", what);
    return failures ? 1 : 0;
}
