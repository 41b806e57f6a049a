/* pp_imap, pp_imap_unordered, pp_imap_source: order, failures, timeouts, windows. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <procpool.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define flags (*shared_flags_slot()) /* seen by spawned workers too */

static void setup(void)
{
    flags = shared_flags_new();
}

static void teardown(void)
{
    shared_flags_free(flags);
}

/* Item 0 waits for the test's release; item 13 crashes; item 21 fails. */
static int task(const void *arg, void *result)
{
    int x = *(const int *)arg;
    if (x == 13)
        raise(SIGKILL);
    if (x == 21)
        return pp_fail(21, "twenty-one");
    if (x == -1) {
        atomic_fetch_add(&flags->started, 1);
        wait_flag(&flags->release, 1);
    }
    *(int *)result = x * 10;
    return 0;
}

static void fill(int *in, int n)
{
    for (int i = 0; i < n; i++)
        in[i] = i;
}

Test(iter, imap_in_input_order_with_failures_reported_in_place, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 300 };
    int in[N];
    fill(in, N);
    pp_iter *it = pp_imap(pool, task, in, N, sizeof(int), sizeof(int), 0);
    cr_assert_not_null(it);
    size_t index;
    int r, rc, n = 0;
    pp_error err;
    while ((rc = pp_iter_next(it, &r, &index, -1, &err)) != 0) {
        cr_assert_eq(index, (size_t)n, "in order");
        if (n == 13) {
            cr_assert_eq(rc, PP_ECRASH);
            cr_assert_eq(err.index, 13);
            cr_assert_eq(err.status, SIGKILL);
        } else if (n == 21) {
            cr_assert_eq(rc, PP_ETASK);
            cr_assert_eq(err.status, 21);
            cr_assert_str_eq(err.message, "twenty-one");
        } else {
            cr_assert_eq(rc, 1);
            cr_assert_eq(r, n * 10);
        }
        n++;
    }
    cr_assert_eq(n, N);
    cr_assert_eq(pp_iter_next(it, &r, &index, -1, NULL), 0, "stays at the end");
    pp_iter_free(it);
    pp_pool_free(pool);
}

Test(iter, many_workers_hand_back_every_item_once, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    /* With 8 workers the iterator pumps every 64 items it hands back
     * (8 per worker): the workers must still be fed, in order and out of
     * it, and every item must come back once with its result. */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 8});
    cr_assert_not_null(pool);
    enum { N = 5000 };
    static int in[N];
    for (int i = 0; i < N; i++)
        in[i] = 100 + i; /* none of task's special values */
    for (int ordered = 0; ordered < 2; ordered++) {
        pp_iter *it = ordered ? pp_imap(pool, task, in, N, sizeof(int), sizeof(int), 1)
                              : pp_imap_unordered(pool, task, in, N, sizeof(int), sizeof(int), 1);
        cr_assert_not_null(it);
        static bool seen[N];
        memset(seen, 0, sizeof seen);
        size_t index;
        int r, rc, n = 0;
        while ((rc = pp_iter_next(it, &r, &index, -1, NULL)) != 0) {
            cr_assert_eq(rc, 1);
            cr_assert_lt(index, (size_t)N);
            if (ordered)
                cr_assert_eq(index, (size_t)n, "in order");
            cr_assert(!seen[index], "item %zu twice", index);
            seen[index] = true;
            cr_assert_eq(r, in[index] * 10);
            n++;
        }
        cr_assert_eq(n, N);
        pp_iter_free(it);
    }
    pp_pool_free(pool);
}

Test(iter, unordered_yields_as_results_arrive, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 50 };
    int in[N];
    fill(in, N);
    in[0] = -1; /* item 0 is held until every other item came back */
    pp_iter *it = pp_imap_unordered(pool, task, in, N, sizeof(int), sizeof(int), 1);
    bool seen[N] = {false};
    size_t index;
    int r;
    for (int k = 0; k < N - 1; k++) {
        int rc = pp_iter_next(it, &r, &index, -1, NULL);
        cr_assert(index != 0, "item 0 is still held");
        cr_assert(!seen[index]);
        seen[index] = true;
        if (index == 13)
            cr_assert_eq(rc, PP_ECRASH);
        else if (index == 21)
            cr_assert_eq(rc, PP_ETASK);
        else
            cr_assert_eq(r, in[index] * 10);
    }
    /* In order this would have blocked on item 0 from the start. */
    cr_assert_eq(pp_iter_next(it, &r, &index, 0.01, NULL), -ETIMEDOUT);
    atomic_store(&flags->release, 1);
    cr_assert_eq(pp_iter_next(it, &r, &index, -1, NULL), 1);
    cr_assert_eq(index, 0);
    cr_assert_eq(r, -10);
    cr_assert_eq(pp_iter_next(it, &r, &index, -1, NULL), 0);
    pp_iter_free(it);
    pp_pool_free(pool);
}

Test(iter, next_times_out_and_goes_on, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int in[3] = {-1, 1, 2};
    pp_iter *it = pp_imap(pool, task, in, 3, sizeof(int), sizeof(int), 1);
    int r;
    cr_assert_eq(pp_iter_next(it, &r, NULL, 0, NULL), -ETIMEDOUT);
    cr_assert_eq(pp_iter_next(it, &r, NULL, 0.02, NULL), -ETIMEDOUT);
    atomic_store(&flags->release, 1);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 1);
        cr_assert_eq(r, in[i] * 10);
    }
    cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 0);
    pp_iter_free(it);
    pp_pool_free(pool);
}

struct counter_source {
    long next, end;
    long max_outstanding; /* taken and not handed back, seen by the source */
    long *handed_back;
};

static int count_source(void *state, void *arg)
{
    struct counter_source *s = state;
    if (s->next >= s->end)
        return 0;
    long outstanding = s->next - *s->handed_back;
    if (outstanding > s->max_outstanding)
        s->max_outstanding = outstanding;
    *(int *)arg = (int)(s->next++ % 1000);
    return 1;
}

static int plus_one(const void *arg, void *result)
{
    *(int *)result = *(const int *)arg + 1;
    return 0;
}

Test(iter, source_is_pulled_within_the_window, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    for (int ordered = 0; ordered < 2; ordered++) {
        long handed = 0;
        struct counter_source s = {.end = 20000, .handed_back = &handed};
        pp_iter *it = pp_imap_source(pool, plus_one, count_source, &s, sizeof(int), sizeof(int), 4,
                                     64, ordered);
        cr_assert_not_null(it);
        int r;
        size_t index;
        long sum = 0;
        while (pp_iter_next(it, &r, &index, -1, NULL) == 1) {
            cr_assert_eq(r, (int)(index % 1000) + 1);
            if (ordered)
                cr_assert_eq((long)index, handed);
            handed++;
            sum += r;
        }
        cr_assert_eq(handed, 20000);
        cr_assert(s.max_outstanding < 64, "window held: %ld outstanding", s.max_outstanding);
        pp_iter_free(it);
    }
    pp_pool_free(pool);
}

Test(iter, freeing_early_cancels_the_rest, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 5000 };
    int *in = malloc(N * sizeof *in);
    fill(in, N);
    in[1] = -1; /* holds the only worker: everything after it waits */
    in[13] = in[21] = 1;
    pp_iter *it = pp_imap(pool, task, in, N, sizeof(int), sizeof(int), 1);
    int r;
    cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 1);
    wait_flag(&flags->started, 1);
    pp_iter_free(it);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.queued, 0, "queued %lu run %lu canc %lu sub %lu comp %lu",
                 (unsigned long)st.queued, (unsigned long)st.running, (unsigned long)st.cancelled,
                 (unsigned long)st.submitted, (unsigned long)st.completed);
    cr_assert_eq(st.running, 1);
    cr_assert_eq(st.submitted, st.completed + st.cancelled + st.running);
    cr_assert(st.cancelled > 1000, "cancelled %lu", (unsigned long)st.cancelled);
    atomic_store(&flags->release, 1);
    int x = 4, y;
    cr_assert_eq(pp_apply(pool, task, &x, sizeof x, &y, sizeof y, NULL), 0);
    cr_assert_eq(y, 40);
    free(in);
    pp_pool_free(pool);
}

Test(iter, bad_input, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int x = 1;
    errno = 0;
    cr_assert_null(pp_imap(NULL, task, &x, 1, sizeof x, sizeof x, 1));
    cr_assert_eq(errno, EINVAL);
    cr_assert_null(pp_imap(pool, NULL, &x, 1, sizeof x, sizeof x, 1));
    cr_assert_null(pp_imap_unordered(pool, task, NULL, 1, sizeof x, sizeof x, 1));
    cr_assert_null(pp_imap_source(pool, task, NULL, NULL, sizeof x, sizeof x, 1, 0, true));
    cr_assert_eq(pp_iter_next(NULL, &x, NULL, 0, NULL), -EINVAL);
    pp_iter *it = pp_imap(pool, task, &x, 1, sizeof x, sizeof x, 1);
    cr_assert_eq(pp_iter_next(it, NULL, NULL, -1, NULL), -EINVAL);
    cr_assert_eq(pp_iter_next(it, &x, NULL, -1, NULL), 1);
    cr_assert_eq(x, 10);
    pp_iter_free(it);
    pp_iter_free(NULL);
    pp_pool_free(pool);
}

Test(iter, handles_outlive_the_pool, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int in[4] = {1, 2, 3, 4}, r;
    pp_iter *it = pp_imap(pool, task, in, 4, sizeof(int), sizeof(int), 1);
    pp_async *a = pp_apply_async(pool, task, &in[0], sizeof(int), sizeof(int), NULL, NULL, NULL);
    pp_pool_free(pool); /* terminates: what was unfinished fails PP_ECLOSED */
    int rc;
    while ((rc = pp_iter_next(it, &r, NULL, -1, NULL)) != 0)
        cr_assert(rc == 1 || rc == PP_ECLOSED, "rc %d", rc);
    rc = pp_async_get(a, &r, -1, NULL);
    cr_assert(rc == 0 || rc == PP_ECLOSED);
    pp_iter_free(it);
    pp_async_free(a); /* the last handle releases the pool's memory */
}

/* Item -1 waits until every other item has run; the others count. */
static int last_to_finish(const void *arg, void *result)
{
    int x = *(const int *)arg;
    if (x == -1)
        wait_flag(&flags->count, *(const int *)((const char *)arg + sizeof(int)));
    else
        atomic_fetch_add(&flags->count, 1);
    *(int *)result = x * 10;
    return 0;
}

/* Chunks of one item are dealt several to an inbox entry when many are
 * left: the items of an entry that its worker has not started must go to
 * an idle worker, or a slow item holds back every one behind it. */
Test(iter, a_slow_item_holds_back_no_item_dealt_with_it, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 2000 };
    int(*in)[2] = calloc(N, sizeof *in);
    int *out = calloc(N, sizeof *out);
    for (int i = 0; i < N; i++)
        in[i][0] = i;
    for (int k = 0; k < 3; k++) { /* the slow item first, then in the middle of the stream */
        int slow = (int[]){0, 5, 1001}[k];
        atomic_store(&flags->count, 0);
        in[slow][0] = -1;
        in[slow][1] = N - 1; /* it returns once all the others ran */
        cr_assert_eq(pp_map(pool, last_to_finish, in, N, sizeof *in, out, sizeof *out, 1, NULL), 0);
        for (int i = 0; i < N; i++)
            cr_assert_eq(out[i], i == slow ? -10 : i * 10);
        in[slow][0] = slow;
        /* The same through an unordered iterator. */
        atomic_store(&flags->count, 0);
        in[slow][0] = -1;
        pp_iter *it = pp_imap_unordered(pool, last_to_finish, in, N, sizeof *in, sizeof(int), 1);
        int r, got = 0;
        size_t index;
        while (pp_iter_next(it, &r, &index, -1, NULL) == 1) {
            cr_assert_eq(r, (int)index == slow ? -10 : (int)index * 10);
            got++;
        }
        cr_assert_eq(got, N);
        pp_iter_free(it);
        in[slow][0] = slow;
    }
    free(in);
    free(out);
    pp_pool_free(pool);
}

/* In order, the items before a slow one in the same inbox entry are handed
 * back while it still runs: the parent reads how far the entry got. */
Test(iter, items_before_a_slow_one_are_handed_back_while_it_runs, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 2000 };
    int *in = malloc(N * sizeof *in);
    fill(in, N);
    in[3] = -1; /* held until released */
    pp_iter *it = pp_imap(pool, task, in, N, sizeof(int), sizeof(int), 1);
    int r;
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(pp_iter_next(it, &r, NULL, 10.0 * slow_factor(), NULL), 1,
                     "item %d is held back by the slow item 3", i);
        cr_assert_eq(r, i * 10);
    }
    cr_assert_eq(atomic_load(&flags->release), 0);
    atomic_store(&flags->release, 1);
    for (int i = 3; i < N; i++) {
        int rc = pp_iter_next(it, &r, NULL, -1, NULL);
        if (i == 13)
            cr_assert_eq(rc, PP_ECRASH);
        else if (i == 21)
            cr_assert_eq(rc, PP_ETASK);
        else
            cr_assert_eq(r, in[i] * 10, "item %d", i);
    }
    cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 0);
    pp_iter_free(it);
    free(in);
    pp_pool_free(pool);
}

/* Two slow items on two workers, each waiting for every other item: the
 * third worker must take all the rest from both, whichever of the two holds
 * more entries taken back already (they count for nothing). */
Test(iter, an_idle_worker_takes_from_every_busy_one, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 3});
    enum { N = 600 };
    int(*in)[2] = calloc(N, sizeof *in);
    int *out = calloc(N, sizeof *out);
    for (int i = 0; i < N; i++)
        in[i][0] = i;
    in[0][0] = in[16][0] = -1; /* the first items of the first two entries */
    in[0][1] = in[16][1] = N - 2;
    cr_assert_eq(pp_map(pool, last_to_finish, in, N, sizeof *in, out, sizeof *out, 1, NULL), 0);
    for (int i = 0; i < N; i++)
        cr_assert_eq(out[i], i == 0 || i == 16 ? -10 : i * 10);
    free(in);
    free(out);
    pp_pool_free(pool);
}

/* Fills the item's result_size bytes (its argument says how many) with a
 * pattern of its number: each byte differs, so a result cut short or
 * shifted by one byte shows. */
struct sized {
    int x;
    int size;
};

static unsigned char pattern(int x, int k)
{
    return (unsigned char)(x * 31 + k * 7 + 1);
}

static int fill_sized(const void *arg, void *result)
{
    const struct sized *a = arg;
    for (int k = 0; k < a->size; k++)
        ((unsigned char *)result)[k] = pattern(a->x, k);
    return 0;
}

/* An item handed back copies results of up to 16 bytes without memcpy:
 * every size around those branches comes back whole, and no byte past it
 * is written, in order and unordered. */
Test(iter, results_of_every_size_come_back_whole, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    static const int sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 33, 100};
    enum { N = 50 };
    for (size_t z = 0; z < sizeof sizes / sizeof *sizes; z++) {
        int size = sizes[z];
        struct sized in[N];
        for (int i = 0; i < N; i++)
            in[i] = (struct sized){.x = i, .size = size};
        for (int ordered = 0; ordered < 2; ordered++) {
            pp_iter *it =
                ordered ? pp_imap(pool, fill_sized, in, N, sizeof *in, (size_t)size, 1)
                        : pp_imap_unordered(pool, fill_sized, in, N, sizeof *in, (size_t)size, 1);
            cr_assert_not_null(it);
            unsigned char out[128];
            size_t index;
            int n = 0, rc;
            memset(out, 0xee, sizeof out);
            while ((rc = pp_iter_next(it, out, &index, -1, NULL)) == 1) {
                for (int k = 0; k < size; k++)
                    cr_assert_eq(out[k], pattern((int)index, k), "size %d, item %zu, byte %d", size,
                                 index, k);
                for (int k = size; k < (int)sizeof out; k++)
                    cr_assert_eq(out[k], 0xee, "size %d: byte %d written", size, k);
                n++;
            }
            cr_assert_eq(rc, 0);
            cr_assert_eq(n, N, "size %d", size);
            pp_iter_free(it);
        }
    }
    pp_pool_free(pool);
}

/* Items 3, 4 and 40 fail, with their number in the message; every item
 * counts itself done. */
static int some_fail(const void *arg, void *result)
{
    int x = *(const int *)arg;
    atomic_fetch_add(&flags->count, 1);
    if (x == 3 || x == 4 || x == 40)
        return pp_fail(x, "item %d failed", x);
    *(int *)result = x + 1000;
    return 0;
}

/* Once every item has finished, an iterator hands back runs of them at a
 * time without the pool's lock (iter.c): a failed item among them still
 * comes back in its place with its own message, ordered or not, and the
 * iterator freed with a run half handed back leaks nothing (ASan). */
Test(iter, failures_among_finished_items_keep_their_place, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 64 };
    int in[N];
    fill(in, N);
    for (int ordered = 0; ordered < 2; ordered++) {
        atomic_store(&flags->count, 0);
        pp_iter *it = ordered
                          ? pp_imap(pool, some_fail, in, N, sizeof *in, sizeof(int), 1)
                          : pp_imap_unordered(pool, some_fail, in, N, sizeof *in, sizeof(int), 1);
        cr_assert_not_null(it);
        wait_flag(&flags->count, N);
        bool seen[N] = {false};
        int r, rc, n = 0;
        size_t index;
        pp_error err;
        while ((rc = pp_iter_next(it, &r, &index, -1, &err)) != 0) {
            cr_assert_lt(index, (size_t)N);
            cr_assert(!seen[index], "item %zu twice", index);
            seen[index] = true;
            if (ordered)
                cr_assert_eq(index, (size_t)n, "in order");
            if (index == 3 || index == 4 || index == 40) {
                char want[32];
                snprintf(want, sizeof want, "item %zu failed", index);
                cr_assert_eq(rc, PP_ETASK, "item %zu", index);
                cr_assert_eq(err.index, index);
                cr_assert_eq(err.status, (int)index);
                cr_assert_str_eq(err.message, want);
            } else {
                cr_assert_eq(rc, 1, "item %zu", index);
                cr_assert_eq(r, (int)index + 1000);
                cr_assert_eq(err.code, 0, "a zeroed error for a success");
            }
            n++;
        }
        cr_assert_eq(n, N);
        pp_iter_free(it);
    }
    /* Freed with finished items taken but not all handed back. */
    atomic_store(&flags->count, 0);
    pp_iter *it = pp_imap(pool, some_fail, in, N, sizeof *in, sizeof(int), 1);
    wait_flag(&flags->count, N);
    int r;
    cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 1);
    cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 1);
    pp_iter_free(it);
    pp_pool_free(pool);
}

/* Waits until `started` reaches the pool's two workers: it returns only if
 * both run at once. */
static int meet(const void *arg, void *result)
{
    atomic_fetch_add(&flags->started, 1);
    wait_flag(&flags->started, 2);
    *(int *)result = *(const int *)arg;
    return 0;
}

/* While a caller hands out results, an iterator deals to one worker only
 * (dispatch.c, lean pumps); a caller that waits must still get every
 * worker running before it sleeps: two items that each wait for the other
 * to start finish, in order and unordered. */
Test(iter, items_that_need_every_worker_at_once_all_run, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    int in[2] = {1, 2};
    for (int ordered = 0; ordered < 2; ordered++) {
        atomic_store(&flags->started, 0);
        pp_iter *it = ordered ? pp_imap(pool, meet, in, 2, sizeof *in, sizeof(int), 1)
                              : pp_imap_unordered(pool, meet, in, 2, sizeof *in, sizeof(int), 1);
        cr_assert_not_null(it);
        int r, sum = 0, n = 0;
        while (pp_iter_next(it, &r, NULL, -1, NULL) == 1) {
            sum += r;
            n++;
        }
        cr_assert_eq(n, 2);
        cr_assert_eq(sum, 3);
        pp_iter_free(it);
    }
    pp_pool_free(pool);
}

/* More items than the window (1024 on few workers): most are not taken
 * from the array yet when the pool is closed and joined. pp_join waits for
 * every task, these too, and the iterator then hands every one back. */
static void join_runs_what_the_window_held_back(bool ordered, bool free_pool)
{
    enum { N = 3000 };
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    static int in[N];
    fill(in, N);
    pp_iter *it = ordered
                      ? pp_imap(pool, task, in + 22, N - 22, sizeof(int), sizeof(int), 1)
                      : pp_imap_unordered(pool, task, in + 22, N - 22, sizeof(int), sizeof(int), 1);
    cr_assert_not_null(it);
    cr_assert_eq(pp_close(pool), 0);
    if (free_pool)
        pp_pool_free(pool);
    else
        cr_assert_eq(pp_join(pool), 0);
    static bool seen[N];
    memset(seen, 0, sizeof seen);
    int r, rc, got = 0;
    size_t idx;
    while ((rc = pp_iter_next(it, &r, &idx, 0, NULL)) == 1) {
        cr_assert(idx < N - 22 && !seen[idx], "index %zu", idx);
        cr_assert(!ordered || idx == (size_t)got, "in order");
        cr_assert_eq(r, in[22 + idx] * 10);
        seen[idx] = true;
        got++;
    }
    cr_assert_eq(rc, 0, "%s", pp_strerror(rc));
    cr_assert_eq(got, N - 22);
    pp_iter_free(it);
    if (!free_pool)
        pp_pool_free(pool);
}

Test(iter, join_runs_what_the_window_held_back_in_order, .timeout = PP_TEST_TIMEOUT(60))
{
    join_runs_what_the_window_held_back(true, false);
}

Test(iter, join_runs_what_the_window_held_back_unordered, .timeout = PP_TEST_TIMEOUT(60))
{
    join_runs_what_the_window_held_back(false, false);
}

Test(iter, free_after_close_runs_what_the_window_held_back, .timeout = PP_TEST_TIMEOUT(60))
{
    join_runs_what_the_window_held_back(true, true);
}

/* Terminated (or freed unclosed) while most items are not taken yet:
 * every item still comes back once, run or failed PP_ECLOSED, and the
 * iteration ends. With a task_timeout, whose watch needs the workers' map,
 * which pp_pool_free has released. */
static void stopping_accounts_for_every_item(bool free_pool, bool ordered)
{
    enum { N = 3000 };
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .task_timeout = 60});
    static int in[N];
    for (int i = 0; i < N; i++)
        in[i] = i + 22; /* past the items that crash (13) and fail (21) */
    in[0] = -1;         /* holds a worker until the pool stops */
    pp_iter *it = ordered ? pp_imap(pool, task, in, N, sizeof(int), sizeof(int), 1)
                          : pp_imap_unordered(pool, task, in, N, sizeof(int), sizeof(int), 1);
    wait_flag(&flags->started, 1);
    if (free_pool)
        pp_pool_free(pool);
    else
        pp_terminate(pool);
    static bool seen[N];
    memset(seen, 0, sizeof seen);
    int r, rc, ran = 0, closed = 0, rc0 = 0;
    size_t idx;
    pp_error err;
    while ((rc = pp_iter_next(it, &r, &idx, 10, &err)) != 0) {
        cr_assert(rc == 1 || rc == PP_ECLOSED, "%s", pp_strerror(rc));
        cr_assert(idx < N && !seen[idx], "index %zu", idx);
        cr_assert(!ordered || idx == (size_t)(ran + closed), "in order");
        cr_assert(rc != PP_ECLOSED || (err.code == PP_ECLOSED && err.index == idx));
        cr_assert(rc != 1 || r == in[idx] * 10);
        seen[idx] = true;
        rc0 = idx == 0 ? rc : rc0;
        rc == 1 ? ran++ : closed++;
    }
    cr_assert_eq(ran + closed, N);
    cr_assert_eq(rc0, PP_ECLOSED, "item 0 was still running");
    pp_iter_free(it);
    if (!free_pool)
        pp_pool_free(pool);
}

Test(iter, terminate_accounts_for_items_past_the_window, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    stopping_accounts_for_every_item(false, true);
}

Test(iter, free_accounts_for_items_past_the_window, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    stopping_accounts_for_every_item(true, false);
}
