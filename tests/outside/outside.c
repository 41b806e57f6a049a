/* An outside program: built against the installed library only (pkg-config
 * or find_package), it calls every call of the pool part of the API. */
#include <errno.h>
#include <procpool.h>
#include <stdio.h>
#include <string.h>

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "outside: check failed at line %d: %s\n", __LINE__, #c);               \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

static int init_ok(void *arg)
{
    return *(int *)arg;
}

static int square(const void *arg, void *result)
{
    int x = *(const int *)arg;
    if (x < 0)
        return pp_fail(7, "negative %d", x);
    *(int *)result = x * x + (pp_task_should_stop() ? 1000000 : 0);
    return 0;
}

static int seen_callbacks;
static void on_result(const void *result, void *userdata)
{
    (void)userdata;
    seen_callbacks += *(const int *)result == 49;
}
static void on_error(const pp_error *err, void *userdata)
{
    (void)err;
    (void)userdata;
}

static int count_to;
static int source(void *state, void *arg)
{
    int *next = state;
    if (*next >= count_to)
        return 0;
    *(int *)arg = (*next)++;
    return 1;
}

int main(void)
{
    static int zero = 0; /* static: crosses to spawned workers too (PROCPOOL_START=spawn) */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2,
                                              .initializer = init_ok,
                                              .initarg = &zero,
                                              .max_tasks_per_child = 100,
                                              .task_timeout = 30});
    CHECK(pool != NULL);
    CHECK(pp_worker_id() == -1);
    int in[10], out[10];
    for (int i = 0; i < 10; i++)
        in[i] = i;
    pp_error err;
    CHECK(pp_map(pool, square, in, 10, sizeof(int), out, sizeof(int), 0, &err) == 0);
    CHECK(out[9] == 81);
    int x = -3, y = 0;
    CHECK(pp_apply(pool, square, &x, sizeof x, &y, sizeof y, &err) == PP_ETASK);
    CHECK(err.status == 7 && strcmp(err.message, "negative -3") == 0);
    CHECK(strlen(pp_strerror(PP_ECRASH)) > 0);

    x = 7;
    pp_async *a =
        pp_apply_async(pool, square, &x, sizeof x, sizeof(int), on_result, on_error, NULL);
    CHECK(a != NULL);
    CHECK(pp_async_wait(a, -1) == 0);
    CHECK(pp_async_ready(a) && pp_async_successful(a));
    CHECK(pp_async_get(a, &y, 0, NULL) == 0 && y == 49);
    CHECK(seen_callbacks == 1);
    CHECK(pp_async_cancel(a) == -EALREADY);
    pp_async_free(a);

    pp_async *m = pp_map_async(pool, square, in, 10, sizeof(int), sizeof(int), 0, NULL, NULL, NULL);
    CHECK(pp_async_get(m, out, -1, NULL) == 0 && out[3] == 9);
    pp_async_free(m);

    for (int ordered = 0; ordered < 2; ordered++) {
        pp_iter *it = ordered
                          ? pp_imap(pool, square, in, 10, sizeof(int), sizeof(int), 1)
                          : pp_imap_unordered(pool, square, in, 10, sizeof(int), sizeof(int), 2);
        CHECK(it != NULL);
        size_t index, n = 0;
        int r, rc;
        while ((rc = pp_iter_next(it, &r, &index, -1, NULL)) == 1) {
            CHECK(r == in[index] * in[index]);
            CHECK(!ordered || index == n);
            n++;
        }
        CHECK(rc == 0 && n == 10);
        pp_iter_free(it);
    }
    int next = 0;
    count_to = 50;
    pp_iter *it = pp_imap_source(pool, square, source, &next, sizeof(int), sizeof(int), 4, 8, true);
    size_t index;
    int r, n = 0;
    while (pp_iter_next(it, &r, &index, -1, NULL) == 1)
        CHECK(r == (int)(index * index) && (size_t)n++ == index);
    CHECK(n == 50);
    pp_iter_free(it);

    pp_stats st;
    CHECK(pp_pool_stats(pool, &st) == 0 && st.workers == 2 && st.completed >= 80);
    CHECK(pp_join(pool) == -EINVAL);
    CHECK(pp_close(pool) == 0);
    CHECK(pp_apply(pool, square, &x, sizeof x, &y, sizeof y, NULL) == PP_ECLOSED);
    CHECK(pp_join(pool) == 0);
    pp_pool_free(pool);

    pool = pp_pool_new(NULL);
    CHECK(pool != NULL);
    CHECK(pp_terminate(pool) == 0);
    CHECK(pp_join(pool) == 0);
    pp_pool_free(pool);
    printf("outside: every pool call works through the installed library\n");
    return 0;
}
