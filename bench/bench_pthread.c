/*
 * bench_pthread: procpool's benchmark workloads on the baselines that need
 * no procpool: `bench_pthread pthread` runs them on the plain pthread pool
 * (pthread_pool.c), `bench_pthread serial` runs the serial loop (workloads
 * 1, 6 and 8 only). Prints harness lines (see harness.h). `bench_pthread
 * pingpong` times a cache line going back and forth between CPU 0 and CPU 1
 * (run.sh prints it before each workload: on a VM it changes from one
 * moment to the next, and every side of workloads 2-5 with it).
 */
#define _GNU_SOURCE
#include "harness.h"
#include "pthread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PINGS 200000

static alignas(64) _Atomic int ball;

static bool pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
}

static void *pong(void *arg)
{
    (void)arg;
    pin(1); /* checked allowed before */
    for (int i = 0; i < PINGS; i++) {
        while (atomic_load_explicit(&ball, memory_order_acquire) != 2 * i + 1)
            ;
        atomic_store_explicit(&ball, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

/* Prints `I pingpong_ns <round trip>`; nothing unless CPUs 0 and 1 are
 * both ours to run on. */
static int pingpong(void)
{
    cpu_set_t mine;
    pthread_t t;
    if (sched_getaffinity(0, sizeof mine, &mine) != 0 || !CPU_ISSET(0, &mine) ||
        !CPU_ISSET(1, &mine) || !pin(0) || pthread_create(&t, NULL, pong, NULL))
        return 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < PINGS; i++) {
        atomic_store_explicit(&ball, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&ball, memory_order_acquire) != 2 * i + 2)
            ;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    printf("I\tpingpong_ns\t%.0f\n",
           ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / PINGS);
    return 0;
}

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

/* A batch map on the thread pool, as a C programmer would write it: one
 * task per chunk (CPython's chunk count, 4 per worker), each calling the
 * batch function over its chunk. */
struct chunk_arg {
    bench_batch_fn *fn;
    const char *args;
    char *results;
    size_t count;
};

static int run_chunk(const void *arg, void *result)
{
    const struct chunk_arg *c = arg;
    *(int *)result = c->fn(c->args, c->results, c->count);
    return *(int *)result;
}

static int tp_map_batch_(void *pool, bench_batch_fn *fn, const void *args, size_t n,
                         size_t arg_size, void *results, size_t result_size, size_t chunksize)
{
    size_t per = 4 * (size_t)tp_pool_workers(pool);
    if (chunksize == 0)
        chunksize = (n + per - 1) / per;
    size_t nchunks = (n + chunksize - 1) / chunksize;
    struct chunk_arg *c = malloc(nchunks * sizeof *c);
    int *rcs = malloc(nchunks * sizeof *rcs);
    int rc = c && rcs ? 0 : -1;
    for (size_t k = 0; rc == 0 && k < nchunks; k++) {
        size_t from = k * chunksize;
        c[k] = (struct chunk_arg){fn, (const char *)args + from * arg_size,
                                  (char *)results + from * result_size,
                                  n - from < chunksize ? n - from : chunksize};
    }
    if (rc == 0)
        rc = tp_map(pool, run_chunk, c, nchunks, sizeof *c, rcs, sizeof *rcs, 1);
    free(c);
    free(rcs);
    return rc;
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

/* The serial loop of a batch task: one call over every item. */
static int serial_map_batch(void *pool, bench_batch_fn *fn, const void *args, size_t n,
                            size_t arg_size, void *results, size_t result_size, size_t chunksize)
{
    (void)pool;
    (void)arg_size;
    (void)result_size;
    (void)chunksize;
    return fn(args, results, n);
}

int main(int argc, char **argv)
{
    static const bench_backend pthread_side = {
        .side = "pthread",
        .pool_new = tp_new,
        .close_join = tp_cj,
        .pool_free = tp_free,
        .map = tp_map_,
        .map_batch = tp_map_batch_,
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
        .map_batch = serial_map_batch,
        .big_alloc = heap_alloc,
        .big_free = heap_free,
    };
    if (argc >= 2 && strcmp(argv[1], "pingpong") == 0)
        return pingpong();
    if (argc < 2 || (strcmp(argv[1], "pthread") && strcmp(argv[1], "serial"))) {
        fprintf(stderr, "usage: %s pthread|serial|pingpong\n", argv[0]);
        return 2;
    }
    return bench_main(strcmp(argv[1], "serial") ? &pthread_side : &serial_side, argc, argv);
}
