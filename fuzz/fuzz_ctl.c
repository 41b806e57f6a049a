/*
 * libFuzzer harness: the parent side of the control block.
 *
 * Builds a pool in memory with no processes behind it: a control block, the
 * parent's books, and a socketpair standing in for the helper (zygote). The
 * input then plays every worker and the helper at once: it scribbles bytes
 * anywhere in the workers' slots, posts messages (well-formed or not) in
 * their outboxes, claims inbox entries, names running items, reports deaths
 * (right or wrong generation), lets time limits pass, submits maps and
 * iterators, cancels, and closes the helper's socket. Between steps the
 * parent pumps (collects, settles, deals), exactly as in a real pool.
 *
 * What must hold, whatever the input: no out-of-bounds access, no undefined
 * behaviour, no leak (ASan, UBSan, LSan), and nothing lost: once the pool is
 * terminated and every worker has been reported dead, every item of every
 * job is resolved, exactly once, and nothing is still in flight.
 */
#include "iter.h"
#include "pool.h"
#include "zygote.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define NW            3
#define PAYLOAD_BYTES ((size_t)1 << 22)
#define MAX_JOBS      6
#define MAX_ITERS     2

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "invariant broken: %s (%s:%d)\n", #c, __FILE__, __LINE__);             \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

struct input {
    const uint8_t *p;
    size_t n;
};

static uint8_t u8(struct input *in)
{
    if (in->n == 0)
        return 0;
    in->n--;
    return *in->p++;
}

static uint32_t u32(struct input *in)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = v << 8 | u8(in);
    return v;
}

static int dummy(const void *arg, void *result)
{
    (void)arg;
    (void)result;
    return 0;
}

struct world {
    pp_pool *pool;
    int zpeer; /* the helper's end of the socket */
    bool zclosed;
    struct pp_job *jobs[MAX_JOBS];
    unsigned char *args[MAX_JOBS], *results[MAX_JOBS];
    int njobs;
    pp_iter *iters[MAX_ITERS];
    unsigned char *iter_args[MAX_ITERS];
    int niters;
    int32_t next_pid;
};

static pp_pool *pool_new(double timeout)
{
    pp_pool *pool = calloc(1, sizeof *pool);
    pthread_mutex_init(&pool->mu, NULL);
    pp__jobcache_init(&pool->jobcache);
    pthread_cond_init(&pool->cond, NULL);
    pthread_cond_init(&pool->thread_cond, NULL);
    pool->nworkers = NW;
    pool->opts.workers = NW;
    pool->opts.task_timeout = timeout;
    pool->w = calloc(NW, sizeof *pool->w);
    pool->ctl_bytes = pp__ctl_size(NW);
    pool->map_bytes = pool->ctl_bytes + PAYLOAD_BYTES;
    void *p = mmap(NULL, pool->map_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(p != MAP_FAILED);
    pool->ctl = p;
    pool->ctl->magic = PP_CTL_MAGIC;
    pool->ctl->nworkers = NW;
    pool->payload.base = (unsigned char *)p + pool->ctl_bytes;
    pool->payload.size = PAYLOAD_BYTES;
    pool->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pool->ctl_fd = -1;
    pool->zygote = 0;
    for (int id = 0; id < NW; id++) {
        pool->w[id] = (struct pp_worker){.state = PP_WS_READY, .gen = 1, .pid = 100 + id};
        atomic_store(&pool->ctl->slot[id].state, PP_W_READY);
    }
    pool->live = NW;
    return pool;
}

/* The helper's side: answer what the parent asked. */
static void helper(struct world *wd, bool *ready_now)
{
    struct pp_zmsg m;
    while (!wd->zclosed && recv(wd->zpeer, &m, sizeof m, MSG_DONTWAIT) == (ssize_t)sizeof m) {
        if (m.op == PP_Z_SPAWN && m.id < NW) {
            struct pp_zmsg r = {
                .op = PP_Z_SPAWNED, .id = m.id, .gen = m.gen, .pid = wd->next_pid++};
            send(wd->zpeer, &r, sizeof r, MSG_DONTWAIT);
            if (*ready_now) /* the new worker's initializer is done */
                atomic_store(&wd->pool->ctl->slot[m.id].state, PP_W_READY);
        } else if (m.op == PP_Z_KILL && m.id < NW) {
            struct pp_zmsg r = {.op = PP_Z_EXITED, .id = m.id, .gen = m.gen, .status = SIGKILL};
            send(wd->zpeer, &r, sizeof r, MSG_DONTWAIT);
        }
    }
}

static void pump(struct world *wd)
{
    bool ready = true;
    helper(wd, &ready);
    wd->pool->zygote_said = true; /* read the socket now, not in 2 ms */
    pp__pump(wd->pool);
    helper(wd, &ready);
}

static void submit_map(struct world *wd, struct input *in)
{
    if (wd->njobs == MAX_JOBS)
        return;
    uint8_t b = u8(in);
    size_t n = 1 + u8(in) % 200;
    size_t arg_size = (b & 3) == 0 ? 0 : (b & 3) == 1 ? 4 : (b & 3) == 2 ? 48 : 5000;
    size_t result_size = (b >> 2 & 3) == 0   ? 0
                         : (b >> 2 & 3) == 1 ? 8
                         : (b >> 2 & 3) == 2 ? 40
                                             : 3000;
    size_t chunk = 1 + u8(in) % 40;
    struct pp_job *job = pp__job_new(wd->pool, dummy, n, arg_size, result_size, chunk, 0);
    /* Never NULL: NULL with size 0 is allowed by pp_map, but dispatch.c's
     * piece_args/piece_results then compute NULL + 0, which is undefined
     * (clang's UBSan reports it; see docs/reliability.md). */
    unsigned char *args = calloc(n, arg_size ? arg_size : 1);
    unsigned char *res = calloc(n, result_size ? result_size : 1);
    job->args = args;
    job->results = res;
    int i = wd->njobs++;
    wd->jobs[i] = job;
    wd->args[i] = args;
    wd->results[i] = res;
    pp__enqueue(wd->pool, job);
    pump(wd);
}

static void submit_iter(struct world *wd, struct input *in)
{
    if (wd->niters == MAX_ITERS)
        return;
    size_t n = 1 + u8(in) % 300;
    size_t chunk = 1 + u8(in) % 20;
    bool ordered = u8(in) & 1;
    unsigned char *args = calloc(n, 8);
    pp_iter *it = ordered ? pp_imap(wd->pool, dummy, args, n, 8, 16, chunk)
                          : pp_imap_unordered(wd->pool, dummy, args, n, 8, 16, chunk);
    if (it == NULL) {
        free(args);
        return;
    }
    int i = wd->niters++;
    wd->iters[i] = it;
    wd->iter_args[i] = args;
    helper(wd, &(bool){true});
}

/* A worker says something in its outbox: a plausible message. */
static void post_message(struct world *wd, struct input *in)
{
    int id = u8(in) % NW;
    struct pp_slot *s = &wd->pool->ctl->slot[id];
    struct pp_worker *w = &wd->pool->w[id];
    uint32_t tail = atomic_load(&s->out_tail);
    struct pp_msg *m = &s->out[tail & PP_RING_MASK];
    uint8_t b = u8(in);
    m->kind = b & 1 ? PP_MSG_DONE : b & 2 ? PP_MSG_FAIL : u8(in);
    m->seq = w->retired + (uint32_t)(int8_t)u8(in) % 8;
    m->item = b & 4 ? u8(in) % 48 : u32(in);
    m->status = (int32_t)u32(in);
    memset(s->out_text[tail & PP_RING_MASK], 'x', PP_MSG_TEXT); /* no terminator */
    atomic_store(&s->out_tail, tail + 1);
}

/* A worker claims an entry and names the item it runs. */
static void claim(struct world *wd, struct input *in)
{
    int id = u8(in) % NW;
    struct pp_slot *s = &wd->pool->ctl->slot[id];
    struct pp_worker *w = &wd->pool->w[id];
    uint32_t seq = w->retired + u8(in) % 8;
    uint32_t expect = PP_DESC_POSTED;
    atomic_compare_exchange_strong(&s->in[seq & PP_RING_MASK].state, &expect, PP_DESC_CLAIMED);
    atomic_store(&s->cur_seq, seq);
    atomic_store(&s->cur_item, u8(in) % 48);
    atomic_store(&s->busy, u8(in) & 1);
    atomic_store(&s->in_head, seq + (u8(in) & 1));
    atomic_store(&s->item_start, (int64_t)u32(in) * 1000);
}

/* Raw bytes anywhere in a worker's slot, or in the block's header. */
static void scribble(struct world *wd, struct input *in)
{
    uint8_t where = u8(in);
    unsigned char *base;
    size_t size;
    if (where == 0xff) {
        base = (unsigned char *)wd->pool->ctl;
        size = sizeof(struct pp_ctl);
    } else {
        base = (unsigned char *)&wd->pool->ctl->slot[where % NW];
        size = sizeof(struct pp_slot);
    }
    size_t off = ((size_t)u8(in) << 8 | u8(in)) % size;
    size_t len = 1 + u8(in) % 32;
    for (size_t i = 0; i < len && off + i < size; i++)
        base[off + i] = u8(in);
}

/* The helper reports a death (perhaps of the wrong generation). */
static void report_death(struct world *wd, struct input *in)
{
    int id = u8(in) % (NW + 1); /* NW: an id out of range */
    uint8_t b = u8(in);
    uint32_t gen = id < NW ? wd->pool->w[id].gen : 7;
    if (b & 1)
        gen += u8(in) % 3 - 1;
    struct pp_zmsg r = {.op = b & 2 ? PP_Z_EXITED : PP_Z_SPAWNED,
                        .id = (uint32_t)id,
                        .gen = gen,
                        .pid = wd->next_pid++,
                        .status = b & 4 ? SIGSEGV : (b >> 3) << 8};
    if (!wd->zclosed)
        send(wd->zpeer, &r, sizeof r, MSG_DONTWAIT);
    if (b == 0xff && !wd->zclosed) { /* a short, malformed datagram */
        send(wd->zpeer, &r, 3, MSG_DONTWAIT);
    }
    pump(wd);
}

static void iter_next(struct world *wd, struct input *in)
{
    if (wd->niters == 0)
        return;
    pp_iter *it = wd->iters[u8(in) % wd->niters];
    unsigned char res[16];
    size_t idx;
    pp_error err;
    int rc = pp_iter_next(it, res, &idx, 0, &err);
    CHECK(rc == 1 || rc == 0 || rc == -ETIMEDOUT || rc < 0);
}

static void finish(struct world *wd)
{
    pp_pool *pool = wd->pool;
    /* pp_terminate, then the helper reports every worker dead. */
    pool->terminated = pool->closed = true;
    pump(wd);
    pp__fail_pending(pool, PP_ECLOSED, "terminated");
    for (int id = 0; id < NW; id++)
        pp__kill_worker(pool, id, PP_ECLOSED);
    helper(wd, &(bool){false});
    pool->zygote_said = true;
    pp__pump(pool);
    for (int id = 0; id < NW; id++) /* any left (helper gone, or kills lost) */
        if (pool->w[id].state != PP_WS_DOWN) {
            if (!wd->zclosed) {
                struct pp_zmsg r = {
                    .op = PP_Z_EXITED, .id = (uint32_t)id, .gen = pool->w[id].gen, .status = 9};
                send(wd->zpeer, &r, sizeof r, MSG_DONTWAIT);
            }
        }
    if (wd->zclosed) {
        pp__on_zygote(pool);
    } else {
        close(wd->zpeer);
        wd->zclosed = true;
        pp__on_zygote(pool); /* reads the deaths, then end of file */
    }
    for (int id = 0; id < NW; id++)
        CHECK(pool->w[id].state == PP_WS_DOWN);

    /* Nothing lost: every item of every map resolved, nothing in flight. */
    for (int i = 0; i < wd->njobs; i++) {
        struct pp_job *job = wd->jobs[i];
        CHECK(job->resolved == job->n); /* each item exactly once (B5) */
        CHECK(job->complete);
        CHECK(job->nfailed <= job->resolved);
        CHECK(job->nfailed <= job->n);
        CHECK(job->inflight == 0);
    }
    CHECK(pool->retry.len == 0);
    for (int i = 0; i < wd->niters; i++) {
        pp_iter *it = wd->iters[i];
        int rc, got = 0;
        unsigned char res[16];
        while ((rc = pp_iter_next(it, res, NULL, 0, NULL)) != 0) {
            CHECK(rc != -ETIMEDOUT); /* every item has an answer now */
            CHECK(++got <= 300);
        }
        pp_iter_free(it);
        free(wd->iter_args[i]);
    }
    for (int i = 0; i < wd->njobs; i++) {
        pp__job_unref(wd->jobs[i]); /* the caller's handle */
        free(wd->args[i]);
        free(wd->results[i]);
    }
    close(pool->zsock);
    close(pool->wake_fd);
    munmap(pool->ctl, pool->map_bytes);
    pp__payload_destroy(&pool->payload);
    free(pool->retry.v);
    pp__jobcache_destroy(&pool->jobcache);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cond);
    pthread_cond_destroy(&pool->thread_cond);
    free(pool->w);
    free(pool);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    struct world wd = {.next_pid = 1000};
    double timeout = u8(&in) & 1 ? 0.001 : 0;
    wd.pool = pool_new(timeout);
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0);
    wd.pool->zsock = sv[0];
    wd.zpeer = sv[1];
    submit_map(&wd, &in);
    int steps = 0;
    while (in.n > 0 && steps++ < 400) {
        switch (u8(&in) % 12) {
        case 0:
        case 1:
            post_message(&wd, &in);
            pump(&wd);
            break;
        case 2:
            claim(&wd, &in);
            pump(&wd);
            break;
        case 3:
            scribble(&wd, &in);
            pump(&wd);
            break;
        case 4:
            report_death(&wd, &in);
            break;
        case 5:
            submit_map(&wd, &in);
            break;
        case 6:
            submit_iter(&wd, &in);
            break;
        case 7:
            iter_next(&wd, &in);
            break;
        case 8:
            if (wd.njobs > 0) {
                struct pp_job *job = wd.jobs[u8(&in) % wd.njobs];
                if (!job->complete)
                    pp__job_cancel(job);
                helper(&wd, &(bool){true});
            }
            break;
        case 9:
            if (u8(&in) == 0x5a && !wd.zclosed) { /* the helper dies */
                close(wd.zpeer);
                wd.zclosed = true;
                pump(&wd);
            }
            break;
        default:
            pump(&wd);
            break;
        }
    }
    finish(&wd);
    return 0;
}
