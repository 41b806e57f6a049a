/*
 * mpi_map: the same pp_map, spread over MPI ranks (docs/distributed.md).
 *
 *     mpirun -n 3 ./mpi_map            # one machine: rank 0 + 2 serving ranks
 *     srun -N 4 --ntasks-per-node=1 ./mpi_map   # a Slurm allocation
 *
 * Every rank runs this same program and calls pp_pool_new. Rank 0 gets the
 * pool and runs the rest of main; every other rank serves it, runs tasks on
 * its own local workers, and ends inside pp_pool_new when rank 0 frees the
 * pool. The task counts the primes below each input and says on which host
 * and rank it ran. Exits non-zero on any unexpected outcome.
 *
 * Built only when an MPI library is found; it needs no MPI header: procpool
 * initializes and finalizes MPI itself.
 */
#define _POSIX_C_SOURCE 200809L
#include <procpool.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct answer {
    long primes;
    int rank; /* the MPI rank that ran it, from the launcher's environment */
    char host[64];
};

static int launcher_rank(void)
{
    const char *v = getenv("OMPI_COMM_WORLD_RANK"); /* Open MPI */
    if (v == NULL)
        v = getenv("PMI_RANK"); /* MPICH, Intel MPI */
    if (v == NULL)
        v = getenv("SLURM_PROCID"); /* srun */
    return v ? atoi(v) : -1;
}

/* The task: runs in a worker process of some serving rank. */
static int count_primes(const void *arg, void *result)
{
    long below = *(const long *)arg;
    struct answer *a = result;
    for (long n = 2; n < below; n++) {
        long d = 2;
        while (d * d <= n && n % d != 0)
            d++;
        a->primes += d * d > n;
    }
    a->rank = launcher_rank();
    gethostname(a->host, sizeof a->host - 1);
    return 0;
}

int main(void)
{
    enum { N = 24 };
    long inputs[N];
    struct answer answers[N];
    for (int i = 0; i < N; i++)
        inputs[i] = 20000 + 5000 * i;

    /* workers counts per serving rank: 2 processes on each. */
    pp_pool *pool = pp_pool_new(&(pp_options){.workers = 2, .backend = PP_BACKEND_MPI});
    if (pool == NULL) { /* ENOTSUP: this procpool was built without MPI */
        perror("pp_pool_new");
        return 1;
    }
    /* Only rank 0 gets here. */
    pp_error err;
    int rc = pp_map(pool, count_primes, inputs, N, sizeof inputs[0], answers, sizeof answers[0], 1,
                    &err);
    if (rc != 0) {
        fprintf(stderr, "pp_map: %s (item %zu: %s)\n", pp_strerror(rc), err.index, err.message);
        pp_pool_free(pool);
        return 1;
    }
    pp_stats st;
    pp_pool_stats(pool, &st);
    printf("%d workers\n", st.workers);
    for (int i = 0; i < N; i++)
        printf("primes below %6ld: %5ld   (rank %d on %s)\n", inputs[i], answers[i].primes,
               answers[i].rank, answers[i].host);
    pp_close(pool);
    pp_join(pool);
    pp_pool_free(pool); /* the serving ranks end now; MPI is finalized */
    return answers[0].primes == 2262 ? 0 : 1;
}
