#!/bin/sh
# mpi_side.sh <builddir>: the procpool-mpi column of bench/run.sh.
# bench_procpool under mpirun with PP_BACKEND_MPI: rank 0 holds the pool and
# one serving rank runs PP_BENCH_WORKERS workers (default: online CPUs), the
# same number as the fork column, so the difference is what MPI costs.
# Workloads 1-4 only (the others print nothing: "-" in the table).
build=${1:-build-bench}
case "${PP_BENCH_ONLY:-}" in
1 | 2 | 3 | 4) ;;
*) exit 0 ;;
esac
if ! command -v mpirun >/dev/null 2>&1; then
    printf 'E\tside\tmpirun not found (install openmpi-bin)\n'
    exit 0
fi
export PP_BENCH_BACKEND=mpi PP_BENCH_SIDE=procpool-mpi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
exec mpirun -n "${PP_BENCH_RANKS:-2}" "$build/bench/bench_procpool"
