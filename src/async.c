/*
 * async: pp_apply_async / pp_map_async and the pp_async handle (Python's
 * AsyncResult and MapResult).
 *
 * DESIGN: a pp_async is a job of the parent's books with its arguments
 * copied at submission (the caller may reuse its buffer at once) and its
 * results kept in memory the job owns, so the callback, pp_async_get and a
 * late reader all see the same bytes. The handle and the pool each hold a
 * reference; whichever lets go last frees the job.
 */
#include "pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct pp_async {
    struct pp_job *job;
};

/* Arguments of more bytes are copied with the pool's lock let go, so that a
 * big pp_map_async does not hold up the caller's other threads and the
 * library thread. */
#define COPY_LOCKED_MAX 4096

/* A pp_apply_async of up to 16 bytes of argument and 16 of result takes a
 * 256-byte block of the job cache: the job (rounded to 16), the handle, the
 * argument, the result. One byte more in pp_job and it takes a 512-byte
 * block, which cost workload 4 a quarter of its rate (cbec8ab). */
_Static_assert(((sizeof(struct pp_job) + 15) & ~(size_t)15) + 16 + 16 + 16 <= 256,
               "pp_job has outgrown the apply_async block");

static pp_async *submit_async(pp_pool *pool, pp_fn *fn, bool batch, const void *args, size_t n,
                              size_t arg_size, size_t result_size, size_t chunksize,
                              pp_callback *callback, pp_error_callback *error_callback,
                              void *userdata)
{
    if (pool == NULL || fn == NULL || (args == NULL && arg_size != 0 && n != 0) ||
        (arg_size && n > SIZE_MAX / arg_size) || (result_size && n > SIZE_MAX / result_size)) {
        errno = EINVAL;
        return NULL;
    }
    /* One block: the job, then the handle, the arguments and the results. */
    size_t abytes = n * arg_size, rbytes = n * result_size;
    size_t hbytes = (sizeof(pp_async) + 15) & ~(size_t)15, aspan = (abytes + 15) & ~(size_t)15;
    if (aspan > SIZE_MAX - hbytes - rbytes) {
        errno = ENOMEM;
        return NULL;
    }
    /* The job cache is the pool's lock's: the job is made under it. */
    pthread_mutex_lock(&pool->mu);
    struct pp_job *job =
        pp__job_new(pool, fn, n, arg_size, result_size, chunksize, hbytes + aspan + rbytes);
    if (job == NULL) {
        pthread_mutex_unlock(&pool->mu);
        errno = ENOMEM;
        return NULL;
    }
    pp_async *a = (pp_async *)job->extra;
    job->batch = batch;
    job->args = job->extra + hbytes;
    job->results = rbytes ? job->extra + hbytes + aspan : NULL;
    job->callback = callback;
    job->error_callback = error_callback;
    job->userdata = userdata;
    a->job = job;
    if (abytes > COPY_LOCKED_MAX) { /* nobody else sees the job yet */
        pthread_mutex_unlock(&pool->mu);
        memcpy(job->extra + hbytes, args, abytes);
        pthread_mutex_lock(&pool->mu);
    } else if (abytes != 0) {
        memcpy(job->extra + hbytes, args, abytes);
    }
    int rc = pp__submit(pool, job);
    if (rc < 0)
        pp__job_discard(job);
    pthread_mutex_unlock(&pool->mu);
    if (rc < 0) {
        errno = pp__submit_errno(rc);
        return NULL;
    }
    return a;
}

PP_API pp_async *pp_apply_async(pp_pool *pool, pp_fn *fn, const void *arg, size_t arg_size,
                                size_t result_size, pp_callback *callback,
                                pp_error_callback *error_callback, void *userdata)
{
    return submit_async(pool, fn, false, arg, 1, arg_size, result_size, 1, callback, error_callback,
                        userdata);
}

PP_API pp_async *pp_map_async(pp_pool *pool, pp_fn *fn, const void *args, size_t n, size_t arg_size,
                              size_t result_size, size_t chunksize, pp_callback *callback,
                              pp_error_callback *error_callback, void *userdata)
{
    if (pool != NULL && chunksize == 0)
        chunksize = pp__default_chunksize(pool, n);
    return submit_async(pool, fn, false, args, n, arg_size, result_size, chunksize, callback,
                        error_callback, userdata);
}

PP_API pp_async *pp_map_batch_async(pp_pool *pool, pp_batch_fn *fn, const void *args, size_t n,
                                    size_t arg_size, size_t result_size, size_t chunksize,
                                    pp_callback *callback, pp_error_callback *error_callback,
                                    void *userdata)
{
    if (pool != NULL && chunksize == 0)
        chunksize = pp__default_chunksize(pool, n);
    return submit_async(pool, pp__batch_as_fn(fn), true, args, n, arg_size, result_size, chunksize,
                        callback, error_callback, userdata);
}

static bool ready(void *arg)
{
    return ((struct pp_job *)arg)->ready;
}

PP_API int pp_async_wait(pp_async *a, double timeout)
{
    if (a == NULL)
        return -EINVAL;
    pp_pool *pool = a->job->pool;
    pthread_mutex_lock(&pool->mu);
    int rc = a->job->ready ? 0 : pp__wait(pool, ready, a->job, pp__deadline(timeout));
    pthread_mutex_unlock(&pool->mu);
    return rc;
}

PP_API int pp_async_get(pp_async *a, void *result, double timeout, pp_error *err)
{
    if (a == NULL || (result == NULL && a->job->result_size != 0 && a->job->n != 0))
        return pp__call_error(err, -EINVAL, 0);
    int rc = pp_async_wait(a, timeout);
    if (rc < 0)
        return pp__call_error(err, rc, 0);
    struct pp_job *job = a->job;
    /* Ready: nothing writes the job any more. */
    size_t rbytes = job->n * job->result_size;
    if (rbytes != 0)
        memcpy(result, job->results, rbytes);
    if (err != NULL)
        pp__job_error(job, err);
    return job->nfailed ? job->err_code : 0;
}

PP_API bool pp_async_ready(pp_async *a)
{
    if (a == NULL)
        return false;
    pp_pool *pool = a->job->pool;
    pthread_mutex_lock(&pool->mu);
    if (!a->job->ready && pool->ctl != NULL)
        pp__pump(pool);
    bool r = a->job->ready;
    pthread_mutex_unlock(&pool->mu);
    return r;
}

PP_API bool pp_async_successful(pp_async *a)
{
    if (a == NULL || !pp_async_ready(a))
        return false;
    return a->job->nfailed == 0;
}

static bool not_in_callbacks(void *arg)
{
    return !((struct pp_job *)arg)->in_callbacks;
}

PP_API int pp_async_cancel(pp_async *a)
{
    if (a == NULL)
        return -EINVAL;
    pp_pool *pool = a->job->pool;
    pthread_mutex_lock(&pool->mu);
    int rc = pp__job_cancel(a->job);
    pthread_mutex_unlock(&pool->mu);
    return rc;
}

PP_API void pp_async_free(pp_async *a)
{
    if (a == NULL)
        return;
    struct pp_job *job = a->job;
    pp_pool *pool = job->pool;
    pthread_mutex_lock(&pool->mu);
    if (!job->ready) {
        job->orphaned = true; /* no callback starts from now on */
        if (pool->ctl != NULL)
            pp__job_cancel_queued(job);
        /* One that has started finishes first, unless we are inside it. */
        if (job->in_callbacks && !pthread_equal(pthread_self(), pool->thread))
            pp__wait(pool, not_in_callbacks, job, PP_FOREVER);
    }
    pp__job_unref(job); /* the handle lives in the job's block: not touched after */
    pp__handle_gone(pool);
    bool dead = pp__pool_dead(pool);
    pthread_mutex_unlock(&pool->mu);
    if (dead)
        pp__pool_destroy(pool);
}
