/*
 * payload: the parent's allocator for argument and result bytes in the
 * control block's payload area.
 */
#ifndef PP_PAYLOAD_H
#define PP_PAYLOAD_H

#include <stddef.h>
#include <stdint.h>

#define PP_PAYLOAD_MIN_SHIFT 12
#define PP_PAYLOAD_CLASSES   20 /* 4 KiB .. 2 GiB */

struct pp_extent {
    unsigned char *p; /* NULL: no extent */
    int cls;
};

struct pp_payload {
    unsigned char *base;
    size_t size, bump;
    size_t *free[PP_PAYLOAD_CLASSES]; /* offsets of free blocks, per class */
    size_t nfree[PP_PAYLOAD_CLASSES], cap[PP_PAYLOAD_CLASSES];
};

/* Largest request pp__payload_alloc can ever satisfy in this area. */
size_t pp__payload_max(const struct pp_payload *pl);
/* Carves `bytes` (rounded up to a power of two, at least 4 KiB). Returns 0,
 * or -ENOMEM when no block is free now (others may be freed later). */
int pp__payload_alloc(struct pp_payload *pl, size_t bytes, struct pp_extent *out);
/* Gives a block back; accepts an empty extent. Clears *e. */
void pp__payload_free(struct pp_payload *pl, struct pp_extent *e);
void pp__payload_destroy(struct pp_payload *pl);

#endif
