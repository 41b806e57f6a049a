/*
 * bench_procpool: procpool's benchmark workloads (bench/harness.c) on
 * procpool itself. Prints harness lines (see harness.h); bench/run.sh puts
 * them in the table beside the other sides.
 *
 * PP_BENCH_START=spawn and PP_BENCH_BACKEND=mpi pass those options to every
 * pool, so that a later column for them is one more line in run.sh.
 */
#define _GNU_SOURCE
#include "harness.h"

#include <procpool.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The arena (pp_shm_alloc) and the pool core land on separate branches;
 * weak references let this program link against a library that has the
 * pool but not the arena yet, and workload 8 then reports an error. */
#pragma weak pp_shm_alloc
#pragma weak pp_shm_free

static pp_options base;

static void report(const char *what, int rc, const pp_error *err)
{
    fprintf(stderr, "bench_procpool: %s: %s (%d)", what, pp_strerror(rc), rc);
    if (err && err->message[0])
        fprintf(stderr, ": item %zu: %s", err->index, err->message);
    fprintf(stderr, "\n");
}

static void *pool_new(int workers)
{
    pp_options o = base;
    o.workers = workers;
    return pp_pool_new(&o);
}

static int close_join(void *pool)
{
    int rc = pp_close(pool);
    if (!rc)
        rc = pp_join(pool);
    return rc;
}

static void pool_free(void *pool)
{
    pp_pool_free(pool);
}

static int map(void *pool, bench_fn *fn, const void *args, size_t n, size_t arg_size, void *results,
               size_t result_size, size_t chunksize)
{
    pp_error err;
    int rc = pp_map(pool, fn, args, n, arg_size, results, result_size, chunksize, &err);
    if (rc)
        report("pp_map", rc, &err);
    return rc;
}

static int map_batch(void *pool, bench_batch_fn *fn, const void *args, size_t n, size_t arg_size,
                     void *results, size_t result_size, size_t chunksize)
{
    pp_error err;
    int rc = pp_map_batch(pool, fn, args, n, arg_size, results, result_size, chunksize, &err);
    if (rc)
        report("pp_map_batch", rc, &err);
    return rc;
}

static int apply(void *pool, bench_fn *fn, const void *arg, size_t arg_size, void *result,
                 size_t result_size)
{
    pp_error err;
    int rc = pp_apply(pool, fn, arg, arg_size, result, result_size, &err);
    if (rc)
        report("pp_apply", rc, &err);
    return rc;
}

static void *apply_async(void *pool, bench_fn *fn, const void *arg, size_t arg_size,
                         size_t result_size)
{
    return pp_apply_async(pool, fn, arg, arg_size, result_size, NULL, NULL, NULL);
}

static int async_get(void *a, void *result)
{
    pp_error err;
    int rc = pp_async_get(a, result, -1.0, &err);
    if (rc)
        report("pp_async_get", rc, &err);
    return rc;
}

static void async_free(void *a)
{
    pp_async_free(a);
}

static void *imap(void *pool, bench_fn *fn, const void *args, size_t n, size_t arg_size,
                  size_t result_size, size_t chunksize, bool ordered)
{
    if (ordered)
        return pp_imap(pool, fn, args, n, arg_size, result_size, chunksize);
    return pp_imap_unordered(pool, fn, args, n, arg_size, result_size, chunksize);
}

static int iter_next(void *it, void *result, size_t *index)
{
    pp_error err;
    int rc = pp_iter_next(it, result, index, -1.0, &err);
    if (rc < 0)
        report("pp_iter_next", rc, &err);
    return rc;
}

static void iter_free(void *it)
{
    pp_iter_free(it);
}

static void *big_alloc(size_t bytes)
{
    if (!pp_shm_alloc) {
        errno = ENOSYS;
        return NULL;
    }
    return pp_shm_alloc(bytes);
}

static void big_free(void *p, size_t bytes)
{
    (void)bytes;
    pp_shm_free(p);
}

int main(int argc, char **argv)
{
    const char *start = getenv("PP_BENCH_START");
    const char *backend = getenv("PP_BENCH_BACKEND");
    if (start && strcmp(start, "spawn") == 0)
        base.start = PP_START_SPAWN;
    if (backend && strcmp(backend, "mpi") == 0) {
        base.backend = PP_BACKEND_MPI;
        /* Under mpirun every rank runs this program; only rank 0 reports
         * (the others serve its pool and end inside pp_pool_new). */
        const char *rank = getenv("OMPI_COMM_WORLD_RANK");
        if (rank == NULL)
            rank = getenv("PMI_RANK");
        if (rank != NULL && atoi(rank) != 0 && freopen("/dev/null", "w", stdout) == NULL)
            return 1;
    }
    const char *side = getenv("PP_BENCH_SIDE");
    const bench_backend b = {
        .side = side && *side ? side : "procpool",
        .pool_new = pool_new,
        .close_join = close_join,
        .pool_free = pool_free,
        .map = map,
        .map_batch = map_batch,
        .apply = apply,
        .apply_async = apply_async,
        .async_get = async_get,
        .async_free = async_free,
        .imap = imap,
        .iter_next = iter_next,
        .iter_free = iter_free,
        .big_alloc = big_alloc,
        .big_free = big_free,
    };
    return bench_main(&b, argc, argv);
}
