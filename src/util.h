/*
 * util: clocks, deadlines and futexes shared by every layer.
 *
 * DESIGN: all waiting in procpool is on absolute CLOCK_MONOTONIC deadlines
 * (nanoseconds), so a wait that wakes spuriously or is interrupted simply
 * waits again for what is left. Futexes here are never FUTEX_PRIVATE: the
 * words they name live in MAP_SHARED memory used by several processes.
 */
#ifndef PP_UTIL_H
#define PP_UTIL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define PP_INTERNAL  __attribute__((visibility("hidden")))
#define PP_CACHELINE 64
#define PP_FOREVER   INT64_MAX

/* Monotonic clock in nanoseconds. Cannot fail. */
int64_t pp__now_ns(void);
/* Absolute deadline for a Python-style timeout: negative = PP_FOREVER,
 * 0 = now (poll), otherwise now + timeout. NaN counts as -1 (forever is
 * never what a NaN meant, but it is what Python does with None). */
int64_t pp__deadline(double timeout);
/* Milliseconds left until deadline for poll(): -1 forever, 0 if passed. */
int pp__ms_left(int64_t deadline);

/* Sleeps while *word == expected, until woken or the deadline passes.
 * Returns 0 when woken or the value differed, -ETIMEDOUT past the deadline.
 * Spurious returns are possible: callers re-check their condition. */
int pp__futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t deadline);
/* Wakes up to n waiters (INT32_MAX: all). */
void pp__futex_wake(_Atomic uint32_t *word, int n);

/* A CPU hint for spin loops. */
static inline void pp__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* memcpy for the sizes of most results without a call: an item handed
 * back costs tens of nanoseconds, and glibc's memmove a few of them. */
static inline void pp__copy_small(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (n >= 8 && n <= 16) {
        uint64_t a, b;
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
        memcpy(d, &a, 8);
        memcpy(d + n - 8, &b, 8);
    } else if (n >= 4 && n < 8) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        memcpy(d, &a, 4);
        memcpy(d + n - 4, &b, 4);
    } else {
        memcpy(d, s, n);
    }
}

#endif
