/*
 * pthread_pool: a plain thread pool (one mutex + condvar job queue), the
 * baseline procpool's benchmarks compare against. See pthread_pool.h.
 *
 * Jobs are chunks of consecutive items. The queue is an intrusive FIFO list
 * under pool->mu; idle workers sleep on pool->work. Whoever waits for work
 * to finish (a map, an apply, an async handle, an iterator) owns a group:
 * a pending count and a condition variable (also under pool->mu) that the
 * worker finishing the group's job signals, only when someone is waiting.
 */
#define _GNU_SOURCE
#include "pthread_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct tp_job tp_job;

typedef struct tp_group {
    pthread_cond_t cond;
    size_t pending;  /* jobs queued or running */
    bool waiting;    /* the owner sleeps on cond */
    bool track_done; /* finished jobs go onto done_head (imap_unordered) */
    int rc;          /* first failure */
    tp_job *done_head, *done_tail;
} tp_group;

struct tp_job {
    tp_job *next; /* queue link, then done-list link */
    tp_fn *fn;
    const char *args;
    char *results;
    int *rcs; /* per-item return values, or NULL */
    size_t first, n, arg_size, result_size;
    tp_group *group;
    bool done;
};

struct tp_pool {
    pthread_mutex_t mu;
    pthread_cond_t work;
    tp_job *head, *tail;
    bool stop, joined;
    int nthreads;
    pthread_t *threads;
};

static void *worker_main(void *arg)
{
    tp_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->head && !p->stop)
            pthread_cond_wait(&p->work, &p->mu);
        tp_job *j = p->head;
        if (!j)
            break; /* stopping and nothing left */
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->mu);

        int rc = 0;
        const char *a = j->args;
        char *r = j->results;
        for (size_t i = 0; i < j->n; i++, a += j->arg_size, r += j->result_size) {
            int x = j->fn(a, r);
            if (j->rcs)
                j->rcs[i] = x;
            if (x && !rc)
                rc = x;
        }

        pthread_mutex_lock(&p->mu);
        tp_group *g = j->group;
        if (rc && !g->rc)
            g->rc = rc;
        j->done = true;
        if (g->track_done) {
            j->next = NULL;
            if (g->done_tail)
                g->done_tail->next = j;
            else
                g->done_head = j;
            g->done_tail = j;
        }
        g->pending--;
        if (g->waiting)
            pthread_cond_signal(&g->cond);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

tp_pool *tp_pool_new(int workers)
{
    if (workers <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        workers = c > 0 ? (int)c : 1;
    }
    tp_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->threads = calloc((size_t)workers, sizeof *p->threads);
    if (!p->threads) {
        free(p);
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    for (int i = 0; i < workers; i++) {
        int e = pthread_create(&p->threads[i], NULL, worker_main, p);
        if (e) {
            p->nthreads = i;
            tp_pool_free(p);
            errno = e;
            return NULL;
        }
    }
    p->nthreads = workers;
    return p;
}

int tp_pool_workers(const tp_pool *pool)
{
    return pool->nthreads;
}

int tp_close_join(tp_pool *p)
{
    if (p->joined)
        return 0;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    p->joined = true;
    return 0;
}

void tp_pool_free(tp_pool *p)
{
    if (!p)
        return;
    tp_close_join(p);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}

static void group_init(tp_group *g, size_t pending, bool track_done)
{
    memset(g, 0, sizeof *g);
    pthread_cond_init(&g->cond, NULL);
    g->pending = pending;
    g->track_done = track_done;
}

/* Appends jobs[0..count) to the queue and wakes enough workers. Lock held. */
static void enqueue_locked(tp_pool *p, tp_job *jobs, size_t count)
{
    for (size_t i = 0; i < count; i++)
        jobs[i].next = i + 1 < count ? &jobs[i + 1] : NULL;
    if (p->tail)
        p->tail->next = &jobs[0];
    else
        p->head = &jobs[0];
    p->tail = &jobs[count - 1];
    if (count == 1)
        pthread_cond_signal(&p->work);
    else
        pthread_cond_broadcast(&p->work);
}

/* Waits until the group has nothing pending. Lock held. */
static void wait_all_locked(tp_pool *p, tp_group *g)
{
    while (g->pending) {
        g->waiting = true;
        pthread_cond_wait(&g->cond, &p->mu);
    }
    g->waiting = false;
}

static size_t make_chunks(tp_job *jobs, tp_group *g, tp_fn *fn, const void *args, size_t n,
                          size_t arg_size, void *results, size_t result_size, size_t chunksize,
                          int *rcs)
{
    size_t c = 0;
    for (size_t first = 0; first < n; first += chunksize, c++) {
        tp_job *j = &jobs[c];
        memset(j, 0, sizeof *j);
        j->fn = fn;
        j->args = (const char *)args + first * arg_size;
        j->results = (char *)results + first * result_size;
        j->rcs = rcs ? rcs + first : NULL;
        j->first = first;
        j->n = n - first < chunksize ? n - first : chunksize;
        j->arg_size = arg_size;
        j->result_size = result_size;
        j->group = g;
    }
    return c;
}

static size_t default_chunksize(const tp_pool *p, size_t n)
{
    size_t d = 4 * (size_t)p->nthreads;
    size_t c = (n + d - 1) / d;
    return c ? c : 1;
}

int tp_map(tp_pool *p, tp_fn *fn, const void *args, size_t n, size_t arg_size, void *results,
           size_t result_size, size_t chunksize)
{
    if (n == 0)
        return 0;
    if (chunksize == 0)
        chunksize = default_chunksize(p, n);
    size_t nchunks = (n + chunksize - 1) / chunksize;
    tp_job *jobs = malloc(nchunks * sizeof *jobs);
    if (!jobs)
        return -ENOMEM;
    tp_group g;
    group_init(&g, nchunks, false);
    make_chunks(jobs, &g, fn, args, n, arg_size, results, result_size, chunksize, NULL);
    pthread_mutex_lock(&p->mu);
    enqueue_locked(p, jobs, nchunks);
    wait_all_locked(p, &g);
    pthread_mutex_unlock(&p->mu);
    pthread_cond_destroy(&g.cond);
    free(jobs);
    return g.rc;
}

int tp_apply(tp_pool *p, tp_fn *fn, const void *arg, size_t arg_size, void *result,
             size_t result_size)
{
    tp_job j;
    tp_group g;
    group_init(&g, 1, false);
    make_chunks(&j, &g, fn, arg, 1, arg_size, result, result_size, 1, NULL);
    pthread_mutex_lock(&p->mu);
    enqueue_locked(p, &j, 1);
    wait_all_locked(p, &g);
    pthread_mutex_unlock(&p->mu);
    pthread_cond_destroy(&g.cond);
    return g.rc;
}

struct tp_async {
    tp_pool *pool;
    tp_job job;
    tp_group group;
    size_t result_size;
    char *result;
    max_align_t data[]; /* the argument copy, then the result */
};

static size_t round_up(size_t x)
{
    size_t a = sizeof(max_align_t);
    return (x + a - 1) / a * a;
}

tp_async *tp_apply_async(tp_pool *p, tp_fn *fn, const void *arg, size_t arg_size,
                         size_t result_size)
{
    tp_async *a = malloc(sizeof *a + round_up(arg_size) + result_size);
    if (!a)
        return NULL;
    char *argcopy = (char *)a->data;
    a->pool = p;
    a->result_size = result_size;
    a->result = argcopy + round_up(arg_size);
    memcpy(argcopy, arg, arg_size);
    memset(a->result, 0, result_size);
    group_init(&a->group, 1, false);
    make_chunks(&a->job, &a->group, fn, argcopy, 1, arg_size, a->result, result_size, 1, NULL);
    pthread_mutex_lock(&p->mu);
    enqueue_locked(p, &a->job, 1);
    pthread_mutex_unlock(&p->mu);
    return a;
}

int tp_async_get(tp_async *a, void *result)
{
    pthread_mutex_lock(&a->pool->mu);
    wait_all_locked(a->pool, &a->group);
    pthread_mutex_unlock(&a->pool->mu);
    if (a->result_size)
        memcpy(result, a->result, a->result_size);
    return a->group.rc;
}

void tp_async_free(tp_async *a)
{
    if (!a)
        return;
    pthread_mutex_lock(&a->pool->mu);
    wait_all_locked(a->pool, &a->group);
    pthread_mutex_unlock(&a->pool->mu);
    pthread_cond_destroy(&a->group.cond);
    free(a);
}

struct tp_iter {
    tp_pool *pool;
    tp_group group;
    bool ordered;
    size_t nchunks, next_chunk; /* ordered: the chunk being read */
    tp_job *cur;                /* the chunk being read, or NULL */
    size_t pos;                 /* next item within cur */
    size_t result_size;
    tp_job *jobs;
    char *results;
    int *rcs;
};

tp_iter *tp_imap(tp_pool *p, tp_fn *fn, const void *args, size_t n, size_t arg_size,
                 size_t result_size, size_t chunksize, bool ordered)
{
    if (chunksize == 0)
        chunksize = 1;
    size_t nchunks = (n + chunksize - 1) / chunksize;
    tp_iter *it = calloc(1, sizeof *it);
    if (!it)
        return NULL;
    it->jobs = malloc((nchunks ? nchunks : 1) * sizeof *it->jobs);
    it->results = calloc(n ? n : 1, result_size ? result_size : 1);
    it->rcs = malloc((n ? n : 1) * sizeof *it->rcs);
    if (!it->jobs || !it->results || !it->rcs) {
        free(it->jobs);
        free(it->results);
        free(it->rcs);
        free(it);
        errno = ENOMEM;
        return NULL;
    }
    it->pool = p;
    it->ordered = ordered;
    it->nchunks = nchunks;
    it->result_size = result_size;
    group_init(&it->group, nchunks, !ordered);
    make_chunks(it->jobs, &it->group, fn, args, n, arg_size, it->results, result_size, chunksize,
                it->rcs);
    if (nchunks) {
        pthread_mutex_lock(&p->mu);
        enqueue_locked(p, it->jobs, nchunks);
        pthread_mutex_unlock(&p->mu);
    }
    return it;
}

int tp_iter_next(tp_iter *it, void *result, size_t *index)
{
    if (!it->cur || it->pos == it->cur->n) {
        tp_pool *p = it->pool;
        it->cur = NULL;
        if (it->next_chunk == it->nchunks)
            return 0;
        pthread_mutex_lock(&p->mu);
        if (it->ordered) {
            tp_job *j = &it->jobs[it->next_chunk];
            while (!j->done) {
                it->group.waiting = true;
                pthread_cond_wait(&it->group.cond, &p->mu);
            }
            it->cur = j;
        } else {
            while (!it->group.done_head) {
                it->group.waiting = true;
                pthread_cond_wait(&it->group.cond, &p->mu);
            }
            it->cur = it->group.done_head;
            it->group.done_head = it->cur->next;
            if (!it->group.done_head)
                it->group.done_tail = NULL;
        }
        it->group.waiting = false;
        pthread_mutex_unlock(&p->mu);
        it->next_chunk++;
        it->pos = 0;
    }
    size_t i = it->cur->first + it->pos++;
    if (it->result_size)
        memcpy(result, it->results + i * it->result_size, it->result_size);
    if (index)
        *index = i;
    int rc = it->rcs[i];
    if (rc)
        return rc > 0 ? -rc : rc;
    return 1;
}

void tp_iter_free(tp_iter *it)
{
    if (!it)
        return;
    pthread_mutex_lock(&it->pool->mu);
    wait_all_locked(it->pool, &it->group);
    pthread_mutex_unlock(&it->pool->mu);
    pthread_cond_destroy(&it->group.cond);
    free(it->jobs);
    free(it->results);
    free(it->rcs);
    free(it);
}
