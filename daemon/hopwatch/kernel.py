"""Kernel prerequisites for the live capture: headers for bcc, tracefs, privileges.

Works whether the daemon is started by ``make run`` or directly (systemd): nothing here
relies on the environment ``make`` sets up. Each failure is a :class:`KernelError` carrying a
machine-readable ``code``, the ``cause`` and the ``fix``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._compat import SLOTS

__all__ = [
    "HEADERS_FALLBACK_ROOT",
    "KernelEnv",
    "KernelError",
    "ensure_tracefs",
    "find_kernel_headers",
    "kernel_version",
    "prepare_kernel",
]

log = logging.getLogger(__name__)

HEADERS_FALLBACK_ROOT = Path("/var/lib/hopwatch/headers")
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")
SETUP_FIX = "run `make setup` (or `sudo scripts/setup-system.sh`) on this node"


class KernelError(RuntimeError):
    """A kernel prerequisite is missing or the capture could not be loaded."""

    def __init__(self, code: str, cause: str, fix: str) -> None:
        super().__init__(f"{cause} -- fix: {fix}")
        self.code = code
        self.cause = cause
        self.fix = fix


@dataclass(frozen=True, **SLOTS)
class KernelEnv:
    release: str
    headers: Path
    headers_source: str  # "modules" | "fallback" | "env"
    tracefs: Path


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a kernel release string (the running kernel's by default); (0, 0)
    when it does not start with one."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _has_headers(path: Path) -> bool:
    return (path / "include").is_dir()


def find_kernel_headers(
    release: str | None = None,
    *,
    modules_root: Path = Path("/lib/modules"),
    fallback_root: Path = HEADERS_FALLBACK_ROOT,
    environ: dict[str, str] | None = None,
) -> tuple[Path, str]:
    """Where bcc should find the running kernel's headers, and which source that is.

    Order: ``BCC_KERNEL_SOURCE`` if already set and valid, the running kernel's
    ``/lib/modules/<release>/build``, then the merged fallback tree that setup builds in
    ``/var/lib/hopwatch/headers/<release>`` (complete only once its ``.complete`` marker
    exists).
    """
    release = release or os.uname().release
    env = os.environ if environ is None else environ
    preset = env.get("BCC_KERNEL_SOURCE")
    if preset and _has_headers(Path(preset)):
        return Path(preset), "env"
    build = modules_root / release / "build"
    if _has_headers(build):
        return build, "modules"
    fallback = fallback_root / release
    if _has_headers(fallback) and (fallback / ".complete").exists():
        return fallback, "fallback"
    if fallback.exists():
        raise KernelError(
            "headers_incomplete",
            f"the merged kernel header tree {fallback} is incomplete (no .complete marker)",
            SETUP_FIX,
        )
    raise KernelError(
        "headers_missing",
        f"no kernel headers for {release}: neither {build} nor {fallback} exists",
        SETUP_FIX,
    )


def _mount(fstype: str, target: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["mount", "-t", fstype, fstype, str(target)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


def ensure_tracefs(tracefs: Path = TRACEFS, debugfs: Path = DEBUGFS) -> Path:
    """Return a tracefs mount with syscall events, mounting tracefs (and debugfs) if needed."""
    if not (tracefs / "events").is_dir():
        err = _mount("tracefs", tracefs)
        if err:
            log.debug("mounting tracefs on %s failed: %s", tracefs, err)
    # Older bcc looks under debugfs/tracing first; mount debugfs when nothing is there.
    if not (debugfs / "tracing").exists() and not os.path.ismount(debugfs):
        err = _mount("debugfs", debugfs)
        if err:
            log.debug("mounting debugfs on %s failed: %s", debugfs, err)
    for candidate in (tracefs, debugfs / "tracing"):
        if (candidate / "events" / "syscalls").is_dir():
            return candidate
    raise KernelError(
        "tracefs_missing",
        f"tracefs with syscall events is not available at {tracefs} "
        "(mount failed or the kernel lacks CONFIG_FTRACE_SYSCALLS)",
        f"`mount -t tracefs tracefs {tracefs}` as root, or {SETUP_FIX}",
    )


def _check_privileges() -> None:
    if os.geteuid() == 0:
        return
    # CAP_BPF (39) + CAP_PERFMON (38) + CAP_SYS_RESOURCE are enough for tracepoints on
    # recent kernels; check the effective set rather than guessing.
    try:
        status = Path("/proc/self/status").read_text()
        capeff = int(next(line.split()[1] for line in status.splitlines()
                          if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        capeff = 0
    if capeff & (1 << 21):  # CAP_SYS_ADMIN
        return
    if capeff & (1 << 39) and capeff & (1 << 38):
        return
    raise KernelError(
        "permission",
        "loading eBPF programs needs root or CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)",
        "run hopwatch as root (the systemd unit does) or grant those capabilities",
    )


def prepare_kernel(*, check_privileges: bool = True) -> KernelEnv:
    """Check every prerequisite and point bcc at the headers (sets BCC_KERNEL_SOURCE)."""
    if check_privileges:
        _check_privileges()
    release = os.uname().release
    headers, source = find_kernel_headers(release)
    if source == "fallback":
        os.environ["BCC_KERNEL_SOURCE"] = str(headers)
    tracefs = ensure_tracefs()
    log.debug("kernel %s: headers %s (%s), tracefs %s", release, headers, source, tracefs)
    return KernelEnv(release=release, headers=headers, headers_source=source, tracefs=tracefs)
