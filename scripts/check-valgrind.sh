#!/bin/sh
# make check-valgrind [SUITES="test_a test_b"]: every test under valgrind's
# memcheck, in a build without sanitizers. Every process (the test, the
# pool's helper, every worker) writes its own log; any error, or any leak
# that is definitely or indirectly lost, fails the run. The tests run at a
# tenth of their size (PP_VALGRIND). test_hostile is left out: its tasks
# corrupt memory on purpose, so its workers' reports are the point, not a
# finding.
#
# --fair-sched: valgrind runs one thread at a time, and its default lock lets
# a few busy threads (test_threads, spawn's parent_with_threads) starve the
# one that makes progress for many minutes.
#
# Everything runs 20-50 times slower under memcheck, so every test gets
# 900 s, and its own limit is scaled by 20 (PP_TEST_TIMEOUT_SCALE): a test
# cut short is a test whose memory was not checked.
#
# Knobs: PP_VALGRIND_JOBS (suites at a time, default 1: on a 2-core machine
# one suite already keeps both cores busy), PP_VALGRIND_BUILD (the build
# folder), PP_VALGRIND_NOBUILD=1 (use that folder as it is).
set -e
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
b=${PP_VALGRIND_BUILD:-build-valgrind}
jobs=${PP_VALGRIND_JOBS:-1}
if [ -z "${PP_VALGRIND_NOBUILD:-}" ]; then
  cmake -S . -B "$b" -DCMAKE_BUILD_TYPE=Debug -DPP_EXAMPLES=OFF -DPP_TEST_TIMEOUT_SCALE=20 >/dev/null
  cmake --build "$b" -j "$(nproc)" >/dev/null
fi
logs=$b/valgrind-logs
mkdir -p "$logs"

# run_suite NAME: runs it, writes its verdict to $logs/NAME.verdict.
run_suite() {
  name=$1
  rm -rf "${logs:?}/$name" "$logs/$name.out" "$logs/$name.verdict"
  mkdir -p "$logs/$name"
  start=$(date +%s)
  if ! PP_VALGRIND=1 valgrind -q --tool=memcheck --fair-sched=yes --trace-children=yes --leak-check=full \
         --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect \
         --log-file="$logs/$name/%p.log" "$b/tests/$name" --jobs 1 --timeout 900 \
         >"$logs/$name.out" 2>&1; then
    # Not the verdict: under memcheck promises about time (guest's 1 s
    # after a parent's death) may not hold. Memcheck's findings are.
    echo "valgrind: $name: some tests failed under valgrind (see $logs/$name.out)" \
      >>"$logs/$name.verdict"
  fi
  bad=$(grep -l -E "ERROR SUMMARY: [1-9]|definitely lost: [1-9]|indirectly lost: [1-9]|Invalid (read|write)|uninitialised" \
        "$logs/$name"/*.log 2>/dev/null || true)
  if [ -n "$bad" ]; then
    {
      echo "valgrind: $name: errors in $(echo "$bad" | wc -l) process(es):"
      for f in $bad; do head -n 40 "$f"; done
      echo "FAILED"
    } >>"$logs/$name.verdict"
  else
    echo "valgrind: $name: clean ($(ls "$logs/$name" | wc -l) processes, $(($(date +%s) - start)) s)" \
      >>"$logs/$name.verdict"
  fi
}

if [ $# -eq 0 ]; then
  set -- $(cd "$b/tests" && ls test_* | grep -v '^test_hostile$')
fi
# Suites run $jobs at a time; each batch's verdicts print as it ends.
status=0
batch=""
finish_batch() {
  wait
  for n in $batch; do
    cat "$logs/$n.verdict"
    if grep -q '^FAILED$' "$logs/$n.verdict"; then status=1; fi
  done
  batch=""
}
for name in "$@"; do
  run_suite "$name" &
  batch="$batch $name"
  if [ "$(echo $batch | wc -w)" -ge "$jobs" ]; then finish_batch; fi
done
finish_batch
exit $status
