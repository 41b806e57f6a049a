/*
 * tour: runs the examples one after another, as `make demo` does.
 *
 * Each example is a binary beside this one (found through /proc/self/exe),
 * run by fork + exec with a header line before it. An example marked
 * optional is skipped quietly when its binary is not there. The tour exits
 * non-zero if any example fails, is killed, or runs past its time limit.
 * To add an example, add a line to the table below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const struct example {
    const char *name;
    const char *python; /* what it shows, in Python's words */
    bool optional;      /* skipped quietly when not built */
} examples[] = {
    {"squares", "pool.map(square, [1, 2, 3, 4, 5])", false},
    {"cube_starmap", "pool.starmap(cube, [(2, 2), (3, 3), (4, 4)])", false},
    {"apply_async", "pool.apply_async(cube, (2, 3), callback=print_result)", false},
    {"imap", "pool.imap(square, ...) and pool.imap_unordered(square, ...)", false},
    {"shared_counter", "Value('i', 0) + Lock() shared by 4 tasks", true},
    {"queue_pc", "a Queue between producers and consumers", true},
    {"crash", "a segfault, an abort(), an error and a hang: Python's map would hang", false},
    {"progress", "a live progress bar with rate and ETA from pp_pool_stats (Python has none)",
     false},
    {"batch", "pool.map over 10M tiny items, then a run of items per call (Python has none)",
     false},
};

enum { N_EXAMPLES = sizeof examples / sizeof examples[0] };
static const double TIME_LIMIT = 10.0; /* seconds per example; the tour takes ~4 s */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Runs one binary; returns its wait status, or -1 if it could not start. */
static int run(const char *path, const char *name)
{
    fflush(NULL); /* nothing buffered here may be written twice */
    pid_t pid = fork();
    if (pid < 0) {
        perror("tour: fork");
        return -1;
    }
    if (pid == 0) {
        execl(path, name, (char *)NULL);
        fprintf(stderr, "tour: cannot run %s: %s\n", path, strerror(errno));
        _exit(127);
    }
    double deadline = now() + TIME_LIMIT;
    int status;
    for (;;) {
        pid_t got = waitpid(pid, &status, WNOHANG);
        if (got == pid)
            return status;
        if (got < 0 && errno != EINTR) {
            perror("tour: waitpid");
            return -1;
        }
        if (now() > deadline) {
            fprintf(stderr, "tour: %s ran past %.0f s; killing it\n", name, TIME_LIMIT);
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            return status;
        }
        nanosleep(&(struct timespec){.tv_nsec = 2 * 1000 * 1000}, NULL);
    }
}

int main(void)
{
    char dir[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (len < 0) {
        perror("tour: readlink /proc/self/exe");
        return 1;
    }
    dir[len] = '\0';
    char *slash = strrchr(dir, '/');
    if (slash != NULL)
        *slash = '\0';

    int ran = 0, failed = 0;
    double start = now();
    for (int i = 0; i < N_EXAMPLES; i++) {
        const struct example *e = &examples[i];
        char path[PATH_MAX + 64];
        snprintf(path, sizeof path, "%s/%s", dir, e->name);
        if (access(path, X_OK) != 0) {
            if (e->optional)
                continue;
            fprintf(stderr, "tour: %s is missing (%s)\n", e->name, path);
            failed++;
            continue;
        }
        printf("%s==> %s: %s\n", ran ? "\n" : "", e->name, e->python);
        double t0 = now();
        int status = run(path, e->name);
        ran++;
        if (status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            printf("    (%s: ok, %.2f s)\n", e->name, now() - t0);
            continue;
        }
        failed++;
        fflush(stdout);
        if (status == -1)
            fprintf(stderr, "tour: %s did not start\n", e->name);
        else if (WIFSIGNALED(status))
            fprintf(stderr, "tour: %s FAILED: killed by signal %d (%s)\n", e->name,
                    WTERMSIG(status), strsignal(WTERMSIG(status)));
        else
            fprintf(stderr, "tour: %s FAILED: exit status %d\n", e->name, WEXITSTATUS(status));
    }
    printf("\ntour: %d example%s run, %d failed, %.1f s\n", ran, ran == 1 ? "" : "s", failed,
           now() - start);
    return failed ? 1 : 0;
}
