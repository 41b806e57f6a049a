#!/bin/sh
# Builds the libFuzzer harnesses into $1 (default build-fuzz) with clang:
# the library's sources are compiled into each harness, instrumented for
# coverage, with ASan and UBSan.
set -e
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/build-fuzz}
mkdir -p "$out"
CC=${FUZZ_CC:-clang}
flags="-g -O1 -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -fno-omit-frame-pointer -I$top/include -I$top/src"
for h in "$top"/fuzz/fuzz_*.c; do
  name=$(basename "$h" .c)
  # shellcheck disable=SC2086
  $CC $flags -o "$out/$name" "$h" "$top"/src/*.c -lpthread -lm -ldl
done
