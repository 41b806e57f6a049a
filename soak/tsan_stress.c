/*
 * tsan_stress: the parent side's threading under ThreadSanitizer (make
 * check-tsan). Criterion's sandbox cannot start under TSan (its arena wants
 * a fixed address TSan owns), so this is a plain program: several threads
 * share one pool and call everything at once — blocking maps, async maps
 * and applies with callbacks (run by the library thread), ordered and
 * unordered iterators (some freed half-way), cancels, stats — while another
 * thread SIGKILLs workers; then close, join, free. A second pool is
 * terminated while threads wait on it. On a third, two threads iterate
 * sources far past their windows while two others close and join it (the
 * joins take the rest of the sources). Exits non-zero on a wrong result;
 * TSan exits non-zero (exitcode=66) on a race or a lock-order problem.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <procpool.h>

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define THREADS 4
#define ROUNDS  12

static pp_pool *pool;
static _Atomic int bad, stop, callbacks;

static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    *(int *)result = x * x;
    return 0;
}

static int slow(const void *arg, void *result)
{
    (void)arg;
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
    *(int *)result = 1;
    return 0;
}

static void on_done(const void *result, void *userdata)
{
    const int *r = result;
    int n = *(int *)userdata;
    for (int i = 0; i < n; i++)
        if (r[i] != i * i)
            atomic_store(&bad, 1);
    atomic_fetch_add(&callbacks, 1);
}

static void on_error(const pp_error *err, void *userdata)
{
    (void)userdata;
    if (err->code != PP_ECRASH && err->code != PP_ECANCELED)
        atomic_store(&bad, 1);
    atomic_fetch_add(&callbacks, 1);
}

static void *client(void *arg)
{
    int id = (int)(long)arg;
    int in[256], out[256];
    for (int i = 0; i < 256; i++)
        in[i] = i;
    static int n256 = 256;
    for (int round = 0; round < ROUNDS; round++) {
        int rc = pp_map(pool, square, in, 256, sizeof(int), out, sizeof(int), 1 + round % 7, NULL);
        if (rc != 0 && rc != PP_ECRASH)
            atomic_store(&bad, 1);
        pp_async *a = pp_map_async(pool, square, in, 256, sizeof(int), sizeof(int), 8, on_done,
                                   on_error, &n256);
        pp_async *c = pp_apply_async(pool, slow, in, sizeof(int), sizeof(int), NULL, NULL, NULL);
        if (round % 3 == id % 3)
            pp_async_cancel(c);
        pp_iter *it = (round + id) % 2
                          ? pp_imap(pool, square, in, 256, sizeof(int), sizeof(int), 4)
                          : pp_imap_unordered(pool, square, in, 256, sizeof(int), sizeof(int), 4);
        int r, got = 0;
        size_t idx;
        while ((rc = pp_iter_next(it, &r, &idx, -1, NULL)) != 0) {
            if (rc == 1 && r != (int)(idx * idx))
                atomic_store(&bad, 1);
            if (++got == 100 && round % 2)
                break; /* freed half-way */
        }
        pp_iter_free(it);
        pp_async_wait(a, -1);
        pp_async_free(a);
        pp_async_get(c, &r, -1, NULL);
        pp_async_free(c);
        pp_stats st;
        pp_pool_stats(pool, &st);
    }
    return NULL;
}

static void *killer(void *arg)
{
    (void)arg;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", getpid(), getpid());
    while (!atomic_load(&stop)) {
        struct timespec ts = {0, 30000000};
        nanosleep(&ts, NULL);
        FILE *f = fopen(path, "r");
        int z = 0;
        if (f == NULL || fscanf(f, "%d", &z) != 1) {
            if (f)
                fclose(f);
            continue;
        }
        fclose(f);
        char wp[64];
        snprintf(wp, sizeof wp, "/proc/%d/task/%d/children", z, z);
        f = fopen(wp, "r");
        int w;
        if (f && fscanf(f, "%d", &w) == 1)
            kill(w, SIGKILL);
        if (f)
            fclose(f);
    }
    return NULL;
}

static void *waiter(void *arg)
{
    pp_pool *p = arg;
    int in[64], out[64];
    for (int i = 0; i < 64; i++)
        in[i] = i;
    int rc = pp_map(p, slow, in, 64, sizeof(int), out, sizeof(int), 1, NULL);
    if (rc != 0 && rc != PP_ECLOSED)
        atomic_store(&bad, 1);
    return NULL;
}

struct source {
    pp_iter *it;
    bool ordered;
    int next;
    _Atomic int handed; /* items the consumer got */
};

static int count_to_2000(void *state, void *arg)
{
    struct source *s = state;
    if (s->next == 2000)
        return 0;
    *(int *)arg = s->next++;
    return 1;
}

static void *consumer(void *arg)
{
    struct source *s = arg;
    int r, rc, want = 0;
    size_t idx;
    while ((rc = pp_iter_next(s->it, &r, &idx, -1, NULL)) != 0) {
        if (rc != 1 || (s->ordered && idx != (size_t)want) || r != (int)(idx * idx))
            atomic_store(&bad, 1);
        want++;
        atomic_fetch_add(&s->handed, 1);
    }
    if (want != 2000)
        atomic_store(&bad, 1);
    return NULL;
}

static void *closer(void *arg)
{
    pp_close(arg);
    if (pp_join(arg) != 0)
        atomic_store(&bad, 1);
    return NULL;
}

static void joins_while_sources_run(void)
{
    pp_pool *p3 = pp_pool_new(&(pp_options){.workers = 2});
    struct source s[2] = {{0}};
    pthread_t c[2], j[2];
    for (int i = 0; i < 2; i++) {
        s[i].ordered = i == 0;
        s[i].it = pp_imap_source(p3, square, count_to_2000, &s[i], sizeof(int), sizeof(int), 1, 16,
                                 s[i].ordered);
        pthread_create(&c[i], NULL, consumer, &s[i]);
    }
    while (atomic_load(&s[0].handed) < 50 || atomic_load(&s[1].handed) < 50)
        sched_yield();
    for (int i = 0; i < 2; i++)
        pthread_create(&j[i], NULL, closer, p3);
    for (int i = 0; i < 2; i++)
        pthread_join(j[i], NULL);
    for (int i = 0; i < 2; i++) {
        if (s[i].next != 2000) /* the joins took every item */
            atomic_store(&bad, 1);
        pthread_join(c[i], NULL);
        pp_iter_free(s[i].it);
    }
    pp_pool_free(p3);
}

int main(void)
{
    pool = pp_pool_new(&(pp_options){.workers = 3, .max_tasks_per_child = 50});
    if (pool == NULL)
        return 1;
    pthread_t t[THREADS], k;
    pthread_create(&k, NULL, killer, NULL);
    for (long i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, client, (void *)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    atomic_store(&stop, 1);
    pthread_join(k, NULL);
    pp_close(pool);
    pp_join(pool);
    pp_pool_free(pool);

    /* Terminate while three threads wait inside pp_map. */
    pp_pool *p2 = pp_pool_new(&(pp_options){.workers = 2});
    pthread_t w[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&w[i], NULL, waiter, p2);
    struct timespec ts = {0, 20000000};
    nanosleep(&ts, NULL);
    pp_terminate(p2);
    for (int i = 0; i < 3; i++)
        pthread_join(w[i], NULL);
    pp_pool_free(p2);
    joins_while_sources_run();
    printf("tsan_stress: %d callbacks, %s\n", atomic_load(&callbacks), bad ? "WRONG" : "ok");
    return bad;
}
