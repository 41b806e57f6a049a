/*
 * harness: procpool's benchmark workloads, written once against a small
 * backend interface so that procpool, the plain pthread pool and the serial
 * loop run exactly the same tasks on exactly the same data. Each program
 * (bench_procpool, bench_pthread) fills a bench_backend and calls
 * bench_main, which prints one line per measured run on stdout:
 *
 *     R <TAB> row <TAB> n <TAB> value      one run's figure for a table row
 *     I <TAB> key <TAB> value              facts about the run (workers, ...)
 *     E <TAB> row <TAB> message            a row that could not be measured
 *
 * bench/aggregate.py turns those lines into the table.
 */
#ifndef BENCH_HARNESS_H
#define BENCH_HARNESS_H

#include <stdbool.h>
#include <stddef.h>

/* Same shape as pp_fn and tp_fn. */
typedef int bench_fn(const void *arg, void *result);
/* Same shape as pp_batch_fn: `count` items in one call. */
typedef int bench_batch_fn(const void *args, void *results, size_t count);

typedef struct bench_backend {
    const char *side; /* column name: "procpool", "pthread", "serial", ... */
    bool serial;      /* no pool: only map runs, in the calling thread */
    /* Everything below may be NULL; the workloads that need it are skipped. */
    void *(*pool_new)(int workers);
    int (*close_join)(void *pool);
    void (*pool_free)(void *pool);
    int (*map)(void *pool, bench_fn *fn, const void *args, size_t n, size_t arg_size, void *results,
               size_t result_size, size_t chunksize);
    /* A map whose task runs runs of items (workload 1's batch rows). */
    int (*map_batch)(void *pool, bench_batch_fn *fn, const void *args, size_t n, size_t arg_size,
                     void *results, size_t result_size, size_t chunksize);
    int (*apply)(void *pool, bench_fn *fn, const void *arg, size_t arg_size, void *result,
                 size_t result_size);
    void *(*apply_async)(void *pool, bench_fn *fn, const void *arg, size_t arg_size,
                         size_t result_size);
    int (*async_get)(void *async, void *result);
    void (*async_free)(void *async);
    void *(*imap)(void *pool, bench_fn *fn, const void *args, size_t n, size_t arg_size,
                  size_t result_size, size_t chunksize, bool ordered);
    int (*iter_next)(void *iter, void *result, size_t *index); /* 1 item, 0 end, <0 error */
    void (*iter_free)(void *iter);
    /* Memory for workload 8 that the pool's workers can read. */
    void *(*big_alloc)(size_t bytes);
    void (*big_free)(void *p, size_t bytes);
} bench_backend;

/* Runs the workloads selected by the environment (see bench/README.md) and
 * prints their lines. Returns the process exit status. */
int bench_main(const bench_backend *b, int argc, char **argv);

#endif
