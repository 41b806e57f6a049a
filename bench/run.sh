#!/usr/bin/env bash
# run.sh <builddir>: runs every side of procpool's benchmark suite (procpool,
# Python's multiprocessing.Pool and ProcessPoolExecutor, the plain pthread
# pool, the serial loop), then prints one table and writes it, with every
# run's raw figure, to <builddir>/bench-results.txt.
# Workload by workload, each side in turn, each in a process of its own under
# `timeout`: a hang costs one cell, not the table, and a change in background
# load hits every side of a workload alike. The C sides (procpool, procpool
# linked statically, pthread, serial) take turns run by run, one process per
# run: on a VM whose speed moves from one second to the next
# (docs/performance.md, "Where a slow process loses its time"), the two sides
# of a ratio then meet the same moments. Knobs: see bench/README.md.
set -u
build=${1:-build-bench}
here=$(cd "$(dirname "$0")" && pwd)
raw="$build/bench-raw"
mkdir -p "$raw"
python=${PYTHON:-python3}
read -r -a workloads <<<"$(echo "${PP_BENCH_ONLY:-1 2 3 4 5 6 7 8}" | tr ',' ' ')"
reps=${PP_BENCH_REPS:-5}
turns=" procpool procpool-static pthread serial " # the sides that take turns run by run

# Seconds one workload of one side may take: a sound side needs a fraction.
limit_for() {
    case $1 in
    3 | 4 | 6) echo "${PP_BENCH_TIMEOUT:-120}" ;; # 3, 4: Pool on 200,000 tasks, 30-40 s
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
# The static library, workload 1 (bench/static_side.sh):
side procpool-static "$here/static_side.sh" "$build"
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
# run_side I W RUNS [quiet]: side I runs workload W, RUNS times over, in one
# process; quiet: without its progress lines (a turn after the first).
run_side() {
    local i=$1 out="$raw/${names[$1]}.txt" w=$2 runs=$3 quiet=${4:-} limit rc
    grep -q '^E	side	' "$out" && return
    limit=$(limit_for "$w")
    eval "set -- ${cmds[$1]}"
    if [ -n "$quiet" ]; then
        PP_BENCH_ONLY=$w PP_BENCH_REPS=$runs timeout "$limit" "$@" >>"$out" \
            2> >(grep -v '^  \[' >&2)
    else
        PP_BENCH_ONLY=$w PP_BENCH_REPS=$runs timeout "$limit" "$@" >>"$out"
    fi
    rc=$?
    if [ $rc -ne 0 ]; then
        printf 'E\tworkload %s\texited with status %d%s\n' "$w" $rc \
            "$([ $rc -eq 124 ] && echo " (ran past ${limit}s: hung?)")" >>"$out"
        echo "   ${names[$i]}, workload $w: exited with status $rc" >&2
    fi
}
takes_turns() { [[ $turns == *" ${names[$1]} "* ]]; }
# The round trip of a cache line between CPU 0 and CPU 1 just before each
# workload (bench_pthread pingpong): the speed of the moment it ran in.
pingpongs=""
pingpong() {
    timeout 10 "$build/bench/bench_pthread" pingpong 2>/dev/null |
        awk -F'\t' '$1 == "I" && $2 == "pingpong_ns" { print $3 }'
}
for w in "${workloads[@]}"; do
    echo "== workload $w" >&2
    pp_ns=$(pingpong)
    [ -n "$pp_ns" ] && pingpongs+="$w:$pp_ns "
    for ((r = 0; r < reps; r++)); do
        for i in "${!names[@]}"; do
            if takes_turns "$i"; then run_side "$i" "$w" 1 "$([ $r -gt 0 ] && echo quiet)"; fi
        done
    done
    for i in "${!names[@]}"; do
        if ! takes_turns "$i"; then run_side "$i" "$w" "$reps"; fi
    done
done
for i in "${!names[@]}"; do # runs per cell, not per process
    if takes_turns "$i"; then printf 'I\treps\t%d\n' "$reps" >>"$raw/${names[$i]}.txt"; fi
done
t1=$(date +%s.%N)

echo >&2
"$python" "$here/aggregate.py" --seconds "$(echo "$t0 $t1" | awk '{print $2 - $1}')" --load "$load0 $(load)" \
    --pingpong "$pingpongs" --out "$build/bench-results.txt" "${args[@]}"
