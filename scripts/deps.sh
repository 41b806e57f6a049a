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
