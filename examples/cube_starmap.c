/*
 * cube_starmap: the seed's starmap example, Python's
 *
 *     data = [(2, 2), (3, 3), (4, 4)]      # (base, exponent)
 *     results = pool.starmap(cube, data)
 *     print(results)                        # [4, 27, 256]
 *
 * C has no tuples: starmap is pp_map over an array of structs, one struct
 * per tuple of arguments. Exits non-zero on any unexpected outcome.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct power_args { /* one "tuple": the bytes of this struct are copied to a worker */
    long long base;
    int exponent;
};

/* cube(x, power) of the seed: x to the power of power. */
static int cube(const void *arg, void *result)
{
    const struct power_args *a = arg;
    /* The seed sleeps 0.5 s to simulate work; 50 ms here keeps the tour quick. */
    nanosleep(&(struct timespec){.tv_nsec = 50 * 1000 * 1000}, NULL);
    if (a->exponent < 0)
        return pp_fail(1, "negative exponent %d", a->exponent);
    long long r = 1;
    for (int i = 0; i < a->exponent; i++)
        r *= a->base;
    *(long long *)result = r;
    return 0;
}

int main(void)
{
    const struct power_args data[] = {{2, 2}, {3, 3}, {4, 4}};
    enum { N = sizeof data / sizeof data[0] };
    const long long expected[N] = {4, 27, 256};
    long long results[N];

    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4}); /* Pool(processes=4) */
    if (pool == NULL) {
        perror("pp_pool_new");
        return 1;
    }

    printf("Using starmap:\n");
    pp_error err;
    int rc = pp_map(pool, cube, data, N, sizeof data[0], results, sizeof results[0], 0, &err);
    if (rc != 0) {
        fprintf(stderr, "pp_map: %s (item %zu: %s)\n", pp_strerror(rc), err.index, err.message);
        pp_pool_free(pool);
        return 1;
    }
    if ((rc = pp_close(pool)) != 0 || (rc = pp_join(pool)) != 0) {
        fprintf(stderr, "pp_close/pp_join: %s\n", pp_strerror(rc));
        pp_pool_free(pool);
        return 1;
    }
    pp_pool_free(pool);

    printf("[");
    for (int i = 0; i < N; i++)
        printf("%s%lld", i ? ", " : "", results[i]);
    printf("]\n");

    for (int i = 0; i < N; i++)
        if (results[i] != expected[i])
            return 1;
    return 0;
}
