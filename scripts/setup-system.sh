#!/usr/bin/env bash
# System set-up for hopwatch (root, Debian/Ubuntu). Idempotent: a second run with
# nothing to do takes well under a second.
#  - apt packages: bcc (python3-bpfcc, bpfcc-tools), PyPy (pypy3 >= 3.9, the daemon's
#    runtime where it is 3.9 or later; CPython runs it elsewhere), kernel headers, the test
#    peers, and gcc
#    (tests/test_ring.py builds a small C watcher; bench/ builds its load client)
#  - kernel headers: the running kernel's package where the distro has it, else a merged
#    tree of the nearest linux-headers-*-common + *-amd64 under /var/lib/hopwatch/headers/
#    (never touches /lib/modules); the daemon finds it by itself (hopwatch.kernel).
#  - tracefs/debugfs mounted.
set -euo pipefail

APT_PACKAGES="bpfcc-tools python3-bpfcc python3-venv pypy3 iproute2 curl nginx-light haproxy tcpdump prometheus systemd libcap2-bin util-linux python3-yaml bpftool wrk gcc libc6-dev"
# Node.js: the distro package only where no node is installed (some images ship nodesource's).
command -v node >/dev/null 2>&1 || APT_PACKAGES="$APT_PACKAGES nodejs"
command -v npm >/dev/null 2>&1 || APT_PACKAGES="$APT_PACKAGES npm"
HEADERS_ROOT=/var/lib/hopwatch/headers
KREL=$(uname -r)
STAMP_DIR=/var/lib/hopwatch/setup
mkdir -p "$STAMP_DIR"

log() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "setup: must run as root (apt, tracefs mounts, /var/lib/hopwatch)" >&2
  exit 1
fi

need_apt=0
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || { need_apt=1; break; }
done

export DEBIAN_FRONTEND=noninteractive
if [ "$need_apt" = 1 ]; then
  log "installing apt packages: $APT_PACKAGES"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $APT_PACKAGES >/dev/null
fi

# --- kernel headers ---------------------------------------------------------
if [ -e "/lib/modules/$KREL/build/include" ]; then
  log "kernel headers: /lib/modules/$KREL/build"
elif [ -e "$HEADERS_ROOT/$KREL/.complete" ]; then
  log "kernel headers: merged fallback $HEADERS_ROOT/$KREL"
else
  # The running kernel's own package first.
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    apt-get install -y -qq "linux-headers-$KREL" >/dev/null
  fi
  if [ -e "/lib/modules/$KREL/build/include" ]; then
    log "kernel headers: installed linux-headers-$KREL"
  else
    # Fallback: the distro's newest flavour headers, merged into one tree.
    if ! ls -d /usr/src/linux-headers-*-common >/dev/null 2>&1; then
      [ "$need_apt" = 1 ] || apt-get update -qq
      apt-get install -y -qq linux-headers-amd64 >/dev/null || apt-get install -y -qq linux-headers-generic >/dev/null
    fi
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    flavour=${common%-common}-amd64
    [ -d "$flavour" ] || flavour=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$common" ] || [ ! -d "$flavour" ]; then
      echo "setup: no linux-headers-*-common/*-amd64 found under /usr/src" >&2
      exit 1
    fi
    dest="$HEADERS_ROOT/$KREL"
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    cp -rs "$common/." "$dest.tmp/"
    cp -rs --remove-destination "$flavour/." "$dest.tmp/"
    printf '%s\n%s\n' "$common" "$flavour" > "$dest.tmp/.complete"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    log "kernel headers: merged $common + $flavour into $dest"
  fi
fi

# --- tracefs / debugfs --------------------------------------------------------
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
if [ ! -e /sys/kernel/debug/tracing ] && ! mountpoint -q /sys/kernel/debug; then
  mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
fi
[ -e /sys/kernel/tracing/events/syscalls ] || { echo "setup: tracefs syscall events missing" >&2; exit 1; }
