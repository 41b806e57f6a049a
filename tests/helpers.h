/*
 * helpers: small generic helpers for tests that fork real processes.
 * Children end with _exit; the parent asserts on their exit codes.
 */
#ifndef PP_TEST_HELPERS_H
#define PP_TEST_HELPERS_H

#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

/* fflush(NULL), then fork(). Aborts the test process if fork fails. The
 * child is killed when the test process dies. */
pid_t th_fork(void);
/* Reaps pid. Returns its exit code, or 128 + the signal that killed it. */
int th_wait(pid_t pid);
/* SIGKILLs pid and reaps it. Returns 128 + SIGKILL when it was killed. */
int th_kill(pid_t pid);
/* A pipe used to pass ints between processes. */
void th_pipe(int fds[2]);
void th_send(int fd, long v);
/* Blocks for the next value; -1 on end of file. */
long th_recv(int fd);
/* Sleeps until *word == value (woken through a futex wake, or looks again
 * every millisecond). */
void th_wait_word(_Atomic uint32_t *word, uint32_t value);

/* Waits until pid sleeps in a futex wait (seen in /proc/PID/wchan). */
void th_wait_futex_sleep(pid_t pid);

#endif
