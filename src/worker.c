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

/* The items of the running batch call that pp_fail_item failed, in the
 * order it was called; emptied before each call. `lost`: a failure that
 * could not be recorded (no memory), which then fails the whole call. */
struct item_fail {
    uint32_t k, order;
    int status;
    char text[PP_MSG_TEXT];
};
static struct {
    struct item_fail *v;
    uint32_t n, cap;
    size_t count; /* items of the batch call running now; 0 outside one */
    int lost;
} item_fails;

PP_API int pp_fail_item(size_t k, int status, const char *fmt, ...)
{
    if (worker_id < 0 || k >= item_fails.count || status == 0)
        return status;
    if (item_fails.n == item_fails.cap) {
        uint32_t cap = item_fails.cap ? item_fails.cap * 2 : 16;
        struct item_fail *v = /* a doubling that wraps is no room either */
            cap > item_fails.cap ? realloc(item_fails.v, cap * sizeof *v) : NULL;
        if (v == NULL) {
            item_fails.lost = status;
            return status;
        }
        item_fails.v = v;
        item_fails.cap = cap;
    }
    struct item_fail *f = &item_fails.v[item_fails.n];
    *f = (struct item_fail){.k = (uint32_t)k, .order = item_fails.n, .status = status};
    if (fmt != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(f->text, sizeof f->text, fmt, ap);
        va_end(ap);
    } else {
        snprintf(f->text, sizeof f->text, "item failed with status %d", status);
    }
    item_fails.n++;
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
    guard_len =
        (d->flags & PP_DESC_GUARDED) ? ((rbytes + 15) & ~(size_t)15) - rbytes + PP_GUARD : 0;
    result_mask = 0;
    memset(&result_mask, 0xff, d->result_size < 8 ? d->result_size : 8);
    memcpy(guard_copy, (const unsigned char *)(uintptr_t)d->results + rbytes, guard_len);
}

/* The first bytes (at most 8 of its r) of the result at p, which `left`
 * bytes of results follow: one load for most, as items of a few
 * nanoseconds feel a loop. */
static inline uint64_t peek_result(const unsigned char *p, size_t left, size_t r)
{
    uint64_t v = 0;
    if (left >= 8)
        memcpy(&v, p, 8);
    else
        for (size_t k = 0; k < r && k < 8; k++)
            v |= (uint64_t)p[k] << (8 * k);
    return v & result_mask;
}

/* memset(p, 0, n) without a call for the sizes of most results. */
static inline void zero_bytes(unsigned char *p, size_t n)
{
    static const unsigned char zeros[16];
    if (n >= 4 && n <= 16)
        pp__copy_small(p, zeros, n);
    else
        memset(p, 0, n);
}

/* Whether the guard after the chunk's results is as the chunk found it; if
 * not, it is put back, so that the parent finds it whole. */
static bool guard_broken(const struct pp_desc *d)
{
    unsigned char *end = (unsigned char *)(uintptr_t)d->results + (size_t)d->count * d->result_size;
    if (guard_len == 0 || memcmp(end, guard_copy, guard_len) == 0)
        return false;
    memcpy(end, guard_copy, guard_len);
    return true;
}

/* Says in the slot that item i starts now: a death from here on is
 * charged to it, and the items before it of the entry have finished. */
static inline void begin_item(const struct pp_worker_cfg *cfg, struct pp_slot *s, uint32_t i,
                              bool timing)
{
    /* The start time is written before the item number, so the parent
     * never pairs a new item with an older start and kills it early. */
    if (timing) {
        int64_t now = pp__now_ns();
        atomic_store_explicit(&s->item_start, now, memory_order_release);
        soft_deadline = cfg->soft_timeout_ns ? now + cfg->soft_timeout_ns : 0;
    }
    atomic_store_explicit(&s->cur_item, i, memory_order_release);
    fail_set = 0;
}

/* What a failed call says: its pp_fail message, or its return value. */
static void failure_text(char *text, int rc)
{
    if (fail_set)
        snprintf(text, PP_MSG_TEXT, "%s", fail_text);
    else
        snprintf(text, PP_MSG_TEXT, "task returned %d", rc);
}

/* Runs item i, whose argument and result are at `arg` and `res` (NULL for
 * a size of 0). Returns the task's return value. */
static inline int run_item(const struct pp_worker_cfg *cfg, struct pp_slot *s, pp_fn *fn,
                           const void *arg, void *res, uint32_t seq, uint32_t i, bool timing)
{
    begin_item(cfg, s, i, timing);
    int rc = fn(arg, res);
    if (rc != 0) {
        char text[PP_MSG_TEXT];
        failure_text(text, rc);
        post(cfg, s, PP_MSG_FAIL, seq, i, rc, text);
    }
    return rc;
}

/* Claims up to `step` items of the entry from item `from`. Returns the end
 * of the items claimed here so far: `from` if the parent took the rest back
 * (or a task scribbled the word: the parent runs the rest again). Results
 * start as zero bytes, zeroed here for the items just claimed and no others:
 * the rest may run elsewhere, and when results go straight to the caller's
 * arena array, another worker may have written them already. Zeroing just
 * before the items run also leaves their lines in this CPU's cache. */
static inline uint32_t claim_items(_Atomic uint32_t *claim, const struct pp_desc *d, uint32_t from,
                                   uint32_t step)
{
    if (atomic_fetch_add_explicit(claim, step, memory_order_acq_rel) != from)
        return from;
    uint32_t end = (uint64_t)from + step < d->count ? from + step : d->count;
    if (d->result_size != 0)
        zero_bytes((unsigned char *)(uintptr_t)(d->results + from * d->result_size),
                   (size_t)(end - from) * d->result_size);
    return end;
}

/* Runs the items of a claimed entry, claiming them a few at a time: a
 * sixteenth of the entry, so that the parent can take back most of a long
 * chunk's items for an idle worker at the cost of 16 atomic operations per
 * chunk. Returns how many items, from the first, ran here. In these long
 * chunks, whose items are usually a few nanoseconds each, only the parent's
 * guard catches a task that writes past its result_size.
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
    const bool timing = cfg->timing; /* once: the task could reach cfg, so it is read after each */
    const uint64_t as = d->arg_size, rs = d->result_size;
    uint64_t arg = as ? d->args : 0, res = rs ? d->results : 0;
    uint32_t i = 0, end = 0; /* items before `end` were claimed here */
    for (; i < count; i++, arg += as, res += rs) {
        if (i == end && (end = claim_items(&shared->claim, d, end, step)) == i)
            break;
        run_item(cfg, s, fn, (const void *)(uintptr_t)arg, (void *)(uintptr_t)res, head, i, timing);
    }
    return i;
}

/* As run_claimed, one item at a time, for entries of up to 16 items with
 * results (batches of chunks of one, small chunks), where an item that
 * writes past its result_size is told apart, so that only it fails. Past
 * an item's result lies the next item's, and past the last one the
 * parent's guard: if the first bytes of the next result changed while the
 * item ran, the item wrote there. That is known only once the next item is
 * claimed here (then no other worker can have written it); claiming it
 * zeroes it again. The guard is put back as the chunk found it, so that
 * the parent finds it whole. An overrun that skips those bytes still meets
 * the parent's own check of the guard. */
static uint32_t run_checked(const struct pp_worker_cfg *cfg, struct pp_slot *s,
                            struct pp_desc *shared, const struct pp_desc *d, pp_fn *fn,
                            uint32_t head)
{
    const uint32_t count = d->count;
    const size_t as = d->arg_size, rs = d->result_size;
    const unsigned char *args = as ? (const unsigned char *)(uintptr_t)d->args : NULL;
    unsigned char *res = (unsigned char *)(uintptr_t)d->results;
    keep_guard(d);
    if (claim_items(&shared->claim, d, 0, 1) == 0)
        return 0;
    for (uint32_t i = 0;; i++) {
        unsigned char *next = res + (size_t)(i + 1) * rs;
        size_t left = (size_t)(count - i - 1) * rs;
        bool last = i + 1 == count;
        uint64_t before = last ? 0 : peek_result(next, left, rs);
        int rc = run_item(cfg, s, fn, args ? args + (size_t)i * as : NULL, next - rs, head, i,
                          cfg->timing);
        uint64_t after = last ? 0 : peek_result(next, left, rs);
        bool more = !last && claim_items(&shared->claim, d, i + 1, 1) == i + 2;
        bool bad = last ? guard_broken(d) : more && after != before;
        if (bad && !last && left < PP_GUARD)
            guard_broken(d); /* it may have reached the guard */
        if (rc == 0 && bad)
            post(cfg, s, PP_MSG_OVERRUN, head, i, 0,
                 "a task of this chunk wrote past its result_size");
        if (!more)
            return i + 1;
    }
}

static int by_item(const void *a, const void *b)
{
    const struct item_fail *x = a, *y = b;
    if (x->k != y->k)
        return x->k < y->k ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Posts the failures of the batch call that ran items [from, end) of the
 * entry at `head` and returned rc, in item order: the items pp_fail_item
 * named (the first failure named for an item counts), and every other item
 * of the call if rc is not 0 (or a failure could not be recorded). */
static void post_call_failures(const struct pp_worker_cfg *cfg, struct pp_slot *s, uint32_t head,
                               uint32_t from, uint32_t end, int rc)
{
    char text[PP_MSG_TEXT];
    if (rc != 0)
        failure_text(text, rc);
    else if ((rc = item_fails.lost) != 0)
        snprintf(text, sizeof text,
                 "an item of this call failed with status %d; out of memory to say which", rc);
    if (item_fails.n > 1) /* v is NULL until the first */
        qsort(item_fails.v, item_fails.n, sizeof *item_fails.v, by_item);
    const struct item_fail *v = item_fails.v;
    uint32_t j = 0;
    for (uint32_t k = 0; k < end - from; k++) {
        while (j < item_fails.n && v[j].k < k)
            j++;
        if (j < item_fails.n && v[j].k == k)
            post(cfg, s, PP_MSG_FAIL, head, from + k, v[j].status, v[j].text);
        else if (rc != 0)
            post(cfg, s, PP_MSG_FAIL, head, from + k, rc, text);
    }
}

/* Runs a batch task's entry (pp_map_batch): one call for each run of items
 * claimed together, a sixteenth of the entry as in run_claimed, or one per
 * item when the parent dealt it so after a death inside a call. The slot
 * names the first item of the call: if the worker dies in it, the items
 * before it are known finished. Returns how many items ran here. */
static uint32_t run_batch(const struct pp_worker_cfg *cfg, struct pp_slot *s,
                          struct pp_desc *shared, const struct pp_desc *d, pp_batch_fn *fn,
                          uint32_t head)
{
    const uint32_t count = d->count;
    const uint32_t step = (d->flags & PP_DESC_ONE_BY_ONE) ? 1 : (count + 15) / 16;
    const size_t as = d->arg_size, rs = d->result_size;
    const unsigned char *args = as ? (const unsigned char *)(uintptr_t)d->args : NULL;
    unsigned char *res = rs ? (unsigned char *)(uintptr_t)d->results : NULL;
    uint32_t i = 0, end;
    for (; i < count && (end = claim_items(&shared->claim, d, i, step)) != i; i = end) {
        begin_item(cfg, s, i, cfg->timing);
        item_fails.n = 0;
        item_fails.lost = 0;
        item_fails.count = end - i;
        int rc =
            fn(args ? args + (size_t)i * as : NULL, res ? res + (size_t)i * rs : NULL, end - i);
        item_fails.count = 0;
        if (rc != 0 || item_fails.n != 0 || item_fails.lost != 0)
            post_call_failures(cfg, s, head, i, end, rc);
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
    pp_fn *fn = (pp_fn *)(uintptr_t)d->fn;
    uint32_t ran = d->count;
    if (cfg->objects != NULL && (fn = pp__spawn_resolve(cfg->objects, d->fn)) == NULL) {
        /* Nothing to run: one message fails every item of the chunk (the
         * parent knows how many; a scribbled count cannot make us loop),
         * and the worker goes on. */
        post(cfg, s, PP_MSG_NOTFOUND, head, 0, 0,
             "the task's function cannot be found in the spawned worker");
    } else if (d->flags & PP_DESC_BATCH) {
        ran = run_batch(cfg, s, shared, d, (pp_batch_fn *)(uintptr_t)fn, head);
    } else {
        bool check = d->result_size != 0 && d->count <= 16;
        ran = (check ? run_checked : run_claimed)(cfg, s, shared, d, fn, head);
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
