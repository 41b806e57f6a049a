/*
 * zygote: the single-threaded helper process that forks, kills and reaps
 * the workers of one pool.
 *
 * DESIGN: the parent forks exactly once per pool, in pp_pool_new. Every
 * worker, the first ones and every replacement, is forked by the zygote,
 * which has one thread and runs no user code after it started, so a parent
 * with threads (holding malloc or stdio locks at the wrong moment) is never
 * forked again. The zygote is the workers' real parent: it alone reaps them,
 * so killing a worker by pid can never hit a recycled pid, and the caller's
 * process never gets a child it did not make beyond the zygote itself.
 *
 * Deaths are noticed at once through a signalfd for SIGCHLD (blocked in the
 * zygote only, which is our process, not the caller's); the zygote then
 * reaps each of its own children by pid, never waitpid(-1).
 *
 * Lifelines: the zygote watches its command socket (end of file when the
 * parent process is gone, however it died) and its parent pid; workers get
 * PR_SET_PDEATHSIG from the zygote, which is single-threaded, so the signal
 * means the zygote died. A worker leads its own process group, so a kill
 * also ends whatever children a task forked. The zygote only uses
 * async-signal-safe calls and memory allocated before the fork.
 */
#include "zygote.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

struct child {
    pid_t pid; /* 0: none */
    uint32_t gen;
};

/* The zygote's own signal state: SIGCHLD blocked and read from `fd`;
 * `saved` is the mask it inherited, which workers get back. */
struct chld_watch {
    int fd;
    sigset_t saved;
};

int pp__zygote_send(int sock, uint32_t op, uint32_t id, uint32_t gen, int sig)
{
    struct pp_zmsg m = {.op = op, .id = id, .gen = gen, .sig = sig};
    for (;;) {
        ssize_t rc = send(sock, &m, sizeof m, MSG_NOSIGNAL);
        if (rc == (ssize_t)sizeof m)
            return 0;
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = sock, .events = POLLOUT};
            poll(&p, 1, 100);
            continue;
        }
        return rc < 0 ? -errno : -EIO;
    }
}

static void reply(int sock, uint32_t op, uint32_t id, uint32_t gen, pid_t pid, int status)
{
    struct pp_zmsg m = {.op = op, .id = id, .gen = gen, .pid = pid, .status = status};
    while (send(sock, &m, sizeof m, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
}

static _Noreturn void become_worker(const struct pp_worker_cfg *cfg, int sock,
                                    const struct chld_watch *cw, pid_t zygote, int id)
{
    if (cw->fd >= 0)
        close(cw->fd);
    sigprocmask(SIG_SETMASK, &cw->saved, NULL);
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != zygote)
        _exit(127);
    close(sock);
    pp__worker_main(cfg, id);
}

static void spawn(const struct pp_worker_cfg *cfg, struct child *kids, int n, int sock,
                  const struct chld_watch *cw, const struct pp_zmsg *m)
{
    if (m->id >= (uint32_t)n || kids[m->id].pid != 0) {
        reply(sock, PP_Z_EXITED, m->id, m->gen, 0, 127 << 8);
        return;
    }
    pid_t zygote = getpid();
    pid_t pid = fork();
    if (pid == 0)
        become_worker(cfg, sock, cw, zygote, (int)m->id);
    if (pid < 0) {
        reply(sock, PP_Z_EXITED, m->id, m->gen, 0, 127 << 8);
        return;
    }
    setpgid(pid, pid); /* also here, so a kill right away reaches the group */
    kids[m->id] = (struct child){.pid = pid, .gen = m->gen};
    reply(sock, PP_Z_SPAWNED, m->id, m->gen, pid, 0);
}

static void kill_child(struct child *c, int sig)
{
    if (c->pid == 0)
        return;
    kill(-c->pid, sig);
    kill(c->pid, sig);
}

/* Reaps child `id` if it has ended, and tells the parent. */
static void reap(struct child *kids, int id, int sock, bool block)
{
    struct child *c = &kids[id];
    int status = 0;
    pid_t rc;
    do
        rc = waitpid(c->pid, &status, block ? 0 : WNOHANG);
    while (rc < 0 && errno == EINTR);
    if (rc == 0)
        return;
    /* The task may have forked children that outlive the worker. */
    kill(-c->pid, SIGKILL);
    reply(sock, PP_Z_EXITED, (uint32_t)id, c->gen, c->pid, status);
    *c = (struct child){0};
}

static _Noreturn void shut_down(struct child *kids, int n, int sock)
{
    for (int i = 0; i < n; i++)
        kill_child(&kids[i], SIGKILL);
    for (int i = 0; i < n; i++)
        if (kids[i].pid != 0)
            reap(kids, i, sock, true);
    _exit(0);
}

/* Reads what SIGCHLD left in the signalfd; the deaths are found by reap(). */
static void drain(int fd)
{
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof si) == (ssize_t)sizeof si)
        ;
}

static _Noreturn void zygote_main(const struct pp_worker_cfg *cfg, struct child *kids, int n,
                                  int sock, const struct chld_watch *cw, pid_t parent)
{
    for (;;) {
        struct pollfd fds[2] = {{.fd = sock, .events = POLLIN}, {.fd = cw->fd, .events = POLLIN}};
        /* Without a signalfd, deaths are found on the 500 ms tick. */
        int rc = poll(fds, cw->fd >= 0 ? 2 : 1, 500);
        if (getppid() != parent)
            shut_down(kids, n, sock);
        if (rc < 0)
            continue;
        if (cw->fd >= 0 && (fds[1].revents & POLLIN))
            drain(cw->fd);
        for (int i = 0; i < n; i++)
            if (kids[i].pid != 0)
                reap(kids, i, sock, false);
        if (fds[0].revents & (POLLHUP | POLLERR))
            shut_down(kids, n, sock);
        if (!(fds[0].revents & POLLIN))
            continue;
        struct pp_zmsg m;
        ssize_t got = recv(sock, &m, sizeof m, MSG_DONTWAIT);
        if (got == 0)
            shut_down(kids, n, sock);
        if (got != (ssize_t)sizeof m)
            continue;
        if (m.op == PP_Z_SPAWN)
            spawn(cfg, kids, n, sock, cw, &m);
        else if (m.op == PP_Z_KILL && m.id < (uint32_t)n && kids[m.id].gen == m.gen)
            kill_child(&kids[m.id], m.sig);
        else if (m.op == PP_Z_QUIT)
            shut_down(kids, n, sock);
    }
}

/* In the zygote: take SIGCHLD through a signalfd. */
static void watch_children(struct chld_watch *cw)
{
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, &cw->saved);
    cw->fd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
}

_Noreturn void pp__zygote_serve(const struct pp_worker_cfg *cfg, int nworkers, int sock,
                                pid_t parent)
{
    struct child *kids = calloc((size_t)nworkers, sizeof *kids);
    if (kids == NULL)
        _exit(127);
    signal(SIGINT, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
    struct chld_watch cw;
    watch_children(&cw);
    zygote_main(cfg, kids, nworkers, sock, &cw, parent);
}

int pp__zygote_start(const struct pp_worker_cfg *cfg, int nworkers, pid_t *pid, int *sock)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    /* Allocated before the fork: the zygote must not call malloc. */
    struct child *kids = calloc((size_t)nworkers, sizeof *kids);
    if (kids == NULL) {
        close(sv[0]);
        close(sv[1]);
        return -ENOMEM;
    }
    pid_t parent = getpid();
    pid_t z = fork();
    if (z == 0) {
        /* Another thread may have written into stdio between the caller's
         * fflush and the fork: those bytes are the parent's to write. */
        __fpurge(stdout);
        __fpurge(stderr);
        close(sv[0]);
        setpgid(0, 0); /* not in the terminal's foreground group: Ctrl-C is the parent's */
        signal(SIGINT, SIG_IGN);
        signal(SIGCHLD, SIG_DFL);
        struct chld_watch cw;
        watch_children(&cw);
        zygote_main(cfg, kids, nworkers, sv[1], &cw, parent);
    }
    int err = errno;
    free(kids);
    close(sv[1]);
    if (z < 0) {
        close(sv[0]);
        return -err;
    }
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    *pid = z;
    *sock = sv[0];
    return 0;
}
