/*
 * Resources: after 1,000 pools created, used and freed, the process has the
 * same descriptors, the same mappings and the same resident memory (within
 * 1 MiB) as before; the heap in use is the same.
 *
 * Under AddressSanitizer freed memory sits in a quarantine (256 MiB by
 * default) and the sanitizer's allocator grows its own anonymous regions,
 * which would look like growth: there the test drains the quarantine, then
 * compares the allocator's own count of live heap bytes (exact) and every
 * mapping that is not anonymous; RSS and the total count of mappings are
 * compared in a build without sanitizers (make check runs this test in
 * both).
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <malloc.h>
#include <procpool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void __sanitizer_purge_allocator(void) __attribute__((weak));
size_t __sanitizer_get_current_allocated_bytes(void) __attribute__((weak));

static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    *(int *)result = x * x;
    return 0;
}

static int add_async(const void *arg, void *result)
{
    *(int *)result = *(const int *)arg + 1;
    return 0;
}

/* Mappings with a name: files, memfds, [heap], [stack]... */
static int count_named_mappings(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int n = 0;
    while (f && fgets(line, sizeof line, f)) {
        char path[256] = "";
        if (sscanf(line, "%*s %*s %*s %*s %*s %255s", path) == 1 && path[0] != '\0')
            n++;
    }
    if (f)
        fclose(f);
    return n;
}

struct snapshot {
    int fds, maps, named, children, threads;
    long rss_kib;
    size_t heap;
};

static void settle_heap(void)
{
    if (__sanitizer_purge_allocator)
        __sanitizer_purge_allocator();
    else
        malloc_trim(0);
}

static struct snapshot snap(const char *dump)
{
    settle_heap();
    if (getenv("PP_DUMP_MAPS")) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "cat /proc/%d/maps > %s", (int)getpid(), dump);
        if (system(cmd) != 0)
            fprintf(stderr, "could not dump the mappings\n");
    }
    struct snapshot s = {
        .fds = count_fds(),
        .maps = count_mappings(),
        .named = count_named_mappings(),
        .children = count_children(),
        .threads = count_threads(),
        .rss_kib = rss_kib(),
        .heap =
            __sanitizer_get_current_allocated_bytes ? __sanitizer_get_current_allocated_bytes() : 0,
    };
    return s;
}

/* One pool's life, touching every path that allocates: map, async, an
 * iterator, a crash with respawn, close or terminate. */
static void one_pool(int round)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .task_timeout = round % 3 ? 0 : 5});
    cr_assert_not_null(pool, "round %d", round);
    int in[64], out[64];
    for (int i = 0; i < 64; i++)
        in[i] = i;
    cr_assert_eq(pp_map(pool, square, in, 64, sizeof(int), out, sizeof(int), 0, NULL), 0);
    if (round % 4 == 0) {
        pp_async *a =
            pp_map_async(pool, add_async, in, 64, sizeof(int), sizeof(int), 4, NULL, NULL, NULL);
        cr_assert_eq(pp_async_get(a, out, -1, NULL), 0);
        pp_async_free(a);
    }
    if (round % 4 == 1) {
        pp_iter *it = pp_imap_unordered(pool, square, in, 64, sizeof(int), sizeof(int), 3);
        int r, n = 0;
        while (pp_iter_next(it, &r, NULL, -1, NULL) == 1)
            n++;
        cr_assert_eq(n, 64);
        pp_iter_free(it);
    }
    if (round % 2)
        pp_close(pool);
    pp_pool_free(pool);
}

Test(resources, thousand_pools_leave_nothing_behind, .timeout = PP_TEST_TIMEOUT(300))
{
    /* glibc makes a new malloc arena (two mappings, never unmapped; at most
     * 8 per core) whenever two threads meet in malloc: here the caller and
     * a pool's library thread. Bounded, and not ours: one arena for all. */
    mallopt(M_ARENA_MAX, 1);
    void *arena = pp_shm_alloc(64); /* the arena is the process's, made once */
    cr_assert_not_null(arena);
    for (int round = 0; round < 20; round++) /* warm up: stdio, the allocator, caches */
        one_pool(round);
    struct snapshot before = snap("/tmp/pp-maps-before");
    double t0 = now_s();
    int pools = getenv("PP_VALGRIND") ? 100 : 1000; /* make check-valgrind: leaks, not RSS */
    for (int round = 0; round < pools; round++)
        one_pool(round);
    double took = now_s() - t0;
    struct snapshot after = snap("/tmp/pp-maps-after");
    fprintf(stderr,
            "%d pools in %.1f s: fds %d -> %d, mappings %d -> %d, RSS %ld -> %ld KiB, "
            "heap %zu -> %zu bytes\n",
            pools, took, before.fds, after.fds, before.maps, after.maps, before.rss_kib,
            after.rss_kib, before.heap, after.heap);
    cr_assert_eq(after.fds, before.fds);
    cr_assert_eq(after.named, before.named);
    cr_assert_eq(after.children, 0);
    cr_assert_eq(after.threads, before.threads);
    cr_assert_eq(count_mappings_named("procpool-ctl"), 0);
    if (getenv("PP_VALGRIND")) {
        /* valgrind's own heap and mappings: memcheck reports leaks */
    } else if (__sanitizer_get_current_allocated_bytes) {
        cr_assert_eq(after.heap, before.heap, "live heap grew by %zd bytes",
                     (ssize_t)(after.heap - before.heap));
    } else {
        cr_assert_eq(after.maps, before.maps);
        cr_assert_lt(after.rss_kib - before.rss_kib, 1024, "RSS grew by %ld KiB",
                     after.rss_kib - before.rss_kib);
    }
    pp_shm_free(arena);
}

/* Regression (fixed; it was in src/pool.c pp__job_maybe_free, src/iter.c pp_iter_free), found by
 * make check-tsan (soak/tsan_stress.c): an iterator freed half-way leaves
 * its job linked in the pool's job queue (queued, cancelled). When its last
 * in-flight piece comes back, settle_done -> pp__piece_release ->
 * pp__job_maybe_free frees the job (no handle, nothing in flight) although
 * pool->qhead still points at it; the next deal's next_piece reads it:
 * heap-use-after-free (ASan reports it here within a few rounds). Fix:
 * pp__job_maybe_free must not free a job while job->queued (dequeue_head
 * then frees it), or pp__job_cancel_queued unlinks the job from the queue.
 * */
Test(resources, iterator_freed_half_way_then_pool_used, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    int in[4000], out[64];
    for (int i = 0; i < 4000; i++)
        in[i] = i;
    for (int round = 0; round < 50; round++) {
        pp_iter *it = round % 2
                          ? pp_imap(pool, square, in, 4000, sizeof(int), sizeof(int), 1)
                          : pp_imap_unordered(pool, square, in, 4000, sizeof(int), sizeof(int), 1);
        cr_assert_not_null(it);
        int r;
        for (int k = 0; k < 10 + round; k++)
            cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 1);
        pp_iter_free(it);
        cr_assert_eq(pp_map(pool, square, in, 64, sizeof(int), out, sizeof(int), 1, NULL), 0);
        for (int i = 0; i < 64; i++)
            cr_assert_eq(out[i], i * i);
    }
    pp_pool_free(pool);
}

/* ---- the pool's cache of job blocks (src/jobcache.h) ---------------------- */

static size_t heap_in_use(void)
{
    if (__sanitizer_get_current_allocated_bytes)
        return __sanitizer_get_current_allocated_bytes();
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

static int echo_bytes(const void *arg, void *result)
{
    memcpy(result, arg, 300);
    return 0;
}

#define BURST 20000

/* n apply_async of `fn` with `size`-byte arguments and results, then every
 * get and free. Returns the heap in use once all n were submitted. */
static size_t burst(pp_pool *pool, pp_async **h, int n, pp_fn *fn, size_t size)
{
    unsigned char arg[300] = {0}, res[300];
    for (int i = 0; i < n; i++) {
        memcpy(arg, &i, sizeof i);
        h[i] = pp_apply_async(pool, fn, arg, size, size, NULL, NULL, NULL);
        cr_assert_not_null(h[i], "submission %d", i);
    }
    size_t peak = heap_in_use();
    for (int i = 0; i < n; i++) {
        cr_assert_eq(pp_async_get(h[i], res, -1, NULL), 0);
        int got;
        memcpy(&got, res, sizeof got);
        cr_assert_eq(got, fn == echo_bytes ? i : i + 1, "item %d", i);
        pp_async_free(h[i]);
    }
    return peak;
}

/* A pool of two workers and room for n handles, made before the heap's
 * baseline is read. */
static pp_pool *burst_pool(int n, pp_async ***h)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    *h = calloc((size_t)n, sizeof **h);
    cr_assert_not_null(*h);
    return pool;
}

/* The blocks of one burst of apply_async serve the next: the heap does not
 * grow again (without the cache, glibc trims them and every burst faults its
 * pages in anew). */
Test(resources, a_burst_of_async_jobs_reuses_the_blocks_of_the_last, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_async **h;
    pp_pool *pool = burst_pool(BURST, &h);
    size_t base = heap_in_use();
    burst(pool, h, BURST, add_async, sizeof(int));
    size_t kept = heap_in_use();
    cr_assert_geq(kept, base + BURST * (size_t)200, "kept %zu bytes", kept - base);
    size_t peak = burst(pool, h, BURST, add_async, sizeof(int));
    cr_assert_lt(peak, kept + 256 * 1024, "the second burst grew the heap by %zd bytes",
                 (ssize_t)(peak - kept));
    free(h);
    pp_pool_free(pool);
}

/* What a burst left in the cache is freed once the pool has rested a whole
 * interval (1-2 s) with no submission. */
Test(resources, kept_job_blocks_are_freed_when_the_pool_rests, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_async **h;
    pp_pool *pool = burst_pool(BURST, &h);
    size_t base = heap_in_use();
    burst(pool, h, BURST, add_async, sizeof(int));
    cr_assert_geq(heap_in_use(), base + BURST * (size_t)200);
    double give_up = now_s() + 10 * slow_factor();
    while (heap_in_use() > base + 64 * 1024 && now_s() < give_up)
        usleep(20000);
    cr_assert_leq(heap_in_use(), base + 64 * 1024, "still %zu bytes kept after 10 s",
                  heap_in_use() - base);
    free(h);
    pp_pool_free(pool);
}

/* The cache keeps at most 64 MiB: 80,000 jobs in 1 KiB blocks do not all
 * stay (glibc counts 16 bytes of its own per block). */
Test(resources, the_job_cache_is_bounded, .timeout = PP_TEST_TIMEOUT(120))
{
    enum { N = 80000 };
    pp_async **h;
    pp_pool *pool = burst_pool(N, &h);
    size_t base = heap_in_use();
    size_t peak = burst(pool, h, N, echo_bytes, 300);
    cr_assert_gt(peak, base + ((size_t)78 << 20), "the burst took %zu bytes", peak - base);
    size_t kept = heap_in_use() - base;
    cr_assert_leq(kept, ((size_t)64 << 20) / 1024 * 1040 + 256 * 1024, "kept %zu bytes", kept);
    free(h);
    pp_pool_free(pool);
}
