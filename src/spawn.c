/*
 * spawn: the `spawn` start method (see spawn_method.h; not spawn.h, which is
 * posix_spawn's).
 *
 * DESIGN: the parent executes its own binary (/proc/self/exe) once per
 * pool, with PROCPOOL_SPAWN_FD naming an inherited socket. A constructor of
 * the library notices the variable in the new process, before main, and
 * takes over that process for good: it removes the variable, reads the
 * pool's configuration from the socket, maps the control block and the
 * arena from their inherited memfds at the very addresses the parent has
 * them (MAP_FIXED_NOREPLACE, pp__map_at: a collision with what this process already
 * mapped is reported, and the parent tries a new process, which is laid
 * out anew), and becomes the pool's zygote. Workers are forks of that
 * fresh process, never of the parent: no copy of the parent's memory or
 * threads reaches them, as with Python's spawn and forkserver.
 *
 * Functions cannot cross as addresses, as the new process is laid out
 * differently (ASLR). A descriptor's fn carries PP_FN_CODE(object, offset):
 * the object is an index into a table of object names (struct pp_objtab, a
 * sealed memfd that workers map read-only, so no task can scribble it),
 * which the parent appends to under its lock; a worker resolves a code once
 * (dlopen-ing the object if the parent had loaded it later) and caches the
 * address.
 */
#include "spawn_method.h"

#include "fnref.h"
#include "shm.h"
#include "zygote.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define SPAWN_ENV       "PROCPOOL_SPAWN_FD"
#define SPAWN_MAGIC     0x7070737077u
#define SPAWN_TRIES     4     /* new processes tried when the shared memory collides */
#define SPAWN_WAIT_MS   60000 /* for the new process to answer */
#define RESOLVE_CACHE   64    /* worker: codes remembered, direct-mapped */
#define INITARG_RAW     0     /* the pointer crosses as it is (NULL, the arena) */
#define INITARG_IN_OBJ  1     /* it points into a loaded object: initarg_ref */
#define SPAWN_FAIL_EXIT 126

extern char **environ;

/* The configuration the parent sends the new process. */
struct spawn_msg {
    uint64_t magic;
    int32_t nworkers, ctl_fd, wake_fd, arena_fd, objects_fd, parent, has_init, initarg_kind;
    int32_t timing, pad;
    uint64_t ctl_addr, map_bytes, arena_addr, arena_size;
    uint64_t max_tasks, max_memory, initarg;
    int64_t soft_timeout_ns;
    struct pp_fnref init, initarg_ref;
};

/* ---- parent --------------------------------------------------------------- */

int pp__spawn_encode(struct pp_objtab *t, pp_fn *fn, uint64_t *code)
{
    struct pp_fnref ref;
    int rc = pp__fnref_encode((const void *)(uintptr_t)fn, &ref);
    if (rc < 0)
        return rc;
    if (ref.offset > PP_FN_OFFSET_MASK)
        return PP_ENOTFOUND;
    uint32_t n = atomic_load_explicit(&t->n, memory_order_relaxed);
    uint32_t i = 0;
    while (i < n && strcmp(t->name[i], ref.object) != 0)
        i++;
    if (i == n) {
        if (n == PP_MAX_OBJECTS)
            return -ENOSPC;
        strcpy(t->name[n], ref.object); /* both are PATH_MAX long */
        atomic_store_explicit(&t->n, n + 1, memory_order_release);
    }
    *code = PP_FN_CODE(i, ref.offset);
    return 0;
}

/* Fills in how initarg crosses. 0, or -EINVAL when it cannot. */
static int encode_initarg(void *initarg, struct spawn_msg *m)
{
    m->initarg_kind = INITARG_RAW;
    m->initarg = (uint64_t)(uintptr_t)initarg;
    if (initarg == NULL || pp__shm_contains(initarg, 1))
        return 0;
    if (pp__fnref_encode(initarg, &m->initarg_ref) < 0)
        return -EINVAL; /* the heap, a stack, a private mapping: not in the new process */
    m->initarg_kind = INITARG_IN_OBJ;
    return 0;
}

/* A fresh environment: ours, with SPAWN_ENV naming `fd`. NULL if out of memory. */
static char **spawn_environment(int fd, char *var, size_t varlen)
{
    size_t n = 0;
    for (char **e = environ; e && *e; e++)
        n++;
    char **env = malloc((n + 2) * sizeof *env);
    if (env == NULL)
        return NULL;
    size_t k = 0;
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, SPAWN_ENV "=", sizeof SPAWN_ENV) != 0)
            env[k++] = *e;
    snprintf(var, varlen, SPAWN_ENV "=%d", fd);
    env[k++] = var;
    env[k] = NULL;
    return env;
}

/* The program to execute: /proc/self/exe's target when it is the very file
 * this process runs (under valgrind, /proc/self/exe itself names the tool,
 * while readlink and open of it name the program), else /proc/self/exe
 * (the file was replaced or deleted since: only the link still names it). */
static const char *program_path(char *buf, size_t len)
{
    ssize_t n = readlink("/proc/self/exe", buf, len - 1);
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    struct stat a, b;
    bool same = n > 0 && fd >= 0 && fstat(fd, &a) == 0 && (buf[n] = '\0', stat(buf, &b) == 0) &&
                a.st_dev == b.st_dev && a.st_ino == b.st_ino;
    if (fd >= 0)
        close(fd);
    return same ? buf : "/proc/self/exe";
}

/* Waits for the new process's first word. 0, or a negative code. */
static int await_started(int sock)
{
    struct pollfd p = {.fd = sock, .events = POLLIN};
    int64_t deadline = pp__now_ns() + (int64_t)SPAWN_WAIT_MS * 1000000;
    for (;;) {
        int rc = poll(&p, 1, pp__ms_left(deadline));
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            return PP_ESPAWN; /* no answer in time */
        struct pp_zmsg z;
        ssize_t got = recv(sock, &z, sizeof z, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got != (ssize_t)sizeof z || z.op != PP_Z_STARTED)
            return PP_ESPAWN; /* it died, or is not ours */
        return z.status;
    }
}

/* One try: a new process, set up or not. */
static int spawn_once(const struct spawn_msg *m, pid_t *pid, int *sock)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    char var[64];
    char **env = spawn_environment(sv[1], var, sizeof var);
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&at);
    /* dup2 onto itself clears close-on-exec in the new process only. */
    posix_spawn_file_actions_adddup2(&fa, sv[1], sv[1]);
    posix_spawn_file_actions_adddup2(&fa, m->ctl_fd, m->ctl_fd);
    posix_spawn_file_actions_adddup2(&fa, m->wake_fd, m->wake_fd);
    posix_spawn_file_actions_adddup2(&fa, m->arena_fd, m->arena_fd);
    posix_spawn_file_actions_adddup2(&fa, m->objects_fd, m->objects_fd);
    /* Its own process group, out of the terminal's foreground: Ctrl-C is
     * the parent's to handle; and the default for SIGCHLD, as it reaps. */
    sigset_t def;
    sigemptyset(&def);
    sigaddset(&def, SIGCHLD);
    posix_spawnattr_setsigdefault(&at, &def);
    posix_spawnattr_setpgroup(&at, 0);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF);
    char *argv[] = {program_invocation_name, NULL};
    char path[PATH_MAX];
    int rc = env ? posix_spawn(pid, program_path(path, sizeof path), &fa, &at, argv, env) : ENOMEM;
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    free(env);
    close(sv[1]);
    if (rc != 0) {
        close(sv[0]);
        return -rc;
    }
    while (send(sv[0], m, sizeof *m, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
    rc = await_started(sv[0]);
    if (rc < 0) {
        kill(*pid, SIGKILL);
        while (waitpid(*pid, NULL, 0) < 0 && errno == EINTR)
            ;
        close(sv[0]);
        return rc;
    }
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    *sock = sv[0];
    return 0;
}

/* The table of objects: our writable mapping, its memfd sealed against any
 * other (the new process maps it read-only). NULL with errno on failure. */
static struct pp_objtab *objtab_new(int *fd)
{
    *fd = memfd_create("procpool-objects", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (*fd < 0)
        return NULL;
    void *p = MAP_FAILED;
    if (ftruncate(*fd, sizeof(struct pp_objtab)) == 0)
        p = mmap(NULL, sizeof(struct pp_objtab), PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(*fd);
        errno = e;
        return NULL;
    }
    /* Best effort: a kernel before 5.1 does not know this seal. */
    fcntl(*fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE);
    return p;
}

void pp__spawn_release(struct pp_objtab *objects)
{
    if (objects != NULL)
        munmap(objects, sizeof *objects);
}

int pp__spawn_start(const struct pp_worker_cfg *cfg, int nworkers, int ctl_fd, size_t map_bytes,
                    struct pp_objtab **objects, pid_t *pid, int *sock)
{
    struct spawn_msg *m = calloc(1, sizeof *m);
    if (m == NULL)
        return -ENOMEM;
    int objects_fd;
    struct pp_objtab *t = objtab_new(&objects_fd);
    if (t == NULL) {
        int e = errno;
        free(m);
        return -e;
    }
    void *arena;
    *m = (struct spawn_msg){
        .magic = SPAWN_MAGIC,
        .nworkers = nworkers,
        .ctl_fd = ctl_fd,
        .wake_fd = cfg->wake_fd,
        .arena_fd = pp__shm_fd(),
        .objects_fd = objects_fd,
        .timing = cfg->timing,
        .parent = getpid(),
        .ctl_addr = (uint64_t)(uintptr_t)cfg->ctl,
        .map_bytes = map_bytes,
        .arena_size = pp__shm_region(&arena),
        .max_tasks = cfg->max_tasks,
        .max_memory = cfg->max_memory,
        .soft_timeout_ns = cfg->soft_timeout_ns,
    };
    m->arena_addr = (uint64_t)(uintptr_t)arena;
    int rc = m->arena_fd < 0 ? -EINVAL : 0;
    if (rc == 0 && cfg->initializer != NULL) {
        m->has_init = 1;
        rc = pp__fnref_encode((const void *)(uintptr_t)cfg->initializer, &m->init);
    }
    if (rc == 0)
        rc = encode_initarg(cfg->initarg, m);
    /* A collision of the shared memory with what the new process mapped
     * before us: another process gets another layout. */
    for (int i = 0; rc == 0 || rc == -EEXIST; i++) {
        if (i == SPAWN_TRIES) {
            rc = PP_ESPAWN;
            break;
        }
        rc = spawn_once(m, pid, sock);
        if (rc == 0)
            break;
    }
    free(m);
    close(objects_fd); /* the new process has its own mapping now */
    if (rc < 0)
        pp__spawn_release(t);
    else
        *objects = t;
    return rc;
}

/* ---- worker ---------------------------------------------------------------- */

static struct {
    uint64_t code;
    pp_fn *fn;
} resolved[RESOLVE_CACHE];

pp_fn *pp__spawn_resolve(const struct pp_objtab *t, uint64_t code)
{
    unsigned h = (unsigned)((code ^ (code >> 29)) % RESOLVE_CACHE);
    if (resolved[h].code == code && code != 0)
        return resolved[h].fn;
    uint64_t index = (code >> PP_FN_OFFSET_BITS) - 1;
    if ((code >> PP_FN_OFFSET_BITS) == 0 ||
        index >= atomic_load_explicit(&t->n, memory_order_acquire))
        return NULL;
    static struct pp_fnref ref; /* one thread; too big for a worker's stack to waste */
    memcpy(ref.object, t->name[index], sizeof ref.object);
    ref.object[sizeof ref.object - 1] = '\0';
    ref.offset = code & PP_FN_OFFSET_MASK;
    pp_fn *fn = (pp_fn *)(uintptr_t)pp__fnref_resolve(&ref);
    if (fn != NULL)
        resolved[h].code = code, resolved[h].fn = fn;
    return fn;
}

/* ---- the new process --------------------------------------------------------- */

static struct pp_worker_cfg spawned_cfg;
static bool booting;

bool pp__spawn_booting(void)
{
    return booting;
}

static void spawn_entry(int argc, char **argv, char **envp);

static _Noreturn void fail(int sock, int code)
{
    struct pp_zmsg z = {.op = PP_Z_STARTED, .status = code};
    while (send(sock, &z, sizeof z, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
    _exit(SPAWN_FAIL_EXIT);
}

static int map_ctl(const struct spawn_msg *m)
{
    void *p = (void *)(uintptr_t)m->ctl_addr;
    int rc = pp__map_at(p, (size_t)m->map_bytes, m->ctl_fd);
    if (rc < 0)
        return rc;
    if (((struct pp_ctl *)p)->magic != PP_CTL_MAGIC ||
        ((struct pp_ctl *)p)->nworkers != (uint32_t)m->nworkers)
        return -EINVAL;
    return 0;
}

typedef void init_fn(int, char **, char **);

/* The library takes over before the program's own constructors ran (the
 * program's objects are initialized after the libraries they need; with
 * the static library, ours sits among them). Python's spawn runs the main
 * module's top level in its workers; the C counterpart is to run those
 * constructors here: the program's DT_INIT and DT_INIT_ARRAY, or, when our
 * constructor is one of them, the ones after it. */
static void run_program_constructors(int argc, char **argv, char **envp)
{
    struct link_map *map = NULL;
    void *self = dlopen(NULL, RTLD_NOW | RTLD_NOLOAD);
    if (self == NULL || dlinfo(self, RTLD_DI_LINKMAP, &map) != 0 || map == NULL)
        return;
    uintptr_t init = 0, array = 0;
    size_t bytes = 0;
    for (const ElfW(Dyn) *d = map->l_ld; d->d_tag != DT_NULL; d++) {
        if (d->d_tag == DT_INIT)
            init = map->l_addr + d->d_un.d_ptr;
        else if (d->d_tag == DT_INIT_ARRAY)
            array = map->l_addr + d->d_un.d_ptr;
        else if (d->d_tag == DT_INIT_ARRAYSZ)
            bytes = d->d_un.d_val;
    }
    init_fn **fns = (init_fn **)array;
    size_t n = array ? bytes / sizeof *fns : 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (fns[i] == (init_fn *)spawn_entry)
            first = i + 1; /* linked in statically: what precedes us has run, _init too */
    if (first == 0 && init != 0)
        ((init_fn *)init)(argc, argv, envp);
    for (size_t i = first; i < n; i++)
        if (fns[i] != NULL && (uintptr_t)fns[i] != (uintptr_t)-1)
            fns[i](argc, argv, envp);
}

/* Sets up this process from the parent's message, or fails it. */
static _Noreturn void become_zygote(int sock, int argc, char **argv, char **envp)
{
    static struct spawn_msg m; /* big: not on the stack */
    struct pollfd p = {.fd = sock, .events = POLLIN};
    int rc;
    do
        rc = poll(&p, 1, SPAWN_WAIT_MS);
    while (rc < 0 && errno == EINTR);
    ssize_t got = rc > 0 ? recv(sock, &m, sizeof m, 0) : -1;
    if (got != (ssize_t)sizeof m || m.magic != SPAWN_MAGIC || m.nworkers <= 0)
        fail(sock, PP_ESPAWN);
    /* Nothing of ours goes further than this process's own children. */
    fcntl(m.ctl_fd, F_SETFD, FD_CLOEXEC);
    fcntl(m.wake_fd, F_SETFD, FD_CLOEXEC);
    fcntl(m.arena_fd, F_SETFD, FD_CLOEXEC);
    if ((rc = map_ctl(&m)) < 0)
        fail(sock, rc);
    close(m.ctl_fd);
    void *objects = mmap(NULL, sizeof(struct pp_objtab), PROT_READ, MAP_SHARED, m.objects_fd, 0);
    if (objects == MAP_FAILED)
        fail(sock, -errno);
    close(m.objects_fd);
    rc = pp__shm_adopt(m.arena_fd, (void *)(uintptr_t)m.arena_addr, (size_t)m.arena_size);
    if (rc < 0)
        fail(sock, rc);
    /* Our memory is in place: whatever they map cannot take its place. */
    booting = true;
    run_program_constructors(argc, argv, envp);
    booting = false;
    spawned_cfg = (struct pp_worker_cfg){
        .ctl = (struct pp_ctl *)(uintptr_t)m.ctl_addr,
        .wake_fd = m.wake_fd,
        .timing = m.timing != 0,
        .initarg = (void *)(uintptr_t)m.initarg,
        .max_tasks = m.max_tasks,
        .max_memory = m.max_memory,
        .soft_timeout_ns = m.soft_timeout_ns,
        .objects = objects,
    };
    if (m.has_init) {
        m.init.object[sizeof m.init.object - 1] = '\0';
        spawned_cfg.initializer = (int (*)(void *))(uintptr_t)pp__fnref_resolve(&m.init);
        if (spawned_cfg.initializer == NULL)
            fail(sock, PP_ENOTFOUND);
    }
    if (m.initarg_kind == INITARG_IN_OBJ) {
        m.initarg_ref.object[sizeof m.initarg_ref.object - 1] = '\0';
        spawned_cfg.initarg = pp__fnref_resolve(&m.initarg_ref);
        if (spawned_cfg.initarg == NULL)
            fail(sock, PP_ENOTFOUND);
    }
    struct pp_zmsg z = {.op = PP_Z_STARTED, .status = 0};
    while (send(sock, &z, sizeof z, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
    fflush(NULL); /* what the constructors printed, once: not again by each worker */
    pp__zygote_serve(&spawned_cfg, m.nworkers, sock, (pid_t)m.parent);
}

/* Runs in every process that loads the library, before main. Does nothing
 * unless this process was started by pp__spawn_start. */
__attribute__((constructor)) static void spawn_entry(int argc, char **argv, char **envp)
{
    const char *v = getenv(SPAWN_ENV);
    if (v == NULL)
        return;
    char *end;
    long fd = strtol(v, &end, 10);
    unsetenv(SPAWN_ENV); /* not for the workers' own children */
    struct stat st;
    if (*end != '\0' || fd < 0 || fd > INT32_MAX || fstat((int)fd, &st) != 0 ||
        !S_ISSOCK(st.st_mode))
        return; /* not ours after all: the program runs as usual */
    fcntl((int)fd, F_SETFD, FD_CLOEXEC);
    become_zygote((int)fd, argc, argv, envp);
}
