/*
 * pool.h: the parent's books. Shared by the parent-side files (pool.c,
 * dispatch.c, supervise.c, async.c, iter.c); workers never see them.
 *
 * Every field below is guarded by pool->mu unless its comment says so.
 */
#ifndef PP_POOL_H
#define PP_POOL_H

#include "procpool.h"
#include "jobcache.h"
#include "payload.h"
#include "ring.h"
#include "worker.h"

#include <pthread.h>
#include <stdbool.h>
#include <sys/types.h>

struct pp_chunkrec;
struct pp_mpi;

/* One call: a map, an apply (a map of one), or an iterator's stream. A
 * caller may hold hundreds of thousands (one per pp_apply_async), so the
 * small fields share words. */
struct pp_job {
    pp_pool *pool;
    pp_fn *fn;
    uint64_t fncode; /* what descriptors carry: fn, or its PP_FN_CODE (spawn) */
    size_t n;        /* items; grows for a source-fed iterator */
    size_t arg_size, result_size, chunksize;
    const unsigned char *args; /* item i at args + i * arg_size (map jobs) */
    unsigned char *results;    /* item i at results + i * result_size (map jobs) */
    unsigned char *extra;      /* bytes allocated with the job itself */
    size_t next;               /* first item not yet dealt (map jobs) */
    size_t resolved;           /* items finished, either way */
    size_t nfailed;
    size_t inflight; /* pieces of it dealt or waiting in the retry ring */
    /* The lowest-index failure: its code and index here, the whole record
     * (status, message) allocated at the first failure. NULL if that
     * allocation failed: pp__job_error then writes a generic message. */
    size_t err_index;
    pp_error *err;
    int err_code;
    /* refs is at most 2, and short: with the flags below it fills one word,
     * which keeps a pp_apply_async's block in the 256-byte class (a job of
     * 216 bytes took the 512-byte one and cost workload 4 a quarter of its
     * rate: 2.6 -> 2.0 M tasks/s). */
    short refs;              /* the handle, plus one while the pool holds it */
    signed char block_class; /* its block's in pool->jobcache */
    bool batch;              /* fn is a pp_batch_fn (pp_map_batch) */
    bool complete;           /* every item resolved */
    bool ready;              /* complete and its callbacks returned */
    bool cancelled;          /* nothing more of it is dealt */
    bool orphaned;           /* its handle was freed: no callbacks */
    bool in_callbacks;       /* its callbacks are running now */
    bool streaming;          /* an iterator job: never complete, no pool hold */
    bool queued;             /* in the pool's queue (qnext) */
    bool some_cancelled;     /* an item of it failed PP_ECANCELED */
    pp_callback *callback;
    pp_error_callback *error_callback;
    void *userdata;
    struct pp_iter *iter;          /* set for iterator jobs */
    struct pp_job *qnext;          /* the pool's queue of jobs with undealt items */
    struct pp_job *cbnext;         /* the pool's list of callbacks to run */
    struct pp_job *anext, **aprev; /* every live job of the pool */
};

/* A piece of work: `count` consecutive items of a job from `start`. For an
 * iterator job, `rec` is the chunk record holding those items. */
struct pp_piece {
    struct pp_job *job;
    struct pp_chunkrec *rec;
    size_t start;
    uint32_t count;
    uint16_t deaths; /* workers that died holding it without naming an item */
    bool one_by_one; /* a batch job's items after a death inside a call: one per call */
};

/* The parent's copy of one inbox entry: what it dealt, never what the worker
 * says it was. */
struct pp_dealt {
    struct pp_piece piece;
    struct pp_extent extent; /* payload bytes, if not inline or zero-copy */
    bool done;               /* DONE seen, or settled at a death */
    bool withdrawn;          /* taken back by the parent */
    bool abandoned;          /* its items were failed (terminate); waiting for the worker */
    uint32_t nfail;          /* FAIL messages seen */
    uint32_t last_fail;      /* item of the last FAIL */
    uint32_t copied;         /* items before this one were copied out or skipped */
    uint32_t nok;            /* items before `copied` resolved early (harvest) */
    uint32_t run;            /* items per call of a batch task (worker.c run_batch) */
    int64_t posted_ns;       /* when it was dealt (the pump's clock) */
    bool results_in_place;   /* the worker wrote results straight to the caller */
    bool cut_taken;          /* a cancel looked at it (keep_before_cut): `cut` holds */
    uint32_t cut;            /* cancelled: items before it had finished (resolved then) */
    unsigned char *canary;   /* after the results in our payload, or NULL */
    unsigned char *res_addr; /* where the worker wrote them */
};

/* Whether a cancel reached this entry of a cancelled job (keep_before_cut):
 * then its items from `cut` on, however they end (returned, failed, died),
 * fail PP_ECANCELED, and those before it count as they ended. */
static inline bool pp__cut_holds(const struct pp_dealt *d)
{
    return d->piece.job->cancelled && d->cut_taken;
}

enum pp_wstate {
    PP_WS_DOWN = 0, /* no process (not started, dead and not replaced) */
    PP_WS_STARTING, /* spawned or asked for, initializer not finished */
    PP_WS_READY,
    PP_WS_EXITING, /* told to quit, or killed; waiting for the zygote's word */
};

struct pp_worker {
    enum pp_wstate state;
    pid_t pid;
    uint32_t gen;
    uint32_t tail;     /* next inbox position we write */
    bool unwoken;      /* posted to since the last wake-up */
    uint32_t retired;  /* oldest inbox position still ours to settle */
    uint32_t out_head; /* next outbox position we read */
    int kill_code;     /* why we killed it: PP_ETIMEOUT, PP_ECANCELED, PP_ECLOSED; 0: we did not */
    bool succeeded;    /* finished at least one chunk (crash-loop detection) */
    bool was_ready;    /* said READY: it started, whatever happened next */
    unsigned early_deaths;  /* deaths in a row of this slot's workers before any chunk */
    bool given_up;          /* crash loop: this slot is not replaced any more */
    int64_t roused_ns;      /* when it was last woken unasked (dispatch.c rouse_if_unheard) */
    int64_t cancel_at;      /* kill it then if it still runs the cancelled chunk; 0: none */
    uint32_t cancel_seq;    /* the inbox position of that chunk */
    uint32_t cancel_item;   /* the item it ran then: a later one gets its own grace, */
    uint32_t cancel_grants; /* up to PP_CANCEL_GRANTS of them */
    struct pp_dealt dealt[PP_RING];
    /* Per inline buffer: where a guard was last found intact (by a DONE's
     * check), so the next chunk of the same shape need not write it again.
     * Cleared whenever the buffer is posted; NULL: unknown. */
    unsigned char *guard_ok[PP_RING];
};

/* A ring of pieces to run before any queued job: remainders after a death
 * and chunks withdrawn from a busy worker. */
struct pp_retry {
    struct pp_piece *v;
    size_t head, len, cap;
};

struct pp_pool {
    pthread_mutex_t mu;
    pthread_cond_t cond;        /* broadcast whenever something may have finished */
    pthread_cond_t thread_cond; /* the library thread: callbacks due, no waiter left */
    struct pp_ctl *ctl;         /* the control block (MAP_SHARED) */
    size_t ctl_bytes, map_bytes;
    int ctl_fd;
    int wake_fd; /* eventfd: workers and our own threads ring it */
    int zsock;   /* command socket to the zygote */
    pid_t zygote;
    struct pp_worker_cfg cfg; /* what the zygote gives each worker */
    pp_options opts;
    int nworkers;
    struct pp_worker *w;
    struct pp_payload payload;
    size_t piece_budget;           /* payload bytes one piece may take */
    unsigned char guard[PP_GUARD]; /* written after each chunk's results in payload */
    int64_t busy_poll_ns;          /* how long a poller sleeps now while workers hold work */
    int cancels;                   /* workers in a cancel grace period */
    bool spawned;                  /* PP_START_SPAWN: descriptors carry PP_FN_CODEs */
    struct pp_objtab *objects;     /* spawn: the objects those codes name */
    pp_fn *last_fn;                /* spawn: the last function encoded, */
    uint64_t last_code;            /* and its code */

    struct pp_job *qhead, *qtail; /* jobs with undealt items, oldest first */
    struct pp_retry retry;
    struct pp_job *cbhead, *cbtail; /* completed jobs whose callbacks must run */
    struct pp_job *all;             /* every job not yet freed */
    struct pp_jobcache jobcache;    /* blocks of freed small jobs (its own lock) */

    bool closed, terminated, joined, broken, starting, quitting, start_failed;
    bool zygote_gone;
    int handles; /* live pp_async / pp_iter handles: the struct outlives
                    pp_pool_free until the last one is freed */
    bool freed;
    bool joining; /* a thread is inside pp_join (in the padding: nothing hot moves) */
    int live;     /* worker processes not yet reaped */
    bool poller;  /* a thread sleeps in poll() for the pool */
    pthread_t poller_thread;
    bool poller_is_background; /* the library thread polls for nobody in particular */
    int waiters;               /* threads inside pp__wait */
    bool zygote_said;          /* poll() saw the zygote socket readable */
    int64_t zygote_checked;    /* when pp__on_zygote last read it */
    int64_t pump_ns;           /* when the current pump began */
    int64_t caller_pump_ns;    /* when a thread other than the library thread last pumped */
    bool progress;             /* the current pump resolved something */
    int lead;                  /* the worker lean pumps deal to */
    unsigned quick_pumps;      /* submissions dealt by the books since a full pump */
    int64_t collect_ns;        /* when a pump last read every worker's outbox */
    pthread_t thread;          /* the library thread: callbacks, background pumping */
    bool thread_started, thread_stop;
    bool thread_parked; /* the library thread waits for the last waiter to leave */
    pp_stats stats;
    struct pp_mpi *mpi; /* PP_BACKEND_MPI: the ranks that serve this pool (mpi.c) */
    int remote_workers; /* their workers, all ranks together */
};

#define PP_CRASH_LOOP_LIMIT  8          /* deaths in a row with no chunk finished between */
#define PP_CANCEL_GRACE_NS   100000000  /* a cancelled task's time to return by itself */
#define PP_CANCEL_GRANTS     16         /* items taken before a cancel, each with that grace */
#define PP_UNCLAIMED_NS      50000000   /* a lone entry no worker took: dealt again (balance) */
#define PP_BUSY_POLL_NS      1000000    /* a poller's first sleep while workers hold work */
#define PP_BUSY_POLL_MAX_NS  64000000   /* and its longest, when nothing wakes it */
#define PP_JOIN_GRACE_NS     1000000000 /* join's wait for a worker before it kills it */
#define PP_PIECE_DEATH_LIMIT 3          /* such deaths before its first item is charged */
#define PP_SPIN_NS           20000      /* how long a waiter spins before it sleeps */
#define PP_ZYGOTE_CHECK_NS   2000000    /* busy pumps read the zygote at least this often */
#define PP_CALLER_ACTIVE_NS  1000000 /* a caller that pumped this recently keeps the pool going */

/* dispatch.c: moving work between the books and the rings. */
void pp__pump(pp_pool *pool); /* collect, supervise, deal */
/* A submission's pump: most deal by the parent's books alone (no collect). */
void pp__pump_submit(pp_pool *pool);
/* How many events (submissions, items handed back) a caller lets pass
 * between two pumps that read every worker's lines: 8 per worker, at least
 * 16. A pump reads a line of every worker that ran something since, so the
 * interval grows with the workers: on 16 cores, a full pump every 16
 * submissions had cost W4 a third of its rate (1.22 M against 1.81 M
 * tasks/s), and an iterator's pump every 16 items handed back half of W3's
 * (4.8 M against 9.0 M items/s). Inline: it is asked at every submission. */
#define PP_COLLECT_PER_WORKER 8
#define PP_COLLECT_MIN        16
static inline unsigned pp__collect_interval(const pp_pool *pool)
{
    unsigned n = PP_COLLECT_PER_WORKER * (unsigned)pool->nworkers;
    return n > PP_COLLECT_MIN ? n : PP_COLLECT_MIN;
}
/* A pump for a caller who hands out results and pumps again within
 * microseconds (an iterator): it deals to one worker, the lead, a few
 * entries at a time, and takes nothing back for idle workers. When the
 * caller hands out results slower than one worker runs the tasks (tasks of
 * nanoseconds), other workers kept busy would only take CPUs from the
 * caller and the lead (more processes than cores). A caller about to sleep
 * deals to all first (pp__wait_lean), and so does the library thread once
 * the caller has not pumped for PP_CALLER_ACTIVE_NS. */
void pp__pump_lean(pp_pool *pool);
int pp__busy(pp_pool *pool); /* how many workers have work in their inbox */
/* True when a worker posted something the pump will act on. It never says
 * yes to what the pump ignores (a scribbled word in a slot): a poller would
 * spin with the lock held instead of sleeping. */
bool pp__can_progress(pp_pool *pool);
int64_t pp__poll_until(pp_pool *pool); /* how long a poller may sleep */
void pp__enqueue(pp_pool *pool, struct pp_job *job);
void pp__dequeue(pp_pool *pool, struct pp_job *job);
void pp__resolve_fail(struct pp_job *job, struct pp_chunkrec *rec, size_t index, int code,
                      int status, const char *text);
void pp__resolve_ok(struct pp_job *job, size_t count);
void pp__job_settle(struct pp_job *job); /* complete when every item resolved */
void pp__fail_pending(pp_pool *pool, int code, const char *why);
void pp__job_cancel_queued(struct pp_job *job); /* undealt and unclaimed work fails */
int pp__job_cancel(struct pp_job *job);         /* and running items: stop asked, then killed */
void pp__retry_push_front(pp_pool *pool, struct pp_piece p);
void pp__copy_out(struct pp_dealt *d, uint32_t from, uint32_t to, const unsigned char *res);
bool pp__collect(pp_pool *pool, int id);
/* A started chunk whose running item is unknown: what it finished before
 * its last FAIL is kept, the rest runs again. */
void pp__keep_finished(pp_pool *pool, struct pp_dealt *d);
/* An entry that will not run where it was dealt goes back to the retry
 * ring; items already resolved by FAIL messages are not resolved again. */
void pp__requeue_dealt(pp_pool *pool, struct pp_dealt *d);
/* Whether entry d still waits for its worker: false once settled or taken
 * back; an abandoned one (its items failed already) is released here, its
 * worker having answered or died. */
bool pp__dealt_open(pp_pool *pool, struct pp_dealt *d);
void pp__fail_piece(struct pp_piece *p, uint32_t already, int code, const char *why);
void pp__piece_hold(struct pp_piece *p);
void pp__piece_release(pp_pool *pool, struct pp_piece *p);
/* For work that runs elsewhere (MPI ranks): take the next piece to run, as
 * the local dealer does (held; give it back with pp__retry_push_front), and
 * settle one that came back. */
bool pp__next_piece(pp_pool *pool, struct pp_piece *p);
const unsigned char *pp__piece_args(const struct pp_piece *p);
struct pp_item_fail { /* one failed item of a piece that ran elsewhere */
    uint32_t item;    /* inside the piece, increasing */
    int32_t code;     /* 0: it did not run there; run it elsewhere */
    int32_t status;
    char text[256];
};
void pp__piece_done(pp_pool *pool, struct pp_piece *p, const unsigned char *res,
                    const struct pp_item_fail *fails, uint32_t nfail);

/* supervise.c: deaths, timeouts and replacements. */
void pp__zygote_keep_running(pp_pool *pool); /* continue a stopped zygote */
void pp__on_zygote(pp_pool *pool);           /* read what the zygote said */
void pp__check_timeouts(pp_pool *pool, int64_t now);
int64_t pp__next_timeout(pp_pool *pool); /* earliest deadline to wake for */
void pp__kill_worker(pp_pool *pool, int id, int code);
void pp__respawn(pp_pool *pool, int id);

/* pool.c: waiting. Called with mu held; returns with it held. */
int pp__wait(pp_pool *pool, bool (*done)(void *), void *arg, int64_t deadline);
/* As pp__wait, for an iterator: its pumps are lean (pp__pump_lean) while it
 * spins, and it deals to every worker before it sleeps. */
int pp__wait_lean(pp_pool *pool, bool (*done)(void *), void *arg, int64_t deadline);
void pp__wake_thread(pp_pool *pool);
void pp__notify(pp_pool *pool);                  /* wake every waiter, the poller included */
void pp__notify_progress(pp_pool *pool);         /* the same, after a pump resolved something */
bool pp__is_library_thread(const pp_pool *pool); /* the calling thread is pool's own */
void pp__run_callbacks(pp_pool *pool);
/* A batch task travels where a pp_fn does (job->fn, descriptors): jobs with
 * `batch` set call it back as the pp_batch_fn it is (worker.c run_batch). */
static inline pp_fn *pp__batch_as_fn(pp_batch_fn *fn)
{
    return (pp_fn *)(void (*)(void))fn;
}
struct pp_job *pp__job_new(pp_pool *pool, pp_fn *fn, size_t n, size_t arg_size, size_t result_size,
                           size_t chunksize, size_t extra); /* extra: trailing bytes */
void pp__job_unref(struct pp_job *job);
/* Writes the job's lowest-index failure to `out` (zeroes if none). */
void pp__job_error(const struct pp_job *job, pp_error *out); /* mu held: drops one ref */
void pp__job_maybe_free(struct pp_job *job);                 /* mu held: frees it if unreferenced */
void pp__job_discard(struct pp_job *job); /* frees one never attached to the books */
void pp__clear_error(pp_error *err);      /* zeroes it (errors.c) */
/* A call that fails as a whole, no item to blame (refused, a bad argument,
 * a wait that ran out): fills err (may be NULL) so that its message is
 * real, `failed` = the items that did not run. Returns code. */
int pp__call_error(pp_error *err, int code, size_t failed);
int pp__check_submit(pp_pool *pool);               /* 0, PP_ECLOSED or PP_ESPAWN */
int pp__submit(pp_pool *pool, struct pp_job *job); /* mu held: queue it, deal */
int pp__submit_errno(int rc);         /* errno for a constructor whose submission failed with rc */
void pp__handle_gone(pp_pool *pool);  /* mu held: a pp_async/pp_iter was freed */
bool pp__pool_dead(pp_pool *pool);    /* freed, and no handle left */
void pp__pool_destroy(pp_pool *pool); /* frees the struct itself */
size_t pp__default_chunksize(const pp_pool *pool, size_t n);

/* mpi.c: the MPI backend (PP_BACKEND_MPI). Without MPI, pp__mpi_open gives
 * -ENOTSUP and the rest is never called. */
int pp__mpi_open(const pp_options *o, struct pp_mpi **out); /* 1: ranks serve; 0: run
                                                             locally; a serving rank
                                                             never returns */
int pp__mpi_start(pp_pool *pool);      /* the ranks' hellos, the communication thread */
void pp__mpi_kick(pp_pool *pool);      /* mu held: work was queued */
void pp__mpi_terminate(pp_pool *pool); /* mu held: what runs remotely fails PP_ECLOSED */
void pp__mpi_stop(pp_pool *pool);      /* mu held (released meanwhile): ranks told to end */
void pp__mpi_close(struct pp_mpi *m);  /* frees it; finalizes MPI if procpool initialized it */
void pp__mpi_stats(pp_pool *pool, pp_stats *out); /* mu held: adds the remote part */

#endif
