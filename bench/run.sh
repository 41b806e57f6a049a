#!/usr/bin/env bash
# run.sh <builddir>: runs every side of procpool's benchmark suite (procpool,
# Python's multiprocessing.Pool and ProcessPoolExecutor, the plain pthread
# pool, the serial loop), then prints one table and writes it, with every
# run's raw figure, to <builddir>/bench-results.txt.
# Workload by workload, each side in turn, each in a process of its own under
# `timeout`: a hang costs one cell, not the table, and a change in background
# load hits every side of a workload alike. Knobs: see bench/README.md.
set -u
build=${1:-build-bench}
here=$(cd "$(dirname "$0")" && pwd)
raw="$build/bench-raw"
mkdir -p "$raw"
python=${PYTHON:-python3}
read -r -a workloads <<<"$(echo "${PP_BENCH_ONLY:-1 2 3 4 5 6 7 8}" | tr ',' ' ')"

# Seconds one workload of one side may take: a sound side needs a fraction.
limit_for() {
    case $1 in
    6) echo "${PP_BENCH_TIMEOUT:-120}" ;;
    7) echo "${PP_BENCH_TIMEOUT:-20}" ;;
    *) echo "${PP_BENCH_TIMEOUT:-60}" ;;
    esac
}

# The columns, in order: NAME and the command that prints its lines.
names=()
cmds=()
side() {
    names+=("$1")
    shift
    cmds+=("$(printf '%q ' "$@")")
}
side procpool "$build/bench/bench_procpool"
side pool "$python" "$here/bench_py.py" pool
side executor "$python" "$here/bench_py.py" executor
side pthread "$build/bench/bench_pthread" pthread
side serial "$build/bench/bench_pthread" serial
# The spawn start method, workload 7 (bench/spawn_side.sh):
side procpool-spawn "$here/spawn_side.sh" "$build"
# The MPI backend, workloads 1-4 (bench/mpi_side.sh):
side procpool-mpi "$here/mpi_side.sh" "$build"

load() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?"; }
load0=$(load)
t0=$(date +%s.%N)
args=()
for i in "${!names[@]}"; do
    out="$raw/${names[$i]}.txt"
    args+=("${names[$i]}=$out")
    : >"$out"
    eval "set -- ${cmds[$i]}"
    if [ ! -x "$1" ] && ! command -v "$1" >/dev/null 2>&1; then
        printf 'E\tside\t%s not built\n' "$1" >"$out"
        echo "== ${names[$i]}: $1 not built, skipped" >&2
    fi
done
for w in "${workloads[@]}"; do
    limit=$(limit_for "$w")
    echo "== workload $w" >&2
    for i in "${!names[@]}"; do
        out="$raw/${names[$i]}.txt"
        grep -q '^E	side	' "$out" && continue
        eval "set -- ${cmds[$i]}"
        PP_BENCH_ONLY=$w timeout "$limit" "$@" >>"$out"
        rc=$?
        if [ $rc -ne 0 ]; then
            printf 'E\tworkload %s\texited with status %d%s\n' "$w" $rc \
                "$([ $rc -eq 124 ] && echo " (ran past ${limit}s: hung?)")" >>"$out"
            echo "   ${names[$i]}, workload $w: exited with status $rc" >&2
        fi
    done
done
t1=$(date +%s.%N)

echo >&2
"$python" "$here/aggregate.py" --seconds "$(echo "$t0 $t1" | awk '{print $2 - $1}')" --load "$load0 $(load)" \
    --out "$build/bench-results.txt" "${args[@]}"
