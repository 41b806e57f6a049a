/*
 * sync: Lock, RLock, Semaphore, Condition, Event and Barrier shared by the
 * processes of a pool family.
 *
 * DESIGN: every object is allocated in the shared arena, so a pointer to it
 * works in every process. A process may die at any instruction, so nothing
 * here may depend on a process coming back:
 *  - locks are process-shared ROBUST pthread mutexes: when a holder dies the
 *    kernel marks the mutex, and the next acquirer gets it with
 *    PP_EOWNERDEAD (made consistent, so it works normally afterwards);
 *  - everything that sleeps (semaphore, condition, event, barrier) sleeps on
 *    a futex sequence word with an absolute deadline. A sleeper killed there
 *    leaves nothing behind; counters of sleepers only save wake-ups, and one
 *    left too high by a death costs a spare system call, never a hang;
 *  - a barrier waiter holds a robust "slot" mutex while it waits, so the
 *    others find a dead party (its slot comes back EOWNERDEAD) and break the
 *    barrier instead of waiting past their timeout.
 * A thread's ownership of a lock is pthread's: re-entering a plain lock is
 * -EDEADLK, releasing a lock one does not hold is -EPERM.
 */
#include "sync.h"
#include "shm.h"
#include "util.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <time.h>

#define LOCK_MAGIC    0x4b434f4cu /* "LOCK" */
#define SEM_MAGIC     0x4d455350u
#define COND_MAGIC    0x444e4f43u
#define EVENT_MAGIC   0x544e5645u
#define BARRIER_MAGIC 0x52524142u
#define NO_SLOT       UINT32_MAX
#define MAX_PARTIES   (1u << 20)
#define SLICE_MIN_NS  1000000LL  /* a barrier waiter looks for dead parties */
#define SLICE_MAX_NS  64000000LL /* after 1 ms, then ever less often */

/* ---- robust mutex helpers ---------------------------------------------- */

int pp__mutex_init(pthread_mutex_t *m, int type)
{
    pthread_mutexattr_t at;
    int rc = pthread_mutexattr_init(&at);
    if (rc != 0)
        return rc;
    rc = pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&at, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutexattr_settype(&at, type);
    if (rc == 0)
        rc = pthread_mutex_init(m, &at);
    pthread_mutexattr_destroy(&at);
    return rc;
}

int pp__mutex_lock_until(pthread_mutex_t *m, int64_t deadline)
{
    int rc;
    if (deadline == PP_FOREVER) {
        rc = pthread_mutex_lock(m);
    } else {
        struct timespec ts = {.tv_sec = deadline / 1000000000, .tv_nsec = deadline % 1000000000};
        rc = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
    }
    if (rc == EOWNERDEAD)
        pthread_mutex_consistent(m);
    return rc;
}

/* Whether p points at a live object of the given kind in the arena. */
static bool valid(const void *p, size_t size, uint32_t magic)
{
    return p && pp__shm_contains(p, size) && *(const uint32_t *)p == magic;
}

/* ---- Lock, RLock -------------------------------------------------------- */

static pp_lock *lock_new(bool recursive)
{
    pp_lock *l = pp_shm_alloc(sizeof *l);
    if (!l)
        return NULL;
    int rc = pp__mutex_init(&l->mu, recursive ? PTHREAD_MUTEX_RECURSIVE : PTHREAD_MUTEX_ERRORCHECK);
    if (rc != 0) {
        pp_shm_free(l);
        errno = rc;
        return NULL;
    }
    l->recursive = recursive;
    l->magic = LOCK_MAGIC;
    return l;
}

/* A new unlocked Lock in the arena. NULL with errno ENOMEM. Any process. */
pp_lock *pp_lock_new(void)
{
    return lock_new(false);
}

/* A new unlocked RLock: its holder may acquire it again, and must release
 * it as many times. NULL with errno ENOMEM. Any process. */
pp_lock *pp_rlock_new(void)
{
    return lock_new(true);
}

/* Reports, once, a holder's death that a release by a non-holder absorbed. */
static int took(pp_lock *l, int rc)
{
    if (rc == EOWNERDEAD) {
        l->died = 0;
        l->depth = 1;
        return PP_EOWNERDEAD;
    }
    if (l->recursive)
        l->depth++;
    if (l->died) {
        l->died = 0;
        return PP_EOWNERDEAD;
    }
    return 0;
}

/* Acquires l, waiting up to `timeout` seconds (negative: forever, 0: poll).
 * Returns 0; PP_EOWNERDEAD: acquired, but the last holder died holding it
 * (the data it guards may need repair; the lock works normally after);
 * -ETIMEDOUT; -EDEADLK when a plain lock is already held by the caller;
 * -EINVAL for a NULL or freed lock. Any process, any thread. */
int pp_lock_acquire(pp_lock *l, double timeout)
{
    if (!valid(l, sizeof *l, LOCK_MAGIC))
        return -EINVAL;
    int rc = pp__mutex_lock_until(&l->mu, pp__deadline(timeout));
    switch (rc) {
    case 0:
    case EOWNERDEAD:
        return took(l, rc);
    case ETIMEDOUT:
    case EBUSY:
        return -ETIMEDOUT;
    default:
        return -rc;
    }
}

/* Whether the calling thread holds l; *depth gets the levels it holds. */
static bool owned(pp_lock *l, uint32_t *depth)
{
    int rc = pthread_mutex_trylock(&l->mu);
    if (rc == EDEADLK) { /* a plain lock, held by us */
        *depth = 1;
        return true;
    }
    if (rc == EOWNERDEAD) { /* the holder is dead: keep that for the next acquirer */
        pthread_mutex_consistent(&l->mu);
        l->died = 1;
        l->depth = 0;
        pthread_mutex_unlock(&l->mu);
        return false;
    }
    if (rc != 0) /* EBUSY: someone else holds it */
        return false;
    bool mine = l->recursive && l->depth > 0; /* a free mutex has depth 0 */
    *depth = l->depth;
    pthread_mutex_unlock(&l->mu);
    return mine;
}

/* Releases one level of l. Returns 0, -EPERM if the calling thread does not
 * hold it, -EINVAL for a NULL or freed lock. Any process, any thread. */
int pp_lock_release(pp_lock *l)
{
    if (!valid(l, sizeof *l, LOCK_MAGIC))
        return -EINVAL;
    if (!l->recursive) {
        int rc = pthread_mutex_unlock(&l->mu);
        return rc ? -rc : 0;
    }
    uint32_t depth;
    if (!owned(l, &depth))
        return -EPERM;
    l->depth = depth - 1; /* still held: the mutex's own count is at least 1 */
    pthread_mutex_unlock(&l->mu);
    return 0;
}

/* Frees a lock nobody holds or waits for. Accepts NULL. */
void pp_lock_free(pp_lock *l)
{
    if (!valid(l, sizeof *l, LOCK_MAGIC))
        return;
    l->magic = 0;
    pthread_mutex_destroy(&l->mu);
    pp_shm_free(l);
}

/* ---- Semaphore ---------------------------------------------------------- */

/* A counting semaphore holding `value`. NULL with errno ENOMEM, or EINVAL
 * when value exceeds INT32_MAX. Any process. */
pp_sem *pp_sem_new(unsigned value)
{
    if (value > INT32_MAX) {
        errno = EINVAL;
        return NULL;
    }
    pp_sem *s = pp_shm_alloc(sizeof *s);
    if (!s)
        return NULL;
    atomic_store(&s->value, value);
    s->magic = SEM_MAGIC;
    return s;
}

static bool sem_take(pp_sem *s)
{
    uint32_t v = atomic_load(&s->value);
    while (v > 0)
        if (atomic_compare_exchange_weak(&s->value, &v, v - 1))
            return true;
    return false;
}

/* Takes one unit, waiting up to `timeout` seconds. Returns 0, -ETIMEDOUT,
 * -EINVAL for a NULL semaphore. A unit held by a process that died is not
 * given back (as in Python); waiters still return at their timeout. */
int pp_sem_acquire(pp_sem *s, double timeout)
{
    if (!valid(s, sizeof *s, SEM_MAGIC))
        return -EINVAL;
    int64_t deadline = pp__deadline(timeout);
    for (;;) {
        if (sem_take(s)) {
            /* pass the wake-up on if units are left: a woken waiter may
             * have died before it took its unit */
            if (atomic_load(&s->value) > 0 && atomic_load(&s->waiters) > 0)
                pp__futex_wake(&s->value, 1);
            return 0;
        }
        /* sleep in slices, so a wake-up lost to a death is made good */
        int64_t now = pp__now_ns();
        int64_t until = deadline - now > 200000000 ? now + 200000000 : deadline;
        atomic_fetch_add(&s->waiters, 1);
        int rc = pp__futex_wait(&s->value, 0, until);
        atomic_fetch_sub(&s->waiters, 1);
        if (rc == -ETIMEDOUT && until == deadline)
            return sem_take(s) ? 0 : -ETIMEDOUT;
    }
}

/* Gives back one unit, waking a waiter. Returns 0, -EOVERFLOW past
 * INT32_MAX units, -EINVAL for a NULL semaphore. Any process. */
int pp_sem_release(pp_sem *s)
{
    if (!valid(s, sizeof *s, SEM_MAGIC))
        return -EINVAL;
    uint32_t v = atomic_load(&s->value);
    do {
        if (v >= INT32_MAX)
            return -EOVERFLOW;
    } while (!atomic_compare_exchange_weak(&s->value, &v, v + 1));
    if (atomic_load(&s->waiters) > 0)
        pp__futex_wake(&s->value, 1);
    return 0;
}

/* Frees a semaphore nobody waits on. Accepts NULL. */
void pp_sem_free(pp_sem *s)
{
    if (!valid(s, sizeof *s, SEM_MAGIC))
        return;
    s->magic = 0;
    pp_shm_free(s);
}

/* ---- Condition ---------------------------------------------------------- */

/* A condition variable over `lock` (a pp_lock or an rlock), which must
 * outlive it. NULL with errno EINVAL (NULL lock) or ENOMEM. Any process. */
pp_cond *pp_cond_new(pp_lock *lock)
{
    if (!valid(lock, sizeof *lock, LOCK_MAGIC)) {
        errno = EINVAL;
        return NULL;
    }
    pp_cond *c = pp_shm_alloc(sizeof *c);
    if (!c)
        return NULL;
    c->lock = lock;
    c->magic = COND_MAGIC;
    return c;
}

/* The caller holds the lock: releases it (every level of an rlock), sleeps
 * until notified or `timeout` seconds pass, then takes the lock back at the
 * same depth, without a time limit. Returns 0 (notified, or a spurious
 * wake-up: re-check the predicate), -ETIMEDOUT, PP_EOWNERDEAD (as
 * pp_lock_acquire: the lock is held), -EPERM if the caller does not hold the
 * lock, -EINVAL for a NULL condition. */
int pp_cond_wait(pp_cond *c, double timeout)
{
    if (!valid(c, sizeof *c, COND_MAGIC))
        return -EINVAL;
    pp_lock *l = c->lock;
    uint32_t depth;
    if (!owned(l, &depth))
        return -EPERM;
    int64_t deadline = pp__deadline(timeout);
    uint32_t seq = atomic_load(&c->seq);
    atomic_fetch_add(&c->waiters, 1);
    l->depth = 0;
    for (uint32_t i = 0; i < depth; i++)
        pthread_mutex_unlock(&l->mu);
    int rc = pp__futex_wait(&c->seq, seq, deadline);
    atomic_fetch_sub(&c->waiters, 1);
    int lr = pp__mutex_lock_until(&l->mu, PP_FOREVER);
    if (lr != 0 && lr != EOWNERDEAD)
        return -lr;
    for (uint32_t i = 1; i < depth; i++)
        pthread_mutex_lock(&l->mu);
    if (l->recursive)
        l->depth = depth;
    if (lr == EOWNERDEAD || l->died) {
        l->died = 0;
        return PP_EOWNERDEAD;
    }
    return rc == -ETIMEDOUT ? -ETIMEDOUT : 0;
}

/* Wakes up to n waiters. The caller must hold the lock: -EPERM otherwise;
 * -EINVAL for a NULL condition. */
int pp_cond_notify(pp_cond *c, unsigned n)
{
    if (!valid(c, sizeof *c, COND_MAGIC))
        return -EINVAL;
    uint32_t depth;
    if (!owned(c->lock, &depth))
        return -EPERM;
    if (n == 0)
        return 0;
    atomic_fetch_add(&c->seq, 1);
    if (atomic_load(&c->waiters) > 0)
        pp__futex_wake(&c->seq, n > INT_MAX ? INT_MAX : (int)n);
    return 0;
}

/* Wakes every waiter; as pp_cond_notify. */
int pp_cond_notify_all(pp_cond *c)
{
    return pp_cond_notify(c, UINT_MAX);
}

/* Frees a condition nobody waits on (not its lock). Accepts NULL. */
void pp_cond_free(pp_cond *c)
{
    if (!valid(c, sizeof *c, COND_MAGIC))
        return;
    c->magic = 0;
    pp_shm_free(c);
}

/* ---- Event -------------------------------------------------------------- */

/* A new, clear event. NULL with errno ENOMEM. Any process. */
pp_event *pp_event_new(void)
{
    pp_event *e = pp_shm_alloc(sizeof *e);
    if (!e)
        return NULL;
    e->magic = EVENT_MAGIC;
    return e;
}

/* Sets the flag and wakes every waiter. 0, or -EINVAL for NULL. */
int pp_event_set(pp_event *e)
{
    if (!valid(e, sizeof *e, EVENT_MAGIC))
        return -EINVAL;
    uint32_t v = atomic_load(&e->word);
    do {
        if (v & 1)
            return 0;
    } while (!atomic_compare_exchange_weak(&e->word, &v, (v + 2) | 1));
    pp__futex_wake(&e->word, INT_MAX);
    return 0;
}

/* Clears the flag. 0, or -EINVAL for NULL. */
int pp_event_clear(pp_event *e)
{
    if (!valid(e, sizeof *e, EVENT_MAGIC))
        return -EINVAL;
    atomic_fetch_and(&e->word, ~1u);
    return 0;
}

/* Whether the flag is set; false for NULL. */
bool pp_event_is_set(pp_event *e)
{
    return valid(e, sizeof *e, EVENT_MAGIC) && (atomic_load(&e->word) & 1);
}

/* Waits until the flag is set, or was set while waiting (even if cleared
 * since, as Python's), or `timeout` seconds pass. 0, -ETIMEDOUT, or -EINVAL
 * for NULL. */
int pp_event_wait(pp_event *e, double timeout)
{
    if (!valid(e, sizeof *e, EVENT_MAGIC))
        return -EINVAL;
    int64_t deadline = pp__deadline(timeout);
    uint32_t v = atomic_load(&e->word);
    for (;;) {
        if (v & 1)
            return 0;
        int rc = pp__futex_wait(&e->word, v, deadline);
        uint32_t now = atomic_load(&e->word);
        if ((now & 1) || now >> 1 != v >> 1)
            return 0;
        if (rc == -ETIMEDOUT)
            return -ETIMEDOUT;
        v = now;
    }
}

/* Frees an event nobody waits on. Accepts NULL. */
void pp_event_free(pp_event *e)
{
    if (!valid(e, sizeof *e, EVENT_MAGIC))
        return;
    e->magic = 0;
    pp_shm_free(e);
}

/* ---- Barrier ------------------------------------------------------------ */

/* A barrier for `parties` parties (1 .. 2^20). NULL with errno EINVAL (0 or
 * too many parties) or ENOMEM. Any process. */
pp_barrier *pp_barrier_new(unsigned parties)
{
    if (parties == 0 || parties > MAX_PARTIES) {
        errno = EINVAL;
        return NULL;
    }
    size_t nslots = 2 * (size_t)parties; /* this generation's and the last one's */
    size_t size = sizeof(pp_barrier) + nslots * sizeof(pthread_mutex_t) +
                  parties * sizeof(uint32_t) + nslots * sizeof(uint32_t);
    pp_barrier *b = pp_shm_alloc(size);
    if (!b)
        return NULL;
    b->parties = parties;
    b->slot_of = (uint32_t *)(b->slot + nslots);
    b->slot_outcome = (_Atomic uint32_t *)(b->slot_of + parties);
    for (unsigned i = 0; i < parties; i++)
        b->slot_of[i] = NO_SLOT;
    int rc = pp__mutex_init(&b->mu, PTHREAD_MUTEX_NORMAL);
    for (size_t i = 0; rc == 0 && i < nslots; i++)
        rc = pp__mutex_init(&b->slot[i], PTHREAD_MUTEX_ERRORCHECK);
    if (rc != 0) {
        pp_shm_free(b);
        errno = rc;
        return NULL;
    }
    b->magic = BARRIER_MAGIC;
    return b;
}

/* Breaks the current generation. mu held. */
static void barrier_break(pp_barrier *b)
{
    uint32_t w = atomic_load(&b->word);
    if (!(w & 1)) {
        atomic_store(&b->word, w | 1);
        pp__futex_wake(&b->word, INT_MAX);
    }
}

/* Ends the current generation: tripped, or reset. Its waiters' entries of
 * slot_of are cleared, so that none is read in a later generation (the last
 * arrival, and one that died before it took a slot, never set theirs). mu
 * held. */
static void barrier_next(pp_barrier *b, bool tripped)
{
    uint32_t g = atomic_load(&b->word) >> 1, ended = g << 1 | tripped;
    atomic_store(&b->outcome[g % PP_BARRIER_HISTORY], ended);
    uint32_t n = atomic_load(&b->count);
    for (uint32_t i = 0; i < n && i < b->parties; i++) {
        if (b->slot_of[i] != NO_SLOT)
            atomic_store(&b->slot_outcome[b->slot_of[i]], ended);
        b->slot_of[i] = NO_SLOT;
    }
    atomic_store(&b->count, 0);
    atomic_store(&b->word, (g + 1) << 1);
    pp__futex_wake(&b->word, INT_MAX);
}

static void barrier_lock(pp_barrier *b)
{
    /* a death inside this short critical section may leave count wrong:
     * the generation cannot be trusted, so it is broken */
    if (pp__mutex_lock_until(&b->mu, PP_FOREVER) == EOWNERDEAD)
        barrier_break(b);
}

/* Whether a waiter of this generation, other than `me`, has died. mu held. */
static bool barrier_dead_party(pp_barrier *b, uint32_t me)
{
    uint32_t n = atomic_load(&b->count);
    for (uint32_t i = 0; i < n && i < b->parties; i++) {
        uint32_t s = b->slot_of[i];
        if (i == me || s == NO_SLOT)
            continue;
        int rc = pthread_mutex_trylock(&b->slot[s]);
        if (rc == EOWNERDEAD)
            pthread_mutex_consistent(&b->slot[s]);
        if (rc == 0 || rc == EOWNERDEAD)
            pthread_mutex_unlock(&b->slot[s]);
        if (rc == EOWNERDEAD)
            return true;
    }
    return false;
}

/* Takes a free slot for waiter `idx` to hold while it waits; *dead is set
 * when a waiter of this generation is found dead on the way. mu held. */
static uint32_t barrier_take_slot(pp_barrier *b, uint32_t idx, bool *dead)
{
    for (uint32_t s = 0; s < 2 * b->parties; s++) {
        int rc = pthread_mutex_trylock(&b->slot[s]);
        if (rc == 0)
            return s;
        if (rc != EOWNERDEAD)
            continue;
        pthread_mutex_consistent(&b->slot[s]);
        bool current = false;
        for (uint32_t i = 0; i < idx; i++)
            current = current || b->slot_of[i] == s;
        if (!current) /* left by a party that died after its wait: reuse it */
            return s;
        *dead = true;
        pthread_mutex_unlock(&b->slot[s]);
    }
    return NO_SLOT; /* more waiting threads than slots: no death watch for us */
}

/* Waits until `parties` parties have called it. Returns this caller's
 * arrival index 0..parties-1; PP_EBROKEN when the barrier is or becomes
 * broken (a waiter's timeout, a waiter's death, or pp_barrier_reset while
 * waiting) — the barrier stays broken until pp_barrier_reset; -EINVAL for
 * NULL. A party that dies before arriving is seen only through timeouts. */
int pp_barrier_wait(pp_barrier *b, double timeout)
{
    if (!valid(b, sizeof *b, BARRIER_MAGIC))
        return -EINVAL;
    int64_t deadline = pp__deadline(timeout);
    barrier_lock(b);
    uint32_t w = atomic_load(&b->word);
    if (w & 1) {
        pthread_mutex_unlock(&b->mu);
        return PP_EBROKEN;
    }
    uint32_t idx = atomic_fetch_add(&b->count, 1);
    if (idx + 1 >= b->parties) {
        /* A waiter that died would not be at the next round, which would
         * then wait for it for ever: this round breaks instead. */
        bool dead = barrier_dead_party(b, idx);
        if (dead)
            barrier_break(b);
        else
            barrier_next(b, true);
        pthread_mutex_unlock(&b->mu);
        return dead ? PP_EBROKEN : (int)idx;
    }
    bool dead = false;
    uint32_t slot = barrier_take_slot(b, idx, &dead);
    b->slot_of[idx] = slot;
    if (dead) {
        barrier_break(b);
        if (slot != NO_SLOT)
            pthread_mutex_unlock(&b->slot[slot]);
        pthread_mutex_unlock(&b->mu);
        return PP_EBROKEN;
    }
    uint32_t gen = w >> 1;
    pthread_mutex_unlock(&b->mu);

    int64_t slice = SLICE_MIN_NS;
    for (;;) {
        int64_t now = pp__now_ns();
        int64_t until = deadline - now > slice ? now + slice : deadline;
        slice = slice * 2 > SLICE_MAX_NS ? SLICE_MAX_NS : slice * 2;
        pp__futex_wait(&b->word, w, until);
        w = atomic_load(&b->word);
        if (w != gen << 1)
            break;
        barrier_lock(b);
        w = atomic_load(&b->word);
        if (w == gen << 1 && (pp__now_ns() >= deadline || barrier_dead_party(b, idx)))
            barrier_break(b);
        w = atomic_load(&b->word);
        pthread_mutex_unlock(&b->mu);
        if (w != gen << 1)
            break;
    }
    /* Read while the slot is still ours: nobody else's generation writes it. */
    uint32_t o = slot != NO_SLOT ? atomic_load(&b->slot_outcome[slot])
                                 : atomic_load(&b->outcome[gen % PP_BARRIER_HISTORY]);
    if (slot != NO_SLOT)
        pthread_mutex_unlock(&b->slot[slot]);
    if (w >> 1 == gen) /* still this generation: broken */
        return PP_EBROKEN;
    return o == (gen << 1 | 1) ? (int)idx : PP_EBROKEN;
}

/* Returns the barrier to its empty, unbroken state; parties waiting now get
 * PP_EBROKEN. 0, or -EINVAL for NULL. */
int pp_barrier_reset(pp_barrier *b)
{
    if (!valid(b, sizeof *b, BARRIER_MAGIC))
        return -EINVAL;
    barrier_lock(b);
    barrier_next(b, false);
    pthread_mutex_unlock(&b->mu);
    return 0;
}

/* Frees a barrier nobody waits on. Accepts NULL. */
void pp_barrier_free(pp_barrier *b)
{
    if (!valid(b, sizeof *b, BARRIER_MAGIC))
        return;
    b->magic = 0;
    pthread_mutex_destroy(&b->mu);
    for (size_t i = 0; i < 2 * (size_t)b->parties; i++)
        pthread_mutex_destroy(&b->slot[i]);
    pp_shm_free(b);
}
