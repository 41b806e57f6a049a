/*
 * iter: pp_imap, pp_imap_unordered and pp_imap_source.
 *
 * DESIGN: an iterator is one job whose items arrive in chunk records, each
 * holding the arguments, results and states of `chunksize` consecutive
 * items. Items are taken from the source only while fewer than `window`
 * are taken and not yet handed back, so a lazy source over any number of
 * items runs in constant memory; pp_imap over an array is the same with an
 * array source (whose arguments are read in place, not copied). The
 * source is called only in the caller's thread, never under the pool's
 * lock, so it may do anything. In order, the next item to hand back always
 * lies in the oldest record; unordered, finished items wait in a FIFO.
 *
 * Items come out in batches: a call that finds items ready under the lock
 * takes up to BATCH_ITEMS finished ones at once, and the calls after it hand
 * them back without the lock (one thread at a time uses an iterator, as the
 * API says, and a finished item's state and result no longer change). Their
 * books (states, counts, the unlinking of a record) are kept at the next
 * call that takes the lock; until then their records stay linked.
 */
#include "iter.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_WINDOW_MIN 1024
#define REC_ITEMS          512   /* items per record, unless one chunk is more */
#define REC_BYTES          65536 /* and their argument and result bytes */
#define BATCH_ITEMS        16    /* finished items taken under the lock at once */

struct ready_item {
    struct pp_chunkrec *rec;
    uint32_t i;
};

struct pp_iter {
    pp_pool *pool;
    struct pp_job *job;
    bool ordered;
    pp_source *source; /* NULL: the array below */
    void *state;
    const unsigned char *array;
    size_t array_n;
    size_t window, chunksize;
    size_t taken, returned;
    unsigned since_pump; /* items handed back since this iterator last pumped */
    size_t undealt;      /* items in records not dealt yet */
    bool source_done;
    bool refilling;                    /* a thread runs the source, lock dropped: others wait */
    pthread_t refiller;                /* that thread */
    bool unbounded;                    /* pp_join takes every item left, the window aside */
    struct pp_chunkrec *head, *tail;   /* records not fully handed back, in order */
    struct pp_chunkrec *dhead, *dtail; /* records not dealt yet */
    struct ready_item *rq;             /* unordered: finished, not handed back */
    size_t rq_head, rq_len, rq_cap;
    struct ready_item batch[BATCH_ITEMS]; /* finished items taken under the lock */
    unsigned batch_len, batch_next;       /* handed back: those before batch_next */
};

/* ---- records ---------------------------------------------------------------- */

struct rec_owner {
    struct pp_iter *it; /* NULL once the iterator is gone */
    bool linked;
    bool owns_args;
};

/* The record's owner data sits right before it, to keep iter.h small. */
struct rec_box {
    struct rec_owner o;
    struct pp_chunkrec rec;
};

static struct rec_box *box_of(struct pp_chunkrec *rec)
{
    return (struct rec_box *)((char *)rec - offsetof(struct rec_box, rec));
}

static void rec_free(struct pp_chunkrec *rec)
{
    free(rec->errs);
    free(box_of(rec)); /* states, results and arguments live in the same block */
}

void pp__iter_rec_maybe_free(struct pp_chunkrec *rec)
{
    struct rec_box *b = box_of(rec);
    if (!b->o.linked && rec->inflight == 0)
        rec_free(rec);
}

static size_t round16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* One allocation per record: the box, then results, arguments (unless they
 * are read in place from the caller's array) and per-item states. */
static struct pp_chunkrec *rec_new(struct pp_iter *it, size_t first, size_t cap)
{
    size_t a = it->job->arg_size, r = it->job->result_size;
    bool own_args = it->source != NULL;
    size_t head = round16(sizeof(struct rec_box));
    size_t rbytes = round16(cap * r), abytes = own_args ? round16(cap * a) : 0;
    unsigned char *mem = calloc(1, head + rbytes + abytes + cap);
    if (mem == NULL)
        return NULL;
    struct rec_box *b = (struct rec_box *)mem;
    struct pp_chunkrec *rec = &b->rec;
    b->o.it = it;
    b->o.owns_args = own_args;
    rec->first = first;
    rec->results = mem + head;
    rec->args =
        own_args ? mem + head + rbytes : (unsigned char *)it->array + first * a; /* read in place */
    rec->state = mem + head + rbytes + abytes;
    return rec;
}

/* ---- dispatcher hooks (mu held) ------------------------------------------------ */

size_t pp__iter_undealt(const struct pp_iter *it)
{
    return it->undealt;
}

bool pp__iter_take(struct pp_iter *it, struct pp_piece *p, size_t chunks)
{
    struct pp_chunkrec *rec = it->dhead;
    if (rec == NULL)
        return false;
    uint32_t count = rec->count - rec->dealt;
    if (count > it->chunksize * chunks)
        count = (uint32_t)(it->chunksize * chunks);
    *p = (struct pp_piece){
        .job = it->job, .rec = rec, .start = rec->first + rec->dealt, .count = count};
    rec->dealt += count;
    it->undealt -= count;
    if (rec->dealt == rec->count) {
        it->dhead = rec->dnext;
        if (it->dhead == NULL)
            it->dtail = NULL;
    }
    pp__piece_hold(p);
    return true;
}

static void push_ready(struct pp_iter *it, struct pp_chunkrec *rec, uint32_t i)
{
    if (it->ordered)
        return;
    if (it->rq_len == it->rq_cap) {
        size_t cap = it->rq_cap ? it->rq_cap * 2 : 256;
        struct ready_item *v = malloc(cap * sizeof *v);
        if (v == NULL)
            return; /* found again by the scan in take_unordered */
        for (size_t k = 0; k < it->rq_len; k++)
            v[k] = it->rq[(it->rq_head + k) % it->rq_cap];
        free(it->rq);
        it->rq = v;
        it->rq_cap = cap;
        it->rq_head = 0;
    }
    it->rq[(it->rq_head + it->rq_len) % it->rq_cap] = (struct ready_item){rec, i};
    it->rq_len++;
}

void pp__iter_ok(struct pp_chunkrec *rec, size_t start, size_t count)
{
    struct pp_iter *it = box_of(rec)->o.it;
    for (size_t k = 0; k < count; k++) {
        size_t i = start - rec->first + k;
        if (rec->state[i] != PP_ITEM_PENDING)
            continue;
        rec->state[i] = PP_ITEM_OK;
        if (it != NULL)
            push_ready(it, rec, (uint32_t)i);
    }
}

void pp__iter_fail(struct pp_chunkrec *rec, size_t index, const pp_error *err)
{
    struct pp_iter *it = box_of(rec)->o.it;
    size_t i = index - rec->first;
    if (rec->state[i] != PP_ITEM_PENDING)
        return;
    if (rec->errs == NULL)
        rec->errs = calloc(rec->count, sizeof *rec->errs);
    if (rec->errs != NULL) {
        rec->errs[i] = *err;
        rec->errs[i].failed = 1;
    }
    rec->state[i] = PP_ITEM_FAILED;
    if (it != NULL)
        push_ready(it, rec, (uint32_t)i);
}

void pp__iter_fail_undealt(struct pp_iter *it, int code, const char *why)
{
    struct pp_chunkrec *rec;
    while ((rec = it->dhead) != NULL) {
        it->dhead = rec->dnext;
        it->undealt -= rec->count - rec->dealt;
        for (uint32_t i = rec->dealt; i < rec->count; i++)
            pp__resolve_fail(it->job, rec, rec->first + i, code, 0, why);
        rec->dealt = rec->count;
    }
    it->dtail = NULL;
}

/* ---- taking items from the source (caller's thread) ------------------------------ */

/* Pulls item `idx` into `dst`; 1 = an item, 0 = the end. */
static int pull(struct pp_iter *it, unsigned char *dst, size_t idx)
{
    if (it->source == NULL)
        return idx < it->array_n ? 1 : 0;
    return it->source(it->state, dst) > 0 ? 1 : 0;
}

/* Refills come in batches, once half the window is free: one pump per
 * batch rather than one per item handed back. */
static bool wants_refill(const struct pp_iter *it)
{
    size_t out = it->taken - it->returned;
    return !it->source_done && (it->unbounded || out == 0 || out <= it->window / 2);
}

/* Items per record: whole chunks up to REC_ITEMS and REC_BYTES, at least
 * one chunk. */
static size_t rec_items(const struct pp_iter *it)
{
    size_t item_bytes = it->job->arg_size + it->job->result_size + 1;
    size_t items = REC_BYTES / item_bytes;
    if (items > REC_ITEMS)
        items = REC_ITEMS;
    items -= items % it->chunksize;
    if (items < it->chunksize)
        items = it->chunksize;
    return items < UINT32_MAX ? items : UINT32_MAX;
}

/* Why the pool runs no more items, or NULL if it does. Items an iterator
 * takes then fail at once with *code: its caller still gets every item of
 * the source back, each in its place, and the iteration ends. */
static const char *intake_refused(const pp_pool *pool, int *code)
{
    *code = PP_ECLOSED;
    if (pool->terminated)
        return "the pool was terminated";
    if (pool->quitting)
        return "the pool was joined before the iterator took this item";
    *code = PP_ESPAWN;
    return pool->broken ? "the pool can no longer run tasks" : NULL;
}

/* Fills rec from the source (the caller's code: never under our lock, and
 * one thread at a time, pp_join's and the iterator's user's). */
static uint32_t pull_into(struct pp_iter *it, struct pp_chunkrec *rec, size_t cap)
{
    pp_pool *pool = it->pool;
    size_t a = it->job->arg_size;
    uint32_t got = 0;
    if (it->source != NULL) {
        it->refilling = true;
        it->refiller = pthread_self();
        pthread_mutex_unlock(&pool->mu);
    }
    while (got < cap) {
        if (!pull(it, rec->args + got * a, it->taken + got)) {
            it->source_done = true;
            break;
        }
        got++;
    }
    if (it->source != NULL) {
        pthread_mutex_lock(&pool->mu);
        it->refilling = false;
        pthread_cond_broadcast(&pool->cond);
    }
    return got;
}

static void link_rec(struct pp_iter *it, struct pp_chunkrec *rec)
{
    box_of(rec)->o.linked = true;
    rec->prev = it->tail;
    if (it->tail)
        it->tail->next = rec;
    else
        it->head = rec;
    it->tail = rec;
    if (it->dtail)
        it->dtail->dnext = rec;
    else
        it->dhead = rec;
    it->dtail = rec;
}

/* Whether the source runs in this thread (and calls the pool). */
static bool in_own_source(const struct pp_iter *it)
{
    return it->refilling && pthread_equal(it->refiller, pthread_self());
}

static void wait_refill_done(struct pp_iter *it)
{
    while (it->refilling)
        pthread_cond_wait(&it->pool->cond, &it->pool->mu);
}

/* Takes items while the window allows, one record at a time. Called with
 * mu held; drops it around the source. */
static int refill(struct pp_iter *it)
{
    pp_pool *pool = it->pool;
    bool added = false;
    if (in_own_source(it)) /* its source asks it for an item: it would wait on itself */
        return -EDEADLK;
    wait_refill_done(it);
    if (!wants_refill(it))
        return 0;
    for (;;) {
        int code;
        const char *refused = intake_refused(pool, &code);
        size_t window = it->unbounded && !refused ? SIZE_MAX : it->window;
        if (it->source_done || it->taken - it->returned >= window)
            break;
        size_t room = window - (it->taken - it->returned);
        size_t cap = rec_items(it);
        if (cap > room)
            cap = room;
        struct pp_chunkrec *rec = rec_new(it, it->taken, cap);
        if (rec == NULL)
            return -ENOMEM;
        uint32_t got = pull_into(it, rec, cap);
        if (got == 0) {
            rec_free(rec);
            break;
        }
        rec->count = rec->unreturned = got;
        it->taken += got;
        it->job->n += got;
        it->undealt += got;
        pool->stats.submitted += got;
        link_rec(it, rec);
        /* Asked again: the pool may have stopped while the source ran. */
        if ((refused = intake_refused(pool, &code)) != NULL) {
            pp__iter_fail_undealt(it, code, refused);
            continue;
        }
        pp__enqueue(pool, it->job);
        added = true;
    }
    if (added)
        pp__pump_lean(pool);
    return 0;
}

void pp__iter_take_rest(pp_pool *pool)
{
    for (;;) {
        struct pp_iter *it = NULL;
        for (struct pp_job *job = pool->all; job != NULL && it == NULL; job = job->anext)
            if (job->iter != NULL && !job->iter->unbounded && !job->iter->source_done)
                it = job->iter;
        if (it == NULL)
            return;
        if (in_own_source(it)) { /* joined from its source: what it gives later fails */
            it->unbounded = true;
            continue;
        }
        if (it->refilling) { /* its user runs the source: look again after */
            pthread_cond_wait(&pool->cond, &pool->mu);
            continue;
        }
        it->unbounded = true;
        (void)refill(it); /* -ENOMEM: what is left fails when the caller gets there */
    }
}

/* ---- handing items back ------------------------------------------------------------ */

static void unlink_rec(struct pp_iter *it, struct pp_chunkrec *rec)
{
    if (rec->prev)
        rec->prev->next = rec->next;
    else
        it->head = rec->next;
    if (rec->next)
        rec->next->prev = rec->prev;
    else
        it->tail = rec->prev;
    box_of(rec)->o.linked = false;
    pp__iter_rec_maybe_free(rec);
}

/* Gives finished item i of rec to the caller. Returns 1 or the item's
 * failure code. For an item that succeeded it reads only what no other
 * thread writes once the item is finished: safe without the lock. */
static int give(const struct pp_iter *it, const struct pp_chunkrec *rec, uint32_t i, void *result,
                size_t *index, pp_error *err)
{
    size_t r = it->job->result_size;
    if (index)
        *index = rec->first + i;
    if (rec->state[i] == PP_ITEM_OK) {
        if (r)
            pp__copy_small(result, rec->results + i * r, r);
        if (err)
            pp__clear_error(err);
        return 1;
    }
    pp_error e = {.code = -ENOMEM, .index = rec->first + i, .failed = 1};
    if (rec->errs)
        e = rec->errs[i];
    if (err)
        *err = e;
    return e.code;
}

/* Keeps the books of the items handed back since the last locked call. */
static void settle_batch(struct pp_iter *it)
{
    for (unsigned k = 0; k < it->batch_next; k++) {
        struct pp_chunkrec *rec = it->batch[k].rec;
        rec->state[it->batch[k].i] = PP_ITEM_RETURNED;
        it->returned++;
        if (--rec->unreturned == 0)
            unlink_rec(it, rec);
    }
    it->since_pump += it->batch_next;
    it->batch_len = it->batch_next = 0;
}

/* Whether item i may be the batch's n-th: finished, and a failed one only
 * first, since that one is handed back at once, under the lock (its error
 * record is allocated under the lock when a failure comes). */
static bool batchable(const struct pp_chunkrec *rec, uint32_t i, unsigned n)
{
    return rec->state[i] == PP_ITEM_OK || (n == 0 && rec->state[i] != PP_ITEM_PENDING);
}

/* Takes the finished items that come next, up to a batch (mu held; at least
 * one is ready). In order: the run of finished items from the next one to
 * hand back, across records; unordered: the front of the FIFO. */
static void take_batch(struct pp_iter *it)
{
    unsigned n = 0;
    if (it->ordered) {
        struct pp_chunkrec *rec = it->head;
        for (size_t pos = it->returned; n < BATCH_ITEMS && rec != NULL;) {
            if (pos == rec->first + rec->count) {
                rec = rec->next;
                continue;
            }
            uint32_t i = (uint32_t)(pos - rec->first);
            if (!batchable(rec, i, n))
                break;
            it->batch[n++] = (struct ready_item){rec, i};
            pos++;
        }
    } else {
        while (n < BATCH_ITEMS && it->rq_len > 0) {
            struct ready_item ri = it->rq[it->rq_head];
            if (!batchable(ri.rec, ri.i, n))
                break;
            it->batch[n++] = ri;
            it->rq_head = (it->rq_head + 1) % it->rq_cap;
            it->rq_len--;
        }
    }
    it->batch_len = n;
    it->batch_next = 0;
}

static bool item_ready(void *arg)
{
    struct pp_iter *it = arg;
    if (it->ordered) {
        struct pp_chunkrec *rec = it->head;
        return rec != NULL && rec->state[it->returned - rec->first] != PP_ITEM_PENDING;
    }
    return it->rq_len > 0;
}

static bool next_ready(void *arg)
{
    struct pp_iter *it = arg;
    return item_ready(it) || (it->source_done && it->returned == it->taken) || wants_refill(it);
}

PP_API int pp_iter_next(pp_iter *it, void *result, size_t *index, double timeout, pp_error *err)
{
    if (it == NULL || (result == NULL && it->job->result_size != 0))
        return pp__call_error(err, -EINVAL, 0);
    if (it->batch_next < it->batch_len) { /* finished items: no lock (see the top) */
        struct ready_item ri = it->batch[it->batch_next++];
        return give(it, ri.rec, ri.i, result, index, err);
    }
    pp_pool *pool = it->pool;
    int64_t deadline = pp__deadline(timeout);
    pthread_mutex_lock(&pool->mu);
    settle_batch(it);
    int rc;
    bool gave = false;
    for (;;) {
        if ((rc = refill(it)) < 0)
            break;
        if (item_ready(it)) {
            /* Items that were ready cost no pump; but the workers meanwhile
             * drain their inboxes, so keep them fed while we hand back: a
             * pump every pp__collect_interval() items. */
            if (it->since_pump >= pp__collect_interval(pool)) {
                it->since_pump = 0;
                pp__pump_lean(pool);
            }
            take_batch(it);
            struct ready_item ri = it->batch[it->batch_next++];
            rc = give(it, ri.rec, ri.i, result, index, err);
            gave = true;
            break;
        }
        if (it->source_done && it->returned == it->taken) {
            rc = 0;
            break;
        }
        if (pool->ctl == NULL) { /* the pool was freed under us */
            rc = PP_ECLOSED;
            break;
        }
        if ((rc = pp__wait_lean(pool, next_ready, it, deadline)) < 0)
            break;
    }
    pthread_mutex_unlock(&pool->mu);
    if (!gave) /* the end (zeroed), a timeout, ENOMEM or a freed pool */
        pp__call_error(err, rc, 0);
    return rc;
}

/* ---- construction ---------------------------------------------------------------- */

static pp_iter *iter_new(pp_pool *pool, pp_fn *fn, bool batch, pp_source *source, void *state,
                         const void *array, size_t n, size_t arg_size, size_t result_size,
                         size_t chunksize, size_t window, bool ordered)
{
    pp_iter *it = calloc(1, sizeof *it);
    pthread_mutex_lock(&pool->mu); /* it guards the job cache too */
    struct pp_job *job = it ? pp__job_new(pool, fn, 0, arg_size, result_size, chunksize, 0) : NULL;
    if (job == NULL) {
        pthread_mutex_unlock(&pool->mu);
        free(it);
        errno = ENOMEM;
        return NULL;
    }
    job->refs = 1; /* only the handle: an iterator's job is never "ready" */
    job->iter = it;
    job->streaming = true;
    job->batch = batch;
    *it = (pp_iter){.pool = pool,
                    .job = job,
                    .ordered = ordered,
                    .source = source,
                    .state = state,
                    .array = array,
                    .array_n = n,
                    .chunksize = chunksize ? chunksize : 1};
    if (window == 0) {
        window = 64 * (size_t)pool->nworkers * it->chunksize;
        if (window < DEFAULT_WINDOW_MIN)
            window = DEFAULT_WINDOW_MIN;
    }
    it->window = window;
    int rc = pp__submit(pool, job);
    bool submitted = rc == 0;
    if (submitted)
        rc = refill(it);
    else {
        pp__job_discard(job);
        free(it);
    }
    pthread_mutex_unlock(&pool->mu);
    if (submitted && rc < 0) /* in the pool's books: freed as any iterator is */
        pp_iter_free(it);
    if (rc < 0) {
        errno = pp__submit_errno(rc);
        return NULL;
    }
    return it;
}

PP_API pp_iter *pp_imap(pp_pool *pool, pp_fn *fn, const void *args, size_t n, size_t arg_size,
                        size_t result_size, size_t chunksize)
{
    if (pool == NULL || fn == NULL || (args == NULL && arg_size != 0 && n != 0)) {
        errno = EINVAL;
        return NULL;
    }
    return iter_new(pool, fn, false, NULL, NULL, args, n, arg_size, result_size, chunksize, 0,
                    true);
}

PP_API pp_iter *pp_imap_unordered(pp_pool *pool, pp_fn *fn, const void *args, size_t n,
                                  size_t arg_size, size_t result_size, size_t chunksize)
{
    if (pool == NULL || fn == NULL || (args == NULL && arg_size != 0 && n != 0)) {
        errno = EINVAL;
        return NULL;
    }
    return iter_new(pool, fn, false, NULL, NULL, args, n, arg_size, result_size, chunksize, 0,
                    false);
}

PP_API pp_iter *pp_imap_source(pp_pool *pool, pp_fn *fn, pp_source *source, void *state,
                               size_t arg_size, size_t result_size, size_t chunksize, size_t window,
                               bool ordered)
{
    if (pool == NULL || fn == NULL || source == NULL) {
        errno = EINVAL;
        return NULL;
    }
    return iter_new(pool, fn, false, source, state, NULL, 0, arg_size, result_size, chunksize,
                    window, ordered);
}

pp_iter *pp__imap_piece(pp_pool *pool, pp_fn *fn, bool batch, const void *args, size_t n,
                        size_t arg_size, size_t result_size)
{
    return iter_new(pool, fn, batch, NULL, NULL, args, n, arg_size, result_size, n, 0, true);
}

PP_API void pp_iter_free(pp_iter *it)
{
    if (it == NULL)
        return;
    pp_pool *pool = it->pool;
    pthread_mutex_lock(&pool->mu);
    wait_refill_done(it); /* pp_join may be taking its items */
    struct pp_job *job = it->job;
    if (pool->ctl != NULL) /* what runs now finishes, and counts as cancelled */
        pp__job_cancel_queued(job);
    /* Undealt records are ours alone; dealt ones go when their work ends. */
    struct pp_chunkrec *rec = it->head, *next;
    for (; rec; rec = next) {
        next = rec->next;
        box_of(rec)->o.it = NULL;
        box_of(rec)->o.linked = false;
        pp__iter_rec_maybe_free(rec);
    }
    job->iter = NULL;
    pp__job_unref(job);
    pp__handle_gone(pool);
    bool dead = pp__pool_dead(pool);
    pthread_mutex_unlock(&pool->mu);
    if (dead)
        pp__pool_destroy(pool);
    free(it->rq);
    free(it);
}
