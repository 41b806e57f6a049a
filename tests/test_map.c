/* pp_map, pp_apply and starmap: results, order, chunking, errors, bad input. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <procpool.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    *(int *)result = x * x;
    return 0;
}

struct power_args {
    long base, exponent;
};

static int cube(const void *arg, void *result)
{
    const struct power_args *a = arg;
    long r = 1;
    for (long i = 0; i < a->exponent; i++)
        r *= a->base;
    *(long *)result = r;
    return 0;
}

static int fail_on_multiples_of_7(const void *arg, void *result)
{
    int x = *(const int *)arg;
    if (x % 7 == 0)
        return pp_fail(100 + x, "item %d is a multiple of 7", x);
    *(int *)result = x + 1;
    return 0;
}

static int report_worker(const void *arg, void *result)
{
    (void)arg;
    *(int *)result = pp_worker_id();
    return 0;
}

static int fail_without_message(const void *arg, void *result)
{
    (void)arg;
    (void)result;
    return 5;
}

Test(map, squares_in_input_order, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    enum { N = 10000 };
    int *in = malloc(N * sizeof *in), *out = malloc(N * sizeof *out);
    for (int i = 0; i < N; i++)
        in[i] = i;
    for (size_t chunk = 0; chunk <= 7; chunk += 7) { /* default rule and an explicit size */
        memset(out, 0xff, N * sizeof *out);
        pp_error err;
        cr_assert_eq(pp_map(pool, square, in, N, sizeof(int), out, sizeof(int), chunk, &err), 0);
        cr_assert_eq(err.code, 0);
        for (int i = 0; i < N; i++)
            cr_assert_eq(out[i], i * i, "item %d", i);
    }
    free(in);
    free(out);
    pp_pool_free(pool);
}

Test(map, starmap_over_structs, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
    struct power_args data[] = {{2, 2}, {3, 3}, {4, 4}};
    long out[3];
    cr_assert_eq(pp_map(pool, cube, data, 3, sizeof data[0], out, sizeof out[0], 0, NULL), 0);
    cr_assert_eq(out[0], 4);
    cr_assert_eq(out[1], 27);
    cr_assert_eq(out[2], 256);
    pp_pool_free(pool);
}

Test(map, apply_one_call, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int x = 12, y = 0;
    cr_assert_eq(pp_apply(pool, square, &x, sizeof x, &y, sizeof y, NULL), 0);
    cr_assert_eq(y, 144);
    pp_error err;
    cr_assert_eq(pp_apply(pool, fail_without_message, &x, sizeof x, &y, sizeof y, &err), PP_ETASK);
    cr_assert_eq(err.status, 5);
    cr_assert_str_eq(err.message, "task returned 5");
    pp_pool_free(pool);
}

Test(map, failures_keep_every_other_result, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 100 };
    int in[N], out[N];
    for (int i = 0; i < N; i++)
        in[i] = i + 1; /* 7, 14, ... 98 fail: 14 items */
    pp_error err;
    int rc = pp_map(pool, fail_on_multiples_of_7, in, N, sizeof(int), out, sizeof(int), 3, &err);
    cr_assert_eq(rc, PP_ETASK);
    cr_assert_eq(err.code, PP_ETASK);
    cr_assert_eq(err.index, 6, "lowest failing index, got %zu", err.index);
    cr_assert_eq(err.status, 107);
    cr_assert_eq(err.failed, 14);
    cr_assert_str_eq(err.message, "item 7 is a multiple of 7");
    for (int i = 0; i < N; i++)
        if (in[i] % 7 != 0)
            cr_assert_eq(out[i], in[i] + 1, "item %d", i);
    /* err may be NULL. */
    cr_assert_eq(
        pp_map(pool, fail_on_multiples_of_7, in, N, sizeof(int), out, sizeof(int), 0, NULL),
        PP_ETASK);
    pp_pool_free(pool);
}

/* Writes its result, then fails on multiples of 7. */
static int write_then_fail_on_7s(const void *arg, void *result)
{
    int x = *(const int *)arg;
    *(int *)result = -x;
    return x % 7 == 0 ? pp_fail(1, "item %d", x) : 0;
}

/* A failed item's slot: left as it was in the caller's own memory; in the
 * arena, which workers write in place, it holds what the task wrote. */
Test(map, a_failed_items_slot_is_kept_except_in_the_arena, .timeout = PP_TEST_TIMEOUT(30))
{
    enum { N = 100 };
    int *arena = pp_shm_alloc(N * sizeof(int));
    cr_assert_not_null(arena);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    int in[N], own[N];
    for (int i = 0; i < N; i++) {
        in[i] = i + 1;
        own[i] = arena[i] = 12345;
    }
    for (size_t chunk = 1; chunk <= 16; chunk *= 4) {
        cr_assert_eq(
            pp_map(pool, write_then_fail_on_7s, in, N, sizeof(int), own, sizeof(int), chunk, NULL),
            PP_ETASK);
        cr_assert_eq(pp_map(pool, write_then_fail_on_7s, in, N, sizeof(int), arena, sizeof(int),
                            chunk, NULL),
                     PP_ETASK);
        for (int i = 0; i < N; i++) {
            cr_assert_eq(own[i], in[i] % 7 ? -in[i] : 12345, "item %d, chunks of %zu", i, chunk);
            cr_assert_eq(arena[i], -in[i], "item %d, chunks of %zu", i, chunk);
        }
    }
    pp_pool_free(pool);
    pp_shm_free(arena);
}

Test(map, empty_and_zero_sized, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_eq(pp_map(pool, square, NULL, 0, sizeof(int), NULL, sizeof(int), 0, NULL), 0);
    /* No arguments and no results at all: the task still runs n times. */
    int ids[8];
    cr_assert_eq(pp_map(pool, report_worker, NULL, 8, 0, ids, sizeof(int), 1, NULL), 0);
    for (int i = 0; i < 8; i++)
        cr_assert(ids[i] == 0 || ids[i] == 1);
    pp_pool_free(pool);
}

Test(map, worker_ids_and_default_size, .timeout = PP_TEST_TIMEOUT(30))
{
    cr_assert_eq(pp_worker_id(), -1);
    pp_pool *pool = pp_pool_new(NULL);
    cr_assert_not_null(pool);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_eq(st.workers, (int)sysconf(_SC_NPROCESSORS_ONLN));
    pp_pool_free(pool);
}

Test(map, large_chunks_through_payload_area, .timeout = PP_TEST_TIMEOUT(60))
{
    /* Chunks far larger than an inbox entry travel through payload blocks. */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 1 << 20 };
    int *in = malloc(N * sizeof *in), *out = calloc(N, sizeof *out);
    for (int i = 0; i < N; i++)
        in[i] = i & 0x7fff;
    cr_assert_eq(pp_map(pool, square, in, N, sizeof(int), out, sizeof(int), 0, NULL), 0);
    for (int i = 0; i < N; i++)
        cr_assert_eq(out[i], in[i] * in[i]);
    free(in);
    free(out);
    pp_pool_free(pool);
}

Test(map, bad_input_is_einval_and_pool_stays_usable, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int x = 3, y = 0;
    cr_assert_eq(pp_map(NULL, square, &x, 1, sizeof x, &y, sizeof y, 0, NULL), -EINVAL);
    cr_assert_eq(pp_map(pool, NULL, &x, 1, sizeof x, &y, sizeof y, 0, NULL), -EINVAL);
    cr_assert_eq(pp_map(pool, square, NULL, 1, sizeof x, &y, sizeof y, 0, NULL), -EINVAL);
    cr_assert_eq(pp_map(pool, square, &x, 1, sizeof x, NULL, sizeof y, 0, NULL), -EINVAL);
    cr_assert_eq(pp_map(pool, square, &x, SIZE_MAX / 2, 4, &y, 4, 0, NULL), -EINVAL);
    cr_assert_eq(pp_apply(NULL, square, &x, sizeof x, &y, sizeof y, NULL), -EINVAL);
    cr_assert_eq(pp_apply(pool, NULL, &x, sizeof x, &y, sizeof y, NULL), -EINVAL);
    cr_assert_eq(pp_apply(pool, square, NULL, sizeof x, &y, sizeof y, NULL), -EINVAL);
    cr_assert_eq(pp_apply(pool, square, &x, sizeof x, NULL, sizeof y, NULL), -EINVAL);
    errno = 0;
    cr_assert_null(pp_pool_new(&(pp_options){.workers = -1}));
    cr_assert_eq(errno, EINVAL);
    cr_assert_null(pp_pool_new(&(pp_options){.task_timeout = -1}));
    cr_assert_eq(errno, EINVAL);
    cr_assert_eq(pp_close(NULL), -EINVAL);
    cr_assert_eq(pp_join(NULL), -EINVAL);
    cr_assert_eq(pp_terminate(NULL), -EINVAL);
    cr_assert_eq(pp_pool_stats(NULL, NULL), -EINVAL);
    pp_pool_free(NULL);
    cr_assert_eq(pp_apply(pool, square, &x, sizeof x, &y, sizeof y, NULL), 0);
    cr_assert_eq(y, 9);
    pp_pool_free(pool);
}

static int hold_until_released(const void *arg, void *result)
{
    _Atomic int *release = *(_Atomic int *const *)arg;
    wait_flag(release, 1);
    *(int *)result = 1;
    return 0;
}

/* err as it was never written: a message with no end, a code nobody uses. */
static void scribble(pp_error *err)
{
    memset(err, 0x5a, sizeof *err);
}

/* A failing call fills err even when it fails as a whole, no item to
 * blame; a call that ends with nothing failed zeroes it. */
Test(map, a_call_refused_as_a_whole_still_fills_err, .timeout = PP_TEST_TIMEOUT(30))
{
    _Atomic int *release = pp_shm_alloc(sizeof *release); /* the arena: every worker's too */
    cr_assert_not_null(release);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int x[3] = {1, 2, 3}, y[3];
    pp_error err;
    scribble(&err);
    cr_assert_eq(pp_map(NULL, square, x, 3, sizeof x[0], y, sizeof y[0], 0, &err), -EINVAL);
    cr_assert_eq(err.code, -EINVAL);
    cr_assert_eq(err.failed, 3);
    cr_assert(memchr(err.message, 0, sizeof err.message) && strstr(err.message, "nothing ran"),
              "%.40s", err.message);
    scribble(&err);
    cr_assert_eq(pp_apply(pool, square, x, sizeof x[0], NULL, sizeof y[0], &err), -EINVAL);
    cr_assert_eq(err.code, -EINVAL);

    pp_async *a = pp_apply_async(pool, hold_until_released, &release, sizeof release, sizeof y[0],
                                 NULL, NULL, NULL);
    scribble(&err);
    cr_assert_eq(pp_async_get(a, y, 0.01, &err), -ETIMEDOUT);
    cr_assert_eq(err.code, -ETIMEDOUT);
    cr_assert_eq(err.failed, 0);
    cr_assert(strstr(err.message, "goes on"), "%.40s", err.message);
    scribble(&err);
    cr_assert_eq(pp_async_get(a, NULL, 0, &err), -EINVAL);
    cr_assert_eq(err.code, -EINVAL);
    pp_iter *it = pp_imap(pool, square, x, 3, sizeof x[0], sizeof y[0], 1);
    scribble(&err);
    cr_assert_eq(pp_iter_next(it, y, NULL, 0.01, &err), -ETIMEDOUT, "the worker is held");
    cr_assert_eq(err.code, -ETIMEDOUT);
    atomic_store(release, 1);
    cr_assert_eq(pp_async_get(a, y, -1, &err), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pp_iter_next(it, y, NULL, -1, &err), 1);
    scribble(&err);
    cr_assert_eq(pp_iter_next(it, y, NULL, -1, &err), 0);
    cr_assert_eq(err.code, 0, "the end zeroes it");
    cr_assert_eq(err.message[0], 0);
    pp_iter_free(it);
    pp_async_free(a);

    pp_close(pool);
    scribble(&err);
    cr_assert_eq(pp_map(pool, square, x, 3, sizeof x[0], y, sizeof y[0], 0, &err), PP_ECLOSED);
    cr_assert_eq(err.code, PP_ECLOSED);
    cr_assert_eq(err.failed, 3, "none ran");
    cr_assert(strstr(err.message, "closed"), "%.40s", err.message);
    scribble(&err);
    cr_assert_eq(pp_apply(pool, square, x, sizeof x[0], y, sizeof y[0], &err), PP_ECLOSED);
    cr_assert_eq(err.code, PP_ECLOSED);
    cr_assert_eq(err.failed, 1);
    pp_pool_free(pool);
    pp_shm_free(release);
}

Test(map, strerror_names_every_code, .timeout = PP_TEST_TIMEOUT(10))
{
    int codes[] = {PP_ETASK,     PP_ECRASH,  PP_ETIMEOUT, PP_ECLOSED,  PP_EOWNERDEAD,
                   PP_ECANCELED, PP_EBROKEN, PP_ESPAWN,   PP_ENOTFOUND};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        cr_assert_str_neq(pp_strerror(codes[i]), "unknown procpool error code");
        for (size_t j = 0; j < i; j++)
            cr_assert_str_neq(pp_strerror(codes[i]), pp_strerror(codes[j]));
    }
    cr_assert_str_eq(pp_strerror(-EINVAL), strerror(EINVAL));
    cr_assert_str_eq(pp_strerror(0), "success");
    cr_assert_str_eq(pp_strerror(-20000), "unknown procpool error code");
}

static int overflow_on_9(const void *arg, void *result)
{
    int x = *(const int *)arg;
    /* result_size is 4: item 9 writes 24 bytes, past its slot. */
    memset(result, 0x5a, x == 9 ? 24 : 4);
    if (x != 9)
        *(int *)result = x;
    return 0;
}

static int overflow_on_70(const void *arg, void *result)
{
    int x = *(const int *)arg;
    memset(result, 0x5a, x == 70 ? 24 : 4);
    if (x != 70)
        *(int *)result = x;
    return 0;
}

/* Inside an entry of up to 16 items, an item that writes past its result
 * lands on the next item's result: the worker sees it, reports that item
 * alone, and the items after it run on clean bytes. */
Test(map, overrun_inside_a_chunk_fails_only_that_item, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    enum { N = 100 };
    int in[N], out[N];
    for (int i = 0; i < N; i++)
        in[i] = i;
    for (size_t chunk = 1; chunk <= 16; chunk *= 16) { /* 1: several chunks per entry */
        pp_error err;
        memset(out, 0, sizeof out);
        cr_assert_eq(
            pp_map(pool, overflow_on_70, in, N, sizeof(int), out, sizeof(int), chunk, &err),
            -EOVERFLOW, "chunk %zu", chunk);
        cr_assert_eq(err.index, 70, "chunk %zu: item %zu failed: %s", chunk, err.index,
                     err.message);
        cr_assert_eq(err.failed, 1, "chunk %zu: %zu failed", chunk, err.failed);
        for (int i = 0; i < N; i++)
            if (i != 70)
                cr_assert_eq(out[i], i, "chunk %zu, item %d", chunk, i);
    }
    pp_pool_free(pool);
}

/* The parent skips rewriting a guard it found intact in the same place:
 * that must neither miss an overrun in a reused inbox buffer nor report
 * one after the guard was broken and the buffer is used again. */
Test(map, overrun_in_a_reused_inline_buffer_is_reported, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    enum { N = 100 }; /* more than the 64 entries of an inbox: buffers are reused */
    int in[N], out[N];
    for (int i = 0; i < N; i++)
        in[i] = i;
    pp_error err;
    for (int round = 0; round < 2; round++) {
        cr_assert_eq(pp_map(pool, overflow_on_70, in, N, sizeof(int), out, sizeof(int), 1, &err),
                     -EOVERFLOW);
        cr_assert_eq(err.index, 70);
        cr_assert_eq(err.failed, 1, "only the item that overran fails");
        for (int i = 0; i < N; i++)
            if (i != 70)
                cr_assert_eq(out[i], i);
        cr_assert_eq(pp_map(pool, square, in, N, sizeof(int), out, sizeof(int), 1, &err), 0,
                     "round %d: %s", round, err.message);
        for (int i = 0; i < N; i++)
            cr_assert_eq(out[i], i * i);
    }
    pp_pool_free(pool);
}

Test(map, writing_past_result_size_is_reported, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    int in[10], out[10];
    for (int i = 0; i < 10; i++)
        in[i] = i;
    pp_error err;
    /* Chunks of one: only the item that overran fails, the others keep theirs. */
    cr_assert_eq(pp_map(pool, overflow_on_9, in, 10, sizeof(int), out, sizeof(int), 1, &err),
                 -EOVERFLOW);
    cr_assert_eq(err.index, 9);
    cr_assert_eq(err.failed, 1);
    cr_assert(strstr(err.message, "result_size") != NULL, "%s", err.message);
    for (int i = 0; i < 9; i++)
        cr_assert_eq(out[i], i);
    /* In one chunk of ten too: the worker checks the bytes past each result. */
    memset(out, 0, sizeof out);
    cr_assert_eq(pp_map(pool, overflow_on_9, in, 10, sizeof(int), out, sizeof(int), 10, &err),
                 -EOVERFLOW);
    cr_assert_eq(err.index, 9);
    cr_assert_eq(err.failed, 1);
    for (int i = 0; i < 9; i++)
        cr_assert_eq(out[i], i);
    /* The next call's arguments were not touched by it. */
    cr_assert_eq(pp_map(pool, square, in, 9, sizeof(int), out, sizeof(int), 3, NULL), 0);
    for (int i = 0; i < 9; i++)
        cr_assert_eq(out[i], i * i);
    pp_pool_free(pool);
}

/* Caller and workers on one CPU (they inherit the caller's affinity): each
 * side sees the other there and hands it the CPU at every turn instead of
 * spinning (pool.c spin_for_activity, worker.c wait_for_work). Round trips,
 * a map and async work all complete, with every result right. */
Test(map, a_pool_confined_to_one_cpu_works, .timeout = PP_TEST_TIMEOUT(60))
{
    cpu_set_t was, one;
    cr_assert_eq(sched_getaffinity(0, sizeof was, &was), 0);
    CPU_ZERO(&one);
    CPU_SET(sched_getcpu(), &one);
    cr_assert_eq(sched_setaffinity(0, sizeof one, &one), 0);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    for (int i = 0; i < 2000; i++) {
        int r = 0;
        cr_assert_eq(pp_apply(pool, square, &i, sizeof i, &r, sizeof r, NULL), 0);
        cr_assert_eq(r, i * i);
    }
    enum { N = 5000 };
    int in[N], out[N];
    for (int i = 0; i < N; i++)
        in[i] = i;
    cr_assert_eq(pp_map(pool, square, in, N, sizeof(int), out, sizeof(int), 1, NULL), 0);
    pp_async *a[64];
    for (int i = 0; i < 64; i++)
        a[i] = pp_apply_async(pool, square, &in[i], sizeof(int), sizeof(int), NULL, NULL, NULL);
    for (int i = 0; i < 64; i++) {
        cr_assert_eq(out[i], i * i);
        int r;
        cr_assert_eq(pp_async_get(a[i], &r, -1, NULL), 0);
        cr_assert_eq(r, i * i);
        pp_async_free(a[i]);
    }
    for (int i = 0; i < N; i++)
        cr_assert_eq(out[i], i * i, "item %d", i);
    pp_pool_free(pool);
    sched_setaffinity(0, sizeof was, &was);
}
