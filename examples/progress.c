/*
 * progress: a live progress bar for a long map, from pp_pool_stats.
 *
 * Python's Pool has no way to ask how far a map_async has got; people wrap
 * imap in tqdm. Here the map is submitted with pp_map_async and the main
 * thread polls pp_pool_stats every 100 ms (pp_async_wait with a 0.1 s
 * timeout doubles as the clock): on a terminal it redraws one line with a
 * bar, the rate and an ETA; when stdout is not a terminal (a pipe, a log
 * file) it prints a plain line every half second instead.
 *
 *     progress          # 200 items per worker, ~10 ms each: ~2 s
 *     progress 5000     # as many items as you like
 *
 * A few items fail on purpose (every 97th), to show that failures are
 * counted as they happen. Exits non-zero on any unexpected outcome.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

enum { FAIL_EVERY = 97, BAR = 30 };

/* An item of uneven length, 5 to 15 ms (a stand-in for real work), whose
 * result can be checked. */
static int work(const void *arg, void *result)
{
    long k = *(const long *)arg;
    if (k % FAIL_EVERY == FAIL_EVERY - 1)
        return pp_fail(1, "item %ld: no good", k);
    long ms = 5 + (k * 7919) % 11;
    nanosleep(&(struct timespec){.tv_nsec = ms * 1000000L}, NULL);
    *(long *)result = k * k;
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static unsigned long long finished(const pp_stats *s)
{
    return s->completed + s->failed + s->crashed + s->timed_out + s->cancelled;
}

/* One report. `base` is the pool's stats before the map, so the numbers
 * are this map's even in a pool that ran other work before. */
static void report(bool tty, const pp_stats *base, const pp_stats *st, size_t total, double t0,
                   bool last)
{
    unsigned long long done = finished(st) - finished(base);
    unsigned long long bad = done - (st->completed - base->completed);
    double elapsed = now() - t0;
    double rate = elapsed > 0 ? (double)done / elapsed : 0;
    double eta = rate > 0 ? (double)(total - done) / rate : 0;
    int pct = total ? (int)(100 * done / total) : 100;
    if (tty) {
        char bar[BAR + 1];
        int fill = total ? (int)(BAR * done / total) : BAR;
        for (int i = 0; i < BAR; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[BAR] = '\0';
        /* \r back to the line's start, \033[K clears what a longer line left */
        printf("\r[%s] %3d%%  %llu/%zu  %.0f items/s  ", bar, pct, done, total, rate);
        if (last)
            printf("%.1f s", elapsed);
        else
            printf("ETA %.1f s", eta);
        printf("  failed %llu  running %llu\033[K%s", bad, (unsigned long long)st->running,
               last ? "\n" : "");
    } else {
        printf("%3d%%  %llu/%zu done, %llu failed, %llu running, %llu queued, %.0f items/s, "
               "%s %.1f s\n",
               pct, done, total, bad, (unsigned long long)st->running,
               (unsigned long long)st->queued, rate, last ? "took" : "ETA", last ? elapsed : eta);
    }
    fflush(stdout);
}

int main(int argc, char **argv)
{
    pp_pool *pool = pp_pool_new(NULL); /* a worker per CPU; 200 items each */
    if (pool == NULL) {
        perror("pp_pool_new");
        return 1;
    }
    pp_stats base;
    pp_pool_stats(pool, &base);
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 200 * (size_t)base.workers;
    long *in = malloc(n * sizeof *in), *out = malloc(n * sizeof *out);
    if (n == 0 || in == NULL || out == NULL) {
        fprintf(stderr, "usage: %s [items > 0]\n", argv[0]);
        return 1;
    }
    for (size_t i = 0; i < n; i++)
        in[i] = (long)i;

    /* chunksize 1: pp_pool_stats counts an item when its chunk ends, so
     * small chunks make a smooth bar (the items are long enough that the
     * per-chunk cost does not matter). */
    double t0 = now();
    pp_async *a = pp_map_async(pool, work, in, n, sizeof in[0], sizeof out[0], 1, NULL, NULL, NULL);
    if (a == NULL) {
        perror("pp_map_async");
        return 1;
    }
    bool tty = isatty(STDOUT_FILENO);
    int ticks = 0;
    pp_stats st;
    while (pp_async_wait(a, 0.1) == -ETIMEDOUT) /* every 100 ms until it is done */
        if (pp_pool_stats(pool, &st) == 0 && (tty || ++ticks % 5 == 0))
            report(tty, &base, &st, n, t0, false);
    pp_pool_stats(pool, &st);
    report(tty, &base, &st, n, t0, true);

    pp_error err;
    int rc = pp_async_get(a, out, 0, &err);
    size_t expect_failed = n / FAIL_EVERY;
    int status = 0;
    if (expect_failed ? rc != PP_ETASK || err.failed != expect_failed : rc != 0) {
        fprintf(stderr, "unexpected: %s, %zu failed\n", pp_strerror(rc), err.failed);
        status = 1;
    } else if (expect_failed) {
        printf("%zu items failed as planned; the first: %s\n", err.failed, err.message);
    }
    for (size_t i = 0; i < n; i++)
        if ((long)i % FAIL_EVERY != FAIL_EVERY - 1 && out[i] != (long)(i * i)) {
            fprintf(stderr, "item %zu: wrong result %ld\n", i, out[i]);
            status = 1;
            break;
        }
    if (finished(&st) - finished(&base) != n) {
        fprintf(stderr, "the stats lost items\n");
        status = 1;
    }
    pp_async_free(a);
    pp_close(pool);
    pp_join(pool);
    pp_pool_free(pool);
    free(in);
    free(out);
    return status;
}
