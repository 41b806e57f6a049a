#!/bin/sh
# The parts of `make check` that need more than the sanitizer build:
#  - the resource test again in a build without sanitizers, where RSS and
#    the count of mappings mean what they say;
#  - test_batch's out-of-memory test, which needs glibc's allocator (ASan's
#    maps memory that RLIMIT_DATA does not count);
#  - the threaded-parent test, which only holds without sanitizers: glibc's
#    fork makes its own malloc and stdio safe in the child, but GCC 12's ASan
#    allocator takes no lock around fork, so a fork while another thread is
#    inside ASan's malloc can leave the child's allocator locked for ever;
#  - 60 s of libFuzzer on the parent's decoding of the control block, and
#    15 s on pp_queue_get reading a scribbled queue;
#  - the parent's threads under ThreadSanitizer (make check-tsan: a stress
#    program, since Criterion's sandbox cannot start under TSan), 5 runs.
set -e
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
cmake -S . -B build-plain -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPP_EXAMPLES=OFF >/dev/null
cmake --build build-plain -j "$(nproc)" --target test_resources test_threads test_batch >/dev/null
./build-plain/tests/test_resources --jobs 1
./build-plain/tests/test_batch --filter 'batch/failures_that_cannot_be_recorded*'
./build-plain/tests/test_threads --jobs 1
./fuzz/run.sh "${FUZZ_SECONDS:-60}" fuzz_ctl
./fuzz/run.sh "${FUZZ_QUEUE_SECONDS:-15}" fuzz_queue
make --no-print-directory check-tsan >/dev/null
for run in 2 3 4 5; do
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" ./build-tsan/tsan_stress
done
