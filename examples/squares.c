/*
 * squares: the seed's first example, Python's
 *
 *     pool = multiprocessing.Pool()
 *     results = pool.map(square, [1, 2, 3, 4, 5])
 *     pool.close(); pool.join()
 *     print(f"Squares: {results}")
 *
 * in C. Prints "Squares: [1, 4, 9, 16, 25]". Exits non-zero on any
 * unexpected outcome, so it doubles as a smoke test.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* The task. It runs in a worker process: `arg` points at a copy of one
 * input int, `result` at a zeroed int that travels back to the parent. */
static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    /* Simulate some work. The seed sleeps 1 s per item; 50 ms keeps the
     * example (and the tour) quick while still showing the items overlap. */
    nanosleep(&(struct timespec){.tv_nsec = 50 * 1000 * 1000}, NULL);
    *(int *)result = x * x;
    return 0; /* 0 = success */
}

int main(void)
{
    const int numbers[] = {1, 2, 3, 4, 5};
    enum { N = sizeof numbers / sizeof numbers[0] };
    int results[N];

    /* NULL options: one worker per online CPU, like multiprocessing.Pool(). */
    pp_pool *pool = pp_pool_new(NULL);
    if (pool == NULL) {
        perror("pp_pool_new");
        return 1;
    }

    pp_error err;
    int rc = pp_map(pool, square, numbers, N, sizeof numbers[0], results, sizeof results[0],
                    0 /* chunksize: CPython's rule */, &err);
    if (rc != 0) {
        fprintf(stderr, "pp_map: %s (item %zu: %s)\n", pp_strerror(rc), err.index, err.message);
        pp_pool_free(pool);
        return 1;
    }

    /* pool.close(); pool.join(): no more work, wait for the workers to end. */
    if ((rc = pp_close(pool)) != 0 || (rc = pp_join(pool)) != 0) {
        fprintf(stderr, "pp_close/pp_join: %s\n", pp_strerror(rc));
        pp_pool_free(pool);
        return 1;
    }
    pp_pool_free(pool);

    printf("Squares: [");
    for (int i = 0; i < N; i++)
        printf("%s%d", i ? ", " : "", results[i]);
    printf("]\n");

    for (int i = 0; i < N; i++)
        if (results[i] != numbers[i] * numbers[i])
            return 1;
    return 0;
}
