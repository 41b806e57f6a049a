/*
 * Parent death: a process that uses a pool is SIGKILLed at random moments,
 * during pp_pool_new, during a map, during pp_terminate, and while a worker
 * holds a pp_lock. Within 1 s of the kill no process of its pool (the
 * helper, the workers, what tasks forked) may remain.
 *
 * The test process makes itself a child subreaper, so every orphan of the
 * killed process is reparented to it and can be seen: "nothing remains"
 * means this process has no live descendant at all.
 */
#include "helpers.h"
#include "proc_helpers.h"

#include <criterion/criterion.h>
#include <procpool.h>
#include <sys/prctl.h>

struct pd {
    _Atomic int phase;   /* where the victim is: see each scenario */
    _Atomic int started; /* tasks running */
    _Atomic int release; /* never set: tasks hold until killed */
};

/* In the arena (made here, before the victims fork), so that the victims'
 * workers see it under spawn too. */
#define S (*(struct pd **)test_global("S"))

static void setup(void)
{
    test_share("S", pp_shm_alloc(sizeof *S));
    cr_assert_not_null(S);
    cr_assert_eq(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
}

static void teardown(void)
{
    pp_shm_free(S);
    test_share("S", NULL);
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    volatile int spin = 0;
    for (int i = 0; i < 2000; i++)
        spin += i;
    *(int *)result = x * x;
    return 0;
}

static int hold(const void *arg, void *result)
{
    (void)arg;
    (void)result;
    atomic_fetch_add(&S->started, 1);
    flag_wait_ge(&S->release, 1);
    return 0;
}

/* Kills `victim` `delay_us` after it reached phase `phase` (at least
 * `min_before` of its processes, itself included, alive then), reaps it, and
 * asserts that all its descendants are gone within 1 s. Returns the phase
 * it was in when it died. */
static int kill_and_check(pid_t victim, int phase, long delay_us, int min_before)
{
    flag_wait_ge(&S->phase, phase);
    if (delay_us > 0)
        sleep_us(delay_us); /* fault injection at a random moment, not a sync */
    int at = atomic_load(&S->phase);
    int before[64];
    int nb = live_descendants(before, 64);
    cr_assert_geq(nb, min_before, "only %d processes before the kill", nb);
    double t0 = now_s();
    kill(victim, SIGKILL);
    cr_assert_eq(th_wait(victim), 128 + SIGKILL);
    bool gone = wait_no_descendants(1.0 * slow_factor() - (now_s() - t0));
    int left[64];
    int n = live_descendants(left, 64);
    cr_assert(gone, "%d process(es) of the pool outlived their parent by 1 s (first %d), phase %d",
              n, n ? left[0] : 0, at);
    return at;
}

Test(parent_death, during_pool_new, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    uint64_t rng = 0x51ed2701;
    int in_new = 0;
    /* 80 rounds: under ASan and a parallel ctest, pp_pool_free can take
     * several times as long as pp_pool_new, and 40 rounds once gave 5. */
    for (int round = 0; round < 80; round++) {
        atomic_store(&S->phase, 0);
        pid_t p = th_fork();
        if (p == 0) {
            for (;;) {
                atomic_store(&S->phase, 1); /* inside pp_pool_new */
                pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
                atomic_store(&S->phase, 2);
                pp_pool_free(pool);
            }
        }
        int at = kill_and_check(p, 1, (long)(xorshift64(&rng) % 4000), 1);
        in_new += at == 1;
    }
    cr_assert_gt(in_new, 5, "only %d kills landed inside pp_pool_new", in_new);
}

Test(parent_death, during_map, .init = setup, .fini = teardown, .timeout = PP_TEST_TIMEOUT(120))
{
    uint64_t rng = 0x7a3d11;
    int in_map = 0;
    for (int round = 0; round < 30; round++) {
        atomic_store(&S->phase, 0);
        pid_t p = th_fork();
        if (p == 0) {
            pp_pool *pool = pp_pool_new(&(pp_options){.workers = 3, .max_tasks_per_child = 50});
            int in[2000], out[2000];
            for (int i = 0; i < 2000; i++)
                in[i] = i;
            for (;;) {
                atomic_store(&S->phase, 1); /* inside pp_map */
                pp_map(pool, square, in, 2000, sizeof(int), out, sizeof(int), 1, NULL);
                atomic_store(&S->phase, 2);
            }
        }
        int at = kill_and_check(p, 1, (long)(xorshift64(&rng) % 20000), 2);
        in_map += at == 1;
    }
    cr_assert_gt(in_map, 5, "only %d kills landed inside pp_map", in_map);
}

Test(parent_death, during_terminate, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    uint64_t rng = 0x99c0ffee;
    for (int round = 0; round < 30; round++) {
        atomic_store(&S->phase, 0);
        atomic_store(&S->started, 0);
        pid_t p = th_fork();
        if (p == 0) {
            pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
            pp_async *a = pp_map_async(pool, hold, NULL, 64, 0, 0, 1, NULL, NULL, NULL);
            flag_wait_ge(&S->started, 4);
            atomic_store(&S->phase, 1); /* inside pp_terminate, then join and free */
            pp_terminate(pool);
            atomic_store(&S->phase, 2);
            pp_async_free(a);
            pp_pool_free(pool);
            atomic_store(&S->phase, 3);
            for (;;)
                pause();
        }
        kill_and_check(p, 1, (long)(xorshift64(&rng) % 1500), 1);
    }
}

/* arg: the lock (in the arena: valid in every worker, spawned ones too). */
static int hold_lock(const void *arg, void *result)
{
    pp_lock *lock = *(pp_lock *const *)arg;
    (void)result;
    if (pp_lock_acquire(lock, -1) != 0)
        return 1;
    pid_t child = fork(); /* and a process of its own, as tasks may have */
    if (child == 0) {
        for (;;)
            pause();
    }
    atomic_fetch_add(&S->started, 1);
    flag_wait_ge(&S->release, 1);
    return 0;
}

Test(parent_death, while_a_worker_holds_a_lock, .init = setup, .fini = teardown,
     .timeout = PP_TEST_TIMEOUT(120))
{
    uint64_t rng = 0xabcdef;
    for (int round = 0; round < 10; round++) {
        atomic_store(&S->phase, 0);
        atomic_store(&S->started, 0);
        pid_t p = th_fork();
        if (p == 0) {
            pp_lock *lock = pp_lock_new();
            pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
            pp_async *a = pp_apply_async(pool, hold_lock, &lock, sizeof lock, 0, NULL, NULL, NULL);
            (void)a;
            flag_wait_ge(&S->started, 1);
            atomic_store(&S->phase, 1); /* a worker holds the lock */
            /* The parent waits for the same lock meanwhile. */
            pp_lock_acquire(lock, -1);
            for (;;)
                pause();
        }
        kill_and_check(p, 1, (long)(xorshift64(&rng) % 500), 5);
    }
}
