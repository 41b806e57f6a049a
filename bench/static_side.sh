#!/bin/sh
# static_side.sh <builddir>: the procpool-static column of bench/run.sh.
# bench_procpool linked to libprocpool.a instead of libprocpool.so, workload
# 1 only: maps of a task of a few nanoseconds, where it shows that the
# library's item loop then sits beside the task (docs/performance.md, "Bulk
# maps"). The other workloads cost the same either way, within the noise.
build=${1:-build-bench}
case "${PP_BENCH_ONLY:-}" in
1) ;;
*) exit 0 ;;
esac
export PP_BENCH_SIDE=procpool-static
exec "$build/bench/bench_procpool_static"
