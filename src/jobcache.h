/*
 * jobcache: the blocks of small jobs, kept for the next submissions.
 *
 * DESIGN: every pp_apply_async is a job block of a few hundred bytes. A
 * caller that submits 200,000 of them before it gets them grows the heap by
 * some 50 MB, and glibc hands it back to the kernel when the last block is
 * freed, so the next burst pays a page fault for every 16 blocks: a third of
 * its time (bench W4). Blocks of up to PP_JOBCACHE_MAX_BLOCK bytes are
 * therefore kept on free lists, one per size class, up to
 * PP_JOBCACHE_MAX_BYTES in all, and released when a whole interval of
 * PP_JOBCACHE_IDLE_NS went by with none taken, and when the pool is freed:
 * what a burst used waits for the next burst, not for ever (jemalloc's
 * decay of dirty pages, in small). The library thread looks at the
 * interval; the hot path reads no clock.
 *
 * It is guarded by the pool's lock, under which jobs are made and freed: a
 * lock of its own cost every pp_apply_async two more lock pairs, about 8 %
 * of workload 4's rate (2.6-2.7 against 2.8-3.0 M tasks/s).
 */
#ifndef PP_JOBCACHE_H
#define PP_JOBCACHE_H

#include <stddef.h>
#include <stdint.h>

#define PP_JOBCACHE_CLASSES   3 /* 256, 512 and 1024 bytes */
#define PP_JOBCACHE_MAX_BLOCK (256u << (PP_JOBCACHE_CLASSES - 1))
#define PP_JOBCACHE_MAX_BYTES ((size_t)64 << 20)
#define PP_JOBCACHE_IDLE_NS   1000000000 /* an interval with no block taken frees them all */
#define PP_JOBCACHE_NONE      (-1)       /* the class of a block too large to keep */

struct pp_jobcache {
    void *free[PP_JOBCACHE_CLASSES]; /* linked through each block's first word */
    size_t bytes;                    /* kept on the lists */
    uint64_t taken, taken_seen;      /* blocks served from the lists; at the last look */
    int64_t look_at;                 /* the next look (0: none set) */
};

void pp__jobcache_init(struct pp_jobcache *c);
/* A zeroed block of at least `bytes`, and the class to give it back with;
 * NULL when out of memory. */
void *pp__jobcache_take(struct pp_jobcache *c, size_t bytes, int *cls);
void pp__jobcache_give(struct pp_jobcache *c, void *block, int cls);
/* Frees what was kept if no block was taken since the look before; returns
 * when to look again (PP_FOREVER: nothing kept). */
int64_t pp__jobcache_decay(struct pp_jobcache *c, int64_t now);
void pp__jobcache_release(struct pp_jobcache *c); /* frees what is kept */
void pp__jobcache_destroy(struct pp_jobcache *c);

#endif
