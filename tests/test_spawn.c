/*
 * The spawn start method: workers come from a fresh execution of this
 * binary, so functions cross as (loaded object, offset) and only the arena
 * is shared. Every pool here asks for PP_START_SPAWN itself.
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <procpool.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static pp_pool *spawn_pool(int workers)
{
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = workers, .start = PP_START_SPAWN});
    cr_assert_not_null(pool, "pp_pool_new: %s", strerror(errno));
    return pool;
}

/* ---- functions of every kind ------------------------------------------------ */

int spawn_exe_square(const void *arg, void *result);

int spawn_exe_square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    *(int *)result = x * x;
    return 0;
}

static int static_negate(const void *arg, void *result)
{
    *(int *)result = -*(const int *)arg;
    return 0;
}

static int marker = 1;  /* the parent sets 2 before its pools: a fresh process has 1 */
static int constructed; /* how often the constructor below ran in this process */

static int ctor_pool_errno = -1; /* what pp_pool_new said to the constructor */

__attribute__((constructor)) static void construct(void)
{
    constructed++;
    if (getenv("PP_TEST_CTOR_POOL") != NULL) { /* a pool from a constructor */
        errno = 0;
        pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1, .start = PP_START_SPAWN});
        ctor_pool_errno = pool ? 0 : errno;
        pp_pool_free(pool);
    }
}

static int report_ctor_pool(const void *arg, void *result)
{
    (void)arg;
    *(int *)result = ctor_pool_errno;
    return 0;
}

struct seen {
    uint64_t fn;     /* where this process has static_negate */
    int marker;      /* its `marker` */
    int constructed; /* its `constructed` */
    int ppid, pid;   /* the worker and its parent (the zygote) */
    char exe[256];   /* its /proc/self/exe */
};

static int what_i_see(const void *arg, void *result)
{
    (void)arg;
    struct seen *s = result;
    s->fn = (uint64_t)(uintptr_t)&static_negate;
    s->marker = marker;
    s->constructed = constructed;
    s->pid = getpid();
    s->ppid = getppid();
    ssize_t n = readlink("/proc/self/exe", s->exe, sizeof s->exe - 1);
    s->exe[n > 0 ? n : 0] = '\0';
    return 0;
}

Test(spawn, functions_of_the_executable_static_or_not, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = spawn_pool(2);
    int in[50], out[50];
    for (int i = 0; i < 50; i++)
        in[i] = i;
    cr_assert_eq(pp_map(pool, spawn_exe_square, in, 50, sizeof in[0], out, sizeof out[0], 3, NULL),
                 0);
    for (int i = 0; i < 50; i++)
        cr_assert_eq(out[i], i * i);
    cr_assert_eq(pp_map(pool, static_negate, in, 50, sizeof in[0], out, sizeof out[0], 0, NULL), 0);
    for (int i = 0; i < 50; i++)
        cr_assert_eq(out[i], -i);
    /* Alternating functions: each one is named, none mistaken for another. */
    for (int i = 0; i < 20; i++) {
        int r;
        cr_assert_eq(pp_apply(pool, i % 2 ? static_negate : spawn_exe_square, &i, sizeof i, &r,
                              sizeof r, NULL),
                     0);
        cr_assert_eq(r, i % 2 ? -i : i * i);
    }
    pp_pool_free(pool);
}

Test(spawn, workers_are_a_fresh_process_laid_out_anew, .timeout = PP_TEST_TIMEOUT(60))
{
    marker = 2;
    pp_pool *pool = spawn_pool(2);
    struct seen s;
    cr_assert_eq(pp_apply(pool, what_i_see, NULL, 0, &s, sizeof s, NULL), 0);
    cr_assert_eq(s.marker, 1, "no copy of the parent's memory reaches a spawned worker");
    cr_assert_eq(s.constructed, 1, "the program's constructors ran in it, once");
    cr_assert_neq(s.ppid, getpid(), "workers are not the parent's forks");
    char exe[256];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = '\0';
    cr_assert_str_eq(s.exe, exe, "the same program");
    FILE *f = fopen("/proc/sys/kernel/randomize_va_space", "r");
    int aslr = 0;
    if (f != NULL) {
        if (fscanf(f, "%d", &aslr) != 1)
            aslr = 0;
        fclose(f);
    }
    if (aslr != 0)
        cr_assert_neq(s.fn, (uint64_t)(uintptr_t)&static_negate,
                      "the spawned process has its own layout (ASLR), and still runs the "
                      "right function");
    marker = 1;
    pp_pool_free(pool);
}

Test(spawn, no_pool_from_a_constructor_of_a_spawned_process, .timeout = PP_TEST_TIMEOUT(60))
{
    setenv("PP_TEST_CTOR_POOL", "1", 1);
    pp_pool *pool = spawn_pool(1);
    unsetenv("PP_TEST_CTOR_POOL");
    int r = 0;
    cr_assert_eq(pp_apply(pool, report_ctor_pool, NULL, 0, &r, sizeof r, NULL), 0);
    cr_assert_eq(r, EBUSY, "it would spawn again, for ever");
    pp_pool_free(pool);
}

Test(spawn, functions_of_a_library_loaded_after_the_pool, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = spawn_pool(2);
    void *lib = dlopen(SPAWN_LIB, RTLD_NOW);
    cr_assert_not_null(lib, "%s", dlerror());
    pp_fn *triple = (pp_fn *)(uintptr_t)dlsym(lib, "spawn_lib_triple");
    pp_fn *where = (pp_fn *)(uintptr_t)dlsym(lib, "spawn_lib_where");
    cr_assert(triple && where);
    int in[40], out[40];
    for (int i = 0; i < 40; i++)
        in[i] = i;
    cr_assert_eq(pp_map(pool, triple, in, 40, sizeof in[0], out, sizeof out[0], 4, NULL), 0);
    for (int i = 0; i < 40; i++)
        cr_assert_eq(out[i], 3 * i);
    uint64_t addr = 0;
    cr_assert_eq(pp_apply(pool, where, NULL, 0, &addr, sizeof addr, NULL), 0);
    cr_assert_neq(addr, 0);
    /* And the executable's functions still, after another object. */
    int x = 7, r;
    cr_assert_eq(pp_apply(pool, spawn_exe_square, &x, sizeof x, &r, sizeof r, NULL), 0);
    cr_assert_eq(r, 49);
    pp_pool_free(pool);
    dlclose(lib);
}

/* ---- what cannot cross -------------------------------------------------------- */

Test(spawn, a_function_in_no_object_fails_at_submission, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = spawn_pool(2);
    void *heap = malloc(64);
    void *anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    cr_assert(heap != NULL && anon != MAP_FAILED);
    void *bad[] = {heap, anon};
    for (int k = 0; k < 2; k++) {
        pp_fn *fn = (pp_fn *)(uintptr_t)bad[k];
        int in[4] = {0}, out[4];
        pp_error err;
        cr_assert_eq(pp_map(pool, fn, in, 4, sizeof in[0], out, sizeof out[0], 1, &err),
                     PP_ENOTFOUND);
        cr_assert_eq(pp_apply(pool, fn, in, sizeof in[0], out, sizeof out[0], NULL), PP_ENOTFOUND);
        errno = 0;
        cr_assert_null(pp_apply_async(pool, fn, in, sizeof in[0], sizeof out[0], NULL, NULL, NULL));
        cr_assert_eq(errno, EFAULT);
        errno = 0;
        cr_assert_null(
            pp_map_async(pool, fn, in, 4, sizeof in[0], sizeof out[0], 1, NULL, NULL, NULL));
        cr_assert_eq(errno, EFAULT);
        errno = 0;
        cr_assert_null(pp_imap(pool, fn, in, 4, sizeof in[0], sizeof out[0], 1));
        cr_assert_eq(errno, EFAULT);
        errno = 0;
        cr_assert_null(pp_imap_unordered(pool, fn, in, 4, sizeof in[0], sizeof out[0], 1));
        cr_assert_eq(errno, EFAULT);
    }
    /* Nothing crashed: the pool goes on. */
    int x = 5, r;
    cr_assert_eq(pp_apply(pool, spawn_exe_square, &x, sizeof x, &r, sizeof r, NULL), 0);
    cr_assert_eq(r, 25);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_eq(st.crashed, 0);
    cr_assert_eq(st.respawned, 0);
    pp_pool_free(pool);
    free(heap);
    munmap(anon, 4096);
}

/* dlopen()s a copy of the test library whose file is deleted at once: the
 * parent has it loaded, a spawned process cannot find it. */
static void *dlopen_vanished_copy(void)
{
    char path[] = "/tmp/pp_spawn_lib_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    int src = open(SPAWN_LIB, O_RDONLY);
    cr_assert_geq(src, 0);
    char buf[65536];
    ssize_t n;
    while ((n = read(src, buf, sizeof buf)) > 0)
        cr_assert_eq(write(fd, buf, (size_t)n), n);
    close(src);
    close(fd);
    void *lib = dlopen(path, RTLD_NOW);
    cr_assert_not_null(lib, "%s", dlerror());
    unlink(path);
    return lib;
}

/* A library the parent loaded from a file that is gone by the time the
 * workers look for it: each item fails with PP_ENOTFOUND, and the workers
 * live on. */
Test(spawn, a_function_the_worker_cannot_find_fails_its_items, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = spawn_pool(1);
    void *lib = dlopen_vanished_copy();
    pp_fn *triple = (pp_fn *)(uintptr_t)dlsym(lib, "spawn_lib_triple");
    cr_assert_not_null(triple);
    int in[3] = {1, 2, 3}, out[3];
    pp_error err;
    cr_assert_eq(pp_map(pool, triple, in, 3, sizeof in[0], out, sizeof out[0], 3, &err),
                 PP_ENOTFOUND);
    cr_assert_eq(err.code, PP_ENOTFOUND);
    cr_assert_eq(err.failed, 3);
    cr_assert_eq(err.index, 0);
    cr_assert(strstr(err.message, "cannot be found") != NULL, "%s", err.message);
    int x = 6, r;
    cr_assert_eq(pp_apply(pool, spawn_exe_square, &x, sizeof x, &r, sizeof r, NULL), 0);
    cr_assert_eq(r, 36);
    pp_stats st;
    cr_assert_eq(pp_pool_stats(pool, &st), 0);
    cr_assert_eq(st.crashed, 0);
    cr_assert_eq(st.respawned, 0, "the worker lived on");
    pp_pool_free(pool);
    dlclose(lib);
}

/* The same, for the initializer: the new process cannot set up, says so,
 * and pp_pool_new fails cleanly. */
Test(spawn, an_initializer_the_new_process_cannot_find, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_shm_free(pp_shm_alloc(1)); /* the arena lives on: make it before counting */
    void *lib = dlopen_vanished_copy();
    int (*init)(void *) = (int (*)(void *))(uintptr_t)dlsym(lib, "spawn_lib_init");
    cr_assert_not_null(init);
    int fds = count_fds();
    errno = 0;
    cr_assert_null(
        pp_pool_new(&(pp_options){.workers = 1, .start = PP_START_SPAWN, .initializer = init}));
    cr_assert_eq(errno, EFAULT);
    cr_assert_eq(count_children(), 0, "the new process was reaped");
    cr_assert_eq(count_fds(), fds, "no file descriptor left");
    dlclose(lib);
}

/* ---- the initializer and its argument ---------------------------------------- */

static int init_seen = -1;

static int init_store(void *arg)
{
    init_seen = arg ? *(int *)arg : -2;
    return 0;
}

static int report_init(const void *arg, void *result)
{
    (void)arg;
    *(int *)result = init_seen;
    return 0;
}

static int init_static = 11; /* crosses with this, its initial value */

static int initialized_with(void *initarg)
{
    pp_pool *pool = pp_pool_new(&(pp_options){
        .workers = 2, .start = PP_START_SPAWN, .initializer = init_store, .initarg = initarg});
    cr_assert_not_null(pool, "pp_pool_new: %s", strerror(errno));
    int r = 0;
    cr_assert_eq(pp_apply(pool, report_init, NULL, 0, &r, sizeof r, NULL), 0);
    pp_pool_free(pool);
    return r;
}

Test(spawn, initarg_in_the_arena_in_static_data_or_null, .timeout = PP_TEST_TIMEOUT(60))
{
    int *shared = pp_shm_alloc(sizeof *shared);
    *shared = 99;
    cr_assert_eq(initialized_with(shared), 99, "the arena is shared");
    pp_shm_free(shared);
    init_static = 12;
    cr_assert_eq(initialized_with(&init_static), 11,
                 "static data crosses by name: the worker sees its initial value");
    init_static = 11;
    cr_assert_eq(initialized_with(NULL), -2);
}

Test(spawn, initarg_that_cannot_cross_is_einval, .timeout = PP_TEST_TIMEOUT(60))
{
    int on_stack = 1;
    int *on_heap = malloc(sizeof *on_heap);
    void *bad[] = {&on_stack, on_heap};
    pp_shm_free(pp_shm_alloc(1)); /* the arena lives on: make it before counting */
    for (int k = 0; k < 2; k++) {
        int before = count_fds();
        errno = 0;
        cr_assert_null(pp_pool_new(&(pp_options){
            .workers = 1, .start = PP_START_SPAWN, .initializer = init_store, .initarg = bad[k]}));
        cr_assert_eq(errno, EINVAL);
        cr_assert_eq(count_children(), 0);
        cr_assert_eq(count_fds(), before);
    }
    free(on_heap);
    void *heap_fn = malloc(16);
    errno = 0;
    cr_assert_null(pp_pool_new(&(pp_options){
        .workers = 1, .start = PP_START_SPAWN, .initializer = (int (*)(void *))heap_fn}));
    cr_assert_eq(errno, EFAULT, "an initializer in no object");
    free(heap_fn);
}

/* ---- shared state ------------------------------------------------------------------ */

struct counter {
    pp_lock *lock;
    long *value;
};

static int add_under_lock(const void *arg, void *result)
{
    const struct counter *c = arg;
    (void)result;
    for (int i = 0; i < 100; i++) {
        if (pp_lock_acquire(c->lock, -1) != 0)
            return 1;
        long v = *c->value;
        *c->value = v + 1;
        pp_lock_release(c->lock);
    }
    return 0;
}

Test(spawn, arena_and_lock_from_spawned_workers, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_pool *pool = spawn_pool(2);
    /* Made after the pool: the arena is shared whenever memory is allocated. */
    struct counter c = {.lock = pp_lock_new(), .value = pp_shm_alloc(sizeof(long))};
    cr_assert(c.lock && c.value);
    struct counter in[40];
    for (int i = 0; i < 40; i++)
        in[i] = c;
    cr_assert_eq(pp_map(pool, add_under_lock, in, 40, sizeof in[0], NULL, 0, 1, NULL), 0);
    cr_assert_eq(*c.value, 40 * 100);
    pp_pool_free(pool);
    pp_lock_free(c.lock);
    pp_shm_free(c.value);
}

/* ---- a parent with threads, and what is left behind ---------------------------------- */

static _Atomic int stop_threads;

static void *busy_thread(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_threads)) {
        void *p = malloc(128); /* holds malloc's locks now and then */
        free(p);
    }
    return NULL;
}

Test(spawn, parent_with_threads, .timeout = PP_TEST_TIMEOUT(60))
{
    pthread_t t[3];
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, busy_thread, NULL), 0);
    for (int round = 0; round < 3; round++) {
        pp_pool *pool = spawn_pool(2);
        int in[100], out[100];
        for (int i = 0; i < 100; i++)
            in[i] = i;
        cr_assert_eq(
            pp_map(pool, spawn_exe_square, in, 100, sizeof in[0], out, sizeof out[0], 0, NULL), 0);
        for (int i = 0; i < 100; i++)
            cr_assert_eq(out[i], i * i);
        pp_pool_free(pool);
    }
    atomic_store(&stop_threads, 1);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
}

Test(spawn, nothing_left_behind, .timeout = PP_TEST_TIMEOUT(60))
{
    pp_shm_free(pp_shm_alloc(1)); /* the arena lives on: make it before counting */
    int fds = count_fds();
    int maps = count_mappings_named("procpool-ctl");
    for (int round = 0; round < 3; round++) {
        pp_pool *pool = spawn_pool(2);
        int x = 3, r;
        cr_assert_eq(pp_apply(pool, static_negate, &x, sizeof x, &r, sizeof r, NULL), 0);
        cr_assert_eq(count_children(), 1, "one child: the spawned zygote");
        pp_pool_free(pool);
        cr_assert_eq(count_children(), 0, "no child left");
        cr_assert_eq(count_fds(), fds, "no file descriptor left");
        cr_assert_eq(count_mappings_named("procpool-ctl"), maps, "no mapping left");
    }
}

Test(spawn, procpool_start_chooses_the_default, .timeout = PP_TEST_TIMEOUT(60))
{
    setenv("PROCPOOL_START", "spawn", 1);
    marker = 2;
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 1});
    cr_assert_not_null(pool);
    struct seen s;
    cr_assert_eq(pp_apply(pool, what_i_see, NULL, 0, &s, sizeof s, NULL), 0);
    cr_assert_eq(s.marker, 1, "spawned");
    pp_pool_free(pool);
    setenv("PROCPOOL_START", "fork", 1);
    pool = pp_pool_new(&(pp_options){.workers = 1});
    cr_assert_not_null(pool);
    cr_assert_eq(pp_apply(pool, what_i_see, NULL, 0, &s, sizeof s, NULL), 0);
    cr_assert_eq(s.marker, 2, "forked");
    pp_pool_free(pool);
    setenv("PROCPOOL_START", "forkserver", 1);
    errno = 0;
    cr_assert_null(pp_pool_new(&(pp_options){.workers = 1}));
    cr_assert_eq(errno, EINVAL, "a start method it does not know");
    unsetenv("PROCPOOL_START");
    marker = 1;
}
