/*
 * pthread_pool: the comparison point for procpool's benchmarks. A plain
 * thread pool as a C programmer would write it in an afternoon: N threads,
 * one job queue guarded by one mutex with one condition variable, and a
 * condition variable per waiter for completions. Same call shapes as
 * procpool (map, apply, apply_async, imap / imap_unordered) so that the
 * benchmark runs the very same workloads on both.
 */
#ifndef PTHREAD_POOL_H
#define PTHREAD_POOL_H

#include <stdbool.h>
#include <stddef.h>

/* Same shape as pp_fn: 0 = success, anything else fails the item. */
typedef int tp_fn(const void *arg, void *result);

typedef struct tp_pool tp_pool;
typedef struct tp_async tp_async;
typedef struct tp_iter tp_iter;

/* workers <= 0: number of online CPUs. NULL with errno on failure. */
tp_pool *tp_pool_new(int workers);
/* Lets queued work finish, then joins every thread. */
int tp_close_join(tp_pool *pool);
/* tp_close_join if not done yet, then frees. Accepts NULL. */
void tp_pool_free(tp_pool *pool);
int tp_pool_workers(const tp_pool *pool);

/* Blocking map; chunksize 0 = CPython's rule ceil(n / (4 * workers)).
 * Returns 0 or the first non-zero return of an item. */
int tp_map(tp_pool *pool, tp_fn *fn, const void *args, size_t n, size_t arg_size, void *results,
           size_t result_size, size_t chunksize);
int tp_apply(tp_pool *pool, tp_fn *fn, const void *arg, size_t arg_size, void *result,
             size_t result_size);

/* Copies the argument; the result lives in the handle until tp_async_get. */
tp_async *tp_apply_async(tp_pool *pool, tp_fn *fn, const void *arg, size_t arg_size,
                         size_t result_size);
int tp_async_get(tp_async *a, void *result);
void tp_async_free(tp_async *a);

/* ordered: results in input order (imap), else as chunks finish
 * (imap_unordered). chunksize 0 means 1. args must outlive the iterator. */
tp_iter *tp_imap(tp_pool *pool, tp_fn *fn, const void *args, size_t n, size_t arg_size,
                 size_t result_size, size_t chunksize, bool ordered);
/* 1 = one item (result copied, *index set), 0 = done, negative = the item
 * failed (its return value, negated if it was positive). */
int tp_iter_next(tp_iter *it, void *result, size_t *index);
/* Waits for the iterator's outstanding chunks, then frees it. */
void tp_iter_free(tp_iter *it);

#endif
