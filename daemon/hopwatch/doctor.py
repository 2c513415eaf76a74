"""`hopwatch doctor`: every prerequisite of live capture, each failure with its fix."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

from ._bcc import import_bcc
from ._compat import SLOTS
from .kernel import kernel_version

__all__ = ["Check", "run_checks"]

_CAP_SYS_ADMIN = 21
_CAP_PERFMON = 38
_CAP_BPF = 39


@dataclass(frozen=True, **SLOTS)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _effective_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> Check:
    caps = _effective_caps()
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    if os.geteuid() == 0 and has(_CAP_SYS_ADMIN):
        return Check("privileges", True, "root with CAP_SYS_ADMIN")
    if has(_CAP_BPF) and has(_CAP_PERFMON):
        return Check("privileges", True, "CAP_BPF and CAP_PERFMON")
    return Check(
        "privileges",
        False,
        f"euid {os.geteuid()}, effective capabilities {caps:#x}",
        "run as root, or grant CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE, CAP_SYS_PTRACE "
        "and CAP_DAC_READ_SEARCH (see systemd/hopwatch.service)",
    )


def check_kernel() -> Check:
    release = platform.release()
    if kernel_version(release) >= (5, 8):
        return Check("kernel", True, f"{release} (ring buffers need >= 5.8)")
    return Check(
        "kernel",
        False,
        f"{release}: BPF ring buffers need Linux 5.8 or newer",
        "upgrade the kernel to 5.8+",
    )


def check_btf() -> Check:
    if os.path.exists("/sys/kernel/btf/vmlinux"):
        return Check("btf", True, "/sys/kernel/btf/vmlinux", required=False)
    return Check(
        "btf",
        False,
        "/sys/kernel/btf/vmlinux missing",
        "a kernel built with CONFIG_DEBUG_INFO_BTF=y helps bcc; capture still works without",
        required=False,
    )


def check_tracefs() -> Check:
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.exists(os.path.join(path, "events/syscalls/sys_enter_write")):
            return Check("tracefs", True, f"{path} with syscall tracepoints")
    if os.path.isdir("/sys/kernel/tracing"):
        detail = "/sys/kernel/tracing has no syscall events (not mounted?)"
    else:
        detail = "no tracefs"
    return Check(
        "tracefs",
        False,
        detail,
        "mount -t tracefs tracefs /sys/kernel/tracing (the daemon tries this itself as root)",
    )


def check_headers() -> Check:
    from hopwatch import kernel

    try:
        path, source = kernel.find_kernel_headers()
    except kernel.KernelError as exc:
        return Check(
            "kernel headers", False, str(exc), "run `make setup` (scripts/setup-system.sh)"
        )
    return Check("kernel headers", True, f"{path} ({source})")


def check_bcc() -> Check:
    try:
        bcc = import_bcc()
    except Exception as exc:  # ImportError, or OSError from libbcc's ctypes load
        return Check(
            "bcc",
            False,
            f"cannot import bcc: {exc}",
            "apt-get install python3-bpfcc bpfcc-tools; in a venv, `make setup` adds the "
            "bcc shim (.venv/bcc-shim)",
        )
    return Check("bcc", True, f"bcc from {os.path.dirname(bcc.__file__)}")


def check_ringbuf() -> Check:
    """Create a tiny BPF ring buffer map through the bpf(2) syscall."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Attr(ctypes.Structure):
        _fields_ = [
            ("map_type", ctypes.c_uint32),
            ("key_size", ctypes.c_uint32),
            ("value_size", ctypes.c_uint32),
            ("max_entries", ctypes.c_uint32),
            ("map_flags", ctypes.c_uint32),
            ("pad", ctypes.c_uint8 * 108),
        ]

    bpf_map_create, map_type_ringbuf, sys_bpf = 0, 27, 321
    attr = Attr(map_type_ringbuf, 0, 0, 4096, 0)
    fd = libc.syscall(sys_bpf, bpf_map_create, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        return Check(
            "ring buffer",
            False,
            f"BPF_MAP_TYPE_RINGBUF create failed: {os.strerror(err)}",
            "needs Linux 5.8+ and privileges (root or CAP_BPF)",
        )
    try:
        how = _read_in_place(fd)
    finally:
        os.close(fd)
    return Check("ring buffer", True, f"BPF_MAP_TYPE_RINGBUF can be created; {how}")


def _read_in_place(fd: int) -> str:
    """How the daemon will read its ring: mapped in place, or through libbpf (slower)."""
    from hopwatch.capture._ring import Ring, in_place_supported

    if not in_place_supported():
        return "the daemon reads it through libbpf (this CPU needs barriers to read it in place)"
    try:
        Ring(fd, mmap.PAGESIZE).close()
    except (OSError, ValueError) as exc:
        return f"mapping it failed ({exc}): the daemon reads it through libbpf (slower)"
    return "the daemon reads it in place (mmap)"


def check_libssl() -> Check:
    """The OpenSSL copies the TLS uprobes would attach to (libssl, binaries exporting SSL_*)."""
    from hopwatch.tls import SslFinder

    finder = SslFinder()
    found = finder.scan_disk() + finder.scan_processes()
    if found:
        names = ", ".join(t.display + (" (embedded)" if t.embedded else "") for t in found)
        return Check("libssl", True, f"TLS plaintext from: {names}", required=False)
    return Check(
        "libssl",
        False,
        "no OpenSSL with exported SSL_read/SSL_write found: TLS plaintext capture sees nothing",
        "install libssl3 (or the distro's OpenSSL runtime)",
        required=False,
    )


_MAX_LISTED = 15


def check_tls_unobservable() -> Check:
    """Running processes with TCP connections whose TLS the uprobes cannot see."""
    from hopwatch.tls import unobservable_processes

    procs = unobservable_processes()
    if not procs:
        return Check(
            "tls coverage",
            True,
            "every process with TCP connections maps a probeable OpenSSL (or none has any)",
            required=False,
        )
    shown = "; ".join(f"{p.pid} {p.comm}: {p.reason}" for p in procs[:_MAX_LISTED])
    more = f"; and {len(procs) - _MAX_LISTED} more" if len(procs) > _MAX_LISTED else ""
    return Check(
        "tls coverage",
        False,
        f"{len(procs)} processes hold TCP connections but no OpenSSL the capture can probe; "
        f"if they speak TLS, their requests are not seen: {shown}{more}",
        "nothing to install: statically linked TLS without symbols (grpcio's BoringSSL, Go "
        "crypto/tls, rustls, Java) is not observable; their plain-HTTP traffic still is "
        "(docs/tls.md)",
        required=False,
    )


CHECKS: tuple[Callable[[], Check], ...] = (
    check_privileges,
    check_kernel,
    check_btf,
    check_tracefs,
    check_headers,
    check_bcc,
    check_ringbuf,
    check_libssl,
    check_tls_unobservable,
)


def run_checks() -> list[Check]:
    out = []
    for fn in CHECKS:
        try:
            out.append(fn())
        except Exception as exc:  # a check must report, never crash the doctor
            out.append(Check(fn.__name__.removeprefix("check_"), False, f"check crashed: {exc}"))
    return out
