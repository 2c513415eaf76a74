"""The systemd unit, `make install`, and the notify protocol with the real daemon.

systemd is not PID 1 on the machines these tests run on, so the unit cannot be started by
systemd itself. What is covered instead:

* `systemd-analyze verify` and `systemd-analyze security --offline=yes` on the unit as
  `make install` writes it (into a scratch prefix, uninstalled afterwards);
* the sd_notify datagrams of a real `hopwatch run` on a real AF_UNIX datagram socket;
* the unit's ExecStart line, run as-is inside an emulation of the unit's sandbox built from
  the unit file itself: a private mount namespace (ProtectSystem=strict, PrivateTmp,
  ProtectHome, PrivateDevices, ProtectKernelTunables, the state/logs directories), the
  unit's User= with exactly its CapabilityBoundingSet/AmbientCapabilities and
  NoNewPrivileges (setpriv), its LimitNICE (prlimit, when this host's root may raise it),
  and a seccomp filter with systemd's semantics for MemoryDenyWriteExecute,
  RestrictAddressFamilies, SystemCallArchitectures=native and the SystemCallFilter
  allowlist (expanded by `systemd-analyze syscall-filter`);
* each capability of the bounding set is necessary: without it, capture breaks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hopwatch.config import Config, load_config, parse_config
from tests.helpers import HOPWATCH, REPO, free_port, make_env, named, scrape

UNIT = REPO / "systemd" / "hopwatch.service"
DEFAULT_CONFIG = REPO / "systemd" / "config.toml"
SCRATCH = Path("/var/lib/hopwatch-test")  # outside /tmp: PrivateTmp hides /tmp
SECURITY_THRESHOLD = 4.0
PYPY = "/usr/bin/pypy3"  # systemd/install.sh's default
PYPY_DEFAULT = (
    Path(PYPY).exists()
    and subprocess.run([PYPY, "-c", "import sys; sys.exit(sys.version_info < (3, 9))"]).returncode
    == 0
)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# --- the unit file ---------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> every value in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        header = re.fullmatch(r"\[(.+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        assert not line.endswith("\\"), "continuation lines are not used in the unit"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], key: str, section: str = "Service") -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key} set {len(values)} times"
    return values[0]


def words(unit: dict[str, dict[str, list[str]]], key: str) -> list[str]:
    return [w for v in unit["Service"].get(key, []) for w in v.split()]


def test_unit_essentials() -> None:
    unit = parse_unit(UNIT)
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert re.fullmatch(r"\d+s?", one(unit, "WatchdogSec"))
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv == [
        "/opt/hopwatch/venv/bin/hopwatch",
        "run",
        "--config",
        "/etc/hopwatch/config.toml",
    ]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "RestrictNamespaces",
    ):
        assert one(unit, key) == "yes", key
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "SystemCallArchitectures") == "native"
    assert set(words(unit, "RestrictAddressFamilies")) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    caps = set(words(unit, "CapabilityBoundingSet"))
    assert caps == {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert set(words(unit, "AmbientCapabilities")) == caps
    assert one(unit, "User") == "hopwatch"
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


# --- the default configuration ---------------------------------------------------------
def test_default_config_loads_as_the_defaults() -> None:
    assert _strip_source(load_config(DEFAULT_CONFIG)) == _strip_source(Config())


def test_default_config_documents_every_key_with_its_default() -> None:
    """Uncommenting every `# key = value` line gives exactly the built-in defaults, and
    every key the loader knows is there."""
    from hopwatch.config import _SCHEMA

    examples = {("audit", "path"), ("audit", "key_file")}  # default: unset
    lines = DEFAULT_CONFIG.read_text().splitlines()
    out: list[str] = []
    keys: set[tuple[str, str]] = set()
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header.group(1)
            out.append(line)
            continue
        m = re.fullmatch(r"# (\w+) = (.*)", line)
        if m is None:
            continue
        keys.add((section, m.group(1)))
        if (section, m.group(1)) in examples:
            continue
        value = re.sub(r"\s+#.*$", "", m.group(2))
        while value.count("[") > value.count("]"):  # a list continued on "#   ..." lines
            value += " " + lines[i].lstrip("#").strip()
            i += 1
        out.append(f"{m.group(1)} = {value}")
    assert keys == {(s, k) for s, body in _SCHEMA.items() for k in body}
    uncommented = parse_config("\n".join(out), source="uncommented")
    assert _strip_source(uncommented) == _strip_source(Config())


def _strip_source(c: Config) -> Config:
    import dataclasses

    return dataclasses.replace(c, source="")


# --- make install / uninstall into a scratch prefix ------------------------------------
@dataclass(frozen=True)
class Installed:
    prefix: Path
    confdir: Path
    unitdir: Path

    @property
    def unit(self) -> Path:
        return self.unitdir / "hopwatch.service"


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    root = SCRATCH / f"install-{os.getpid()}"
    inst = Installed(root / "opt", root / "etc", root / "unit")
    shutil.rmtree(root, ignore_errors=True)
    env = [f"PREFIX={inst.prefix}", f"CONFDIR={inst.confdir}", f"UNITDIR={inst.unitdir}"]
    # The default install (RUNTIME=auto), whatever RUNTIME a `make test` above was given.
    clean = make_env()
    try:
        res = subprocess.run(
            ["make", "-s", "-C", str(REPO), "install", *env, "ENABLE=no"],
            capture_output=True,
            text=True,
            timeout=600,
            env=clean,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        yield inst
        res = subprocess.run(
            ["make", "-s", "-C", str(REPO), "uninstall", *env, "ENABLE=no"],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert not inst.prefix.exists() and not inst.unit.exists()
        assert (inst.confdir / "config.toml").exists()  # the operator's file is kept
    finally:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            SCRATCH.rmdir()


@pytest.mark.kernel
def test_install_layout(installed: Installed) -> None:
    repo_unit = UNIT.read_text()
    expected = repo_unit.replace("/opt/hopwatch", str(installed.prefix)).replace(
        "/etc/hopwatch", str(installed.confdir)
    )
    expected_pypy = expected.replace(
        "MemoryDenyWriteExecute=yes", "MemoryDenyWriteExecute=no"
    )
    assert expected_pypy != expected
    assert (installed.confdir / "config.toml").read_text() == DEFAULT_CONFIG.read_text()
    assert (installed.prefix / "share/doc/operations.md").exists()
    # A real install, not an editable one: nothing in the venv points back at the checkout.
    venv = installed.prefix / "venv"
    res = subprocess.run(
        ["grep", "-rlI", "--exclude=*.pyc", str(REPO), str(venv)], capture_output=True, text=True
    )
    assert res.stdout == "", f"installed files refer to the checkout:\n{res.stdout}"
    bpf_source = list(venv.glob("lib/python3*/site-packages/hopwatch/bpf/capture.c"))
    assert bpf_source, "the eBPF source is not in the installed package"
    # The daemon's runtime by default (RUNTIME=auto): PyPy where the distro's pypy3 is 3.9 or
    # later, as `make install` installs it here: a PyPy venv from the same wheel, linked
    # where `hopwatch run` looks, and a unit that allows the writable+executable memory its
    # JIT needs. Elsewhere CPython, and the unit as it is in the repo.
    assert PYPY_DEFAULT, f"{PYPY} is not Python 3.9 or later: `make system` installs it"
    pypy_venv = installed.prefix / "venv-pypy"
    assert (venv / "hopwatch-pypy").resolve() == (pypy_venv / "bin/hopwatch").resolve()
    assert list(pypy_venv.glob("lib/pypy3*/site-packages/hopwatch/bpf/capture.c"))
    res = subprocess.run(
        ["grep", "-rlI", "--exclude=*.pyc", str(REPO), str(pypy_venv)],
        capture_output=True,
        text=True,
    )
    assert res.stdout == "", f"installed files refer to the checkout:\n{res.stdout}"
    assert installed.unit.read_text() == expected_pypy
    cfg = installed.confdir / "config.toml"
    env = {**os.environ, "HOPWATCH_RUNTIME": "pypy"}
    res = subprocess.run(
        [str(venv / "hopwatch-pypy"), "config", "check", str(cfg)], env=env, capture_output=True
    )
    assert res.returncode == 0, res.stderr

    def reinstall(runtime: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(REPO / "systemd/install.sh"), "install"],
            env={
                **make_env(),
                "PREFIX": str(installed.prefix),
                "CONFDIR": str(installed.confdir),
                "UNITDIR": str(installed.unitdir),
                "ENABLE": "no",
                "RUNTIME": runtime,
                **extra,
            },
            capture_output=True,
            text=True,
            timeout=600,
        )

    # Running it again is idempotent and keeps an edited config. With a pypy3 older than
    # 3.9 (Ubuntu 22.04's is 3.8), auto means CPython: no link, the repo's unit.
    cfg.write_text(cfg.read_text() + "\n# edited by the operator\n")
    old_pypy = installed.prefix.parent / "pypy3.8"
    old_pypy.write_text("#!/bin/sh\nexit 1\n")  # fails the version check, as 3.8 would
    old_pypy.chmod(0o755)
    res = reinstall("auto", PYPY=str(old_pypy))
    assert res.returncode == 0, res.stderr
    assert "kept" in res.stdout and cfg.read_text().endswith("# edited by the operator\n")
    assert "runtime: CPython" in res.stdout
    assert not (venv / "hopwatch-pypy").exists()
    assert installed.unit.read_text() == expected
    res = reinstall("graalpy")
    assert res.returncode == 2 and "RUNTIME must be auto, pypy or cpython" in res.stderr
    # And back to the default (the tests below run it).
    res = reinstall("auto")
    assert res.returncode == 0, res.stderr
    assert "runtime: PyPy" in res.stdout
    assert installed.unit.read_text() == expected_pypy
    score, table = security_exposure(installed.unit)  # MemoryDenyWriteExecute=no included
    assert score <= SECURITY_THRESHOLD, table


@pytest.mark.kernel
def test_install_detects_systemd_is_not_pid1(tmp_path: Path) -> None:
    """Without ENABLE=no the script decides by itself; here PID 1 is not systemd."""
    pid1 = Path("/proc/1/comm").read_text().strip()
    script = (REPO / "systemd/install.sh").read_text()
    # Run only the detection function of the script, exactly as written there.
    fn = re.search(r"^systemd_running\(\) \{.*\}$", script, re.M)
    assert fn is not None
    res = subprocess.run(
        ["bash", "-c", fn.group(0) + "\nsystemd_running && echo yes || echo no"],
        capture_output=True,
        text=True,
    )
    booted = Path("/run/systemd/system").is_dir() and pid1 == "systemd"
    assert res.stdout.strip() == ("yes" if booted else "no")


@pytest.mark.kernel
def test_systemd_analyze_verify(installed: Installed) -> None:
    res = subprocess.run(
        ["systemd-analyze", "verify", str(installed.unit)], capture_output=True, text=True
    )
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), (
        res.stdout + res.stderr
    )


def security_exposure(unit: Path) -> tuple[float, str]:
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    return float(m.group(1)), res.stdout


def test_systemd_analyze_security_score(record_property: pytest.RecordProperty) -> None:
    score, table = security_exposure(UNIT)
    record_property("systemd_security_exposure", score)
    print(f"systemd-analyze security --offline=yes: exposure {score}")
    assert score <= SECURITY_THRESHOLD, table
    doc = (REPO / "docs" / "operations.md").read_text()
    assert f"exposure level {score}" in doc, "docs/operations.md reports another score"


# --- the notify protocol against the real daemon ---------------------------------------
class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket named by $NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.env = address
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.received: list[tuple[float, dict[str, str]]] = []

    def next(
        self, timeout: float, proc: subprocess.Popen[bytes] | None = None
    ) -> dict[str, str] | None:
        """The next datagram; None after `timeout` or once `proc` has exited."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (proc is not None and proc.poll() is not None):
                return None
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096)
                break
            except TimeoutError:
                continue
        msg = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.received.append((time.monotonic(), msg))
        return msg

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next(left)
            if msg is not None and key in msg:
                return msg
        raise AssertionError(f"no {key} within {timeout}s; got {self.received}")

    def close(self) -> None:
        self.sock.close()


def metrics_answer(addr: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as resp:
            return resp.status == 200 and b"hopwatch_capture_attached 1.0" in resp.read()
    except OSError:
        return False


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `argv` with WATCHDOG_PID set to its own pid, as systemd does for the main
    process (the shell execs, so the pid is the daemon's)."""
    with log.open("wb") as f:
        return subprocess.Popen(
            ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


@pytest.mark.kernel
def test_notify_ready_watchdog_reload_stopping(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[metrics]\naddr = "{addr}"\n')
    notify = NotifySocket(str(tmp_path / "notify"))
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "NOTIFY_SOCKET": notify.env,
        "WATCHDOG_USEC": "1000000",  # 1 s: a ping every 0.5 s
    }
    log = tmp_path / "hopwatch.log"
    proc = spawn([str(HOPWATCH), "run", "--config", str(cfg)], env, log)
    try:
        # READY=1 comes only once the probes are attached and /metrics answers.
        first = notify.next(90, proc)
        assert first is not None and first.get("READY") == "1", (first, log.read_text())
        assert metrics_answer(addr), "READY=1 was sent before /metrics answered"
        assert "capturing" in first.get("STATUS", "")

        # WATCHDOG=1 keeps coming from the main loop at half the period.
        pings = []
        deadline = time.monotonic() + 3.2
        while time.monotonic() < deadline:
            msg = notify.next(deadline - time.monotonic())
            if msg and msg.get("WATCHDOG") == "1":
                pings.append(time.monotonic())
        assert len(pings) >= 4, notify.received
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 1.0, f"a watchdog gap reached the whole period: {gaps}"

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", 10)
        assert reloading["RELOADING"] == "1" and reloading["MONOTONIC_USEC"].isdigit()
        ready = notify.wait_for("READY", 10)
        assert ready["READY"] == "1"
        assert "reloaded" in log.read_text()

        # A broken file on reload: READY=1 again, the running configuration kept.
        cfg.write_text("[metrics\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", 10)
        assert "kept" in notify.wait_for("READY", 10).get("STATUS", "")
        assert metrics_answer(addr)

        # SIGTERM: STOPPING=1, exit 0.
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", 15)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        stop(proc)
        notify.close()


# --- the unit's sandbox, emulated from the unit file -----------------------------------
SECCOMP_SHIM = r"""
import ctypes, json, os, struct, sys
spec = json.loads(sys.argv[1]); argv = sys.argv[2:]
EPERM, EAFNOSUPPORT = 1, 97
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
LD, JEQ, JGE, JSET, AND, RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
prog = []
def ins(code, k, jt=0, jf=0): prog.append(struct.pack("HBBI", code, jt, jf, k))
nr = spec["nr"]
ins(LD, 4); ins(JEQ, 0xC000003E, 1, 0); ins(RET, ERRNO | EPERM)      # native arch only
ins(LD, 0); ins(JGE, 0x40000000, 0, 1); ins(RET, ERRNO | EPERM)      # no x32 ABI
if spec["mdwe"]:                                                     # MemoryDenyWriteExecute
    for name in ("mmap",):
        ins(JEQ, nr[name], 0, 5); ins(LD, 32); ins(AND, 6); ins(JEQ, 6, 0, 1)
        ins(RET, ERRNO | EPERM); ins(LD, 0)
    for name, bit in (("mprotect", 4), ("pkey_mprotect", 4), ("shmat", 0o100000)):
        ins(JEQ, nr[name], 0, 4); ins(LD, 32); ins(JSET, bit, 0, 1)
        ins(RET, ERRNO | EPERM); ins(LD, 0)
fams = spec["families"]                                              # RestrictAddressFamilies
if fams:
    n = len(fams)
    ins(JEQ, nr["socket"], 0, n + 3); ins(LD, 16)
    for i, fam in enumerate(fams): ins(JEQ, fam, n - i, 0)
    ins(RET, ERRNO | EAFNOSUPPORT); ins(LD, 0)
for n in spec["allow"]: ins(JEQ, n, 0, 1); ins(RET, ALLOW)           # SystemCallFilter
ins(RET, ERRNO | spec["errno"])
buf = ctypes.create_string_buffer(b"".join(prog))
class FProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fp = FProg(len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fp), 0, 0) != 0:
    sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
os.execv(argv[0], argv)
"""

_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def syscall_numbers() -> dict[str, int]:
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        header = Path("/usr/include/asm/unistd_64.h")
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#define __NR_(\w+) (\d+)", header.read_text())
    }


def expand_syscalls(item: str, seen: set[str] | None = None) -> set[str]:
    """A syscall name or @group, expanded the way systemd does."""
    if not item.startswith("@"):
        return {item}
    seen = set() if seen is None else seen
    if item in seen:
        return set()
    seen.add(item)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", item], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= expand_syscalls(word, seen)
    return names


def seccomp_spec(unit: dict[str, dict[str, list[str]]]) -> dict[str, object]:
    """The unit's seccomp settings, with systemd's order semantics: the first
    SystemCallFilter= is an allowlist, later `~` lines remove from it."""
    numbers = syscall_numbers()
    allowed: set[str] = set()
    for value in unit["Service"].get("SystemCallFilter", []):
        deny = value.startswith("~")
        items = value.lstrip("~").split()
        names = set().union(*(expand_syscalls(i) for i in items))
        if deny:
            allowed -= names
        else:
            allowed |= names
    # Implied by other settings (systemd adds these filters too).
    if one(unit, "ProtectClock") == "yes":
        allowed -= expand_syscalls("@clock")
    if one(unit, "PrivateDevices") == "yes":
        allowed -= expand_syscalls("@raw-io")
    errno_name = one(unit, "SystemCallErrorNumber")
    return {
        "nr": numbers,
        "allow": sorted(numbers[n] for n in allowed if n in numbers),
        "errno": {"EPERM": 1, "EACCES": 13}[errno_name],
        "mdwe": one(unit, "MemoryDenyWriteExecute") == "yes",
        "families": [_FAMILIES[f] for f in words(unit, "RestrictAddressFamilies")],
    }


MOUNT_SCRIPT = r"""
set -eu
# -n everywhere: /etc/mtab is read-only once ProtectSystem is applied
mount -n --make-rprivate /
user=$1; shift
# StateDirectory= / LogsDirectory=: created by systemd, owned by User=, writable.
rw=""
for d in $STATE_DIRS; do
  mkdir -p "$d"; chown "$user:$user" "$d"; chmod 0700 "$d"; rw="$rw $d"
done
for d in $RW_DIRS; do rw="$rw $d"; done
# ProtectSystem=strict: every mount -n read-only, /dev /proc /sys handled below.
for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$mp" in /proc|/proc/*|/dev|/dev/*|/sys|/sys/*) continue ;; esac
  mount -n -o remount,bind,ro "$mp" 2>/dev/null || true
done
for d in $rw; do mount -n --bind "$d" "$d"; mount -n -o remount,bind,rw "$d"; done
# PrivateTmp=yes
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
# ProtectHome=yes: inaccessible
for d in /home /root /run/user; do
  [ -d "$d" ] && mount -n -t tmpfs -o ro,mode=000 tmpfs "$d"
done
# ProtectKernelTunables=yes: /sys (tracefs included) and /proc/sys read-only
for mp in $(awk '{print $5}' /proc/self/mountinfo | grep -E '^/sys(/|$)' | sort -u); do
  mount -n -o remount,bind,ro "$mp" 2>/dev/null || mount -n --bind -o ro "$mp" "$mp"
done
mount -n --bind /proc/sys /proc/sys; mount -n -o remount,bind,ro /proc/sys
# PrivateDevices=yes: a /dev with only the pseudo devices (built in the private /tmp)
devs=/tmp/.dev
mkdir "$devs"
mount -n -t tmpfs -o mode=755,nosuid tmpfs "$devs"
for n in null zero full random urandom tty; do
  touch "$devs/$n"; mount -n --bind "/dev/$n" "$devs/$n"
done
mkdir "$devs/shm" "$devs/pts"; ln -s /proc/self/fd "$devs/fd"
mount -n --move "$devs" /dev
exec "$@"
"""


def sandboxed(
    unit: dict[str, dict[str, list[str]]], argv: list[str], drop_cap: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """`argv` wrapped in the unit's sandbox (see the module docstring)."""
    user = one(unit, "User")
    assert one(unit, "Group") == user
    assert one(unit, "NoNewPrivileges") == "yes"
    caps = [c for c in words(unit, "CapabilityBoundingSet") if c != drop_cap]
    ambient = [c for c in words(unit, "AmbientCapabilities") if c != drop_cap]
    capspec = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    ambspec = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in ambient)])
    state = [f"/var/lib/{d}" for d in words(unit, "StateDirectory")]
    state += [f"/var/log/{d}" for d in words(unit, "LogsDirectory")]
    rw = [p.lstrip("-") for p in words(unit, "ReadWritePaths")]
    nice = one(unit, "LimitNICE")  # "+N": a nice level, as RLIMIT_NICE = 20 - N
    assert nice.startswith("+")
    rlimit_nice = 20 - int(nice)
    # systemd (PID 1) may raise a hard limit; a test host's root without CAP_SYS_RESOURCE
    # may not: then the daemon runs without the limit (and must say so, see below).
    limit = ["prlimit", f"--nice={rlimit_nice}:{rlimit_nice}", "--"] if can_raise_rlimits() else []
    wrapped = [
        *limit,
        "unshare",
        "--mount",
        "--",
        "/bin/sh",
        "-c",
        MOUNT_SCRIPT,
        "sh",
        user,
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--clear-groups",
        f"--bounding-set={capspec}",
        f"--inh-caps={ambspec}",
        f"--ambient-caps={ambspec}",
        "--no-new-privs",
        "--",
        "/usr/bin/python3",
        "-c",
        SECCOMP_SHIM,
        json.dumps(seccomp_spec(unit)),
        *argv,
    ]
    env = {"STATE_DIRS": " ".join(state), "RW_DIRS": " ".join(rw)}
    return wrapped, env


def can_raise_rlimits() -> bool:
    """CAP_SYS_RESOURCE in this process's effective set (some VMs' root lacks it)."""
    eff = re.search(r"^CapEff:\s+([0-9a-f]+)", Path("/proc/self/status").read_text(), re.M)
    assert eff
    return bool(int(eff.group(1), 16) >> 24 & 1)


def execstart_argv(installed: Installed, config: Path) -> list[str]:
    """The installed unit's ExecStart, as-is but for the config path."""
    unit = parse_unit(installed.unit)
    argv = shlex.split(one(unit, "ExecStart"))
    i = argv.index("--config")
    assert argv[i + 1] == str(installed.confdir / "config.toml")
    argv[i + 1] = str(config)
    return argv


def traffic_seen(addr: str, comm: str, tmp: Path, port: int) -> float:
    """curl (named `comm`) -> /metrics of the daemon itself, with a traceparent; how many
    outbound requests of `comm` with W3C context the daemon counted."""
    curl = named(tmp, comm, "curl")
    for _ in range(3):
        subprocess.run(
            [
                curl,
                "-s",
                "-o",
                "/dev/null",
                "-H",
                f"traceparent: {TRACEPARENT}",
                f"http://127.0.0.1:{port}/metrics",
            ],
            check=True,
            timeout=10,
        )
    deadline = time.monotonic() + 10
    seen = 0.0
    while time.monotonic() < deadline:
        seen = scrape(addr).total(
            "hopwatch_http_messages_total",
            process=comm,
            direction="outbound",
            kind="request",
            context="w3c",
        )
        if seen >= 3:
            break
        time.sleep(0.1)
    return seen


def sandbox_config(installed: Installed, tmp: Path, addr: str) -> Path:
    # Beside the scratch install (removed with it): readable inside the sandbox.
    cfg = installed.prefix.parent / f"config-{tmp.name}.toml"
    text = DEFAULT_CONFIG.read_text().replace('# addr = "127.0.0.1:9647"', f'addr = "{addr}"')
    cfg.write_text(text)
    os.chmod(cfg, 0o644)
    return cfg


@pytest.mark.kernel
def test_execstart_as_is_in_the_units_sandbox(installed: Installed, tmp_path: Path) -> None:
    """The installed unit's ExecStart, inside the unit's sandbox: it becomes ready, captures
    real traffic (tracepoints attached, /proc readable), reloads, and exits 0 on SIGTERM."""
    unit = parse_unit(installed.unit)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    cfg = sandbox_config(installed, tmp_path, addr)
    argv, env = sandboxed(unit, execstart_argv(installed, cfg))
    notify = NotifySocket(f"@hopwatch-test-{os.getpid()}")  # abstract: crosses PrivateTmp
    env |= {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "NOTIFY_SOCKET": notify.env,
        "WATCHDOG_USEC": str(int(one(unit, "WatchdogSec").rstrip("s")) * 1_000_000),
    }
    log = tmp_path / "hopwatch.log"
    proc = spawn(argv, env, log)
    try:
        ready = notify.next(90, proc)
        assert ready is not None and ready.get("READY") == "1", log.read_text()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
        assert uid and int(uid.group(1)) == int(
            subprocess.check_output(["id", "-u", one(unit, "User")]).strip()
        )
        assert re.search(r"^NoNewPrivs:\s+1", status, re.M)
        assert re.search(r"^Seccomp:\s+2", status, re.M)
        # The runtime the install chose (PyPy here) runs under the unit's seccomp filter.
        exe = os.path.basename(os.readlink(f"/proc/{proc.pid}/exe"))
        assert exe.startswith("pypy" if PYPY_DEFAULT else "python"), exe
        assert traffic_seen(addr, "t_unit_curl", tmp_path, port) >= 3, log.read_text()
        # The loop may yield the CPU (SCHED_IDLE) when it sheds, as LimitNICE lets it leave
        # that policy again (the guard thread runs); without that limit it must never go idle
        # (it could not be lifted) and says why.
        threads = [
            Path(f"/proc/{proc.pid}/task/{t}/comm").read_text().strip()
            for t in os.listdir(f"/proc/{proc.pid}/task")
        ]
        if can_raise_rlimits():
            assert "hopwatch-guard" in threads, log.read_text()
        else:
            assert "hopwatch-guard" not in threads
            assert "LimitNICE=+0" in log.read_text()
        # The running daemon really is confined: it cannot write outside its directories.
        assert "Read-only file system" in _probe_write(proc.pid, "/var/lib/hopwatch/x")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", 10)
        notify.wait_for("READY", 10)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", 15)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        stop(proc)
        notify.close()
        log_text = log.read_text()
        assert "Traceback" not in log_text, log_text


def _probe_write(pid: int, path: str) -> str:
    """Try to create `path` from inside `pid`'s mount namespace (as root: only the mount
    flags can refuse)."""
    res = subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "--", "/bin/sh", "-c", f": > {path}"],
        capture_output=True,
        text=True,
    )
    return res.stderr


# Without each capability of the bounding set, what breaks (bcc 0.26, kernel 6.x).
CAPABILITY_NEEDS = {
    "CAP_BPF": "loading the programs and maps",
    "CAP_PERFMON": "attaching the tracepoints",
    "CAP_DAC_READ_SEARCH": "reading tracefs (mode 0700) as the hopwatch user",
    "CAP_SYS_PTRACE": "reading /proc/<pid>/fd of other users' processes",
}


@pytest.mark.kernel
@pytest.mark.parametrize("cap", [None, *sorted(CAPABILITY_NEEDS)], ids=str)
def test_each_capability_is_needed(installed: Installed, tmp_path: Path, cap: str | None) -> None:
    """With the whole set the daemon starts and adopts another user's open connection;
    without any one capability, capture fails to start or cannot read /proc."""
    unit = parse_unit(installed.unit)
    assert set(CAPABILITY_NEEDS) == set(words(unit, "CapabilityBoundingSet"))
    port = free_port()
    addr = f"127.0.0.1:{port}"
    cfg = sandbox_config(installed, tmp_path, addr)
    argv, env = sandboxed(unit, execstart_argv(installed, cfg), drop_cap=cap)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    log = tmp_path / "hopwatch.log"
    # A keep-alive connection of another process (root), open before the daemon starts:
    # the daemon adopts it only if it can read that process's /proc/<pid>/fd.
    srv = socket.create_server(("127.0.0.1", 0))
    holder = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-c",
            "import socket,sys,time; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
            " print('ok', flush=True); time.sleep(120)",
            str(srv.getsockname()[1]),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"ok\n"
    proc = spawn(argv, env, log)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and not metrics_answer(addr):
            time.sleep(0.2)
        text = log.read_text()
        if cap in ("CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"):
            assert proc.poll() is not None and proc.returncode != 0, (
                f"capture started without {cap}:\n{text}"
            )
        else:
            assert metrics_answer(addr), text
            adopted = re.search(r"adopted (\d+) existing inet sockets", text)
            assert adopted, text
            if cap is None:
                assert int(adopted.group(1)) >= 1, text
            else:
                assert int(adopted.group(1)) == 0, text
    finally:
        stop(proc)
        holder.kill()
        holder.wait()
        srv.close()
