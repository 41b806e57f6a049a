/*
 * Parents with threads. Python forks the whole parent whenever a pool
 * (re)starts a worker, so a worker can inherit a lock another thread held at
 * that instant and deadlock. procpool forks the caller once per pool (the
 * helper, which is single-threaded and runs no user code); every worker,
 * first or replacement, is forked by the helper.
 *
 * Here 8 threads hammer malloc, stdio and their own mutexes while the main
 * thread creates a pool, maps over it with max_tasks_per_child 1 (a fresh
 * worker per task) and frees it, 200 rounds. Nothing may deadlock, and what
 * the threads wrote through stdio must reach its file exactly once.
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <procpool.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HAMMERS (getenv("PP_HAMMERS") ? atoi(getenv("PP_HAMMERS")) : 8)
#define ROUNDS  (getenv("PP_ROUNDS") ? atoi(getenv("PP_ROUNDS")) : getenv("PP_VALGRIND") ? 20 : 200)

struct hammer {
    pthread_t thread;
    int id;
    FILE *out; /* fully buffered, its own file */
    char path[64];
    pthread_mutex_t mu;
    long lines;
    long counter;
};

static _Atomic int stop;

static void *hammer(void *arg)
{
    struct hammer *h = arg;
    /* Lowest priority: they take every cycle the pool leaves idle (so they
     * hold their locks at any instant, forks included) without starving the
     * pool on a 2-core machine. */
    struct sched_param sp = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    uint64_t rng = 0x9e3779b9u * (uint64_t)(h->id + 1);
    void *keep[16] = {0};
    while (!atomic_load(&stop)) {
        uint64_t r = xorshift64(&rng);
        /* malloc: small and medium blocks, kept a while */
        size_t sz = (r & 7) == 0 ? (size_t)(r >> 8) % (32 << 10) : (size_t)(r >> 8) % 512;
        int k = (int)((r >> 40) & 15);
        free(keep[k]);
        keep[k] = malloc(sz + 1);
        if (keep[k]) /* a touch: the lock is what matters, not the pages */
            memset(keep[k], (int)r, sz + 1 < 64 ? sz + 1 : 64);
        /* stdio: a line into its own buffered file */
        fprintf(h->out, "hammer %d line %ld\n", h->id, h->lines++);
        /* its own mutex */
        pthread_mutex_lock(&h->mu);
        h->counter++;
        pthread_mutex_unlock(&h->mu);
    }
    for (int k = 0; k < 16; k++)
        free(keep[k]);
    return NULL;
}

static int task(const void *arg, void *result)
{
    int x = *(const int *)arg;
    char *buf = malloc(64 + (size_t)x * 100);
    if (buf == NULL)
        return 1;
    snprintf(buf, 64, "task %d", x);
    FILE *f = fopen("/dev/null", "w");
    if (f) {
        fprintf(f, "%s\n", buf);
        fclose(f);
    }
    free(buf);
    *(int *)result = x * 3 + 1;
    return 0;
}

/* Each hammer's file holds "hammer ID line 0..lines-1", each line once, in
 * order. A worker that flushed a copy of a parent's stdio buffer would have
 * written some of them again. Returns the number of lines out of place. */
static long check_file(struct hammer *h, char *why, size_t whylen)
{
    FILE *f = fopen(h->path, "r");
    if (f == NULL)
        return -1;
    char line[128];
    long want = 0, bad = 0;
    while (fgets(line, sizeof line, f)) {
        int id;
        long n;
        if (sscanf(line, "hammer %d line %ld", &id, &n) != 2 || id != h->id || n != want) {
            if (bad++ == 0)
                snprintf(why, whylen, "hammer %d: \"%.40s\" where line %ld was due", h->id, line,
                         want);
            continue;
        }
        want++;
    }
    fclose(f);
    if (want != h->lines && bad++ == 0)
        snprintf(why, whylen, "hammer %d: %ld lines of %ld", h->id, want, h->lines);
    return bad;
}

static void rounds_under_hammers(bool check_output)
{
    int nh = HAMMERS, rounds = ROUNDS;
    struct hammer h[16];
    cr_assert(nh <= 16);
    for (int i = 0; i < nh; i++) {
        h[i] = (struct hammer){.id = i};
        snprintf(h[i].path, sizeof h[i].path, "/tmp/pp-threads-%d-%d.txt", (int)getpid(), i);
        h[i].out = fopen(h[i].path, "w");
        cr_assert_not_null(h[i].out);
        setvbuf(h[i].out, NULL, _IOFBF, 1 << 16);
        pthread_mutex_init(&h[i].mu, NULL);
        cr_assert_eq(pthread_create(&h[i].thread, NULL, hammer, &h[i]), 0);
    }
    int in[8], out[8];
    for (int i = 0; i < 8; i++)
        in[i] = i;
    for (int round = 0; round < rounds; round++) {
        pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .max_tasks_per_child = 1});
        cr_assert_not_null(pool, "round %d", round);
        memset(out, 0, sizeof out);
        cr_assert_eq(pp_map(pool, task, in, 8, sizeof(int), out, sizeof(int), 1, NULL), 0,
                     "round %d", round);
        for (int i = 0; i < 8; i++)
            cr_assert_eq(out[i], 3 * i + 1);
        pp_stats st;
        pp_pool_stats(pool, &st);
        cr_assert_geq(st.respawned, 6, "round %d: %llu respawns", round,
                      (unsigned long long)st.respawned);
        if (round % 2)
            pp_close(pool);
        pp_pool_free(pool);
    }
    atomic_store(&stop, 1);
    long bad = 0;
    char why[256] = "";
    for (int i = 0; i < nh; i++) {
        pthread_join(h[i].thread, NULL);
        cr_assert_gt(h[i].counter, 0, "hammer %d never ran", i);
        fclose(h[i].out);
        if (check_output)
            bad += check_file(&h[i], why, sizeof why);
        unlink(h[i].path);
    }
    cr_assert_eq(bad, 0, "%ld lines written twice or lost; first: %s", bad, why);
}

Test(threads, pools_with_respawns_while_8_threads_hammer_malloc_stdio_mutexes,
     .timeout = PP_TEST_TIMEOUT(240))
{
    rounds_under_hammers(false);
}

/* Regression (fixed; it was in src/worker.c leave(), src/zygote.c): another thread of the parent
 * can write into a stdio buffer between pp_pool_new's fflush(NULL) and the
 * fork of the helper; the helper's copy of that buffer is inherited by every
 * worker, and each worker's leave() runs fflush(NULL), so those bytes reach
 * the file again once per retiring worker. */
Test(threads, parent_threads_stdio_output_appears_once, .timeout = PP_TEST_TIMEOUT(240))
{
    rounds_under_hammers(true);
}
