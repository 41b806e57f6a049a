#!/bin/sh
# spawn_side.sh <builddir>: the procpool-spawn column of bench/run.sh.
# bench_procpool with PP_START_SPAWN, workload 7 only (pool start-up to the
# first result, and close+join): that is where spawn differs. Tasks run in
# workers forked from the spawned zygote, the same code path as under fork,
# so workloads 1-6 and 8 would repeat the procpool column.
build=${1:-build-bench}
case "${PP_BENCH_ONLY:-}" in
7) ;;
*) exit 0 ;;
esac
export PP_BENCH_START=spawn PP_BENCH_SIDE=procpool-spawn
exec "$build/bench/bench_procpool"
