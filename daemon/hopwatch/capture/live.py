"""Live capture: the one adapter that touches the kernel.

Loads ``bpf/capture.c`` through bcc (compiled with ``-D`` cflags only), attaches the syscall
tracepoints, drains the ring buffer and turns its records into the plain events of
:mod:`hopwatch.capture._types`. Runtime settings (filters, skip offsets, adopted and ignored
connections) are map updates; nothing is templated into the C source.

Reassembly: the kernel emits one syscall's bytes as one or more records (at most
``chunk_size`` bytes each) that share the syscall's (tid, ts). Records from different CPUs
interleave in the ring, but the records of one thread arrive in order, so pending syscalls
are keyed by tid. Output keeps the ring's order: every event takes a slot when its first
record arrives, and a slot is released only once its syscall is complete (its last record
arrived, another syscall of the same thread started, or it went stale after a drop).

TLS: the kernel reports OpenSSL plaintext as data records whose ``tls_id`` is the SSL
object, with the socket fd once it knows it (see ``bpf/capture.c``). A memory-BIO peer
(Node.js) may return from SSL_read/SSL_write before its socket shows up; such chunks are
held here, per (tgid, ssl), until the binding event arrives, then released in order (a bound
chunk never waits). The SNI a client set (SSL_ctrl) becomes a ``TlsServerName`` event
emitted just before the first plaintext of that SSL object on its socket. The uprobes are
attached to every OpenSSL found by :mod:`hopwatch.tls` at open, for every new program image
(exec events) and on a periodic rescan of ``/proc/*/maps`` (libraries loaded later).
"""

from __future__ import annotations

import collections
import ctypes as ct
import dataclasses
import logging
import os
import platform
import re
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hopwatch.capture._ring import Ring, in_place_supported
from hopwatch.capture._types import (
    CaptureEvent,
    ConnClosed,
    ConnOpened,
    DataChunk,
    Direction,
    LostEvents,
    ProcessExecuted,
    ProcessExited,
    SockAddr,
    TlsServerName,
    UnknownFd,
)
from hopwatch.kernel import KernelError, kernel_version, prepare_kernel
from hopwatch.tls import SslFinder, SslTarget

from .._bcc import import_bcc
from .._compat import SLOTS

__all__ = ["BPF_SOURCE", "CaptureConfig", "LiveCapture"]

log = logging.getLogger(__name__)


def _find_source() -> Path:
    here = Path(__file__).resolve()
    for candidate in (
        here.parents[3] / "bpf" / "capture.c",  # source checkout: <repo>/daemon/hopwatch/capture
        here.parents[1] / "bpf" / "capture.c",  # wheel: hopwatch/bpf (force-include)
    ):
        if candidate.exists():
            return candidate
    return here.parents[3] / "bpf" / "capture.c"


BPF_SOURCE = _find_source()

# --- ABI shared with bpf/capture.c (sizes checked by _Static_assert at compile time) -------

EV_DATA, EV_OPEN, EV_CLOSE, EV_EXIT, EV_UNKNOWN_FD = 1, 2, 3, 4, 5
EV_TLS_BIND, EV_TLS_SNI, EV_EXEC, EV_CLOSE_RANGE = 6, 7, 8, 9
# A connection's cookie: the kernel's clock (bpf_ktime_get_ns, CLOCK_MONOTONIC) when it was
# opened; with the top bit set, when the daemon adopted it.
_ADOPTED = 1 << 63
_COOKIE_TIME = _ADOPTED - 1
TLS_NAME_LEN = 256
DF_FIRST, DF_LAST, DF_NODATA = 1, 2, 4
ROLE_NAMES = {0: "", 1: "client", 2: "server"}
ROLE_CODES = {"client": 1, "server": 2}
HINT_ROLES = {1: "client", 2: "server", 3: "", 4: ""}  # 3: HTTP/2, 4: TLS (role unknown)
SNIFF_PENDING, SNIFF_HTTP, SNIFF_REJECTED, SNIFF_RESYNC, SNIFF_TLS = 0, 1, 2, 3, 4
CF_PID_INCLUDE, CF_PID_ANY, CF_CG_INCLUDE, CF_CG_ANY, CF_PORT_ANY = 1, 2, 4, 8, 16
CF_TLS_OFF = 32
FILTER_INCLUDE, FILTER_EXCLUDE = 1, 2
CTL_IGNORE = 1
BPF_NOEXIST = 1
UNKNOWN_DONE = 255

COUNTERS = (
    "events",
    "bytes",
    "ring_full",
    "truncated_bytes",
    "filtered",
    "sniff_rejected",
    "conn_table_full",
    "unknown_fd",
    "skipped_bytes",
    "truncated_syscalls",
    "ignored",
    "stash_full",
    "tls_calls",
    "tls_unbound",
    "tls_ciphertext",
    "lifecycle",
)

_C_LIFECYCLE = COUNTERS.index("lifecycle")
# The loss counters are per-CPU map reads through bcc (ctypes), read at most this often:
# read on every poll they took an eighth of the loop's time under PyPy at 10,000 req/s.
_LOST_EVERY_S = 0.02

# uprobe program per OpenSSL function: (entry program, return program)
TLS_PROBES = {
    "SSL_write": (b"ssl_write_enter", b"ssl_return"),
    "SSL_write_ex": (b"ssl_write_ex_enter", b"ssl_return"),
    "SSL_read": (b"ssl_read_enter", b"ssl_return"),
    "SSL_read_ex": (b"ssl_read_ex_enter", b"ssl_return"),
    "SSL_ctrl": (b"ssl_ctrl_enter", b""),
}


class EvHdr(ct.Structure):
    _fields_ = [
        ("kind", ct.c_uint8),
        ("dir", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("role", ct.c_uint8),
        ("fd", ct.c_int32),
        ("tgid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ts_ns", ct.c_uint64),
        ("comm", ct.c_char * 16),
    ]


class DataHdr(ct.Structure):
    _fields_ = [
        ("h", EvHdr),
        ("total_len", ct.c_uint64),
        ("offset", ct.c_uint64),
        ("skipped", ct.c_uint64),
        ("chunk_off", ct.c_uint32),
        ("chunk_len", ct.c_uint32),
        ("tls_id", ct.c_uint64),
    ]


class ConnEv(ct.Structure):
    _fields_ = [
        ("h", EvHdr),
        ("family", ct.c_uint16),
        ("port", ct.c_uint16),
        ("pad", ct.c_uint32),
        ("addr", ct.c_uint8 * 16),
        ("cookie", ct.c_uint64),
    ]


class ConnKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("fd", ct.c_int32)]


class DirState(ct.Structure):
    _fields_ = [
        ("offset", ct.c_uint64),
        ("sniff", ct.c_uint8),
        ("sniff_len", ct.c_uint8),
        ("pad", ct.c_uint8 * 6),
        ("sniff_buf", ct.c_uint8 * 16),
    ]


class ConnVal(ct.Structure):
    _fields_ = [
        ("cookie", ct.c_uint64),
        ("port", ct.c_uint16),
        ("role", ct.c_uint8),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint32),
        ("d", DirState * 2),
    ]


class CtlVal(ct.Structure):
    _fields_ = [
        ("cookie", ct.c_uint64),
        ("skip_until", ct.c_uint64 * 2),
        ("flags", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("tls_skip_until", ct.c_uint64 * 2),
    ]


class TlsEv(ct.Structure):
    _fields_ = [
        ("h", EvHdr),
        ("ssl", ct.c_uint64),
        ("len", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("name", ct.c_char * TLS_NAME_LEN),
    ]


class Cfg(ct.Structure):
    _fields_ = [("self_tgid", ct.c_uint32), ("flags", ct.c_uint32), ("cap", ct.c_uint64)]


_HDR = struct.Struct("<BBBBiIIQ16s")
_DATA = struct.Struct("<QQQIIQ")
_CONN = struct.Struct("<HHi16sQ")
_TLS = struct.Struct("<QII")
_HDR_DATA = struct.Struct(_HDR.format + _DATA.format.removeprefix("<"))
_DATA_START = _HDR_DATA.size
_DF_WHOLE = DF_FIRST | DF_LAST
_DIRECTIONS = (Direction.SEND, Direction.RECV)
assert _HDR.size == ct.sizeof(EvHdr)
assert _HDR.size + _DATA.size == ct.sizeof(DataHdr)
assert _HDR.size + _CONN.size == ct.sizeof(ConnEv)
assert _HDR.size + _TLS.size + TLS_NAME_LEN == ct.sizeof(TlsEv)

_SIZE_CFLAGS = [
    f"-DPY_SIZEOF_EV_HDR={ct.sizeof(EvHdr)}",
    f"-DPY_SIZEOF_DATA_HDR={ct.sizeof(DataHdr)}",
    f"-DPY_SIZEOF_CONN_EV={ct.sizeof(ConnEv)}",
    f"-DPY_SIZEOF_CONN_VAL={ct.sizeof(ConnVal)}",
    f"-DPY_SIZEOF_CTL_VAL={ct.sizeof(CtlVal)}",
    f"-DPY_SIZEOF_CFG={ct.sizeof(Cfg)}",
    f"-DPY_SIZEOF_TLS_EV={ct.sizeof(TlsEv)}",
]


@dataclass(frozen=True, **SLOTS)
class CaptureConfig:
    """Load-time settings (cflags) and initial runtime settings (maps)."""

    ring_bytes: int = 16 * 1024 * 1024  # rounded up to a power-of-two number of pages
    chunk_size: int = 8192  # bytes per ring record (power of two, <= 8192)
    max_cap: int = 65536  # compile-time ceiling of the per-syscall copy cap
    cap_bytes: int = 65536  # runtime per-syscall copy cap (<= max_cap)
    conn_max: int = 65536  # tracked connections
    exclude_self: bool = True
    stale_after_s: float = 1.0  # an incomplete syscall is flushed after this long
    tls: bool = True  # attach the OpenSSL uprobes
    tls_rescan_s: float = 30.0  # rescan /proc/*/maps for OpenSSL loaded later
    tls_hold_s: float = 5.0  # plaintext whose socket stays unknown this long is dropped
    tls_hold_max: int = 1024  # plaintext chunks held while their socket is unknown
    batch_records: int = 4096  # ring records read per poll (the rest wait in the ring)
    # Read the ring in place (capture/_ring.py); False, or None on a machine where that is
    # not sound: libbpf's reader, one ctypes callback per record.
    ring_in_place: bool | None = None
    # The data syscalls' exit programs read the arguments from the syscall's saved registers
    # and no enter program is attached (half the tracepoint runs per data syscall); False,
    # or None off x86-64: enter programs stash the arguments in task storage.
    args_from_regs: bool | None = None


@dataclass(**SLOTS)
class _Pending:
    hdr: tuple[Any, ...]
    total_len: int
    offset: int
    skipped: int
    parts: list[bytes] = field(default_factory=list)
    have: int = 0
    broken: bool = False
    event: DataChunk | None = None
    arrived: float = 0.0
    ssl: int = 0  # TLS plaintext: the SSL object


@dataclass(frozen=True, **SLOTS)
class _TlsMark:
    """Slot: (tgid, ssl) got a socket (or a server name): release what waited for it."""

    tgid: int
    ssl: int


_COMPILER_LIBS = ("libLLVM", "libclang", "libpypy")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
MADV_DONTNEED = 4


def regs_args_supported(release: str | None = None, machine: str | None = None) -> bool:
    """The exit programs can read a syscall's arguments from its saved registers: x86-64
    (the register ABI capture.c knows) and bpf_task_pt_regs (Linux 5.15)."""
    arch = (machine or platform.machine()).lower()
    return arch in ("x86_64", "amd64") and kernel_version(release) >= (5, 15)


def release_compiler_memory() -> int:
    """Give back the memory the one-time compile left behind; returns the bytes released.

    bcc compiles ``capture.c`` once, at open; afterwards LLVM and clang are not used again.
    The heap they freed goes back to the system (``malloc_trim``), and the resident pages of
    their read-only, never-written mappings are dropped (``MADV_DONTNEED``: they stay in the
    page cache and fault back in from the file if ever touched again; bcc's own
    ``bcc_free_memory`` does the same for a statically linked LLVM). A mapping with any
    private (anonymous) page, or any writable one, is left alone.
    """
    before = rss_bytes()
    trim_heap()
    targets: list[tuple[int, int]] = []
    current: list[int] | None = None
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                m = _MAPPING.match(line)
                if m is not None:
                    lo, hi, perms, path = int(m[1], 16), int(m[2], 16), m[3], m[4]
                    name = os.path.basename(path)
                    wanted = "w" not in perms and name.startswith(_COMPILER_LIBS)
                    current = [lo, hi] if wanted else None
                elif current is not None and line.startswith("Anonymous:"):
                    if int(line.split()[1]) == 0:
                        targets.append((current[0], current[1]))
                    current = None
    except OSError:
        return 0
    madvise = _LIBC.madvise
    madvise.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int]
    for lo, hi in targets:
        madvise(lo, hi - lo, MADV_DONTNEED)
    return max(0, before - rss_bytes())


_LIBC = ct.CDLL(None, use_errno=True)


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


_HOSTS: dict[bytes, str] = {}  # raw address -> its text, shared by every connection to it


def _peer(family: int, port: int, addr: bytes) -> SockAddr | None:
    if family == socket.AF_INET:
        raw = addr[:4]
    elif family == socket.AF_INET6:
        raw = addr[:16]
    else:
        return None
    host = _HOSTS.get(raw)
    if host is None:
        if len(_HOSTS) >= 65536:
            _HOSTS.clear()
        host = _HOSTS[raw] = socket.inet_ntop(family, raw)
    return SockAddr(family, host, port)


def _ring_pages(ring_bytes: int) -> int:
    pages = max(1, -(-ring_bytes // os.sysconf("SC_PAGE_SIZE")))
    return 1 << (pages - 1).bit_length()


def _have_group_dead(tracefs: Path) -> bool:
    fmt = tracefs / "events" / "sched" / "sched_process_exit" / "format"
    try:
        return "group_dead" in fmt.read_text()
    except OSError:
        return False


class _StderrCapture:
    """bcc prints clang diagnostics and verifier logs on fd 2: keep them for the exception."""

    def __enter__(self) -> _StderrCapture:
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()

    text = ""


class LiveCapture:
    """Loads the capture programs; ``poll()`` yields :data:`CaptureEvent` objects.

    Use as a context manager, or call :meth:`open` and :meth:`close`.
    """

    def __init__(self, config: CaptureConfig | None = None, *, source: Path | None = None) -> None:
        self.config = config or CaptureConfig()
        if self.config.chunk_size & (self.config.chunk_size - 1) or not (
            64 <= self.config.chunk_size <= 8192
        ):
            raise ValueError("chunk_size must be a power of two between 64 and 8192")
        self.source = source or BPF_SOURCE
        regs = self.config.args_from_regs
        self.args_from_regs = regs_args_supported() if regs is None else regs
        self._bpf: Any = None
        self._ring: Ring | None = None
        self._raw: list[bytes] = []
        self._batch = max(1, self.config.batch_records)
        self._behind = False  # the last poll stopped at the batch bound
        self._lifecycle_read = 0  # records other than data read from the ring
        self.records_read = 0  # records taken from the ring, all kinds
        self.ring_full_at = -1e9  # time.monotonic() when a poll last saw ring_full grow
        self._comms: dict[bytes, str] = {}  # raw comm field -> name (bounded)
        self._slots: collections.deque[CaptureEvent | _Pending] = collections.deque()
        self._pending: dict[int, tuple[int, _Pending]] = {}  # tid -> (ts_ns, pending)
        # tgid -> {fd: None}: the connections the kernel map holds, to delete them when the
        # process exits. Dicts, not sets: a set costs ~3x the memory per entry, and 100k
        # connections are 200k entries. The cookie of each stays in the kernel map.
        self._by_tgid: dict[int, dict[int, None]] = {}
        self._n_conns = 0
        self._ctl: dict[tuple[int, int], CtlVal] = {}  # connections with a skip or ignore set
        self._lost_seen: dict[str, int] = {"ring_full": 0, "conn_table_full": 0}
        self._lost_due = 0.0  # time.monotonic() from which the next poll reads them
        self._user_stats = {"incomplete_syscalls": 0, "orphan_chunks": 0}
        self._cfg = Cfg(self_tgid=0, flags=0, cap=self.config.cap_bytes)
        self._pid_filter: dict[int, int] = {}
        self._cg_filter: dict[int, int] = {}
        self._ports: set[int] = set()
        self._next_cookie = _ADOPTED
        # TLS: (tgid, ssl) -> fd, server name waiting for the socket, held plaintext
        self._tls_fd: dict[tuple[int, int], int] = {}
        self._tls_sni: dict[tuple[int, int], str] = {}
        self._tls_held: dict[tuple[int, int], list[tuple[float, DataChunk]]] = {}
        self._tls_held_n = 0
        self._tls_stats = {"tls_unbound_dropped": 0, "tls_targets": 0, "tls_attach_failed": 0}
        self._tls_finder = SslFinder()
        self._tls_targets: list[SslTarget] = []
        self._exec_pids: list[int] = []
        self._next_rescan = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LiveCapture:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def behind(self) -> bool:
        """The last poll stopped at ``batch_records``: more records wait in the ring."""
        return self._behind

    @property
    def shed_syscalls(self) -> int:
        """Syscalls the kernel let pass uncopied because the ring was full, as of the last
        read of the counters (at most 20 ms before the last poll;
        ``events_lost_total{reason="ring_full"}``)."""
        return self._lost_seen["ring_full"]

    def lifecycle_backlog(self) -> int:
        """Open/close/exit/TLS records the kernel submitted that are not read yet.

        Data can be shed under overload (and is counted); these cannot without losing
        track of connections, so a reader that yields the CPU must not yield on these.
        """
        t = self._require()[b"counters"]
        return int(t.sum(ct.c_int(_C_LIFECYCLE)).value) - self._lifecycle_read

    @property
    def ring_bytes(self) -> int:
        """The ring's size: ``ring_bytes`` rounded up to a power-of-two number of pages."""
        return _ring_pages(self.config.ring_bytes) * os.sysconf("SC_PAGE_SIZE")

    def ring_backlog(self) -> int | None:
        """Bytes in the ring not read yet; None with libbpf's reader (it cannot tell) or
        when closed. Safe from another thread (the scrape)."""
        ring = self._ring
        if ring is None:
            return None
        try:
            return ring.pending()
        except (AttributeError, ValueError):  # closed meanwhile
            return None

    def waiting_records(self) -> int:
        """About how many records wait in the ring: its backlog over the ring bytes an
        average record has taken so far. 0 with libbpf's reader (it cannot tell), when
        closed, and before the first record."""
        ring = self._ring
        if ring is None or not self.records_read:
            return 0
        try:
            consumed, pending = ring.consumed(), ring.pending()
        except (AttributeError, ValueError):  # closed meanwhile
            return 0
        return pending * self.records_read // consumed if consumed > 0 else 0

    def limit_batch(self, records: int | None) -> None:
        """Read at most ``records`` per poll from now on (None: ``batch_records`` again)."""
        self._batch = max(1, records or self.config.batch_records)

    @property
    def is_open(self) -> bool:
        return self._bpf is not None

    def open(self) -> None:
        if self._bpf is not None:
            return
        env = prepare_kernel()
        try:
            BPF = import_bcc().BPF
        except ImportError as exc:
            raise KernelError(
                "bcc_missing",
                f"the bcc Python package cannot be imported ({exc})",
                "install python3-bpfcc and expose it to the venv: run `make setup`",
            ) from exc
        if not self.source.exists():
            raise KernelError(
                "source_missing", f"BPF source {self.source} not found", "reinstall hopwatch"
            )
        cfg = self.config
        cflags = [
            f"-DCHUNK_SIZE={cfg.chunk_size}",
            f"-DMAX_CAP={cfg.max_cap}",
            f"-DRINGBUF_PAGES={_ring_pages(cfg.ring_bytes)}",
            f"-DCONN_MAX={cfg.conn_max}",
            f"-DHAVE_GROUP_DEAD={int(_have_group_dead(env.tracefs))}",
            f"-DARGS_FROM_REGS={int(self.args_from_regs)}",
            *_SIZE_CFLAGS,
        ]
        t0 = time.monotonic()
        cap = _StderrCapture()
        try:
            with cap:
                bpf = BPF(src_file=str(self.source).encode(), cflags=cflags)
        except Exception as exc:
            raise self._load_error(exc, cap.text) from exc
        try:
            with cap:
                step = bpf.load_func(b"copy_step", BPF.TRACEPOINT)
                step_tls = bpf.load_func(b"copy_step_tls", BPF.KPROBE)
            bpf[b"copy_jmp"][ct.c_int(0)] = ct.c_int(step.fd)
            bpf[b"tls_jmp"][ct.c_int(0)] = ct.c_int(step_tls.fd)
            self._bpf = bpf
            self._write_cfg(exclude_self=cfg.exclude_self)
            events = bpf[b"events"]
            in_place = cfg.ring_in_place
            if in_place is None:
                in_place = in_place_supported()
            if in_place:
                try:
                    self._ring = Ring(events.map_fd, events.max_entries)
                except (OSError, ValueError) as exc:
                    log.warning("ring buffer: mapping it failed (%s); libbpf's reader instead", exc)
            if self._ring is None:
                events.open_ring_buffer(self._on_record)
        except Exception as exc:
            bpf.cleanup()
            self._bpf = None
            raise self._load_error(exc, cap.text) from exc
        if cfg.tls:
            t1 = time.monotonic()
            self.attach_tls(self._tls_finder.scan_disk() + self._tls_finder.scan_processes())
            self._next_rescan = time.monotonic() + cfg.tls_rescan_s
            log.info(
                "TLS: uprobes on %d OpenSSL copies in %.2fs: %s",
                len(self._tls_targets),
                time.monotonic() - t1,
                ", ".join(t.display for t in self._tls_targets) or "none found",
            )
        released = release_compiler_memory()
        log.info(
            "capture loaded in %.2fs (headers %s, ring %d pages, data syscall arguments %s); "
            "%d MiB of compiler memory released",
            time.monotonic() - t0,
            env.headers_source,
            _ring_pages(cfg.ring_bytes),
            "from the saved registers" if self.args_from_regs else "stashed at enter",
            released >> 20,
        )

    @staticmethod
    def _load_error(exc: Exception, diagnostics: str) -> KernelError:
        msg = str(exc)
        tail = "\n".join(diagnostics.strip().splitlines()[-25:])
        detail = f"{msg}\n{tail}" if tail else msg
        if "Permission denied" in msg and os.geteuid() != 0:
            return KernelError(
                "permission", f"loading eBPF failed: {detail}", "run hopwatch as root"
            )
        if "compile" in msg.lower():
            return KernelError(
                "compile",
                f"bcc could not compile {BPF_SOURCE.name}: {detail}",
                "check the kernel headers (`hopwatch doctor`; `make setup` rebuilds them)",
            )
        if "load" in msg.lower():
            return KernelError(
                "verifier",
                f"the kernel rejected a capture program: {detail}",
                "report this with the verifier log above; a different CHUNK/cap may load",
            )
        return KernelError(
            "attach",
            f"attaching the capture programs failed: {detail}",
            "check that tracefs is mounted and syscall tracepoints exist (`hopwatch doctor`)",
        )

    def close(self, *, exiting: bool = False) -> None:
        """Detach everything and free the maps.

        ``exiting``: the process exits right after (the daemon's shutdown). Detaching a
        uprobe waits for an RCU grace period in the kernel (~0.1 s each here, 9 per OpenSSL
        copy), so the uprobes are first made inert, then handed to a helper process that
        detaches them once this one has exited: stopping stays prompt.
        """
        bpf, self._bpf = self._bpf, None
        if bpf is None:
            return
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if exiting and bpf.uprobe_fds:
            try:
                self._detach_uprobes_after_exit(bpf)
            except OSError as exc:
                log.warning("TLS: detaching the uprobes in place (%s)", exc)
        bpf.cleanup()

    def _detach_uprobes_after_exit(self, bpf: Any) -> None:
        cfg = Cfg(
            self_tgid=self._cfg.self_tgid, flags=self._cfg.flags | CF_TLS_OFF, cap=self._cfg.cap
        )
        bpf[b"config"][ct.c_int(0)] = cfg
        fds = sorted(bpf.uprobe_fds.values())
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the helper: holds only the uprobe perf events
            try:
                null = os.open(os.devnull, os.O_RDWR)
                for std in (0, 1, 2):  # a reader of our output sees EOF when we exit
                    os.dup2(null, std)
                low = 3
                for fd in fds:
                    os.closerange(low, fd)
                    low = fd + 1
                os.closerange(low, os.sysconf("SC_OPEN_MAX"))
                deadline = time.monotonic() + 60
                while os.getppid() == parent and time.monotonic() < deadline:
                    time.sleep(0.02)
                for fd in fds:
                    os.close(fd)
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)  # not the last reference: returns at once
        bpf.uprobe_fds.clear()
        log.info("TLS: %d uprobes detach in helper process %d after exit", len(fds), pid)

    # -- TLS ---------------------------------------------------------------------------

    @property
    def tls_targets(self) -> list[SslTarget]:
        """The OpenSSL copies the uprobes are attached to."""
        return list(self._tls_targets)

    def attach_tls(self, targets: list[SslTarget]) -> int:
        """Attach the SSL uprobes to each target (a file: every process mapping it, now or
        later). Returns how many targets were attached."""
        bpf = self._require()
        done = 0
        for target in targets:
            path = target.path.encode()
            try:
                for func, (enter, ret) in TLS_PROBES.items():
                    addr = target.symbols.get(func)
                    if addr is None:
                        continue
                    bpf.attach_uprobe(name=path, addr=addr, fn_name=enter)
                    if ret:
                        bpf.attach_uretprobe(name=path, addr=addr, fn_name=ret)
            except Exception as exc:  # a vanished file, a uprobe refused: the rest still go
                self._tls_stats["tls_attach_failed"] += 1
                log.warning("TLS: cannot attach to %s: %s", target.display, exc)
                continue
            self._tls_targets.append(target)
            self._tls_stats["tls_targets"] = len(self._tls_targets)
            done += 1
            log.debug("TLS: attached to %s", target.display)
        return done

    def _tls_scan(self) -> None:
        """New program images (exec events) now, every process's maps periodically."""
        found: list[SslTarget] = []
        if self._exec_pids:
            pids, self._exec_pids = self._exec_pids, []
            for pid in dict.fromkeys(pids):
                found += self._tls_finder.scan_pid(pid)
        now = time.monotonic()
        if now >= self._next_rescan:
            self._next_rescan = now + self.config.tls_rescan_s
            found += self._tls_finder.scan_processes()
        if found:
            n = self.attach_tls(found)
            log.info("TLS: attached to %d more: %s", n, ", ".join(t.display for t in found))

    # -- runtime settings (map updates) -----------------------------------------------

    def _require(self) -> Any:
        if self._bpf is None:
            raise RuntimeError("LiveCapture is not open")
        return self._bpf

    def _write_cfg(self, *, exclude_self: bool | None = None) -> None:
        bpf = self._require()
        if exclude_self is not None:
            self._cfg.self_tgid = os.getpid() if exclude_self else 0
        flags = 0
        if self._pid_filter:
            flags |= CF_PID_ANY
        if FILTER_INCLUDE in self._pid_filter.values():
            flags |= CF_PID_INCLUDE
        if self._cg_filter:
            flags |= CF_CG_ANY
        if FILTER_INCLUDE in self._cg_filter.values():
            flags |= CF_CG_INCLUDE
        if self._ports:
            flags |= CF_PORT_ANY
        self._cfg.flags = flags
        bpf[b"config"][ct.c_int(0)] = self._cfg

    def exclude_self(self, exclude: bool = True) -> None:
        self._write_cfg(exclude_self=exclude)

    def set_cap(self, cap_bytes: int) -> None:
        """Per-syscall copy cap (bytes beyond it are reported as missed)."""
        self._cfg.cap = max(0, min(cap_bytes, self.config.max_cap))
        self._write_cfg()

    def _replace_filter(self, table: bytes, current: dict[int, int], new: dict[int, int],
                        ktype: type[ct._SimpleCData]) -> None:  # type: ignore[type-arg]
        bpf = self._require()
        t = bpf[table]
        for k in set(current) - set(new):
            del t[ktype(k)]
        for k, v in new.items():
            t[ktype(k)] = ct.c_uint8(v)
        current.clear()
        current.update(new)

    def set_pid_filter(self, include: set[int] | frozenset[int] = frozenset(),
                       exclude: set[int] | frozenset[int] = frozenset()) -> None:
        """Observe only ``include`` tgids (empty: all), never ``exclude`` ones."""
        new = {p: FILTER_INCLUDE for p in include}
        new.update({p: FILTER_EXCLUDE for p in exclude})
        self._replace_filter(b"pid_filter", self._pid_filter, new, ct.c_uint32)
        self._write_cfg()

    def set_cgroup_filter(self, include: set[int] | frozenset[int] = frozenset(),
                          exclude: set[int] | frozenset[int] = frozenset()) -> None:
        """Cgroup v2 ids (inode numbers of the cgroup directories); a task matches through
        its own cgroup or any ancestor."""
        new = {c: FILTER_INCLUDE for c in include}
        new.update({c: FILTER_EXCLUDE for c in exclude})
        self._replace_filter(b"cgroup_filter", self._cg_filter, new, ct.c_uint64)
        self._write_cfg()

    def set_port_exclude(self, ports: set[int] | frozenset[int]) -> None:
        """Connections whose peer port is in ``ports`` are neither tracked nor copied."""
        new = {p: FILTER_EXCLUDE for p in ports}
        cur = {p: FILTER_EXCLUDE for p in self._ports}
        self._replace_filter(b"port_filter", cur, new, ct.c_uint16)
        self._ports = set(ports)
        self._write_cfg()

    def _ctl_for(self, tgid: int, fd: int, as_of_ns: int) -> CtlVal | None:
        ctl = self._ctl.get((tgid, fd))
        if ctl is not None:
            return ctl
        fds = self._by_tgid.get(tgid)
        if fds is None or fd not in fds or self._bpf is None:
            return None  # unknown, or a capture that is not open (hopwatch.warmup)
        # The connection's cookie, from the kernel map (once per connection with a control:
        # keeping every cookie here would cost ~200 bytes per tracked connection).
        try:
            val = self._require()[b"conns"][ConnKey(tgid, fd)]
        except KeyError:
            return None
        # The map holds the fd's connection as of NOW; the reader may still be on records of
        # an earlier connection that had this fd (closed, the fd reused, its close not read
        # yet). The cookie is the time the connection was opened (or adopted): one opened
        # after the record being acted on is not that record's connection.
        if val.cookie & _COOKIE_TIME > as_of_ns:
            return None
        ctl = self._ctl[(tgid, fd)] = CtlVal(cookie=val.cookie)
        return ctl

    def set_skip_until(
        self,
        tgid: int,
        fd: int,
        direction: Direction,
        offset: int,
        *,
        tls: bool = False,
        as_of_ns: int,
    ) -> bool:
        """Do not copy bytes of this direction below absolute ``offset``.

        Offsets are those of :attr:`DataChunk.offset`; ``tls`` selects the plaintext offsets
        of a TLS connection. ``as_of_ns``: the time of the record this follows from
        (``DataChunk.ts_ns``); a connection that took the fd later is left alone. Returns
        False when the connection is unknown (closed, or never seen) or not that one.
        """
        ctl = self._ctl_for(tgid, fd, as_of_ns)
        if ctl is None:
            return False
        target = ctl.tls_skip_until if tls else ctl.skip_until
        target[0 if direction is Direction.SEND else 1] = max(0, offset)
        self._require()[b"ctl"][ConnKey(tgid, fd)] = ctl
        return True

    def ignore(self, tgid: int, fd: int, *, as_of_ns: int) -> None:
        """Stop copying this fd (tracked or not) and stop unknown-fd notices for it.
        ``as_of_ns`` as for :meth:`set_skip_until`. Nothing when the capture is not open."""
        bpf = self._bpf
        if bpf is None:
            return
        ctl = self._ctl_for(tgid, fd, as_of_ns)
        if ctl is not None:
            ctl.flags |= CTL_IGNORE
            bpf[b"ctl"][ConnKey(tgid, fd)] = ctl
        bpf[b"unknown_seen"][ConnKey(tgid, fd)] = ct.c_uint8(UNKNOWN_DONE)

    def forget(self, tgid: int, fd: int, *, as_of_ns: int) -> None:
        """The fd's connection is over though no close() was seen (its process ran exec and
        the socket was close-on-exec, or it called close_range()): stop tracking it. A
        connection that took the fd after ``as_of_ns`` (the kernel's cookie is its open time)
        is left alone."""
        bpf = self._bpf
        if bpf is None:
            return
        key = ConnKey(tgid, fd)
        try:
            val = bpf[b"conns"][key]
        except KeyError:
            val = None
        if val is not None and val.cookie & _COOKIE_TIME > as_of_ns:
            return
        self._forget(tgid, fd, delete=val is not None)

    def adopt(self, tgid: int, fd: int, role: str) -> bool:
        """Track an inet socket the kernel did not see open (found through /proc).

        Byte offsets of an adopted connection count from adoption. Its first syscalls are
        copied only from one that starts like HTTP (a message boundary). Returns False when
        the connection is already tracked.
        """
        from bcc.libbcc import lib

        bpf = self._require()
        # The adoption time, marked (see _ctl_for; the kernel's cookies are open times).
        cookie = self._next_cookie = max(self._next_cookie + 1, _ADOPTED | time.monotonic_ns())
        val = ConnVal(cookie=cookie, port=0, role=ROLE_CODES.get(role, 0), family=0)
        val.d[0].sniff = SNIFF_RESYNC
        val.d[1].sniff = SNIFF_RESYNC
        key = ConnKey(tgid, fd)
        rc = lib.bpf_update_elem(bpf[b"conns"].map_fd, ct.byref(key), ct.byref(val), BPF_NOEXIST)
        if rc != 0:
            return False
        self._track(tgid, fd)
        try:
            del bpf[b"ctl"][key]
        except KeyError:
            pass
        return True

    # -- counters ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Kernel counters (summed over CPUs) plus the adapter's own."""
        bpf = self._require()
        t = bpf[b"counters"]
        out = {name: int(t.sum(ct.c_int(i)).value) for i, name in enumerate(COUNTERS)}
        out.update(self._user_stats)
        out["connections"] = self._n_conns
        out.update(self._tls_stats)
        out["tls_held"] = self._tls_held_n
        return out

    # -- events ------------------------------------------------------------------------

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        """libbpf's reader (``ring_in_place`` off): one ctypes callback per record."""
        raw = self._raw
        raw.append(ct.string_at(data, size))
        # A negative return stops libbpf's read (this record is taken): a reader that falls
        # behind leaves the backlog in the ring, where the kernel sheds it cheaply and counts
        # it, instead of copying it all into this process's memory at once.
        return -1 if len(raw) >= self._batch else 0

    def _read(self, timeout_ms: int) -> None:
        """Take up to ``batch_records`` records into ``_raw``; wait first only when the last
        read was not cut short and nothing is waiting."""
        ring = self._ring
        if ring is None:
            bpf = self._require()
            if self._behind:
                bpf.ring_buffer_consume()
            else:
                bpf.ring_buffer_poll(timeout_ms)
                if len(self._raw) < self._batch:
                    bpf.ring_buffer_consume()
            return
        if not self._behind and not ring.pending():
            # The kernel wakes us only every WAKE_EVERY-th record (capture.c): the rest are
            # read when the wait times out.
            ring.wait(timeout_ms)
        self._raw.extend(ring.read(self._batch - len(self._raw)))

    def poll(self, timeout_ms: int = 100) -> list[CaptureEvent]:
        """Wait up to ``timeout_ms`` for records; return the events completed so far."""
        self._require()
        self._read(timeout_ms)
        self._behind = len(self._raw) >= self._batch
        out = self._drain()
        if time.monotonic() >= self._lost_due:
            out.extend(self._lost())
        if self.config.tls and (self._exec_pids or time.monotonic() >= self._next_rescan):
            self._tls_scan()
        return out

    def _drain(self) -> list[CaptureEvent]:
        """Decode the records read so far; return the events completed, in ring order."""
        raw, self._raw = self._raw, []
        self.records_read += len(raw)
        for rec in raw:
            self._record(rec)
        self._flush_stale()
        out: list[CaptureEvent] = []
        slots = self._slots
        while slots:
            head = slots[0]
            if isinstance(head, _Pending):
                if head.event is None:
                    break
                if head.ssl:
                    self._tls_out(head.ssl, head.event, out)
                else:
                    out.append(head.event)
            elif isinstance(head, _TlsMark):
                self._tls_release(head.tgid, head.ssl, out)
            else:
                if isinstance(head, ProcessExited) and (
                    self._tls_fd or self._tls_sni or self._tls_held
                ):
                    self._tls_forget(head.tgid)
                out.append(head)
            slots.popleft()
        return out

    def _tls_out(self, ssl: int, ev: DataChunk, out: list[CaptureEvent]) -> None:
        """A TLS plaintext chunk leaves the adapter once its socket is known."""
        key = (ev.tgid, ssl)
        fd = ev.fd if ev.fd >= 0 else self._tls_fd.get(key, -1)
        if fd < 0:
            self._tls_held.setdefault(key, []).append((time.monotonic(), ev))
            self._tls_held_n += 1
            while self._tls_held_n > self.config.tls_hold_max:
                oldest = next(iter(self._tls_held))
                self._drop_held(oldest)
            return
        self._tls_fd[key] = fd
        self._server_name(key, fd, ev.ts_ns, out)
        out.append(ev if ev.fd == fd else dataclasses.replace(ev, fd=fd))

    def _tls_release(self, tgid: int, ssl: int, out: list[CaptureEvent]) -> None:
        key = (tgid, ssl)
        fd = self._tls_fd.get(key, -1)
        if fd < 0:
            return
        held = self._tls_held.pop(key, None)
        if held:
            self._tls_held_n -= len(held)
            self._server_name(key, fd, held[0][1].ts_ns, out)
            out.extend(dataclasses.replace(ev, fd=fd) for _t, ev in held)

    def _server_name(self, key: tuple[int, int], fd: int, ts: int, out: list[CaptureEvent]) -> None:
        name = self._tls_sni.pop(key, None)
        if name is not None:
            out.append(TlsServerName(key[0], fd, name, ts))

    def _drop_held(self, key: tuple[int, int]) -> None:
        held = self._tls_held.pop(key, [])
        self._tls_held_n -= len(held)
        self._tls_stats["tls_unbound_dropped"] += len(held)

    def _tls_forget(self, tgid: int) -> None:
        for table in (self._tls_fd, self._tls_sni):
            for key in [k for k in table if k[0] == tgid]:
                del table[key]
        for key in [k for k in self._tls_held if k[0] == tgid]:
            self._drop_held(key)

    def _tls_bound(self, key: tuple[int, int], fd: int) -> None:
        self._tls_fd[key] = fd
        if len(self._tls_fd) > 65536:
            del self._tls_fd[next(iter(self._tls_fd))]

    def _lost(self) -> list[LostEvents]:
        self._lost_due = time.monotonic() + _LOST_EVERY_S
        t = self._require()[b"counters"]
        out = []
        for name in self._lost_seen:
            now = int(t.sum(ct.c_int(COUNTERS.index(name))).value)
            if now > self._lost_seen[name]:
                out.append(LostEvents(name, now - self._lost_seen[name]))
                self._lost_seen[name] = now
                if name == "ring_full":
                    self.ring_full_at = time.monotonic()
        return out

    def _record(self, rec: bytes) -> None:
        if rec[0] == EV_DATA:
            (_k, d, flags, role, fd, tgid, tid, ts, comm, total, offset, skipped, chunk_off,
             chunk_len, ssl) = _HDR_DATA.unpack_from(rec)
            if (
                flags & _DF_WHOLE == _DF_WHOLE
                and not ssl
                and chunk_off == 0
                and tid not in self._pending
            ):
                # The common case: one record holds the whole syscall. No reassembly.
                name = self._comms.get(comm)
                if name is None:
                    name = self._comm_name(comm)
                self._slots.append(
                    DataChunk(
                        tgid, tid, fd, _DIRECTIONS[d], ts, total,
                        rec[_DATA_START : _DATA_START + chunk_len], skipped, False, name, offset,
                        ROLE_NAMES.get(role, ""),
                    )
                )
                return
            self._data(rec, (_k, d, flags, role, fd, tgid, tid, ts, comm))
            return
        kind, d, flags, role, fd, tgid, tid, ts, comm = _HDR.unpack_from(rec)
        self._lifecycle_read += 1
        if kind == EV_OPEN:
            family, port, listen_fd, addr, _cookie = _CONN.unpack_from(rec, _HDR.size)
            if self._ctl:
                self._ctl.pop((tgid, fd), None)
            self._track(tgid, fd)
            name = self._comms.get(comm)
            if name is None:
                name = self._comm_name(comm)
            self._slots.append(
                ConnOpened(tgid, tid, fd, ROLE_NAMES.get(role, ""), _peer(family, port, addr),
                           ts, name, listen_fd)
            )
        elif kind == EV_CLOSE:
            self._forget(tgid, fd)
            self._slots.append(ConnClosed(tgid, fd, ts))
        elif kind == EV_CLOSE_RANGE:
            # close_range(fd, tid): the connections tracked in the range end here. One that
            # took an fd number since (its open is later in the ring) keeps its entry.
            closed = [f for f in self._by_tgid.get(tgid, ()) if fd <= f <= tid]
            for fd_ in closed:
                self.forget(tgid, fd_, as_of_ns=ts)
                self._slots.append(ConnClosed(tgid, fd_, ts))
        elif kind == EV_EXIT:
            for fd_ in list(self._by_tgid.get(tgid, ())):
                self._forget(tgid, fd_, delete=True)
            self._slots.append(ProcessExited(tgid, ts))  # TLS state: forgotten when it leaves
        elif kind == EV_TLS_BIND:
            ssl = _TLS.unpack_from(rec, _HDR.size)[0]
            self._tls_bound((tgid, ssl), fd)
            self._slots.append(_TlsMark(tgid, ssl))
        elif kind == EV_TLS_SNI:
            ssl, n, _pad = _TLS.unpack_from(rec, _HDR.size)
            start = _HDR.size + _TLS.size
            name = rec[start : start + min(n, TLS_NAME_LEN)].decode("ascii", "replace")
            # A name is set before a handshake: the SSL object starts a new session.
            self._tls_fd.pop((tgid, ssl), None)
            self._tls_sni[(tgid, ssl)] = name.lower().rstrip(".")
            if len(self._tls_sni) > 65536:
                del self._tls_sni[next(iter(self._tls_sni))]
        elif kind == EV_EXEC:
            self._exec_pids.append(tgid)
            self._slots.append(ProcessExecuted(tgid, ts))
        elif kind == EV_UNKNOWN_FD:
            self._slots.append(
                UnknownFd(tgid, tid, fd, Direction.SEND if d == 0 else Direction.RECV,
                          HINT_ROLES.get(flags, ""), ts, _comm(comm))
            )

    def _comm_name(self, raw: bytes) -> str:
        if len(self._comms) >= 4096:
            self._comms.clear()
        name = self._comms[raw] = _comm(raw)
        return name

    def _track(self, tgid: int, fd: int) -> None:
        fds = self._by_tgid.get(tgid)
        if fds is None:
            self._by_tgid[tgid] = {fd: None}
            self._n_conns += 1
        elif fd not in fds:
            fds[fd] = None
            self._n_conns += 1

    def _forget(self, tgid: int, fd: int, *, delete: bool = False) -> None:
        if self._ctl:
            self._ctl.pop((tgid, fd), None)
        fds = self._by_tgid.get(tgid)
        if fds is not None and fds.pop(fd, 0) is None:
            self._n_conns -= 1
            if not fds:
                del self._by_tgid[tgid]
        if delete and self._bpf is not None:
            key = ConnKey(tgid, fd)
            for table in (b"conns", b"ctl"):
                try:
                    del self._bpf[table][key]
                except KeyError:
                    pass

    def _data(self, rec: bytes, hdr: tuple[Any, ...]) -> None:
        total, offset, skipped, chunk_off, chunk_len, ssl = _DATA.unpack_from(rec, _HDR.size)
        flags, tid, ts = hdr[2], hdr[6], hdr[7]
        body = rec[_HDR.size + _DATA.size : _HDR.size + _DATA.size + chunk_len]
        cur = self._pending.get(tid)
        if cur is not None and cur[0] != ts:
            # a new syscall of this thread: the previous one lost its last record
            self._complete(tid, cur[1], incomplete=True)
            cur = None
        if cur is None:
            p = _Pending(hdr, total, offset, skipped, arrived=time.monotonic(), ssl=ssl)
            self._slots.append(p)
            self._pending[tid] = (ts, p)
            if not flags & DF_FIRST or chunk_off != 0:
                self._user_stats["orphan_chunks"] += 1
                p.broken = True  # its first records were dropped: report it as a gap
        else:
            p = cur[1]
        if not p.broken:
            if chunk_off == p.have:
                p.parts.append(body)
                p.have += len(body)
            else:
                p.broken = True
        if flags & DF_LAST:
            self._complete(tid, p, incomplete=False)

    def _complete(self, tid: int, p: _Pending, *, incomplete: bool) -> None:
        self._pending.pop(tid, None)
        if incomplete:
            self._user_stats["incomplete_syscalls"] += 1
        _k, d, _f, role, fd, tgid, tid_, ts, comm = p.hdr
        p.event = DataChunk(
            tgid=tgid,
            tid=tid_,
            fd=fd,
            direction=Direction.SEND if d == 0 else Direction.RECV,
            ts_ns=ts,
            total_len=p.total_len,
            data=b"".join(p.parts),
            skipped=p.skipped,
            tls=p.ssl != 0,
            comm=_comm(comm),
            offset=p.offset,
            role=ROLE_NAMES.get(role, ""),
        )

    def _flush_stale(self) -> None:
        if self._tls_held:
            hold_limit = time.monotonic() - self.config.tls_hold_s
            for key in [k for k, v in self._tls_held.items() if v[0][0] < hold_limit]:
                self._drop_held(key)
        if not self._pending:
            return
        limit = time.monotonic() - self.config.stale_after_s
        for tid, (_ts, p) in list(self._pending.items()):
            if p.arrived < limit:
                self._complete(tid, p, incomplete=True)
