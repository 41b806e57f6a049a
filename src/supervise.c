/*
 * supervise: deaths, time limits and replacements.
 *
 * DESIGN: the zygote reaps every worker and tells us how it ended; only
 * then do we settle its slot, so nothing the dead worker wrote can still
 * change. Settling reads its outbox to the end, charges the death to the
 * one item its slot says was running (PP_ECRASH, or the reason we killed
 * it: PP_ETIMEOUT, PP_ECANCELED), keeps the results of the items of that
 * chunk that finished, and puts everything it had not started back at the
 * front of the retry ring, in order. The replacement gets a zeroed slot
 * and the same worker id. Deaths that cannot be charged to any item, by
 * workers that never finished a chunk, are a crash loop past a bound: the
 * pool then stops replacing workers and fails what is pending (PP_ESPAWN).
 */
#include "iter.h"
#include "pool.h"
#include "zygote.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>

void pp__kill_worker(pp_pool *pool, int id, int code)
{
    struct pp_worker *w = &pool->w[id];
    if (w->state == PP_WS_DOWN || w->kill_code != 0)
        return;
    w->kill_code = code;
    w->state = PP_WS_EXITING;
    if (pp__zygote_send(pool->zsock, PP_Z_KILL, (uint32_t)id, w->gen, SIGKILL) < 0)
        pool->zygote_gone = true;
}

/* Zeroes a slot for its next worker. A waiter's spin reads the outbox
 * positions without the pool lock (pool.c posted_unlocked), so the words
 * of the slot's header are reset by atomic stores; the rings after them,
 * which only the pump reads, under the lock, by memset. */
static void reset_slot(struct pp_slot *s)
{
    atomic_store(&s->in_tail, 0);
    atomic_store(&s->doorbell, 0);
    atomic_store(&s->out_head, 0);
    atomic_store(&s->quit, 0);
    atomic_store(&s->stop, 0);
    atomic_store(&s->in_head, 0);
    atomic_store(&s->out_tail, 0);
    atomic_store(&s->sleeping, 0);
    atomic_store(&s->state, 0);
    atomic_store(&s->busy, 0);
    atomic_store(&s->cur_seq, 0);
    atomic_store(&s->cur_item, 0);
    atomic_store(&s->item_start, 0);
    memset(&s->in, 0, sizeof *s - offsetof(struct pp_slot, in));
}

void pp__respawn(pp_pool *pool, int id)
{
    struct pp_worker *w = &pool->w[id];
    uint32_t gen = w->gen + 1;
    unsigned early = w->early_deaths;
    reset_slot(&pool->ctl->slot[id]);
    *w = (struct pp_worker){.state = PP_WS_STARTING, .gen = gen, .early_deaths = early};
    if (pp__zygote_send(pool->zsock, PP_Z_SPAWN, (uint32_t)id, gen, 0) < 0) {
        pool->zygote_gone = true;
        w->state = PP_WS_DOWN;
        return;
    }
    pool->live++;
}

static void describe(char *buf, size_t len, int code, int status, pid_t pid, double timeout)
{
    if (code == PP_ETIMEOUT)
        snprintf(buf, len, "task ran past task_timeout (%g s); worker %d was killed", timeout,
                 (int)pid);
    else if (code == PP_ECANCELED)
        snprintf(buf, len, "task cancelled; worker %d was killed", (int)pid);
    else if (code == PP_ECLOSED)
        snprintf(buf, len, "the pool was terminated");
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "worker %d died: signal %d (%s)", (int)pid, WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(buf, len, "worker %d died: exit status %d", (int)pid, WEXITSTATUS(status));
}

/* Items [from, from + count) of `p` go back to the front of the retry ring. */
static void requeue_part(pp_pool *pool, const struct pp_piece *p, uint32_t from, uint32_t count,
                         bool one_by_one)
{
    struct pp_piece part = *p;
    part.start += from;
    part.count = count;
    part.deaths = 0;
    part.one_by_one = one_by_one;
    pp__piece_hold(&part);
    pp__retry_push_front(pool, part);
}

/* The running chunk: keep what finished, charge the running item, requeue
 * the rest. Returns true if an item was charged. */
static bool settle_running(pp_pool *pool, struct pp_dealt *d, uint32_t k, int code, int st,
                           const char *why)
{
    struct pp_piece *p = &d->piece;
    struct pp_job *job = p->job;
    bool already_failed = d->nfail > 0 && d->last_fail == k;
    char cancelled[PP_MSG_TEXT];
    if (code == PP_ECRASH && pp__cut_holds(d) && k >= d->cut) {
        /* It died by itself after pp_async_cancel said 0 but before we saw
         * the death: the cancel stands, as that call promised. */
        snprintf(cancelled, sizeof cancelled, "task cancelled; %s", why);
        code = PP_ECANCELED;
        why = cancelled;
    }
    pp__copy_out(d, d->copied, k, d->res_addr);
    if (!job->complete) {
        uint32_t failed_before = d->nfail - (already_failed ? 1 : 0);
        if (pp__cut_holds(d) && d->cut < k) {
            /* Items after the cut ran after the cancel (already claimed):
             * they fail as settle_done fails them. Of them, nfail + nok -
             * cut failed by themselves (see keep_before_cut). */
            struct pp_piece after = *p;
            after.start += d->cut;
            after.count = k - d->cut;
            pp__fail_piece(&after, failed_before + d->nok - d->cut, PP_ECANCELED,
                           "cancelled; the task returned");
        } else {
            pp__resolve_ok(job, k - failed_before - d->nok);
            if (p->rec != NULL)
                pp__iter_ok(p->rec, p->start, k);
        }
        if (!already_failed)
            pp__resolve_fail(job, p->rec, p->start + k, code, st, why);
    }
    if (k + 1 < p->count)
        requeue_part(pool, p, k + 1, p->count - k - 1, p->one_by_one);
    pp__job_settle(job);
    return !already_failed;
}

/* A batch task's worker died inside the call that began at item k, which
 * held items [k, k + d->run) (fewer where the tail was taken back). The
 * items before k finished; the call's items run again one per call, so
 * that a death among them names its item, and the rest of the entry runs
 * again as before. Nothing is charged: which item of the call caused the
 * death is not known. A call of one item is settled as any task's. Returns
 * true if an item was charged. */
static bool settle_batch(pp_pool *pool, struct pp_dealt *d, uint32_t k, int code, int st,
                         const char *why)
{
    struct pp_piece *p = &d->piece;
    uint32_t end = p->count - k > d->run ? k + d->run : p->count;
    if (end - k <= 1)
        return settle_running(pool, d, k, code, st, why);
    if (end < p->count) { /* pushed first: the ring keeps input order */
        requeue_part(pool, p, end, p->count - end, false);
        p->count = end; /* the entry ends with the call, as give_back_tail ends it */
    }
    pp__copy_out(d, d->copied, k, d->res_addr);
    d->copied = k;
    p->one_by_one = true;
    pp__keep_finished(pool, d); /* keeps [0, k), requeues [k, end) one by one */
    return false;
}

/* Settles every entry of a worker the zygote has reaped. */
static bool settle_slot(pp_pool *pool, int id, int code, int st, const char *why)
{
    struct pp_worker *w = &pool->w[id];
    struct pp_slot *s = &pool->ctl->slot[id];
    pp__collect(pool, id);
    bool busy = atomic_load(&s->busy) != 0;
    uint32_t cur = atomic_load(&s->cur_seq), item = atomic_load(&s->cur_item);
    /* A worker runs its entries in order: only the oldest one not settled
     * can have been running. Our books say which that is, whatever the
     * (possibly scribbled) slot says. */
    uint32_t oldest = w->tail;
    for (uint32_t pos = w->retired; pos != w->tail; pos++) {
        struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
        if (!d->done && !d->withdrawn && !d->abandoned) {
            oldest = pos;
            break;
        }
    }
    bool charged = false;
    /* Newest first, each pushed to the front: the ring keeps input order. */
    for (uint32_t pos = w->tail - 1; pos != w->retired - 1; pos--) {
        struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
        if (!pp__dealt_open(pool, d))
            continue;
        uint32_t state = atomic_load(&s->in[pos & PP_RING_MASK].state);
        bool started = state != PP_DESC_POSTED || d->nfail > 0;
        d->done = true;
        if (pos == oldest && state == PP_DESC_CLAIMED && busy && cur == pos &&
            item < d->piece.count && item >= d->copied) {
            charged |=
                (d->piece.job->batch ? settle_batch : settle_running)(pool, d, item, code, st, why);
        } else if (pos == oldest && started && d->copied < d->piece.count &&
                   ++d->piece.deaths >= PP_PIECE_DEATH_LIMIT) {
            /* It had started, but the slot does not say where it was (a
             * task wiped it), again and again: charge the first item not
             * known finished, or it would be retried for ever. */
            charged |= settle_running(pool, d, d->copied, code, st, why);
        } else if (pos == oldest && started) {
            pp__keep_finished(pool, d);
        } else {
            /* Not started: it runs again elsewhere (the payload is rebuilt
             * from the job's arguments). */
            pp__payload_free(&pool->payload, &d->extent);
            pp__requeue_dealt(pool, d);
            continue;
        }
        pp__payload_free(&pool->payload, &d->extent);
        pp__piece_release(pool, &d->piece);
    }
    return charged;
}

static void on_exit_(pp_pool *pool, int id, int status)
{
    struct pp_worker *w = &pool->w[id];
    int code = w->kill_code ? w->kill_code : PP_ECRASH;
    int st = WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status);
    if (code == PP_ETIMEOUT || code == PP_ECANCELED)
        st = SIGKILL;
    char why[PP_MSG_TEXT];
    describe(why, sizeof why, code, status, w->pid, pool->opts.task_timeout);

    bool charged = settle_slot(pool, id, code, st, why);
    pool->live--;
    bool initfail = atomic_load(&pool->ctl->slot[id].state) == PP_W_INITFAIL;
    /* A worker we killed for breaking its outbox is still a crash. */
    bool was_killed = w->kill_code != 0 && w->kill_code != PP_ECRASH;
    bool started = w->succeeded || w->was_ready;
    unsigned early = w->early_deaths;
    reset_slot(&pool->ctl->slot[id]);
    *w = (struct pp_worker){.state = PP_WS_DOWN, .gen = w->gen, .early_deaths = early};

    if (pool->starting) {
        pool->start_failed = true;
        return;
    }
    if (pool->terminated || pool->quitting || pool->broken || pool->zygote_gone)
        return;
    /* A crash loop is counted per slot: deaths of workers that never got
     * as far as taking work (a crashing initializer, a broken start). A
     * worker that started and then died was killed by a task or from
     * outside: that death is charged to an item, or is simply replaced. Past the limit the slot is
     * given up; when every slot is, the pool fails what is pending. */
    if (!charged && !started && !was_killed && ++w->early_deaths >= PP_CRASH_LOOP_LIMIT) {
        w->given_up = true;
        for (int i = 0; i < pool->nworkers; i++)
            if (!pool->w[i].given_up)
                return;
        pool->broken = true;
        pp__fail_pending(pool, PP_ESPAWN,
                         initfail ? "workers keep failing their initializer; "
                                    "the pool stopped replacing them"
                                  : "workers keep dying before finishing any task; "
                                    "the pool stopped replacing them");
        return;
    }
    pool->stats.respawned++;
    pp__respawn(pool, id);
}

/* The zygote is gone: so are its workers (they die with it). Settle them
 * all; nothing can be replaced any more. */
static void on_zygote_gone(pp_pool *pool)
{
    pool->zygote_gone = true;
    pool->progress = true;
    for (int id = 0; id < pool->nworkers; id++)
        if (pool->w[id].state != PP_WS_DOWN) {
            pool->w[id].kill_code = pool->w[id].kill_code ? pool->w[id].kill_code : PP_ECRASH;
            on_exit_(pool, id, SIGKILL);
        }
    if (!pool->terminated && !pool->broken) {
        pool->broken = true;
        pp__fail_pending(pool, PP_ESPAWN, "the pool's helper process died");
    }
}

void pp__zygote_keep_running(pp_pool *pool)
{
    /* A stopped zygote would hide every death and every kill: continue it.
     * It is our own child, so looking at its state (WNOWAIT) is ours too. */
    siginfo_t si = {0};
    if (pool->zygote > 0 && !pool->zygote_gone &&
        waitid(P_PID, (id_t)pool->zygote, &si, WSTOPPED | WNOHANG | WNOWAIT) == 0 &&
        si.si_pid == pool->zygote)
        kill(pool->zygote, SIGCONT);
}

void pp__on_zygote(pp_pool *pool)
{
    if (pool->zygote_gone)
        return;
    for (;;) {
        struct pp_zmsg m;
        ssize_t got = recv(pool->zsock, &m, sizeof m, MSG_DONTWAIT);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && errno == EAGAIN)
            return;
        if (got <= 0) {
            on_zygote_gone(pool);
            return;
        }
        pool->progress = true; /* a waiter may be waiting for this very word */
        if (got != (ssize_t)sizeof m || m.id >= (uint32_t)pool->nworkers)
            continue;
        struct pp_worker *w = &pool->w[m.id];
        if (m.gen != w->gen || w->state == PP_WS_DOWN)
            continue;
        if (m.op == PP_Z_SPAWNED)
            w->pid = m.pid;
        else if (m.op == PP_Z_EXITED)
            on_exit_(pool, (int)m.id, m.status);
    }
}

void pp__check_timeouts(pp_pool *pool, int64_t now)
{
    int64_t limit = (int64_t)(pool->opts.task_timeout * 1e9);
    int cancels = 0;
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_worker *w = &pool->w[id];
        struct pp_slot *s = &pool->ctl->slot[id];
        if (w->state != PP_WS_READY)
            continue;
        bool busy = atomic_load(&s->busy) != 0;
        if (w->cancel_at != 0) {
            uint32_t seq = w->cancel_seq;
            uint32_t item = atomic_load(&s->cur_item);
            if (seq - w->retired >= w->tail - w->retired || w->dealt[seq & PP_RING_MASK].done) {
                w->cancel_at = 0; /* the chunk came back in time */
            } else if (item > w->cancel_item && atomic_load(&s->cur_seq) == seq &&
                       item < w->dealt[seq & PP_RING_MASK].piece.count &&
                       w->cancel_grants < PP_CANCEL_GRANTS) {
                /* That task returned; the worker had taken the next one
                 * already (a claim step): it gets a grace of its own, a
                 * bounded number of times (the slot is the task's to
                 * scribble on). */
                w->cancel_item = item;
                w->cancel_grants++;
                w->cancel_at = now + PP_CANCEL_GRACE_NS;
                cancels++;
            } else if (now >= w->cancel_at)
                pp__kill_worker(pool, id, PP_ECANCELED);
            else
                cancels++;
        }
        if (limit <= 0 || !busy || w->state != PP_WS_READY)
            continue;
        int64_t start = atomic_load(&s->item_start);
        if (start > 0 && start <= now && now - start > limit)
            pp__kill_worker(pool, id, PP_ETIMEOUT);
    }
    pool->cancels = cancels;
}

int64_t pp__next_timeout(pp_pool *pool)
{
    int64_t next = PP_FOREVER;
    for (int id = 0; id < pool->nworkers; id++)
        if (pool->w[id].cancel_at != 0 && pool->w[id].cancel_at < next)
            next = pool->w[id].cancel_at;
    if (pool->opts.task_timeout <= 0)
        return next;
    int64_t limit = (int64_t)(pool->opts.task_timeout * 1e9);
    if (pp__now_ns() + limit < next)
        next = pp__now_ns() + limit;
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_slot *s = &pool->ctl->slot[id];
        if (pool->w[id].state != PP_WS_READY || !atomic_load(&s->busy))
            continue;
        int64_t start = atomic_load(&s->item_start);
        if (start > 0 && start + limit + 1000000 < next)
            next = start + limit + 1000000; /* a millisecond past it */
    }
    return next;
}
