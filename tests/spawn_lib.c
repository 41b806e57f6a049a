/*
 * spawn_lib: a tiny shared object that test_spawn dlopen()s after its pool
 * exists, so that its functions are in no object the spawned zygote had.
 */
#include <stdint.h>

int spawn_lib_triple(const void *arg, void *result);
int spawn_lib_where(const void *arg, void *result);

static int offset = 1; /* static data: a spawned worker sees its initial value */

int spawn_lib_triple(const void *arg, void *result)
{
    *(int *)result = *(const int *)arg * 3 + offset - 1;
    return 0;
}

/* The address this process has for this very function. */
int spawn_lib_where(const void *arg, void *result)
{
    (void)arg;
    *(uint64_t *)result = (uint64_t)(uintptr_t)&spawn_lib_where;
    return 0;
}

int spawn_lib_init(void *arg);

/* An initializer that lives in this library. */
int spawn_lib_init(void *arg)
{
    (void)arg;
    return 0;
}
