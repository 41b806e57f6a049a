/*
 * sync: the layouts of the synchronisation objects, and the robust-mutex
 * helpers that queue.c shares. Internal: the layouts are here so that tests
 * can watch an object's state; nothing outside src/ and tests/ includes this.
 */
#ifndef PP_SYNC_H
#define PP_SYNC_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "procpool.h"

struct pp_lock {
    uint32_t magic;
    uint32_t recursive; /* 1 for pp_rlock_new */
    uint32_t depth;     /* rlock: levels its holder holds; guarded by mu */
    uint32_t died;      /* a holder died and nobody was told yet; guarded by mu */
    pthread_mutex_t mu; /* process-shared, robust; ERRORCHECK or RECURSIVE */
};

struct pp_sem {
    uint32_t magic;
    _Atomic uint32_t value;   /* the futex word */
    _Atomic uint32_t waiters; /* may overcount after a death: costs a wake-up */
};

struct pp_cond {
    uint32_t magic;
    _Atomic uint32_t seq; /* the futex word: bumped by every notify */
    _Atomic uint32_t waiters;
    pp_lock *lock;
};

struct pp_event {
    uint32_t magic;
    _Atomic uint32_t word; /* futex word: bit 0 = set, bits 1.. count the sets */
};

#define PP_BARRIER_HISTORY 64

struct pp_barrier {
    uint32_t magic;
    uint32_t parties;
    pthread_mutex_t mu;     /* robust; guards count, and every change of word */
    _Atomic uint32_t count; /* parties arrived in this generation */
    _Atomic uint32_t word;  /* futex word: generation << 1 | broken */
    /* outcome[g % HISTORY], written when generation g ends:
     * g << 1 | 1 when it tripped, g << 1 when it was reset */
    _Atomic uint32_t outcome[PP_BARRIER_HISTORY];
    uint32_t *slot_of; /* [parties]: the slot each waiter of this generation holds */
    /* [2 * parties]: how the generation of the waiter holding each slot
     * ended (as outcome[]), written before its waiters wake: a waiter that
     * runs again only after PP_BARRIER_HISTORY more generations finds its
     * own there. outcome[] serves a waiter that found no free slot. */
    _Atomic uint32_t *slot_outcome;
    pthread_mutex_t slot[]; /* [2 * parties]: a waiter holds one while it waits, so
                               that its death shows as EOWNERDEAD to the others */
};

/* Initialises a process-shared robust mutex of the given type
 * (PTHREAD_MUTEX_ERRORCHECK, _RECURSIVE or _NORMAL). Returns 0 or an errno. */
int pp__mutex_init(pthread_mutex_t *m, int type);
/* Locks m by the absolute CLOCK_MONOTONIC deadline (PP_FOREVER: no limit; a
 * free mutex is taken even past the deadline). Returns 0, EOWNERDEAD (the
 * caller holds it, already made consistent), ETIMEDOUT, or another errno
 * (EDEADLK, EAGAIN). */
int pp__mutex_lock_until(pthread_mutex_t *m, int64_t deadline);

#endif
