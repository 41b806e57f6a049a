/*
 * apply_async: the seed's asynchronous example, Python's
 *
 *     async_result = pool.apply_async(cube, args=(2, 3), callback=print_result)
 *     print("Doing other stuff while the cube is calculated…")
 *     time.sleep(1)
 *     print("Done with other stuff.")
 *     async_result.get()
 *
 * in C. The callback runs in a library thread of this process (never in a
 * worker), so it may print while main() sleeps; "Result: 8" normally appears
 * between the two lines, as in Python. Exits non-zero on any unexpected
 * outcome.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct power_args {
    long long base;
    int exponent;
};

static void sleep_ms(long ms)
{
    nanosleep(&(struct timespec){.tv_sec = ms / 1000, .tv_nsec = ms % 1000 * 1000000}, NULL);
}

/* Runs in a worker. */
static int cube(const void *arg, void *result)
{
    const struct power_args *a = arg;
    sleep_ms(50); /* the seed sleeps 0.5 s to simulate work */
    long long r = 1;
    for (int i = 0; i < a->exponent; i++)
        r *= a->base;
    *(long long *)result = r;
    return 0;
}

/* Runs in the parent, on the library's thread: `result` is valid during the call. */
static void print_result(const void *result, void *userdata)
{
    printf("Result: %lld\n", *(const long long *)result);
    fflush(stdout);
    atomic_fetch_add((atomic_int *)userdata, 1);
}

/* Called instead of print_result if the task fails: not expected here. */
static void print_error(const pp_error *err, void *userdata)
{
    fprintf(stderr, "cube failed: %s (%s)\n", pp_strerror(err->code), err->message);
    atomic_fetch_add((atomic_int *)userdata, 100);
}

int main(void)
{
    atomic_int calls = 0;
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
    if (pool == NULL) {
        perror("pp_pool_new");
        return 1;
    }

    /* The argument is copied now: `args` could be reused at once. */
    struct power_args args = {2, 3};
    pp_async *async_result = pp_apply_async(pool, cube, &args, sizeof args, sizeof(long long),
                                            print_result, print_error, &calls);
    if (async_result == NULL) {
        perror("pp_apply_async");
        pp_pool_free(pool);
        return 1;
    }

    printf("Doing other stuff while the cube is calculated…\n");
    fflush(stdout);
    sleep_ms(200); /* simulate other work (the seed sleeps 1 s) */
    printf("Done with other stuff.\n");

    /* async_result.get(): waits (timeout < 0: forever), then copies the result. */
    long long result = 0;
    pp_error err;
    int rc = pp_async_get(async_result, &result, -1, &err);
    int status = 0;
    if (rc != 0) {
        fprintf(stderr, "pp_async_get: %s (%s)\n", pp_strerror(rc), err.message);
        status = 1;
    } else if (result != 8 || !pp_async_ready(async_result) || !pp_async_successful(async_result)) {
        fprintf(stderr, "unexpected: result %lld\n", result);
        status = 1;
    }
    /* The callback has returned before the result became ready. */
    if (atomic_load(&calls) != 1) {
        fprintf(stderr, "unexpected: callbacks ran %d times\n", atomic_load(&calls));
        status = 1;
    }
    pp_async_free(async_result);

    if ((rc = pp_close(pool)) != 0 || (rc = pp_join(pool)) != 0) {
        fprintf(stderr, "pp_close/pp_join: %s\n", pp_strerror(rc));
        status = 1;
    }
    pp_pool_free(pool);
    return status;
}
