/*
 * jobcache: see jobcache.h for why job blocks are kept.
 */
#include "jobcache.h"

#include "util.h"

#include <stdlib.h>
#include <string.h>

static int class_of(size_t bytes)
{
    for (int cls = 0; cls < PP_JOBCACHE_CLASSES; cls++)
        if (bytes <= (size_t)256 << cls)
            return cls;
    return PP_JOBCACHE_NONE;
}

void pp__jobcache_init(struct pp_jobcache *c)
{
    *c = (struct pp_jobcache){0};
}

void *pp__jobcache_take(struct pp_jobcache *c, size_t bytes, int *cls)
{
    *cls = class_of(bytes);
    if (*cls == PP_JOBCACHE_NONE)
        return calloc(1, bytes);
    void *block = c->free[*cls];
    if (block == NULL)
        return calloc(1, (size_t)256 << *cls); /* fresh memory: calloc skips the memset */
    c->free[*cls] = *(void **)block;
    c->bytes -= (size_t)256 << *cls;
    c->taken++;
    memset(block, 0, bytes);
    return block;
}

void pp__jobcache_give(struct pp_jobcache *c, void *block, int cls)
{
    if (cls != PP_JOBCACHE_NONE) {
        size_t size = (size_t)256 << cls;
        if (c->bytes + size <= PP_JOBCACHE_MAX_BYTES) {
            *(void **)block = c->free[cls];
            c->free[cls] = block;
            c->bytes += size;
            return;
        }
    }
    free(block);
}

void pp__jobcache_release(struct pp_jobcache *c)
{
    for (int cls = 0; cls < PP_JOBCACHE_CLASSES; cls++)
        while (c->free[cls] != NULL) {
            void *block = c->free[cls];
            c->free[cls] = *(void **)block;
            free(block);
        }
    c->bytes = 0;
    c->look_at = 0;
}

int64_t pp__jobcache_decay(struct pp_jobcache *c, int64_t now)
{
    if (c->bytes == 0) {
        c->look_at = 0;
    } else if (c->look_at == 0 || c->taken != c->taken_seen) {
        c->taken_seen = c->taken; /* in use: a new interval */
        c->look_at = now + PP_JOBCACHE_IDLE_NS;
    } else if (now >= c->look_at) {
        pp__jobcache_release(c);
    }
    return c->look_at != 0 ? c->look_at : PP_FOREVER;
}

void pp__jobcache_destroy(struct pp_jobcache *c)
{
    pp__jobcache_release(c);
}
