/*
 * soak: millions of tasks through one pool with max_tasks_per_child and
 * random SIGKILLs, watching the parent's RSS and accounting for every item.
 *
 *   soak [TASKS [MAX_TASKS_PER_CHILD [WORKERS [BATCH]]]]
 *   defaults: 20000000 1000 (online CPUs) 1000000
 *
 * Batches of BATCH items alternate between pp_map and pp_imap_unordered. A
 * thread SIGKILLs a random worker (a child of the pool's helper) every 2 to
 * 40 ms. After each batch: every item holds its correct result or was
 * charged PP_ECRASH; crashed items never outnumber kills. Prints one line
 * per batch (RSS, respawns, kills) and a summary; exits non-zero if any
 * item is missing or wrong, or if the RSS after the first four batches (two
 * of each kind: the warm-up) grew by more than 1 MiB by the end.
 */
#define _GNU_SOURCE
#include <procpool.h>

#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t expect(uint64_t i)
{
    return (i + 1) * 0x9E3779B97F4A7C15ull;
}

static int task(const void *arg, void *result)
{
    uint64_t i = *(const uint64_t *)arg;
    volatile uint64_t x = i; /* a little work, so kills land inside tasks */
    for (int k = 0; k < 200; k++)
        x = x * 6364136223846793005ull + 1;
    *(uint64_t *)result = expect(i);
    return 0;
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    if (f)
        fclose(f);
    return kib;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static _Atomic int stop;
static _Atomic long kills;

static int children_of(int pid, int *out, int max)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", pid, pid);
    FILE *f = fopen(path, "r");
    int n = 0;
    while (f && n < max && fscanf(f, "%d", &out[n]) == 1)
        n++;
    if (f)
        fclose(f);
    return n;
}

static void *killer(void *arg)
{
    (void)arg;
    uint64_t rng = (uint64_t)getpid() * 2654435761u | 1;
    int z[4];
    if (children_of(getpid(), z, 4) != 1)
        return NULL;
    while (!atomic_load(&stop)) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        struct timespec ts = {0, (long)(2 + rng % 39) * 1000000};
        nanosleep(&ts, NULL); /* random moments: that is the point here */
        int w[256];
        int n = children_of(z[0], w, 256);
        if (n > 0 && kill(w[(rng >> 8) % (uint64_t)n], SIGKILL) == 0)
            atomic_fetch_add(&kills, 1);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    uint64_t total = argc > 1 ? strtoull(argv[1], NULL, 10) : 20000000;
    unsigned long mtpc = argc > 2 ? strtoul(argv[2], NULL, 10) : 1000;
    int workers = argc > 3 ? atoi(argv[3]) : 0;
    uint64_t batch = argc > 4 ? strtoull(argv[4], NULL, 10) : 1000000;
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = workers, .max_tasks_per_child = mtpc});
    if (pool == NULL) {
        perror("pp_pool_new");
        return 1;
    }
    uint64_t *args = malloc(batch * sizeof *args);
    uint64_t *out = malloc(batch * sizeof *out);
    if (!args || !out)
        return 1;
    pthread_t kt;
    pthread_create(&kt, NULL, killer, NULL);
    double t0 = now_s();
    uint64_t done = 0, ok = 0, crashed = 0, bad = 0;
    long rss_first = -1, rss_min = 1L << 40, rss_max = 0, rss_last = 0;
    for (int b = 0; done < total; b++) {
        uint64_t n = total - done < batch ? total - done : batch;
        for (uint64_t i = 0; i < n; i++)
            args[i] = done + i;
        uint64_t bok = 0, bcrash = 0;
        if (b % 2 == 0) {
            memset(out, 0xff, n * sizeof *out);
            pp_error err;
            int rc = pp_map(pool, task, args, n, sizeof *args, out, sizeof *out, 10, &err);
            for (uint64_t i = 0; i < n; i++) {
                if (out[i] == expect(done + i))
                    bok++;
                else if (out[i] == ~(uint64_t)0)
                    bcrash++;
                else
                    bad++;
            }
            if ((rc != 0 && rc != PP_ECRASH) || (rc == 0) != (bcrash == 0) ||
                (rc != 0 && err.failed != bcrash))
                bad++;
        } else {
            unsigned char *seen = calloc(n, 1);
            pp_iter *it =
                pp_imap_unordered(pool, task, args, n, sizeof *args, sizeof(uint64_t), 10);
            uint64_t r;
            size_t idx;
            int rc;
            while ((rc = pp_iter_next(it, &r, &idx, -1, NULL)) != 0) {
                if (idx >= n || seen[idx]++) {
                    bad++;
                    continue;
                }
                if (rc == 1 && r == expect(done + idx))
                    bok++;
                else if (rc == PP_ECRASH)
                    bcrash++;
                else
                    bad++;
            }
            pp_iter_free(it);
            for (uint64_t i = 0; i < n; i++)
                bad += seen[i] != 1;
            free(seen);
        }
        done += n;
        ok += bok;
        crashed += bcrash;
        long rss = rss_kib();
        if (b == 3) /* both kinds of batch have run twice: warmed up */
            rss_first = rss;
        if (rss < rss_min)
            rss_min = rss;
        if (rss > rss_max)
            rss_max = rss;
        rss_last = rss;
        pp_stats st;
        pp_pool_stats(pool, &st);
        printf(
            "batch %3d %-14s %9llu items  ok %9llu  crashed %4llu  RSS %6ld KiB  respawned %6llu  "
            "kills %5ld  %.1f s\n",
            b, b % 2 ? "imap_unordered" : "map", (unsigned long long)n, (unsigned long long)bok,
            (unsigned long long)bcrash, rss, (unsigned long long)st.respawned, atomic_load(&kills),
            now_s() - t0);
        fflush(stdout);
    }
    atomic_store(&stop, 1);
    pthread_join(kt, NULL);
    pp_stats st;
    pp_pool_stats(pool, &st);
    long k = atomic_load(&kills);
    pp_pool_free(pool);
    free(args);
    free(out);
    int fail =
        bad != 0 || ok + crashed != total || crashed > (uint64_t)k || rss_last - rss_first > 1024;
    printf("soak: %llu tasks, max_tasks_per_child %lu, %d workers: %llu ok, %llu crashed, %llu "
           "wrong or missing; %ld kills, %llu respawns; parent RSS %ld KiB after four "
           "batches, %ld..%ld KiB, %ld KiB at the end; %.1f s -> %s\n",
           (unsigned long long)total, mtpc, st.workers, (unsigned long long)ok,
           (unsigned long long)crashed, (unsigned long long)bad, k,
           (unsigned long long)st.respawned, rss_first, rss_min, rss_max, rss_last, now_s() - t0,
           fail ? "FAIL" : "ok");
    return fail;
}
