/*
 * The shared arena: zeroed memory at the same address in every process,
 * allocated and freed from any of them, concurrently, also while processes
 * are killed in the middle of it; bounded by its reserve, and giving big
 * blocks' memory back.
 */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "proc_helpers.h"
#include "helpers.h"
#include "procpool.h"

#define MiB ((size_t)1 << 20)

static bool all_zero(const void *p, size_t n)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        if (c[i])
            return false;
    return true;
}

/* Bytes of memory the arena's memfd holds now (found through /proc). */
static long long arena_bytes(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    long long bytes = -1;
    while (d && (e = readdir(d))) {
        char path[300], target[256];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n <= 0)
            continue;
        target[n] = 0;
        struct stat st;
        if (strstr(target, "memfd:procpool-arena") && stat(path, &st) == 0)
            bytes = (long long)st.st_blocks * 512;
    }
    if (d)
        closedir(d);
    return bytes;
}

Test(shm, alloc_is_zeroed_aligned_and_reusable, .timeout = PP_TEST_TIMEOUT(20))
{
    static const size_t sizes[] = {1, 15, 16, 17, 48, 100, 1000, 2048, 2049, 4096, 5000, 1 << 20};
    void *p[sizeof sizes / sizeof sizes[0]];
    for (int round = 0; round < 3; round++) {
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            p[i] = pp_shm_alloc(sizes[i]);
            cr_assert_not_null(p[i], "size %zu", sizes[i]);
            cr_assert(all_zero(p[i], sizes[i]), "size %zu not zeroed in round %d", sizes[i], round);
            cr_assert_eq((uintptr_t)p[i] % 16, 0);
            if (sizes[i] > 2048)
                cr_assert_eq((uintptr_t)p[i] % 4096, 0, "big blocks are page-aligned");
            memset(p[i], 0xa5, sizes[i]);
        }
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
            pp_shm_free(p[i]);
    }
}

Test(shm, bad_input_is_refused_without_a_crash, .timeout = PP_TEST_TIMEOUT(20))
{
    errno = 0;
    cr_assert_null(pp_shm_alloc(0));
    cr_assert_eq(errno, EINVAL);
    pp_shm_free(NULL);
    int local;
    pp_shm_free(&local); /* not in the arena: ignored */
    char *p = pp_shm_alloc(100);
    cr_assert_not_null(p);
    pp_shm_free(p + 8); /* not the start of a block: ignored */
    char *big = pp_shm_alloc(10000);
    pp_shm_free(big + 4096);
    cr_assert_eq(pp_shm_reserve(0), -EINVAL);
    cr_assert_eq(pp_shm_reserve(64 * MiB), -EBUSY, "the arena exists already");
    errno = 0;
    cr_assert_null(pp_shm_alloc(SIZE_MAX));
    cr_assert_eq(errno, ENOMEM);
    strcpy(p, "still fine");
    cr_assert_str_eq(p, "still fine");
    pp_shm_free(p);
    pp_shm_free(big);
}

/* A small block freed twice is caught while it stays free; a pointer into a
 * slab's tail (48-byte objects: 1365 fill a 64 KiB slab, 16 bytes are left)
 * is no block at all. Before, both went onto the free list: the block was
 * handed out twice, and the tail's "block" ran into the next page, over a
 * live block. */
Test(shm, free_ignores_free_blocks_and_slab_tails, .timeout = PP_TEST_TIMEOUT(20))
{
    char *keep = pp_shm_alloc(100), *twice = pp_shm_alloc(100);
    pp_shm_free(twice);
    pp_shm_free(twice);
    char *r1 = pp_shm_alloc(100), *r2 = pp_shm_alloc(100);
    cr_assert(r1 != r2, "one block handed out twice");
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char *slab = pp_shm_alloc(48);
    cr_assert_eq((uintptr_t)slab % page, 0, "the first 48-byte block starts a fresh slab");
    char *next = pp_shm_alloc(2 * page);
    memset(next, 0xab, 2 * page);
    char *tail = slab + (16 * page / 48) * 48;
    pp_shm_free(tail);
    for (size_t i = 1; i < 16 * page / 48; i++) /* the rest of the slab, and one more */
        cr_assert(pp_shm_alloc(48) != tail);
    cr_assert(pp_shm_alloc(48) != tail);
    for (size_t i = 0; i < 2 * page; i++)
        cr_assert_eq((unsigned char)next[i], 0xab, "byte %zu of a live block changed", i);
    pp_shm_free(keep);
}

Test(shm, default_reserve_takes_one_huge_block, .timeout = PP_TEST_TIMEOUT(20))
{
    /* 4 GiB reserved by default; one allocation may take nearly all of it,
     * and costs nothing until touched */
    size_t n = (size_t)4000 * MiB;
    char *p = pp_shm_alloc(n);
    cr_assert_not_null(p, "errno %d", errno);
    p[0] = 1;
    p[n - 1] = 2;
    pp_shm_free(p);
    p = pp_shm_alloc(n);
    cr_assert_not_null(p, "the block came back");
    cr_assert(p[0] == 0 && p[n - 1] == 0, "freed pages read as zero again");
    pp_shm_free(p);
}

Test(shm, exhaustion_is_enomem_and_recovers, .timeout = PP_TEST_TIMEOUT(20))
{
    cr_assert_eq(pp_shm_reserve(32 * MiB), 0);
    void *blocks[64];
    int n = 0;
    errno = 0;
    while (n < 64 && (blocks[n] = pp_shm_alloc(MiB)))
        n++;
    cr_assert_eq(errno, ENOMEM);
    cr_assert(n >= 28 && n < 32, "%d blocks of 1 MiB from 32 MiB", n);
    /* small objects run out cleanly too */
    void *small;
    int smalls = 0;
    while ((small = pp_shm_alloc(64)))
        smalls++;
    cr_assert_eq(errno, ENOMEM);
    for (int i = 0; i < n; i++)
        pp_shm_free(blocks[i]);
    /* nearly all of the arena in one block, once the big ones are back */
    void *all = pp_shm_alloc(29 * MiB);
    cr_assert_not_null(all);
    pp_shm_free(all);
}

Test(shm, freeing_a_big_block_gives_its_memory_back, .timeout = PP_TEST_TIMEOUT(20))
{
    char *p = pp_shm_alloc(64 * MiB);
    cr_assert_not_null(p);
    memset(p, 1, 64 * MiB);
    long long held = arena_bytes();
    cr_assert_geq(held, (long long)(64 * MiB));
    pp_shm_free(p);
    cr_assert_lt(arena_bytes(), held - (long long)(60 * MiB));
}

Test(shm, same_address_in_parent_and_children, .timeout = PP_TEST_TIMEOUT(20))
{
    int *before = pp_shm_alloc(sizeof *before); /* made before the fork */
    int up[2], down[2];
    th_pipe(up);
    th_pipe(down);
    pid_t pid = th_fork();
    if (pid == 0) {
        *before = 42;
        /* allocated in the child, after the fork: the parent reads and frees it */
        char *msg = pp_shm_alloc(10000);
        strcpy(msg, "from the child");
        th_send(up[1], (long)(uintptr_t)msg);
        /* allocated by the parent after the fork: the child reads it */
        int *late = (int *)(uintptr_t)th_recv(down[0]);
        _exit(late && *late == 7 ? 0 : 1);
    }
    char *msg = (char *)(uintptr_t)th_recv(up[0]);
    cr_assert_str_eq(msg, "from the child");
    pp_shm_free(msg);
    int *late = pp_shm_alloc(sizeof *late);
    *late = 7;
    th_send(down[1], (long)(uintptr_t)late);
    cr_assert_eq(th_wait(pid), 0);
    cr_assert_eq(*before, 42);
    pp_shm_free(late);
    pp_shm_free(before);
}

#define WORKERS 4
#define ALLOCS  3000

/* Each child allocates, fills with its own pattern, frees some, and records
 * what it kept; no two live blocks may overlap. */
Test(shm, concurrent_alloc_and_free_from_many_processes, .timeout = PP_TEST_TIMEOUT(20))
{
    char **kept = pp_shm_alloc(sizeof(char *) * WORKERS * ALLOCS);
    size_t *len = pp_shm_alloc(sizeof(size_t) * WORKERS * ALLOCS);
    cr_assert(kept && len);
    pid_t pid[WORKERS];
    for (int w = 0; w < WORKERS; w++) {
        if ((pid[w] = th_fork()) == 0) {
            srand((unsigned)w + 1);
            for (int i = 0; i < ALLOCS; i++) {
                size_t n = (size_t)(i % 10 == 0 ? 2049 + rand() % 20000 : 1 + rand() % 600);
                char *p = pp_shm_alloc(n);
                if (!p || !all_zero(p, n))
                    _exit(1);
                memset(p, 'a' + w, n);
                if (rand() % 3 == 0) {
                    pp_shm_free(p);
                    p = NULL;
                    n = 0;
                }
                kept[w * ALLOCS + i] = p;
                len[w * ALLOCS + i] = n;
            }
            _exit(0);
        }
    }
    for (int w = 0; w < WORKERS; w++)
        cr_assert_eq(th_wait(pid[w]), 0, "worker %d", w);
    for (int w = 0; w < WORKERS; w++)
        for (int i = 0; i < ALLOCS; i++) {
            char *p = kept[w * ALLOCS + i];
            for (size_t k = 0; p && k < len[w * ALLOCS + i]; k++)
                cr_assert_eq(p[k], 'a' + w, "block of worker %d overwritten", w);
            pp_shm_free(p);
        }
    pp_shm_free(kept);
    pp_shm_free(len);
}

/* Children allocate and free in a loop and are SIGKILLed wherever they are;
 * the arena must stay consistent: fresh blocks are zeroed and distinct, and
 * most of it can still be allocated in one block. */
Test(shm, processes_killed_while_allocating_leave_it_consistent, .timeout = PP_TEST_TIMEOUT(20))
{
    cr_assert_eq(pp_shm_reserve(64 * MiB), 0);
    for (int round = 0; round < 6; round++) {
        int fds[2];
        th_pipe(fds);
        pid_t pid[2];
        for (int w = 0; w < 2; w++) {
            if ((pid[w] = th_fork()) == 0) {
                void *live[8] = {0};
                srand((unsigned)(round * 2 + w + 1));
                for (long i = 0;; i++) {
                    int k = rand() % 8;
                    pp_shm_free(live[k]);
                    size_t n =
                        rand() % 4 ? 1 + (size_t)rand() % 2000 : 4096 * (1 + (size_t)rand() % 64);
                    live[k] = pp_shm_alloc(n);
                    if (!live[k] || !all_zero(live[k], n))
                        _exit(1);
                    memset(live[k], 0xee, n);
                    if (i == 500)
                        th_send(fds[1], 1);
                }
            }
        }
        cr_assert_eq(th_recv(fds[0]), 1);
        cr_assert_eq(th_recv(fds[0]), 1);
        cr_assert_eq(th_kill(pid[0]), 128 + SIGKILL);
        cr_assert_eq(th_kill(pid[1]), 128 + SIGKILL);
        close(fds[0]);
        close(fds[1]);
    }
    /* whatever the dead held is lost, the rest works */
    char *p[200];
    for (int i = 0; i < 200; i++) {
        size_t n = i % 2 ? 100 : 3000;
        p[i] = pp_shm_alloc(n);
        cr_assert_not_null(p[i]);
        cr_assert(all_zero(p[i], n));
        memset(p[i], i, n);
    }
    for (int i = 0; i < 200; i++) {
        size_t n = i % 2 ? 100 : 3000;
        for (size_t k = 0; k < n; k++)
            cr_assert_eq((unsigned char)p[i][k], (unsigned char)i);
        pp_shm_free(p[i]);
    }
    void *big = pp_shm_alloc(32 * MiB);
    cr_assert_not_null(big, "half of the arena in one block");
    pp_shm_free(big);
}

/* A big buffer filled in place by several processes, with no copy. */
Test(shm, big_buffer_filled_in_place_by_children, .timeout = PP_TEST_TIMEOUT(20))
{
    const size_t n = 256 * MiB;
    unsigned char *buf = pp_shm_alloc(n);
    cr_assert_not_null(buf);
    pid_t pid[2];
    for (int w = 0; w < 2; w++)
        if ((pid[w] = th_fork()) == 0) {
            memset(buf + w * (n / 2), w + 1, n / 2);
            _exit(0);
        }
    for (int w = 0; w < 2; w++)
        cr_assert_eq(th_wait(pid[w]), 0);
    for (size_t i = 0; i < n; i += 4096)
        cr_assert_eq(buf[i], i < n / 2 ? 1 : 2);
    pp_shm_free(buf);
}

/* ---- with the pool ------------------------------------------------------ */

struct big_result {
    unsigned char *p;
    size_t n;
};

static int make_big(const void *arg, void *result)
{
    size_t n = *(const size_t *)arg;
    struct big_result *r = result;
    r->p = pp_shm_alloc(n); /* allocated inside a task, in a worker */
    if (!r->p)
        return pp_fail(1, "pp_shm_alloc: errno %d", errno);
    memset(r->p, 0x5a, n);
    r->n = n;
    return 0;
}

Test(shm_pool, a_worker_allocates_a_result_the_parent_reads_and_frees,
     .timeout = PP_TEST_TIMEOUT(20))
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    size_t sizes[4] = {100, 5000, 3 * MiB, 24};
    struct big_result r[4];
    pp_error err;
    cr_assert_eq(pp_map(pool, make_big, sizes, 4, sizeof(size_t), r, sizeof r[0], 1, &err), 0, "%s",
                 err.message);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(r[i].n, sizes[i]);
        for (size_t k = 0; k < sizes[i]; k += 97)
            cr_assert_eq(r[i].p[k], 0x5a);
        pp_shm_free(r[i].p);
    }
    pp_close(pool);
    pp_join(pool);
    pp_pool_free(pool);
}

struct fill_arg {
    unsigned char *buf; /* in the arena */
    size_t off, len;
};

static int fill(const void *arg, void *result)
{
    const struct fill_arg *a = arg;
    (void)result;
    memset(a->buf + a->off, (int)(a->off >> 24) + 1, a->len);
    return 0;
}

Test(shm_pool, pp_map_fills_a_1gib_arena_buffer_in_place, .timeout = PP_TEST_TIMEOUT(20))
{
    const size_t n = 1024 * MiB, piece = 16 * MiB, pieces = n / piece;
    unsigned char *buf = pp_shm_alloc(n);
    cr_assert_not_null(buf);
    struct fill_arg *args = pp_shm_alloc(pieces * sizeof *args);
    for (size_t i = 0; i < pieces; i++)
        args[i] = (struct fill_arg){buf, i * piece, piece};
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    pp_error err;
    cr_assert_eq(pp_map(pool, fill, args, pieces, sizeof *args, NULL, 0, 0, &err), 0, "%s",
                 err.message);
    for (size_t off = 0; off < n; off += 4096)
        cr_assert_eq(buf[off], (unsigned char)((off >> 24) + 1), "byte %zu", off);
    pp_close(pool);
    pp_join(pool);
    pp_pool_free(pool);
    long long held = arena_bytes();
    pp_shm_free(buf);
    cr_assert_lt(arena_bytes(), held - (long long)(1000 * MiB), "the memory went back");
    pp_shm_free(args);
}

static int mark_result(const void *arg, void *result)
{
    uint64_t mark = *(const uint32_t *)arg + 1;
    memcpy(result, &mark, sizeof mark); /* the first bytes only: the rest stays zero */
    return 0;
}

/* Results straight into the caller's arena array, in one chunk whose big
 * results take its worker a while to zero: meanwhile the other worker,
 * idle, is given the items not yet claimed, and writes theirs. Found: the
 * first worker zeroed the whole chunk's results after claiming the entry,
 * so it wiped results the other one had written, and the map succeeded
 * with them missing (bench W1, its arena row, about one run in 50). A worker
 * zeroes only the results of the items it claimed. */
Test(shm_pool, items_taken_from_a_chunk_keep_their_in_place_results, .timeout = PP_TEST_TIMEOUT(60))
{
    const size_t n = 16, rsize = 8 * MiB;
    uint32_t *args = pp_shm_alloc(n * sizeof *args);
    unsigned char *res = pp_shm_alloc(n * rsize);
    cr_assert(args != NULL && res != NULL);
    for (size_t i = 0; i < n; i++)
        args[i] = (uint32_t)i;
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2});
    cr_assert_not_null(pool);
    for (int round = 0; round < 10; round++) {
        memset(res, 0xee, n * rsize);
        pp_error err;
        cr_assert_eq(pp_map(pool, mark_result, args, n, sizeof *args, res, rsize, n, &err), 0, "%s",
                     err.message);
        for (size_t i = 0; i < n; i++) {
            uint64_t mark;
            memcpy(&mark, res + i * rsize, sizeof mark);
            cr_assert_eq(mark, i + 1, "round %d: item %zu's result is %#llx", round, i,
                         (unsigned long long)mark);
            cr_assert_eq(res[i * rsize + rsize - 1], 0, "round %d: item %zu's result not zeroed",
                         round, i);
        }
    }
    pp_pool_free(pool);
    pp_shm_free(args);
    pp_shm_free(res);
}
