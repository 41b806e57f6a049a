/*
 * Beyond Python: pp_imap_source, lazy input with backpressure. At most
 * `window` items are taken from the source and not yet handed back, in
 * order and unordered, so a long generated input maps in constant memory.
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <procpool.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifdef UNDER_ASAN /* from ASan's runtime (sanitizer/allocator_interface.h, not always installed)   \
                   */
void __sanitizer_purge_allocator(void);
size_t __sanitizer_get_current_allocated_bytes(void);
#endif

#define flags (*shared_flags_slot()) /* seen by spawned workers too */

static void setup(void)
{
    flags = shared_flags_new();
}

static void teardown(void)
{
    shared_flags_free(flags);
}

/* A generated input: item k is k. It checks the window on every pull. */
struct counter {
    long next, end;
    long handed_back; /* updated by the consumer */
    long max_outstanding;
    long window;
    bool hold;            /* items ask the worker to wait for flags->release */
    pthread_t caller;     /* the thread that must call the source */
    bool foreign_thread;  /* the source ran in another thread */
    pp_pool *pool;        /* the source calls the pool (it is never under its lock) */
    bool stats_in_source; /* call pp_pool_stats from the source */
};

struct item {
    long k;
    int hold;
};

static int counter_source(void *state, void *arg)
{
    struct counter *c = state;
    if (!pthread_equal(pthread_self(), c->caller))
        c->foreign_thread = true;
    if (c->stats_in_source) {
        pp_stats st;
        pp_pool_stats(c->pool, &st); /* would deadlock if called under the pool's lock */
    }
    if (c->next >= c->end)
        return 0;
    long outstanding = c->next + 1 - c->handed_back; /* this one included */
    if (outstanding > c->max_outstanding)
        c->max_outstanding = outstanding;
    *(struct item *)arg = (struct item){.k = c->next, .hold = c->hold};
    c->next++;
    return 1;
}

static int triple(const void *arg, void *result)
{
    const struct item *it = arg;
    if (it->hold) {
        atomic_fetch_add(&flags->started, 1);
        wait_flag(&flags->release, 1);
    }
    if (it->k % 1000 == 999)
        return pp_fail(7, "item %ld refuses", it->k);
    *(long *)result = it->k * 3;
    return 0;
}

/* Maps n generated items through a window; checks every item comes back
 * once, right, in order if asked, and the window was never exceeded. */
static void run_window(long n, size_t window, size_t chunksize, bool ordered)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    struct counter c = {.end = n, .window = (long)window, .caller = pthread_self()};
    pp_iter *it = pp_imap_source(pool, triple, counter_source, &c, sizeof(struct item),
                                 sizeof(long), chunksize, window, ordered);
    cr_assert_not_null(it);
    unsigned char *seen = calloc((size_t)n, 1);
    long r;
    size_t index;
    pp_error err;
    int rc;
    while ((rc = pp_iter_next(it, &r, &index, -1, &err)) != 0) {
        cr_assert_lt(index, (size_t)n);
        cr_assert(!seen[index], "item %zu handed back twice", index);
        seen[index] = 1;
        if (ordered)
            cr_assert_eq((long)index, c.handed_back, "in input order");
        if (index % 1000 == 999) {
            cr_assert_eq(rc, PP_ETASK);
            cr_assert_eq(err.index, index);
            cr_assert_eq(err.status, 7);
        } else {
            cr_assert_eq(rc, 1, "item %zu: %s", index, pp_strerror(rc));
            cr_assert_eq(r, (long)index * 3);
        }
        c.handed_back++;
    }
    cr_assert_eq(c.handed_back, n, "every item came back");
    /* window 0 picks a default: bounded, so not the whole input either */
    long bound = window ? (long)window : n - 1;
    cr_assert_leq(c.max_outstanding, bound,
                  "window %zu (chunksize %zu, %s): %ld taken and not handed back", window,
                  chunksize, ordered ? "ordered" : "unordered", c.max_outstanding);
    cr_assert(!c.foreign_thread, "the source runs in the caller's thread only");
    cr_assert_eq(pp_iter_next(it, &r, NULL, 0, NULL), 0, "stays at the end");
    free(seen);
    pp_iter_free(it);
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.submitted, (uint64_t)n, "only what was pulled is submitted");
    pp_pool_free(pool);
}

Test(source, window_holds_in_order, .timeout = PP_TEST_TIMEOUT(60))
{
    static const size_t shapes[][2] = {{1, 1}, {3, 8}, {10, 4}, {64, 64}, {100, 7}, {0, 16}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        run_window(3000, shapes[i][0], shapes[i][1], true);
}

Test(source, window_holds_unordered, .timeout = PP_TEST_TIMEOUT(60))
{
    static const size_t shapes[][2] = {{1, 1}, {3, 8}, {10, 4}, {64, 64}, {100, 7}, {0, 16}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        run_window(3000, shapes[i][0], shapes[i][1], false);
}

/* With every task held, the source is pulled exactly up to the window and
 * then not at all, however often the caller asks. */
static void full_window_stops_pulling(bool ordered)
{
    enum { WINDOW = 8 };
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct counter c = {.end = 1000, .hold = true, .caller = pthread_self()};
    pp_iter *it = pp_imap_source(pool, triple, counter_source, &c, sizeof(struct item),
                                 sizeof(long), 1, WINDOW, ordered);
    cr_assert_not_null(it);
    cr_assert_eq(c.next, WINDOW, "filled at once");
    wait_flag(&flags->started, 2); /* both workers hold one */
    long r;
    for (int i = 0; i < 100; i++)
        cr_assert_eq(pp_iter_next(it, &r, NULL, 0, NULL), -ETIMEDOUT);
    cr_assert_eq(pp_iter_next(it, &r, NULL, 0.05, NULL), -ETIMEDOUT);
    cr_assert_eq(c.next, WINDOW, "nothing more is taken while nothing is handed back");
    pp_stats st;
    pp_pool_stats(pool, &st);
    cr_assert_eq(st.submitted, WINDOW);
    cr_assert_eq(st.running, 2);

    atomic_store(&flags->release, 1);
    size_t index;
    cr_assert_eq(pp_iter_next(it, &r, &index, -1, NULL), 1);
    c.handed_back = 1;
    if (ordered)
        cr_assert_eq(index, 0);
    cr_assert_leq(c.next, WINDOW + 1, "one handed back: one more may be taken");
    while (pp_iter_next(it, &r, &index, -1, NULL) != 0)
        c.handed_back++;
    cr_assert_eq(c.handed_back, 1000);
    cr_assert_leq(c.max_outstanding, WINDOW);
    pp_iter_free(it);
    pp_pool_free(pool);
}

Test(source, full_window_stops_pulling_in_order, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    full_window_stops_pulling(true);
}

Test(source, full_window_stops_pulling_unordered, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    full_window_stops_pulling(false);
}

Test(source, source_may_call_the_pool, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct counter c = {
        .end = 500, .caller = pthread_self(), .pool = pool, .stats_in_source = true};
    pp_iter *it = pp_imap_source(pool, triple, counter_source, &c, sizeof(struct item),
                                 sizeof(long), 4, 32, true);
    long r;
    while (pp_iter_next(it, &r, NULL, -1, NULL) == 1)
        c.handed_back++;
    cr_assert_eq(c.handed_back, 500);
    cr_assert(!c.foreign_thread);
    pp_iter_free(it);
    pp_pool_free(pool);
}

/* Item 5 of the input terminates the pool as it is taken: every item, those
 * taken after it included, fails PP_ECLOSED, and the iteration ends rather
 * than waiting forever for items nothing will run. */
static int terminating_source(void *state, void *arg)
{
    struct counter *c = state;
    if (c->next == 5)
        pp_terminate(c->pool);
    return counter_source(state, arg);
}

Test(source, terminate_while_the_source_runs_fails_what_it_gives, .timeout = PP_TEST_TIMEOUT(30))
{
    for (int ordered = 0; ordered < 2; ordered++) {
        pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
        struct counter c = {.end = 12, .caller = pthread_self(), .pool = pool};
        pp_iter *it = pp_imap_source(pool, triple, terminating_source, &c, sizeof(struct item),
                                     sizeof(long), 1, 64, ordered);
        cr_assert_not_null(it);
        long r;
        pp_error err;
        int rc, failed = 0;
        while ((rc = pp_iter_next(it, &r, NULL, 10, &err)) != 0) {
            cr_assert_eq(rc, PP_ECLOSED, "%s", pp_strerror(rc));
            cr_assert_eq(err.code, PP_ECLOSED);
            failed++;
        }
        cr_assert_eq(failed, 12, "every item taken fails, once");
        pp_iter_free(it);
        pp_pool_free(pool);
    }
}

static int empty_source(void *state, void *arg)
{
    (void)state;
    (void)arg;
    return 0;
}

Test(source, empty_source_ends_at_once, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    for (int ordered = 0; ordered < 2; ordered++) {
        pp_iter *it = pp_imap_source(pool, triple, empty_source, NULL, sizeof(struct item),
                                     sizeof(long), 1, 0, ordered);
        cr_assert_not_null(it);
        long r;
        cr_assert_eq(pp_iter_next(it, &r, NULL, -1, NULL), 0);
        pp_iter_free(it);
    }
    pp_pool_free(pool);
}

/* ---- constant memory ---------------------------------------------------------- */

static long resident_bytes(void)
{
#ifdef UNDER_ASAN
    __sanitizer_purge_allocator(); /* the quarantine would look like growth */
#endif
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, rss = 0;
    if (f == NULL || fscanf(f, "%ld %ld", &size, &rss) != 2)
        rss = 0;
    if (f)
        fclose(f);
    return rss * sysconf(_SC_PAGESIZE);
}

static int cheap(const void *arg, void *result)
{
    *(long *)result = ((const struct item *)arg)->k ^ 0x5a5a;
    return 0;
}

#ifdef UNDER_ASAN
/* ASan makes each item several times dearer, and its allocator cycles
 * freed blocks through a quarantine, touching fresh pages as it goes: its
 * RSS creeps up with the number of allocations, whatever the program
 * holds. So under ASan the exact check is on live heap bytes (which would
 * grow by ~30 bytes an item if the input were read ahead), and RSS only
 * gets a coarse one. */
enum { FLAT_ITEMS = 200000 };
static const long RSS_SLACK = 16L << 20;
static const long HEAP_SLACK = 512L << 10;
#else
enum { FLAT_ITEMS = 1500000 };
static const long RSS_SLACK = 4L << 20;
#endif

/* Generates FLAT_ITEMS items lazily; RSS is sampled twenty times after a
 * warm-up and may not grow by more than a few MiB (reading the input ahead,
 * as Python's imap does, would hold FLAT_ITEMS * 24 bytes: tens of MiB). */
static void rss_stays_flat(bool ordered)
{
    enum { WINDOW = 4096, CHUNK = 64 };
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct counter c = {.end = FLAT_ITEMS, .caller = pthread_self()};
    pp_iter *it = pp_imap_source(pool, cheap, counter_source, &c, sizeof(struct item), sizeof(long),
                                 CHUNK, WINDOW, ordered);
    cr_assert_not_null(it);
    long base = 0, peak = 0;
#ifdef UNDER_ASAN
    long heap_base = 0, heap_peak = 0;
#endif
    long r, step = FLAT_ITEMS / 20;
    size_t index;
    int rc;
    while ((rc = pp_iter_next(it, &r, &index, -1, NULL)) == 1) {
        cr_assert_eq(r, (long)index ^ 0x5a5a);
        c.handed_back++;
        if (c.handed_back % step != 0)
            continue;
        long rss = resident_bytes();
        if (c.handed_back == step) { /* warm: the window's records exist */
            base = peak = rss;
#ifdef UNDER_ASAN
            heap_base = heap_peak = (long)__sanitizer_get_current_allocated_bytes();
#endif
        }
        if (rss > peak)
            peak = rss;
#ifdef UNDER_ASAN
        long heap = (long)__sanitizer_get_current_allocated_bytes();
        if (heap > heap_peak)
            heap_peak = heap;
#endif
    }
    cr_assert_eq(rc, 0);
    cr_assert_eq(c.handed_back, FLAT_ITEMS);
    cr_assert_leq(c.max_outstanding, WINDOW);
    cr_assert_lt(peak - base, RSS_SLACK, "%s: RSS grew %ld KiB over %d items (from %ld KiB)",
                 ordered ? "ordered" : "unordered", (peak - base) >> 10, (int)FLAT_ITEMS,
                 base >> 10);
#ifdef UNDER_ASAN
    cr_assert_lt(heap_peak - heap_base, HEAP_SLACK, "live heap grew %ld KiB",
                 (heap_peak - heap_base) >> 10);
#endif
    pp_iter_free(it);
    pp_pool_free(pool);
}

Test(source, rss_stays_flat_in_order, .timeout = PP_TEST_TIMEOUT(120))
{
    rss_stays_flat(true);
}

Test(source, rss_stays_flat_unordered, .timeout = PP_TEST_TIMEOUT(120))
{
    rss_stays_flat(false);
}

/* A source two threads may reach, the iterator's user and pp_join: it
 * notes a call that begins while another is still running. */
struct shared_source {
    _Atomic long next;
    long end;
    _Atomic int inside;
    _Atomic bool overlapped;
    _Atomic long handed_back; /* by the consumer */
};

static int shared_source(void *state, void *arg)
{
    struct shared_source *s = state;
    if (atomic_fetch_add(&s->inside, 1) != 0)
        s->overlapped = true;
    sched_yield(); /* a wider window for a second caller to walk in */
    int more = 0;
    long k = atomic_load(&s->next);
    if (k < s->end) {
        *(struct item *)arg = (struct item){.k = k};
        atomic_store(&s->next, k + 1);
        more = 1;
    }
    atomic_fetch_sub(&s->inside, 1);
    return more;
}

struct consumer {
    pp_iter *it;
    struct shared_source *s;
    long got, wrong;
    int last_rc;
};

static void *consume(void *arg)
{
    struct consumer *c = arg;
    long r;
    size_t idx;
    int rc;
    while ((rc = pp_iter_next(c->it, &r, &idx, -1, NULL)) != 0) {
        bool refused = idx % 1000 == 999;
        if ((long)idx != c->got || (refused ? rc != PP_ETASK : rc != 1 || r != 3 * (long)idx))
            c->wrong++;
        c->got++;
        atomic_store(&c->s->handed_back, c->got);
    }
    c->last_rc = rc;
    return NULL;
}

/* Closed and joined while another thread still iterates, the window (8)
 * far behind the source's end: join takes the rest of the source itself
 * (never while the consumer's refill runs it), waits for it to run, and
 * the consumer gets every item, in order. */
Test(source, join_while_another_thread_iterates_runs_every_item, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct shared_source s = {.end = 3000};
    struct consumer c = {.s = &s, .last_rc = 1};
    c.it = pp_imap_source(pool, triple, shared_source, &s, sizeof(struct item), sizeof(long), 1, 8,
                          true);
    cr_assert_not_null(c.it);
    pthread_t t;
    pthread_create(&t, NULL, consume, &c);
    while (atomic_load(&s.handed_back) < 100)
        sched_yield();
    cr_assert_eq(pp_close(pool), 0);
    cr_assert_eq(pp_join(pool), 0);
    cr_assert_eq(atomic_load(&s.next), 3000, "join took every item");
    pthread_join(t, NULL);
    cr_assert_eq(c.last_rc, 0);
    cr_assert_eq(c.got, 3000);
    cr_assert_eq(c.wrong, 0);
    cr_assert(!s.overlapped, "the source ran in two threads at once");
    pp_iter_free(c.it);
    pp_pool_free(pool);
}

/* A source that, at item `at`, joins its own pool (closing it first), or
 * asks its own iterator for an item. */
struct self_calling {
    long next, end, at;
    pp_pool *pool;
    pp_iter *it; /* set once pp_imap_source returned */
    bool join;
    int join_rc, next_rc;
};

static int self_calling_source(void *state, void *arg)
{
    struct self_calling *s = state;
    if (s->next == s->at && s->it != NULL) {
        if (s->join) {
            pp_close(s->pool);
            s->join_rc = pp_join(s->pool);
        } else {
            long r;
            s->next_rc = pp_iter_next(s->it, &r, NULL, -1, NULL);
        }
    }
    if (s->next >= s->end)
        return 0;
    *(struct item *)arg = (struct item){.k = s->next++};
    return 1;
}

/* Joined from inside its own source: the join does not wait on the source
 * it runs in; the items of that refill and after it fail PP_ECLOSED, every item comes
 * back once, in order, and the iteration ends. */
Test(source, a_source_that_joins_its_pool_ends_cleanly, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct self_calling s = {.end = 100, .at = 40, .pool = pool, .join = true, .join_rc = 1};
    pp_iter *it = pp_imap_source(pool, triple, self_calling_source, &s, sizeof(struct item),
                                 sizeof(long), 1, 8, true);
    cr_assert_not_null(it);
    s.it = it;
    long r;
    size_t idx;
    int rc, ran = 0, closed = 0;
    while ((rc = pp_iter_next(it, &r, &idx, 10, NULL)) != 0) {
        cr_assert_eq(idx, (size_t)(ran + closed), "in order, once each");
        cr_assert(rc == 1 || rc == PP_ECLOSED, "%s", pp_strerror(rc));
        cr_assert(rc != 1 || r == 3 * (long)idx);
        rc == 1 ? ran++ : closed++;
    }
    cr_assert_eq(s.join_rc, 0);
    cr_assert_eq(ran + closed, 100);
    /* The refill that runs the join holds at most a window (8) of them. */
    cr_assert_geq(ran, 40 - 8, "what earlier refills took ran: %d", ran);
    cr_assert_gt(closed, 0, "what was taken after it did not");
    pp_iter_free(it);
    pp_pool_free(pool);
}

/* A source asking its own iterator for an item would wait on itself:
 * -EDEADLK, and the iteration goes on. */
Test(source, a_source_that_asks_its_own_iterator_gets_edeadlk, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    struct self_calling s = {.end = 100, .at = 40, .pool = pool};
    pp_iter *it = pp_imap_source(pool, triple, self_calling_source, &s, sizeof(struct item),
                                 sizeof(long), 1, 8, true);
    s.it = it;
    long r;
    int rc, got = 0;
    while ((rc = pp_iter_next(it, &r, NULL, 10, NULL)) == 1)
        got++;
    cr_assert_eq(rc, 0);
    cr_assert_eq(got, 100);
    cr_assert_eq(s.next_rc, -EDEADLK);
    pp_iter_free(it);
    pp_pool_free(pool);
}
