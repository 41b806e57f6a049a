/*
 * queue_pc: producers and consumers in pool workers, talking through a
 * pp_queue (Python's multiprocessing.Queue shared by Pool tasks).
 *
 * Two producer tasks put numbered messages; two consumer tasks take them
 * until each gets an empty message (the "stop" sentinel, put by the parent
 * once the producers are done) and return how many they took and their sum.
 */
#include <procpool.h>

#include <stdio.h>
#include <string.h>

#define PER_PRODUCER 5000

struct task_arg {
    pp_queue *queue; /* in the arena: usable in every worker */
    int producer;    /* which producer this is (producers only) */
};

struct tally {
    long count, sum;
};

static int produce(const void *arg, void *result)
{
    const struct task_arg *a = arg;
    (void)result;
    for (int i = 0; i < PER_PRODUCER; i++) {
        char msg[32];
        int len = snprintf(msg, sizeof msg, "p%d:%d", a->producer, i);
        int rc = pp_queue_put(a->queue, msg, (size_t)len, -1);
        if (rc != 0)
            return pp_fail(1, "put: %s", pp_strerror(rc));
    }
    return 0;
}

static int consume(const void *arg, void *result)
{
    const struct task_arg *a = arg;
    struct tally *t = result;
    for (;;) {
        char msg[32];
        size_t len;
        int rc = pp_queue_get(a->queue, msg, sizeof msg - 1, &len, -1);
        if (rc != 0)
            return pp_fail(1, "get: %s", pp_strerror(rc));
        if (len == 0) /* stop */
            return 0;
        msg[len] = 0;
        int producer, i;
        if (sscanf(msg, "p%d:%d", &producer, &i) != 2)
            return pp_fail(2, "torn message '%s'", msg);
        t->count++;
        t->sum += i;
    }
}

int main(void)
{
    pp_queue *q = pp_queue_new(4096);
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
    if (!q || !pool) {
        perror("setup");
        return 1;
    }
    pp_async *consumers[2], *producers[2];
    for (int i = 0; i < 2; i++) {
        struct task_arg c = {.queue = q};
        consumers[i] =
            pp_apply_async(pool, consume, &c, sizeof c, sizeof(struct tally), NULL, NULL, NULL);
    }
    for (int i = 0; i < 2; i++) {
        struct task_arg p = {.queue = q, .producer = i};
        producers[i] = pp_apply_async(pool, produce, &p, sizeof p, 0, NULL, NULL, NULL);
    }
    int failed = 0;
    for (int i = 0; i < 2; i++) {
        pp_error err;
        if (pp_async_get(producers[i], NULL, -1, &err) != 0) {
            fprintf(stderr, "producer %d: %s\n", i, err.message);
            failed = 1;
        }
    }
    for (int i = 0; i < 2; i++)
        pp_queue_put(q, NULL, 0, -1); /* one stop message per consumer */
    long count = 0, sum = 0;
    for (int i = 0; i < 2; i++) {
        struct tally t;
        pp_error err;
        if (pp_async_get(consumers[i], &t, -1, &err) != 0) {
            fprintf(stderr, "consumer %d: %s\n", i, err.message);
            failed = 1;
            continue;
        }
        printf("consumer %d took %ld messages\n", i, t.count);
        count += t.count;
        sum += t.sum;
    }
    for (int i = 0; i < 2; i++) {
        pp_async_free(producers[i]);
        pp_async_free(consumers[i]);
    }
    pp_close(pool);
    pp_join(pool);
    pp_pool_free(pool);
    pp_queue_free(q);
    long want = 2L * PER_PRODUCER * (PER_PRODUCER - 1) / 2;
    printf("Received %ld messages (sum %ld, expected %d and %ld)\n", count, sum, 2 * PER_PRODUCER,
           want);
    return failed || count != 2 * PER_PRODUCER || sum != want;
}
