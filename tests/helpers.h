/* Shared helpers for the tests. */
#ifndef PP_TEST_HELPERS_H
#define PP_TEST_HELPERS_H

#include <stdatomic.h>
#include <stdbool.h>

/* A test's time limit (Criterion's .timeout). make check-valgrind builds
 * with a larger scale: under memcheck everything runs 20-50 times slower,
 * and a test cut short there is a test whose memory was not checked. */
#ifndef PP_TEST_TIMEOUT_SCALE
#define PP_TEST_TIMEOUT_SCALE 1
#endif
#define PP_TEST_TIMEOUT(seconds) ((seconds)*PP_TEST_TIMEOUT_SCALE)

int count_fds(void);                          /* open fds of this process */
int count_children(void);                     /* direct children of this process */
int count_threads(void);                      /* threads of this process */
int count_mappings_named(const char *needle); /* lines of /proc/self/maps naming it */
int children_of(int pid, int *out, int max);  /* direct children of pid */
bool process_alive(int pid);                  /* exists and is not a zombie */
bool wait_all_dead(const int *pids, int n, double seconds);

/* Flags in MAP_SHARED memory made before a pool: every worker sees them.
 * Tests use them to hold a task until the test says so (no sleeping on a
 * guess: a task waits for a flag, the test waits for a task's flag). */
struct shared_flags {
    _Atomic int started;
    _Atomic int release;
    _Atomic int count;
    _Atomic int pids[64];
};
struct shared_flags *shared_flags_new(void);
/* Where a test keeps its flags: `#define flags (*shared_flags_slot())`. In a
 * worker of a spawn pool (a fresh process, where the test's globals hold
 * their initial values) it finds the flags its parent made. */
struct shared_flags **shared_flags_slot(void);
void shared_flags_free(struct shared_flags *f);

/* A pointer a test's tasks read, set by the test before it makes a pool:
 * `#define sh (*(struct shared **)test_global("sh"))`, then
 * `sh = test_share("sh", pp_shm_alloc(sizeof *sh))`. Workers of a spawn
 * pool (fresh processes: the test's globals hold their initial values)
 * find it through the environment, so it must point into the arena. */
void **test_global(const char *name);
void *test_share(const char *name, void *p);
void wait_flag(_Atomic int *flag, int value); /* until *flag >= value */

#endif

/* ---- Appended for the reliability tests (chaos, parent death, threads,
 * hostile workers, resources). ---- */
#include <stddef.h>
#include <stdint.h>

double now_s(void);                               /* CLOCK_MONOTONIC seconds */
void flag_wait_ge(_Atomic int *flag, int value);  /* futex sleep until *flag >= value */
void flag_wake(_Atomic int *flag);                /* wakes flag_wait_ge sleepers */
int live_children_of(int pid, int *out, int max); /* children that are not zombies */
int pool_zygote(void);                            /* this process's only child, or -1 */
int count_mappings(void);                         /* lines of /proc/self/maps */
long status_kib(const char *field);               /* a "Vm...: N kB" line of /proc/self/status */
long rss_kib(void);                               /* VmRSS of this process */
void *shared_alloc(size_t bytes);                 /* MAP_SHARED | MAP_ANONYMOUS, zeroed */
void shared_release(void *p, size_t bytes);
/* Live descendants of this process (needs PR_SET_CHILD_SUBREAPER to see
 * orphans of a dead child); reaps the dead ones on the way. */
int live_descendants(int *out, int max);
bool wait_no_descendants(double seconds); /* until none is alive, or false */
uint64_t xorshift64(uint64_t *state);
/* 1, or 20 under make check-valgrind (PP_VALGRIND): deadlines that are
 * promises (1 s after a parent's death) stretch under memcheck's slowness. */
double slow_factor(void);
