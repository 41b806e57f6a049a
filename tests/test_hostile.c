/*
 * Hostile or broken workers. Tasks run user code inside the pool's shared
 * memory: a task may scribble over the control block, forge messages, write
 * past its result, call exit(0), or turn on the helper process. The parent
 * must validate everything it reads from shared memory, report an error for
 * what is affected, and never read out of bounds (ASan watches the parent),
 * crash or hang (every test has a timeout).
 */
#include "helpers.h"
#include "ring.h"

#include <criterion/criterion.h>
#include <procpool.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define W 2

#define flags (*shared_flags_slot()) /* seen by spawned workers too */

static void setup(void)
{
    flags = shared_flags_new();
    prctl(PR_SET_CHILD_SUBREAPER, 1);
}

static void teardown(void)
{
    int left[64];
    int n = live_descendants(left, 64);
    for (int i = 0; i < n; i++) { /* a failed test must not leave a stopped helper */
        kill(left[i], SIGCONT);
        kill(left[i], SIGKILL);
    }
    shared_flags_free(flags);
}

/* The control block of this worker's pool, found as any task could. */
static unsigned char *ctl_base(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long start = 0;
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, "procpool-ctl")) {
            sscanf(line, "%lx-", &start);
            break;
        }
    if (f)
        fclose(f);
    return (unsigned char *)start;
}

static size_t ctl_bytes(void)
{
    size_t bytes = sizeof(struct pp_ctl) + W * sizeof(struct pp_slot);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (bytes + page - 1) / page * page;
}

enum {
    DO_OK,
    DO_SCRIBBLE_ALL,       /* random bytes over the whole control block */
    DO_SCRIBBLE_SLOT,      /* random bytes over this worker's own slot */
    DO_FORGE,              /* well-formed lies in this worker's outbox */
    DO_OVERFLOW,           /* writes 32 results' worth into its one result */
    DO_EXIT0,              /* exit(0) in the middle of a chunk */
    DO_KILL_HELPER,        /* SIGKILLs the zygote */
    DO_STOP_HELPER,        /* SIGSTOPs the zygote */
    DO_CLOSE_FDS,          /* closes every descriptor it has */
    DO_SCRIBBLE_QUIET,     /* scribbles, then dies */
    DO_SCRIBBLE_ALL_ONCE,  /* DO_SCRIBBLE_ALL the first time it runs only */
    DO_SCRIBBLE_SLOT_ONCE, /* DO_SCRIBBLE_SLOT the first time it runs only */
    DO_RESET_CLAIM,        /* sets its chunk's claim word back to item 0 */
    DO_JUMP_TAIL,          /* moves its inbox's in_tail 2^31 positions on */
    DO_HIDE_INBOX,         /* moves its inbox's in_tail back to its own entry's end */
    DO_SILENCE_OTHER,      /* clears the other worker's `sleeping` word while it sleeps */
};

struct item {
    int what;
    int value;
    uint64_t seed;
};

static void scribble(unsigned char *p, size_t len, uint64_t seed)
{
    uint64_t s = seed | 1;
    for (size_t i = 0; i + 8 <= len; i += 8) {
        uint64_t r = xorshift64(&s);
        memcpy(p + i, &r, 8);
    }
}

static int hostile(const void *arg, void *result)
{
    const struct item *it = arg;
    uint64_t *r = result;
    unsigned char *ctl = ctl_base();
    int id = pp_worker_id();
    int what = it->what;
    if (what == DO_SCRIBBLE_ALL_ONCE || what == DO_SCRIBBLE_SLOT_ONCE)
        what = atomic_fetch_add(&flags->count, 1) != 0 ? DO_OK
               : what == DO_SCRIBBLE_ALL_ONCE          ? DO_SCRIBBLE_ALL
                                                       : DO_SCRIBBLE_SLOT;
    switch (what) {
    case DO_SCRIBBLE_ALL:
        scribble(ctl, ctl_bytes(), it->seed);
        break;
    case DO_SCRIBBLE_QUIET:
        scribble(ctl, ctl_bytes(), it->seed);
        _exit(0);
    case DO_SCRIBBLE_SLOT: {
        struct pp_ctl *c = (struct pp_ctl *)ctl;
        scribble((unsigned char *)&c->slot[id], sizeof c->slot[id], it->seed);
        break;
    }
    case DO_FORGE: {
        struct pp_slot *s = &((struct pp_ctl *)ctl)->slot[id];
        uint32_t tail = atomic_load(&s->out_tail), seq = atomic_load(&s->cur_seq);
        uint64_t rng = it->seed | 1;
        for (int k = 0; k < 40; k++) {
            struct pp_msg *m = &s->out[(tail + k) & PP_RING_MASK];
            uint64_t x = xorshift64(&rng);
            m->kind = (uint32_t)(x % 5);
            m->seq = seq + (uint32_t)((x >> 8) % 9) - 4; /* near the truth */
            m->item = (uint32_t)(x >> 16) % 3 ? (uint32_t)((x >> 20) % 40) : (uint32_t)x;
            m->status = (int32_t)(x >> 32);
            memset(s->out_text[(tail + k) & PP_RING_MASK], 'A' + k % 26,
                   PP_MSG_TEXT); /* no terminating NUL */
        }
        atomic_store(&s->out_tail, tail + 40);
        atomic_store(&s->cur_item, (uint32_t)xorshift64(&rng));
        atomic_store(&s->item_start, (int64_t)xorshift64(&rng));
        break;
    }
    case DO_RESET_CLAIM: {
        struct pp_slot *s = &((struct pp_ctl *)ctl)->slot[id];
        atomic_store(&s->in[atomic_load(&s->cur_seq) & PP_RING_MASK].claim, 0);
        break;
    }
    case DO_JUMP_TAIL: {
        struct pp_slot *s = &((struct pp_ctl *)ctl)->slot[id];
        atomic_fetch_add(&s->in_tail, 1u << 31);
        break;
    }
    case DO_HIDE_INBOX: {
        struct pp_slot *s = &((struct pp_ctl *)ctl)->slot[id];
        atomic_store(&s->in_tail, atomic_load(&s->cur_seq) + 1);
        break;
    }
    case DO_SILENCE_OTHER: {
        struct pp_slot *other = &((struct pp_ctl *)ctl)->slot[(id + 1) % W];
        double until = now_s() + 5.0;
        while (atomic_load(&other->sleeping) == 0 && now_s() < until)
            sched_yield();
        atomic_store(&other->sleeping, 0);
        break;
    }
    case DO_OVERFLOW: /* its own result right, then 31 more past it */
        memset(r + 1, 0xAB, 31 * sizeof *r);
        break;
    case DO_EXIT0:
        exit(0);
    case DO_KILL_HELPER:
        kill(getppid(), SIGKILL);
        break;
    case DO_STOP_HELPER:
        kill(getppid(), SIGSTOP);
        atomic_store(&flags->pids[0], getppid());
        break;
    case DO_CLOSE_FDS:
        for (int fd = 0; fd < 1024; fd++)
            close(fd);
        break;
    }
    *r = (uint64_t)it->value * 7 + 1;
    return 0;
}

static pp_pool *new_pool(double timeout)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = W, .task_timeout = timeout});
    cr_assert_not_null(pool);
    return pool;
}

/* Maps n items, item `bad` doing `what`; returns the map's code. Every
 * item reported as a success must hold its correct result; a failed item's
 * slot keeps the sentinel. */
static int map_with(pp_pool *pool, int n, int bad, int what, uint64_t seed, size_t chunk,
                    pp_error *err, int *wrong)
{
    struct item *in = calloc((size_t)n, sizeof *in);
    uint64_t *out = malloc((size_t)n * sizeof *out);
    memset(out, 0xff, (size_t)n * sizeof *out);
    for (int i = 0; i < n; i++)
        in[i] = (struct item){i == bad ? what : DO_OK, i, seed};
    int rc = pp_map(pool, hostile, in, (size_t)n, sizeof *in, out, sizeof *out, chunk, err);
    size_t failed = 0;
    *wrong = 0;
    for (int i = 0; i < n; i++) {
        if (out[i] == ~(uint64_t)0)
            failed++;
        else if (out[i] != (uint64_t)i * 7 + 1)
            (*wrong)++;
    }
    if (rc == 0)
        cr_assert_eq(failed, 0, "map succeeded, yet %zu results are missing", failed);
    free(in);
    free(out);
    return rc;
}

/* After the storm the pool serves again, perhaps after replacing workers
 * that were hit (at most W clean maps may meet one each), and frees cleanly,
 * leaving no process. */
static void assert_recovers(pp_pool *pool)
{
    int rc = -1;
    for (int attempt = 0; attempt <= W + 1 && rc != 0; attempt++) {
        pp_error err;
        int wrong;
        rc = map_with(pool, 200, -1, DO_OK, 0, 4, &err, &wrong);
        cr_assert_eq(wrong, 0, "a clean map returned %d wrong results", wrong);
    }
    cr_assert_eq(rc, 0, "the pool does not recover: %d", rc);
    pp_pool_free(pool);
    cr_assert(wait_no_descendants(2.0 * slow_factor()), "processes left after pp_pool_free");
}

static void storm(int what, int rounds)
{
    for (int round = 0; round < rounds; round++) {
        atomic_store(&flags->count, 0);
        pp_pool *pool = new_pool(2.0);
        pp_error err;
        int wrong;
        int rc = map_with(pool, 400, 37 + round, what, 0x1234567ull * (uint64_t)(round + 1), 4,
                          &err, &wrong);
        /* Whatever the scribble did to other workers' work, the parent
         * came back with an answer; ASan checks that it read nothing out of
         * bounds on the way. */
        if (rc != 0) {
            cr_assert_lt(rc, 0);
            cr_assert_geq(err.failed, 1);
            cr_assert_lt(err.index, 400);
            cr_assert_eq(err.message[sizeof err.message - 1], '\0');
        }
        assert_recovers(pool);
    }
}

Test(hostile, task_scribbles_whole_control_block_once, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    storm(DO_SCRIBBLE_ALL_ONCE, 24);
}

Test(hostile, task_scribbles_its_own_slot_once, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    storm(DO_SCRIBBLE_SLOT_ONCE, 24);
}

/* A task that scribbles over the WHOLE control block every time it runs
 * (other workers' slots and the parent-written words included). Found: the
 * parent's poller took a scribbled state word of a starting worker for news,
 * so it never slept and never let go of the lock; and workers killed by the
 * scribbles were counted as a crash loop until the pool gave up. */
Test(hostile, task_scribbles_whole_control_block, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    storm(DO_SCRIBBLE_ALL, 12);
}

/* Four maps of 400 items in chunks of one, an item of each doing `what`:
 * each map succeeds with every result right; then the pool recovers. */
static void unharmed_by(pp_pool *pool, int what)
{
    for (int round = 0; round < 4; round++) {
        pp_error err;
        int wrong;
        int rc = map_with(pool, 400, 30 + round * 50, what, 0, 1, &err, &wrong);
        cr_assert_eq(rc, 0, "round %d: rc %d (%s)", round, rc, err.message);
        cr_assert_eq(wrong, 0);
    }
    assert_recovers(pool);
}

/* Its worker then sweeps two billion inbox positions nobody posted,
 * claiming what it finds POSTED at their indexes under the wrong position
 * (found: a rare hang of task_scribbles_whole_control_block_once, the
 * parent waiting for entries that no message could name any more). The
 * parent kills the worker once its in_head leaves the positions it dealt:
 * every item still comes back, run again by the worker's successor. */
Test(hostile, task_moves_its_inbox_tail, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    unharmed_by(new_pool(0), DO_JUMP_TAIL);
}

/* Its worker then finds its inbox empty and sleeps, with entries dealt to
 * it behind the hidden tail: a pool of one worker waited for them for ever.
 * The parent, the only writer of in_tail, puts it back and wakes it. */
Test(hostile, task_hides_its_inbox, .init = setup, .fini = teardown, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    cr_assert_not_null(pool);
    unharmed_by(pool, DO_HIDE_INBOX);
}

static int whose(const void *arg, void *result)
{
    (void)arg;
    int id = pp_worker_id();
    memcpy(result, &id, sizeof id);
    return 0;
}

/* The parent wakes a worker only if its slot says it sleeps: a task of
 * another worker that clears the word leaves it asleep for good, and the
 * pool served on with one worker (the other took its entries back by
 * balancing). A worker that has not moved to an entry posted 50 ms ago,
 * and runs nothing, is now woken whatever the word says, so both workers
 * serve again. */
Test(hostile, task_silences_another_sleeping_worker, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = new_pool(0);
    pp_error err;
    int wrong;
    cr_assert_eq(map_with(pool, 1, 0, DO_SILENCE_OTHER, 0, 1, &err, &wrong), 0);
    bool seen[W] = {false};
    double deadline = now_s() + 10.0 * slow_factor();
    while (!(seen[0] && seen[1]) && now_s() < deadline) {
        int in[64] = {0}, ids[64];
        cr_assert_eq(pp_map(pool, whose, in, 64, sizeof *in, ids, sizeof *ids, 1, &err), 0);
        for (int i = 0; i < 64; i++) {
            cr_assert(ids[i] >= 0 && ids[i] < W, "worker id %d", ids[i]);
            seen[ids[i]] = true;
        }
    }
    cr_assert(seen[0] && seen[1], "a worker never ran again");
    assert_recovers(pool);
}

/* As task_scribbles_whole_control_block, and the task's worker dies. */
Test(hostile, task_scribbles_control_block_and_dies, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    storm(DO_SCRIBBLE_QUIET, 12);
}

/* A task that wipes its own slot every time it runs: each such death is
 * charged to its chunk, and after three the chunk's next item fails. */
Test(hostile, task_scribbles_its_own_slot, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    storm(DO_SCRIBBLE_SLOT, 12);
}

Test(hostile, task_forges_outbox_messages, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    storm(DO_FORGE, 12);
}

Test(hostile, task_calls_exit_0, .init = setup, .fini = teardown, .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = new_pool(0);
    pp_error err;
    int wrong;
    int rc = map_with(pool, 100, 41, DO_EXIT0, 0, 10, &err, &wrong);
    cr_assert_eq(rc, PP_ECRASH, "rc %d", rc);
    cr_assert_eq(err.index, 41);
    cr_assert_eq(err.failed, 1);
    cr_assert_eq(wrong, 0);
    cr_assert_not_null(strstr(err.message, "exit"), "message: %s", err.message);
    assert_recovers(pool);
}

Test(hostile, task_closes_every_descriptor, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    /* The worker loses the eventfd it wakes the parent with: the parent
     * must not sleep forever waiting for a wake-up that cannot come. */
    pp_pool *pool = new_pool(0);
    pp_error err;
    int wrong;
    cr_assert_eq(map_with(pool, 300, 5, DO_CLOSE_FDS, 0, 1, &err, &wrong), 0);
    cr_assert_eq(wrong, 0);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(map_with(pool, 50, -1, DO_OK, 0, 1, &err, &wrong), 0);
        cr_assert_eq(wrong, 0);
    }
    assert_recovers(pool);
}

Test(hostile, task_kills_the_helper, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    pp_pool *pool = new_pool(0);
    pp_error err;
    int wrong;
    int rc = map_with(pool, 200, 20, DO_KILL_HELPER, 0, 2, &err, &wrong);
    /* The workers die with their helper; what they had not finished fails
     * (no helper: nothing can be replaced). */
    cr_assert(rc == PP_ESPAWN || rc == PP_ECRASH || rc == 0, "rc %d", rc);
    cr_assert_eq(wrong, 0);
    pp_error e2;
    int rc2 = map_with(pool, 10, -1, DO_OK, 0, 1, &e2, &wrong);
    cr_assert(rc2 == PP_ESPAWN || rc2 == PP_ECLOSED || rc2 == 0, "rc %d", rc2);
    pp_pool_free(pool);
    cr_assert(wait_no_descendants(2.0 * slow_factor()), "processes left after pp_pool_free");
}

/* Regression (fixed; it was in src/pool.c pp_join, src/supervise.c): a task can SIGSTOP the helper
 * (its parent). The parent learns of deaths and asks for kills only through
 * the helper, and pp_join / pp_pool_free wait for the helper's answer with
 * no deadline, so pp_pool_free never returns. Suggested fix: in pp_join,
 * after the workers were told to quit or were killed, wait for the helper
 * with a deadline and then SIGKILL it (the parent is its parent; workers
 * follow through PR_SET_PDEATHSIG). */
Test(hostile, task_stops_the_helper_then_pool_free_returns, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(20))
{
    pp_pool *pool = new_pool(0);
    pp_error err;
    int wrong;
    cr_assert_eq(map_with(pool, 50, 3, DO_STOP_HELPER, 0, 1, &err, &wrong), 0);
    pp_pool_free(pool);
    cr_assert(wait_no_descendants(2.0 * slow_factor()), "processes left after pp_pool_free");
}

/* Regression (fixed; it was in src/supervise.c, src/pool.c): with the helper stopped, a worker that
 * dies is never reaped, so the parent never hears of it and the map waits
 * forever (task_timeout cannot help: its kill goes through the helper).
 * Suggested fix: the parent opens a pidfd for every worker pid the helper
 * reports (pidfd_open works on any process) and polls those too, settling a
 * worker's slot when its pidfd becomes readable, and kills a worker past
 * its timeout itself with pidfd_send_signal. */
Test(hostile, worker_dies_while_helper_is_stopped, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(20))
{
    pp_pool *pool = new_pool(0);
    pp_error err;
    int wrong;
    cr_assert_eq(map_with(pool, 50, 3, DO_STOP_HELPER, 0, 1, &err, &wrong), 0);
    struct item in = {DO_EXIT0, 1, 0};
    uint64_t out;
    cr_assert_eq(pp_apply(pool, hostile, &in, sizeof in, &out, sizeof out, &err), PP_ECRASH);
    kill(atomic_load(&flags->pids[0]), SIGCONT);
    pp_pool_free(pool);
}

/* Regression (fixed; it was in src/dispatch.c post(), src/worker.c run_item): a task that writes
 * past its result_size overwrites whatever the parent placed after that
 * chunk's result bytes: the next inbox entry's inline arguments (or the
 * next payload block), so other items silently run on corrupted arguments
 * and come back "successful" with wrong results. The parent never notices.
 * Suggested fix: place a guard (canary) after every chunk's result bytes,
 * check it when the chunk's DONE arrives or its worker dies, and fail the
 * chunk (e.g. PP_ECRASH, "task wrote past its result") when it changed;
 * keep arguments before results so a short overrun hits the guard first.
 * */
Test(hostile, task_writes_past_its_result, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    for (int chunk = 1; chunk <= 16; chunk *= 4) {
        pp_pool *pool = new_pool(0);
        pp_error err;
        int wrong;
        int rc = map_with(pool, 400, 13, DO_OVERFLOW, 0, (size_t)chunk, &err, &wrong);
        cr_assert_eq(wrong, 0, "chunk %d: %d items came back successful with wrong results (rc %d)",
                     chunk, wrong, rc);
        cr_assert_neq(rc, 0, "chunk %d: the overrun went unreported", chunk);
        pp_pool_free(pool);
    }
}

/* A task that resets its chunk's claim word makes its worker stop after it
 * (the next claim does not return the next item): the worker says how far
 * it got, and the rest of the chunk runs again, none of it lost. */
Test(hostile, task_resets_its_claim_word, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(30))
{
    for (size_t chunk = 1; chunk <= 16; chunk *= 4) {
        pp_pool *pool = new_pool(0);
        pp_error err;
        int wrong;
        int rc = map_with(pool, 400, 37, DO_RESET_CLAIM, 0, chunk, &err, &wrong);
        cr_assert_eq(rc, 0, "chunk %zu: %s", chunk, err.message);
        cr_assert_eq(wrong, 0, "chunk %zu: %d wrong results", chunk, wrong);
        pp_pool_free(pool);
    }
}
