/*
 * shared_counter: Python's
 *
 *     def add(counter, lock):
 *         for _ in range(10000):
 *             with lock:
 *                 counter.value += 1
 *
 *     counter, lock = Value('i', 0), Lock()
 *     with Pool(4) as pool:
 *         for _ in range(4):
 *             pool.apply_async(add, (counter, lock))
 *         pool.close(); pool.join()
 *     print("Final value:", counter.value)
 *
 * in C: the int lives in the shared arena (pp_shm_alloc), and both it and the
 * lock cross to the workers as pointers inside the task's argument.
 */
#include <procpool.h>

#include <stdio.h>
#include <stdlib.h>

struct counter_arg {
    int *counter; /* in the arena: the same address in every worker */
    pp_lock *lock;
};

static int add(const void *arg, void *result)
{
    const struct counter_arg *a = arg;
    (void)result;
    for (int i = 0; i < 10000; i++) {
        int rc = pp_lock_acquire(a->lock, -1);
        if (rc != 0 && rc != PP_EOWNERDEAD)
            return pp_fail(1, "lock: %s", pp_strerror(rc));
        *a->counter += 1;
        pp_lock_release(a->lock);
    }
    return 0;
}

int main(void)
{
    struct counter_arg arg = {.counter = pp_shm_alloc(sizeof(int)), .lock = pp_lock_new()};
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 4});
    if (!arg.counter || !arg.lock || !pool) {
        perror("setup");
        return 1;
    }
    pp_async *task[4];
    for (int i = 0; i < 4; i++)
        task[i] = pp_apply_async(pool, add, &arg, sizeof arg, 0, NULL, NULL, NULL);
    pp_close(pool);
    pp_join(pool);
    int failed = 0;
    for (int i = 0; i < 4; i++) {
        pp_error err;
        if (!task[i] || pp_async_get(task[i], NULL, -1, &err) != 0) {
            fprintf(stderr, "task %d failed: %s\n", i, task[i] ? err.message : "not submitted");
            failed = 1;
        }
        pp_async_free(task[i]);
    }
    pp_pool_free(pool);
    int value = *arg.counter;
    printf("Final value: %d\n", value);
    pp_lock_free(arg.lock);
    pp_shm_free(arg.counter);
    return failed || value != 40000;
}
