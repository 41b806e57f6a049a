/*
 * ring: the pool's control block, a MAP_SHARED memfd region that the parent
 * and every worker map at the same address.
 *
 * DESIGN: every worker owns one slot: an inbox (descriptors the parent
 * writes, the worker reads) and an outbox (messages the worker writes, the
 * parent reads). Each ring has exactly one producer and one consumer, so a
 * process that dies at any instruction cannot wedge another one; the parent
 * reads what a dead worker left behind and charges its death to the one item
 * the slot says it was running. An inbox entry is claimed by compare-and-swap,
 * either by the worker (to run it) or by the parent (to withdraw it and give
 * it to an idle worker). Payload bytes (arguments and results) live in the
 * region too: small chunks inline in their inbox entry, larger ones in a
 * payload area that only the parent allocates from.
 *
 * Workers run user code, so nothing the parent reads from here is trusted:
 * every position, index and length is checked against the parent's own
 * books before use (see dispatch.c).
 */
#ifndef PP_RING_H
#define PP_RING_H

#include "util.h"

#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>

#define PP_RING      64 /* entries per inbox and per outbox; a power of two */
#define PP_RING_MASK (PP_RING - 1)
#define PP_INLINE    256 /* payload bytes carried inside an inbox entry */
#define PP_GUARD     256 /* guard bytes after a chunk's results (see dispatch.c) */
#define PP_LOW_WATER 16  /* a worker wakes the parent when this few entries are left */
#define PP_MSG_TEXT  256
#define PP_CTL_MAGIC 0x70706f6fu

enum pp_desc_state {
    PP_DESC_FREE = 0,
    PP_DESC_POSTED = 1,    /* waiting for the worker */
    PP_DESC_CLAIMED = 2,   /* the worker took it */
    PP_DESC_WITHDRAWN = 3, /* the parent took it back; the worker skips it */
};

enum pp_desc_flags {
    PP_DESC_GUARDED = 1,    /* the parent's guard follows the results (see worker.c) */
    PP_DESC_BATCH = 2,      /* fn is a pp_batch_fn: one call per run of items claimed */
    PP_DESC_ONE_BY_ONE = 4, /* ... one call per item (see supervise.c rerun_one_by_one) */
};

/* One chunk of consecutive items, as the worker sees it. The worker claims
 * its items a few at a time from `claim` (items from i on are its to run
 * only if the fetch-and-add returns i; see worker.c run_claimed), so that
 * the parent can take back the items not yet claimed (an exchange) and give
 * them to an idle worker. A cache line each: the parent fetches the next
 * entry's line for writing ahead of its post (dispatch.c
 * prefetch_next_entry), and a line shared with the entry before would go
 * back to the worker when it claims that one (W4 on the 2-CPU Xeon VM,
 * 3 x 5 alternating runs: 3.5-3.7 -> 4.0-4.2 M tasks/s). */
struct pp_desc {
    alignas(PP_CACHELINE) _Atomic uint32_t state;
    uint32_t count;         /* items in the chunk */
    _Atomic uint32_t claim; /* the next item to claim */
    uint32_t flags;         /* PP_DESC_GUARDED | PP_DESC_BATCH | PP_DESC_ONE_BY_ONE */
    uint64_t fn;            /* fork: the pp_fn address (same in every forked process);
                               spawn: PP_FN_CODE(object index, offset), see spawn_method.h */
    uint64_t args;          /* address of the first argument */
    uint64_t results;       /* address of the first result */
    uint64_t arg_size;
    uint64_t result_size;
};
_Static_assert(sizeof(struct pp_desc) == PP_CACHELINE, "an inbox entry's descriptor is one line");

enum pp_msg_kind {
    PP_MSG_DONE = 1,     /* the chunk at inbox position `seq` has run: its first
                            `item` items (the rest was taken back) */
    PP_MSG_FAIL = 2,     /* item `item` of that chunk returned non-zero `status` */
    PP_MSG_NOTFOUND = 3, /* items `item` to the chunk's end: its function names nothing
                            here (spawn) */
    PP_MSG_OVERRUN = 4,  /* item `item` wrote past its result_size, into the results of
                            the chunk's next items (which then ran on clean bytes) */
};

/* 16 bytes, four to a cache line: the parent reads a DONE without touching
 * the text, which only FAIL and NOTFOUND carry (in out_text, same index). */
struct pp_msg {
    uint32_t kind;
    uint32_t seq;  /* inbox position of the chunk */
    uint32_t item; /* index inside the chunk (FAIL) */
    int32_t status;
};

enum pp_worker_state {
    PP_W_STARTING = 0,
    PP_W_READY = 1,    /* initializer done, taking work */
    PP_W_INITFAIL = 2, /* initializer returned non-zero; the worker exits */
};

struct pp_slot {
    /* Written by the parent; the worker spins on in_tail. */
    alignas(PP_CACHELINE) _Atomic uint32_t in_tail; /* inbox producer position */
    _Atomic uint32_t doorbell;                      /* futex: bumped to wake the worker */
    _Atomic uint32_t quit;                          /* leave once the inbox is empty */
    _Atomic uint32_t stop;                          /* pp_task_should_stop() for the item */

    /* Written by the parent at every collect, read by the worker only when
     * its outbox looks full: a line of its own, so that the store stays in
     * the parent's cache. */
    alignas(PP_CACHELINE) _Atomic uint32_t out_head; /* outbox consumer position */

    /* Written by the worker only when it goes to sleep or wakes, read by
     * the parent at every wake-up check: a line of its own, so that the
     * parent reads it from its own cache while the worker is busy. */
    alignas(PP_CACHELINE) _Atomic uint32_t sleeping; /* waiting on doorbell */

    /* Written by the worker. */
    alignas(PP_CACHELINE) _Atomic uint32_t in_head; /* inbox consumer position */
    _Atomic uint32_t out_tail;                      /* outbox producer position */
    _Atomic uint32_t state;                         /* enum pp_worker_state */
    _Atomic uint32_t busy;                          /* running the chunk at cur_seq */
    _Atomic uint32_t cur_seq;                       /* inbox position being run */
    _Atomic uint32_t cur_item;                      /* item index inside it */
    _Atomic int64_t item_start;                     /* pp__now_ns() when it began */
    _Atomic int32_t cpu; /* where it last looked for work (see worker.c wait_for_work) */

    alignas(PP_CACHELINE) struct pp_desc in[PP_RING];
    alignas(PP_CACHELINE) struct pp_msg out[PP_RING];
    alignas(PP_CACHELINE) char out_text[PP_RING][PP_MSG_TEXT];
    alignas(PP_CACHELINE) unsigned char inl[PP_RING][PP_INLINE + PP_GUARD];
};

struct pp_ctl {
    uint32_t magic;
    uint32_t nworkers;
    alignas(PP_CACHELINE) _Atomic uint32_t parent_sleeping;
    /* The CPU of a parent thread that waits for results (spinning, or
     * asleep until a worker wakes it), or -1. Read by idle workers: one
     * that spins on the same CPU only delays it. */
    alignas(PP_CACHELINE) _Atomic int32_t waiter_cpu;
    alignas(PP_CACHELINE) struct pp_slot slot[];
};

/* Bytes of the control block for n workers, rounded to whole pages. */
size_t pp__ctl_size(uint32_t nworkers);

/* Worker side: tell the parent something changed (a message, a state), by
 * the eventfd `wake_fd` if it sleeps. The fd comes from the worker's own
 * memory, never from the region, which tasks can overwrite. */
void pp__ring_notify_parent(struct pp_ctl *ctl, int wake_fd);
/* Parent side: make sure the worker of `slot` sees new inbox entries. */
void pp__ring_wake_worker(struct pp_slot *slot);
/* Parent side: wakes the worker whether or not its slot says it sleeps (a
 * task of another worker may have cleared the word). A system call: only
 * for a worker that left its entries unclaimed for long. */
void pp__ring_rouse_worker(struct pp_slot *slot);

#endif
