#!/usr/bin/env bash
# scaling.sh <builddir>: how each side's figures move with the number of
# workers. Runs procpool, the pthread pool and Python's Pool on a few
# workloads at 1, 2, 4, ... workers up to the CPU count (PP_SCALING_WORKERS
# overrides the list), then prints one table per workload: a row per worker
# count, a column per side, procpool's ratio to each. Written to
# <builddir>/scaling-results.txt as well; raw lines in <builddir>/scaling-raw/.
# The C sides take turns run by run, as in run.sh; the same knobs apply
# (PP_BENCH_REPS, default 3 here; PP_BENCH_ONLY, default 1,2,4,6,8;
# PP_BENCH_W6_TASKS, default 64 here).
set -u
build=${1:-build-bench}
here=$(cd "$(dirname "$0")" && pwd)
raw="$build/scaling-raw"
python=${PYTHON:-python3}
cpus=$(getconf _NPROCESSORS_ONLN)
if [ -z "${PP_SCALING_WORKERS:-}" ]; then
    PP_SCALING_WORKERS=""
    for ((w = 1; w < cpus; w *= 2)); do PP_SCALING_WORKERS+="$w "; done
    PP_SCALING_WORKERS+="$cpus"
fi
read -r -a counts <<<"$PP_SCALING_WORKERS"
read -r -a workloads <<<"$(echo "${PP_BENCH_ONLY:-1 2 4 6 8}" | tr ',' ' ')"
reps=${PP_BENCH_REPS:-3}
export PP_BENCH_W6_TASKS=${PP_BENCH_W6_TASKS:-64}
for prog in "$build/bench/bench_procpool" "$build/bench/bench_pthread"; do
    [ -x "$prog" ] || { echo "scaling.sh: $prog not built (make bench builds it)" >&2; exit 1; }
done
rm -rf "$raw"
mkdir -p "$raw"

# one SIDE W WORKLOAD RUNS: appends that side's lines for W workers.
one() {
    local side=$1 w=$2 wl=$3 runs=$4 cmd
    case $side in
    procpool) cmd=("$build/bench/bench_procpool") ;;
    pthread) cmd=("$build/bench/bench_pthread" pthread) ;;
    pool) cmd=("$python" "$here/bench_py.py" pool) ;;
    esac
    PP_BENCH_WORKERS=$w PP_BENCH_ONLY=$wl PP_BENCH_REPS=$runs timeout 120 "${cmd[@]}" \
        >>"$raw/$side-$w.txt" 2>/dev/null ||
        echo "   $side, $w workers, workload $wl: exited with status $?" >&2
}
for w in "${counts[@]}"; do
    echo "== $w workers" >&2
    for wl in "${workloads[@]}"; do
        for ((r = 0; r < reps; r++)); do
            one procpool "$w" "$wl" 1
            one pthread "$w" "$wl" 1
        done
        one pool "$w" "$wl" "$reps"
    done
done
"$python" "$here/scaling.py" "$raw" "${counts[@]}" | tee "$build/scaling-results.txt"
