/* Placeholder until the arena lands: no arena, nothing shared. */
#include "shm.h"

int pp__shm_init(void)
{
    return 0;
}

bool pp__shm_contains(const void *p, size_t len)
{
    (void)p;
    (void)len;
    return false;
}

int pp__shm_fd(void)
{
    return -1;
}
