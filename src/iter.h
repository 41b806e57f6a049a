/*
 * iter.h: what the dispatcher needs to know about iterators' chunk records.
 */
#ifndef PP_ITER_H
#define PP_ITER_H

#include "pool.h"

/* A batch of an iterator's consecutive items, taken from the source in one
 * refill: their arguments, results and states. It is dealt chunk by chunk
 * (pieces of at most the iterator's chunksize), so that a refill costs one
 * allocation however small the chunks are. */
struct pp_chunkrec {
    struct pp_chunkrec *next, *prev; /* iterator list, in input order */
    struct pp_chunkrec *dnext;       /* not yet fully dealt, in input order */
    size_t first;                    /* input position of item 0 */
    uint32_t count;
    uint32_t dealt;         /* items from item 0 already taken as pieces */
    uint32_t unreturned;    /* items not yet handed to the caller */
    uint32_t inflight;      /* pieces of it dealt or waiting to be dealt again */
    unsigned char *args;    /* count * arg_size */
    unsigned char *results; /* count * result_size */
    unsigned char *state;   /* per item: enum pp_item_state */
    pp_error *errs;         /* per item, allocated on the first failure */
};

enum pp_item_state { PP_ITEM_PENDING = 0, PP_ITEM_OK, PP_ITEM_FAILED, PP_ITEM_RETURNED };

/* Takes the iterator's next `chunks` undealt chunks (of one record) as a
 * piece. mu held. */
/* pp_imap of n items as one chunk, with a batch task if `batch` (mpi.c:
 * a serving rank's piece). */
pp_iter *pp__imap_piece(pp_pool *pool, pp_fn *fn, bool batch, const void *args, size_t n,
                        size_t arg_size, size_t result_size);
bool pp__iter_take(struct pp_iter *it, struct pp_piece *p, size_t chunks);
/* Items [start, start + count) of rec finished; those not failed are OK. */
void pp__iter_ok(struct pp_chunkrec *rec, size_t start, size_t count);
/* Item `index` failed. */
void pp__iter_fail(struct pp_chunkrec *rec, size_t index, const pp_error *err);
/* Items taken from the source and not dealt yet. */
size_t pp__iter_undealt(const struct pp_iter *it);
/* Frees rec if every item was handed back and no piece refers to it. */
void pp__iter_rec_maybe_free(struct pp_chunkrec *rec);
/* pp_join: every open iterator takes the rest of its items, the window
 * aside, so that they run before the workers go. May drop mu. */
void pp__iter_take_rest(pp_pool *pool);
/* Undealt chunks fail with `code` (terminate, crash loop). */
void pp__iter_fail_undealt(struct pp_iter *it, int code, const char *why);

#endif
