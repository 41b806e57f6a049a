/*
 * spawn: the `spawn` start method. The pool's zygote is a fresh execution
 * of the program's own binary instead of a fork of the caller; functions
 * cross into it as (loaded object, offset).
 */
#ifndef PP_SPAWN_METHOD_H
#define PP_SPAWN_METHOD_H

#include "procpool.h"
#include "ring.h"
#include "worker.h"

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define PP_MAX_OBJECTS 64 /* loaded objects a spawn pool's functions may come from */

/* The names of those objects, in a memfd mapping of its own: the parent
 * appends, under its lock (an entry is written before n grows past it);
 * workers have it read-only (sealed), so a task that scribbles over shared
 * memory cannot make the pool's functions unfindable. */
struct pp_objtab {
    _Atomic uint32_t n;
    char name[PP_MAX_OBJECTS][PATH_MAX];
};

/* A function as a spawn pool's descriptor carries it: the index of its
 * object in the pp_objtab (plus one, so that no code is 0) in the top 16
 * bits, its offset from that object's load address below. */
#define PP_FN_OFFSET_BITS 48
#define PP_FN_OFFSET_MASK (((uint64_t)1 << PP_FN_OFFSET_BITS) - 1)
#define PP_FN_CODE(index, offset)                                                                  \
    ((((uint64_t)(index) + 1) << PP_FN_OFFSET_BITS) | ((uint64_t)(offset)&PP_FN_OFFSET_MASK))

/* Parent: starts the zygote of a spawn pool by executing the program
 * afresh. `cfg` is the pool's worker configuration (its control block is
 * mapped from memfd `ctl_fd`, `map_bytes` long; cfg->wake_fd is passed on
 * at its number). The arena must exist. The new process maps both at the addresses
 * they have here, resolves the initializer and its argument, and only then
 * answers; on success returns 0, the table of objects in *objects, its pid
 * in *pid and the parent's end of the command socket in *sock
 * (close-on-exec, non-blocking). Fails with
 * -EINVAL (an initarg that cannot cross: neither NULL, nor in the arena,
 * nor in a loaded object), PP_ENOTFOUND (an initializer no loaded object
 * contains, or that the new process cannot find), PP_ESPAWN (the new
 * process could not map the shared memory where it must be, or died
 * before it answered), or another negative errno. Call with stdio flushed. */
int pp__spawn_start(const struct pp_worker_cfg *cfg, int nworkers, int ctl_fd, size_t map_bytes,
                    struct pp_objtab **objects, pid_t *pid, int *sock);
/* Unmaps what pp__spawn_start returned in *objects (NULL: nothing). */
void pp__spawn_release(struct pp_objtab *objects);

/* Parent, under the pool's lock: the code naming `fn` in a spawn pool's
 * descriptors, appending its object to the table if needed. Returns 0,
 * PP_ENOTFOUND (no loaded object contains fn), or -ENOSPC (the pool has
 * met PP_MAX_OBJECTS objects already). */
int pp__spawn_encode(struct pp_objtab *objects, pp_fn *fn, uint64_t *code);

/* True in a spawned process while it runs the program's constructors: a
 * pool made then would spawn a process that does the same, for ever. */
bool pp__spawn_booting(void);

/* Worker of a spawn pool: the function `code` names here, or NULL when it
 * cannot be found. Cached: one array lookup when the same code comes back. */
pp_fn *pp__spawn_resolve(const struct pp_objtab *objects, uint64_t code);

#endif
