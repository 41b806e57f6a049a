/*
 * zygote: the single-threaded helper process that forks, kills and reaps
 * the workers of one pool.
 */
#ifndef PP_ZYGOTE_H
#define PP_ZYGOTE_H

#include "worker.h"

#include <stdint.h>
#include <sys/types.h>

enum pp_zop {
    PP_Z_SPAWN = 1,   /* parent -> zygote: start worker `id`, generation `gen` */
    PP_Z_KILL = 2,    /* parent -> zygote: send `sig` to worker `id`'s process group */
    PP_Z_QUIT = 3,    /* parent -> zygote: kill what is left, reap it, exit */
    PP_Z_SPAWNED = 4, /* zygote -> parent: worker `id` is process `pid` */
    PP_Z_EXITED = 5,  /* zygote -> parent: worker `id` ended; `status` as waitpid's */
    PP_Z_STARTED = 6, /* spawned zygote -> parent: set up (`status` 0) or not (-errno) */
};

struct pp_zmsg {
    uint32_t op;
    uint32_t id;
    uint32_t gen;
    int32_t pid;
    int32_t status;
    int32_t sig;
};

/* Forks the zygote. On success returns 0, its pid in *pid and the parent's
 * end of the command socket in *sock (close-on-exec, non-blocking).
 * Call with stdio flushed. Returns a negative errno on failure. */
int pp__zygote_start(const struct pp_worker_cfg *cfg, int nworkers, pid_t *pid, int *sock);
/* Serves as the zygote of a pool from this process, which must be
 * single-threaded (a spawned process, before main): `sock` is its end of
 * the command socket, `parent` the pool's process. Never returns. */
_Noreturn void pp__zygote_serve(const struct pp_worker_cfg *cfg, int nworkers, int sock,
                                pid_t parent);
/* Sends one command. 0, or a negative errno (the zygote is gone). */
int pp__zygote_send(int sock, uint32_t op, uint32_t id, uint32_t gen, int sig);

#endif
