/*
 * Locks, semaphores, conditions, events and barriers across real processes
 * (parent and child, child and child), including processes SIGKILLed while
 * holding a lock or waiting at a barrier.
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <unistd.h>

#include "proc_helpers.h"
#include "helpers.h"
#include "procpool.h"
#include "sync.h"

/* ---- Lock ---------------------------------------------------------------- */

Test(lock, python_verbs_and_errors, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    cr_assert_not_null(l);
    cr_assert_eq(pp_lock_release(l), -EPERM, "not held");
    cr_assert_eq(pp_lock_acquire(l, 0), 0, "a free lock is taken by a poll");
    cr_assert_eq(pp_lock_acquire(l, -1), -EDEADLK);
    cr_assert_eq(pp_lock_acquire(l, 0), -EDEADLK);
    cr_assert_eq(pp_lock_acquire(l, 0.01), -EDEADLK);
    pid_t pid = th_fork();
    if (pid == 0) {
        /* another process: cannot take it, cannot release it */
        int a = pp_lock_acquire(l, 0), b = pp_lock_acquire(l, 0.02), c = pp_lock_release(l);
        _exit(a == -ETIMEDOUT && b == -ETIMEDOUT && c == -EPERM ? 0 : 1);
    }
    cr_assert_eq(th_wait(pid), 0);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_release(l), -EPERM);
    pp_lock_free(l);
}

Test(lock, four_processes_count_to_40000, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    int *counter = pp_shm_alloc(sizeof *counter);
    pid_t pid[4];
    for (int w = 0; w < 4; w++)
        if ((pid[w] = th_fork()) == 0) {
            for (int i = 0; i < 10000; i++) {
                if (pp_lock_acquire(l, -1) != 0)
                    _exit(1);
                volatile int *c = counter;
                *c = *c + 1;
                if (pp_lock_release(l) != 0)
                    _exit(1);
            }
            _exit(0);
        }
    for (int w = 0; w < 4; w++)
        cr_assert_eq(th_wait(pid[w]), 0);
    cr_assert_eq(*counter, 40000);
    pp_shm_free(counter);
    pp_lock_free(l);
}

/* A child takes the lock, says so, and blocks; it is SIGKILLed holding it. */
static pid_t hold_and_hang(pp_lock *l)
{
    int fds[2];
    th_pipe(fds);
    pid_t pid = th_fork();
    if (pid == 0) {
        th_send(fds[1], pp_lock_acquire(l, -1));
        th_send(fds[1], pp_lock_acquire(l, -1)); /* rlock: a second level */
        for (;;)
            pause();
    }
    cr_assert_eq(th_recv(fds[0]), 0);
    th_recv(fds[0]);
    close(fds[0]);
    close(fds[1]);
    return pid;
}

Test(lock, holder_killed_gives_eownerdead_then_works, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    pid_t pid = hold_and_hang(l);
    cr_assert_eq(pp_lock_acquire(l, 0), -ETIMEDOUT, "held by a live child");
    cr_assert_eq(th_kill(pid), 128 + SIGKILL);
    cr_assert_eq(pp_lock_acquire(l, -1), PP_EOWNERDEAD);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_acquire(l, 0), 0, "works normally after repair");
    cr_assert_eq(pp_lock_release(l), 0);
    pp_lock_free(l);
}

Test(lock, waiter_blocked_when_holder_is_killed_gets_it, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    pid_t holder = hold_and_hang(l);
    pid_t waiter = th_fork();
    if (waiter == 0) {
        int rc = pp_lock_acquire(l, -1);
        _exit(rc == PP_EOWNERDEAD && pp_lock_release(l) == 0 ? 0 : 1);
    }
    th_kill(holder);
    cr_assert_eq(th_wait(waiter), 0);
    cr_assert_eq(pp_lock_acquire(l, 0), 0);
    pp_lock_release(l);
    pp_lock_free(l);
}

Test(lock, death_seen_by_a_non_holder_release_is_still_reported, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_rlock_new();
    pid_t pid = hold_and_hang(l);
    th_kill(pid);
    cr_assert_eq(pp_lock_release(l), -EPERM);
    cr_assert_eq(pp_lock_acquire(l, 0), PP_EOWNERDEAD);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_release(l), -EPERM, "one level after a death");
    pp_lock_free(l);
}

Test(rlock, counts_levels_across_processes, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_rlock_new();
    cr_assert_not_null(l);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pp_lock_acquire(l, 0), 0);
    int fds[2];
    th_pipe(fds);
    pid_t pid = th_fork();
    if (pid == 0) {
        if (pp_lock_acquire(l, 0) != -ETIMEDOUT || pp_lock_release(l) != -EPERM)
            _exit(1);
        th_send(fds[1], 1);
        int rc = pp_lock_acquire(l, -1); /* after the parent's third release */
        _exit(rc == 0 && pp_lock_release(l) == 0 ? 0 : 2);
    }
    cr_assert_eq(th_recv(fds[0]), 1);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_release(l), -EPERM);
    cr_assert_eq(th_wait(pid), 0);
    pp_lock_free(l);
}

Test(rlock, holder_killed_gives_eownerdead, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_rlock_new();
    pid_t pid = hold_and_hang(l); /* holds two levels */
    th_kill(pid);
    cr_assert_eq(pp_lock_acquire(l, -1), PP_EOWNERDEAD);
    cr_assert_eq(pp_lock_acquire(l, -1), 0);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_release(l), 0);
    cr_assert_eq(pp_lock_release(l), -EPERM);
    pp_lock_free(l);
}

/* ---- Semaphore ----------------------------------------------------------- */

Test(sem, counts_and_limits_concurrency, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_sem *s = pp_sem_new(2);
    cr_assert_not_null(s);
    _Atomic int *inside = pp_shm_alloc(sizeof *inside);
    _Atomic int *most = pp_shm_alloc(sizeof *most);
    pid_t pid[4];
    for (int w = 0; w < 4; w++)
        if ((pid[w] = th_fork()) == 0) {
            for (int i = 0; i < 2000; i++) {
                if (pp_sem_acquire(s, -1) != 0)
                    _exit(1);
                int now = atomic_fetch_add(inside, 1) + 1, m = atomic_load(most);
                while (now > m && !atomic_compare_exchange_weak(most, &m, now))
                    ;
                atomic_fetch_sub(inside, 1);
                if (pp_sem_release(s) != 0)
                    _exit(1);
            }
            _exit(0);
        }
    for (int w = 0; w < 4; w++)
        cr_assert_eq(th_wait(pid[w]), 0);
    cr_assert_leq(atomic_load(most), 2);
    cr_assert_eq(pp_sem_acquire(s, 0), 0);
    cr_assert_eq(pp_sem_acquire(s, 0), 0);
    cr_assert_eq(pp_sem_acquire(s, 0), -ETIMEDOUT);
    cr_assert_eq(pp_sem_acquire(s, 0.01), -ETIMEDOUT);
    pp_sem_free(s);
}

Test(sem, release_in_one_process_wakes_a_waiter_in_another, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_sem *s = pp_sem_new(0);
    pid_t pid = th_fork();
    if (pid == 0)
        _exit(pp_sem_acquire(s, -1) == 0 ? 0 : 1);
    cr_assert_eq(pp_sem_release(s), 0);
    cr_assert_eq(th_wait(pid), 0);
    cr_assert_eq(pp_sem_acquire(s, 0), -ETIMEDOUT);
    pp_sem_free(s);
}

Test(sem, unit_held_by_a_dead_process_does_not_hang_waiters, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_sem *s = pp_sem_new(1);
    int fds[2];
    th_pipe(fds);
    pid_t pid = th_fork();
    if (pid == 0) {
        th_send(fds[1], pp_sem_acquire(s, -1));
        for (;;)
            pause();
    }
    cr_assert_eq(th_recv(fds[0]), 0);
    th_kill(pid);
    cr_assert_eq(pp_sem_acquire(s, 0.05), -ETIMEDOUT);
    cr_assert_eq(pp_sem_release(s), 0, "usable again");
    cr_assert_eq(pp_sem_acquire(s, 0), 0);
    pp_sem_free(s);
}

/* ---- Condition ------------------------------------------------------------ */

struct box {
    int value;
    int ready;
};

Test(cond, wait_and_notify_across_processes, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    pp_cond *c = pp_cond_new(l);
    struct box *b = pp_shm_alloc(sizeof *b);
    cr_assert(l && c && b);
    pid_t pid[3];
    for (int w = 0; w < 3; w++)
        if ((pid[w] = th_fork()) == 0) {
            if (pp_lock_acquire(l, -1) != 0)
                _exit(1);
            while (!b->ready)
                if (pp_cond_wait(c, -1) != 0)
                    _exit(2);
            int v = b->value;
            pp_lock_release(l);
            _exit(v == 99 ? 0 : 3);
        }
    cr_assert_eq(pp_lock_acquire(l, -1), 0);
    b->value = 99;
    b->ready = 1;
    cr_assert_eq(pp_cond_notify_all(c), 0);
    cr_assert_eq(pp_lock_release(l), 0);
    for (int w = 0; w < 3; w++)
        cr_assert_eq(th_wait(pid[w]), 0);
    pp_cond_free(c);
    pp_lock_free(l);
    pp_shm_free(b);
}

Test(cond, notify_one_at_a_time_hands_out_every_item, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    pp_cond *c = pp_cond_new(l);
    int *items = pp_shm_alloc(sizeof *items);
    pid_t pid[3];
    for (int w = 0; w < 3; w++)
        if ((pid[w] = th_fork()) == 0) {
            pp_lock_acquire(l, -1);
            while (*items == 0)
                pp_cond_wait(c, -1);
            (*items)--;
            pp_lock_release(l);
            _exit(0);
        }
    for (int i = 0; i < 3; i++) {
        pp_lock_acquire(l, -1);
        (*items)++;
        cr_assert_eq(pp_cond_notify(c, 1), 0);
        pp_lock_release(l);
    }
    for (int w = 0; w < 3; w++)
        cr_assert_eq(th_wait(pid[w]), 0);
    cr_assert_eq(*items, 0);
    pp_cond_free(c);
    pp_lock_free(l);
}

Test(cond, timeout_returns_holding_the_lock, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    pp_cond *c = pp_cond_new(l);
    cr_assert_eq(pp_cond_wait(c, 0.01), -EPERM, "lock not held");
    cr_assert_eq(pp_cond_notify(c, 1), -EPERM);
    cr_assert_eq(pp_lock_acquire(l, -1), 0);
    cr_assert_eq(pp_cond_wait(c, 0.02), -ETIMEDOUT);
    cr_assert_eq(pp_cond_wait(c, 0), -ETIMEDOUT);
    cr_assert_eq(pp_lock_acquire(l, 0), -EDEADLK, "held again after the wait");
    cr_assert_eq(pp_cond_notify(c, 0), 0);
    cr_assert_eq(pp_lock_release(l), 0);
    pp_cond_free(c);
    pp_lock_free(l);
}

Test(cond, wait_releases_every_level_of_an_rlock, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_rlock_new();
    pp_cond *c = pp_cond_new(l);
    int *flag = pp_shm_alloc(sizeof *flag);
    for (int i = 0; i < 3; i++)
        pp_lock_acquire(l, -1);
    pid_t pid = th_fork();
    if (pid == 0) {
        /* gets the lock only if the parent's wait released all three levels */
        if (pp_lock_acquire(l, -1) != 0)
            _exit(1);
        *flag = 1;
        pp_cond_notify(c, 1);
        pp_lock_release(l);
        _exit(0);
    }
    while (!*flag)
        cr_assert_eq(pp_cond_wait(c, -1), 0);
    cr_assert_eq(th_wait(pid), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pp_lock_release(l), 0, "level %d restored", i);
    cr_assert_eq(pp_lock_release(l), -EPERM);
    pp_cond_free(c);
    pp_lock_free(l);
}

Test(cond, holder_killed_while_a_waiter_sleeps_gives_eownerdead, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_lock *l = pp_lock_new();
    pp_cond *c = pp_cond_new(l);
    struct pp_cond *raw = (struct pp_cond *)c;
    int fds[2];
    th_pipe(fds);
    pid_t waiter = th_fork();
    if (waiter == 0) {
        pp_lock_acquire(l, -1);
        int rc = pp_cond_wait(c, -1);
        _exit(rc == PP_EOWNERDEAD && pp_lock_release(l) == 0 ? 0 : 1);
    }
    th_wait_word(&raw->waiters, 1); /* the waiter sleeps, the lock is free */
    pid_t holder = th_fork();
    if (holder == 0) {
        pp_lock_acquire(l, -1);
        pp_cond_notify(c, 1);
        th_send(fds[1], 1);
        for (;;)
            pause();
    }
    cr_assert_eq(th_recv(fds[0]), 1);
    th_kill(holder);
    cr_assert_eq(th_wait(waiter), 0);
    pp_cond_free(c);
    pp_lock_free(l);
}

/* ---- Event ------------------------------------------------------------- */

Test(event, set_clear_and_wait_across_processes, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_event *e = pp_event_new();
    cr_assert_not_null(e);
    cr_assert(!pp_event_is_set(e));
    cr_assert_eq(pp_event_wait(e, 0), -ETIMEDOUT);
    cr_assert_eq(pp_event_wait(e, 0.01), -ETIMEDOUT);
    pid_t pid[3];
    for (int w = 0; w < 3; w++)
        if ((pid[w] = th_fork()) == 0)
            _exit(pp_event_wait(e, -1) == 0 && pp_event_is_set(e) ? 0 : 1);
    cr_assert_eq(pp_event_set(e), 0);
    cr_assert_eq(pp_event_set(e), 0, "idempotent");
    for (int w = 0; w < 3; w++)
        cr_assert_eq(th_wait(pid[w]), 0);
    cr_assert_eq(pp_event_wait(e, 0), 0);
    cr_assert_eq(pp_event_clear(e), 0);
    cr_assert(!pp_event_is_set(e));
    pp_event_free(e);
}

Test(event, a_set_while_waiting_counts_even_if_cleared, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_event *e = pp_event_new();
    struct pp_event *raw = (struct pp_event *)e;
    pid_t pid = th_fork();
    if (pid == 0)
        _exit(pp_event_wait(e, -1) == 0 ? 0 : 1);
    th_wait_futex_sleep(pid); /* it waits: the set/clear pair must wake it */
    pp_event_set(e);
    pp_event_clear(e);
    cr_assert_eq(th_wait(pid), 0);
    cr_assert_eq(atomic_load(&raw->word) & 1, 0u);
    pp_event_free(e);
}

/* ---- Barrier ------------------------------------------------------------ */

Test(barrier, returns_each_arrival_index_once_per_round, .timeout = PP_TEST_TIMEOUT(20))
{
    enum { PARTIES = 4, ROUNDS = 50 };
    pp_barrier *b = pp_barrier_new(PARTIES);
    cr_assert_not_null(b);
    _Atomic int *seen = pp_shm_alloc(sizeof(int) * ROUNDS * PARTIES);
    pid_t pid[PARTIES - 1];
    for (int w = 0; w < PARTIES - 1; w++)
        if ((pid[w] = th_fork()) == 0) {
            for (int r = 0; r < ROUNDS; r++) {
                int i = pp_barrier_wait(b, -1);
                if (i < 0 || i >= PARTIES)
                    _exit(1);
                atomic_fetch_add(&seen[r * PARTIES + i], 1);
            }
            _exit(0);
        }
    for (int r = 0; r < ROUNDS; r++) {
        int i = pp_barrier_wait(b, -1);
        cr_assert(i >= 0 && i < PARTIES, "round %d: %d", r, i);
        atomic_fetch_add(&seen[r * PARTIES + i], 1);
    }
    for (int w = 0; w < PARTIES - 1; w++)
        cr_assert_eq(th_wait(pid[w]), 0);
    for (int k = 0; k < ROUNDS * PARTIES; k++)
        cr_assert_eq(atomic_load(&seen[k]), 1, "round %d index %d", k / PARTIES, k % PARTIES);
    pp_barrier_free(b);
}

Test(barrier, one_party_never_waits, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_barrier *b = pp_barrier_new(1);
    cr_assert_eq(pp_barrier_wait(b, -1), 0);
    cr_assert_eq(pp_barrier_wait(b, 0), 0);
    pp_barrier_free(b);
}

Test(barrier, timeout_breaks_it_until_reset, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_barrier *b = pp_barrier_new(2);
    cr_assert_eq(pp_barrier_wait(b, 0.02), PP_EBROKEN);
    cr_assert_eq(pp_barrier_wait(b, -1), PP_EBROKEN, "stays broken");
    cr_assert_eq(pp_barrier_reset(b), 0);
    pid_t pid = th_fork();
    if (pid == 0)
        _exit(pp_barrier_wait(b, -1) >= 0 ? 0 : 1);
    cr_assert_geq(pp_barrier_wait(b, -1), 0);
    cr_assert_eq(th_wait(pid), 0);
    pp_barrier_free(b);
}

Test(barrier, a_waiters_timeout_breaks_it_for_the_others, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_barrier *b = pp_barrier_new(3);
    pid_t pid = th_fork();
    if (pid == 0)
        _exit(pp_barrier_wait(b, -1) == PP_EBROKEN ? 0 : 1);
    cr_assert_eq(pp_barrier_wait(b, 0.05), PP_EBROKEN);
    cr_assert_eq(th_wait(pid), 0);
    pp_barrier_free(b);
}

/* Forks a party that arrives at b and waits, then kills it while it waits,
 * its watch slot held. */
static void kill_a_waiter(pp_barrier *b)
{
    pid_t pid = th_fork();
    if (pid == 0) {
        pp_barrier_wait(b, -1);
        _exit(0);
    }
    th_wait_word(&((struct pp_barrier *)b)->count, 1); /* it has arrived */
    th_wait_futex_sleep(pid);                          /* and waits */
    th_kill(pid);
}

/* Asserts that a round of b's `parties` parties (this process and children)
 * passes. */
static void assert_a_round_passes(pp_barrier *b, int parties)
{
    pid_t pid[8];
    cr_assert_leq(parties, 9);
    for (int i = 0; i < parties - 1; i++)
        if ((pid[i] = th_fork()) == 0)
            _exit(pp_barrier_wait(b, 5) >= 0 ? 0 : 1);
    cr_assert_geq(pp_barrier_wait(b, 5), 0, "works after reset");
    for (int i = 0; i < parties - 1; i++)
        cr_assert_eq(th_wait(pid[i]), 0);
}

Test(barrier, a_party_killed_while_waiting_breaks_it, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_barrier *b = pp_barrier_new(3);
    kill_a_waiter(b);
    cr_assert_eq(pp_barrier_wait(b, -1), PP_EBROKEN, "no hang: the dead party is seen");
    cr_assert_eq(pp_barrier_reset(b), 0);
    assert_a_round_passes(b, 3);
    pp_barrier_free(b);
}

/* The last party to arrive finds a waiter dead: the round breaks. Tripped,
 * it let the survivors on to a round the dead party never comes to. */
Test(barrier, the_last_arrival_finds_a_dead_waiter_and_breaks_it, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_barrier *b = pp_barrier_new(2);
    kill_a_waiter(b);
    cr_assert_eq(pp_barrier_wait(b, 5), PP_EBROKEN, "the dead party's round passes");
    cr_assert_eq(pp_barrier_wait(b, 0), PP_EBROKEN, "stays broken");
    cr_assert_eq(pp_barrier_reset(b), 0);
    assert_a_round_passes(b, 2);
    pp_barrier_free(b);
}

Test(barrier, reset_breaks_current_waiters, .timeout = PP_TEST_TIMEOUT(20))
{
    pp_barrier *b = pp_barrier_new(2);
    struct pp_barrier *raw = (struct pp_barrier *)b;
    pid_t pid = th_fork();
    if (pid == 0)
        _exit(pp_barrier_wait(b, -1) == PP_EBROKEN ? 0 : 1);
    th_wait_word(&raw->count, 1);
    cr_assert_eq(pp_barrier_reset(b), 0);
    cr_assert_eq(th_wait(pid), 0);
    pp_barrier_free(b);
}

/* A party whose round tripped, and which runs again only after many more
 * rounds ended (a stopped or descheduled process), still gets its arrival
 * index. It read how its round ended from a history of 64 rounds, which the
 * later ones had written over: PP_EBROKEN. */
Test(barrier, a_party_that_runs_again_late_still_sees_its_round_trip,
     .timeout = PP_TEST_TIMEOUT(20))
{
    pp_barrier *b = pp_barrier_new(2);
    struct pp_barrier *raw = (struct pp_barrier *)b;
    pid_t late = th_fork();
    if (late == 0)
        _exit(pp_barrier_wait(b, -1) == 0 ? 0 : 1);
    th_wait_word(&raw->count, 1);
    th_wait_futex_sleep(late); /* out of the barrier's lock, waiting */
    cr_assert_eq(kill(late, SIGSTOP), 0);
    cr_assert_eq(pp_barrier_wait(b, 5), 1, "trips the late party's round");
    pid_t other = th_fork(); /* 100 more rounds with a third process */
    if (other == 0) {
        for (int r = 0; r < 100; r++)
            if (pp_barrier_wait(b, 5) < 0)
                _exit(1);
        _exit(0);
    }
    for (int r = 0; r < 100; r++)
        cr_assert_geq(pp_barrier_wait(b, 5), 0, "round %d", r);
    cr_assert_eq(th_wait(other), 0);
    for (int r = 0; r < 100; r++) /* and 100 that end by a reset */
        cr_assert_eq(pp_barrier_reset(b), 0);
    cr_assert_eq(kill(late, SIGCONT), 0);
    cr_assert_eq(th_wait(late), 0, "its round tripped: arrival index 0, not PP_EBROKEN");
    pp_barrier_free(b);
}

/* ---- Bad input ------------------------------------------------------------ */

Test(sync, null_objects_and_bad_arguments, .timeout = PP_TEST_TIMEOUT(20))
{
    cr_assert_eq(pp_lock_acquire(NULL, 0), -EINVAL);
    cr_assert_eq(pp_lock_release(NULL), -EINVAL);
    cr_assert_eq(pp_sem_acquire(NULL, 0), -EINVAL);
    cr_assert_eq(pp_sem_release(NULL), -EINVAL);
    cr_assert_eq(pp_cond_wait(NULL, 0), -EINVAL);
    cr_assert_eq(pp_cond_notify(NULL, 1), -EINVAL);
    cr_assert_eq(pp_cond_notify_all(NULL), -EINVAL);
    cr_assert_eq(pp_event_set(NULL), -EINVAL);
    cr_assert_eq(pp_event_clear(NULL), -EINVAL);
    cr_assert(!pp_event_is_set(NULL));
    cr_assert_eq(pp_event_wait(NULL, 0), -EINVAL);
    cr_assert_eq(pp_barrier_wait(NULL, 0), -EINVAL);
    cr_assert_eq(pp_barrier_reset(NULL), -EINVAL);
    errno = 0;
    cr_assert_null(pp_barrier_new(0));
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_null(pp_cond_new(NULL));
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_null(pp_sem_new(UINT32_MAX));
    cr_assert_eq(errno, EINVAL);
    /* a pointer that is not one of ours (not in the arena, or freed) */
    int junk[32] = {0};
    cr_assert_eq(pp_lock_acquire((pp_lock *)junk, 0), -EINVAL);
    pp_lock *l = pp_lock_new();
    pp_lock_free(l);
    cr_assert_eq(pp_lock_acquire(l, 0), -EINVAL, "freed");
    pp_lock_free(NULL);
    pp_sem_free(NULL);
    pp_cond_free(NULL);
    pp_event_free(NULL);
    pp_barrier_free(NULL);
    pp_sem *s = pp_sem_new(INT32_MAX);
    cr_assert_eq(pp_sem_release(s), -EOVERFLOW);
    pp_sem_free(s);
}

/* ---- with the pool ------------------------------------------------------ */

struct shared {
    int *counter;
    pp_lock *lock;
    pp_barrier *barrier;
};

static int add_10000(const void *arg, void *result)
{
    const struct shared *s = arg;
    (void)result;
    for (int i = 0; i < 10000; i++) {
        if (pp_lock_acquire(s->lock, -1) != 0)
            return 1;
        *s->counter += 1;
        pp_lock_release(s->lock);
    }
    return 0;
}

Test(sync_pool, four_tasks_add_under_one_lock, .timeout = PP_TEST_TIMEOUT(20))
{
    struct shared s = {.counter = pp_shm_alloc(sizeof(int)), .lock = pp_lock_new()};
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
    cr_assert_not_null(pool);
    pp_async *a[4];
    for (int i = 0; i < 4; i++)
        cr_assert_not_null(a[i] =
                               pp_apply_async(pool, add_10000, &s, sizeof s, 0, NULL, NULL, NULL));
    pp_close(pool);
    pp_join(pool);
    for (int i = 0; i < 4; i++) {
        cr_assert(pp_async_successful(a[i]));
        pp_async_free(a[i]);
    }
    cr_assert_eq(*s.counter, 40000);
    pp_pool_free(pool);
}

static int lock_and_die(const void *arg, void *result)
{
    const struct shared *s = arg;
    (void)result;
    pp_lock_acquire(s->lock, -1);
    *s->counter = -1; /* a half-done update */
    raise(SIGKILL);
    return 0;
}

static int lock_and_repair(const void *arg, void *result)
{
    const struct shared *s = arg;
    int rc = pp_lock_acquire(s->lock, 10);
    if (rc == PP_EOWNERDEAD)
        *s->counter = 0; /* repair */
    *(int *)result = rc;
    pp_lock_release(s->lock);
    return 0;
}

Test(sync_pool, a_worker_killed_holding_a_lock_does_not_wedge_the_others,
     .timeout = PP_TEST_TIMEOUT(20))
{
    struct shared s = {.counter = pp_shm_alloc(sizeof(int)), .lock = pp_lock_new()};
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    pp_error err;
    cr_assert_eq(pp_apply(pool, lock_and_die, &s, sizeof s, NULL, 0, &err), PP_ECRASH);
    int rc = 1;
    cr_assert_eq(pp_apply(pool, lock_and_repair, &s, sizeof s, &rc, sizeof rc, &err), 0);
    cr_assert_eq(rc, PP_EOWNERDEAD, "the next acquirer, in another worker, is told");
    cr_assert_eq(*s.counter, 0);
    cr_assert_eq(pp_apply(pool, lock_and_repair, &s, sizeof s, &rc, sizeof rc, &err), 0);
    cr_assert_eq(rc, 0, "and the lock works normally after");
    cr_assert_eq(pp_lock_acquire(s.lock, 0), 0, "in the parent too");
    pp_lock_release(s.lock);
    pp_pool_free(pool);
}

static int meet(const void *arg, void *result)
{
    const struct shared *s = arg;
    *(int *)result = pp_barrier_wait(s->barrier, 10);
    return 0;
}

Test(sync_pool, workers_meet_at_a_barrier, .timeout = PP_TEST_TIMEOUT(20))
{
    struct shared s = {.barrier = pp_barrier_new(3)};
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 3});
    struct shared args[3] = {s, s, s};
    int idx[3] = {-1, -1, -1};
    pp_error err;
    cr_assert_eq(pp_map(pool, meet, args, 3, sizeof s, idx, sizeof(int), 1, &err), 0);
    cr_assert_eq((1 << idx[0]) | (1 << idx[1]) | (1 << idx[2]), 7, "%d %d %d", idx[0], idx[1],
                 idx[2]);
    pp_pool_free(pool);
    pp_barrier_free(s.barrier);
}
