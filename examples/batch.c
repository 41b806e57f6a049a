/*
 * batch: a map over ten million tiny items, where one call per item costs
 * more than the item. pp_map calls the task once per item; pp_map_batch
 * hands it a run of consecutive items and lets it loop (and the compiler
 * vectorize). Python's Pool has no such call: its map pays an interpreter
 * call and a pickle per item. Prints both timings and checks every result;
 * exits non-zero on any unexpected outcome.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* One item per call. */
static int square(const void *arg, void *result)
{
    int32_t x = *(const int32_t *)arg;
    *(int64_t *)result = (int64_t)x * x;
    return 0;
}

/* A run of `count` items per call: the loop is ours. */
static int square_run(const void *args, void *results, size_t count)
{
    const int32_t *x = args;
    int64_t *y = results;
    for (size_t i = 0; i < count; i++)
        y[i] = (int64_t)x[i] * x[i];
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static size_t wrong(const int64_t *y, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += y[i] != (int64_t)i * (int64_t)i;
    return bad;
}

int main(void)
{
    enum { N = 10 * 1000 * 1000 };
    int32_t *x = malloc(N * sizeof *x);
    int64_t *y = malloc(N * sizeof *y);
    pp_pool *pool = pp_pool_new(NULL);
    if (x == NULL || y == NULL || pool == NULL) {
        perror("batch");
        return 1;
    }
    for (int32_t i = 0; i < N; i++)
        x[i] = i;

    /* Once untimed: a pool's first big map also faults in its shared
     * payload area, which the maps after it reuse. */
    pp_error err;
    int rc = pp_map(pool, square, x, N, sizeof *x, y, sizeof *y, 0, &err);
    double t0 = now();
    if (rc == 0)
        rc = pp_map(pool, square, x, N, sizeof *x, y, sizeof *y, 0, &err);
    double per_item = now() - t0;
    size_t bad = rc == 0 ? wrong(y, N) : N;

    t0 = now();
    if (rc == 0)
        rc = pp_map_batch(pool, square_run, x, N, sizeof *x, y, sizeof *y, 0, &err);
    double per_run = now() - t0;
    bad += rc == 0 ? wrong(y, N) : N;

    pp_pool_free(pool);
    free(x);
    free(y);
    if (rc != 0 || bad != 0) {
        fprintf(stderr, "batch: %s, %zu wrong results\n", rc ? pp_strerror(rc) : "ok", bad);
        return 1;
    }
    printf("x*x over %d ints: pp_map %.1f ms (%.0f M items/s), pp_map_batch %.1f ms "
           "(%.0f M items/s)\n",
           N, per_item * 1e3, N / per_item / 1e6, per_run * 1e3, N / per_run / 1e6);
    return 0;
}
