#!/bin/sh
# make check-valgrind [SUITES="test_a test_b"]: every test under valgrind's memcheck, in a build
# without sanitizers. Every process (the test, the pool's helper, every
# worker) writes its own log; any error, or any leak that is definitely or
# indirectly lost, fails the run. The tests run at a tenth of their size
# (PP_VALGRIND). test_hostile is left out: its tasks corrupt memory on
# purpose, so its workers' reports are the point, not a finding.
#
# The helper reaps on SIGCHLD through a signalfd, which memcheck delivers
# at once; still, everything runs 20-50 times slower, so every test gets
# 900 s, and its own limit is scaled by 20 (PP_TEST_TIMEOUT_SCALE).
set -e
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
b=build-valgrind
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Debug -DPP_EXAMPLES=OFF -DPP_TEST_TIMEOUT_SCALE=20 >/dev/null
cmake --build $b -j "$(nproc)" >/dev/null
logs=$b/valgrind-logs
rm -rf "$logs"
mkdir -p "$logs"
status=0
# Arguments name suites (test_crash ...); none: all of them.
if [ $# -gt 0 ]; then
  set -- $(for n in "$@"; do echo "$b/tests/$n"; done)
else
  set -- $b/tests/test_*
fi
for t in "$@"; do
  name=$(basename "$t")
  [ "$name" = test_hostile ] && continue
  mkdir -p "$logs/$name"
  start=$(date +%s)
  if ! PP_VALGRIND=1 valgrind -q --tool=memcheck --trace-children=yes --leak-check=full \
         --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect \
         --log-file="$logs/$name/%p.log" "$t" --jobs 1 --timeout 900 >"$logs/$name.out" 2>&1; then
    # Not the verdict: under memcheck everything is 20-50 times slower and
    # promises about time (guest's 1 s after a parent's death, tests'
    # own limits) may not hold. Memcheck's findings below are the verdict.
    echo "valgrind: $name: some tests failed under valgrind (see $logs/$name.out)"
  fi
  bad=$(grep -l -E "ERROR SUMMARY: [1-9]|definitely lost: [1-9]|indirectly lost: [1-9]|Invalid (read|write)|uninitialised" \
        "$logs/$name"/*.log 2>/dev/null || true)
  if [ -n "$bad" ]; then
    echo "valgrind: $name: errors in $(echo "$bad" | wc -l) process(es):"
    for f in $bad; do head -n 40 "$f"; done
    status=1
  else
    echo "valgrind: $name: clean ($(ls "$logs/$name" | wc -l) processes, $(( $(date +%s) - start )) s)"
  fi
done
exit $status
