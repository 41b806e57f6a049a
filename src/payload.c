/*
 * payload: the parent's allocator for argument and result bytes.
 *
 * DESIGN: only the parent allocates here, so no lock is shared with the
 * workers and no worker can corrupt the allocator's books: they live in the
 * parent's private memory. Blocks are powers of two carved from a bump
 * pointer and recycled through one free list per size; in-flight work is
 * bounded by the inbox depth, so the waste of rounding stays small, and
 * blocks keep their pages, so a repeated map touches no fresh memory.
 */
#include "payload.h"

#include <errno.h>
#include <stdlib.h>

static int class_of(size_t bytes)
{
    int cls = 0;
    while (((size_t)1 << (cls + PP_PAYLOAD_MIN_SHIFT)) < bytes)
        cls++;
    return cls;
}

size_t pp__payload_max(const struct pp_payload *pl)
{
    size_t max = (size_t)1 << PP_PAYLOAD_MIN_SHIFT;
    while (max * 2 <= pl->size && class_of(max * 2) < PP_PAYLOAD_CLASSES)
        max *= 2;
    return max;
}

int pp__payload_alloc(struct pp_payload *pl, size_t bytes, struct pp_extent *out)
{
    int cls = class_of(bytes);
    if (cls >= PP_PAYLOAD_CLASSES)
        return -ENOMEM;
    size_t block = (size_t)1 << (cls + PP_PAYLOAD_MIN_SHIFT);
    if (pl->nfree[cls] > 0) {
        out->p = pl->base + pl->free[cls][--pl->nfree[cls]];
    } else {
        size_t at = (pl->bump + block - 1) & ~(block - 1); /* natural alignment */
        if (at + block > pl->size || at + block < at)
            return -ENOMEM;
        pl->bump = at + block;
        out->p = pl->base + at;
    }
    out->cls = cls;
    return 0;
}

void pp__payload_free(struct pp_payload *pl, struct pp_extent *e)
{
    if (e->p == NULL)
        return;
    int cls = e->cls;
    if (pl->nfree[cls] == pl->cap[cls]) {
        size_t cap = pl->cap[cls] ? pl->cap[cls] * 2 : 16;
        size_t *v = realloc(pl->free[cls], cap * sizeof *v);
        if (v == NULL) { /* keep the books right: the block is simply lost */
            e->p = NULL;
            return;
        }
        pl->free[cls] = v;
        pl->cap[cls] = cap;
    }
    pl->free[cls][pl->nfree[cls]++] = (size_t)(e->p - pl->base);
    e->p = NULL;
}

void pp__payload_destroy(struct pp_payload *pl)
{
    for (int i = 0; i < PP_PAYLOAD_CLASSES; i++)
        free(pl->free[i]);
}
