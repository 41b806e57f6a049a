#!/bin/sh
# run.sh <builddir>: runs every side of procpool's benchmark suite (procpool,
# Python's multiprocessing.Pool and ProcessPoolExecutor, the plain pthread
# pool, the serial loop) one after the other, then prints one table and
# writes it, with every run's raw figure, to <builddir>/bench-results.txt.
# Knobs (environment): see bench/README.md.
set -u
build=${1:-build-bench}
here=$(cd "$(dirname "$0")" && pwd)
raw="$build/bench-raw"
mkdir -p "$raw"
limit=${PP_BENCH_SIDE_TIMEOUT:-240}
python=${PYTHON:-python3}
sides=""

# run_side NAME COMMAND...: one column of the table.
run_side() {
    name=$1
    shift
    sides="$sides $name=$raw/$name.txt"
    echo "== $name" >&2
    : >"$raw/$name.txt"
    if [ ! -x "$1" ] && ! command -v "$1" >/dev/null 2>&1; then
        printf 'E\tside\t%s not built\n' "$1" >"$raw/$name.txt"
        echo "   $1 not built: skipped" >&2
        return
    fi
    timeout "$limit" "$@" >"$raw/$name.txt"
    rc=$?
    if [ $rc -ne 0 ]; then
        printf 'E\tside\texited with status %d (124: ran past %ss)\n' $rc "$limit" \
            >>"$raw/$name.txt"
        echo "   $name exited with status $rc" >&2
    fi
}

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
"$python" "$here/aggregate.py" --seconds $((t1 - t0)) --out "$build/bench-results.txt" $sides
