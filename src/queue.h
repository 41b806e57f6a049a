/*
 * queue: the layout of pp_queue. Internal: it is here so that tests can
 * stop a process in the middle of a put or a get (test_hook) and kill it.
 */
#ifndef PP_QUEUE_H
#define PP_QUEUE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "procpool.h"

/* test_hook values. A test sets PP_QUEUE_STALL_PUT (or _GET); the next put
 * (get) that has copied its message but not yet committed it sets the hook
 * to PP_QUEUE_STALLED, wakes futex waiters on it, and sleeps forever, holding
 * the queue's lock, until the test kills it. Never set outside tests. */
enum { PP_QUEUE_HOOK_NONE, PP_QUEUE_STALL_PUT, PP_QUEUE_STALL_GET, PP_QUEUE_STALLED };

struct pp_queue_rec {
    uint64_t off; /* position of the first byte in the data stream */
    uint64_t len;
};

struct pp_queue {
    uint32_t magic;
    _Atomic uint32_t test_hook;
    uint64_t capacity;  /* bytes of the data ring */
    uint64_t nrec;      /* slots of the record ring */
    pthread_mutex_t mu; /* robust; guards what follows */
    uint64_t head;      /* records [head, tail) are queued; both only grow */
    uint64_t tail;
    _Atomic uint32_t put_seq; /* futex words: bumped when space frees up ... */
    _Atomic uint32_t get_seq; /* ... and when a message arrives */
    _Atomic uint32_t put_waiters, get_waiters;
    /* then: struct pp_queue_rec rec[nrec]; unsigned char data[capacity] */
};

#endif
