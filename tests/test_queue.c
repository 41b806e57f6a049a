/*
 * pp_queue across real processes: FIFO messages of any length, blocking
 * with timeouts, -EMSGSIZE, many producers and consumers, and processes
 * SIGKILLed in the middle of a put or a get.
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "proc_helpers.h"
#include "helpers.h"
#include "procpool.h"
#include "queue.h"

Test(queue, messages_of_any_length_come_out_in_order, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *q = pp_queue_new(100);
    cr_assert_not_null(q);
    char buf[100];
    size_t len = 7;
    /* many rounds, so messages wrap around the end of the ring */
    for (int round = 0; round < 200; round++) {
        char m1[37], m2[1] = {'x'};
        memset(m1, 'a' + round % 26, sizeof m1);
        cr_assert_eq(pp_queue_put(q, m1, sizeof m1, 0), 0);
        cr_assert_eq(pp_queue_put(q, NULL, 0, 0), 0, "empty messages are messages");
        cr_assert_eq(pp_queue_put(q, m2, 1, 0), 0);
        cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), 0);
        cr_assert_eq(len, sizeof m1);
        cr_assert_eq(memcmp(buf, m1, len), 0, "round %d", round);
        cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), 0);
        cr_assert_eq(len, 0);
        cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), 0);
        cr_assert(len == 1 && buf[0] == 'x');
    }
    cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), -ETIMEDOUT);
    pp_queue_free(q);
}

Test(queue, capacity_counts_message_bytes_only, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *q = pp_queue_new(64);
    char big[64] = {1}, small[4];
    size_t len;
    cr_assert_eq(pp_queue_put(q, big, 64, 0), 0, "a message as big as the capacity fits");
    cr_assert_eq(pp_queue_put(q, big, 1, 0), -ETIMEDOUT, "full");
    cr_assert_eq(pp_queue_put(q, big, 1, 0.02), -ETIMEDOUT);
    cr_assert_eq(pp_queue_get(q, big, sizeof big, &len, 0), 0);
    for (int i = 0; i < 16; i++)
        cr_assert_eq(pp_queue_put(q, small, sizeof small, 0), 0, "message %d", i);
    cr_assert_eq(pp_queue_put(q, small, 1, 0), -ETIMEDOUT);
    pp_queue_free(q);
}

Test(queue, emsgsize_keeps_the_message_queued, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *q = pp_queue_new(32);
    cr_assert_eq(pp_queue_put(q, "0123456789abcdefghijklmnopqrstuvwxyz", 33, 0), -EMSGSIZE);
    cr_assert_eq(pp_queue_put(q, "hello, world", 13, 0), 0);
    char buf[32];
    size_t len = 0;
    cr_assert_eq(pp_queue_get(q, buf, 4, &len, 0), -EMSGSIZE);
    cr_assert_eq(len, 13, "the length needed");
    cr_assert_eq(pp_queue_get(q, NULL, 0, &len, 0), -EMSGSIZE, "peek at the length");
    cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), 0);
    cr_assert_str_eq(buf, "hello, world");
    pp_queue_free(q);
}

Test(queue, blocking_get_and_put_across_processes, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *down = pp_queue_new(16), *up = pp_queue_new(16);
    pid_t pid = th_fork();
    if (pid == 0) {
        char buf[16];
        size_t len;
        if (pp_queue_get(down, buf, sizeof buf, &len, -1) != 0 || len != 5 ||
            memcmp(buf, "ping", 5))
            _exit(1);
        /* fill the queue, then block on a put until the parent makes room */
        for (int i = 0; i < 3; i++)
            if (pp_queue_put(up, "pong-pong-pong!", 16, -1) != 0)
                _exit(2);
        _exit(0);
    }
    th_wait_futex_sleep(pid); /* blocked in get */
    cr_assert_eq(pp_queue_put(down, "ping", 5, -1), 0);
    char buf[16];
    size_t len;
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(pp_queue_get(up, buf, sizeof buf, &len, -1), 0);
        cr_assert(len == 16 && memcmp(buf, "pong-pong-pong!", 16) == 0);
    }
    cr_assert_eq(th_wait(pid), 0);
    pp_queue_free(down);
    pp_queue_free(up);
}

enum { PRODUCERS = 3, CONSUMERS = 2, PER_PRODUCER = 3000 };

struct msg {
    int producer;
    int seq;
    unsigned char body[200]; /* the first `seq % 200` bytes are used */
};

static size_t msg_len(int seq)
{
    return offsetof(struct msg, body) + (size_t)(seq % 200);
}

Test(queue, many_producers_and_consumers_at_once, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *q = pp_queue_new(4096);
    _Atomic int *got = pp_shm_alloc(sizeof(int) * PRODUCERS * PER_PRODUCER);
    pid_t pid[PRODUCERS + CONSUMERS];
    for (int c = 0; c < CONSUMERS; c++)
        if ((pid[PRODUCERS + c] = th_fork()) == 0) {
            int last[PRODUCERS];
            for (int p = 0; p < PRODUCERS; p++)
                last[p] = -1;
            for (;;) {
                struct msg m;
                size_t len;
                if (pp_queue_get(q, &m, sizeof m, &len, -1) != 0)
                    _exit(1);
                if (len == 0) /* the end */
                    _exit(0);
                if (m.producer < 0 || m.producer >= PRODUCERS || len != msg_len(m.seq))
                    _exit(2);
                if (m.seq <= last[m.producer]) /* FIFO per producer */
                    _exit(3);
                last[m.producer] = m.seq;
                for (int k = 0; k < m.seq % 200; k++)
                    if (m.body[k] != (unsigned char)(m.seq + k))
                        _exit(4); /* torn */
                atomic_fetch_add(&got[m.producer * PER_PRODUCER + m.seq], 1);
            }
        }
    for (int p = 0; p < PRODUCERS; p++)
        if ((pid[p] = th_fork()) == 0) {
            for (int s = 0; s < PER_PRODUCER; s++) {
                struct msg m = {.producer = p, .seq = s};
                for (int k = 0; k < s % 200; k++)
                    m.body[k] = (unsigned char)(s + k);
                if (pp_queue_put(q, &m, msg_len(s), -1) != 0)
                    _exit(1);
            }
            _exit(0);
        }
    for (int p = 0; p < PRODUCERS; p++)
        cr_assert_eq(th_wait(pid[p]), 0, "producer %d", p);
    for (int c = 0; c < CONSUMERS; c++)
        cr_assert_eq(pp_queue_put(q, NULL, 0, -1), 0);
    for (int c = 0; c < CONSUMERS; c++)
        cr_assert_eq(th_wait(pid[PRODUCERS + c]), 0, "consumer %d", c);
    for (int i = 0; i < PRODUCERS * PER_PRODUCER; i++)
        cr_assert_eq(atomic_load(&got[i]), 1, "message %d of producer %d", i % PER_PRODUCER,
                     i / PER_PRODUCER);
    pp_queue_free(q);
}

/* A child that stops inside a put (or get) after copying, before the
 * commit, holding the queue's lock; returned once it is there. */
static pid_t stall_in(pp_queue *q, uint32_t where)
{
    struct pp_queue *raw = (struct pp_queue *)q;
    atomic_store(&raw->test_hook, where);
    pid_t pid = th_fork();
    if (pid == 0) {
        char buf[64];
        size_t len;
        if (where == PP_QUEUE_STALL_PUT)
            pp_queue_put(q, "TORN TORN TORN TORN", 20, -1);
        else
            pp_queue_get(q, buf, sizeof buf, &len, -1);
        _exit(1); /* not reached */
    }
    th_wait_word(&raw->test_hook, PP_QUEUE_STALLED);
    atomic_store(&raw->test_hook, PP_QUEUE_HOOK_NONE);
    return pid;
}

Test(queue, killed_in_the_middle_of_a_put_leaves_nothing_torn, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *q = pp_queue_new(64);
    cr_assert_eq(pp_queue_put(q, "first", 6, 0), 0);
    /* a consumer that will wait for a second message, and a producer stuck
     * mid-put holding the lock */
    pid_t consumer = th_fork();
    if (consumer == 0) {
        char buf[64];
        size_t len;
        if (pp_queue_get(q, buf, sizeof buf, &len, -1) != 0 || strcmp(buf, "first"))
            _exit(1);
        if (pp_queue_get(q, buf, sizeof buf, &len, -1) != 0 || strcmp(buf, "second"))
            _exit(2);
        _exit(0);
    }
    pid_t producer = stall_in(q, PP_QUEUE_STALL_PUT);
    cr_assert_eq(th_kill(producer), 128 + SIGKILL);
    cr_assert_eq(pp_queue_put(q, "second", 7, 1), 0, "the queue is usable");
    cr_assert_eq(th_wait(consumer), 0, "nobody hangs, nobody reads the torn message");
    char buf[64];
    size_t len;
    cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), -ETIMEDOUT, "and it is not queued");
    pp_queue_free(q);
}

Test(queue, killed_in_the_middle_of_a_get_loses_nothing, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *q = pp_queue_new(64);
    cr_assert_eq(pp_queue_put(q, "one", 4, 0), 0);
    cr_assert_eq(pp_queue_put(q, "two", 4, 0), 0);
    pid_t consumer = stall_in(q, PP_QUEUE_STALL_GET);
    /* a producer blocked behind the dead consumer's lock */
    pid_t producer = th_fork();
    if (producer == 0)
        _exit(pp_queue_put(q, "three", 6, -1) == 0 ? 0 : 1);
    cr_assert_eq(th_kill(consumer), 128 + SIGKILL);
    cr_assert_eq(th_wait(producer), 0);
    const char *want[] = {"one", "two", "three"};
    for (int i = 0; i < 3; i++) {
        char buf[64];
        size_t len;
        cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 1), 0);
        cr_assert_str_eq(buf, want[i]);
    }
    pp_queue_free(q);
}

Test(queue, killed_while_blocked_leaves_it_usable, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_queue *q = pp_queue_new(8);
    cr_assert_eq(pp_queue_put(q, "full!!!", 8, 0), 0);
    pid_t putter = th_fork();
    if (putter == 0)
        _exit(pp_queue_put(q, "more", 5, -1) == 0 ? 1 : 2);
    th_wait_futex_sleep(putter);
    th_kill(putter);
    char buf[8];
    size_t len;
    cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), 0);
    cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), -ETIMEDOUT,
                 "the dead put did not land");
    pid_t getter = th_fork();
    if (getter == 0)
        _exit(pp_queue_get(q, buf, sizeof buf, &len, -1) == 0 ? 1 : 2);
    th_wait_futex_sleep(getter);
    th_kill(getter);
    cr_assert_eq(pp_queue_put(q, "again", 6, 0), 0);
    cr_assert_eq(pp_queue_get(q, buf, sizeof buf, &len, 0), 0);
    cr_assert_str_eq(buf, "again");
    pp_queue_free(q);
}

Test(queue, bad_input_gives_clear_codes, .timeout = PP_TEST_TIMEOUT(20))
{
    errno = 0;
    cr_assert_null(pp_queue_new(0));
    cr_assert_eq(errno, EINVAL);
    char buf[8];
    size_t len;
    cr_assert_eq(pp_queue_put(NULL, "x", 1, 0), -EINVAL);
    cr_assert_eq(pp_queue_get(NULL, buf, sizeof buf, &len, 0), -EINVAL);
    pp_queue *q = pp_queue_new(8);
    cr_assert_eq(pp_queue_put(q, NULL, 3, 0), -EINVAL);
    cr_assert_eq(pp_queue_put(q, "too long!", 10, 0), -EMSGSIZE);
    cr_assert_eq(pp_queue_get(q, NULL, 4, &len, 0), -EINVAL);
    cr_assert_eq(pp_queue_put(q, "ok", 3, 0), 0);
    cr_assert_eq(pp_queue_get(q, buf, sizeof buf, NULL, 0), 0, "len may be NULL");
    pp_queue_free(q);
    pp_queue_free(NULL);
}

/* ---- with the pool ------------------------------------------------------ */

struct qtask {
    pp_queue *q;
    _Atomic uint32_t *pid; /* where a task says which process runs it */
};

static int produce(const void *arg, void *result)
{
    const struct qtask *t = arg;
    (void)result;
    for (int i = 1; i <= 1000; i++)
        if (pp_queue_put(t->q, &i, sizeof i, 10) != 0)
            return 1;
    return 0;
}

static int consume(const void *arg, void *result)
{
    const struct qtask *t = arg;
    long *sum = result;
    for (;;) {
        int v;
        size_t len;
        int rc = pp_queue_get(t->q, &v, sizeof v, &len, 10);
        if (rc != 0)
            return pp_fail(1, "get: %d", rc);
        if (len == 0) /* stop */
            return 0;
        *sum += v;
    }
}

Test(queue_pool, workers_produce_and_consume, .timeout = PP_TEST_TIMEOUT(20))
{
    struct qtask t = {.q = pp_queue_new(256)};
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
    cr_assert_not_null(pool);
    pp_async *c[2], *p[2];
    for (int i = 0; i < 2; i++) {
        c[i] = pp_apply_async(pool, consume, &t, sizeof t, sizeof(long), NULL, NULL, NULL);
        p[i] = pp_apply_async(pool, produce, &t, sizeof t, 0, NULL, NULL, NULL);
    }
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pp_async_get(p[i], NULL, -1, NULL), 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pp_queue_put(t.q, NULL, 0, -1), 0);
    long total = 0;
    for (int i = 0; i < 2; i++) {
        long sum = 0;
        pp_error err;
        cr_assert_eq(pp_async_get(c[i], &sum, -1, &err), 0, "%s", err.message);
        total += sum;
        pp_async_free(c[i]);
        pp_async_free(p[i]);
    }
    cr_assert_eq(total, 2 * 500500L);
    pp_pool_free(pool);
    pp_queue_free(t.q);
}

static int put_torn(const void *arg, void *result)
{
    const struct qtask *t = arg;
    (void)result;
    atomic_store(t->pid, (uint32_t)getpid());
    return pp_queue_put(t->q, "TORN TORN", 10, -1); /* stalls, then is killed */
}

static int get_one(const void *arg, void *result)
{
    const struct qtask *t = arg;
    size_t len;
    return -pp_queue_get(t->q, result, 16, &len, 0);
}

Test(queue_pool, a_worker_killed_mid_put_leaves_the_queue_usable, .timeout = PP_TEST_TIMEOUT(20))
{
    struct qtask t = {.q = pp_queue_new(64), .pid = pp_shm_alloc(sizeof(uint32_t))};
    struct pp_queue *raw = (struct pp_queue *)t.q;
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    atomic_store(&raw->test_hook, PP_QUEUE_STALL_PUT);
    pp_async *a = pp_apply_async(pool, put_torn, &t, sizeof t, 0, NULL, NULL, NULL);
    th_wait_word(&raw->test_hook, PP_QUEUE_STALLED);
    atomic_store(&raw->test_hook, PP_QUEUE_HOOK_NONE);
    kill((pid_t)atomic_load(t.pid), SIGKILL);
    cr_assert_eq(pp_async_get(a, NULL, -1, NULL), PP_ECRASH);
    pp_async_free(a);
    char buf[16];
    pp_error err;
    cr_assert_eq(pp_apply(pool, get_one, &t, sizeof t, buf, sizeof buf, &err), PP_ETASK);
    cr_assert_eq(err.status, ETIMEDOUT, "nothing torn was queued");
    cr_assert_eq(pp_queue_put(t.q, "whole", 6, 0), 0);
    cr_assert_eq(pp_apply(pool, get_one, &t, sizeof t, buf, sizeof buf, &err), 0);
    cr_assert_str_eq(buf, "whole");
    pp_pool_free(pool);
    pp_queue_free(t.q);
}
