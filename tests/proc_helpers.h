/*
 * proc_helpers: small generic helpers for tests that fork real processes
 * (header-only, so each test that needs them just includes this).
 * Children end with _exit; the parent asserts on their exit codes.
 *
 * th_fork:      fflush(NULL), then fork(); aborts if fork fails. The child is
 *               killed when the test process dies.
 * th_wait:      reaps pid; its exit code, or 128 + the signal that killed it.
 * th_kill:      SIGKILLs pid and reaps it.
 * th_pipe, th_send, th_recv: pass longs between processes (-1 at EOF).
 * th_wait_word: sleeps until *word == value (futex wake, or looks again
 *               every millisecond).
 * th_wait_futex_sleep: waits until pid sleeps in a futex wait (its
 *               /proc/PID/wchan says so).
 */
#ifndef PP_TEST_PROC_HELPERS_H
#define PP_TEST_PROC_HELPERS_H

#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static inline pid_t th_fork(void)
{
    fflush(NULL);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        abort();
    if (pid == 0) { /* a failed test must not leave children behind */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(99);
    }
    return pid;
}

static inline int th_wait(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static inline int th_kill(pid_t pid)
{
    kill(pid, SIGKILL);
    return th_wait(pid);
}

static inline void th_pipe(int fds[2])
{
    if (pipe(fds) != 0)
        abort();
}

static inline void th_send(int fd, long v)
{
    if (write(fd, &v, sizeof v) != sizeof v)
        abort();
}

static inline long th_recv(int fd)
{
    long v;
    ssize_t n;
    while ((n = read(fd, &v, sizeof v)) < 0 && errno == EINTR)
        ;
    return n == sizeof v ? v : -1;
}

static inline void th_wait_word(_Atomic uint32_t *word, uint32_t value)
{
    /* the 1 ms limit covers words that nobody wakes */
    struct timespec ts = {0, 1000000};
    uint32_t v;
    while ((v = atomic_load(word)) != value)
        syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, v, &ts, NULL, 0);
}

static inline void th_wait_futex_sleep(pid_t pid)
{
    char path[64], buf[128];
    snprintf(path, sizeof path, "/proc/%d/wchan", (int)pid);
    for (;;) {
        FILE *f = fopen(path, "r");
        size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        if (f)
            fclose(f);
        buf[n] = 0;
        if (strstr(buf, "futex"))
            return;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

#endif
