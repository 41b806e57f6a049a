#!/bin/sh
# run.sh <builddir>: runs every side of procpool's benchmark suite (procpool,
# Python's multiprocessing.Pool and ProcessPoolExecutor, the plain pthread
# pool, the serial loop) one after the other, then prints one table and
# writes it, with every run's raw figure, to <builddir>/bench-results.txt.
# Each workload of each side runs in a process of its own under `timeout`,
# so a hang costs one cell, not the table. Knobs: see bench/README.md.
set -u
build=${1:-build-bench}
here=$(cd "$(dirname "$0")" && pwd)
raw="$build/bench-raw"
mkdir -p "$raw"
# Seconds one workload of one side may take: a sound side needs a fraction.
limit_for() {
    case $1 in
    6) echo "${PP_BENCH_TIMEOUT:-120}" ;;
    7) echo "${PP_BENCH_TIMEOUT:-20}" ;;
    *) echo "${PP_BENCH_TIMEOUT:-60}" ;;
    esac
}
python=${PYTHON:-python3}
workloads=$(echo "${PP_BENCH_ONLY:-1 2 3 4 5 6 7 8}" | tr ',' ' ')
sides=""

# run_side NAME COMMAND...: one column of the table.
run_side() {
    name=$1
    shift
    out="$raw/$name.txt"
    sides="$sides $name=$out"
    : >"$out"
    if [ ! -x "$1" ] && ! command -v "$1" >/dev/null 2>&1; then
        printf 'E\tside\t%s not built\n' "$1" >"$out"
        echo "== $name: $1 not built, skipped" >&2
        return
    fi
    echo "== $name" >&2
    for w in $workloads; do
        limit=$(limit_for "$w")
        PP_BENCH_ONLY=$w timeout "$limit" "$@" >>"$out"
        rc=$?
        if [ $rc -ne 0 ]; then
            printf 'E\tworkload %s\texited with status %d%s\n' "$w" $rc \
                "$([ $rc -eq 124 ] && echo " (ran past ${limit}s: hung?)")" >>"$out"
            echo "   $name, workload $w: exited with status $rc" >&2
        fi
    done
}

load() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?"; }
load0=$(load)
t0=$(date +%s)
run_side procpool "$build/bench/bench_procpool"
run_side pool "$python" "$here/bench_py.py" pool
run_side executor "$python" "$here/bench_py.py" executor
run_side pthread "$build/bench/bench_pthread" pthread
run_side serial "$build/bench/bench_pthread" serial
# Issue 7 adds columns here, e.g.:
#   run_side procpool-spawn env PP_BENCH_START=spawn "$build/bench/bench_procpool"
#   run_side procpool-mpi env PP_BENCH_BACKEND=mpi mpirun -n 2 "$build/bench/bench_procpool"
t1=$(date +%s)

echo >&2
# shellcheck disable=SC2086 # $sides is a list of words
"$python" "$here/aggregate.py" --seconds $((t1 - t0)) --load "$load0 $(load)" \
    --out "$build/bench-results.txt" $sides
