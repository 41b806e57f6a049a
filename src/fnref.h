/*
 * fnref: a code address that means the same thing in another process
 * running the same program, even one laid out differently (a spawned
 * worker, another MPI rank, each with its own ASLR).
 *
 * DESIGN: an address is named by the loaded object that contains it (its
 * path as the dynamic linker knows it; "" for the main program) and its
 * offset from that object's load address. The receiving side looks the
 * object up (loading it if the sender had dlopen()ed it) and adds its own
 * load address. Static functions work too: only the object must be found,
 * not a symbol.
 */
#ifndef PP_FNREF_H
#define PP_FNREF_H

#include "util.h"

#include <limits.h>
#include <stdint.h>

struct pp_fnref {
    uint64_t offset;       /* from the object's load address (l_addr) */
    char object[PATH_MAX]; /* "" names the main program */
};

/* Names `addr`. Returns 0, or PP_ENOTFOUND when no loaded object contains
 * it (a JIT buffer, a heap pointer, garbage). */
PP_INTERNAL int pp__fnref_encode(const void *addr, struct pp_fnref *ref);

/* The address `ref` names in this process, or NULL when the object cannot
 * be loaded or the address does not fall inside it. Keeps a small cache;
 * not thread-safe (workers and MPI servers call it from one thread). */
PP_INTERNAL void *pp__fnref_resolve(const struct pp_fnref *ref);

#endif
