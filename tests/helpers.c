/* helpers: see helpers.h. */
#include "helpers.h"

#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

pid_t th_fork(void)
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

int th_wait(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int th_kill(pid_t pid)
{
    kill(pid, SIGKILL);
    return th_wait(pid);
}

void th_pipe(int fds[2])
{
    if (pipe(fds) != 0)
        abort();
}

void th_send(int fd, long v)
{
    if (write(fd, &v, sizeof v) != sizeof v)
        abort();
}

long th_recv(int fd)
{
    long v;
    ssize_t n;
    while ((n = read(fd, &v, sizeof v)) < 0 && errno == EINTR)
        ;
    return n == sizeof v ? v : -1;
}

void th_wait_word(_Atomic uint32_t *word, uint32_t value)
{
    /* the 1 ms limit covers words that nobody wakes */
    struct timespec ts = {0, 1000000};
    uint32_t v;
    while ((v = atomic_load(word)) != value)
        syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, v, &ts, NULL, 0);
}

void th_wait_futex_sleep(pid_t pid)
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
