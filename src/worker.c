/*
 * worker: the loop a worker process runs.
 *
 * DESIGN: the worker takes the next inbox entry, claims it by CAS (the
 * parent may have withdrawn it to give to an idle worker), runs its items
 * one by one, and answers in its own outbox only. Before each item it
 * writes which item it is running into its slot, so that if it dies the
 * parent knows exactly which item to charge, which earlier items finished
 * and which later ones still have to run. It spins briefly when its inbox
 * is empty, then sleeps on a futex in its slot.
 */
#include "worker.h"

#include "spawn_method.h"

#include "procpool.h"

#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int worker_id = -1;
static struct pp_slot *current_slot;
static int64_t soft_deadline; /* 0: none */
static char fail_text[PP_MSG_TEXT];
static int fail_set;
/* The parent's outbox position as last read: the parent's line is read
 * again only when the outbox looks full by it. */
static uint32_t known_out_head;

PP_API int pp_worker_id(void)
{
    return worker_id;
}

PP_API int pp_fail(int status, const char *fmt, ...)
{
    if (worker_id < 0 || fmt == NULL)
        return status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fail_text, sizeof fail_text, fmt, ap);
    va_end(ap);
    fail_set = 1;
    return status;
}

PP_API bool pp_task_should_stop(void)
{
    if (current_slot == NULL)
        return false;
    if (atomic_load_explicit(&current_slot->stop, memory_order_relaxed))
        return true;
    return soft_deadline != 0 && pp__now_ns() >= soft_deadline;
}

/* Whether a parent thread waits for results on the CPU we run on. Says
 * where we are, for the parent's own choice. */
static bool beside_waiter(const struct pp_ctl *ctl, struct pp_slot *s)
{
    int cpu = sched_getcpu();
    atomic_store_explicit(&s->cpu, cpu, memory_order_relaxed);
    return cpu >= 0 && atomic_load_explicit(&ctl->waiter_cpu, memory_order_relaxed) == cpu;
}

/* Waits until the parent posts another entry or asks us to quit. */
static void wait_for_work(const struct pp_ctl *ctl, struct pp_slot *s, uint32_t head)
{
    /* Spin a little first: more work is usually microseconds away. Yield
     * now and then, so that on a machine with fewer cores than processes
     * the parent who deals that work gets the CPU; at every turn while a
     * parent thread waits on this very CPU (see pool.c spin_for_activity). */
    bool shared = false;
    for (int spin = 0; spin < 2048; spin++) {
        if (atomic_load_explicit(&s->in_tail, memory_order_acquire) != head ||
            atomic_load_explicit(&s->quit, memory_order_relaxed))
            return;
        if (spin % 16 == 0)
            shared = beside_waiter(ctl, s);
        if (shared || (spin & 255) == 255)
            sched_yield();
        else
            pp__cpu_relax();
    }
    for (;;) {
        uint32_t bell = atomic_load(&s->doorbell);
        atomic_store(&s->sleeping, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&s->in_tail) != head || atomic_load(&s->quit)) {
            atomic_store(&s->sleeping, 0);
            return;
        }
        pp__futex_wait(&s->doorbell, bell, PP_FOREVER);
        atomic_store(&s->sleeping, 0);
    }
}

static bool outbox_full(struct pp_slot *s, uint32_t tail)
{
    if (tail - known_out_head < PP_RING)
        return false;
    known_out_head = atomic_load_explicit(&s->out_head, memory_order_acquire);
    return tail - known_out_head >= PP_RING;
}

/* Appends one message to the outbox, waiting while it is full. */
static void post(const struct pp_worker_cfg *cfg, struct pp_slot *s, uint32_t kind, uint32_t seq,
                 uint32_t item, int status, const char *text)
{
    uint32_t tail = atomic_load_explicit(&s->out_tail, memory_order_relaxed);
    while (outbox_full(s, tail)) {
        uint32_t bell = atomic_load(&s->doorbell);
        atomic_store(&s->sleeping, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (!outbox_full(s, tail)) {
            atomic_store(&s->sleeping, 0);
            break;
        }
        pp__ring_notify_parent(cfg->ctl, cfg->wake_fd);
        pp__futex_wait(&s->doorbell, bell, pp__now_ns() + 100000000);
        atomic_store(&s->sleeping, 0);
    }
    struct pp_msg *m = &s->out[tail & PP_RING_MASK];
    m->kind = kind;
    m->seq = seq;
    m->item = item;
    m->status = status;
    if (kind != PP_MSG_DONE) {
        char *t = s->out_text[tail & PP_RING_MASK];
        snprintf(t, PP_MSG_TEXT, "%s", text != NULL ? text : "");
    }
    atomic_store_explicit(&s->out_tail, tail + 1, memory_order_release);
}

/* What lies past a chunk's results when the parent guards them: its guard
 * (and the padding before it), as the chunk found it. */
static unsigned char guard_copy[PP_GUARD + 16];
static size_t guard_len;
static uint64_t result_mask; /* over 8 bytes at a result: its first bytes (at most 8) */

static void keep_guard(const struct pp_desc *d)
{
    size_t rbytes = (size_t)d->count * d->result_size;
    guard_len = d->guarded ? ((rbytes + 15) & ~(size_t)15) - rbytes + PP_GUARD : 0;
    result_mask = 0;
    memset(&result_mask, 0xff, d->result_size < 8 ? d->result_size : 8);
    memcpy(guard_copy, (const unsigned char *)(uintptr_t)d->results + rbytes, guard_len);
}

/* Whether the first bytes of a result that has not run yet (at most 8 of
 * its r; `left` bytes of results follow p) are not zero any more. One load
 * for most: items of a few nanoseconds feel a loop. */
static bool next_result_written(const unsigned char *p, size_t left, size_t r)
{
    size_t look = r < 8 ? r : 8;
    if (left >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        return (v & result_mask) != 0;
    }
    for (size_t k = 0; k < look; k++)
        if (p[k] != 0)
            return true;
    return false;
}

/* Past an item's result lies the next item's result, zero until it runs,
 * and past the chunk's last result the guard: anything else there means
 * item i wrote past its result_size. Only the next result's first 8 bytes
 * are looked at, where an overrun starts, so the check costs one load per
 * item. When one is found, up to
 * PP_GUARD bytes after the item are put back (zeroes, then the guard as the
 * chunk found it), so that the next items start as they should and the
 * parent finds its guard whole: only item i fails. An overrun that skips
 * those bytes still meets the parent's own check of the guard. */
static bool overran(const struct pp_desc *d, uint32_t i)
{
    unsigned char *res = (unsigned char *)(uintptr_t)d->results;
    size_t from = (size_t)(i + 1) * d->result_size, end = (size_t)d->count * d->result_size;
    bool bad;
    if (from < end) {
        bad = next_result_written(res + from, end - from, d->result_size);
    } else {
        bad = guard_len != 0 && memcmp(res + end, guard_copy, guard_len) != 0;
    }
    if (!bad)
        return false;
    size_t zeros = end - from < PP_GUARD ? end - from : PP_GUARD;
    memset(res + from, 0, zeros);
    if (zeros < PP_GUARD && guard_len != 0)
        memcpy(res + end, guard_copy, guard_len);
    return true;
}

/* Runs item i, whose argument and result are at `arg` and `res` (NULL for
 * a size of 0). Returns the task's return value. */
static inline int run_item(const struct pp_worker_cfg *cfg, struct pp_slot *s, pp_fn *fn,
                           const void *arg, void *res, uint32_t seq, uint32_t i)
{
    /* The start time is written before the item number, so the parent
     * never pairs a new item with an older start and kills it early. */
    if (cfg->timing) {
        int64_t now = pp__now_ns();
        atomic_store_explicit(&s->item_start, now, memory_order_release);
        soft_deadline = cfg->soft_timeout_ns ? now + cfg->soft_timeout_ns : 0;
    }
    atomic_store_explicit(&s->cur_item, i, memory_order_release);
    fail_set = 0;
    int rc = fn(arg, res);
    if (rc != 0) {
        char text[PP_MSG_TEXT];
        if (fail_set)
            snprintf(text, sizeof text, "%s", fail_text);
        else
            snprintf(text, sizeof text, "task returned %d", rc);
        post(cfg, s, PP_MSG_FAIL, seq, i, rc, text);
    }
    return rc;
}

/* Runs the items of a claimed entry, claiming them a few at a time: a
 * sixteenth of the entry (one by one in entries of up to 16 items), so
 * that the parent can take back most of a long chunk's items for an idle
 * worker at the cost of 16 atomic operations per chunk. A claim that does
 * not return the next item's index means the parent took the rest back (or
 * a task scribbled the word: the parent runs the rest again). Returns how
 * many items, from the first, ran here.
 *
 * The loop keeps its state in locals whose address never escapes: the task
 * is called through a pointer, so anything it could reach (the entry, an
 * out-parameter) would be read again from memory after every item, and
 * items of a few nanoseconds feel that (bench W1). Addresses are integers:
 * with no arguments or results they stay 0 (and are passed as NULL). */
static uint32_t run_claimed(const struct pp_worker_cfg *cfg, struct pp_slot *s,
                            struct pp_desc *shared, const struct pp_desc *d, pp_fn *fn,
                            uint32_t head)
{
    const uint32_t count = d->count, step = (count + 15) / 16;
    const uint64_t as = d->arg_size, rs = d->result_size;
    uint64_t arg = as ? d->args : 0, res = rs ? d->results : 0;
    /* Overruns are told apart per item in entries of up to 16 items (batches
     * of chunks of one, small chunks); in longer chunks, whose items are
     * usually a few nanoseconds each, the parent's guard alone catches them. */
    const bool check = rs != 0 && count <= 16;
    if (check)
        keep_guard(d);
    uint32_t i = 0, end = 0;
    for (; i < count; i++, arg += as, res += rs) {
        if (i == end) {
            if (atomic_fetch_add_explicit(&shared->claim, step, memory_order_acq_rel) != end)
                break;
            end = (uint64_t)end + step < count ? end + step : count;
        }
        if (run_item(cfg, s, fn, (const void *)(uintptr_t)arg, (void *)(uintptr_t)res, head, i) ==
                0 &&
            check && overran(d, i))
            post(cfg, s, PP_MSG_OVERRUN, head, i, 0,
                 "a task of this chunk wrote past its result_size");
    }
    return i;
}

/* Runs the entry at `head` if we win it; false if the parent withdrew it. */
static bool run_entry(const struct pp_worker_cfg *cfg, struct pp_slot *s, uint32_t head)
{
    struct pp_desc *shared = &s->in[head & PP_RING_MASK];
    if (cfg->timing)
        atomic_store_explicit(&s->item_start, pp__now_ns(), memory_order_release);
    atomic_store_explicit(&s->cur_seq, head, memory_order_relaxed);
    atomic_store_explicit(&s->cur_item, 0, memory_order_release); /* after cur_seq */
    /* Busy before the claim: a worker stopped or preempted between the two
     * must still be seen as running, or its task_timeout would never fire.
     * The parent charges nothing for an entry still POSTED. */
    atomic_store_explicit(&s->busy, 1, memory_order_seq_cst);
    uint32_t expect = PP_DESC_POSTED;
    if (!atomic_compare_exchange_strong(&shared->state, &expect, PP_DESC_CLAIMED)) {
        atomic_store_explicit(&s->busy, 0, memory_order_release);
        return false;
    }
    /* Ours now: read it once. A task that scribbles the entry while its
     * chunk runs changes nothing, and the item loop reads no shared line. */
    struct pp_desc copy;
    memcpy(&copy, shared, sizeof copy);
    const struct pp_desc *d = &copy;
    if (d->result_size) /* every result starts as zero bytes; one memset per chunk */
        memset((void *)(uintptr_t)d->results, 0, d->count * d->result_size);
    pp_fn *fn = (pp_fn *)(uintptr_t)d->fn;
    uint32_t ran = d->count;
    if (cfg->objects != NULL && (fn = pp__spawn_resolve(cfg->objects, d->fn)) == NULL) {
        /* Nothing to run: one message fails every item of the chunk (the
         * parent knows how many; a scribbled count cannot make us loop),
         * and the worker goes on. */
        post(cfg, s, PP_MSG_NOTFOUND, head, 0, 0,
             "the task's function cannot be found in the spawned worker");
    } else {
        ran = run_claimed(cfg, s, shared, d, fn, head);
    }
    post(cfg, s, PP_MSG_DONE, head, ran, 0, NULL);
    atomic_store_explicit(&s->busy, 0, memory_order_release);
    atomic_store_explicit(&s->stop, 0, memory_order_relaxed);
    return true;
}

static size_t resident_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long size = 0, rss = 0;
    if (f == NULL)
        return 0;
    if (fscanf(f, "%lu %lu", &size, &rss) != 2)
        rss = 0;
    fclose(f);
    return rss * (size_t)sysconf(_SC_PAGESIZE);
}

static _Noreturn void leave(int status)
{
    /* What tasks printed is not lost. Only the standard streams: a FILE the
     * parent had open may still hold the parent's bytes, never ours to write. */
    fflush(stdout);
    fflush(stderr);
    _exit(status);
}

_Noreturn void pp__worker_main(const struct pp_worker_cfg *cfg, int id)
{
    struct pp_ctl *ctl = cfg->ctl;
    struct pp_slot *s = &ctl->slot[id];
    worker_id = id;

    if (cfg->initializer != NULL && cfg->initializer(cfg->initarg) != 0) {
        atomic_store(&s->state, PP_W_INITFAIL);
        pp__ring_notify_parent(cfg->ctl, cfg->wake_fd);
        leave(PP_EXIT_INITFAIL);
    }
    atomic_store(&s->state, PP_W_READY);
    pp__ring_notify_parent(cfg->ctl, cfg->wake_fd);
    current_slot = s;
    known_out_head = atomic_load(&s->out_head);

    unsigned long chunks = 0;
    uint32_t head = atomic_load(&s->in_head);
    for (;;) {
        if (atomic_load_explicit(&s->in_tail, memory_order_acquire) == head) {
            if (atomic_load(&s->quit))
                leave(0);
            wait_for_work(ctl, s, head);
            continue;
        }
        bool ran = run_entry(cfg, s, head);
        head++;
        atomic_store_explicit(&s->in_head, head, memory_order_release);
        if (!ran)
            continue;
        /* Wake a sleeping parent only when the inbox runs low: it refills
         * a batch per wake-up instead of one entry per system call. */
        uint32_t left = atomic_load_explicit(&s->in_tail, memory_order_acquire) - head;
        if (left <= PP_LOW_WATER)
            pp__ring_notify_parent(cfg->ctl, cfg->wake_fd);
        chunks++;
        if (cfg->max_tasks != 0 && chunks >= cfg->max_tasks)
            leave(0);
        if (cfg->max_memory != 0 && resident_bytes() > cfg->max_memory)
            leave(0);
    }
}
