/*
 * dispatch: moving work between the parent's books and the workers' rings.
 *
 * DESIGN: pp__pump is the one place where the parent touches the control
 * block. It reads what the zygote said (deaths, see supervise.c), drains
 * every outbox, kills tasks past their time limit, then deals: idle
 * workers first, then every worker topped up to a few chunks, and when
 * nothing is left to deal, a chunk still waiting behind a busy worker is
 * withdrawn and handed to an idle one. Any thread that holds pool->mu may
 * pump; which one does is irrelevant to correctness.
 *
 * Nothing read from shared memory is trusted: a message names an inbox
 * position, which must be one we dealt and have not settled, and an item,
 * which must lie inside that chunk; result bytes are copied from the place
 * we chose for them, never from an address a worker wrote.
 */
#include "iter.h"
#include "pool.h"
#include "shm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEPTH_SMALL 48 /* inbox depth for chunks that fit inline */
#define DEPTH_LARGE 2
/* Unfinished entries a lean pump leaves with the lead worker (4 halved W3
 * on one CPU: the caller and the lead handed over every 64 items). */
#define DEPTH_LEAD 16
/* Submissions that deal without collecting stay within this of the last
 * collect (pp__pump_submit). */
#define QUICK_PUMPS_MAX_NS 100000
/* ... as every this many-th of them reads the clock (deal_by_books). */
#define QUICK_PUMPS_PER_CLOCK 4

/* ---- resolution ------------------------------------------------------- */

void pp__job_settle(struct pp_job *job)
{
    pp_pool *pool = job->pool;
    if (job->complete || job->resolved < job->n || job->streaming)
        return;
    job->complete = true;
    if (!job->orphaned && (job->callback != NULL || job->error_callback != NULL)) {
        job->cbnext = NULL;
        if (pool->cbtail)
            pool->cbtail->cbnext = job;
        else
            pool->cbhead = job;
        pool->cbtail = job;
        pp__wake_thread(pool);
        return;
    }
    job->ready = true;
    pool->progress = true;
    pp__job_unref(job); /* the pool's hold */
}

static void count_failure(pp_pool *pool, int code)
{
    if (code == PP_ECRASH)
        pool->stats.crashed++;
    else if (code == PP_ETIMEOUT)
        pool->stats.timed_out++;
    else if (code == PP_ECANCELED)
        pool->stats.cancelled++;
    else
        pool->stats.failed++;
}

void pp__resolve_fail(struct pp_job *job, struct pp_chunkrec *rec, size_t index, int code,
                      int status, const char *text)
{
    if (job->complete)
        return;
    job->pool->progress = true;
    pp_error e = {.code = code, .status = status, .index = index};
    snprintf(e.message, sizeof e.message, "%s", text ? text : pp_strerror(code));
    job->resolved++;
    job->nfailed++;
    if (job->nfailed == 1 || index < job->err_index) {
        job->err_code = code;
        job->err_index = index;
        if (job->err == NULL)
            job->err = malloc(sizeof *job->err);
        if (job->err != NULL)
            *job->err = e;
    }
    count_failure(job->pool, code);
    job->some_cancelled |= code == PP_ECANCELED;
    if (rec != NULL)
        pp__iter_fail(rec, index, &e);
}

void pp__resolve_ok(struct pp_job *job, size_t count)
{
    job->pool->progress = true;
    job->resolved += count;
    job->pool->stats.completed += count;
}

/* Fails every item of `p` that has not been resolved yet; `already` of them
 * were (FAIL messages). The lowest failing index is the piece's start. */
void pp__fail_piece(struct pp_piece *p, uint32_t already, int code, const char *why)
{
    struct pp_job *job = p->job;
    if (job->complete)
        return;
    if (p->rec != NULL) {
        for (uint32_t i = 0; i < p->count; i++)
            if (p->rec->state[p->start - p->rec->first + i] == PP_ITEM_PENDING)
                pp__resolve_fail(job, p->rec, p->start + i, code, 0, why);
        return;
    }
    size_t left = p->count - already;
    if (left == 0)
        return;
    pp__resolve_fail(job, NULL, p->start, code, 0, why);
    job->resolved += left - 1;
    job->nfailed += left - 1;
    for (size_t i = 1; i < left; i++)
        count_failure(job->pool, code);
}

/* Whether the guard after an entry's results in our payload, if it has
 * one, is as we wrote it. */
static bool guard_intact(const pp_pool *pool, const struct pp_dealt *d)
{
    return d->canary == NULL || memcmp(d->canary, pool->guard, PP_GUARD) == 0;
}

/* ---- pieces --------------------------------------------------------------- */

void pp__piece_hold(struct pp_piece *p)
{
    p->job->inflight++;
    if (p->rec != NULL)
        p->rec->inflight++;
}

void pp__piece_release(pp_pool *pool, struct pp_piece *p)
{
    (void)pool;
    p->job->inflight--;
    if (p->rec != NULL) {
        p->rec->inflight--;
        pp__iter_rec_maybe_free(p->rec);
    }
    pp__job_maybe_free(p->job);
}

/* ---- the retry ring ----------------------------------------------------- */

void pp__retry_push_front(pp_pool *pool, struct pp_piece p)
{
    struct pp_retry *r = &pool->retry;
    if (r->len == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 64;
        struct pp_piece *v = malloc(cap * sizeof *v);
        if (v == NULL) { /* cannot requeue: fail it rather than lose it */
            pp__fail_piece(&p, 0, -ENOMEM, "out of memory requeueing work");
            pp__job_settle(p.job);
            pp__piece_release(pool, &p);
            return;
        }
        for (size_t i = 0; i < r->len; i++)
            v[i] = r->v[(r->head + i) % r->cap];
        free(r->v);
        r->v = v;
        r->cap = cap;
        r->head = 0;
    }
    r->head = (r->head + r->cap - 1) % r->cap;
    r->v[r->head] = p;
    r->len++;
}

/* Items [from, count) of `p` go back to the front of the queue, held. */
static void requeue_from(pp_pool *pool, const struct pp_piece *p, uint32_t from)
{
    struct pp_piece rest = *p;
    rest.start += from;
    rest.count -= from;
    pp__piece_hold(&rest);
    pp__retry_push_front(pool, rest);
}

static bool retry_pop(pp_pool *pool, struct pp_piece *p)
{
    struct pp_retry *r = &pool->retry;
    if (r->len == 0)
        return false;
    *p = r->v[r->head];
    r->head = (r->head + 1) % r->cap;
    r->len--;
    return true;
}

/* ---- the job queue ------------------------------------------------------ */

void pp__enqueue(pp_pool *pool, struct pp_job *job)
{
    if (job->queued)
        return;
    job->queued = true;
    job->qnext = NULL;
    if (pool->qtail)
        pool->qtail->qnext = job;
    else
        pool->qhead = job;
    pool->qtail = job;
}

/* Takes a job out of the queue wherever it is (cancellation: rare). */
void pp__dequeue(pp_pool *pool, struct pp_job *job)
{
    if (!job->queued)
        return;
    struct pp_job *prev = NULL;
    for (struct pp_job *j = pool->qhead; j != NULL; prev = j, j = j->qnext) {
        if (j != job)
            continue;
        if (prev)
            prev->qnext = j->qnext;
        else
            pool->qhead = j->qnext;
        if (pool->qtail == j)
            pool->qtail = prev;
        break;
    }
    job->queued = false;
}

static void dequeue_head(pp_pool *pool)
{
    struct pp_job *job = pool->qhead;
    pool->qhead = job->qnext;
    if (pool->qhead == NULL)
        pool->qtail = NULL;
    job->queued = false;
}

/* The most items of one job that fit a piece's payload budget. */
static size_t piece_limit(pp_pool *pool, const struct pp_job *job)
{
    size_t per = job->arg_size + job->result_size;
    size_t budget = pool->piece_budget;
    size_t lim = per ? budget / per : SIZE_MAX;
    if (lim > UINT32_MAX)
        lim = UINT32_MAX;
    return lim ? lim : 1;
}

/* Chunks of one item cost the parent as much as big ones: a job with many
 * left to deal gives up to BATCH_MAX of them to one inbox entry. Its items
 * are still claimed one by one, so an idle worker gets the ones not yet
 * started (steal) and an iterator sees the finished ones (harvest). */
#define BATCH_MAX 16

static size_t batch_for(const pp_pool *pool, const struct pp_job *job)
{
    /* A worker's task and memory limits count chunks: keep them per item. */
    if (job->chunksize != 1 || pool->opts.max_tasks_per_child != 0 ||
        pool->opts.max_memory_per_child != 0)
        return 1;
    size_t undealt = job->iter != NULL ? pp__iter_undealt(job->iter) : job->n - job->next;
    size_t per = job->arg_size + job->result_size;
    size_t b = undealt / (4 * (size_t)pool->nworkers);
    if (per != 0 && b > PP_INLINE / per)
        b = PP_INLINE / per;
    return b < 1 ? 1 : b > BATCH_MAX ? BATCH_MAX : b;
}

/* Takes the next piece to run: requeued work first, then jobs in order,
 * `batch` chunks at most (see batch_for). */
static bool next_piece(pp_pool *pool, struct pp_piece *p, bool batch)
{
    bool got;
    while ((got = retry_pop(pool, p)) && p->job->cancelled) {
        pp__fail_piece(p, 0, PP_ECANCELED, "cancelled");
        pp__job_settle(p->job);
        pp__piece_release(pool, p);
    }
    if (!got) {
        for (;;) {
            struct pp_job *job = pool->qhead;
            if (job == NULL)
                return false;
            size_t chunks = batch ? batch_for(pool, job) : 1;
            if (job->iter != NULL) {
                if (!job->cancelled && pp__iter_take(job->iter, p, chunks))
                    break;
                dequeue_head(pool);
                continue;
            }
            if (job->cancelled || job->next >= job->n) {
                dequeue_head(pool);
                continue;
            }
            size_t count = job->chunksize * chunks;
            if (count > job->n - job->next)
                count = job->n - job->next;
            *p = (struct pp_piece){.job = job, .start = job->next, .count = (uint32_t)count};
            job->next += count;
            pp__piece_hold(p);
            break;
        }
    }
    size_t lim = piece_limit(pool, p->job);
    if (p->count > lim) { /* too big for the payload area: split it */
        struct pp_piece rest = *p;
        rest.start += lim;
        rest.count -= (uint32_t)lim;
        p->count = (uint32_t)lim;
        pp__piece_hold(&rest);
        pp__retry_push_front(pool, rest);
    }
    return true;
}

bool pp__next_piece(pp_pool *pool, struct pp_piece *p)
{
    return next_piece(pool, p, false); /* elsewhere: no steal, no harvest */
}

/* ---- posting -------------------------------------------------------------- */

static const unsigned char *piece_args(const struct pp_piece *p)
{
    const struct pp_job *job = p->job;
    if (job->arg_size == 0) /* no arguments: the pointer may be NULL */
        return p->rec != NULL ? p->rec->args : job->args;
    if (p->rec != NULL)
        return p->rec->args + (p->start - p->rec->first) * job->arg_size;
    return job->args + p->start * job->arg_size;
}

const unsigned char *pp__piece_args(const struct pp_piece *p)
{
    return piece_args(p);
}

static unsigned char *piece_results(const struct pp_piece *p)
{
    const struct pp_job *job = p->job;
    if (job->result_size == 0) /* no results: the pointer may be NULL */
        return p->rec != NULL ? p->rec->results : job->results;
    if (p->rec != NULL)
        return p->rec->results + (p->start - p->rec->first) * job->result_size;
    return job->results + p->start * job->result_size;
}

static size_t round16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* Asks for the lines of the inbox entry at `pos` (its descriptor, a line of
 * its own, and the first line of its inline bytes) for writing, ahead of the
 * post that will write them. The worker last wrote them a ring ago (its
 * claim, a result), so each store of that post would wait for a crossing to
 * the worker's CPU, and the fence of the wake-up check for the slowest of
 * them; fetched now, while the caller is away, they are ours by then. W4,
 * 3 x 5 alternating runs on the 2-CPU Xeon VM: 3.50 -> 3.72 M tasks/s (the
 * same with either line alone; 4.0-4.2 M once descriptors had a line each;
 * level in other moments of that VM: docs/performance.md); W2, W3 and W5
 * unchanged. */
static void prefetch_next_entry(struct pp_slot *s, uint32_t pos)
{
    uint32_t i = pos & PP_RING_MASK;
    __builtin_prefetch(&s->in[i], 1);
    __builtin_prefetch(s->inl[i], 1);
}

/* Writes piece `p` into worker `id`'s next inbox entry. Arguments and
 * results already in the shared arena cross with no copy; the rest is
 * copied into the entry itself or into a payload block. Returns 0, or
 * -ENOMEM when no payload block is free now (nothing was posted). */
static int post(pp_pool *pool, int id, const struct pp_piece *p)
{
    struct pp_worker *w = &pool->w[id];
    struct pp_slot *s = &pool->ctl->slot[id];
    uint32_t pos = w->tail, i = pos & PP_RING_MASK;
    const struct pp_job *job = p->job;
    size_t abytes = p->count * job->arg_size, rbytes = p->count * job->result_size;
    const unsigned char *src = piece_args(p);
    unsigned char *dst = piece_results(p);
    bool args_direct = abytes == 0 || pp__shm_contains(src, abytes);
    bool res_direct = rbytes == 0 || pp__shm_contains(dst, rbytes);
    /* Arguments, then results, then a guard: a task that writes past its
     * result_size (by up to PP_GUARD bytes) hits the guard, and the chunk
     * is reported, before it reaches anything that is not its own. */
    size_t aspan = args_direct ? 0 : round16(abytes);
    size_t need = aspan + (res_direct ? 0 : round16(rbytes) + PP_GUARD);

    struct pp_dealt *d = &w->dealt[i];
    *d = (struct pp_dealt){.piece = *p, .posted_ns = pool->pump_ns};
    d->run = p->one_by_one ? 1 : (p->count + 15) / 16; /* as run_batch claims */
    unsigned char *buf = s->inl[i];
    if (need > sizeof s->inl[i]) {
        if (pp__payload_alloc(&pool->payload, need, &d->extent) < 0)
            return -ENOMEM;
        buf = d->extent.p;
    }
    const unsigned char *args = src;
    if (!args_direct) {
        memcpy(buf, src, abytes);
        args = buf;
    }
    d->results_in_place = res_direct;
    d->res_addr = dst;
    if (!res_direct) {
        d->res_addr = buf + aspan;
        d->canary = d->res_addr + round16(rbytes);
        /* Four cache lines per chunk otherwise: small tasks feel them. */
        if (buf != s->inl[i] || w->guard_ok[i] != d->canary)
            memcpy(d->canary, pool->guard, PP_GUARD);
    }
    w->guard_ok[i] = NULL;

    struct pp_desc *desc = &s->in[i];
    desc->count = p->count;
    desc->fn = job->fncode;
    desc->args = (uint64_t)(uintptr_t)args;
    desc->results = (uint64_t)(uintptr_t)d->res_addr;
    desc->arg_size = job->arg_size;
    desc->result_size = job->result_size;
    atomic_store_explicit(&desc->claim, 0, memory_order_relaxed);
    desc->flags = (res_direct ? 0 : PP_DESC_GUARDED) | (job->batch ? PP_DESC_BATCH : 0) |
                  (p->one_by_one ? PP_DESC_ONE_BY_ONE : 0);
    atomic_store_explicit(&desc->state, PP_DESC_POSTED, memory_order_relaxed);
    atomic_store_explicit(&s->in_tail, pos + 1, memory_order_release);
    w->tail = pos + 1;
    w->unwoken = true;
    prefetch_next_entry(s, pos + 1);
    return 0;
}

static uint32_t pending(const struct pp_worker *w)
{
    return w->tail - w->retired;
}

/* Entries a worker still runs or has to run: pending ones less those
 * settled or taken back and not retired yet. */
static uint32_t live(const struct pp_worker *w)
{
    uint32_t n = 0;
    for (uint32_t pos = w->retired; pos != w->tail; pos++) {
        const struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
        n += !d->done && !d->withdrawn;
    }
    return n;
}

static uint32_t depth_for(const struct pp_piece *p)
{
    const struct pp_job *job = p->job;
    size_t bytes = p->count * (job->arg_size + job->result_size);
    return (bytes <= PP_INLINE && p->count <= 16) ? DEPTH_SMALL : DEPTH_LARGE;
}

/* Posts `p` to worker `id` if its inbox takes it. */
static bool try_post(pp_pool *pool, int id, struct pp_piece *p, uint32_t depth)
{
    struct pp_worker *w = &pool->w[id];
    if (w->state != PP_WS_READY || pending(w) >= depth || pending(w) >= PP_RING)
        return false;
    return post(pool, id, p) == 0;
}

/* One wake-up per worker per deal, however many entries it got. */
static void wake_dealt(pp_pool *pool)
{
    for (int id = 0; id < pool->nworkers; id++)
        if (pool->w[id].unwoken && pool->w[id].state == PP_WS_READY) {
            pool->w[id].unwoken = false;
            pp__ring_wake_worker(&pool->ctl->slot[id]);
        }
}

/* The worker lean pumps deal to: the same one while it is ready. */
static int lead_worker(pp_pool *pool)
{
    if (pool->lead < pool->nworkers && pool->w[pool->lead].state == PP_WS_READY)
        return pool->lead;
    for (int id = 0; id < pool->nworkers; id++)
        if (pool->w[id].state == PP_WS_READY)
            return pool->lead = id;
    return -1;
}

/* Entries of worker `id` it has not finished (its in_head moves past an
 * entry once the entry ran). */
static uint32_t unfinished(pp_pool *pool, int id)
{
    struct pp_worker *w = &pool->w[id];
    uint32_t head = atomic_load_explicit(&pool->ctl->slot[id].in_head, memory_order_acquire);
    if (head - w->retired > w->tail - w->retired) /* a scribbled word */
        return w->tail - w->retired;
    return w->tail - head;
}

/* A lean deal (pp__pump_lean): to the lead worker alone, up to DEPTH_LEAD
 * unfinished entries; the rest waits in the queue for the next pump. */
static void deal_lean(pp_pool *pool)
{
    if (pool->retry.len == 0 && pool->qhead == NULL)
        return;
    int id = lead_worker(pool);
    struct pp_piece p;
    while (id >= 0 && unfinished(pool, id) < DEPTH_LEAD && next_piece(pool, &p, true))
        if (!try_post(pool, id, &p, depth_for(&p))) {
            pp__retry_push_front(pool, p);
            break;
        }
    wake_dealt(pool);
}

/* Whether some ready worker's inbox takes another small entry (by the
 * parent's books). */
static bool has_room(const pp_pool *pool)
{
    for (int id = 0; id < pool->nworkers; id++)
        if (pool->w[id].state == PP_WS_READY && pending(&pool->w[id]) < DEPTH_SMALL)
            return true;
    return false;
}

/* Deals until every ready worker holds enough or nothing is left. */
static void deal(pp_pool *pool)
{
    if (pool->retry.len == 0 && pool->qhead == NULL)
        return;
    if (!has_room(pool))
        return;
    struct pp_piece p;
    bool have = next_piece(pool, &p, true);
    /* Idle workers first. */
    for (int id = 0; have && id < pool->nworkers; id++)
        if (pending(&pool->w[id]) == 0 && try_post(pool, id, &p, 1))
            have = next_piece(pool, &p, true);
    /* Then one more each, round after round, up to the depth. */
    bool progress = true;
    while (have && progress) {
        progress = false;
        for (int id = 0; have && id < pool->nworkers; id++)
            if (try_post(pool, id, &p, depth_for(&p))) {
                progress = true;
                have = next_piece(pool, &p, true);
            }
    }
    if (have)
        pp__retry_push_front(pool, p);
    wake_dealt(pool);
}

/* Takes back the newest unclaimed entry of the busiest worker, for an idle
 * one. Only entries the worker has not claimed can be taken (CAS). */
/* A worker whose only entry has waited PP_UNCLAIMED_NS unclaimed is not
 * running (stopped, or starved): the entry may go to an idle worker. Its
 * state word says whether it was claimed; the CAS in withdraw_from decides. */
static bool lone_unclaimed(pp_pool *pool, int id)
{
    struct pp_worker *w = &pool->w[id];
    if (live(w) != 1)
        return false;
    for (uint32_t pos = w->retired; pos != w->tail; pos++) {
        struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
        if (!d->done && !d->withdrawn)
            return pool->pump_ns - d->posted_ns > PP_UNCLAIMED_NS &&
                   atomic_load(&pool->ctl->slot[id].in[pos & PP_RING_MASK].state) == PP_DESC_POSTED;
    }
    return false;
}

/* Takes back up to `most` of the newest unclaimed entries of worker
 * `victim`; they wait at the front of the retry ring, oldest first. Returns
 * how many. */
static int withdraw_from(pp_pool *pool, int victim, uint32_t most)
{
    struct pp_worker *w = &pool->w[victim];
    struct pp_slot *s = &pool->ctl->slot[victim];
    int taken = 0;
    for (uint32_t pos = w->tail - 1; pos != w->retired - 1 && (uint32_t)taken < most; pos--) {
        struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
        if (d->done || d->withdrawn) /* a forged DONE can settle one out of order */
            continue;
        uint32_t expect = PP_DESC_POSTED;
        if (!atomic_compare_exchange_strong(&s->in[pos & PP_RING_MASK].state, &expect,
                                            PP_DESC_WITHDRAWN))
            break; /* it is running, and so is everything older */
        d->withdrawn = true;
        pp__payload_free(&pool->payload, &d->extent);
        pp__requeue_dealt(pool, d);
        taken++;
    }
    return taken;
}

/* Half of what a worker still has to run, at least one: an idle worker
 * that took entries one at a time from a long queue of short tasks would
 * be back for the next a moment later (and the victim's ring would fill
 * with entries taken back that each later scan passes over). */
static uint32_t half_of(const struct pp_worker *w)
{
    uint32_t n = live(w) / 2;
    return n ? n : 1;
}

/* The worker other than `idle` and `skip` with the most entries by `count`,
 * more than one; -1 if none. */
static int busiest(pp_pool *pool, int idle, int skip, uint32_t (*count)(const struct pp_worker *))
{
    int victim = -1;
    uint32_t most = 1;
    for (int id = 0; id < pool->nworkers; id++)
        if (id != idle && id != skip && pool->w[id].state == PP_WS_READY &&
            count(&pool->w[id]) > most) {
            most = count(&pool->w[id]);
            victim = id;
        }
    return victim;
}

/* Takes entries back for worker `idle`; returns how many. */
static int withdraw_for(pp_pool *pool, int idle)
{
    /* The busiest by its ring first; if all it holds is running or taken
     * back already (a worker stuck on a long item keeps those until it
     * moves on), the busiest by what it still has to run. */
    int first = busiest(pool, idle, -1, pending), n;
    if (first >= 0 && (n = withdraw_from(pool, first, half_of(&pool->w[first]))) > 0)
        return n;
    int second = busiest(pool, idle, first, live);
    if (second >= 0)
        return withdraw_from(pool, second, half_of(&pool->w[second]));
    /* Every other worker holds one entry: it is running it, unless it never
     * took it. */
    for (int id = 0; first < 0 && id < pool->nworkers; id++)
        if (id != idle && pool->w[id].state == PP_WS_READY && lone_unclaimed(pool, id))
            return withdraw_from(pool, id, 1);
    return 0;
}

/* Posts the first `n` pieces of the retry ring, just taken back, to worker
 * `id` (deal would share them out again, the victim included). */
static void hand_to(pp_pool *pool, int id, int n)
{
    struct pp_piece p;
    while (n-- > 0 && next_piece(pool, &p, false))
        if (!try_post(pool, id, &p, depth_for(&p))) {
            pp__retry_push_front(pool, p);
            break;
        }
}

/* Items [from, count) of a dealt entry will not run there: they go back to
 * the front of the queue as a piece of their own, and the entry ends at
 * `from` (results and guard stay where they are). */
static void give_back_tail(pp_pool *pool, struct pp_dealt *d, uint32_t from)
{
    requeue_from(pool, &d->piece, from);
    d->piece.count = from;
}

/* The entry worker `id` runs now: by our books the oldest one not settled,
 * if its state word says it was claimed. NULL if none. */
static struct pp_dealt *running_entry(pp_pool *pool, int id, uint32_t *pos)
{
    struct pp_worker *w = &pool->w[id];
    for (*pos = w->retired; *pos != w->tail; (*pos)++) {
        struct pp_dealt *d = &w->dealt[*pos & PP_RING_MASK];
        if (d->done || d->withdrawn)
            continue;
        if (d->abandoned)
            return NULL;
        uint32_t state = atomic_load(&pool->ctl->slot[id].in[*pos & PP_RING_MASK].state);
        return state == PP_DESC_CLAIMED ? d : NULL;
    }
    return NULL;
}

/* Makes the next claim in a claimed entry fail. Returns the first item that
 * will not run there: from it on, the entry's items are ours again. */
static uint32_t stop_claims(pp_pool *pool, int id, uint32_t pos, const struct pp_dealt *d)
{
    _Atomic uint32_t *claim = &pool->ctl->slot[id].in[pos & PP_RING_MASK].claim;
    if (atomic_load_explicit(claim, memory_order_relaxed) >= d->piece.count)
        return d->piece.count;
    uint32_t from = atomic_exchange(claim, d->piece.count);
    if (from < d->copied) /* a scribbled word: what we resolved stays */
        from = d->copied;
    return from < d->piece.count ? from : d->piece.count;
}

/* Takes back the items that a busy worker's running entry has not claimed
 * yet, for an idle worker: the exchange makes the worker's next claim fail,
 * so it stops after the item it runs and says how far it got. */
static bool steal_tail(pp_pool *pool, int idle)
{
    for (int id = 0; id < pool->nworkers; id++) {
        uint32_t pos;
        struct pp_dealt *d;
        if (id == idle || pool->w[id].state != PP_WS_READY ||
            (d = running_entry(pool, id, &pos)) == NULL)
            continue;
        uint32_t from = stop_claims(pool, id, pos, d);
        if (from < d->piece.count) {
            give_back_tail(pool, d, from);
            return true;
        }
    }
    return false;
}

static void balance(pp_pool *pool)
{
    if (pool->retry.len != 0 || pool->qhead != NULL)
        return;
    for (int id = 0; id < pool->nworkers; id++) {
        if (pool->w[id].state != PP_WS_READY || pending(&pool->w[id]) != 0)
            continue;
        int n = withdraw_for(pool, id);
        if (n == 0 && !steal_tail(pool, id))
            return;
        hand_to(pool, id, n);
        deal(pool);
        wake_dealt(pool);
    }
}

/* An iterator's items may be finished inside an entry that still runs: the
 * slot's item number says how far it got (the worker moves it only after an
 * item returned, and posts a failure before). Copies and resolves them, so
 * that a slow item does not hold back the ones before it. */
static void harvest(pp_pool *pool, int id)
{
    uint32_t pos;
    struct pp_dealt *d = running_entry(pool, id, &pos);
    if (d == NULL || d->piece.rec == NULL || d->piece.count < 2)
        return;
    struct pp_slot *s = &pool->ctl->slot[id];
    uint32_t k = atomic_load_explicit(&s->cur_item, memory_order_acquire);
    /* cur_seq is written before cur_item: a k of the worker's next entry
     * comes with its seq. */
    if (!atomic_load_explicit(&s->busy, memory_order_acquire) ||
        atomic_load_explicit(&s->cur_seq, memory_order_acquire) != pos)
        return;
    pp__collect(pool, id); /* the failures before item k */
    if (d->done || d->withdrawn || k > d->piece.count || k <= d->copied || !guard_intact(pool, d))
        return;
    uint32_t from = d->copied;
    pp__copy_out(d, from, k, d->res_addr);
    d->copied = k;
    d->nok += k - from;
    pp__resolve_ok(d->piece.job, k - from);
    pp__iter_ok(d->piece.rec, d->piece.start + from, k - from);
}

/* ---- collecting ----------------------------------------------------------- */

void pp__copy_out(struct pp_dealt *d, uint32_t from, uint32_t to, const unsigned char *res)
{
    struct pp_job *job = d->piece.job;
    size_t r = job->result_size;
    if (d->results_in_place || r == 0 || to <= from || job->complete)
        return;
    unsigned char *dst = piece_results(&d->piece);
    memcpy(dst + from * r, res + from * r, (to - from) * r);
}

/* Retires settled entries from the oldest, so their slots can be reused. */
static void retire(pp_pool *pool, int id)
{
    struct pp_worker *w = &pool->w[id];
    uint32_t head = atomic_load_explicit(&pool->ctl->slot[id].in_head, memory_order_acquire);
    while (w->retired != w->tail) {
        struct pp_dealt *d = &w->dealt[w->retired & PP_RING_MASK];
        if (d->withdrawn && (int32_t)(head - w->retired) <= 0)
            break; /* the worker may still be looking at it */
        if (!d->done && !d->withdrawn)
            break;
        w->retired++;
    }
}

/* The entry a message names, if it names one we dealt and have not settled. */
static struct pp_dealt *lookup(struct pp_worker *w, uint32_t seq)
{
    if (seq - w->retired >= w->tail - w->retired)
        return NULL;
    struct pp_dealt *d = &w->dealt[seq & PP_RING_MASK];
    return d->done || d->withdrawn ? NULL : d;
}

/* An abandoned entry's items were already failed; when its worker answers or
 * dies, only its payload and its hold on the job remain to give back. */
static void release_abandoned(pp_pool *pool, struct pp_dealt *d)
{
    d->done = true;
    pp__payload_free(&pool->payload, &d->extent);
    pp__piece_release(pool, &d->piece);
}

bool pp__dealt_open(pp_pool *pool, struct pp_dealt *d)
{
    if (d->done || d->withdrawn)
        return false;
    if (d->abandoned) {
        release_abandoned(pool, d);
        return false;
    }
    return true;
}

/* A task that wrote past its result_size changed the guard after the
 * chunk's results. What was copied out before is kept; every later item of
 * the chunk may be affected and fails -EOVERFLOW. Returns true if so. */
static bool guard_broken(pp_pool *pool, struct pp_dealt *d)
{
    if (d->piece.job->complete || guard_intact(pool, d))
        return false;
    struct pp_job *job = d->piece.job;
    pp__resolve_ok(job, d->copied - d->nfail - d->nok);
    if (d->piece.rec != NULL)
        pp__iter_ok(d->piece.rec, d->piece.start, d->copied);
    struct pp_piece rest = d->piece;
    rest.start += d->copied;
    rest.count -= d->copied;
    pp__fail_piece(&rest, 0, -EOVERFLOW, "a task of this chunk wrote past its result_size");
    return true;
}

/* A cancelled entry that ran to its end: the items before its cut finished
 * before the cancel and were resolved then (keep_before_cut); the others
 * ran after it, or stopped when asked, and fail. */
static void fail_after_cut(struct pp_dealt *d)
{
    struct pp_piece rest = d->piece;
    rest.start += d->cut;
    rest.count -= d->cut;
    /* Of the items at and after the cut, those failed by FAIL messages:
     * every item before it is counted in nfail or nok. */
    pp__fail_piece(&rest, d->nfail + d->nok - d->cut, PP_ECANCELED, "cancelled; the task returned");
}

static void settle_done(pp_pool *pool, struct pp_worker *w, struct pp_dealt *d)
{
    struct pp_job *job = d->piece.job;
    bool inline_guard = d->canary != NULL && d->extent.p == NULL && !job->complete;
    if (!guard_broken(pool, d)) {
        if (inline_guard) /* guard_broken compared it just now: intact */
            w->guard_ok[d - w->dealt] = d->canary;
        pp__copy_out(d, d->copied, d->piece.count, d->res_addr);
        if (pp__cut_holds(d)) {
            /* It stopped cooperatively (or finished) after it was cancelled. */
            fail_after_cut(d);
        } else if (!job->complete) {
            pp__resolve_ok(job, d->piece.count - d->nfail - d->nok);
            if (d->piece.rec != NULL)
                pp__iter_ok(d->piece.rec, d->piece.start, d->piece.count);
        }
    }
    w->cancel_at = 0;
    d->done = true;
    pp__payload_free(&pool->payload, &d->extent);
    w->succeeded = true;
    w->early_deaths = 0;
    pp__job_settle(job);
    pp__piece_release(pool, &d->piece);
}

static int msg_code(uint32_t kind)
{
    return kind == PP_MSG_FAIL ? PP_ETASK : kind == PP_MSG_NOTFOUND ? PP_ENOTFOUND : -EOVERFLOW;
}

/* `shared_text` is the message's text in the outbox, read only for failures. */
static void on_message(pp_pool *pool, struct pp_worker *w, const struct pp_msg *m,
                       const char *shared_text)
{
    struct pp_dealt *d = lookup(w, m->seq);
    if (d == NULL)
        return; /* stale or forged */
    if (d->abandoned) {
        if (m->kind == PP_MSG_DONE)
            release_abandoned(pool, d);
    } else if (m->kind == PP_MSG_DONE) {
        uint32_t ran = m->item > d->copied ? m->item : d->copied;
        if (ran < d->piece.count) /* it stopped early: the rest runs elsewhere */
            give_back_tail(pool, d, ran);
        settle_done(pool, w, d);
    } else if ((m->kind == PP_MSG_FAIL || m->kind == PP_MSG_NOTFOUND ||
                m->kind == PP_MSG_OVERRUN) &&
               m->item < d->piece.count && m->item >= d->copied) {
        char text[PP_MSG_TEXT];
        memcpy(text, shared_text, sizeof text);
        text[sizeof text - 1] = '\0';
        int code = msg_code(m->kind);
        if (pp__cut_holds(d) && m->item >= d->cut) {
            /* It failed after the cancel had reached it: the cancel stands,
             * as pp_async_cancel promised when it returned 0. */
            char own[PP_MSG_TEXT];
            memcpy(own, text, sizeof own);
            snprintf(text, sizeof text, "task cancelled; it then failed: %.200s", own);
            code = PP_ECANCELED;
        }
        /* NOTFOUND fails the rest of the chunk (our count, not the worker's). */
        uint32_t last = m->kind == PP_MSG_NOTFOUND ? d->piece.count - 1 : m->item;
        for (uint32_t item = m->item; item <= last; item++) {
            d->nfail++;
            d->last_fail = item;
            /* A failed item's slot is left as it was: copy what precedes it. */
            pp__copy_out(d, d->copied, item, d->res_addr);
            d->copied = item + 1;
            pp__resolve_fail(d->piece.job, d->piece.rec, d->piece.start + item, code, m->status,
                             text);
        }
    }
}

/* A started chunk whose running item is unknown: what it finished before
 * its last FAIL is kept, the rest runs again. */
/* The items of an entry before `copied` finished: each FAIL message copied
 * the results before it and resolved its own item. Resolves the rest of
 * them. */
static void keep_copied(struct pp_dealt *d)
{
    struct pp_piece *p = &d->piece;
    if (!p->job->complete) {
        pp__resolve_ok(p->job, d->copied - d->nfail - d->nok);
        if (p->rec != NULL)
            pp__iter_ok(p->rec, p->start, d->copied);
    }
}

void pp__keep_finished(pp_pool *pool, struct pp_dealt *d)
{
    struct pp_piece *p = &d->piece;
    keep_copied(d);
    if (d->copied < p->count)
        requeue_from(pool, p, d->copied);
    pp__job_settle(p->job);
}

/* Puts an entry that will not run where it was dealt back in the retry
 * ring, its hold on the job with it. Items that FAIL messages resolved
 * already (a worker lying about an entry it never claimed: B5) must not be
 * resolved again: then only what follows the last of them goes back, and
 * what precedes it counts as finished, as for a started chunk. */
void pp__requeue_dealt(pp_pool *pool, struct pp_dealt *d)
{
    if (d->copied == 0) {
        pp__retry_push_front(pool, d->piece);
        return;
    }
    pp__keep_finished(pool, d);
    pp__piece_release(pool, &d->piece);
}

/* Entries the worker moved past without a DONE: it found their state word
 * scribbled and skipped them. They never ran; they run again elsewhere. */
static void requeue_skipped(pp_pool *pool, struct pp_worker *w, uint32_t head)
{
    for (uint32_t pos = w->retired; pos != head; pos++) {
        struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
        if (!pp__dealt_open(pool, d))
            continue;
        d->withdrawn = true;
        pp__payload_free(&pool->payload, &d->extent);
        pp__requeue_dealt(pool, d);
        pool->progress = true;
    }
}

/* Whether a worker's inbox position can be true: at most our tail, and at
 * least one before the oldest entry we have not retired (its DONE is posted
 * before in_head moves past it, so we may retire it first). A task that
 * scribbled the slot's in_tail sends its worker sweeping positions nobody
 * posted: it claims whatever entry it finds POSTED at a position's index,
 * under the wrong position, so the entry would never be settled, and its
 * task_timeout never fires (the worker moves on every few nanoseconds).
 * Such a worker is killed: its entries run again elsewhere. */
static bool head_plausible(const struct pp_worker *w, uint32_t head)
{
    uint32_t from = w->retired - 1;
    return head - from <= w->tail - from;
}

/* Reads worker `id`'s outbox to its end. Returns false if the worker broke
 * the outbox's books (then it is killed as a crashed worker). */
bool pp__collect(pp_pool *pool, int id)
{
    struct pp_worker *w = &pool->w[id];
    struct pp_slot *s = &pool->ctl->slot[id];
    /* Read before the outbox: every entry the worker moved past by then
     * has its DONE in the outbox already (posted before in_head moved). */
    uint32_t head = atomic_load_explicit(&s->in_head, memory_order_acquire);
    uint32_t tail = atomic_load_explicit(&s->out_tail, memory_order_acquire);
    bool live = w->state == PP_WS_READY || w->state == PP_WS_STARTING;
    if (tail - w->out_head > PP_RING) {
        if (live)
            pp__kill_worker(pool, id, PP_ECRASH);
        return false;
    }
    if (live && !head_plausible(w, head)) {
        pp__kill_worker(pool, id, PP_ECRASH);
        return false;
    }
    /* Only we write in_tail. A task that moved it back hid the entries
     * behind it from its worker, which would sleep with work dealt to it. */
    if (live && atomic_load_explicit(&s->in_tail, memory_order_relaxed) != w->tail) {
        atomic_store_explicit(&s->in_tail, w->tail, memory_order_release);
        pp__ring_wake_worker(s);
    }
    if (tail != w->out_head) {
        pool->progress = true;
        while (w->out_head != tail) {
            uint32_t i = w->out_head & PP_RING_MASK;
            struct pp_msg m;
            memcpy(&m, &s->out[i], sizeof m);
            w->out_head++;
            on_message(pool, w, &m, s->out_text[i]);
        }
        atomic_store_explicit(&s->out_head, w->out_head, memory_order_release);
        pp__ring_wake_worker(s); /* it may be waiting for outbox room */
    }
    if (head - w->retired <= w->tail - w->retired)
        requeue_skipped(pool, w, head);
    retire(pool, id);
    return true;
}

/* ---- work that ran elsewhere ----------------------------------------------- */

/* A piece that ran on another MPI rank came back: `res` holds its count
 * results, `fails` its failed items (increasing). As for a local chunk, a
 * failed item's result slot is left as it was, the others are copied. An
 * item failed with code 0 did not run there (that rank's workers keep
 * dying): it goes back to the front of the queue, for another rank. */
void pp__piece_done(pp_pool *pool, struct pp_piece *p, const unsigned char *res,
                    const struct pp_item_fail *fails, uint32_t nfail)
{
    struct pp_job *job = p->job;
    size_t r = job->result_size;
    unsigned char *dst = piece_results(p);
    uint32_t from = 0, failed = 0;
    for (uint32_t k = 0; k <= nfail && !job->complete; k++) {
        uint32_t to = k < nfail ? fails[k].item : p->count;
        if (to > from) {
            if (r != 0)
                memcpy(dst + from * r, res + from * r, (to - from) * r);
            if (!job->cancelled) {
                pp__resolve_ok(job, to - from);
                if (p->rec != NULL)
                    pp__iter_ok(p->rec, p->start + from, to - from);
            }
        }
        if (k == nfail)
            break;
        from = to + 1;
        if (fails[k].code == 0 && !job->cancelled) {
            struct pp_piece one = {.job = job, .rec = p->rec, .start = p->start + to, .count = 1};
            pp__piece_hold(&one);
            pp__retry_push_front(pool, one);
            continue;
        }
        char text[sizeof fails[k].text];
        memcpy(text, fails[k].text, sizeof text);
        text[sizeof text - 1] = '\0';
        pp__resolve_fail(job, p->rec, p->start + to, fails[k].code ? fails[k].code : PP_ESPAWN,
                         fails[k].status, text);
        failed++;
    }
    if (job->cancelled)
        pp__fail_piece(p, failed, PP_ECANCELED, "cancelled; the task returned");
    pp__job_settle(job);
    pp__piece_release(pool, p);
}

/* ---- failing what is pending ---------------------------------------------- */

/* Ends a dealt entry that will not finish: the items before `copied` did
 * (keep_copied), the rest fail with `code`. */
static void fail_unfinished(struct pp_dealt *d, int code, const char *why)
{
    keep_copied(d);
    struct pp_piece rest = d->piece;
    rest.start += d->copied;
    rest.count -= d->copied;
    pp__fail_piece(&rest, 0, code, why);
}

/* Fails the unresolved items of every dealt entry. The entries stay, abandoned, until their workers
 * answer or die: only then are their payload blocks free for reuse. */
static void abandon_dealt(pp_pool *pool, int code, const char *why)
{
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_worker *w = &pool->w[id];
        for (uint32_t pos = w->retired; pos != w->tail; pos++) {
            struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
            if (d->done || d->withdrawn || d->abandoned)
                continue;
            fail_unfinished(d, code, why);
            d->abandoned = true;
            pp__job_settle(d->piece.job);
        }
    }
}

void pp__fail_pending(pp_pool *pool, int code, const char *why)
{
    struct pp_piece p;
    while (retry_pop(pool, &p)) {
        pp__fail_piece(&p, 0, code, why);
        pp__job_settle(p.job);
        pp__piece_release(pool, &p);
    }
    while (pool->qhead != NULL) {
        struct pp_job *job = pool->qhead;
        dequeue_head(pool);
        if (job->iter != NULL) {
            pp__iter_fail_undealt(job->iter, code, why);
        } else if (job->next < job->n) {
            struct pp_piece rest = {
                .job = job, .start = job->next, .count = (uint32_t)(job->n - job->next)};
            size_t left = job->n - job->next;
            job->next = job->n;
            while (left > 0) { /* count may exceed 32 bits */
                rest.count = (uint32_t)(left > UINT32_MAX ? UINT32_MAX : left);
                pp__fail_piece(&rest, 0, code, why);
                rest.start += rest.count;
                left -= rest.count;
            }
        }
        pp__job_settle(job);
    }
    abandon_dealt(pool, code, why);
}

/* ---- cancelling ------------------------------------------------------------ */

/* A claimed entry of a job being cancelled: the items that finished before
 * now keep their results and count as completed; only the one running and
 * those after it will fail (fail_after_cut, or a death). Read as harvest
 * reads: the running item, then the failures posted before it. */
static void keep_before_cut(pp_pool *pool, int id, uint32_t pos, struct pp_dealt *d)
{
    struct pp_slot *s = &pool->ctl->slot[id];
    uint32_t k = atomic_load_explicit(&s->cur_item, memory_order_acquire);
    bool on_it = atomic_load_explicit(&s->busy, memory_order_acquire) &&
                 atomic_load_explicit(&s->cur_seq, memory_order_acquire) == pos;
    pp__collect(pool, id); /* a DONE read here settles the entry as finished */
    if (d->done || d->withdrawn || d->piece.job->complete)
        return;
    d->cut_taken = true;
    uint32_t cut = d->copied; /* a FAIL after them: they are finished */
    if (on_it && k > cut && k <= d->piece.count && guard_intact(pool, d)) {
        pp__copy_out(d, d->copied, k, d->res_addr);
        d->copied = cut = k;
    }
    if (cut <= d->cut)
        return;
    pp__resolve_ok(d->piece.job, cut - d->nfail - d->nok);
    if (d->piece.rec != NULL)
        pp__iter_ok(d->piece.rec, d->piece.start, cut);
    d->nok = cut - d->nfail;
    d->cut = cut;
}

/* Takes back every entry of `job` that no worker has claimed yet; in those
 * claimed, at the first cancel, keeps what finished before it. */
static void withdraw_job(pp_pool *pool, struct pp_job *job, bool first_cancel)
{
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_worker *w = &pool->w[id];
        struct pp_slot *s = &pool->ctl->slot[id];
        for (uint32_t pos = w->retired; pos != w->tail; pos++) {
            struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
            if (d->done || d->withdrawn || d->abandoned || d->piece.job != job)
                continue;
            uint32_t expect = PP_DESC_POSTED;
            if (!atomic_compare_exchange_strong(&s->in[pos & PP_RING_MASK].state, &expect,
                                                PP_DESC_WITHDRAWN)) {
                /* Claimed: what it has not started yet never runs. */
                if (first_cancel)
                    keep_before_cut(pool, id, pos, d);
                uint32_t from = stop_claims(pool, id, pos, d);
                if (from < d->piece.count) {
                    struct pp_piece rest = d->piece;
                    rest.start += from;
                    rest.count -= from;
                    d->piece.count = from;
                    pp__fail_piece(&rest, 0, PP_ECANCELED, "cancelled");
                }
                continue;
            }
            d->withdrawn = true;
            pp__payload_free(&pool->payload, &d->extent);
            fail_unfinished(d, PP_ECANCELED, "cancelled");
            pp__piece_release(pool, &d->piece);
        }
    }
}

void pp__job_cancel_queued(struct pp_job *job)
{
    pp_pool *pool = job->pool;
    bool first = !job->cancelled;
    job->cancelled = true;
    pp__dequeue(pool, job);
    if (job->iter != NULL) {
        pp__iter_fail_undealt(job->iter, PP_ECANCELED, "cancelled");
        job->next = job->n; /* nothing of it is left to deal, whatever comes later */
    } else {
        while (job->next < job->n) {
            size_t left = job->n - job->next;
            struct pp_piece rest = {.job = job,
                                    .start = job->next,
                                    .count = (uint32_t)(left > UINT32_MAX ? UINT32_MAX : left)};
            job->next += rest.count;
            pp__fail_piece(&rest, 0, PP_ECANCELED, "cancelled");
        }
    }
    /* Its pieces in the retry ring are dropped when they come up. */
    size_t n = pool->retry.len;
    for (size_t i = 0; i < n; i++) {
        struct pp_piece p;
        retry_pop(pool, &p);
        if (p.job != job) {
            pool->retry.v[(pool->retry.head + pool->retry.len) % pool->retry.cap] = p;
            pool->retry.len++;
            continue;
        }
        pp__fail_piece(&p, 0, PP_ECANCELED, "cancelled");
        pp__piece_release(pool, &p);
    }
    withdraw_job(pool, job, first);
    pp__job_settle(job);
}

int pp__job_cancel(struct pp_job *job)
{
    pp_pool *pool = job->pool;
    if (job->complete || job->ready || pool->ctl == NULL)
        return -EALREADY;
    pp__pump(pool);
    if (job->complete)
        return -EALREADY;
    pp__job_cancel_queued(job);
    /* A worker may have finished the last of it since the pump: its DONE,
     * read on the way (keep_before_cut), ended the job with nothing
     * cancelled. */
    if (job->complete && !job->some_cancelled)
        return -EALREADY;
    /* What is left of it in the inboxes was claimed: it is running, or about
     * to. pp_task_should_stop() turns true there; past the grace period the
     * worker is killed (pp__check_timeouts). */
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_worker *w = &pool->w[id];
        if (w->state != PP_WS_READY)
            continue;
        for (uint32_t pos = w->retired; pos != w->tail; pos++) {
            struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
            if (d->piece.job != job || d->done || d->withdrawn || d->abandoned)
                continue;
            atomic_store(&pool->ctl->slot[id].stop, 1);
            w->cancel_seq = pos;
            w->cancel_item = atomic_load(&pool->ctl->slot[id].cur_item);
            w->cancel_grants = 0;
            w->cancel_at = pp__now_ns() + PP_CANCEL_GRACE_NS;
            pool->cancels++;
        }
    }
    return 0;
}

/* ---- the pump ------------------------------------------------------------- */

int pp__busy(pp_pool *pool)
{
    int busy = 0;
    for (int id = 0; id < pool->nworkers; id++)
        busy += pool->w[id].state == PP_WS_READY && pending(&pool->w[id]) != 0;
    return busy;
}

/* A starting worker writes READY or INITFAIL into its slot. Any other value
 * there is a task's scribble: the worker can no longer tell us when it is
 * ready, so it is replaced (nothing was dealt to it yet). */
static void note_started(pp_pool *pool, int id)
{
    uint32_t state = atomic_load(&pool->ctl->slot[id].state);
    if (state == PP_W_READY) {
        pool->w[id].state = PP_WS_READY;
        pool->w[id].was_ready = true;
    } else if (state != PP_W_STARTING && state != PP_W_INITFAIL)
        pp__kill_worker(pool, id, PP_ECRASH);
}

bool pp__can_progress(pp_pool *pool)
{
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_worker *w = &pool->w[id];
        struct pp_slot *s = &pool->ctl->slot[id];
        if (w->state == PP_WS_READY || w->state == PP_WS_EXITING) {
            uint32_t unread =
                atomic_load_explicit(&s->out_tail, memory_order_acquire) - w->out_head;
            if (unread != 0 && (unread <= PP_RING || w->kill_code == 0))
                return true;
        } else if (w->state == PP_WS_STARTING) {
            uint32_t state = atomic_load(&s->state);
            if (state != PP_W_STARTING && state != PP_W_INITFAIL)
                return true;
        }
    }
    return false;
}

/* A worker that has not moved to its oldest entry, posted PP_UNCLAIMED_NS
 * ago, and runs nothing, does not hear its doorbell: a task of another
 * worker may have cleared its `sleeping` word (the others would take its
 * entries back by balancing, and it would never run again). It is woken
 * regardless, at most once per that interval. */
static void rouse_if_unheard(pp_pool *pool, int id, int64_t now)
{
    struct pp_worker *w = &pool->w[id];
    if (w->retired == w->tail || now - w->roused_ns < PP_UNCLAIMED_NS ||
        now - w->dealt[w->retired & PP_RING_MASK].posted_ns < PP_UNCLAIMED_NS)
        return;
    struct pp_slot *s = &pool->ctl->slot[id];
    if (atomic_load(&s->in_head) != w->retired || atomic_load(&s->busy))
        return;
    w->roused_ns = now;
    pp__ring_rouse_worker(s);
}

/* Collects, supervises, deals: lean (pp__pump_lean) or to every worker. */
static void pump(pp_pool *pool, bool lean)
{
    if (pool->ctl == NULL) /* freed: nothing left to watch (an iterator outliving it) */
        return;
    /* The zygote's socket is read when poll() saw it readable, and now and
     * then while the pool is too busy to poll: no system call per pump. */
    int64_t now = pp__now_ns();
    pool->pump_ns = now;
    pool->collect_ns = now;
    if (!pp__is_library_thread(pool))
        pool->caller_pump_ns = now;
    if (pool->zygote_said || now - pool->zygote_checked > PP_ZYGOTE_CHECK_NS) {
        if (!pool->zygote_said)
            pp__zygote_keep_running(pool);
        pool->zygote_said = false;
        pool->zygote_checked = now;
        pp__on_zygote(pool);
    }
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_worker *w = &pool->w[id];
        if (w->state == PP_WS_STARTING)
            note_started(pool, id);
        if (w->state == PP_WS_READY || w->state == PP_WS_EXITING)
            pp__collect(pool, id);
        if (w->state == PP_WS_READY)
            rouse_if_unheard(pool, id, now);
    }
    if (!pool->progress) /* whoever pumps may wait for an item of a running entry */
        for (int id = 0; id < pool->nworkers; id++)
            if (pool->w[id].state == PP_WS_READY)
                harvest(pool, id);
    if (pool->opts.task_timeout > 0 || pool->cancels > 0)
        pp__check_timeouts(pool, now);
    if (!pool->terminated && !pool->broken) {
        if (lean) {
            deal_lean(pool);
        } else {
            deal(pool);
            balance(pool);
        }
    }
    if (pool->mpi != NULL && (pool->qhead != NULL || pool->retry.len != 0))
        pp__mpi_kick(pool);
    /* Whoever waits for what we just resolved may be asleep in poll(). */
    if (pool->progress) {
        pool->progress = false;
        pp__notify_progress(pool);
    }
}

void pp__pump(pp_pool *pool)
{
    pump(pool, false);
}

/* The ready worker with room for `p` and the fewest entries by the
 * parent's books, the first of equals as `deal` serves them; -1 if none
 * has room. In a loop of one call at a time that is the same worker every
 * time, still spinning; taking turns would land each call on the worker
 * idle longer, asleep (W5 p99 18-25 us). Work spreads at once, as a full
 * deal spreads it: preferring a worker that is awake would save a wake-up
 * but leave long tasks queued behind each other until the next balance. */
static int least_pending(pp_pool *pool, const struct pp_piece *p)
{
    uint32_t depth = depth_for(p);
    int best = -1;
    for (int id = 0; id < pool->nworkers; id++) {
        const struct pp_worker *w = &pool->w[id];
        if (w->state == PP_WS_READY && pending(w) < depth && pending(w) < PP_RING &&
            (best < 0 || pending(w) < pending(&pool->w[best])))
            best = id;
    }
    return best;
}

/* Deals by the parent's own books, reading no line a worker writes (no
 * collect): true if nothing is left in the queue. Entries finished since
 * the last collect still count as pending, so a worker looks busier than
 * it is, never idler: the deal stops short, never overfills an inbox. */
static bool deal_by_books(pp_pool *pool)
{
    if (!has_room(pool)) /* full by the books: a full pump may find room */
        return false;
    /* Entries posted now say so (the pump's clock); the caller is pumping,
     * so the library thread keeps out of its way. The clock is read at
     * every QUICK_PUMPS_PER_CLOCK-th submission only: the vDSO orders its
     * read of the TSC after every load in flight, here the misses on the
     * lines just posted, and a read per apply_async cost W4 up to a tenth
     * of its rate (3.1-3.2 M against 3.5-3.6 M tasks/s on a 2-CPU Xeon VM,
     * in some of its moments: docs/performance.md). A few
     * submissions' lag is nothing to the clocks it serves: an entry
     * unclaimed for PP_UNCLAIMED_NS, a caller idle for PP_CALLER_ACTIVE_NS,
     * QUICK_PUMPS_MAX_NS since the last collect. */
    if (pool->quick_pumps % QUICK_PUMPS_PER_CLOCK == 1) {
        pool->pump_ns = pp__now_ns();
        if (!pp__is_library_thread(pool))
            pool->caller_pump_ns = pool->pump_ns;
    }
    struct pp_piece p;
    while (next_piece(pool, &p, true)) {
        int id = least_pending(pool, &p);
        if (id < 0 || post(pool, id, &p) != 0) {
            pp__retry_push_front(pool, p);
            break;
        }
    }
    wake_dealt(pool);
    return pool->retry.len == 0 && pool->qhead == NULL;
}

/* A submission's pump (pp__submit): most deal by the books alone. Reading
 * the workers' outboxes costs a cache miss per worker wherever they ran
 * something since, which a loop of apply_async paid per call (bench W4);
 * every pp__collect_interval()-th submission, any whose work does not fit by
 * the books, and any that finds QUICK_PUMPS_MAX_NS passed since the last
 * collect (by the clock deal_by_books reads) pumps in full, and every wait
 * does. What finishes meanwhile is collected by the
 * next full pump: the caller's, or the library thread's once the caller
 * has not pumped for PP_CALLER_ACTIVE_NS. The time bound is for a loop that
 * submits every few hundred microseconds: the library thread keeps out of
 * its way, and a count alone would leave results uncollected for
 * milliseconds. */
void pp__pump_submit(pp_pool *pool)
{
    /* deal_by_books updated pump_ns if it returns true (at most a few
     * submissions ago). */
    if (++pool->quick_pumps < pp__collect_interval(pool) && pool->mpi == NULL &&
        !pool->terminated && !pool->broken && deal_by_books(pool) &&
        pool->pump_ns - pool->collect_ns < QUICK_PUMPS_MAX_NS)
        return;
    pool->quick_pumps = 0;
    pump(pool, false);
}

void pp__pump_lean(pp_pool *pool)
{
    pump(pool, true);
}
