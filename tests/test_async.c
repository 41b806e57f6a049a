/* pp_apply_async / pp_map_async: callbacks, get/wait/ready/successful, timeouts. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <procpool.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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

static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    if (x < 0)
        return pp_fail(-x, "negative input %d", x);
    *(int *)result = x * x;
    return 0;
}

static int held(const void *arg, void *result)
{
    (void)arg;
    atomic_fetch_add(&flags->started, 1);
    wait_flag(&flags->release, 1);
    *(int *)result = 7;
    return 0;
}

struct seen {
    pthread_mutex_t mu;
    int calls, errors, last, last_status;
    size_t n;
    int sum;
    pthread_t thread;
    pp_pool *pool;
    int nested_rc;
};

static void on_result(const void *result, void *userdata)
{
    struct seen *s = userdata;
    pthread_mutex_lock(&s->mu);
    s->calls++;
    s->last = *(const int *)result;
    s->thread = pthread_self();
    pthread_mutex_unlock(&s->mu);
}

static void on_map_result(const void *result, void *userdata)
{
    struct seen *s = userdata;
    const int *r = result;
    for (size_t i = 0; i < s->n; i++)
        s->sum += r[i];
    s->calls++;
}

static void on_error(const pp_error *err, void *userdata)
{
    struct seen *s = userdata;
    pthread_mutex_lock(&s->mu);
    s->errors++;
    s->last_status = err->status;
    pthread_mutex_unlock(&s->mu);
}

Test(async, apply_async_callback_runs_before_ready, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct seen s = {.mu = PTHREAD_MUTEX_INITIALIZER};
    int x = 3;
    pp_async *a = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), on_result, on_error, &s);
    cr_assert_not_null(a);
    x = 1000; /* the argument was copied at submission */
    int r = 0;
    cr_assert_eq(pp_async_get(a, &r, -1, NULL), 0);
    cr_assert_eq(r, 9);
    /* The callback returned before the result became ready. */
    cr_assert_eq(s.calls, 1);
    cr_assert_eq(s.last, 9);
    cr_assert_eq(s.errors, 0);
    cr_assert(!pthread_equal(s.thread, pthread_self()), "callbacks run on the library thread");
    cr_assert(pp_async_ready(a));
    cr_assert(pp_async_successful(a));
    pp_async_free(a);
    pp_pool_free(pool);
}

Test(async, error_callback_gets_the_failure, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    struct seen s = {.mu = PTHREAD_MUTEX_INITIALIZER};
    int x = -4;
    pp_async *a = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), on_result, on_error, &s);
    int r;
    pp_error err;
    cr_assert_eq(pp_async_get(a, &r, -1, &err), PP_ETASK);
    cr_assert_eq(err.status, 4);
    cr_assert_str_eq(err.message, "negative input -4");
    cr_assert_eq(s.errors, 1);
    cr_assert_eq(s.calls, 0);
    cr_assert_eq(s.last_status, 4);
    cr_assert(pp_async_ready(a));
    cr_assert(!pp_async_successful(a));
    pp_async_free(a);
    pp_pool_free(pool);
}

Test(async, map_async_with_callback, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 1000 };
    int in[N], out[N];
    long expect = 0;
    for (int i = 0; i < N; i++) {
        in[i] = i % 100;
        expect += in[i] * in[i];
    }
    struct seen s = {.mu = PTHREAD_MUTEX_INITIALIZER, .n = N};
    pp_async *a =
        pp_map_async(pool, square, in, N, sizeof(int), sizeof(int), 0, on_map_result, NULL, &s);
    memset(in, 0, sizeof in); /* copied at submission */
    cr_assert_eq(pp_async_get(a, out, -1, NULL), 0);
    cr_assert_eq(s.calls, 1);
    cr_assert_eq(s.sum, expect);
    for (int i = 0; i < N; i++)
        cr_assert_eq(out[i], (i % 100) * (i % 100));
    pp_async_free(a);
    pp_pool_free(pool);
}

Test(async, wait_and_get_time_out_then_succeed, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    pp_async *a = pp_apply_async(pool, held, NULL, 0, sizeof(int), NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    int r = 0;
    cr_assert_eq(pp_async_wait(a, 0), -ETIMEDOUT);
    cr_assert_eq(pp_async_wait(a, 0.05), -ETIMEDOUT);
    cr_assert_eq(pp_async_get(a, &r, 0.05, NULL), -ETIMEDOUT);
    cr_assert(!pp_async_ready(a));
    cr_assert(!pp_async_successful(a));
    atomic_store(&flags->release, 1);
    cr_assert_eq(pp_async_wait(a, -1), 0);
    cr_assert_eq(pp_async_get(a, &r, 0, NULL), 0);
    cr_assert_eq(r, 7);
    pp_async_free(a);
    pp_pool_free(pool);
}

/* Results seen by callbacks, for tests that make no call while they wait. */
static _Atomic int results_seen;

static void count_result(const void *result, void *userdata)
{
    (void)result;
    (void)userdata;
    atomic_fetch_add(&results_seen, 1);
    flag_wake(&results_seen);
}

/* Gets and frees n handles of square(i), i = 0..n-1, checking each result. */
static void get_squares(pp_async **v, int n)
{
    for (int i = 0; i < n; i++) {
        int r = -1;
        cr_assert_eq(pp_async_get(v[i], &r, -1, NULL), 0);
        cr_assert_eq(r, i * i);
        pp_async_free(v[i]);
    }
}

Test(async, a_burst_of_submissions_resolves_with_no_further_call, .timeout = PP_TEST_TIMEOUT(30))
{
    /* Most submissions deal by the parent's books and collect nothing
     * (pp__pump_submit), up to 8 per worker in a row: what they dealt must
     * still come back, callbacks and all, while the caller makes no other
     * call. Two workers with a short burst, eight with one of 60 (more than
     * the 16 of two workers, fewer than the 64 of eight). */
    static const struct {
        int workers, n;
    } bursts[] = {{2, 5}, {8, 60}};
    for (size_t b = 0; b < sizeof bursts / sizeof bursts[0]; b++) {
        pp_pool *pool = pp_pool_new(&(pp_options){.workers = bursts[b].workers});
        cr_assert_not_null(pool);
        atomic_store(&results_seen, 0);
        pp_async *v[60];
        int n = bursts[b].n;
        for (int i = 0; i < n; i++) {
            v[i] =
                pp_apply_async(pool, square, &i, sizeof i, sizeof(int), count_result, NULL, NULL);
            cr_assert_not_null(v[i]);
        }
        flag_wait_ge(&results_seen, n); /* a callback runs just before its job is ready */
        get_squares(v, n);
        pp_pool_free(pool);
    }
}

static int mark_started(const void *arg, void *result)
{
    (void)arg;
    atomic_fetch_add(&flags->started, 1);
    *(int *)result = 1;
    return 0;
}

Test(async, a_paced_submission_loop_collects_what_finished, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    /* A loop that submits every few hundred microseconds keeps the library
     * thread out of its way (the caller pumps); its own submissions must
     * collect what finished, within QUICK_PUMPS_MAX_NS (100 us) of the last
     * collect, not only every 64th submission as 8 workers' count alone
     * would (dispatch.c pp__pump_submit). */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 8});
    cr_assert_not_null(pool);
    atomic_store(&results_seen, 0);
    pp_async *a =
        pp_apply_async(pool, mark_started, NULL, 0, sizeof(int), count_result, NULL, NULL);
    cr_assert_not_null(a);
    wait_flag(&flags->started, 1); /* it ran (workers may take a while to start) */
    enum { MAX = 16 };
    pp_async *more[MAX];
    int n = 0;
    /* Gaps of 300 us: the caller counts as pumping (under 1 ms), so only
     * its own submissions can collect; the callback then runs on the
     * library thread, seen at the next turn. */
    while (n < MAX) {
        nanosleep(&(struct timespec){.tv_nsec = 300000}, NULL);
        if (atomic_load(&results_seen) != 0)
            break;
        int x = n;
        more[n] = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), NULL, NULL, NULL);
        cr_assert_not_null(more[n]);
        n++;
    }
    cr_assert_eq(atomic_load(&results_seen), 1, "collected within %d paced submissions", MAX);
    get_squares(more, n);
    pp_async_free(a);
    pp_pool_free(pool);
}

Test(async, a_submission_beside_a_held_task_runs_with_no_further_call, .init = setup,
     .fini = teardown, .timeout = PP_TEST_TIMEOUT(30))
{
    /* One worker holds a task; a job submitted after it must run on the
     * other one, though the caller makes no other call until it has. */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    atomic_store(&results_seen, 0);
    pp_async *a = pp_apply_async(pool, held, NULL, 0, sizeof(int), NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    int x = 6;
    pp_async *b = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), count_result, NULL, NULL);
    flag_wait_ge(&results_seen, 1);
    int r = 0;
    cr_assert_eq(pp_async_get(b, &r, -1, NULL), 0);
    cr_assert_eq(r, 36);
    cr_assert(!pp_async_ready(a));
    atomic_store(&flags->release, 1);
    cr_assert_eq(pp_async_get(a, &r, -1, NULL), 0);
    cr_assert_eq(r, 7);
    pp_async_free(a);
    pp_async_free(b);
    pp_pool_free(pool);
}

Test(async, many_in_flight_then_get_all, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 5000 };
    pp_async **v = malloc(N * sizeof *v);
    for (int i = 0; i < N; i++) {
        v[i] = pp_apply_async(pool, square, &i, sizeof i, sizeof(int), NULL, NULL, NULL);
        cr_assert_not_null(v[i]);
    }
    for (int i = 0; i < N; i++) {
        int r;
        cr_assert_eq(pp_async_get(v[i], &r, -1, NULL), 0);
        cr_assert_eq(r, i * i);
        pp_async_free(v[i]);
    }
    free(v);
    pp_pool_free(pool);
}

static void callback_calls_pool(const void *result, void *userdata)
{
    (void)result;
    struct seen *s = userdata;
    int x = 5, y = 0;
    /* A blocking call from inside a callback must not deadlock. */
    s->nested_rc = pp_apply(s->pool, square, &x, sizeof x, &y, sizeof y, NULL);
    s->last = y;
    pp_async *inner =
        pp_apply_async(s->pool, square, &x, sizeof x, sizeof(int), on_result, NULL, s);
    int r = 0;
    if (pp_async_get(inner, &r, -1, NULL) != 0 || r != 25)
        s->nested_rc = -1;
    pp_async_free(inner);
    s->calls++;
}

Test(async, callback_may_call_the_pool, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct seen s = {.mu = PTHREAD_MUTEX_INITIALIZER, .pool = pool};
    int x = 2;
    pp_async *a =
        pp_apply_async(pool, square, &x, sizeof x, sizeof(int), callback_calls_pool, NULL, &s);
    cr_assert_eq(pp_async_wait(a, -1), 0);
    cr_assert_eq(s.nested_rc, 0);
    cr_assert_eq(s.last, 25);
    cr_assert_eq(s.calls, 2); /* the inner callback ran too, nested */
    pp_async_free(a);
    pp_pool_free(pool);
}

static void callback_terminates(const void *result, void *userdata)
{
    (void)result;
    struct seen *s = userdata;
    s->nested_rc = pp_terminate(s->pool);
    s->calls++;
}

Test(async, callback_may_terminate_the_pool, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct seen s = {.mu = PTHREAD_MUTEX_INITIALIZER, .pool = pool};
    pp_async *hold = pp_apply_async(pool, held, NULL, 0, sizeof(int), NULL, NULL, NULL);
    int x = 2;
    pp_async *a =
        pp_apply_async(pool, square, &x, sizeof x, sizeof(int), callback_terminates, NULL, &s);
    cr_assert_eq(pp_async_wait(a, -1), 0);
    cr_assert_eq(s.nested_rc, 0);
    int r;
    cr_assert_eq(pp_async_get(hold, &r, -1, NULL), PP_ECLOSED);
    cr_assert_eq(pp_join(pool), 0);
    pp_async_free(hold);
    pp_async_free(a);
    pp_pool_free(pool);
}

Test(async, bad_input, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int x = 1;
    errno = 0;
    cr_assert_null(pp_apply_async(NULL, square, &x, sizeof x, 4, NULL, NULL, NULL));
    cr_assert_eq(errno, EINVAL);
    cr_assert_null(pp_apply_async(pool, NULL, &x, sizeof x, 4, NULL, NULL, NULL));
    cr_assert_null(pp_apply_async(pool, square, NULL, sizeof x, 4, NULL, NULL, NULL));
    cr_assert_null(pp_map_async(pool, square, NULL, 3, sizeof x, 4, 0, NULL, NULL, NULL));
    cr_assert_eq(errno, EINVAL);
    cr_assert_eq(pp_async_wait(NULL, 0), -EINVAL);
    cr_assert_eq(pp_async_get(NULL, &x, 0, NULL), -EINVAL);
    cr_assert(!pp_async_ready(NULL));
    cr_assert(!pp_async_successful(NULL));
    pp_async_free(NULL);
    pp_async *a = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), NULL, NULL, NULL);
    cr_assert_eq(pp_async_get(a, NULL, -1, NULL), -EINVAL);
    cr_assert_eq(pp_async_get(a, &x, -1, NULL), 0);
    pp_async_free(a);
    pp_pool_free(pool);
}

Test(async, free_before_ready_is_safe, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    struct seen s = {.mu = PTHREAD_MUTEX_INITIALIZER};
    pp_async *hold = pp_apply_async(pool, held, NULL, 0, sizeof(int), on_result, NULL, &s);
    wait_flag(&flags->started, 1);
    int x = 3;
    pp_async *queued = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), on_result, NULL, &s);
    pp_async_free(queued); /* still queued: cancelled, its callback never runs */
    pp_async_free(hold);   /* running: it finishes, no callback after free */
    atomic_store(&flags->release, 1);
    int y;
    cr_assert_eq(pp_apply(pool, square, &x, sizeof x, &y, sizeof y, NULL), 0);
    cr_assert_eq(y, 9);
    pp_close(pool);
    cr_assert_eq(pp_join(pool), 0);
    cr_assert_eq(s.calls, 0);
    pp_pool_free(pool);
}

static int until_stopped(const void *arg, void *result)
{
    int cooperative = *(const int *)arg;
    atomic_fetch_add(&flags->started, 1);
    while (!pp_task_should_stop())
        usleep(100);
    atomic_fetch_add(&flags->count, 1); /* it saw the request */
    if (!cooperative)
        for (;;)
            pause(); /* ignores it: the worker must be killed */
    *(int *)result = 1;
    return 0;
}

Test(async, cancel_queued_running_and_finished, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int stubborn = 0, x = 3, r;
    pp_async *running = pp_apply_async(pool, until_stopped, &stubborn, sizeof stubborn, sizeof(int),
                                       NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    pp_async *queued = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), NULL, NULL, NULL);
    cr_assert_eq(pp_async_cancel(queued), 0);
    pp_error err;
    cr_assert_eq(pp_async_get(queued, &r, 0, &err), PP_ECANCELED, "a queued task fails at once");
    cr_assert_eq(pp_async_cancel(running), 0);
    cr_assert_eq(pp_async_get(running, &r, -1, &err), PP_ECANCELED);
    cr_assert_eq(atomic_load(&flags->count), 1, "pp_task_should_stop() turned true");
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.cancelled, 2);
    cr_assert_eq(st.respawned, 1, "the stubborn task's worker was killed and replaced");
    cr_assert_eq(st.completed, 0, "the queued task never ran");
    cr_assert_eq(pp_apply(pool, square, &x, sizeof x, &r, sizeof r, NULL), 0);
    cr_assert_eq(r, 9);
    pp_async *done = pp_apply_async(pool, square, &x, sizeof x, sizeof(int), NULL, NULL, NULL);
    cr_assert_eq(pp_async_wait(done, -1), 0);
    cr_assert_eq(pp_async_cancel(done), -EALREADY);
    cr_assert_eq(pp_async_cancel(NULL), -EINVAL);
    pp_async_free(done);
    pp_async_free(queued);
    pp_async_free(running);
    pp_pool_free(pool);
}

Test(async, cancelled_task_may_stop_cooperatively, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int cooperative = 1, r;
    pp_async *a = pp_apply_async(pool, until_stopped, &cooperative, sizeof cooperative, sizeof(int),
                                 NULL, NULL, NULL);
    wait_flag(&flags->started, 1);
    cr_assert_eq(pp_async_cancel(a), 0);
    cr_assert_eq(pp_async_get(a, &r, -1, NULL), PP_ECANCELED);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.respawned, 0, "it returned by itself: no kill");
    cr_assert_eq(st.cancelled, 1);
    pp_async_free(a);
    pp_pool_free(pool);
}

static int soft_limited(const void *arg, void *result)
{
    (void)arg;
    while (!pp_task_should_stop())
        usleep(100);
    *(int *)result = 5;
    return 0;
}

Test(async, soft_timeout_lets_a_task_return_before_the_hard_limit, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool =
        pp_pool_new(&(pp_options){.workers = 1, .task_soft_timeout = 0.05, .task_timeout = 10});
    int r = 0;
    cr_assert_eq(pp_apply(pool, soft_limited, NULL, 0, &r, sizeof r, NULL), 0);
    cr_assert_eq(r, 5);
    cr_assert(!pp_task_should_stop(), "false outside a task");
    pp_pool_free(pool);
}
