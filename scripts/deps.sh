#!/bin/sh
# Installs what the build (`build`) or the tests (`check`) need and are
# missing, through Debian's apt-get when run as root. Prints nothing when
# everything is there already.
set -e
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have cc || need="$need gcc"
have make || need="$need make"
have cmake || need="$need cmake"
have pkg-config || need="$need pkg-config"
if [ "$1" = check ]; then
  pkg-config --exists criterion 2>/dev/null || need="$need libcriterion-dev"
  have python3 || need="$need python3"
  # the libFuzzer run in make check: clang and its fuzzer runtime
  have clang || need="$need clang"
  echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n){(void)d;(void)n;return 0;}' |
    clang -x c -fsanitize=fuzzer -o /dev/null - 2>/dev/null || need="$need libclang-rt-dev"
  # the MPI backend's tests run under mpirun (Open MPI from Debian)
  { have mpicc && have mpirun; } || need="$need libopenmpi-dev openmpi-bin"
fi
if [ "$1" = valgrind ]; then
  pkg-config --exists criterion 2>/dev/null || need="$need libcriterion-dev"
  have valgrind || need="$need valgrind"
fi
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing:$need — install them (Debian: apt-get install$need)" >&2
  exit 1
fi
echo "installing:$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $need >/dev/null
