/*
 * mpi: the MPI backend (PP_BACKEND_MPI): the same calls, over MPI ranks.
 *
 * DESIGN: every rank calls pp_pool_new. Rank 0 gets the pool: its books
 * (jobs, pieces, pp_async, pp_iter, callbacks, errors) are the local ones,
 * but it runs no worker process; the other ranks are its workers. Each
 * serving rank runs a local pool of `workers` processes and PULLS work: it
 * starts with credit for twice its workers' chunks and every answer it sends
 * asks for one more, so a slow rank simply asks less often. Rank 0's
 * communication thread, the only thread of rank 0 that calls MPI once the
 * pool runs, gives the next undealt piece (the function as (object, offset),
 * see fnref.h, and the argument bytes) to the rank with the most credit, and
 * settles each answer as the local collector settles a chunk. A serving rank
 * runs each piece as one chunk of pp_imap on its local pool, so a crash, a
 * time limit or a task error fails the one item it hit there, and that
 * item's code, status and message travel back unchanged.
 *
 * Messages, on a duplicate of MPI_COMM_WORLD: HELLO (rank -> 0: its workers,
 * or why its local pool failed), TASK (0 -> rank), RESULT (rank -> 0),
 * STOP (0 -> rank: end, killing what runs if the pool was terminated) and
 * BYE (rank -> 0: its last message). Sends are nonblocking on both sides, so
 * two large messages crossing cannot deadlock. MPI has no descriptor to sleep
 * on: an idle side polls, napping up to 50 us while messages flow and up to
 * 1 ms once nothing came for 50 ms; rank 0's thread is also woken at once (a
 * condition variable) when work is queued.
 *
 * All ranks run the same program on the same architecture: structs cross as
 * bytes, functions as offsets into the same objects.
 */
#include "fnref.h"
#include "iter.h"
#include "pool.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef PP_HAVE_MPI
#include <limits.h>
#include <mpi.h>
#include <time.h>

enum { TAG_HELLO = 1, TAG_TASK, TAG_RESULT, TAG_STOP, TAG_BYE };

#define NAP_MIN_NS        10000
#define NAP_HOT_NS        50000   /* the longest nap while messages flow */
#define NAP_MAX_NS        1000000 /* and once nothing came for HOT_NS */
#define HOT_NS            50000000
#define CREDIT_PER_WORKER 2       /* chunks a rank holds per local worker, at least */
#define CREDIT_EXTRA_MAX  1024    /* more it may ask for when its chunks are short */
#define CREDIT_COVER_NS   5000000 /* ... to cover this much round-trip time */
#define RATE_WINDOW_NS    10000000

struct hello_msg {
    int32_t workers;
    int32_t err; /* errno of its failed pp_pool_new, or 0 */
};

struct stop_msg {
    int32_t terminate;
};

/* Then the object's name (objlen bytes, its NUL included), padding to 16,
 * then count * arg_size argument bytes. */
struct task_hdr {
    uint64_t id, offset, arg_size, result_size;
    uint32_t count, objlen;
    uint32_t batch; /* the function is a pp_batch_fn */
    uint32_t unused;
};

/* Then nfail struct pp_item_fail, then count * result_size result bytes.
 * `want`: how many more pieces the rank asks for with this answer (1 keeps
 * what it holds; more when its chunks are short, 0 when it holds too many). */
struct result_hdr {
    uint64_t id, result_size;
    uint32_t count, nfail;
    int32_t want;
    uint32_t broken; /* its local pool broke (a crash loop): it wants nothing more,
                        and its items failed with code 0 run elsewhere */
};

struct send {
    MPI_Request req;
    void *buf;
    struct send *next;
};

struct remote { /* a piece that runs on a rank */
    struct pp_piece piece;
    uint64_t id; /* its slot in the low 32 bits */
    int rank;
    bool live;
};

struct pp_mpi {
    MPI_Comm comm;
    int rank, size;
    int *credit;  /* per rank: pieces it asked for and has not got; -1: broken */
    int alive;    /* ranks not broken */
    int *workers; /* per rank */
    struct remote *rp;
    uint32_t rp_cap, rp_live, rp_hint;
    uint64_t seq;
    pp_fn *last_fn; /* the function of the last piece sent, and its name */
    struct pp_fnref last_ref;
    struct send *sends; /* not yet complete */
    pthread_t thread;
    pthread_cond_t cond; /* the thread naps on it, with pool->mu */
    bool cond_ready, thread_made, thread_started;
    bool quit; /* pp_join: every rank ends */
    bool shut; /* STOP sent to every rank and every BYE received */
};

/* True when procpool called MPI_Init_thread (then it calls MPI_Finalize). */
static bool we_initialized;
/* Rank 0 made its MPI pool: the serving ranks serve that one and end with
 * it, so a run has one MPI pool. */
static bool pool_made;

/* The next nap of a polling loop whose last activity was at `last`: short
 * while messages flow, longer (cheaper) when the pool has gone quiet. */
static int64_t next_nap(int64_t nap, int64_t last)
{
    int64_t max = pp__now_ns() - last < HOT_NS ? NAP_HOT_NS : NAP_MAX_NS;
    if (nap == 0)
        return NAP_MIN_NS;
    return nap * 2 > max ? max : nap * 2;
}

static void nap_for(int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    nanosleep(&ts, NULL);
}

/* ---- sends ------------------------------------------------------------------ */

/* Sends `len` bytes of `buf` (malloc'd; ours until the send completes).
 * Returns 0 or -ENOMEM (then buf was freed and nothing sent). */
static int post_send(struct pp_mpi *m, void *buf, size_t len, int dest, int tag)
{
    struct send *s = malloc(sizeof *s);
    if (s == NULL) {
        free(buf);
        return -ENOMEM;
    }
    s->buf = buf;
    MPI_Isend(buf, (int)len, MPI_BYTE, dest, tag, m->comm, &s->req);
    s->next = m->sends;
    m->sends = s;
    return 0;
}

static int post_copy(struct pp_mpi *m, const void *msg, size_t len, int dest, int tag)
{
    void *buf = malloc(len);
    if (buf == NULL)
        return -ENOMEM;
    memcpy(buf, msg, len);
    return post_send(m, buf, len, dest, tag);
}

/* Frees the sends that completed. Returns true if any did. */
static bool test_sends(struct pp_mpi *m)
{
    bool any = false;
    for (struct send **sp = &m->sends; *sp != NULL;) {
        struct send *s = *sp;
        int done = 0;
        MPI_Test(&s->req, &done, MPI_STATUS_IGNORE);
        if (!done) {
            sp = &s->next;
            continue;
        }
        *sp = s->next;
        free(s->buf);
        free(s);
        any = true;
    }
    return any;
}

static void wait_sends(struct pp_mpi *m)
{
    while (m->sends != NULL) {
        struct send *s = m->sends;
        MPI_Wait(&s->req, MPI_STATUS_IGNORE);
        m->sends = s->next;
        free(s->buf);
        free(s);
    }
}

/* Receives the next message from `source` if one is there: its bytes in
 * *buf (malloc'd) and *len. Returns its tag, 0 if none, -ENOMEM. */
static int receive(struct pp_mpi *m, int source, unsigned char **buf, size_t *len, int *from)
{
    int flag = 0, n = 0;
    MPI_Status st;
    MPI_Iprobe(source, MPI_ANY_TAG, m->comm, &flag, &st);
    if (!flag)
        return 0;
    MPI_Get_count(&st, MPI_BYTE, &n);
    *buf = malloc(n > 0 ? (size_t)n : 1);
    if (*buf == NULL)
        return -ENOMEM;
    MPI_Recv(*buf, n, MPI_BYTE, st.MPI_SOURCE, st.MPI_TAG, m->comm, MPI_STATUS_IGNORE);
    *len = (size_t)n;
    *from = st.MPI_SOURCE;
    return st.MPI_TAG;
}

/* ---- rank 0: ending the ranks ------------------------------------------------- */

/* Tells every rank to end and waits for each one's BYE, dropping whatever
 * else it still sends. Runs on whichever thread owns MPI then. */
static void shut_ranks(struct pp_mpi *m, bool terminate)
{
    if (m->shut || m->size <= 1)
        return;
    struct stop_msg s = {.terminate = terminate};
    for (int r = 1; r < m->size; r++)
        if (post_copy(m, &s, sizeof s, r, TAG_STOP) < 0)
            MPI_Send(&s, sizeof s, MPI_BYTE, r, TAG_STOP, m->comm);
    int64_t nap = 0;
    for (int byes = 0; byes < m->size - 1;) {
        unsigned char *buf = NULL;
        size_t len;
        int from, tag = receive(m, MPI_ANY_SOURCE, &buf, &len, &from);
        free(buf);
        byes += tag == TAG_BYE;
        if (tag != 0 || test_sends(m)) {
            nap = 0;
            continue;
        }
        nap = next_nap(nap, 0);
        nap_for(nap);
    }
    wait_sends(m); /* each rank read up to its STOP: everything was received */
    m->shut = true;
}

/* ---- rank 0: pieces on their way -------------------------------------------------- */

static void notify_progress(pp_pool *pool)
{
    if (pool->progress) {
        pool->progress = false;
        pp__notify(pool);
    }
}

/* Fails every piece still out on a rank (terminate, or the ranks ended). */
static void fail_remote(pp_pool *pool, int code, const char *why)
{
    struct pp_mpi *m = pool->mpi;
    for (uint32_t i = 0; i < m->rp_cap && m->rp_live > 0; i++) {
        struct remote *r = &m->rp[i];
        if (!r->live)
            continue;
        r->live = false;
        m->rp_live--;
        pp__fail_piece(&r->piece, 0, code, why);
        pp__job_settle(r->piece.job);
        pp__piece_release(pool, &r->piece);
    }
    notify_progress(pool);
}

static size_t round16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* Sends piece `p` to `rank`. Returns 0, or a code to fail the piece with. */
static int send_piece(pp_pool *pool, int rank, const struct pp_piece *p)
{
    struct pp_mpi *m = pool->mpi;
    const struct pp_job *job = p->job;
    struct pp_fnref *ref = &m->last_ref;
    if (job->fn != m->last_fn) {
        m->last_fn = NULL;
        if (pp__fnref_encode((const void *)job->fn, ref) < 0)
            return PP_ENOTFOUND;
        m->last_fn = job->fn;
    }
    size_t objlen = strlen(ref->object) + 1;
    size_t head = round16(sizeof(struct task_hdr) + objlen);
    size_t abytes = (size_t)p->count * job->arg_size;
    if (abytes > (size_t)INT_MAX - head)
        return -EMSGSIZE;
    if (m->rp_live == m->rp_cap) { /* the ranks asked for more */
        uint32_t cap = m->rp_cap * 2;
        struct remote *v = realloc(m->rp, cap * sizeof *v);
        if (v == NULL)
            return -ENOMEM;
        memset(v + m->rp_cap, 0, (cap - m->rp_cap) * sizeof *v);
        m->rp_hint = m->rp_cap;
        m->rp = v;
        m->rp_cap = cap;
    }
    uint32_t slot = m->rp_hint;
    while (m->rp[slot].live) /* rp_live < rp_cap: there is a free one */
        slot = (slot + 1) % m->rp_cap;
    unsigned char *buf = malloc(head + abytes);
    if (buf == NULL)
        return -ENOMEM;
    uint64_t id = (++m->seq << 32) | slot;
    struct task_hdr h = {.id = id,
                         .offset = ref->offset,
                         .arg_size = job->arg_size,
                         .result_size = job->result_size,
                         .count = p->count,
                         .objlen = (uint32_t)objlen,
                         .batch = job->batch};
    memcpy(buf, &h, sizeof h);
    memcpy(buf + sizeof h, ref->object, objlen);
    if (abytes != 0)
        memcpy(buf + head, pp__piece_args(p), abytes);
    if (post_send(m, buf, head + abytes, rank, TAG_TASK) < 0)
        return -ENOMEM;
    m->rp[slot] = (struct remote){.piece = *p, .id = id, .rank = rank, .live = true};
    m->rp_live++;
    m->rp_hint = (slot + 1) % m->rp_cap;
    m->credit[rank]--;
    return 0;
}

/* Gives pieces to the ranks that asked for them, the one that asked for
 * most first. mu held. Returns true if it sent anything. */
static bool deal_remote(pp_pool *pool)
{
    struct pp_mpi *m = pool->mpi;
    bool any = false;
    while (!pool->terminated && !pool->broken) {
        int best = 0;
        for (int r = 1; r < m->size; r++)
            if (m->credit[r] > 0 && (best == 0 || m->credit[r] > m->credit[best]))
                best = r;
        struct pp_piece p;
        if (best == 0 || !pp__next_piece(pool, &p))
            break;
        int rc = send_piece(pool, best, &p);
        if (rc < 0) {
            pp__fail_piece(&p, 0, rc,
                           rc == PP_ENOTFOUND ? "the task function is in no loaded object"
                                              : "cannot send this piece to an MPI rank");
            pp__job_settle(p.job);
            pp__piece_release(pool, &p);
        }
        any = true;
    }
    notify_progress(pool);
    return any;
}

/* A RESULT from `src`. mu held. */
static void on_result(pp_pool *pool, int src, const unsigned char *buf, size_t len)
{
    struct pp_mpi *m = pool->mpi;
    struct result_hdr h;
    if (src <= 0 || src >= m->size || len < sizeof h)
        return;
    memcpy(&h, buf, sizeof h);
    /* One answer: it wants `want` more pieces (bounded: it is our memory). */
    int limit = CREDIT_PER_WORKER * m->workers[src] + CREDIT_EXTRA_MAX;
    if (h.broken && m->credit[src] >= 0) {
        m->credit[src] = -1; /* it gets nothing more */
        m->alive--;
    } else if (h.want > 0 && m->credit[src] >= 0) {
        m->credit[src] = m->credit[src] + h.want > limit ? limit : m->credit[src] + h.want;
    }
    uint32_t slot = (uint32_t)h.id;
    if (slot >= m->rp_cap)
        return;
    struct remote *r = &m->rp[slot];
    if (!r->live || r->id != h.id || r->rank != src)
        return; /* failed already (terminate) */
    r->live = false;
    m->rp_live--;
    struct pp_piece piece = r->piece, *p = &piece; /* the slot is free from here */
    size_t fbytes = (size_t)h.nfail * sizeof(struct pp_item_fail);
    size_t rbytes = (size_t)p->count * p->job->result_size;
    const struct pp_item_fail *fails = (const struct pp_item_fail *)(buf + sizeof h);
    bool ok = h.count == p->count && h.result_size == p->job->result_size && h.nfail <= h.count &&
              len == sizeof h + fbytes + rbytes;
    for (uint32_t k = 0; ok && k < h.nfail; k++)
        ok = fails[k].item < h.count && (k == 0 || fails[k].item > fails[k - 1].item);
    if (ok) {
        pp__piece_done(pool, p, buf + sizeof h + fbytes, fails, h.nfail);
    } else {
        pp__fail_piece(p, 0, -EPROTO, "a malformed answer from an MPI rank");
        pp__job_settle(p->job);
        pp__piece_release(pool, p);
    }
    if (m->alive == 0 && !pool->broken) { /* as a local pool whose every slot gave up */
        pool->broken = true;
        pp__fail_pending(pool, PP_ESPAWN,
                         "the workers of every MPI rank keep dying before finishing any task");
    } else if (pool->broken) {
        pp__fail_pending(pool, PP_ESPAWN, "the workers of every MPI rank keep dying");
    }
    notify_progress(pool);
}

/* Reads what the ranks sent, a batch at a time. mu not held. */
static bool receive_all(pp_pool *pool)
{
    struct pp_mpi *m = pool->mpi;
    bool any = false;
    for (int k = 0; k < 64; k++) {
        unsigned char *buf = NULL;
        size_t len;
        int from, tag = receive(m, MPI_ANY_SOURCE, &buf, &len, &from);
        if (tag <= 0)
            break;
        any = true;
        if (tag == TAG_RESULT) {
            pthread_mutex_lock(&pool->mu);
            on_result(pool, from, buf, len);
            pthread_mutex_unlock(&pool->mu);
        }
        free(buf);
    }
    return any;
}

/* Rank 0's communication thread: the only one that calls MPI while the pool
 * runs. It ends when the pool is terminated or joined, after every rank said
 * BYE. */
static void *comm_thread(void *arg)
{
    pp_pool *pool = arg;
    struct pp_mpi *m = pool->mpi;
    int64_t nap = 0, last = pp__now_ns();
    pthread_mutex_lock(&pool->mu);
    while (!m->quit && !pool->terminated) {
        bool busy = deal_remote(pool);
        pthread_mutex_unlock(&pool->mu);
        busy |= receive_all(pool);
        busy |= test_sends(m);
        pthread_mutex_lock(&pool->mu);
        if (busy) {
            nap = 0;
            last = pp__now_ns();
            continue;
        }
        if (m->quit || pool->terminated)
            break;
        nap = next_nap(nap, last);
        int64_t until = pp__now_ns() + nap;
        struct timespec ts = {.tv_sec = until / 1000000000, .tv_nsec = until % 1000000000};
        pthread_cond_timedwait(&m->cond, &pool->mu, &ts);
    }
    bool terminate = pool->terminated;
    pthread_mutex_unlock(&pool->mu);
    shut_ranks(m, terminate);
    pthread_mutex_lock(&pool->mu);
    fail_remote(pool, PP_ECLOSED, "the pool was terminated");
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

/* ---- a serving rank ----------------------------------------------------------- */

struct chunk { /* a piece running on the local pool */
    struct chunk *next;
    pp_iter *it;
    uint64_t id;
    uint32_t count, done, nfail;
    size_t result_size;
    unsigned char *msg; /* the TASK: pp_imap reads the arguments in place */
    unsigned char *res; /* count * result_size */
    struct pp_item_fail *fails;
};

static void chunk_fail(struct chunk *c, uint32_t item, int code, int status, const char *text)
{
    if (c->fails == NULL)
        c->fails = calloc(c->count, sizeof *c->fails);
    if (c->fails != NULL) {
        struct pp_item_fail *f = &c->fails[c->nfail++];
        f->item = item;
        f->code = code;
        f->status = status;
        snprintf(f->text, sizeof f->text, "%s", text);
    }
    c->done++;
}

/* Frees c, and its TASK message unless `keep_msg` (the local pool may still
 * read its arguments: they are freed after it). */
static void chunk_free(struct chunk *c, bool keep_msg)
{
    pp_iter_free(c->it);
    free(c->res);
    free(c->fails);
    if (!keep_msg)
        free(c->msg);
    free(c);
}

/* How many pieces a serving rank holds (in flight here, or credit at rank
 * 0): twice its workers, plus enough to cover CREDIT_COVER_NS of round
 * trip at the rate it finishes them (Little's law), so short chunks do
 * not wait on the network, while long ones are not hoarded by a slow rank
 * (the last pieces of a job go to whoever asks first). */
struct flow {
    int base, target, quota;
    int64_t since;
    uint32_t done;
};

/* One more chunk finished: how many pieces to ask for with its answer. */
static int32_t flow_want(struct flow *f)
{
    int64_t now = pp__now_ns();
    f->done++;
    if (now - f->since >= RATE_WINDOW_NS) {
        double rate = f->done * 1e9 / (double)(now - f->since);
        double extra = rate * CREDIT_COVER_NS / 1e9;
        f->target = f->base + (extra > CREDIT_EXTRA_MAX ? CREDIT_EXTRA_MAX : (int)extra);
        f->since = now;
        f->done = 0;
    }
    int32_t want = 1;
    if (f->quota < f->target)
        want += f->target - f->quota > 64 ? 64 : f->target - f->quota;
    else if (f->quota > f->target)
        want = 0;
    f->quota += want - 1;
    return want;
}

/* Sends chunk c's answer. */
static void send_answer(struct pp_mpi *m, struct chunk *c, int32_t want, bool broken)
{
    size_t fbytes = (size_t)c->nfail * sizeof(struct pp_item_fail);
    size_t rbytes = (size_t)c->count * c->result_size;
    struct result_hdr h = {.id = c->id,
                           .result_size = c->result_size,
                           .count = c->count,
                           .nfail = c->nfail,
                           .want = broken ? 0 : want,
                           .broken = broken};
    unsigned char *buf = malloc(sizeof h + fbytes + rbytes);
    if (buf == NULL) { /* rank 0 then waits for it for ever: better to stop here */
        fprintf(stderr, "procpool: out of memory on MPI rank %d\n", m->rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    memcpy(buf, &h, sizeof h);
    if (fbytes)
        memcpy(buf + sizeof h, c->fails, fbytes);
    if (rbytes)
        memcpy(buf + sizeof h + fbytes, c->res, rbytes);
    if (post_send(m, buf, sizeof h + fbytes + rbytes, 0, TAG_RESULT) < 0) {
        fprintf(stderr, "procpool: out of memory on MPI rank %d\n", m->rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
}

/* The function a TASK names, cached: most pieces name the same one. */
static pp_fn *resolve(const struct task_hdr *h, const char *object)
{
    static struct pp_fnref last;
    static pp_fn *last_fn;
    if (last_fn != NULL && last.offset == h->offset && strcmp(last.object, object) == 0)
        return last_fn;
    struct pp_fnref ref = {.offset = h->offset};
    snprintf(ref.object, sizeof ref.object, "%s", object);
    pp_fn *fn = (pp_fn *)pp__fnref_resolve(&ref);
    if (fn != NULL) {
        last = ref;
        last_fn = fn;
    }
    return fn;
}

/* Starts the piece a TASK message carries (taking `buf`) on the local pool.
 * Returns the chunk, or NULL when the message makes no sense. */
static struct chunk *start_chunk(pp_pool *local, unsigned char *buf, size_t len, bool *broken)
{
    struct task_hdr h;
    if (len < sizeof h)
        return NULL;
    memcpy(&h, buf, sizeof h);
    size_t head = round16(sizeof h + (size_t)h.objlen);
    if (h.objlen == 0 || len < head || buf[sizeof h + h.objlen - 1] != '\0' ||
        (h.arg_size && h.count > (len - head) / h.arg_size) ||
        len - head != (size_t)h.count * h.arg_size || h.count == 0 ||
        (h.result_size && h.count > SIZE_MAX / h.result_size))
        return NULL;
    struct chunk *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->id = h.id;
    c->count = h.count;
    c->result_size = h.result_size;
    c->msg = buf;
    c->res = calloc(1, h.count * h.result_size + 1);
    if (c->res == NULL) {
        free(c);
        return NULL;
    }
    pp_fn *fn = resolve(&h, (const char *)buf + sizeof h);
    if (fn == NULL) {
        for (uint32_t i = 0; i < c->count; i++)
            chunk_fail(c, i, PP_ENOTFOUND, 0,
                       "the task function was not found in this rank's program");
        return c;
    }
    c->it = local ? pp__imap_piece(local, fn, h.batch != 0, buf + head, h.count, h.arg_size,
                                   h.result_size)
                  : NULL;
    if (c->it == NULL) {
        int code = local == NULL ? -ECHILD : errno == ESHUTDOWN ? PP_ECLOSED : -errno;
        if (local != NULL && errno == ECHILD) { /* it broke: run them elsewhere */
            *broken = true;
            code = 0;
        }
        for (uint32_t i = 0; i < c->count; i++)
            chunk_fail(c, i, code, 0, code ? pp_strerror(code) : "this rank's workers keep dying");
    }
    return c;
}

/* Takes what chunk c's items finished, waiting up to `timeout` seconds for
 * the first one. Returns true if any did. Sets *broken when the local pool
 * broke (a crash loop): its items failed PP_ESPAWN without running, and go
 * back to rank 0 to run elsewhere (code 0). */
static bool chunk_progress(struct chunk *c, double timeout, bool *broken)
{
    bool any = false;
    while (c->it != NULL && c->done < c->count) {
        size_t idx;
        pp_error err;
        void *res = c->result_size ? c->res + (size_t)c->done * c->result_size : NULL;
        int rc = pp_iter_next(c->it, res, &idx, any ? 0.0 : timeout, &err);
        if (rc == -ETIMEDOUT)
            break;
        any = true;
        if (rc == 1)
            c->done++;
        else if (rc == 0) /* cannot happen before count items: fail the rest */
            while (c->done < c->count)
                chunk_fail(c, c->done, PP_ECLOSED, 0, "the local pool ended");
        else if (rc == PP_ESPAWN) {
            *broken = true;
            chunk_fail(c, c->done, 0, 0, err.message);
        } else
            chunk_fail(c, c->done, rc, err.status, rc == err.code ? err.message : pp_strerror(rc));
    }
    return any;
}

/* A serving rank's life: the local pool, pieces in, answers out, until
 * rank 0 says STOP. Ends the process. */
_Noreturn static void serve(const pp_options *o, struct pp_mpi *m)
{
    pp_options lo = *o;
    lo.backend = PP_BACKEND_LOCAL;
    pp_pool *local = pp_pool_new(&lo);
    struct hello_msg hello = {0};
    if (local == NULL) {
        hello.err = errno ? errno : ECHILD;
    } else {
        pp_stats st;
        pp_pool_stats(local, &st);
        hello.workers = st.workers > 0 ? st.workers : 1;
    }
    MPI_Send(&hello, sizeof hello, MPI_BYTE, 0, TAG_HELLO, m->comm);
    struct flow flow = {.base = CREDIT_PER_WORKER * hello.workers, .since = pp__now_ns()};
    flow.target = flow.quota = flow.base;

    struct chunk *head = NULL, **tailp = &head;
    bool terminate = true, broken = false;
    int64_t nap = 0, last = pp__now_ns();
    for (;;) {
        bool busy = false, stop = false;
        unsigned char *buf;
        size_t len;
        int from, tag;
        while (!stop && (tag = receive(m, 0, &buf, &len, &from)) > 0) {
            busy = true;
            if (tag == TAG_STOP) {
                struct stop_msg s = {.terminate = 1};
                memcpy(&s, buf, len < sizeof s ? len : sizeof s);
                terminate = s.terminate != 0;
                free(buf);
                stop = true;
            } else if (tag == TAG_TASK) {
                struct chunk *c = start_chunk(local, buf, len, &broken);
                if (c == NULL) { /* rank 0 would wait for it for ever */
                    fprintf(stderr, "procpool: MPI rank %d cannot run a piece\n", m->rank);
                    MPI_Abort(MPI_COMM_WORLD, 1);
                }
                *tailp = c;
                tailp = &c->next;
            } else {
                free(buf);
            }
        }
        if (stop)
            break;
        /* Answers go back as chunks finish, in any order. */
        double wait = 0.0;
        if (!busy && head != NULL) { /* nothing else to do: wait for the oldest */
            nap = next_nap(nap, last);
            wait = (double)nap / 1e9;
        }
        for (struct chunk **cp = &head; *cp != NULL;) {
            struct chunk *c = *cp;
            busy |= chunk_progress(c, cp == &head ? wait : 0.0, &broken);
            if (c->done < c->count) {
                cp = &c->next;
                continue;
            }
            send_answer(m, c, flow_want(&flow), broken);
            *cp = c->next;
            chunk_free(c, false); /* every item resolved: its arguments are not read again */
        }
        tailp = &head;
        while (*tailp != NULL)
            tailp = &(*tailp)->next;
        busy |= test_sends(m);
        if (busy) {
            nap = 0;
            last = pp__now_ns();
        } else if (head == NULL) {
            nap = next_nap(nap, last);
            nap_for(nap);
        }
    }
    if (local != NULL && terminate)
        pp_terminate(local);
    struct chunk *left = head; /* their messages outlive the local pool */
    for (struct chunk *c = left; c != NULL; c = c->next) {
        pp_iter_free(c->it);
        c->it = NULL;
    }
    if (local != NULL) {
        pp_close(local);
        pp_pool_free(local);
    }
    while (left != NULL) {
        struct chunk *c = left;
        left = c->next;
        chunk_free(c, false);
    }
    wait_sends(m);
    MPI_Send(NULL, 0, MPI_BYTE, 0, TAG_BYE, m->comm);
    MPI_Comm_free(&m->comm);
    free(m);
    /* Whoever initialized MPI, this process ends here: it must finalize. */
    MPI_Finalize();
    fflush(NULL);
    exit(0);
}

/* ---- the interface pool.c calls ---------------------------------------------------- */

int pp__mpi_open(const pp_options *o, struct pp_mpi **out)
{
    *out = NULL;
    int inited = 0, finalized = 0, provided = MPI_THREAD_SINGLE;
    if (pool_made)
        return -EALREADY; /* one MPI pool per run: its ranks have ended or serve it */
    MPI_Finalized(&finalized);
    if (finalized)
        return -ESHUTDOWN;
    MPI_Initialized(&inited);
    if (!inited) {
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
            return -ENOTSUP;
        we_initialized = true;
    } else {
        MPI_Query_thread(&provided);
    }
    struct pp_mpi *m = calloc(1, sizeof *m);
    if (m == NULL)
        return -ENOMEM; /* the other ranks hang in MPI_Comm_dup: mpirun ends them */
    MPI_Comm_dup(MPI_COMM_WORLD, &m->comm);
    MPI_Comm_rank(m->comm, &m->rank);
    MPI_Comm_size(m->comm, &m->size);
    if (m->rank != 0)
        serve(o, m);
    pool_made = true;
    *out = m;
    if (m->size == 1)
        return 0; /* no rank to serve it: an ordinary local pool */
    /* Rank 0: the communication thread calls MPI while the caller's threads
     * may call pp_pool_new/pp_pool_free: calls from several threads, never
     * at once. */
    if (provided < MPI_THREAD_SERIALIZED) {
        shut_ranks(m, true);
        pp__mpi_close(m);
        *out = NULL;
        return -ENOTSUP;
    }
    return 1;
}

int pp__mpi_start(pp_pool *pool)
{
    struct pp_mpi *m = pool->mpi;
    m->credit = calloc((size_t)m->size, sizeof *m->credit);
    m->workers = calloc((size_t)m->size, sizeof *m->workers);
    if (m->credit == NULL || m->workers == NULL)
        return -ENOMEM;
    int err = 0;
    uint64_t total = 0, credit = 0;
    for (int got = 1; got < m->size; got++) {
        struct hello_msg h;
        MPI_Status st;
        MPI_Recv(&h, sizeof h, MPI_BYTE, MPI_ANY_SOURCE, TAG_HELLO, m->comm, &st);
        if (h.err != 0 || h.workers <= 0) {
            err = h.err > 0 ? h.err : ECHILD;
            continue;
        }
        m->workers[st.MPI_SOURCE] = h.workers;
        m->credit[st.MPI_SOURCE] = CREDIT_PER_WORKER * h.workers;
        m->alive++;
        total += (uint64_t)h.workers;
        credit += (uint64_t)CREDIT_PER_WORKER * (uint64_t)h.workers;
    }
    if (err != 0)
        return -err;
    if (total > INT_MAX || credit > UINT32_MAX)
        return -EINVAL;
    pool->remote_workers = (int)total;
    m->rp_cap = (uint32_t)credit;
    m->rp = calloc(m->rp_cap, sizeof *m->rp);
    if (m->rp == NULL)
        return -ENOMEM;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&m->cond, &ca);
    pthread_condattr_destroy(&ca);
    m->cond_ready = true;
    int rc = pthread_create(&m->thread, NULL, comm_thread, pool);
    if (rc != 0)
        return -rc;
    m->thread_made = m->thread_started = true;
    return 0;
}

void pp__mpi_kick(pp_pool *pool)
{
    struct pp_mpi *m = pool->mpi;
    if (m->thread_started)
        pthread_cond_signal(&m->cond);
}

void pp__mpi_terminate(pp_pool *pool)
{
    struct pp_mpi *m = pool->mpi;
    if (m->size <= 1)
        return;
    if (m->rp != NULL)
        fail_remote(pool, PP_ECLOSED, "the pool was terminated");
    pp__mpi_kick(pool);
}

void pp__mpi_stop(pp_pool *pool)
{
    struct pp_mpi *m = pool->mpi;
    if (m->size <= 1)
        return;
    if (m->thread_started) {
        m->thread_started = false; /* one caller joins it */
        m->quit = true;
        pthread_cond_signal(&m->cond);
        pthread_mutex_unlock(&pool->mu);
        pthread_join(m->thread, NULL);
        pthread_mutex_lock(&pool->mu);
    } else if (!m->thread_made) {
        shut_ranks(m, true); /* a pool that failed to start */
    }
    if (m->rp != NULL)
        fail_remote(pool, PP_ECLOSED, "the pool was terminated");
}

void pp__mpi_close(struct pp_mpi *m)
{
    if (m == NULL)
        return;
    shut_ranks(m, true); /* done already, unless the pool never started */
    if (m->cond_ready)
        pthread_cond_destroy(&m->cond);
    MPI_Comm_free(&m->comm);
    free(m->credit);
    free(m->workers);
    free(m->rp);
    free(m);
    if (we_initialized)
        MPI_Finalize();
}

void pp__mpi_stats(pp_pool *pool, pp_stats *out)
{
    struct pp_mpi *m = pool->mpi;
    out->workers += pool->remote_workers;
    for (uint32_t i = 0; i < m->rp_cap; i++)
        if (m->rp[i].live)
            out->running += m->rp[i].piece.count;
}

#else /* no MPI: PP_BACKEND_MPI is not supported */

int pp__mpi_open(const pp_options *o, struct pp_mpi **out)
{
    (void)o;
    *out = NULL;
    return -ENOTSUP;
}

int pp__mpi_start(pp_pool *pool)
{
    (void)pool;
    return -ENOTSUP;
}

void pp__mpi_kick(pp_pool *pool)
{
    (void)pool;
}

void pp__mpi_terminate(pp_pool *pool)
{
    (void)pool;
}

void pp__mpi_stop(pp_pool *pool)
{
    (void)pool;
}

void pp__mpi_close(struct pp_mpi *m)
{
    (void)m;
}

void pp__mpi_stats(pp_pool *pool, pp_stats *out)
{
    (void)pool;
    (void)out;
}

#endif
