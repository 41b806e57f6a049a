/*
 * procpool: a pool of persistent worker processes for C, after Python's
 * multiprocessing.Pool. This header is the library's whole public surface.
 *
 * Conventions (hold for every call below unless its comment says otherwise):
 *  - A call that can fail returns int: 0 on success, a negative code otherwise
 *    (a negative errno value such as -EINVAL, or one of the PP_E* codes).
 *    pp_strerror() names any code.
 *  - Constructors return NULL and set errno.
 *  - Timeouts are seconds as double: negative waits forever, 0 only polls.
 *  - Every pp_error * may be NULL; every *_free accepts NULL.
 *  - Pool calls are made in the process that created the pool ("the parent"),
 *    from any of its threads. Task functions run in worker processes.
 *
 * What crosses to a worker: procpool copies arg_size bytes of each argument.
 * A pointer inside an argument is valid in a worker only if it points into
 * memory that existed when the pool was made (fork copied it) or into the
 * shared arena (pp_shm_alloc), which is valid everywhere, at any time.
 */
#ifndef PROCPOOL_H
#define PROCPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define PP_API          __attribute__((visibility("default")))
#define PP_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define PP_API
#define PP_PRINTF(f, a)
#endif

typedef struct pp_pool pp_pool;   /* the pool */
typedef struct pp_async pp_async; /* Python's AsyncResult / MapResult */
typedef struct pp_iter pp_iter;   /* what imap / imap_unordered return */

/* A task. Runs in a worker. `arg` points at a copy of the caller's arg_size
 * bytes, `result` at result_size zeroed bytes that travel back. 0 = success;
 * any other value fails this task (code PP_ETASK, status = that value). */
typedef int pp_fn(const void *arg, void *result);

/* Inside a task: record a message for the caller, then
 * `return pp_fail(status, ...)`. Returns `status`. Outside a worker it only
 * returns `status`. The message is cut at 255 bytes. */
PP_API int pp_fail(int status, const char *fmt, ...) PP_PRINTF(2, 3);

enum {                         /* the library's own codes; all negative, distinct from -errno */
       PP_ETASK = -10001,      /* the task returned non-zero                           */
       PP_ECRASH = -10002,     /* the worker died while running it (signal in status)  */
       PP_ETIMEOUT = -10003,   /* the task ran past options.task_timeout and was killed */
       PP_ECLOSED = -10004,    /* the pool was closed or terminated                    */
       PP_EOWNERDEAD = -10005, /* lock acquired, but its last holder died holding it   */
       PP_ECANCELED = -10006,  /* the task was cancelled (pp_async_cancel)             */
       PP_EBROKEN = -10007,    /* a barrier broken by a timeout or a dead party        */
       PP_ESPAWN = -10008,     /* workers kept dying before finishing any task, so the
                                  pool stopped replacing them (a crash loop)           */
       PP_ENOTFOUND = -10009,  /* a function pointer that no loaded object contains    */
};

/* Names any code this library returns (its own and negative errno values).
 * Never NULL; the string is static. */
PP_API const char *pp_strerror(int code);

typedef struct pp_error {
    int code;          /* PP_ETASK, PP_ECRASH, PP_ETIMEOUT, ...                 */
    int status;        /* the task's return value, or the signal that killed it */
    size_t index;      /* the item (map / imap) that failed; lowest one for map */
    size_t failed;     /* how many items failed (map)                          */
    char message[256]; /* from pp_fail, or written by the library              */
} pp_error;

enum { PP_START_FORK = 0, PP_START_SPAWN = 1 };
enum { PP_BACKEND_LOCAL = 0, PP_BACKEND_MPI = 1 };

typedef struct pp_options {            /* zero = default, so (pp_options){.workers = 4} works */
    int workers;                       /* 0: number of online CPUs                        */
    int (*initializer)(void *initarg); /* runs once in every worker, before tasks;
                                          non-zero fails the worker                      */
    void *initarg;
    unsigned long max_tasks_per_child; /* 0: no limit; then the worker is replaced */
    double task_timeout;               /* seconds; 0: none. Past it: kill, PP_ETIMEOUT   */
    double task_soft_timeout;          /* seconds: after it pp_task_should_stop() is true */
    size_t max_memory_per_child;       /* bytes of resident memory: past it, after a task,
                                          the worker is replaced; 0: no limit           */
    int start;                         /* PP_START_FORK (0, default) | PP_START_SPAWN     */
    int backend;                       /* PP_BACKEND_LOCAL (0, default) | PP_BACKEND_MPI  */
} pp_options;

/* Creates a pool and waits until every worker has run its initializer.
 * opts may be NULL (all defaults). Returns NULL with errno set on failure:
 * EINVAL (bad options), ENOMEM, ECHILD (the initializer failed in a worker,
 * or a worker died while starting), or the errno of a failed system call.
 * Call from the parent process, any thread.
 * PP_BACKEND_MPI (docs/distributed.md): every MPI rank calls it; rank 0 gets
 * the pool, every other rank serves it and never returns (its process ends
 * with MPI_Finalize and exit(0) when rank 0 frees the pool). ENOTSUP: built
 * without MPI, or MPI initialized by the program below
 * MPI_THREAD_SERIALIZED; EALREADY: a second MPI pool in one run.
 * start = PP_START_SPAWN: the workers come from a fresh run of this program
 * (the library takes it over before main), not from a copy of the caller;
 * functions cross as (loaded object, offset), and one in no object is
 * PP_ENOTFOUND at submission (EFAULT from the calls that return NULL);
 * initarg must be NULL, in the arena, or in a loaded object's static data
 * (else EINVAL). start = 0 reads PROCPOOL_START ("fork" | "spawn"). */
PP_API pp_pool *pp_pool_new(const pp_options *opts);
/* No more submissions; queued work still runs, and iterators made before
 * go on taking items from their input. Idempotent. */
PP_API int pp_close(pp_pool *pool);
/* After close/terminate: wait for every task, every callback and every
 * worker to end. -EINVAL before pp_close or pp_terminate. After close,
 * "every task" includes the items an open iterator has not taken yet: join
 * takes them all (past the window; see pp_imap_source), runs them, and the
 * iterator hands them back after. Several threads may join at once. */
PP_API int pp_join(pp_pool *pool);
/* Stop now: every unfinished task, queued or running, fails PP_ECLOSED, and
 * the workers (with any children they forked) are killed. Items an
 * iterator takes from its input afterwards fail PP_ECLOSED as it takes
 * them: each still comes back once, in its place. */
PP_API int pp_terminate(pp_pool *pool);
/* Terminates and joins if still needed, then releases everything: no
 * process, thread, fd or mapping of the pool remains. Accepts NULL. Every
 * pp_async and pp_iter of the pool must be freed before or after; their
 * work fails PP_ECLOSED. Do not call from a callback of the same pool. */
PP_API void pp_pool_free(pp_pool *pool);
/* 0..workers-1 inside a worker, -1 elsewhere. */
PP_API int pp_worker_id(void);

/* Blocking. Results of items that succeeded are always written, even when
 * others fail (a failed item's result slot is left as it was; in a results
 * array in the shared arena, which workers write in place, it holds zeros
 * and whatever the task wrote before it failed).
 * chunksize 0 = CPython's rule: ceil(n / (4 * workers)). err may be NULL.
 * Returns 0, or the code of the lowest-index failing item (err says which
 * item, its status and message, and how many failed). Thread-safe. */
PP_API int pp_map(pp_pool *pool, pp_fn *fn, const void *args, size_t n, size_t arg_size,
                  void *results, size_t result_size, size_t chunksize, pp_error *err);
PP_API int pp_apply(pp_pool *pool, pp_fn *fn, const void *arg, size_t arg_size, void *result,
                    size_t result_size, pp_error *err);

/* Asynchronous. Callbacks run in one library thread of the calling process,
 * never in a worker; `result` holds 1 result (apply) or n results (map),
 * valid during the call. A callback may call any pool function. The
 * arguments are copied at submission: the caller's buffer may be reused at
 * once. Returns NULL with errno on failure (EINVAL, ENOMEM, ESHUTDOWN when
 * the pool is closed); then no callback is ever called. */
typedef void pp_callback(const void *result, void *userdata);
typedef void pp_error_callback(const pp_error *err, void *userdata);

PP_API pp_async *pp_apply_async(pp_pool *pool, pp_fn *fn, const void *arg, size_t arg_size,
                                size_t result_size, pp_callback *callback,
                                pp_error_callback *error_callback, void *userdata);
PP_API pp_async *pp_map_async(pp_pool *pool, pp_fn *fn, const void *args, size_t n, size_t arg_size,
                              size_t result_size, size_t chunksize, pp_callback *callback,
                              pp_error_callback *error_callback, void *userdata);
/* 0 when ready, -ETIMEDOUT if not ready in time. */
PP_API int pp_async_wait(pp_async *a, double timeout);
/* Waits, then copies the result(s) (result_size, or n * result_size for a
 * map) into `result` and returns 0, or returns the failure's code with `err`
 * filled (successful results of a map are still copied). -ETIMEDOUT if not
 * ready in time. */
PP_API int pp_async_get(pp_async *a, void *result, double timeout, pp_error *err);
PP_API bool pp_async_ready(pp_async *a);
PP_API bool pp_async_successful(pp_async *a); /* false until ready        */
/* May be called before it is ready: the work still queued for it is
 * cancelled and its callbacks will not be called after this returns. */
PP_API void pp_async_free(pp_async *a);

/* Iterators: pp_imap yields in input order, pp_imap_unordered as results arrive.
 * pp_iter_next: 1 = one item (its result in *result, its input position in *index),
 * 0 = no more items, negative = this item failed (err says which; iteration goes on)
 * or -ETIMEDOUT (nothing ready in time; iteration goes on). `args` must stay
 * valid until the iterator is freed. chunksize 0 means 1. */
PP_API pp_iter *pp_imap(pp_pool *pool, pp_fn *fn, const void *args, size_t n, size_t arg_size,
                        size_t result_size, size_t chunksize);
PP_API pp_iter *pp_imap_unordered(pp_pool *pool, pp_fn *fn, const void *args, size_t n,
                                  size_t arg_size, size_t result_size, size_t chunksize);
PP_API int pp_iter_next(pp_iter *it, void *result, size_t *index, double timeout, pp_error *err);
/* Frees the iterator; the work still queued for it is cancelled. */
PP_API void pp_iter_free(pp_iter *it);

/* ---- Shared state ------------------------------------------------------
 * Every object below lives in the shared arena, so a pointer to it can be
 * passed inside a task's argument and used in any worker, whenever it was
 * made. Each may be used from the parent and from workers. */

/* Zeroed memory at the same address in every process of the pool family;
 * callable in the parent and in workers. NULL with errno ENOMEM when the
 * arena is exhausted, EINVAL for size 0. */
PP_API void *pp_shm_alloc(size_t size);
PP_API void pp_shm_free(void *p);
/* Sets how many bytes of address space the arena reserves (default 4 GiB).
 * Only before the arena exists (before the first pp_pool_new or
 * pp_shm_alloc of the process): -EBUSY after. */
PP_API int pp_shm_reserve(size_t bytes);

typedef struct pp_lock pp_lock; /* Lock; RLock with pp_rlock_new */
PP_API pp_lock *pp_lock_new(void);
PP_API pp_lock *pp_rlock_new(void); /* the holder may acquire again (counted) */
/* 0 | -ETIMEDOUT | PP_EOWNERDEAD: acquired, but its last holder died holding
 * it | -EDEADLK: a plain lock, already held by the caller. The holder is a
 * thread of a process. */
PP_API int pp_lock_acquire(pp_lock *l, double timeout);
PP_API int pp_lock_release(pp_lock *l); /* -EPERM if the caller does not hold it */
PP_API void pp_lock_free(pp_lock *l);

typedef struct pp_sem pp_sem;
PP_API pp_sem *pp_sem_new(unsigned value);
PP_API int pp_sem_acquire(pp_sem *s, double timeout);
PP_API int pp_sem_release(pp_sem *s);
PP_API void pp_sem_free(pp_sem *s);

typedef struct pp_cond pp_cond; /* Condition over a pp_lock the caller holds */
PP_API pp_cond *pp_cond_new(pp_lock *lock);
/* Releases every level of an rlock while waiting; PP_EOWNERDEAD as
 * pp_lock_acquire. */
PP_API int pp_cond_wait(pp_cond *c, double timeout);
PP_API int pp_cond_notify(pp_cond *c, unsigned n);
PP_API int pp_cond_notify_all(pp_cond *c);
PP_API void pp_cond_free(pp_cond *c);

typedef struct pp_event pp_event;
PP_API pp_event *pp_event_new(void);
PP_API int pp_event_set(pp_event *e);
PP_API int pp_event_clear(pp_event *e);
PP_API bool pp_event_is_set(pp_event *e);
PP_API int pp_event_wait(pp_event *e, double timeout);
PP_API void pp_event_free(pp_event *e);

typedef struct pp_barrier pp_barrier;
PP_API pp_barrier *pp_barrier_new(unsigned parties);
/* 0..parties-1: arrival order; a timeout or a dead party breaks it, as
 * Python's: every waiter gets PP_EBROKEN. */
PP_API int pp_barrier_wait(pp_barrier *b, double timeout);
PP_API int pp_barrier_reset(pp_barrier *b);
PP_API void pp_barrier_free(pp_barrier *b);

typedef struct pp_queue pp_queue; /* messages of any length, first in first out */
/* capacity: message bytes it can hold, the library's own overhead not counted */
PP_API pp_queue *pp_queue_new(size_t capacity);
/* -EMSGSIZE if len > capacity */
PP_API int pp_queue_put(pp_queue *q, const void *msg, size_t len, double timeout);
/* -EMSGSIZE if cap is too small: *len says the length needed, and the
 * message stays queued. -EBADMSG if the queue's shared memory was corrupted
 * (the bad record is dropped; the queue goes on). */
PP_API int pp_queue_get(pp_queue *q, void *buf, size_t cap, size_t *len, double timeout);
PP_API void pp_queue_free(pp_queue *q);

/* ---- Beyond Python ----------------------------------------------------- */

/* queued: never runs; running: its worker is killed and replaced;
 * -EALREADY if finished. The task fails PP_ECANCELED. */
PP_API int pp_async_cancel(pp_async *a);
/* In a task: cancel asked, or soft limit passed. false outside a task. */
PP_API bool pp_task_should_stop(void);

typedef int pp_source(void *state, void *arg); /* fill *arg: 1 = an item, 0 = end   */
/* At most `window` items taken from the source and not yet handed back.
 * The source is called only from pp_imap_source, pp_iter_next and pp_join
 * (which takes every item left, the window aside), in the calling thread,
 * one call at a time. window 0 chooses a default. */
PP_API pp_iter *pp_imap_source(pp_pool *pool, pp_fn *fn, pp_source *source, void *state,
                               size_t arg_size, size_t result_size, size_t chunksize, size_t window,
                               bool ordered);

/* A batch task: runs `count` (>= 1) consecutive items of a map in one call.
 * Their arguments are at `args` (count * arg_size bytes), their results go
 * to `results` (count * result_size zeroed bytes); each is NULL when its
 * size is 0. 0 = every item of the call succeeded, but those failed with
 * pp_fail_item; any other value fails every item of the call (PP_ETASK,
 * status = that value, the message from pp_fail). */
typedef int pp_batch_fn(const void *args, void *results, size_t count);
/* Inside a batch task: item k of its call (0 <= k < count) fails with
 * `status` (non-zero) and this message, while the call's other items keep
 * their results if the call returns 0 (if it returns non-zero, they fail
 * with that). Returns `status`. Ignored for k out of range or status 0,
 * and outside a batch task, where it only returns `status`. */
PP_API int pp_fail_item(size_t k, int status, const char *fmt, ...) PP_PRINTF(3, 4);
/* pp_map and pp_map_async with a batch task, for items of a few nanoseconds:
 * the loop over them is the task's own (no call per item, and the compiler
 * may vectorize it). Each call gets a run of consecutive items of one chunk,
 * a sixteenth of it (rounded up); fewer where an idle worker took the rest
 * of a chunk, which then runs in sixteenths of its own. task_timeout and
 * the soft limit count per call. A worker that dies inside a call, or is
 * killed for its time limit: the items of that call run again one per call
 * (those that had finished run twice: a batch task's items must be safe to
 * repeat), so that a crash or a timeout fails the one item that causes it
 * on its own, and no other. A write past the results is caught for the
 * chunk, not for the call: the items of the chunk not copied back yet fail
 * -EOVERFLOW. Same arguments, return values and errors as pp_map and
 * pp_map_async. */
PP_API int pp_map_batch(pp_pool *pool, pp_batch_fn *fn, const void *args, size_t n, size_t arg_size,
                        void *results, size_t result_size, size_t chunksize, pp_error *err);
PP_API pp_async *pp_map_batch_async(pp_pool *pool, pp_batch_fn *fn, const void *args, size_t n,
                                    size_t arg_size, size_t result_size, size_t chunksize,
                                    pp_callback *callback, pp_error_callback *error_callback,
                                    void *userdata);

typedef struct pp_stats {
    uint64_t submitted, completed, failed, crashed, timed_out, cancelled, respawned;
    uint64_t queued, running;
    int workers;
} pp_stats;
PP_API int pp_pool_stats(pp_pool *pool, pp_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* PROCPOOL_H */
