#!/bin/sh
# Installs the library into a scratch prefix and builds an outside program
# against it exactly as a user would: through pkg-config, and through CMake's
# find_package. Then runs both (the first also under the spawn start method,
# linked to the shared and to the static library).
set -e
top=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake -S "$top" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DPP_TESTS=OFF -DPP_EXAMPLES=OFF \
      -DCMAKE_INSTALL_PREFIX="$tmp/prefix" >/dev/null
cmake --build "$tmp/build" -j "$(nproc)" >/dev/null
cmake --install "$tmp/build" >/dev/null
libdir=$(ls -d "$tmp"/prefix/lib*/pkgconfig | head -n 1)
export PKG_CONFIG_PATH="$libdir"
cc -std=c11 -Wall -Wextra -Werror -o "$tmp/outside" "$top/tests/outside/outside.c" \
   $(pkg-config --cflags --libs procpool) -Wl,-rpath,"$(dirname "$libdir")"
"$tmp/outside"
PROCPOOL_START=spawn "$tmp/outside" # workers from a fresh run of the program
# Linked statically: the library's spawn entry is linked in all the same.
# What the archive needs (threads, dl, and MPI when the backend is built in)
# comes from pkg-config --static; the archive itself by name, not -lprocpool
# (that would pick the shared library).
private=$(pkg-config --static --libs procpool | sed 's/-lprocpool\( \|$\)/ /')
cc -std=c11 -Wall -Wextra -Werror -o "$tmp/outside-static" "$top/tests/outside/outside.c" \
   $(pkg-config --cflags procpool) "$(dirname "$libdir")/libprocpool.a" $private
PROCPOOL_START=spawn "$tmp/outside-static"
mkdir -p "$tmp/cm"
cat >"$tmp/cm/CMakeLists.txt" <<CM
cmake_minimum_required(VERSION 3.20)
project(outside C)
find_package(procpool REQUIRED)
add_executable(outside $top/tests/outside/outside.c)
target_link_libraries(outside PRIVATE procpool::procpool)
CM
cmake -S "$tmp/cm" -B "$tmp/cm/build" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/cm/build" >/dev/null
"$tmp/cm/build/outside"
echo "install-check: pkg-config and find_package builds passed"
