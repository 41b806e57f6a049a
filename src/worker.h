/*
 * worker: the loop a worker process runs. Knows the control block, never
 * the parent's books (pool.c).
 */
#ifndef PP_WORKER_H
#define PP_WORKER_H

#include "ring.h"

#include <stdbool.h>
#include <stddef.h>

struct pp_objtab;

struct pp_worker_cfg {
    struct pp_ctl *ctl;
    int wake_fd; /* the parent's eventfd */
    bool timing; /* stamp item_start (a timeout is set) */
    int (*initializer)(void *);
    void *initarg;
    unsigned long max_tasks; /* chunks before the worker retires; 0: none */
    size_t max_memory;       /* resident bytes past which it retires; 0: none */
    int64_t soft_timeout_ns; /* pp_task_should_stop() after this; 0: none */
    /* Spawn: the objects that descriptors' PP_FN_CODEs name (spawn_method.h); NULL
     * under fork, where descriptors carry addresses. */
    const struct pp_objtab *objects;
};

/* Runs worker `id` of `cfg` until it is told to quit or retires. Never
 * returns: ends the process with _exit(). Exit status 0 means a clean
 * retirement (quit, max_tasks, max_memory); 3 means the initializer failed. */
_Noreturn void pp__worker_main(const struct pp_worker_cfg *cfg, int id);

#define PP_EXIT_INITFAIL 3

#endif
