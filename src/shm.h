/*
 * shm: the shared arena behind pp_shm_alloc, and the internal calls other
 * layers make on it.
 */
#ifndef PP_SHM_H
#define PP_SHM_H

#include <stdbool.h>
#include <stddef.h>

/* Makes sure the arena exists in this process (reserving it if needed), so
 * that processes forked afterwards share it at the same address. Called by
 * pp_pool_new before it forks. Returns 0 or a negative errno. Thread-safe. */
int pp__shm_init(void);
/* True when [p, p + len) lies wholly inside the arena. Cannot fail. */
bool pp__shm_contains(const void *p, size_t len);
/* The arena's memfd, or -1 when there is no arena yet (for spawn). */
int pp__shm_fd(void);

/* The arena's address in *base and its size; 0 (and NULL) when there is
 * none yet. */
size_t pp__shm_region(void **base);
/* Maps `size` bytes of memfd `fd` (shared, not reserved) at exactly `addr`.
 * 0, -EEXIST when something is mapped there already, or another negative
 * errno. */
int pp__map_at(void *addr, size_t size, int fd);
/* A spawned process: maps the arena of memfd `fd` at `addr`, as its parent
 * has it, so that pointers into it mean the same bytes here. Returns 0,
 * -EEXIST when something of ours already lies there (the caller may try
 * another process), -EBUSY when this process has an arena already, or
 * another negative errno. */
int pp__shm_adopt(int fd, void *addr, size_t size);

#endif
