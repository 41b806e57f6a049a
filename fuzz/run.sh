#!/bin/sh
# fuzz/run.sh SECONDS HARNESS... — builds the harnesses (fuzz/build.sh) and
# runs each for SECONDS; fails if any finds something. The corpus is kept in
# build-fuzz/corpus/HARNESS between runs; what a finding left is in
# build-fuzz/artifacts, its log in build-fuzz/HARNESS.log.
set -e
top=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-60}
shift
out=$top/build-fuzz
"$top/fuzz/build.sh" "$out"
status=0
for h in "$@"; do
  mkdir -p "$out/corpus/$h" "$out/artifacts"
  log="$out/$h.log"
  if "$out/$h" -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 \
       -artifact_prefix="$out/artifacts/$h-" "$out/corpus/$h" >"$log" 2>&1; then
    echo "fuzz: $h: $(grep -o 'Done [0-9]* runs in [0-9]* second' "$log"), no finding"
  else
    tail -n 60 "$log"
    echo "fuzz: $h FOUND SOMETHING (log: $log, input: $out/artifacts/)"
    status=1
  fi
done
exit $status
