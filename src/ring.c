/*
 * ring: wake-ups across the control block. The rings themselves are plain
 * atomics used in place by dispatch.c (parent) and worker.c (worker); what is
 * here is the sleep/wake handshake, kept in one place so that both sides
 * agree on it.
 *
 * The rule: a side that goes to sleep first announces it (a flag), then looks
 * once more for work, then sleeps. A side that hands over work publishes it
 * first, then reads the flag, and only then makes the system call. With
 * sequentially consistent fences between the two steps on each side, one of
 * them always sees the other, and a busy pool makes no system call at all.
 */
#include "ring.h"

#include <unistd.h>

size_t pp__ctl_size(uint32_t nworkers)
{
    size_t bytes = sizeof(struct pp_ctl) + (size_t)nworkers * sizeof(struct pp_slot);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (bytes + page - 1) / page * page;
}

void pp__ring_notify_parent(struct pp_ctl *ctl, int wake_fd)
{
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&ctl->parent_sleeping, memory_order_relaxed) &&
        atomic_exchange(&ctl->parent_sleeping, 0)) {
        uint64_t one = 1;
        ssize_t rc = write(wake_fd, &one, sizeof one);
        (void)rc; /* EAGAIN: the counter is already non-zero, the parent wakes */
    }
}

void pp__ring_wake_worker(struct pp_slot *slot)
{
    /* The doorbell moves only for a sleeper: its futex_wait compares the
     * doorbell it read before it announced itself, so a bump after that
     * announcement, which this fence lets us see, is never missed. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&slot->sleeping, memory_order_relaxed)) {
        atomic_fetch_add_explicit(&slot->doorbell, 1, memory_order_seq_cst);
        pp__futex_wake(&slot->doorbell, 1);
    }
}

void pp__ring_rouse_worker(struct pp_slot *slot)
{
    atomic_fetch_add_explicit(&slot->doorbell, 1, memory_order_seq_cst);
    pp__futex_wake(&slot->doorbell, 1);
}
