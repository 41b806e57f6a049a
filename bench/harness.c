/*
 * harness: the workloads of procpool's benchmark suite, run against any
 * bench_backend (see harness.h and bench/README.md for what each measures).
 */
#define _GNU_SOURCE
#include "harness.h"

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIB ((size_t)1 << 20)

/* ---- knobs --------------------------------------------------------------- */

static int reps = 5;
static int workers;
static const char *only; /* NULL: every workload */

static long env_long(const char *name, long dflt)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return dflt;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v <= 0) {
        fprintf(stderr, "bench: ignoring %s=%s (want a positive integer)\n", name, s);
        return dflt;
    }
    return v;
}

static bool selected(int workload)
{
    if (!only)
        return true;
    char want[16];
    snprintf(want, sizeof want, "%d", workload);
    for (const char *p = only; *p;) {
        size_t len = strcspn(p, ", ");
        if (len == strlen(want) && strncmp(p, want, len) == 0)
            return true;
        p += len;
        p += strspn(p, ", ");
    }
    return false;
}

/* ---- output -------------------------------------------------------------- */

static const bench_backend *B;

static void result(const char *row, size_t n, double value)
{
    printf("R\t%s\t%zu\t%.6g\n", row, n, value);
    fflush(stdout);
}

static void failure(const char *row, const char *fmt, int rc)
{
    printf("E\t%s\t", row);
    printf(fmt, rc);
    printf("\n");
    fflush(stdout);
    fprintf(stderr, "bench %s: %s: ", B->side, row);
    fprintf(stderr, fmt, rc);
    fprintf(stderr, "\n");
}

static void progress(const char *what)
{
    fprintf(stderr, "  [%s] %s\n", B->side, what);
}

/* ---- clocks -------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- tasks (identical on every side; Python mirrors them) ---------------- */

/* Workload 1: int32 in, int64 x*x out. */
static int task_square(const void *arg, void *res)
{
    int32_t x;
    memcpy(&x, arg, sizeof x);
    int64_t y = (int64_t)x * x;
    memcpy(res, &y, sizeof y);
    return 0;
}

/* Workload 1's batch rows: the same x*x, the loop over a run of items the
 * task's own (the compiler vectorizes it). */
static int task_square_batch(const void *args, void *results, size_t count)
{
    const int32_t *x = args;
    int64_t *y = results;
    for (size_t i = 0; i < count; i++)
        y[i] = (int64_t)x[i] * x[i];
    return 0;
}

/* Workloads 2-5 and 7: nothing at all. */
static int task_noop(const void *arg, void *res)
{
    (void)arg;
    (void)res;
    return 0;
}

/* Workload 6: burns int64 `ns` of this thread's CPU time. CPU time, not
 * wall time, so the work is the same whatever else runs on the machine. */
static int task_spin(const void *arg, void *res)
{
    int64_t ns, spins = 0;
    memcpy(&ns, arg, sizeof ns);
    int64_t end = thread_cpu_ns() + ns;
    while (thread_cpu_ns() < end)
        spins++;
    memcpy(res, &spins, sizeof spins);
    return 0;
}

/* Workload 8: the sum of a block's 64-bit words, modulo 2^64. */
typedef struct block_arg {
    const uint64_t *words;
    size_t count;
} block_arg;

static int task_checksum(const void *arg, void *res)
{
    block_arg b;
    memcpy(&b, arg, sizeof b);
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= b.count; i += 4) {
        s0 += b.words[i];
        s1 += b.words[i + 1];
        s2 += b.words[i + 2];
        s3 += b.words[i + 3];
    }
    for (; i < b.count; i++)
        s0 += b.words[i];
    uint64_t s = s0 + s1 + s2 + s3;
    memcpy(res, &s, sizeof s);
    return 0;
}

/* ---- workloads ----------------------------------------------------------- */

static void *main_pool;

/* Maps x*x over args[0..n) into res, reps times: items/s in `row`. With
 * `batch`, through map_batch and task_square_batch. */
static void w1_rounds(const char *row, int32_t *args, int64_t *res, size_t n, bool batch)
{
    progress(row);
    for (size_t i = 0; i < n; i++)
        args[i] = (int32_t)i;
    for (int r = -1; r < reps; r++) { /* r == -1: warm-up, not reported */
        memset(res, 0, n * sizeof *res);
        double t0 = now_s();
        int rc = batch ? B->map_batch(main_pool, task_square_batch, args, n, sizeof *args, res,
                                      sizeof *res, 0)
                       : B->map(main_pool, task_square, args, n, sizeof *args, res, sizeof *res, 0);
        double t = now_s() - t0;
        if (rc) {
            failure(row, "map failed: %d", rc);
            return;
        }
        if (res[n - 1] != (int64_t)(n - 1) * (int64_t)(n - 1) || res[n / 2] == 0) {
            failure(row, "wrong results (%d)", 0);
            return;
        }
        if (r >= 0)
            result(row, n, (double)n / t);
    }
}

/* One row of workload 1: n items, in private memory or in the arena. */
static void w1_row(const char *row, size_t n, bool arena, bool batch)
{
    void *(*alloc)(size_t) = arena ? B->big_alloc : malloc;
    int32_t *args = alloc(n * sizeof *args);
    int64_t *res = alloc(n * sizeof *res);
    if (args && res)
        w1_rounds(row, args, res, n, batch);
    else
        failure(row, "allocation failed: errno %d", errno);
    if (!arena) {
        free(args);
        free(res);
        return;
    }
    if (args)
        B->big_free(args, n * sizeof *args);
    if (res)
        B->big_free(res, n * sizeof *res);
}

/* 1. map of x*x, default chunksize: items/s. The caller's arrays are private
 * memory (what the issue asks); then the same 1M map with both arrays in
 * the shared arena (pp_shm_alloc), where nothing is copied: what the
 * process boundary costs, beside what the pool costs. The batch rows run
 * the same maps with a batch task (pp_map_batch): what is left when the
 * pool calls the task once per run of items instead of once per item. */
static void w1_map_square(void)
{
    bool arena = B->big_alloc && !B->serial, batch = B->map_batch != NULL;
    w1_row("w1_map_1m", 1000000, false, false);
    w1_row("w1_map_10m", 10000000, false, false);
    if (arena)
        w1_row("w1_map_1m_shared", 1000000, true, false);
    if (batch) {
        w1_row("w1_batch_1m", 1000000, false, true);
        w1_row("w1_batch_10m", 10000000, false, true);
    }
    if (batch && arena)
        w1_row("w1_batch_1m_shared", 1000000, true, true);
}

/* The int32 arguments 0..n-1 and room for n int32 results. */
static bool make_ints(size_t n, int32_t **args, int32_t **res)
{
    *args = malloc(n * sizeof **args);
    *res = malloc(n * sizeof **res);
    if (!*args || !*res) {
        free(*args);
        free(*res);
        return false;
    }
    for (size_t i = 0; i < n; i++)
        (*args)[i] = (int32_t)i;
    return true;
}

#define NOOP_N ((size_t)200000)

/* 2. map with chunksize 1 of a no-op: tasks/s. */
static void w2_map_cs1(void)
{
    const char *row = "w2_map_cs1";
    progress(row);
    int32_t *args, *res;
    if (!make_ints(NOOP_N, &args, &res)) {
        failure(row, "out of memory (%d)", -ENOMEM);
        return;
    }
    for (int r = -1; r < reps; r++) {
        double t0 = now_s();
        int rc = B->map(main_pool, task_noop, args, NOOP_N, sizeof *args, res, sizeof *res, 1);
        double t = now_s() - t0;
        if (rc) {
            failure(row, "map failed: %d", rc);
            break;
        }
        if (r >= 0)
            result(row, NOOP_N, (double)NOOP_N / t);
    }
    free(args);
    free(res);
}

/* 3. imap and imap_unordered with chunksize 1: tasks/s. */
static void w3_imap(void)
{
    int32_t *args, *res;
    if (!make_ints(NOOP_N, &args, &res)) {
        failure("w3_imap", "out of memory (%d)", -ENOMEM);
        return;
    }
    for (int ordered = 1; ordered >= 0; ordered--) {
        const char *row = ordered ? "w3_imap" : "w3_imap_unordered";
        progress(row);
        for (int r = -1; r < reps; r++) {
            double t0 = now_s();
            void *it =
                B->imap(main_pool, task_noop, args, NOOP_N, sizeof *args, sizeof *res, 1, ordered);
            if (!it) {
                failure(row, "imap failed: errno %d", errno);
                goto next;
            }
            size_t got = 0, idx = 0, expect = 0;
            int32_t one;
            int rc;
            while ((rc = B->iter_next(it, &one, &idx)) == 1) {
                if (ordered && idx != expect) {
                    failure(row, "out of order (%d)", (int)idx);
                    B->iter_free(it);
                    goto next;
                }
                expect++;
                got++;
            }
            B->iter_free(it);
            double t = now_s() - t0;
            if (rc < 0 || got != NOOP_N) {
                failure(row, "iteration failed: %d", rc < 0 ? rc : (int)got);
                goto next;
            }
            if (r >= 0)
                result(row, NOOP_N, (double)NOOP_N / t);
        }
    next:;
    }
    free(args);
    free(res);
}

/* 4. n apply_async of a no-op, then get them all: tasks/s. */
static void w4_apply_async(void)
{
    const char *row = "w4_apply_async";
    progress(row);
    void **h = calloc(NOOP_N, sizeof *h);
    if (!h) {
        failure(row, "out of memory (%d)", -ENOMEM);
        return;
    }
    for (int r = -1; r < reps; r++) {
        double t0 = now_s();
        size_t made = 0;
        for (; made < NOOP_N; made++) {
            int32_t x = (int32_t)made;
            h[made] = B->apply_async(main_pool, task_noop, &x, sizeof x, sizeof(int32_t));
            if (!h[made])
                break;
        }
        int rc = made == NOOP_N ? 0 : -errno;
        for (size_t i = 0; i < made; i++) {
            int32_t out;
            int x = B->async_get(h[i], &out);
            if (x && !rc)
                rc = x;
            B->async_free(h[i]);
        }
        double t = now_s() - t0;
        if (rc) {
            failure(row, "apply_async/get failed: %d", rc);
            break;
        }
        if (r >= 0)
            result(row, NOOP_N, (double)NOOP_N / t);
    }
    free(h);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array. */
static int64_t percentile(const int64_t *sorted, size_t n, double p)
{
    size_t rank = (size_t)(p * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

/* 5. apply round trips, one at a time: p50 and p99 latency in µs. */
static void w5_apply_latency(void)
{
    const size_t n = 20000, warm = 1000;
    progress("w5_apply");
    int64_t *lat = malloc(n * sizeof *lat);
    if (!lat) {
        failure("w5_apply_p50_us", "out of memory (%d)", -ENOMEM);
        return;
    }
    for (size_t i = 0; i < warm; i++) {
        int32_t x = (int32_t)i, out;
        if (B->apply(main_pool, task_noop, &x, sizeof x, &out, sizeof out))
            break;
    }
    for (int r = 0; r < reps; r++) {
        int rc = 0;
        for (size_t i = 0; i < n && !rc; i++) {
            int32_t x = (int32_t)i, out;
            int64_t t0 = now_ns();
            rc = B->apply(main_pool, task_noop, &x, sizeof x, &out, sizeof out);
            lat[i] = now_ns() - t0;
        }
        if (rc) {
            failure("w5_apply_p50_us", "apply failed: %d", rc);
            break;
        }
        qsort(lat, n, sizeof *lat, cmp_i64);
        result("w5_apply_p50_us", n, (double)percentile(lat, n, 0.50) / 1e3);
        result("w5_apply_p99_us", n, (double)percentile(lat, n, 0.99) / 1e3);
    }
    free(lat);
}

/* 6. CPU-bound: tasks of 20 ms of CPU each, on 1 worker and on all. Each
 * run makes its pools afresh and one at a time, so that no idle pool shares
 * the CPUs with the one being measured. */
static void w6_cpu_bound(void)
{
    const int64_t task_ns = 20000000;
    size_t n = (size_t)env_long("PP_BENCH_W6_TASKS", B->serial ? 40 : 200);
    progress(B->serial ? "w6_cpu (serial loop)" : "w6_cpu (1 worker, then all)");
    int64_t *args = malloc(n * sizeof *args), *res = malloc(n * sizeof *res);
    if (!args || !res) {
        failure("w6_rate_all", "out of memory (%d)", -ENOMEM);
        free(args);
        free(res);
        return;
    }
    for (size_t i = 0; i < n; i++)
        args[i] = task_ns;
    for (int r = 0; r < reps; r++) {
        double t[2] = {0, 0}; /* 1 worker, all workers */
        int rc = 0;
        for (int k = B->serial ? 1 : 0; k < 2 && !rc; k++) {
            void *p = NULL;
            if (!B->serial && !(p = B->pool_new(k ? workers : 1))) {
                failure("w6_rate_all", "pool_new failed: errno %d", errno);
                goto out;
            }
            double t0 = now_s();
            rc = B->map(p, task_spin, args, n, sizeof *args, res, sizeof *res, 1);
            t[k] = now_s() - t0;
            if (p) {
                B->close_join(p);
                B->pool_free(p);
            }
        }
        if (rc) {
            failure("w6_rate_all", "map failed: %d", rc);
            break;
        }
        result("w6_rate_all", n, (double)n / t[1]);
        if (!B->serial) {
            result("w6_speedup", n, t[0] / t[1]);
            result("w6_efficiency", n, t[0] / t[1] / workers);
        }
    }
out:
    free(args);
    free(res);
}

/* 7. Pool start-up to the first result, and close + join: ms. */
static void w7_lifecycle(void)
{
    progress("w7_start / w7_close_join");
    for (int r = -1; r < 2 * reps; r++) { /* cheap: twice the runs */
        double t0 = now_s();
        void *p = B->pool_new(workers);
        if (!p) {
            failure("w7_start_ms", "pool_new failed: errno %d", errno);
            return;
        }
        int32_t x = 1, out;
        int rc = B->apply(p, task_noop, &x, sizeof x, &out, sizeof out);
        double t1 = now_s();
        int rc2 = B->close_join(p);
        double t2 = now_s();
        B->pool_free(p);
        if (rc || rc2) {
            failure("w7_start_ms", "apply or close+join failed: %d", rc ? rc : rc2);
            return;
        }
        if (r >= 0) {
            result("w7_start_ms", 1, (t1 - t0) * 1e3);
            result("w7_close_join_ms", 1, (t2 - t1) * 1e3);
        }
    }
}

/* Single-core memcpy bandwidth: bytes copied per second, 256 MiB buffers. */
static void memcpy_bandwidth(void)
{
    const size_t bytes = 256 * MIB;
    const int rounds = 4;
    char *src = malloc(bytes), *dst = malloc(bytes);
    if (!src || !dst) {
        failure("w8_memcpy_gbps", "out of memory (%d)", -ENOMEM);
        free(src);
        free(dst);
        return;
    }
    memset(src, 1, bytes);
    memset(dst, 2, bytes);
    for (int r = -1; r < reps; r++) {
        double t0 = now_s();
        for (int k = 0; k < rounds; k++) {
            memcpy(dst, src, bytes);
            __asm__ __volatile__("" : : "r"(dst) : "memory");
        }
        double t = now_s() - t0;
        if (r >= 0)
            result("w8_memcpy_gbps", (size_t)rounds * bytes, (double)rounds * bytes / t / 1e9);
    }
    free(src);
    free(dst);
}

/* 8. Checksum every 1 MiB block of 1 GiB in shared memory: GB/s. */
static void w8_large_data(void)
{
    const size_t mib = (size_t)env_long("PP_BENCH_W8_MIB", 1024);
    const size_t words = MIB / sizeof(uint64_t), bytes = mib * MIB;
    progress("w8_large_data");
    if (!B->serial)
        memcpy_bandwidth();
    uint64_t *data = B->big_alloc(bytes);
    block_arg *args = malloc(mib * sizeof *args);
    uint64_t *sums = malloc(mib * sizeof *sums);
    if (!data || !args || !sums) {
        failure("w8_gbps", "allocation failed: errno %d", errno);
        goto out;
    }
    /* Word 0 of block b is b, word j > 0 is j: block b sums to b + K(K-1)/2. */
    for (size_t b = 0; b < mib; b++) {
        uint64_t *w = data + b * words;
        w[0] = b;
        for (size_t j = 1; j < words; j++)
            w[j] = j;
        args[b] = (block_arg){w, words};
    }
    const uint64_t base = (uint64_t)words * (words - 1) / 2;
    for (int r = -1; r < reps; r++) {
        memset(sums, 0, mib * sizeof *sums);
        double t0 = now_s();
        int rc = B->map(main_pool, task_checksum, args, mib, sizeof *args, sums, sizeof *sums, 0);
        double t = now_s() - t0;
        if (rc) {
            failure("w8_gbps", "map failed: %d", rc);
            break;
        }
        for (size_t b = 0; b < mib; b++) {
            if (sums[b] != base + b) {
                failure("w8_gbps", "wrong checksum in block %d", (int)b);
                goto out;
            }
        }
        if (r >= 0)
            result("w8_gbps", bytes, (double)bytes / t / 1e9);
    }
out:
    if (data)
        B->big_free(data, bytes);
    free(args);
    free(sums);
}

int bench_main(const bench_backend *b, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    B = b;
    reps = (int)env_long("PP_BENCH_REPS", 5);
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    workers = (int)env_long("PP_BENCH_WORKERS", cpus > 0 ? cpus : 1);
    only = getenv("PP_BENCH_ONLY");
    if (only && !*only)
        only = NULL;
    printf("I\tside\t%s\n", b->side);
    printf("I\tworkers\t%d\n", b->serial ? 1 : workers);
    printf("I\tcpus\t%ld\n", cpus);
    printf("I\treps\t%d\n", reps);
    fflush(stdout);

    double start = now_s();
    bool needs_pool = false;
    for (int w = 1; w <= 8; w++)
        needs_pool |= w != 6 && w != 7 && selected(w);
    if (!b->serial && needs_pool) {
        main_pool = b->pool_new(workers);
        if (!main_pool) {
            failure("pool",
                    errno == ENOTSUP ? "pool_new failed: errno %d (ENOTSUP: "
                                       "backend not built into this library)"
                                     : "pool_new failed: errno %d",
                    errno);
            return 1;
        }
    }
    if (selected(1) && b->map)
        w1_map_square();
    if (selected(2) && !b->serial && b->map)
        w2_map_cs1();
    if (selected(3) && b->imap && b->iter_next && b->iter_free)
        w3_imap();
    if (selected(4) && b->apply_async && b->async_get && b->async_free)
        w4_apply_async();
    if (selected(5) && b->apply)
        w5_apply_latency();
    if (selected(6) && b->map && (b->serial || (b->pool_new && b->close_join)))
        w6_cpu_bound();
    if (selected(8) && b->map && b->big_alloc)
        w8_large_data();
    if (main_pool) {
        b->close_join(main_pool);
        b->pool_free(main_pool);
    }
    if (!b->serial && selected(7) && b->pool_new && b->apply && b->close_join)
        w7_lifecycle(); /* once no other pool exists */
    printf("I\tseconds\t%.1f\n", now_s() - start);
    return 0;
}
