/*
 * pool: the parent side's lifecycle, blocking calls and waiting.
 *
 * DESIGN: one mutex guards the parent's books. Whoever waits for something
 * (a blocking pp_map, pp_async_get, pp_iter_next, the library thread) pumps
 * the pool itself; one of the waiters at a time sleeps in poll() on the
 * wake eventfd and the zygote's socket for everyone (the "poller"), the
 * others on a condition variable that the poller broadcasts when it wakes.
 * So there is always exactly one thread watching the workers when anyone
 * waits, and a blocking call needs no other thread to make progress — not
 * even when it is made from inside a callback.
 *
 * The library thread exists for what must happen when nobody waits: async
 * results completing in the background and their callbacks, which it alone
 * runs, outside the mutex, so a callback may call any pool function.
 */
#include "iter.h"
#include "pool.h"
#include "shm.h"
#include "spawn_method.h"
#include "zygote.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAYLOAD_BYTES ((size_t)1 << 30) /* reserved, not committed */
#define MAX_WORKERS   4096

/* ---- jobs ----------------------------------------------------------------- */

/* mu held: it guards the job cache. */
struct pp_job *pp__job_new(pp_pool *pool, pp_fn *fn, size_t n, size_t arg_size, size_t result_size,
                           size_t chunksize, size_t extra)
{
    size_t head = (sizeof(struct pp_job) + 15) & ~(size_t)15;
    if (extra > SIZE_MAX - head)
        return NULL;
    int cls;
    struct pp_job *job = pp__jobcache_take(&pool->jobcache, head + extra, &cls);
    if (job == NULL)
        return NULL;
    job->block_class = (signed char)cls;
    job->extra = extra ? (unsigned char *)job + head : NULL;
    job->pool = pool;
    job->fn = fn;
    job->fncode = (uint64_t)(uintptr_t)fn;
    job->n = n;
    job->arg_size = arg_size;
    job->result_size = result_size;
    job->chunksize = chunksize;
    job->refs = 2; /* the caller's handle and the pool's hold until ready */
    return job;
}

/* Links a new job into the pool's books; mu held. */
static void job_attach(pp_pool *pool, struct pp_job *job)
{
    job->anext = pool->all;
    job->aprev = &pool->all;
    if (pool->all)
        pool->all->aprev = &job->anext;
    pool->all = job;
    pool->stats.submitted += job->n;
}

void pp__job_maybe_free(struct pp_job *job)
{
    if (job->refs > 0 || job->inflight > 0)
        return;
    pp__dequeue(job->pool, job); /* never left behind in the queue */
    if (job->aprev) {
        *job->aprev = job->anext;
        if (job->anext)
            job->anext->aprev = job->aprev;
    }
    free(job->err);
    pp__job_discard(job);
}

/* mu held, or the pool being destroyed. */
void pp__job_discard(struct pp_job *job)
{
    pp__jobcache_give(&job->pool->jobcache, job, job->block_class);
}

void pp__job_error(const struct pp_job *job, pp_error *out)
{
    if (job->nfailed == 0) {
        pp__clear_error(out);
        return;
    }
    if (job->err != NULL) {
        *out = *job->err;
    } else {
        *out = (pp_error){.code = job->err_code, .index = job->err_index};
        snprintf(out->message, sizeof out->message, "%s", pp_strerror(job->err_code));
    }
    out->code = job->err_code;
    out->index = job->err_index;
    out->failed = job->nfailed;
}

void pp__job_unref(struct pp_job *job)
{
    job->refs--;
    pp__job_maybe_free(job);
}

int pp__check_submit(pp_pool *pool)
{
    if (pool->closed || pool->terminated)
        return PP_ECLOSED;
    if (pool->broken)
        return PP_ESPAWN;
    return 0;
}

/* Spawn: names the job's function as the workers will find it; mu held.
 * A loop submitting the same function encodes it once. */
static int encode_fn(pp_pool *pool, struct pp_job *job)
{
    if (job->fn == pool->last_fn && pool->last_fn != NULL) {
        job->fncode = pool->last_code;
        return 0;
    }
    int rc = pp__spawn_encode(pool->objects, job->fn, &job->fncode);
    if (rc < 0)
        return rc;
    pool->last_fn = job->fn;
    pool->last_code = job->fncode;
    return 0;
}

int pp__submit_errno(int rc)
{
    switch (rc) {
    case PP_ECLOSED:
        return ESHUTDOWN;
    case PP_ESPAWN:
        return ECHILD;
    case PP_ENOTFOUND:
        return EFAULT;
    default:
        return rc < 0 && rc > -4096 ? -rc : EINVAL;
    }
}

/* ---- waiting ---------------------------------------------------------------- */

/* The pool whose library thread this is (thread-local: the pump asks it
 * from any thread, before pp_pool_new has even stored the thread's id). */
static _Thread_local const pp_pool *library_thread_of;

bool pp__is_library_thread(const pp_pool *pool)
{
    return library_thread_of == pool;
}

static bool on_library_thread(pp_pool *pool)
{
    return pool->thread_started && pthread_equal(pthread_self(), pool->thread);
}

void pp__notify(pp_pool *pool)
{
    pthread_cond_broadcast(&pool->cond);
    if (pool->poller && !pthread_equal(pool->poller_thread, pthread_self())) {
        uint64_t one = 1;
        ssize_t rc = write(pool->wake_fd, &one, sizeof one);
        (void)rc; /* EAGAIN: already pending */
    }
}

/* The library thread polling in the background waits for nothing in
 * particular (pp__wake_thread wakes it for callbacks; workers wake it when
 * their inboxes run low), so what another thread's pump resolved is no
 * reason to wake it: while a caller submits in a loop, that spares an
 * eventfd write and two context switches per submission. */
void pp__notify_progress(pp_pool *pool)
{
    if (pool->poller && pool->poller_is_background)
        pthread_cond_broadcast(&pool->cond);
    else
        pp__notify(pool);
}

void pp__wake_thread(pp_pool *pool)
{
    uint64_t one = 1;
    ssize_t rc = write(pool->wake_fd, &one, sizeof one);
    (void)rc; /* EAGAIN: already pending */
    pthread_cond_signal(&pool->thread_cond);
    pthread_cond_broadcast(&pool->cond);
}

/* pp__can_progress() without the lock: compares only words of the shared slots
 * (the parent publishes how far it read each outbox there). */
static bool posted_unlocked(pp_pool *pool)
{
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_slot *s = &pool->ctl->slot[id];
        if (atomic_load_explicit(&s->out_tail, memory_order_acquire) !=
            atomic_load_explicit(&s->out_head, memory_order_relaxed))
            return true;
    }
    return false;
}

/* Sleeps in poll() for the whole pool until a worker, the zygote or one of
 * our threads says something, or `until`. mu held on entry and exit. */
static void poll_for_pool(pp_pool *pool, int64_t until)
{
    pool->poller = true;
    pool->poller_thread = pthread_self();
    atomic_store(&pool->ctl->parent_sleeping, 1);
    atomic_thread_fence(memory_order_seq_cst);
    if (!pp__can_progress(pool)) {
        struct pollfd fds[2] = {{.fd = pool->wake_fd, .events = POLLIN},
                                {.fd = pool->zsock, .events = POLLIN}};
        struct timespec ts, *tsp = NULL;
        if (until != PP_FOREVER) {
            int64_t left = until - pp__now_ns();
            if (left < 0)
                left = 0;
            ts.tv_sec = left / 1000000000;
            ts.tv_nsec = left % 1000000000;
            tsp = &ts;
        }
        if (!pool->poller_is_background) /* a caller waits here: see spin_for_activity */
            atomic_store_explicit(&pool->ctl->waiter_cpu, sched_getcpu(), memory_order_relaxed);
        pthread_mutex_unlock(&pool->mu);
        int n = ppoll(fds, pool->zygote_gone ? 1 : 2, tsp, NULL);
        pthread_mutex_lock(&pool->mu);
        atomic_store_explicit(&pool->ctl->waiter_cpu, -1, memory_order_relaxed);
        /* Woken by nothing while workers hold work: their tasks are long, so
         * look less often (up to 64 ms); anything happening resets it. */
        if (n == 0 && !pp__can_progress(pool)) {
            if (pool->busy_poll_ns < PP_BUSY_POLL_MAX_NS)
                pool->busy_poll_ns *= 2;
        } else {
            pool->busy_poll_ns = PP_BUSY_POLL_NS;
        }
        if (fds[1].revents)
            pool->zygote_said = true;
        if (fds[0].revents) {
            uint64_t drain;
            ssize_t rc = read(pool->wake_fd, &drain, sizeof drain);
            (void)rc;
        }
    }
    atomic_store(&pool->ctl->parent_sleeping, 0);
    pool->poller = false;
    pthread_cond_broadcast(&pool->cond);
}

static void cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *mu, int64_t until)
{
    if (until == PP_FOREVER) {
        pthread_cond_wait(cond, mu);
        return;
    }
    struct timespec ts = {.tv_sec = until / 1000000000, .tv_nsec = until % 1000000000};
    pthread_cond_timedwait(cond, mu, &ts);
}

/* How long a poller may sleep: until the next task deadline, and not long
 * while workers hold work (they only wake us when their inbox runs low, so
 * a result finished just before a long task would otherwise wait with it). */
int64_t pp__poll_until(pp_pool *pool)
{
    int64_t until = pp__next_timeout(pool);
    if (pp__busy(pool)) {
        int64_t soon = pp__now_ns() + pool->busy_poll_ns;
        if (soon < until)
            until = soon;
    }
    return until;
}

/* Whether a worker with work (in its inbox, or running) last looked for
 * work on `cpu`: spinning there would only hold it off (more processes than
 * cores). Reads only the slots' atomic words: called without the lock. */
static bool worker_on_cpu(pp_pool *pool, int cpu)
{
    for (int id = 0; id < pool->nworkers; id++) {
        struct pp_slot *s = &pool->ctl->slot[id];
        if (atomic_load_explicit(&s->cpu, memory_order_relaxed) == cpu &&
            (atomic_load_explicit(&s->in_tail, memory_order_relaxed) !=
                 atomic_load_explicit(&s->in_head, memory_order_relaxed) ||
             atomic_load_explicit(&s->busy, memory_order_relaxed)))
            return true;
    }
    return false;
}

/* Spins a little, lock released, while workers are busy: a result that is
 * microseconds away is cheaper to wait for awake than through poll(). On a
 * CPU that such a worker shares (more processes than cores), every turn
 * yields instead, and so does the worker (worker.c wait_for_work): the two
 * hand the CPU to each other, 4 us a round trip, against 17 us through the
 * futex and poll() and 17-24 us for two spins that yield now and then
 * (bench W5 with both pinned to one CPU). */
static void spin_for_activity(pp_pool *pool)
{
    int cpu = sched_getcpu();
    bool shared = cpu >= 0 && worker_on_cpu(pool, cpu);
    atomic_store_explicit(&pool->ctl->waiter_cpu, cpu, memory_order_relaxed);
    pthread_mutex_unlock(&pool->mu);
    int64_t until = pp__now_ns() + PP_SPIN_NS;
    for (unsigned n = 1; !posted_unlocked(pool) && pp__now_ns() < until; n++) {
        for (int i = 0; !shared && i < 32; i++)
            pp__cpu_relax();
        if (shared || n % 8 == 0)
            sched_yield();
        if (n % 8 == 0 && (cpu = sched_getcpu()) >= 0) { /* we may have moved */
            atomic_store_explicit(&pool->ctl->waiter_cpu, cpu, memory_order_relaxed);
            shared = worker_on_cpu(pool, cpu);
        }
    }
    pthread_mutex_lock(&pool->mu);
    atomic_store_explicit(&pool->ctl->waiter_cpu, -1, memory_order_relaxed);
}

static int wait_for(pp_pool *pool, bool (*done)(void *), void *arg, int64_t deadline, bool lean)
{
    bool lib = on_library_thread(pool);
    int rc = 0;
    bool spun = false;
    pool->waiters++;
    for (;;) {
        if (lean)
            pp__pump_lean(pool);
        else
            pp__pump(pool);
        if (done(arg))
            break;
        bool callbacks_due = pool->cbhead != NULL;
        /* A callback waiting on another job's callback: run it here. */
        if (callbacks_due && lib) {
            pp__run_callbacks(pool);
            continue;
        }
        if (pp__now_ns() >= deadline) {
            rc = -ETIMEDOUT;
            break;
        }
        if (!spun && pp__busy(pool) > 0) {
            spun = true;
            spin_for_activity(pool);
            continue;
        }
        spun = false;
        if (lean) { /* before sleeping, a pump that deals to every worker */
            lean = false;
            continue;
        }
        if (pool->poller && pool->poller_is_background) {
            /* The library thread watches for nobody in particular: we take over. */
            pp__notify(pool);
            cond_wait_until(&pool->cond, &pool->mu, deadline);
        } else if (!pool->poller && !callbacks_due) {
            int64_t until = pp__poll_until(pool);
            poll_for_pool(pool, until < deadline ? until : deadline);
        } else {
            /* While callbacks are due, the library thread needs the lock. */
            cond_wait_until(&pool->cond, &pool->mu, deadline);
        }
    }
    /* Only a parked library thread needs this: one napping while a caller
     * pumps would be woken for nothing after every blocking call (an
     * apply loop then pays a context switch per call, bench W5). */
    if (--pool->waiters == 0 && pool->thread_parked)
        pthread_cond_signal(&pool->thread_cond);
    return rc;
}

int pp__wait(pp_pool *pool, bool (*done)(void *), void *arg, int64_t deadline)
{
    return wait_for(pool, done, arg, deadline, false);
}

int pp__wait_lean(pp_pool *pool, bool (*done)(void *), void *arg, int64_t deadline)
{
    return wait_for(pool, done, arg, deadline, true);
}

/* ---- callbacks and the library thread --------------------------------------- */

void pp__run_callbacks(pp_pool *pool)
{
    while (pool->cbhead != NULL) {
        struct pp_job *job = pool->cbhead;
        pool->cbhead = job->cbnext;
        if (pool->cbhead == NULL)
            pool->cbtail = NULL;
        if (!job->orphaned) {
            job->in_callbacks = true;
            pthread_mutex_unlock(&pool->mu);
            if (job->nfailed == 0 && job->callback)
                job->callback(job->results, job->userdata);
            else if (job->nfailed != 0 && job->error_callback) {
                pp_error e;
                pp__job_error(job, &e);
                job->error_callback(&e, job->userdata);
            }
            pthread_mutex_lock(&pool->mu);
            job->in_callbacks = false;
        }
        job->ready = true;
        pp__notify(pool);
        pp__job_unref(job); /* the pool's hold */
    }
}

/* The library thread: runs callbacks, and watches the workers when no
 * caller waits (so async work completes in the background). */
static void *library_thread(void *arg)
{
    pp_pool *pool = arg;
    library_thread_of = pool;
    pthread_mutex_lock(&pool->mu);
    while (!pool->thread_stop) {
        if (pool->cbhead != NULL) {
            pp__run_callbacks(pool);
            continue;
        }
        int64_t caller_until = pool->caller_pump_ns + PP_CALLER_ACTIVE_NS;
        if (pp__now_ns() < caller_until) {
            /* A caller is pumping (an imap loop, apply_async in a loop):
             * stay out of its way, and do not ask workers to wake us, which
             * costs them a system call each; look again when it stops.
             * Before the parking below: parked, the thread would be woken
             * at the end of each blocking call of an apply loop, find the
             * next one begun, park again, and so on, a wake-up per call
             * (bench W5: 25 us a call instead of 1.2). */
            cond_wait_until(&pool->thread_cond, &pool->mu, caller_until);
            continue;
        }
        if (pool->poller || pool->waiters != 0) {
            pool->thread_parked = true; /* a caller polls */
            pthread_cond_wait(&pool->thread_cond, &pool->mu);
            pool->thread_parked = false;
            continue;
        }
        pp__pump(pool);
        if (pool->cbhead != NULL || pool->thread_stop)
            continue;
        int64_t until = pp__poll_until(pool);
        int64_t look = pp__jobcache_decay(&pool->jobcache, pp__now_ns());
        pool->poller_is_background = true;
        poll_for_pool(pool, look < until ? look : until);
        pool->poller_is_background = false;
        pp__pump(pool); /* what woke us */
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

/* ---- creation ----------------------------------------------------------------- */

static int check_options(const pp_options *o)
{
    if (o->workers < 0 || o->workers > MAX_WORKERS)
        return -EINVAL;
    if (isnan(o->task_timeout) || o->task_timeout < 0 || isnan(o->task_soft_timeout) ||
        o->task_soft_timeout < 0)
        return -EINVAL;
    if (o->start != PP_START_FORK && o->start != PP_START_SPAWN)
        return -EINVAL;
    if (o->backend != PP_BACKEND_LOCAL && o->backend != PP_BACKEND_MPI)
        return -EINVAL;
    return 0;
}

static int map_control_block(pp_pool *pool)
{
    pool->ctl_bytes = pp__ctl_size((uint32_t)pool->nworkers);
    pool->map_bytes = pool->ctl_bytes + PAYLOAD_BYTES;
    pool->ctl_fd = memfd_create("procpool-ctl", MFD_CLOEXEC);
    if (pool->ctl_fd < 0)
        return -errno;
    if (ftruncate(pool->ctl_fd, (off_t)pool->map_bytes) < 0)
        return -errno;
    void *p = mmap(NULL, pool->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                   pool->ctl_fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    pool->ctl = p;
    pool->ctl->magic = PP_CTL_MAGIC;
    pool->ctl->nworkers = (uint32_t)pool->nworkers;
    atomic_store(&pool->ctl->waiter_cpu, -1);
    pool->payload.base = (unsigned char *)p + pool->ctl_bytes;
    pool->payload.size = PAYLOAD_BYTES;
    pool->piece_budget = pp__payload_max(&pool->payload) / 4;
    return 0;
}

static bool all_started(void *arg)
{
    pp_pool *pool = arg;
    if (pool->start_failed || pool->zygote_gone)
        return true;
    for (int id = 0; id < pool->nworkers; id++)
        if (pool->w[id].state != PP_WS_READY)
            return false;
    return true;
}

static void release_resources(pp_pool *pool);

static int start_workers(pp_pool *pool)
{
    pool->cfg = (struct pp_worker_cfg){
        .ctl = pool->ctl,
        .wake_fd = pool->wake_fd,
        .timing = pool->opts.task_timeout > 0 || pool->opts.task_soft_timeout > 0,
        .initializer = pool->opts.initializer,
        .initarg = pool->opts.initarg,
        .max_tasks = pool->opts.max_tasks_per_child,
        .max_memory = pool->opts.max_memory_per_child,
        .soft_timeout_ns = (int64_t)(pool->opts.task_soft_timeout * 1e9),
    };
    fflush(NULL); /* what the caller buffered must not be written again by a child */
    int rc = pool->spawned
                 ? pp__spawn_start(&pool->cfg, pool->nworkers, pool->ctl_fd, pool->map_bytes,
                                   &pool->objects, &pool->zygote, &pool->zsock)
                 : pp__zygote_start(&pool->cfg, pool->nworkers, &pool->zygote, &pool->zsock);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&pool->mu);
    pool->starting = true;
    for (int id = 0; id < pool->nworkers; id++)
        pp__respawn(pool, id);
    pp__wait(pool, all_started, pool, PP_FOREVER);
    pool->starting = false;
    bool failed = pool->start_failed || pool->zygote_gone;
    pthread_mutex_unlock(&pool->mu);
    return failed ? -ECHILD : 0;
}

/* PROCPOOL_START: the start method of pools that do not choose one, as
 * Python's set_start_method. 0, or -EINVAL for a value it does not know. */
static int default_start(int *start)
{
    const char *v = getenv("PROCPOOL_START");
    if (v == NULL || *v == '\0' || strcmp(v, "fork") == 0)
        return 0;
    if (strcmp(v, "spawn") != 0)
        return -EINVAL;
    *start = PP_START_SPAWN;
    return 0;
}

PP_API pp_pool *pp_pool_new(const pp_options *opts)
{
    pp_options o = opts ? *opts : (pp_options){0};
    if (pp__spawn_booting()) {
        errno = EBUSY; /* a constructor, in a process spawned for a pool */
        return NULL;
    }
    int rc = o.start == PP_START_FORK ? default_start(&o.start) : 0;
    if (rc == 0)
        rc = check_options(&o);
    if (rc < 0) {
        errno = -rc;
        return NULL;
    }
    if (o.workers == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        o.workers = cpus > 0 ? (int)(cpus > MAX_WORKERS ? MAX_WORKERS : cpus) : 1;
    }
    /* MPI: a serving rank never returns from here; on rank 0 the other
     * ranks are the workers and this process runs none (mpi.c). */
    struct pp_mpi *mpi = NULL;
    bool remote = false;
    if (o.backend == PP_BACKEND_MPI) {
        if ((rc = pp__mpi_open(&o, &mpi)) < 0) {
            errno = -rc;
            return NULL;
        }
        remote = rc == 1;
    }
    if ((rc = pp__shm_init()) < 0) {
        pp__mpi_close(mpi);
        errno = -rc;
        return NULL;
    }
    pp_pool *pool = calloc(1, sizeof *pool);
    if (pool == NULL) {
        pp__mpi_close(mpi);
        return NULL;
    }
    pool->opts = o;
    pool->nworkers = remote ? 0 : o.workers;
    pool->mpi = mpi;
    pool->spawned = !remote && o.start == PP_START_SPAWN;
    pool->busy_poll_ns = PP_BUSY_POLL_NS;
    uint64_t seed = 0x9e3779b97f4a7c15ull ^ (uint64_t)pp__now_ns() ^ ((uint64_t)getpid() << 32);
    for (size_t i = 0; i < PP_GUARD; i++) { /* a pattern no task writes by chance */
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        pool->guard[i] = (unsigned char)(seed >> 56);
    }
    pool->ctl_fd = pool->wake_fd = pool->zsock = -1;
    pthread_mutex_init(&pool->mu, NULL);
    pp__jobcache_init(&pool->jobcache);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&pool->cond, &ca);
    pthread_cond_init(&pool->thread_cond, &ca);
    pthread_condattr_destroy(&ca);
    pool->w = calloc((size_t)o.workers, sizeof *pool->w); /* o.workers > 0 */
    if (pool->w == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    if ((rc = map_control_block(pool)) < 0)
        goto fail;
    pool->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (pool->wake_fd < 0) {
        rc = -errno;
        goto fail;
    }
    if (remote) {
        pool->zygote_gone = true; /* there is none: nothing local to watch */
        if ((rc = pp__mpi_start(pool)) < 0)
            goto fail;
    } else if ((rc = start_workers(pool)) < 0) {
        goto fail;
    }
    if ((rc = -pthread_create(&pool->thread, NULL, library_thread, pool)) < 0)
        goto fail;
    pool->thread_started = true;
    return pool;
fail:
    if (pool->mpi != NULL) {
        pthread_mutex_lock(&pool->mu);
        pool->terminated = pool->closed = true;
        pp__mpi_stop(pool);
        pthread_mutex_unlock(&pool->mu);
    }
    release_resources(pool);
    pp__mpi_close(pool->mpi);
    pp__pool_destroy(pool);
    errno = pp__submit_errno(rc);
    return NULL;
}

/* ---- blocking calls --------------------------------------------------------- */

static bool job_ready(void *arg)
{
    return ((struct pp_job *)arg)->ready;
}

size_t pp__default_chunksize(const pp_pool *pool, size_t n)
{
    size_t per = ((size_t)pool->nworkers + (size_t)pool->remote_workers) * 4;
    size_t c = n / per + (n % per ? 1 : 0);
    return c ? c : 1;
}

/* Runs a map job of these items to the end and reports as pp_map does. The
 * job is made under the pool's lock, which guards the job cache. */
static int run_blocking(pp_pool *pool, pp_fn *fn, bool batch, const void *args, size_t n,
                        size_t arg_size, void *results, size_t result_size, size_t chunksize,
                        pp_error *err)
{
    pthread_mutex_lock(&pool->mu);
    struct pp_job *job = pp__job_new(pool, fn, n, arg_size, result_size, chunksize, 0);
    int rc = job == NULL ? -ENOMEM : pp__check_submit(pool);
    if (rc == 0 && pool->spawned)
        rc = encode_fn(pool, job);
    if (rc < 0) {
        if (job != NULL)
            pp__job_discard(job);
        pthread_mutex_unlock(&pool->mu);
        return pp__call_error(err, rc, n);
    }
    job->batch = batch;
    job->args = args;
    job->results = results;
    job_attach(pool, job);
    if (job->n == 0)
        pp__job_settle(job);
    else
        pp__enqueue(pool, job);
    pp__wait(pool, job_ready, job, PP_FOREVER);
    rc = job->nfailed ? job->err_code : 0;
    if (err != NULL)
        pp__job_error(job, err);
    pp__job_unref(job);
    pthread_mutex_unlock(&pool->mu);
    return rc;
}

static int map_blocking(pp_pool *pool, pp_fn *fn, bool batch, const void *args, size_t n,
                        size_t arg_size, void *results, size_t result_size, size_t chunksize,
                        pp_error *err)
{
    if (pool == NULL || fn == NULL || (args == NULL && arg_size != 0 && n != 0) ||
        (results == NULL && result_size != 0 && n != 0))
        return pp__call_error(err, -EINVAL, n);
    if ((arg_size && n > SIZE_MAX / arg_size) || (result_size && n > SIZE_MAX / result_size))
        return pp__call_error(err, -EINVAL, n);
    return run_blocking(pool, fn, batch, args, n, arg_size, results, result_size,
                        chunksize ? chunksize : pp__default_chunksize(pool, n), err);
}

PP_API int pp_map(pp_pool *pool, pp_fn *fn, const void *args, size_t n, size_t arg_size,
                  void *results, size_t result_size, size_t chunksize, pp_error *err)
{
    return map_blocking(pool, fn, false, args, n, arg_size, results, result_size, chunksize, err);
}

PP_API int pp_map_batch(pp_pool *pool, pp_batch_fn *fn, const void *args, size_t n, size_t arg_size,
                        void *results, size_t result_size, size_t chunksize, pp_error *err)
{
    return map_blocking(pool, pp__batch_as_fn(fn), true, args, n, arg_size, results, result_size,
                        chunksize, err);
}

PP_API int pp_apply(pp_pool *pool, pp_fn *fn, const void *arg, size_t arg_size, void *result,
                    size_t result_size, pp_error *err)
{
    if (pool == NULL || fn == NULL || (arg == NULL && arg_size != 0) ||
        (result == NULL && result_size != 0))
        return pp__call_error(err, -EINVAL, 1);
    return run_blocking(pool, fn, false, arg, 1, arg_size, result, result_size, 1, err);
}

/* ---- asynchronous submission (shared with async.c and iter.c) --------------- */

int pp__submit(pp_pool *pool, struct pp_job *job)
{
    int rc = pp__check_submit(pool);
    if (rc == 0 && pool->spawned)
        rc = encode_fn(pool, job);
    if (rc < 0)
        return rc;
    job_attach(pool, job);
    pool->handles++;
    if (job->iter == NULL && job->n == 0)
        pp__job_settle(job);
    else
        pp__enqueue(pool, job);
    pp__pump_submit(pool);
    return 0;
}

void pp__handle_gone(pp_pool *pool)
{
    pool->handles--;
}

bool pp__pool_dead(pp_pool *pool)
{
    return pool->freed && pool->handles == 0;
}

/* ---- lifecycle --------------------------------------------------------------- */

PP_API int pp_close(pp_pool *pool)
{
    if (pool == NULL)
        return -EINVAL;
    pthread_mutex_lock(&pool->mu);
    pool->closed = true;
    pthread_cond_broadcast(&pool->cond);
    pthread_mutex_unlock(&pool->mu);
    return 0;
}

PP_API int pp_terminate(pp_pool *pool)
{
    if (pool == NULL)
        return -EINVAL;
    pthread_mutex_lock(&pool->mu);
    if (!pool->terminated) {
        pool->terminated = pool->closed = true;
        pp__pump(pool); /* take in what already finished */
        pp__fail_pending(pool, PP_ECLOSED, "the pool was terminated");
        if (pool->mpi != NULL)
            pp__mpi_terminate(pool);
        for (int id = 0; id < pool->nworkers; id++)
            pp__kill_worker(pool, id, PP_ECLOSED);
        pp__wake_thread(pool);
    }
    pthread_mutex_unlock(&pool->mu);
    return 0;
}

/* Items of a queued job not dealt yet. A job stays in the queue after its
 * last piece is taken until the dealer looks again, and on MPI the dealer
 * is the communication thread, which then wakes nobody: count items. */
static size_t undealt(const struct pp_job *job)
{
    if (job->cancelled)
        return 0;
    return job->iter ? pp__iter_undealt(job->iter) : job->n - job->next;
}

/* Every dealt piece has come back, every callback has run. */
static bool drained(void *arg)
{
    pp_pool *pool = arg;
    if (pool->retry.len != 0 || pool->cbhead != NULL)
        return false;
    for (struct pp_job *job = pool->qhead; job; job = job->qnext)
        if (undealt(job) != 0)
            return false;
    for (struct pp_job *job = pool->all; job; job = job->anext)
        if (job->in_callbacks || job->inflight > 0 ||
            (!job->streaming && job->complete && !job->ready))
            return false;
    return true;
}

static bool all_gone(void *arg)
{
    pp_pool *pool = arg;
    return pool->live == 0 || pool->zygote_gone;
}

PP_API int pp_join(pp_pool *pool)
{
    if (pool == NULL)
        return -EINVAL;
    pthread_mutex_lock(&pool->mu);
    if (!pool->closed && !pool->terminated) {
        pthread_mutex_unlock(&pool->mu);
        return -EINVAL;
    }
    if (on_library_thread(pool)) {
        pthread_mutex_unlock(&pool->mu);
        return -EDEADLK; /* a callback cannot wait for every callback to end */
    }
    if (pool->joining) { /* another thread joins: its end is ours */
        while (!pool->joined)
            pthread_cond_wait(&pool->cond, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
        return 0;
    }
    pool->joining = true;
    if (!pool->terminated && !pool->broken) {
        pp__iter_take_rest(pool); /* "every task" includes what iterators have yet to take */
        pp__wait(pool, drained, pool, PP_FOREVER);
    }
    if (pool->mpi != NULL)
        pp__mpi_stop(pool); /* every rank is told to end, and has answered */
    pool->quitting = true;
    for (int id = 0; id < pool->nworkers; id++) {
        atomic_store(&pool->ctl->slot[id].quit, 1);
        pp__ring_wake_worker(&pool->ctl->slot[id]);
    }
    /* Idle workers leave at once. One that cannot (stopped, say) is killed;
     * if the zygote itself does not answer, it is killed too, and its
     * workers die with it: join never hangs on a process that is stuck. */
    if (pp__wait(pool, all_gone, pool, pp__now_ns() + PP_JOIN_GRACE_NS) < 0) {
        for (int id = 0; id < pool->nworkers; id++)
            pp__kill_worker(pool, id, PP_ECLOSED);
        if (pp__wait(pool, all_gone, pool, pp__now_ns() + PP_JOIN_GRACE_NS) < 0) {
            kill(pool->zygote, SIGKILL);
            pp__wait(pool, all_gone, pool, PP_FOREVER);
        }
    }
    /* Callbacks of jobs failed by terminate still run before we return. */
    pp__wait(pool, drained, pool, PP_FOREVER);
    pool->thread_stop = true;
    pp__wake_thread(pool);
    pthread_mutex_unlock(&pool->mu);
    if (pool->thread_started)
        pthread_join(pool->thread, NULL);
    pthread_mutex_lock(&pool->mu);
    pool->thread_started = false;
    pp__zygote_send(pool->zsock, PP_Z_QUIT, 0, 0, 0);
    pthread_mutex_unlock(&pool->mu);
    while (pool->zygote > 0 && waitpid(pool->zygote, NULL, 0) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&pool->mu);
    pool->zygote = 0;
    pool->joined = true;
    pthread_cond_broadcast(&pool->cond);
    pthread_mutex_unlock(&pool->mu);
    return 0;
}

static void release_resources(pp_pool *pool)
{
    if (pool->zygote > 0) { /* only on a failed start */
        if (pool->zsock >= 0)
            pp__zygote_send(pool->zsock, PP_Z_QUIT, 0, 0, 0);
        kill(pool->zygote, SIGKILL);
        while (waitpid(pool->zygote, NULL, 0) < 0 && errno == EINTR)
            ;
        pool->zygote = 0;
    }
    if (pool->zsock >= 0)
        close(pool->zsock);
    if (pool->wake_fd >= 0)
        close(pool->wake_fd);
    if (pool->ctl != NULL)
        munmap(pool->ctl, pool->map_bytes);
    if (pool->ctl_fd >= 0)
        close(pool->ctl_fd);
    pp__spawn_release(pool->objects);
    pool->objects = NULL;
    pool->zsock = pool->wake_fd = pool->ctl_fd = -1;
    pool->ctl = NULL;
    pp__payload_destroy(&pool->payload);
    memset(&pool->payload, 0, sizeof pool->payload);
    free(pool->retry.v);
    pool->retry = (struct pp_retry){0};
}

void pp__pool_destroy(pp_pool *pool)
{
    free(pool->w);
    pp__jobcache_destroy(&pool->jobcache);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cond);
    pthread_cond_destroy(&pool->thread_cond);
    free(pool);
}

PP_API void pp_pool_free(pp_pool *pool)
{
    if (pool == NULL)
        return;
    pthread_mutex_lock(&pool->mu);
    bool closed = pool->closed;
    pthread_mutex_unlock(&pool->mu);
    if (!closed)
        pp_terminate(pool);
    pp_join(pool);
    pthread_mutex_lock(&pool->mu);
    /* Jobs whose handles were freed and that are still in the books
     * (nothing holds them now that every worker is gone). */
    for (struct pp_job *job = pool->all, *next; job; job = next) {
        next = job->anext;
        job->inflight = 0;
        pp__job_maybe_free(job);
    }
    release_resources(pool);
    pp__jobcache_release(&pool->jobcache); /* handles still held give theirs back later */
    pp__mpi_close(pool->mpi);
    pool->mpi = NULL;
    pool->freed = true;
    bool last = pool->handles == 0;
    pthread_mutex_unlock(&pool->mu);
    if (last)
        pp__pool_destroy(pool);
}

PP_API int pp_pool_stats(pp_pool *pool, pp_stats *out)
{
    if (pool == NULL || out == NULL)
        return -EINVAL;
    pthread_mutex_lock(&pool->mu);
    *out = pool->stats;
    out->workers = 0;
    uint64_t queued = 0, running = 0;
    for (struct pp_job *job = pool->qhead; job; job = job->qnext)
        queued += undealt(job);
    for (size_t i = 0; i < pool->retry.len; i++)
        queued += pool->retry.v[(pool->retry.head + i) % pool->retry.cap].count;
    for (int id = 0; pool->ctl && id < pool->nworkers; id++) {
        struct pp_worker *w = &pool->w[id];
        if (w->state == PP_WS_READY || w->state == PP_WS_STARTING)
            out->workers++;
        uint32_t cur = atomic_load(&pool->ctl->slot[id].cur_seq);
        uint32_t item = atomic_load(&pool->ctl->slot[id].cur_item);
        bool busy = atomic_load(&pool->ctl->slot[id].busy) && w->state == PP_WS_READY;
        for (uint32_t pos = w->retired; pos != w->tail; pos++) {
            struct pp_dealt *d = &w->dealt[pos & PP_RING_MASK];
            if (d->done || d->withdrawn || d->abandoned)
                continue;
            /* Items before `copied` are finished, and so are those before
             * the one the worker runs. */
            uint32_t first = d->copied;
            if (busy && pos == cur && item > first && item < d->piece.count)
                first = item;
            uint32_t left = d->piece.count - first;
            if (busy && pos == cur && left > 0) {
                running++;
                left--;
            }
            queued += left;
        }
    }
    out->queued = queued;
    out->running = running;
    if (pool->mpi != NULL)
        pp__mpi_stats(pool, out);
    pthread_mutex_unlock(&pool->mu);
    return 0;
}
