#!/usr/bin/env bash
# Install (or uninstall) hopwatch as a systemd service. Called by `make install` /
# `make uninstall`; every path can be overridden through the environment.
#
#   PREFIX   /opt/hopwatch              a self-contained venv (PREFIX/venv): the repo
#                                       checkout can be deleted after installing
#   CONFDIR  /etc/hopwatch              config.toml (never overwritten once it exists)
#   UNITDIR  /etc/systemd/system        hopwatch.service
#   ENABLE   auto                       auto: `systemctl enable --now` when systemd is
#                                       PID 1; no: never touch systemctl
#   PURGE    0                          uninstall: 1 also removes config, logs, the user
#   RUNTIME  auto                       the daemon's interpreter: pypy (PREFIX/venv-pypy,
#                                       which `hopwatch run` execs), cpython, or auto:
#                                       pypy where PYPY is Python 3.9 or later
set -euo pipefail

ACTION=${1:-install}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/hopwatch}
CONFDIR=${CONFDIR:-/etc/hopwatch}
UNITDIR=${UNITDIR:-/etc/systemd/system}
ENABLE=${ENABLE:-auto}
PURGE=${PURGE:-0}
PYTHON=${PYTHON:-/usr/bin/python3}
RUNTIME=${RUNTIME:-auto}
PYPY=${PYPY:-/usr/bin/pypy3}
BCC_DIST=/usr/lib/python3/dist-packages/bcc
SERVICE_USER=hopwatch

log() { printf 'install: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "install: must run as root (system user, $PREFIX, $CONFDIR, $UNITDIR)" >&2
  exit 1
fi

# systemd is the service manager only when it is PID 1 (sd_booted(3) checks the same).
systemd_running() { [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }

install_all() {
  case "$RUNTIME" in
    pypy | cpython) ;;
    auto)
      # The same choice as `make setup` (Makefile): PyPy where it is 3.9 or later.
      if [ -x "$PYPY" ] && "$PYPY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
        RUNTIME=pypy
      else
        RUNTIME=cpython
      fi ;;
    *) echo "install: RUNTIME must be auto, pypy or cpython, not '$RUNTIME'" >&2; exit 2 ;;
  esac
  # 1. A venv of its own, with the package installed from a wheel (not editable).
  if [ ! -x "$PREFIX/venv/bin/python" ]; then
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv "$PREFIX/venv"
  fi
  local wheels
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' RETURN
  "$PREFIX/venv/bin/python" -m pip wheel -q --no-deps -w "$wheels" "$REPO"
  "$PREFIX/venv/bin/python" -m pip install -q "$wheels"/hopwatch-*.whl
  "$PREFIX/venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheels"/hopwatch-*.whl
  # Debian's bcc (pure ctypes) and nothing else of dist-packages (DESIGN.md).
  mkdir -p "$PREFIX/venv/bcc-shim"
  ln -sfn "$BCC_DIST" "$PREFIX/venv/bcc-shim/bcc"
  local purelib
  purelib=$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$PREFIX/venv/bcc-shim" > "$purelib/hopwatch-bcc.pth"
  "$PREFIX/venv/bin/python" -c 'import bcc, hopwatch.capture.live' \
    || { echo "install: the installed venv cannot import bcc/hopwatch" >&2; exit 1; }
  # 1b. The daemon's runtime (daemon/hopwatch/runtime.py): PyPy, from the same wheel, linked
  #     where `hopwatch run` looks for it (it execs it, same pid).
  if [ "$RUNTIME" = pypy ]; then
    [ -x "$PYPY" ] || { echo "install: $PYPY missing (apt-get install pypy3), or RUNTIME=cpython" >&2; exit 1; }
    [ -x "$PREFIX/venv-pypy/bin/python" ] || "$PYPY" -m venv "$PREFIX/venv-pypy"
    "$PREFIX/venv-pypy/bin/python" -m pip install -q "$wheels"/hopwatch-*.whl
    "$PREFIX/venv-pypy/bin/python" -m pip install -q --force-reinstall --no-deps "$wheels"/hopwatch-*.whl
    purelib=$("$PREFIX/venv-pypy/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PREFIX/venv/bcc-shim" > "$purelib/hopwatch-bcc.pth"
    "$PREFIX/venv-pypy/bin/python" -c 'from hopwatch._bcc import import_bcc; import_bcc(); import hopwatch.capture.live' \
      || { echo "install: the PyPy venv cannot import bcc/hopwatch" >&2; exit 1; }
    ln -sfn "$PREFIX/venv-pypy/bin/hopwatch" "$PREFIX/venv/hopwatch-pypy"
    log "runtime: PyPy ($PREFIX/venv-pypy)"
  else
    rm -f "$PREFIX/venv/hopwatch-pypy"
    log "runtime: CPython"
  fi
  mkdir -p "$PREFIX/share/doc"
  install -m 0644 "$REPO/docs/operations.md" "$PREFIX/share/doc/operations.md"
  log "package: $PREFIX/venv/bin/hopwatch"

  # 2. The service user (no login, no home of its own).
  if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$SERVICE_USER"
    log "created system user $SERVICE_USER"
  fi

  # 3. Configuration: the commented defaults; an existing file is the operator's.
  mkdir -p "$CONFDIR"
  install -m 0644 "$REPO/systemd/config.toml" "$CONFDIR/config.toml.default"
  if [ ! -e "$CONFDIR/config.toml" ]; then
    install -m 0644 "$REPO/systemd/config.toml" "$CONFDIR/config.toml"
    log "config: $CONFDIR/config.toml (all defaults, commented)"
  else
    log "config: kept $CONFDIR/config.toml; defaults in $CONFDIR/config.toml.default"
  fi
  mkdir -p /var/lib/hopwatch

  # 4. The unit, with the paths chosen above.
  mkdir -p "$UNITDIR"
  # PyPy's JIT writes machine code: MemoryDenyWriteExecute=no for it (see the unit).
  local mdwe=yes
  [ "$RUNTIME" = pypy ] && mdwe=no
  sed -e "s|/opt/hopwatch|$PREFIX|g" -e "s|/etc/hopwatch|$CONFDIR|g" \
    -e "s|^MemoryDenyWriteExecute=.*|MemoryDenyWriteExecute=$mdwe|" \
    "$REPO/systemd/hopwatch.service" > "$UNITDIR/hopwatch.service.tmp"
  chmod 0644 "$UNITDIR/hopwatch.service.tmp"
  mv "$UNITDIR/hopwatch.service.tmp" "$UNITDIR/hopwatch.service"
  log "unit: $UNITDIR/hopwatch.service"

  # 5. Enable and start, where systemd runs this machine.
  if [ "$ENABLE" = no ]; then
    log "ENABLE=no: systemctl not touched"
  elif systemd_running; then
    systemctl daemon-reload
    systemctl enable hopwatch.service
    systemctl restart hopwatch.service
    log "enabled and started hopwatch.service (systemctl status hopwatch)"
  else
    log "systemd is not PID 1 here (PID 1 is '$(cat /proc/1/comm 2>/dev/null)'):" \
      "unit installed, NOT enabled. Run the daemon directly with:" \
      "$PREFIX/venv/bin/hopwatch run --config $CONFDIR/config.toml"
  fi
}

uninstall_all() {
  if [ "$ENABLE" != no ] && systemd_running; then
    systemctl disable --now hopwatch.service 2>/dev/null || true
  fi
  rm -f "$UNITDIR/hopwatch.service"
  if [ "$ENABLE" != no ] && systemd_running; then
    systemctl daemon-reload
  fi
  rm -rf "$PREFIX"
  rm -f "$CONFDIR/config.toml.default"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$CONFDIR" /var/log/hopwatch /var/lib/hopwatch/state
    if getent passwd "$SERVICE_USER" >/dev/null; then userdel "$SERVICE_USER"; fi
    log "purged config, audit logs, state and the $SERVICE_USER user"
  else
    [ -d "$CONFDIR" ] && rmdir "$CONFDIR" 2>/dev/null || true
    log "kept $CONFDIR, /var/log/hopwatch and the $SERVICE_USER user (PURGE=1 removes them)"
  fi
  log "removed $PREFIX and $UNITDIR/hopwatch.service"
}

case "$ACTION" in
  install) install_all ;;
  uninstall) uninstall_all ;;
  *) echo "usage: $0 install|uninstall" >&2; exit 2 ;;
esac
