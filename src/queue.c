/*
 * queue: a first-in first-out queue of byte messages shared by the processes
 * of a pool family (Python's multiprocessing.Queue, without pickling).
 *
 * DESIGN: one arena block holds a ring of records (offset, length) and a
 * ring of `capacity` data bytes in which messages follow each other with no
 * padding, wrapping at the end; the only overhead is the record. One robust
 * mutex guards both. A put copies its bytes and writes its record beyond the
 * tail, then commits with one store (tail + 1); a get copies the message
 * out, then commits with one store (head + 1). Everything else is derived
 * from committed records, so a process killed anywhere in a put or a get, even
 * holding the mutex, leaves the queue as it was before that call: the next
 * locker gets EOWNERDEAD, has nothing to repair, and wakes every sleeper. No
 * torn message can be read, and none is lost. Sleepers wait on futex sequence
 * words, and every commit wakes all sleepers of the other side, so a sleeper
 * that dies after its wake-up cannot leave the others asleep.
 */
#include "queue.h"
#include "shm.h"
#include "sync.h"
#include "util.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

#define QUEUE_MAGIC 0x45554551u /* "QUEU" */
#define REC_MIN     64
#define REC_MAX     (1u << 20)

static inline struct pp_queue_rec *recs(pp_queue *q)
{
    return (struct pp_queue_rec *)(q + 1);
}

static inline unsigned char *data(pp_queue *q)
{
    return (unsigned char *)(recs(q) + q->nrec);
}

/* Data stream positions of the oldest queued byte and of the next byte to
 * write, from committed records only. mu held. */
static uint64_t data_tail(pp_queue *q)
{
    if (q->tail == 0)
        return 0;
    struct pp_queue_rec *r = &recs(q)[(q->tail - 1) % q->nrec];
    return r->off + r->len;
}

static uint64_t data_head(pp_queue *q)
{
    return q->head == q->tail ? data_tail(q) : recs(q)[q->head % q->nrec].off;
}

static bool fits(pp_queue *q, size_t len)
{
    return q->tail - q->head < q->nrec && q->capacity - (data_tail(q) - data_head(q)) >= len;
}

static bool valid(pp_queue *q)
{
    return q && pp__shm_contains(q, sizeof *q) && q->magic == QUEUE_MAGIC;
}

static void wake_all(pp_queue *q)
{
    atomic_fetch_add(&q->put_seq, 1);
    atomic_fetch_add(&q->get_seq, 1);
    pp__futex_wake(&q->put_seq, INT_MAX);
    pp__futex_wake(&q->get_seq, INT_MAX);
}

/* Takes mu by the deadline. 0 or a negative code. */
static int qlock(pp_queue *q, int64_t deadline)
{
    int rc = pp__mutex_lock_until(&q->mu, deadline);
    if (rc == EOWNERDEAD) { /* its holder died mid-call: nothing was committed */
        wake_all(q);
        return 0;
    }
    if (rc == ETIMEDOUT || rc == EBUSY)
        return -ETIMEDOUT;
    return -rc;
}

/* With mu held: waits on *seq until ready(q, len) holds or the deadline
 * passes. Returns 0 with mu held, or a negative code without it. */
static int qwait(pp_queue *q, bool (*ready)(pp_queue *, size_t), size_t len, _Atomic uint32_t *seq,
                 _Atomic uint32_t *waiters, int64_t deadline)
{
    while (!ready(q, len)) {
        uint32_t s = atomic_load(seq);
        atomic_fetch_add(waiters, 1);
        pthread_mutex_unlock(&q->mu);
        int rc = pp__futex_wait(seq, s, deadline);
        atomic_fetch_sub(waiters, 1);
        int lr = qlock(q, deadline);
        if (lr != 0)
            return lr;
        if (rc == -ETIMEDOUT && !ready(q, len)) {
            pthread_mutex_unlock(&q->mu);
            return -ETIMEDOUT;
        }
    }
    return 0;
}

static bool nonempty(pp_queue *q, size_t len)
{
    (void)len;
    return q->head != q->tail;
}

static void hook(pp_queue *q, uint32_t when)
{
    uint32_t expected = when;
    if (atomic_load_explicit(&q->test_hook, memory_order_relaxed) != when ||
        !atomic_compare_exchange_strong(&q->test_hook, &expected, PP_QUEUE_STALLED))
        return;
    pp__futex_wake(&q->test_hook, INT_MAX);
    for (;;) /* a test kills us here */
        pp__futex_wait(&q->test_hook, PP_QUEUE_STALLED, PP_FOREVER);
}

/* A queue holding up to `capacity` bytes of messages (and at least
 * min(capacity / 16, 2^20), never fewer than 64, messages at once), in the
 * arena. NULL with errno EINVAL (capacity 0) or ENOMEM. Any process. */
pp_queue *pp_queue_new(size_t capacity)
{
    if (capacity == 0) {
        errno = EINVAL;
        return NULL;
    }
    if (capacity > SIZE_MAX / 4) {
        errno = ENOMEM;
        return NULL;
    }
    size_t nrec = capacity / 16 + 1;
    nrec = nrec < REC_MIN ? REC_MIN : nrec > REC_MAX ? REC_MAX : nrec;
    pp_queue *q = pp_shm_alloc(sizeof *q + nrec * sizeof(struct pp_queue_rec) + capacity);
    if (!q)
        return NULL;
    q->capacity = capacity;
    q->nrec = nrec;
    int rc = pp__mutex_init(&q->mu, PTHREAD_MUTEX_NORMAL);
    if (rc != 0) {
        pp_shm_free(q);
        errno = rc;
        return NULL;
    }
    q->magic = QUEUE_MAGIC;
    return q;
}

/* Appends a copy of len bytes at msg (msg may be NULL when len is 0),
 * waiting up to `timeout` seconds for room. Returns 0; -ETIMEDOUT (nothing
 * was queued); -EMSGSIZE if len exceeds the capacity; -EINVAL for a NULL
 * queue or message. Messages of one producer come out in the order it put
 * them. Any process, any thread. */
int pp_queue_put(pp_queue *q, const void *msg, size_t len, double timeout)
{
    if (!valid(q) || (!msg && len > 0))
        return -EINVAL;
    if (len > q->capacity)
        return -EMSGSIZE;
    int64_t deadline = pp__deadline(timeout);
    int rc = qlock(q, deadline);
    if (rc == 0)
        rc = qwait(q, fits, len, &q->put_seq, &q->put_waiters, deadline);
    if (rc != 0)
        return rc;
    uint64_t off = data_tail(q);
    size_t at = (size_t)(off % q->capacity), first = q->capacity - at;
    if (first > len)
        first = len;
    if (len > 0) {
        memcpy(data(q) + at, msg, first);
        memcpy(data(q), (const unsigned char *)msg + first, len - first);
    }
    struct pp_queue_rec *r = &recs(q)[q->tail % q->nrec];
    r->off = off;
    r->len = len;
    hook(q, PP_QUEUE_STALL_PUT);
    atomic_signal_fence(memory_order_seq_cst);
    q->tail++; /* the commit */
    atomic_fetch_add(&q->get_seq, 1);
    pthread_mutex_unlock(&q->mu);
    if (atomic_load(&q->get_waiters) > 0)
        pp__futex_wake(&q->get_seq, INT_MAX);
    return 0;
}

/* Takes the oldest message into buf (cap bytes; buf may be NULL when cap is
 * 0), its length into *len (len may be NULL), waiting up to `timeout`
 * seconds for one. Returns 0; -ETIMEDOUT; -EMSGSIZE when cap is too small:
 * *len says the length needed and the message stays queued; -EINVAL for a
 * NULL queue, or a NULL buf with cap > 0. Any process, any thread. */
int pp_queue_get(pp_queue *q, void *buf, size_t cap, size_t *len, double timeout)
{
    if (!valid(q) || (!buf && cap > 0))
        return -EINVAL;
    int64_t deadline = pp__deadline(timeout);
    int rc = qlock(q, deadline);
    if (rc == 0)
        rc = qwait(q, nonempty, 0, &q->get_seq, &q->get_waiters, deadline);
    if (rc != 0)
        return rc;
    /* The queue lives in shared memory any process may scribble on: a
     * record that cannot be right is dropped and reported, never followed. */
    if (q->nrec == 0 || q->capacity == 0) {
        pthread_mutex_unlock(&q->mu);
        return -EBADMSG;
    }
    struct pp_queue_rec r = recs(q)[q->head % q->nrec];
    if (r.len > q->capacity) {
        q->head++;
        atomic_fetch_add(&q->put_seq, 1);
        pthread_mutex_unlock(&q->mu);
        return -EBADMSG;
    }
    if (len)
        *len = (size_t)r.len;
    if (r.len > cap) {
        pthread_mutex_unlock(&q->mu);
        return -EMSGSIZE;
    }
    size_t at = (size_t)(r.off % q->capacity), first = q->capacity - at;
    if (first > r.len)
        first = (size_t)r.len;
    if (r.len > 0) {
        memcpy(buf, data(q) + at, first);
        memcpy((unsigned char *)buf + first, data(q), (size_t)r.len - first);
    }
    hook(q, PP_QUEUE_STALL_GET);
    atomic_signal_fence(memory_order_seq_cst);
    q->head++; /* the commit */
    atomic_fetch_add(&q->put_seq, 1);
    pthread_mutex_unlock(&q->mu);
    if (atomic_load(&q->put_waiters) > 0)
        pp__futex_wake(&q->put_seq, INT_MAX);
    return 0;
}

/* Frees a queue nobody uses any more, with the messages still in it.
 * Accepts NULL. */
void pp_queue_free(pp_queue *q)
{
    if (!valid(q))
        return;
    q->magic = 0;
    pthread_mutex_destroy(&q->mu);
    pp_shm_free(q);
}
