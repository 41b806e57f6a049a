/*
 * imap: the seed's iterator example, Python's
 *
 *     print("Using imap:")
 *     for result in pool.imap(square, [1, 2, 3, 4, 5]):
 *         print(result)
 *
 * in C, then the same with imap_unordered, which hands results back as they
 * arrive. pp_iter_next returns 1 per item, 0 at the end, and a negative
 * code for an item that failed (iteration goes on). Exits non-zero on any
 * unexpected outcome.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Smaller numbers take longer (120 ms for 1 down to 40 ms for 5, where the
 * seed sleeps 1 s), so imap_unordered visibly returns them out of order. */
static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    long ms = 20L * (7 - x);
    nanosleep(&(struct timespec){.tv_nsec = ms * 1000000}, NULL);
    *(int *)result = x * x;
    return 0;
}

/* Drains one iterator; prints each result. Returns 0 if every item came
 * back once with the right square, 1 otherwise. */
static int drain(pp_iter *it, const int *numbers, size_t n, int ordered)
{
    int seen[16] = {0};
    size_t count = 0;
    for (;;) {
        int result;
        size_t index;
        pp_error err;
        int rc = pp_iter_next(it, &result, &index, -1 /* wait forever */, &err);
        if (rc == 0)
            break; /* no more items */
        if (rc < 0) {
            fprintf(stderr, "item %zu failed: %s (%s)\n", err.index, pp_strerror(rc), err.message);
            return 1;
        }
        if (ordered)
            printf("%d\n", result);
        else
            printf("%d  (input #%zu)\n", result, index);
        if (index >= n || seen[index]++ || result != numbers[index] * numbers[index] ||
            (ordered && index != count))
            return 1;
        count++;
    }
    return count == n ? 0 : 1;
}

int main(void)
{
    const int numbers[] = {1, 2, 3, 4, 5};
    const size_t n = sizeof numbers / sizeof numbers[0];
    int status = 0;

    pp_pool *pool = pp_pool_new(NULL);
    if (pool == NULL) {
        perror("pp_pool_new");
        return 1;
    }

    /* `numbers` is read in place: it must outlive the iterator. chunksize 1,
     * as Python's imap default. */
    printf("Using imap:\n");
    pp_iter *it = pp_imap(pool, square, numbers, n, sizeof numbers[0], sizeof(int), 1);
    if (it == NULL) {
        perror("pp_imap");
        status = 1;
    } else {
        status |= drain(it, numbers, n, 1);
        pp_iter_free(it);
    }

    printf("Using imap_unordered:\n");
    fflush(stdout);
    it = pp_imap_unordered(pool, square, numbers, n, sizeof numbers[0], sizeof(int), 1);
    if (it == NULL) {
        perror("pp_imap_unordered");
        status = 1;
    } else {
        status |= drain(it, numbers, n, 0);
        pp_iter_free(it);
    }

    int rc;
    if ((rc = pp_close(pool)) != 0 || (rc = pp_join(pool)) != 0) {
        fprintf(stderr, "pp_close/pp_join: %s\n", pp_strerror(rc));
        status = 1;
    }
    pp_pool_free(pool);
    return status;
}
