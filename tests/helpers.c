/* Shared helpers for the tests. */
#include "helpers.h"

#include <dirent.h>
#include <procpool.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n - 3; /* ".", ".." and the DIR's own fd */
}

int count_children(void)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", getpid(), getpid());
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    int n = 0, pid;
    while (fscanf(f, "%d", &pid) == 1)
        n++;
    fclose(f);
    return n;
}

int count_threads(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    if (d == NULL)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

int count_mappings_named(const char *needle)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (f == NULL)
        return -1;
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle))
            n++;
    fclose(f);
    return n;
}

/* The tests crash workers on purpose and read how they died: let signals
 * kill them rather than having ASan turn them into exit codes. */
const char *__asan_default_options(void)
{
    return "handle_segv=0:handle_sigbus=0:handle_abort=0:handle_sigfpe=0:handle_sigill=0";
}

int children_of(int pid, int *out, int max)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", pid, pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    int n = 0, c;
    while (n < max && fscanf(f, "%d", &c) == 1)
        out[n++] = c;
    fclose(f);
    return n;
}

bool process_alive(int pid)
{
    char path[64], state = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    /* The state follows the command name, which is in parentheses. */
    char buf[512];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = '\0';
    char *p = strrchr(buf, ')');
    if (p && p[1] == ' ')
        state = p[2];
    return state != 0 && state != 'Z' && state != 'X';
}

bool wait_all_dead(const int *pids, int n, double seconds)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        bool any = false;
        for (int i = 0; i < n; i++)
            any |= process_alive(pids[i]);
        if (!any)
            return true;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 > seconds)
            return false;
        usleep(2000); /* polling a condition with a deadline, not a guess */
    }
}

/* In the arena, so that spawned workers share them too; its address
 * reaches them through the environment, which a spawned zygote inherits. */
struct shared_flags *shared_flags_new(void)
{
    struct shared_flags *p = pp_shm_alloc(sizeof *p);
    if (p != NULL) {
        char v[32];
        snprintf(v, sizeof v, "%p", (void *)p);
        setenv("PP_TEST_FLAGS", v, 1);
    }
    *shared_flags_slot() = p;
    return p;
}

struct shared_flags **shared_flags_slot(void)
{
    static struct shared_flags *p;
    if (p == NULL) { /* a spawned worker: the flags its parent made */
        const char *v = getenv("PP_TEST_FLAGS");
        if (v != NULL)
            p = (struct shared_flags *)(uintptr_t)strtoull(v, NULL, 16);
    }
    return &p;
}

void shared_flags_free(struct shared_flags *f)
{
    pp_shm_free(f);
    unsetenv("PP_TEST_FLAGS");
    *shared_flags_slot() = NULL;
}

void wait_flag(_Atomic int *flag, int value)
{
    while (atomic_load(flag) < value)
        usleep(200);
}

/* ---- Appended for the reliability tests. ---- */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

void flag_wait_ge(_Atomic int *flag, int value)
{
    int v;
    while ((v = atomic_load(flag)) < value) {
        struct timespec ts = {0, 10000000}; /* a missed wake costs 10 ms, not a hang */
        syscall(SYS_futex, (int *)flag, FUTEX_WAIT, v, &ts, NULL, 0);
    }
}

void flag_wake(_Atomic int *flag)
{
    syscall(SYS_futex, (int *)flag, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

int live_children_of(int pid, int *out, int max)
{
    int all[256];
    int n = children_of(pid, all, 256), k = 0;
    for (int i = 0; i < n && k < max; i++)
        if (process_alive(all[i]))
            out[k++] = all[i];
    return k;
}

int pool_zygote(void)
{
    int z[4];
    return children_of(getpid(), z, 4) == 1 ? z[0] : -1;
}

int count_mappings(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (f == NULL)
        return -1;
    int n = 0, c;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

long status_kib(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL)
        return -1;
    char line[256];
    size_t len = strlen(field);
    long kib = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, len) == 0 && line[len] == ':' &&
            sscanf(line + len + 1, "%ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

long rss_kib(void)
{
    return status_kib("VmRSS");
}

void *shared_alloc(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void shared_release(void *p, size_t bytes)
{
    munmap(p, bytes);
}

/* Every thread's children, then theirs, breadth first. */
static int all_children(int pid, int *out, int max)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < max) {
        if (e->d_name[0] == '.')
            continue;
        char cp[384];
        snprintf(cp, sizeof cp, "/proc/%d/task/%.32s/children", pid, e->d_name);
        FILE *f = fopen(cp, "r");
        if (f == NULL)
            continue;
        int c;
        while (n < max && fscanf(f, "%d", &c) == 1)
            out[n++] = c;
        fclose(f);
    }
    closedir(d);
    return n;
}

int live_descendants(int *out, int max)
{
    while (waitpid(-1, NULL, WNOHANG) > 0) /* orphans reparented to us, now dead */
        ;
    int queue[1024], qn = 0, k = 0;
    qn = all_children(getpid(), queue, 1024);
    for (int i = 0; i < qn; i++) {
        if (process_alive(queue[i]) && k < max)
            out[k++] = queue[i];
        qn += all_children(queue[i], queue + qn, 1024 - qn);
    }
    return k;
}

bool wait_no_descendants(double seconds)
{
    double end = now_s() + seconds;
    int pids[256];
    for (;;) {
        if (live_descendants(pids, 256) == 0)
            return true;
        if (now_s() > end)
            return false;
        usleep(1000); /* polling a condition with a deadline */
    }
}

uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

double slow_factor(void)
{
    return getenv("PP_VALGRIND") ? 20.0 : 1.0;
}

/* ---- Pointers a test's tasks read, under spawn too. ---- */

#define TEST_GLOBALS 8

static struct {
    char name[24];
    void *p;
} globals[TEST_GLOBALS];

void **test_global(const char *name)
{
    int i = 0;
    while (i < TEST_GLOBALS && globals[i].name[0] && strcmp(globals[i].name, name) != 0)
        i++;
    if (i == TEST_GLOBALS)
        abort();
    if (!globals[i].name[0])
        snprintf(globals[i].name, sizeof globals[i].name, "%s", name);
    if (globals[i].p == NULL) { /* a spawned worker: what its parent shared */
        char var[48];
        snprintf(var, sizeof var, "PP_TEST_GLOBAL_%s", name);
        const char *v = getenv(var);
        if (v != NULL)
            globals[i].p = (void *)(uintptr_t)strtoull(v, NULL, 16);
    }
    return &globals[i].p;
}

void *test_share(const char *name, void *p)
{
    char var[48], v[32];
    snprintf(var, sizeof var, "PP_TEST_GLOBAL_%s", name);
    snprintf(v, sizeof v, "%p", p);
    if (p != NULL)
        setenv(var, v, 1);
    else
        unsetenv(var);
    *test_global(name) = p;
    return p;
}
