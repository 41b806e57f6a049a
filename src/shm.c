/*
 * shm: the shared arena behind pp_shm_alloc, and the internal calls the pool
 * makes on it (shm.h).
 *
 * DESIGN: one arena per process family. The first pp_shm_alloc, or
 * pp__shm_init (called by pp_pool_new before it forks), creates a memfd of the
 * reserved size and maps it once, MAP_SHARED | MAP_NORESERVE; every process
 * forked afterwards inherits the mapping at the same address, so a pointer
 * into the arena means the same bytes everywhere, whenever it was allocated.
 * Only pages that are touched cost memory.
 *
 * The allocator's state lives in the arena itself, so any process of the
 * family may allocate or free, concurrently, under one process-shared ROBUST
 * mutex. A process may be killed at any instruction, also while holding that
 * mutex, so every change is made crash-consistent:
 *  - small objects (size classes up to 2 KiB) sit on per-class free lists of
 *    arena offsets; a pop or a push is committed by one store to the list
 *    head, so a death mid-way at worst leaks one object. A free object holds
 *    its link and a mark (free_mark), so that pp_shm_free of one that is
 *    already free (never handed out, or freed twice) is ignored, not pushed
 *    again, which would hand it out twice;
 *  - page runs (big blocks, and the 64 KiB slabs that feed the free lists) are
 *    tracked by a bitmap plus a per-page info word; each run operation first
 *    writes an intent record, and the next process to take the mutex (it gets
 *    EOWNERDEAD) undoes an unfinished allocation or redoes an unfinished free.
 * Invariant: every free page reads as zeros (fresh memfd pages are zero, and
 * a freed run is punched out with MADV_REMOVE, which also gives its memory
 * back), so a big allocation needs no memset; small objects are cleared on
 * allocation.
 */
#include "shm.h"
#include "util.h"

#include "procpool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#define ARENA_MAGIC   0x707061726e613031ULL /* "pparna01" */
#define ARENA_MIN     ((size_t)1 << 20)     /* smallest reserve: 1 MiB */
#define ARENA_MAX     ((size_t)1 << 42)     /* largest reserve: 4 TiB */
#define ARENA_DEFAULT ((size_t)1 << 32)     /* 4 GiB */
#define SLAB_PAGES    16                    /* pages in one slab of small objects */
#define SMALL_MAX     2048                  /* larger requests get whole pages */
#define MEMSET_PAGES  16                    /* freed runs below this are memset, not punched */

/* info word of a page: 0 for a free page or the tail of a big run; a big
 * run's head holds its page count; every page of a slab holds SLAB_BIT, its
 * class and its index inside the slab. */
#define SLAB_BIT      0x80000000u
#define INFO_CLASS(v) (((v) >> 24) & 0x7f)
#define INFO_INDEX(v) ((v)&0xffffff)

static const uint32_t class_size[] = {16,  32,  48,  64,  96,   128,  192,
                                      256, 384, 512, 768, 1024, 1536, 2048};
#define NCLASSES (sizeof class_size / sizeof class_size[0])

enum { OP_NONE, OP_ALLOC_BIG, OP_ALLOC_SLAB, OP_FREE_BIG };

/* The header at offset 0 of the arena. Every field below `mu` is protected
 * by `mu`. */
struct arena {
    uint64_t magic;
    uint64_t size;     /* bytes mapped */
    uint64_t shift;    /* log2 of the page size */
    uint64_t data_off; /* offset of page 0 of the data area */
    uint64_t npages;   /* pages in the data area */
    uint64_t bm_off;   /* offset of the bitmap: 1 bit a page, set = in use */
    uint64_t info_off; /* offset of the info words: one uint32_t a page */
    uint64_t key;      /* free_mark's: random, set at creation */
    pthread_mutex_t mu;
    uint64_t hint;                /* no page below it is free */
    uint64_t free_head[NCLASSES]; /* offset of the first free object, 0 = none */
    struct {                      /* the run operation in progress, if any */
        uint32_t op, cls;
        uint64_t page, n;
    } intent;
};

static pthread_mutex_t g_init = PTHREAD_MUTEX_INITIALIZER;
static char *_Atomic g_base; /* NULL until the arena exists */
static size_t g_size;        /* written before g_base is published */
static int g_fd = -1;
static size_t g_reserve = ARENA_DEFAULT;

/* Keeps the compiler from moving stores across a commit point; other CPUs
 * see them through the mutex, a killed process leaves them all in memory. */
#define COMMIT() atomic_signal_fence(memory_order_seq_cst)

static inline struct arena *arena(void)
{
    return (struct arena *)atomic_load_explicit(&g_base, memory_order_acquire);
}

static inline uint64_t *bitmap(struct arena *a)
{
    return (uint64_t *)((char *)a + a->bm_off);
}

static inline uint32_t *info(struct arena *a)
{
    return (uint32_t *)((char *)a + a->info_off);
}

static inline char *page_addr(struct arena *a, uint64_t page)
{
    return (char *)a + a->data_off + (page << a->shift);
}

/* The second word of the free small object at offset `off`. A live object
 * holding it by chance (1 in 2^64, with a random key) would leak when freed,
 * never be handed out twice. */
static inline uint64_t free_mark(const struct arena *a, uint64_t off)
{
    return off * 0x9e3779b97f4a7c15ULL ^ a->key;
}

/* Makes the small object at `obj` free, linked to `next` (an offset, 0 for
 * none). Both words fit the smallest class. */
static inline void mark_free(struct arena *a, char *obj, uint64_t next)
{
    uint64_t *w = (uint64_t *)obj;
    w[0] = next;
    w[1] = free_mark(a, (uint64_t)(obj - (char *)a));
}

static void bits_set(struct arena *a, uint64_t page, uint64_t n, bool on)
{
    uint64_t *bm = bitmap(a);
    for (uint64_t i = page; i < page + n;) {
        if ((i & 63) == 0 && i + 64 <= page + n) {
            bm[i >> 6] = on ? ~0ULL : 0;
            i += 64;
            continue;
        }
        if (on)
            bm[i >> 6] |= 1ULL << (i & 63);
        else
            bm[i >> 6] &= ~(1ULL << (i & 63));
        i++;
    }
}

/* First fit from the hint. Sets *first_free to the lowest free page seen.
 * Returns the first page of a free run of n pages, or UINT64_MAX. */
static uint64_t find_run(struct arena *a, uint64_t n, uint64_t *first_free)
{
    const uint64_t *bm = bitmap(a);
    uint64_t start = 0, len = 0;
    *first_free = UINT64_MAX;
    for (uint64_t i = a->hint; i < a->npages;) {
        uint64_t w = bm[i >> 6];
        if ((i & 63) == 0 && w == ~0ULL) {
            len = 0;
            i += 64;
            continue;
        }
        if ((i & 63) == 0 && w == 0) {
            if (len == 0)
                start = i;
            if (*first_free == UINT64_MAX)
                *first_free = i;
            len += 64;
            i += 64;
        } else if (w >> (i & 63) & 1) {
            len = 0;
            i++;
            continue;
        } else {
            if (len == 0)
                start = i;
            if (*first_free == UINT64_MAX)
                *first_free = i;
            len++;
            i++;
        }
        if (len >= n)
            return start;
    }
    return UINT64_MAX;
}

/* Writes down what the run operation about to start does to [page, page +
 * n), before it does it: a process that dies in the middle leaves the log
 * for recover(). The operation ends by setting op back to OP_NONE. */
static void log_intent(struct arena *a, uint32_t op, uint64_t page, uint64_t n)
{
    a->intent.page = page;
    a->intent.n = n;
    COMMIT();
    a->intent.op = op;
    COMMIT();
}

/* Marks [page, page + n) used and moves the hint past what is known used. */
static void take_run(struct arena *a, uint64_t page, uint64_t n, uint64_t first_free)
{
    bits_set(a, page, n, true);
    a->hint = page == first_free ? page + n : first_free;
}

/* Gives back pages that may have been written: afterwards they read as zero
 * and (for big runs) no longer use memory. */
static void zero_pages(struct arena *a, uint64_t page, uint64_t n)
{
    char *p = page_addr(a, page);
    size_t len = (size_t)n << a->shift;
    if (n < MEMSET_PAGES || madvise(p, len, MADV_REMOVE) != 0)
        memset(p, 0, len);
}

/* The mutex came back EOWNERDEAD: its holder died, possibly in the middle of
 * a run operation. Undo an allocation it never returned, finish a free. */
static void recover(struct arena *a)
{
    uint64_t page = a->intent.page, n = a->intent.n;
    switch (a->intent.op) {
    case OP_ALLOC_SLAB: {
        uint64_t first = (uint64_t)(page_addr(a, page) - (char *)a);
        if (a->free_head[a->intent.cls] == first)
            break; /* it was published: the slab is in use */
        for (uint64_t i = 0; i < n; i++)
            info(a)[page + i] = 0;
        zero_pages(a, page, n); /* carving wrote into it */
        bits_set(a, page, n, false);
        break;
    }
    case OP_ALLOC_BIG:
    case OP_FREE_BIG:
        info(a)[page] = 0;
        bits_set(a, page, n, false);
        break;
    default:
        break;
    }
    if (a->intent.op != OP_NONE && page < a->hint)
        a->hint = page;
    a->intent.op = OP_NONE;
}

static int arena_lock(struct arena *a)
{
    int rc = pthread_mutex_lock(&a->mu);
    if (rc == EOWNERDEAD) {
        recover(a);
        pthread_mutex_consistent(&a->mu);
        rc = 0;
    }
    return rc;
}

/* A slab for class c: a run of SLAB_PAGES pages carved into a free list that
 * becomes visible with one store. Called with the mutex held and the class's
 * list empty. Returns 0 or -ENOMEM. */
static int refill(struct arena *a, unsigned c)
{
    uint64_t first_free, n = SLAB_PAGES;
    uint64_t page = find_run(a, n, &first_free);
    if (page == UINT64_MAX)
        return -ENOMEM;
    a->intent.cls = c;
    log_intent(a, OP_ALLOC_SLAB, page, n);
    take_run(a, page, n, first_free);
    for (uint64_t i = 0; i < n; i++)
        info(a)[page + i] = SLAB_BIT | (uint32_t)c << 24 | (uint32_t)i;
    char *p = page_addr(a, page);
    size_t size = class_size[c], count = ((size_t)n << a->shift) / size;
    for (size_t i = 0; i < count; i++)
        mark_free(a, p + i * size, i + 1 < count ? (uint64_t)(p + (i + 1) * size - (char *)a) : 0);
    COMMIT();
    a->free_head[c] = (uint64_t)(p - (char *)a);
    COMMIT();
    a->intent.op = OP_NONE;
    return 0;
}

static void *alloc_small(struct arena *a, unsigned c)
{
    int rc = arena_lock(a);
    if (rc != 0) {
        errno = rc;
        return NULL;
    }
    if (a->free_head[c] == 0 && refill(a, c) != 0) {
        pthread_mutex_unlock(&a->mu);
        errno = ENOMEM;
        return NULL;
    }
    char *obj = (char *)a + a->free_head[c];
    a->free_head[c] = *(uint64_t *)obj; /* the commit: one store */
    pthread_mutex_unlock(&a->mu);
    memset(obj, 0, class_size[c]);
    return obj;
}

static void *alloc_pages(struct arena *a, uint64_t n)
{
    int rc = arena_lock(a);
    if (rc != 0) {
        errno = rc;
        return NULL;
    }
    uint64_t first_free;
    uint64_t page = n > a->npages ? UINT64_MAX : find_run(a, n, &first_free);
    if (page == UINT64_MAX) {
        pthread_mutex_unlock(&a->mu);
        errno = ENOMEM;
        return NULL;
    }
    log_intent(a, OP_ALLOC_BIG, page, n);
    take_run(a, page, n, first_free);
    info(a)[page] = (uint32_t)n;
    COMMIT();
    a->intent.op = OP_NONE;
    pthread_mutex_unlock(&a->mu);
    return page_addr(a, page);
}

/* Creates and maps the arena. Called with g_init held, g_base NULL. */
static int arena_create(void)
{
    long pg = sysconf(_SC_PAGESIZE);
    uint64_t shift = 12;
    while (((uint64_t)1 << shift) < (uint64_t)pg)
        shift++;
    size_t size = g_reserve;
    int fd = memfd_create("procpool-arena", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)size) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (m == MAP_FAILED) {
        int e = errno;
        close(fd);
        return -e;
    }
    struct arena *a = m;
    uint64_t page = (uint64_t)1 << shift, total = size >> shift;
    if (getrandom(&a->key, sizeof a->key, GRND_NONBLOCK) != (ssize_t)sizeof a->key)
        a->key = (uint64_t)pp__now_ns() ^ (uint64_t)getpid() << 32 ^ (uint64_t)(uintptr_t)m;
    a->magic = ARENA_MAGIC;
    a->size = size;
    a->shift = shift;
    a->bm_off = (sizeof *a + 63) & ~(uint64_t)63;
    a->info_off = a->bm_off + (total + 63) / 64 * 8;
    a->data_off = (a->info_off + total * 4 + page - 1) & ~(page - 1);
    a->npages = total - a->data_off / page;
    uint64_t *bm = bitmap(a);
    for (uint64_t i = a->npages; i & 63; i++) /* bits past the end: in use */
        bm[i >> 6] |= 1ULL << (i & 63);

    pthread_mutexattr_t at;
    pthread_mutexattr_init(&at);
    pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&at, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(&a->mu, &at);
    pthread_mutexattr_destroy(&at);
    if (rc != 0) {
        munmap(m, size);
        close(fd);
        return -rc;
    }
    g_size = size;
    g_fd = fd;
    atomic_store_explicit(&g_base, (char *)m, memory_order_release);
    return 0;
}

/* Returns the arena, creating it if needed; NULL with errno on failure. */
static struct arena *arena_get(void)
{
    struct arena *a = arena();
    if (a)
        return a;
    int rc = pp__shm_init();
    if (rc != 0) {
        errno = -rc;
        return NULL;
    }
    return arena();
}

int pp__shm_init(void)
{
    int rc = 0;
    pthread_mutex_lock(&g_init);
    if (!atomic_load_explicit(&g_base, memory_order_acquire))
        rc = arena_create();
    pthread_mutex_unlock(&g_init);
    return rc;
}

bool pp__shm_contains(const void *p, size_t len)
{
    char *base = atomic_load_explicit(&g_base, memory_order_acquire);
    if (!base)
        return false;
    uintptr_t off = (uintptr_t)p - (uintptr_t)base; /* wraps when p < base */
    return off < g_size && len <= g_size - off;
}

int pp__shm_fd(void)
{
    return atomic_load_explicit(&g_base, memory_order_acquire) ? g_fd : -1;
}

size_t pp__shm_region(void **base)
{
    *base = atomic_load_explicit(&g_base, memory_order_acquire);
    return *base ? g_size : 0;
}

int pp__map_at(void *addr, size_t size, int fd)
{
    int flags = MAP_SHARED | MAP_NORESERVE;
    void *m = mmap(addr, size, PROT_READ | PROT_WRITE, flags | MAP_FIXED_NOREPLACE, fd, 0);
    if (m == MAP_FAILED && errno != EEXIST) /* a system that refuses the flag: a hint */
        m = mmap(addr, size, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (m == MAP_FAILED)
        return -errno;
    if (m != addr) { /* the hint was not taken: something is there */
        munmap(m, size);
        return -EEXIST;
    }
    return 0;
}

int pp__shm_adopt(int fd, void *addr, size_t size)
{
    int rc = 0;
    pthread_mutex_lock(&g_init);
    if (atomic_load_explicit(&g_base, memory_order_acquire)) {
        rc = -EBUSY;
    } else if ((rc = pp__map_at(addr, size, fd)) == 0) {
        void *m = addr;
        if (((struct arena *)m)->magic != ARENA_MAGIC || ((struct arena *)m)->size != size) {
            munmap(m, size);
            rc = -EINVAL;
        } else {
            g_size = size;
            g_fd = fd;
            atomic_store_explicit(&g_base, (char *)m, memory_order_release);
        }
    }
    pthread_mutex_unlock(&g_init);
    return rc;
}

/* Zeroed shared memory (see procpool.h). Any process of the family, any
 * thread. Sizes up to 2 KiB come from size classes (16-byte aligned), larger
 * ones are whole pages (page-aligned). NULL with errno EINVAL (size 0) or
 * ENOMEM (the arena is exhausted, or could not be created). */
void *pp_shm_alloc(size_t size)
{
    if (size == 0) {
        errno = EINVAL;
        return NULL;
    }
    struct arena *a = arena_get();
    if (!a)
        return NULL;
    if (size <= SMALL_MAX) {
        unsigned c = 0;
        while (class_size[c] < size)
            c++;
        return alloc_small(a, c);
    }
    if (size > a->size) {
        errno = ENOMEM;
        return NULL;
    }
    uint64_t page = (uint64_t)1 << a->shift;
    return alloc_pages(a, (size + page - 1) >> a->shift);
}

/* Gives back memory from pp_shm_alloc, in any process of the family (not
 * necessarily the one that allocated it). NULL, and pointers that are not
 * the start of a live allocation in the arena (a block still free among
 * them), are ignored. A block freed, handed out again and then freed a
 * second time is the new owner's loss, as with free(). The memory of a
 * block of MEMSET_PAGES pages or more goes back to the system. */
void pp_shm_free(void *p)
{
    struct arena *a = arena();
    if (!p || !a || !pp__shm_contains(p, 1))
        return;
    uint64_t off = (uint64_t)((char *)p - (char *)a);
    if (off < a->data_off)
        return;
    uint64_t page = (off - a->data_off) >> a->shift;
    uint32_t v = info(a)[page];
    if (v & SLAB_BIT) {
        unsigned c = INFO_CLASS(v);
        uint64_t slab = page - INFO_INDEX(v);
        if (c >= NCLASSES || (char *)p < page_addr(a, slab))
            return;
        /* An object's start, and not in the slab's tail, which no object fills */
        uint64_t at = (uint64_t)((char *)p - page_addr(a, slab));
        if (at % class_size[c] != 0 ||
            at / class_size[c] >= (SLAB_PAGES << a->shift) / class_size[c])
            return;
        if (arena_lock(a) != 0)
            return;
        if (((uint64_t *)p)[1] == free_mark(a, off)) { /* free already */
            pthread_mutex_unlock(&a->mu);
            return;
        }
        mark_free(a, p, a->free_head[c]);
        COMMIT();
        a->free_head[c] = off; /* the commit: one store */
        pthread_mutex_unlock(&a->mu);
        return;
    }
    if (v == 0 || (char *)p != page_addr(a, page))
        return;
    zero_pages(a, page, v); /* still ours: no lock needed */
    if (arena_lock(a) != 0)
        return;
    if (info(a)[page] == v) {
        log_intent(a, OP_FREE_BIG, page, v);
        info(a)[page] = 0;
        bits_set(a, page, v, false);
        if (page < a->hint)
            a->hint = page;
        COMMIT();
        a->intent.op = OP_NONE;
    }
    pthread_mutex_unlock(&a->mu);
}

/* Sets the arena's reserve (see procpool.h). Values below 1 MiB are raised
 * to 1 MiB; the size is rounded up to whole pages. -EINVAL for 0 or more
 * than 4 TiB, -EBUSY once the arena exists. */
int pp_shm_reserve(size_t bytes)
{
    if (bytes == 0 || bytes > ARENA_MAX)
        return -EINVAL;
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    if (bytes < ARENA_MIN)
        bytes = ARENA_MIN;
    bytes = (bytes + pg - 1) / pg * pg;
    int rc = 0;
    pthread_mutex_lock(&g_init);
    if (atomic_load_explicit(&g_base, memory_order_acquire))
        rc = -EBUSY;
    else
        g_reserve = bytes;
    pthread_mutex_unlock(&g_init);
    return rc;
}
