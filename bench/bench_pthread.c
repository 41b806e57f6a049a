/*
 * bench_pthread: procpool's benchmark workloads on the baselines that need
 * no procpool: `bench_pthread pthread` runs them on the plain pthread pool
 * (pthread_pool.c), `bench_pthread serial` runs the serial loop (workloads
 * 1, 6 and 8 only). Prints harness lines (see harness.h).
 */
#define _GNU_SOURCE
#include "harness.h"
#include "pthread_pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *tp_new(int workers)
{
    return tp_pool_new(workers);
}

static int tp_cj(void *pool)
{
    return tp_close_join(pool);
}

static void tp_free(void *pool)
{
    tp_pool_free(pool);
}

static int tp_map_(void *pool, bench_fn *fn, const void *args, size_t n, size_t arg_size,
                   void *results, size_t result_size, size_t chunksize)
{
    return tp_map(pool, fn, args, n, arg_size, results, result_size, chunksize);
}

static int tp_apply_(void *pool, bench_fn *fn, const void *arg, size_t arg_size, void *result,
                     size_t result_size)
{
    return tp_apply(pool, fn, arg, arg_size, result, result_size);
}

static void *tp_apply_async_(void *pool, bench_fn *fn, const void *arg, size_t arg_size,
                             size_t result_size)
{
    return tp_apply_async(pool, fn, arg, arg_size, result_size);
}

static int tp_get(void *a, void *result)
{
    return tp_async_get(a, result);
}

static void tp_afree(void *a)
{
    tp_async_free(a);
}

static void *tp_imap_(void *pool, bench_fn *fn, const void *args, size_t n, size_t arg_size,
                      size_t result_size, size_t chunksize, bool ordered)
{
    return tp_imap(pool, fn, args, n, arg_size, result_size, chunksize, ordered);
}

static int tp_next(void *it, void *result, size_t *index)
{
    return tp_iter_next(it, result, index);
}

static void tp_ifree(void *it)
{
    tp_iter_free(it);
}

static void *heap_alloc(size_t bytes)
{
    return malloc(bytes);
}

static void heap_free(void *p, size_t bytes)
{
    (void)bytes;
    free(p);
}

/* The serial loop: the same task function, called through a pointer for
 * each item in turn, in the calling thread. */
static int serial_map(void *pool, bench_fn *fn, const void *args, size_t n, size_t arg_size,
                      void *results, size_t result_size, size_t chunksize)
{
    (void)pool;
    (void)chunksize;
    bench_fn *volatile call = fn; /* keep it a call per item, as on every other side */
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        int x = call((const char *)args + i * arg_size, (char *)results + i * result_size);
        if (x && !rc)
            rc = x;
    }
    return rc;
}

int main(int argc, char **argv)
{
    static const bench_backend pthread_side = {
        .side = "pthread",
        .pool_new = tp_new,
        .close_join = tp_cj,
        .pool_free = tp_free,
        .map = tp_map_,
        .apply = tp_apply_,
        .apply_async = tp_apply_async_,
        .async_get = tp_get,
        .async_free = tp_afree,
        .imap = tp_imap_,
        .iter_next = tp_next,
        .iter_free = tp_ifree,
        .big_alloc = heap_alloc,
        .big_free = heap_free,
    };
    static const bench_backend serial_side = {
        .side = "serial",
        .serial = true,
        .map = serial_map,
        .big_alloc = heap_alloc,
        .big_free = heap_free,
    };
    if (argc < 2 || (strcmp(argv[1], "pthread") && strcmp(argv[1], "serial"))) {
        fprintf(stderr, "usage: %s pthread|serial\n", argv[0]);
        return 2;
    }
    return bench_main(strcmp(argv[1], "serial") ? &pthread_side : &serial_side, argc, argv);
}
