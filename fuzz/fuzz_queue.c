/*
 * libFuzzer harness: pp_queue contents. A queue lives in the shared arena,
 * so any process of the family (running user code) may have written its
 * records and data; the process that gets or puts next decodes them. The
 * input sets head, tail, the records and the data bytes (and, in the strict
 * variant, the capacity and record count too), then gets and puts with no
 * waiting. Nothing may be read or written outside the queue's block.
 *
 * The lock is left alone: a scribbled process-shared mutex is outside what
 * decoding can check.
 */
#include "queue.h"

#include <errno.h>
#include <sanitizer/asan_interface.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CAP 256

static pp_queue *q;
static uint64_t real_cap, real_nrec;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (q == NULL) {
        q = pp_queue_new(CAP);
        if (q == NULL)
            abort();
        real_cap = q->capacity;
        real_nrec = q->nrec;
        /* The arena is one big mapping ASan knows nothing about: poison
         * what follows the queue's block so that reading past it is seen. */
        size_t used = sizeof *q + real_nrec * sizeof(struct pp_queue_rec) + real_cap;
        ASAN_POISON_MEMORY_REGION((char *)q + used, 4096);
    }
    if (size < 17)
        return 0;
    uint64_t head, tail;
    memcpy(&head, data, 8);
    memcpy(&tail, data + 8, 8);
    uint8_t mode = data[16];
    data += 17;
    size -= 17;
    q->capacity = real_cap;
    q->nrec = real_nrec;
#ifdef PP_FUZZ_STRICT
    if (mode & 0x80 && size >= 16) { /* the header's sizes too */
        memcpy(&q->capacity, data, 8);
        memcpy(&q->nrec, data + 8, 8);
        data += 16;
        size -= 16;
    }
#endif
    q->head = head % 4096;
    q->tail = q->head + (mode & 1 ? tail : tail % 80);
    unsigned char *recs = (unsigned char *)(q + 1);
    size_t body = real_nrec * sizeof(struct pp_queue_rec) + real_cap;
    memset(recs, 0, body);
    memcpy(recs, data, size < body ? size : body);

    unsigned char buf[2 * CAP];
    size_t len;
    int rc = pp_queue_get(q, buf, mode & 2 ? sizeof buf : 16, &len, 0);
    (void)rc;
    rc = pp_queue_put(q, buf, (size_t)(mode >> 2 & 0x3f) * 4, 0);
    (void)rc;
    rc = pp_queue_get(q, buf, sizeof buf, &len, 0);
    (void)rc;
    q->capacity = real_cap;
    q->nrec = real_nrec;
    return 0;
}
