"""Process identity and socket facts read from /proc.

Theory of operation
-------------------
The capture source gives us ``(tgid, fd)`` pairs and, for connections it saw being opened,
the peer address. Everything else about a process and its sockets comes from /proc:

* identity: ``/proc/<pid>/comm`` and ``/proc/<pid>/cgroup``. The cgroup path tells the systemd
  unit (``nginx.service``) or the container (docker, containerd/CRI, cri-o, podman). The
  result is cached per pid in a bounded LRU with an age limit, and dropped on process exit.
* sockets: ``/proc/<pid>/fd/<fd>`` is a symlink to ``socket:[<inode>]``; the
  ``system.sockprotoname`` extended attribute of that fd says ``TCP``/``TCPv6``/``UNIX-STREAM``
  /``UDP``... without reading any table (a fake tree in tests has no such attribute: then the
  TCP tables decide). The inode is looked up in ``/proc/<pid>/net/tcp`` and ``tcp6``: the
  tables of the process's OWN network namespace, so namespaced processes resolve correctly.
  Parsed tables are cached per namespace (keyed by ``/proc/<pid>/ns/net``) for a short time;
  a lookup that misses re-reads the table once, so a socket created after the last read is
  still found. A table holds every socket of the namespace, so on a busy node one read costs
  milliseconds: lookups made for every new connection are *budgeted* (a miss re-reads only
  when the last read is older than ``reread_cost_factor`` times what it cost, i.e. at most
  ~1/factor of a CPU per namespace; otherwise the answer is ``Lookup.DEFERRED``).

Nothing here raises for a process or fd that vanished: the answer is ``None`` (or an empty
list). Only the root path is configurable (``ProcFS(root=...)``) so tests can build a fake
tree.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import os
import re
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass

from hopwatch.capture._types import SockAddr

from ._compat import SLOTS

__all__ = [
    "Lookup",
    "ProcFS",
    "ProcessInfo",
    "SocketFd",
    "TcpSocket",
    "TcpState",
    "decode_addr",
    "guess_role",
    "normalize_addr",
    "parse_cgroup",
    "parse_tcp_table",
]

_LITTLE = sys.byteorder == "little"


class TcpState(enum.IntEnum):
    """``st`` column of /proc/net/tcp (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


# ---------------------------------------------------------------------------------------------
# process identity


@dataclass(frozen=True, **SLOTS)
class ProcessInfo:
    """Who a process is. ``label`` is what metrics and the audit log call it."""

    pid: int
    comm: str
    unit: str | None = None  # systemd .service unit, when the process runs in one
    container: str | None = None  # full container id
    runtime: str | None = None  # docker | containerd | cri-o | podman | kubepods | container

    @property
    def label(self) -> str:
        """Container (``docker/3f4e5a6b7c8d``), else systemd service, else ``comm``."""
        if self.container:
            return f"{self.runtime or 'container'}/{self.container[:12]}"
        if self.unit:
            return self.unit
        return self.comm


_HEX64 = r"[0-9a-f]{64}"
# One cgroup path component -> runtime. The conmon helpers (crio-conmon-<id>.scope,
# libpod-conmon-<id>.scope) do not match: "conmon-" is not hex.
_CONTAINER_COMPONENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"docker-({_HEX64})\.scope"), "docker"),
    (re.compile(rf"cri-containerd-({_HEX64})\.scope"), "containerd"),
    (re.compile(rf"nerdctl-({_HEX64})\.scope"), "containerd"),
    (re.compile(rf"crio-({_HEX64})(?:\.scope)?"), "cri-o"),
    (re.compile(rf"libpod-({_HEX64})(?:\.scope)?"), "podman"),
)
_BARE_ID = re.compile(_HEX64)
# Parent of a bare 64-hex component under the cgroupfs drivers.
_BARE_PARENTS: dict[str, str] = {"docker": "docker", "crio": "cri-o", "k8s.io": "containerd"}
_POD_DIR = re.compile(r"pod[0-9a-f_-]+")


def _container_of(path: str) -> tuple[str, str] | None:
    """(runtime, id) for the deepest container component of one cgroup path."""
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        for pattern, runtime in _CONTAINER_COMPONENTS:
            m = pattern.fullmatch(part)
            if m:
                return runtime, m.group(1)
        if _BARE_ID.fullmatch(part):
            parent = parts[i - 1] if i else ""
            if parent in _BARE_PARENTS:
                return _BARE_PARENTS[parent], part
            if _POD_DIR.fullmatch(parent) or "kubepods" in parts:
                return "kubepods", part
            return "container", part
    return None


def _unit_of(path: str) -> str | None:
    """The systemd service a cgroup path belongs to, if any.

    The deepest unit-typed component decides: ``*.service`` is the unit (also user units
    below ``user@UID.service``, and delegated sub-cgroups like ``foo.service/payload``);
    a ``*.scope`` (login sessions, ``init.scope``, container scopes) means no useful unit.
    Slices only group and never decide.
    """
    for part in reversed([p for p in path.split("/") if p]):
        if part.endswith(".service"):
            return part
        if part.endswith(".scope"):
            return None
    return None


def parse_cgroup(text: str) -> tuple[str | None, str | None, str | None]:
    """``/proc/<pid>/cgroup`` text -> (unit, runtime, container id).

    Handles cgroup v2 (``0::/path``), v1 (``N:controllers:/path``) and hybrid hierarchies.
    The v2 path is preferred, then v1 ``name=systemd``, then the other v1 controllers.
    """
    v2: list[str] = []
    systemd: list[str] = []
    others: list[str] = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hid, controllers, path = fields
        path = path.strip()
        if not path or path == "/":
            continue
        if hid == "0" and controllers == "":
            v2.append(path)
        elif controllers == "name=systemd":
            systemd.append(path)
        else:
            others.append(path)
    paths = v2 + systemd + others
    container: tuple[str, str] | None = None
    for path in paths:
        container = _container_of(path)
        if container:
            break
    unit: str | None = None
    for path in paths:
        unit = _unit_of(path)
        if unit:
            break
    if container:
        return unit, container[0], container[1]
    return unit, None, None


# ---------------------------------------------------------------------------------------------
# sockets


@functools.lru_cache(maxsize=4096)  # a node talks to few distinct addresses: rows repeat them
def decode_addr(hex_addr: str) -> tuple[int, str]:
    """One address column of /proc/net/tcp{,6} (without the port) -> (family, text).

    The kernel prints each 32-bit word of the address as a host-order integer, so on a
    little-endian machine the bytes of every 8-hex-digit group are reversed. IPv4-mapped
    IPv6 addresses (``::ffff:a.b.c.d``) are returned as plain IPv4: the allowlist and the
    metrics should not see one peer under two spellings.
    """
    raw = bytes.fromhex(hex_addr)
    if _LITTLE:
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return socket.AF_INET, socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        if raw[:12] == b"\0" * 10 + b"\xff\xff":
            return socket.AF_INET, socket.inet_ntop(socket.AF_INET, raw[12:])
        return socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, raw)
    raise ValueError(f"bad address length: {hex_addr!r}")


def normalize_addr(addr: SockAddr | None) -> SockAddr | None:
    """Spell an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) as IPv4; else unchanged."""
    if addr is None or addr.family != socket.AF_INET6 or "." not in addr.host:
        return addr
    host = addr.host.lower()
    if host.startswith("::ffff:") and host.count(":") == 3:
        return SockAddr(socket.AF_INET, host[7:], addr.port)
    return addr


@dataclass(frozen=True, **SLOTS)
class TcpSocket:
    """One row of /proc/<pid>/net/tcp or tcp6."""

    inode: int
    local: SockAddr
    remote: SockAddr
    state: TcpState

    @property
    def connected(self) -> bool:
        """It has a peer (not a listener, not a socket still waiting for connect())."""
        return self.state != TcpState.LISTEN and self.remote.port != 0


def _parse_endpoint(col: str) -> SockAddr:
    hex_addr, _, hex_port = col.partition(":")
    family, host = decode_addr(hex_addr)
    return SockAddr(family, host, int(hex_port, 16))


_SYS_PIDFD_OPEN = 434  # these two: the same number on every architecture (generic table)
_SYS_PIDFD_GETFD = 438
_LIBC = ctypes.CDLL(None, use_errno=True)


def _pidfd_open(pid: int) -> int:
    """`os.pidfd_open`, which PyPy 3.9's `os` lacks (ProcessLookupError when gone)."""
    if hasattr(os, "pidfd_open"):
        return os.pidfd_open(pid)
    fd = _LIBC.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))  # errno picks the subclass
    return int(fd)
_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _sockaddr(family: int, addr: tuple[str, int] | tuple[str, int, int, int]) -> SockAddr:
    host = addr[0].partition("%")[0]  # a link-local scope is not part of the address
    found = normalize_addr(SockAddr(family, host, addr[1]))
    assert found is not None
    return found


_STATES: dict[str, TcpState] = {f"{s.value:02X}": s for s in TcpState}


# A row kept unparsed until someone asks for it: (local column, remote column, state).
_Row = tuple[str, str, TcpState]


def _index_tcp_table(text: str, out: dict[int, _Row]) -> None:
    """Index rows by inode without decoding addresses (a namespace can hold 100k rows)."""
    for line in text.splitlines()[1:]:
        f = line.split(None, 10)
        if len(f) < 10 or f[9] == "0":
            continue
        state = _STATES.get(f[3].upper())
        if state is None or not f[9].isdigit():
            continue
        out[int(f[9])] = (f[1], f[2], state)


def _make_socket(inode: int, row: _Row) -> TcpSocket | None:
    try:
        return TcpSocket(inode, _parse_endpoint(row[0]), _parse_endpoint(row[1]), row[2])
    except ValueError:
        return None


def parse_tcp_table(text: str) -> dict[int, TcpSocket]:
    """Text of /proc/net/tcp or tcp6 -> {inode: TcpSocket}.

    Rows without an inode (TIME_WAIT, request sockets: inode 0) belong to no fd and are left
    out; a malformed row is skipped.
    """
    rows: dict[int, _Row] = {}
    _index_tcp_table(text, rows)
    out: dict[int, TcpSocket] = {}
    for inode, row in rows.items():
        sock = _make_socket(inode, row)
        if sock is not None:
            out[inode] = sock
    return out


@dataclass(frozen=True, **SLOTS)
class SocketFd:
    """An inet TCP socket held by a process fd, with the role it most likely plays."""

    pid: int
    fd: int
    socket: TcpSocket
    role: str  # "client" | "server"


@dataclass(**SLOTS)
class _NetTable:
    rows: dict[int, _Row]
    listen_ports: frozenset[int]
    read_at: float
    read_cost: float  # seconds the last read and index took

    def get(self, inode: int) -> TcpSocket | None:
        row = self.rows.get(inode)
        return _make_socket(inode, row) if row is not None else None


class Lookup(enum.Enum):
    """Answers other than a socket: ``DEFERRED``, a budgeted lookup that could not re-read
    the table yet (ask again later); ``GONE``, the socket asked of the process is no longer
    behind its fd (a table, read now, cannot know it either)."""

    DEFERRED = "deferred"
    GONE = "gone"


def _socket_inode(link: str) -> int | None:
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


_INET_TCP = frozenset({"TCP", "TCPv6"})


class ProcFS:
    """Read-only view of /proc for process identity and TCP sockets.

    ``root`` is the procfs mount (a fake tree in tests). Caches: process identities (LRU of
    ``process_cache_size`` pids, each at most ``process_max_age_s`` old, so an exec or a
    cgroup move is picked up), and parsed TCP tables per network namespace (at most
    ``table_max_age_s`` old; a miss re-reads).
    """

    def __init__(
        self,
        root: str = "/proc",
        *,
        process_cache_size: int = 16384,
        process_max_age_s: float = 60.0,
        table_max_age_s: float = 2.0,
        table_cache_size: int = 64,
        min_reread_s: float = 0.02,
        reread_cost_factor: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self._proc_size = process_cache_size
        self._proc_age = process_max_age_s
        self._table_age = table_max_age_s
        self._table_size = table_cache_size
        self._min_reread = min_reread_s
        self._reread_factor = reread_cost_factor
        self._clock = clock
        self._procs: OrderedDict[int, tuple[ProcessInfo, float]] = OrderedDict()
        self._tables: OrderedDict[str, _NetTable] = OrderedDict()
        self._getfd = root == "/proc"  # pidfd_getfd works on this machine's processes only
        self.table_reads = 0  # how many times TCP tables were read and parsed

    # -- small file helpers ----------------------------------------------------------------

    def _path(self, pid: int, *parts: str) -> str:
        return os.path.join(self.root, str(pid), *parts)

    def _read(self, pid: int, *parts: str) -> str | None:
        try:
            with open(self._path(pid, *parts), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    # -- identity --------------------------------------------------------------------------

    def process(self, pid: int) -> ProcessInfo | None:
        """Identity of ``pid``, or None when it is gone (or never was)."""
        now = self._clock()
        hit = self._procs.get(pid)
        if hit is not None and now - hit[1] < self._proc_age:
            self._procs.move_to_end(pid)
            return hit[0]
        comm = self._read(pid, "comm")
        if comm is None:
            self._procs.pop(pid, None)
            return None
        cgroup = self._read(pid, "cgroup")
        unit, runtime, container = parse_cgroup(cgroup) if cgroup else (None, None, None)
        info = ProcessInfo(pid, comm.rstrip("\n"), unit, container, runtime)
        self._procs[pid] = (info, now)
        self._procs.move_to_end(pid)
        while len(self._procs) > self._proc_size:
            self._procs.popitem(last=False)
        return info

    def forget(self, pid: int) -> None:
        """The process exited: drop what is cached about it."""
        self._procs.pop(pid, None)

    def pids(self) -> list[int]:
        """Every process (thread-group leader) currently in /proc."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    # -- fds -------------------------------------------------------------------------------

    def fd_link(self, pid: int, fd: int) -> str | None:
        """Target of /proc/<pid>/fd/<fd> (``socket:[N]``, ``pipe:[N]``, a path), or None."""
        try:
            return os.readlink(self._path(pid, "fd", str(fd)))
        except OSError:
            return None

    def socket_inode(self, pid: int, fd: int) -> int | None:
        """Inode of the socket behind the fd; None when it is not a socket or is gone."""
        link = self.fd_link(pid, fd)
        return _socket_inode(link) if link is not None else None

    def _copy_fd(self, pid: int, fd: int) -> int | Lookup | None:
        """A copy of ``pid``'s fd ``fd`` in this process (``pidfd_getfd``; the caller closes
        it); ``Lookup.GONE`` when the process or the fd is gone, None when copying is not
        possible here (see :meth:`socket_ends`)."""
        if not self._getfd:
            return None
        try:
            pidfd = _pidfd_open(pid)
        except ProcessLookupError:
            return Lookup.GONE
        except OSError:
            return None
        try:
            dup = _LIBC.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if dup < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSYS:
                    self._getfd = False
                return Lookup.GONE if err in (errno.EBADF, errno.ESRCH) else None
        finally:
            os.close(pidfd)
        return int(dup)

    def socket_ends(
        self, pid: int, fd: int, inode: int
    ) -> tuple[SockAddr, SockAddr] | Lookup | None:
        """(local, peer) of ``pid``'s connected inet TCP socket ``fd``, asked of the socket
        itself: a copy of the fd (``pidfd_getfd``, which needs what reading another
        process's fds needs: CAP_SYS_PTRACE), ``getsockname``/``getpeername``, closed at
        once. No namespace table is read (one holds every socket of the namespace: 200k rows
        on a busy node).

        ``Lookup.GONE`` when the answer is known to be "no connection": the process or the
        fd is gone, the fd holds something else now, the socket is not connected (any
        more). None when asking is not possible here (another /proc root, an old kernel, a
        seccomp filter, no permission); only then may the caller fall back to the table.
        """
        if inode <= 0:
            return None
        dup = self._copy_fd(pid, fd)
        if not isinstance(dup, int):
            return dup
        try:
            if os.fstat(dup).st_ino != inode:
                os.close(dup)
                return Lookup.GONE  # the fd was closed and reused meanwhile
            sock = socket.socket(fileno=dup)
        except OSError as exc:
            os.close(dup)
            return Lookup.GONE if exc.errno == errno.ENOTSOCK else None
        family = sock.family
        try:
            if sock.type != socket.SOCK_STREAM or family not in _INET_FAMILIES:
                return Lookup.GONE
            local, peer = sock.getsockname(), sock.getpeername()
        except OSError:  # not connected (any more)
            return Lookup.GONE
        finally:
            sock.close()
        return _sockaddr(family, local), _sockaddr(family, peer)

    def local_port(self, pid: int, fd: int) -> int | None:
        """The local port of ``pid``'s inet socket ``fd`` (a listening one, say), asked of the
        socket itself as :meth:`socket_ends` does; None when that is not possible or the fd
        is not an inet socket (any more)."""
        dup = self._copy_fd(pid, fd)
        if not isinstance(dup, int):
            return None
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return None
        try:
            if sock.family not in _INET_FAMILIES:
                return None
            return int(sock.getsockname()[1])
        except OSError:
            return None
        finally:
            sock.close()

    def socket_protocol(self, pid: int, fd: int) -> str | None:
        """``TCP``, ``TCPv6``, ``UNIX-STREAM``, ``UDP``...; None when the kernel will not say."""
        try:
            raw = os.getxattr(self._path(pid, "fd", str(fd)), "system.sockprotoname")
        except OSError:
            return None
        return raw.rstrip(b"\0").decode("ascii", "replace")

    def fds(self, pid: int) -> list[int]:
        try:
            names = os.listdir(self._path(pid, "fd"))
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    # -- TCP tables ------------------------------------------------------------------------

    def netns(self, pid: int) -> str | None:
        """Identity of the process's network namespace (``net:[4026531840]``)."""
        try:
            return os.readlink(self._path(pid, "ns", "net"))
        except OSError:
            return None

    def _read_rows(self, pid: int) -> dict[int, _Row] | None:
        texts = [self._read(pid, "net", name) for name in ("tcp", "tcp6")]
        if texts[0] is None and texts[1] is None:
            return None
        self.table_reads += 1
        rows: dict[int, _Row] = {}
        for text in texts:
            if text:
                _index_tcp_table(text, rows)
        return rows

    def read_tcp_table(self, pid: int) -> dict[int, TcpSocket] | None:
        """Uncached: every TCP socket (v4 and v6) of the namespace ``pid`` lives in."""
        rows = self._read_rows(pid)
        if rows is None:
            return None
        return {i: s for i, r in rows.items() if (s := _make_socket(i, r)) is not None}

    def _table(
        self, pid: int, *, refresh: bool = False, budgeted: bool = False
    ) -> _NetTable | Lookup | None:
        key = self.netns(pid) or f"pid:{pid}"
        now = self._clock()
        cached = self._tables.get(key)
        if cached is not None:
            age = now - cached.read_at
            if not refresh and age < self._table_age:
                self._tables.move_to_end(key)
                return cached
            if budgeted and age < max(self._min_reread, self._reread_factor * cached.read_cost):
                return Lookup.DEFERRED
        started = time.perf_counter()
        rows = self._read_rows(pid)
        if rows is None:
            return None
        listen = frozenset(
            int(r[0].rpartition(":")[2], 16) for r in rows.values() if r[2] == TcpState.LISTEN
        )
        table = _NetTable(rows, listen, now, time.perf_counter() - started)
        self._tables[key] = table
        self._tables.move_to_end(key)
        while len(self._tables) > self._table_size:
            self._tables.popitem(last=False)
        return table

    def expire_tables(self) -> None:
        """Drop cached tables older than their age limit (call periodically)."""
        now = self._clock()
        for key in [k for k, t in self._tables.items() if now - t.read_at >= self._table_age]:
            del self._tables[key]

    def _lookup(
        self, pid: int, inode: int, *, budgeted: bool = False
    ) -> tuple[TcpSocket, frozenset[int]] | Lookup | None:
        table = self._table(pid)
        if not isinstance(table, _NetTable):
            return None
        sock = table.get(inode)
        if sock is None or (sock.state != TcpState.LISTEN and sock.remote.port == 0):
            # Created (or connected) after the cached read: read again, once.
            table = self._table(pid, refresh=True, budgeted=budgeted)
            if not isinstance(table, _NetTable):
                return table
            sock = table.get(inode)
            if sock is None:
                return None
        return sock, table.listen_ports

    def tcp_socket(
        self, pid: int, inode: int, *, budgeted: bool = False
    ) -> TcpSocket | Lookup | None:
        """The TCP socket with this inode in ``pid``'s network namespace, or None.

        ``budgeted``: give ``Lookup.DEFERRED`` instead of re-reading a table read too recently.
        """
        found = self._lookup(pid, inode, budgeted=budgeted)
        return found[0] if isinstance(found, tuple) else found

    def resolve_fd(self, pid: int, fd: int, role: str | None = None) -> SocketFd | None:
        """The inet TCP socket behind ``pid``'s ``fd`` with a role guess, else None.

        ``role``: known already (what the fd wrote: a request or a response); the addresses
        are then asked of the socket itself and no namespace table is read (on a node with
        100k sockets that table is tens of megabytes of text and objects).

        None for: a vanished process or fd, a non-socket (file, pipe...), a unix/UDP/netlink
        socket, or a TCP socket not found in the process's own namespace tables (one created
        in another namespace and carried over; rare).
        """
        inode = self.socket_inode(pid, fd)
        if inode is None:
            return None
        proto = self.socket_protocol(pid, fd)
        if proto is not None and proto not in _INET_TCP:
            return None
        if role is not None:
            ends = self.socket_ends(pid, fd, inode)
            if ends is Lookup.GONE:
                return None
            if isinstance(ends, tuple):
                local, peer = ends
                return SocketFd(pid, fd, TcpSocket(inode, local, peer, TcpState.ESTABLISHED), role)
        found = self._lookup(pid, inode)
        if not isinstance(found, tuple):
            return None
        sock, listen = found
        return SocketFd(pid, fd, sock, guess_role(sock, listen))

    def tcp_fds(self, pid: int) -> list[SocketFd]:
        """Every inet TCP socket fd of ``pid`` (listeners included), with role guesses."""
        inodes: list[tuple[int, int]] = []
        for fd in self.fds(pid):
            inode = self.socket_inode(pid, fd)
            if inode is None:
                continue
            proto = self.socket_protocol(pid, fd)
            if proto is None or proto in _INET_TCP:
                inodes.append((fd, inode))
        if not inodes:
            return []
        table = self._table(pid)
        if not isinstance(table, _NetTable):
            return []
        if any(inode not in table.rows for _, inode in inodes):
            # a TCP socket newer than the cached read (or, in a fake tree, a non-TCP one)
            table = self._table(pid, refresh=True)
            if not isinstance(table, _NetTable):
                return []
        out: list[SocketFd] = []
        for fd, inode in inodes:
            sock = table.get(inode)
            if sock is not None:
                out.append(SocketFd(pid, fd, sock, guess_role(sock, table.listen_ports)))
        return out

    def listen_ports(self, pid: int) -> frozenset[int]:
        """Ports with a listening TCP socket in ``pid``'s network namespace."""
        table = self._table(pid)
        return table.listen_ports if isinstance(table, _NetTable) else frozenset()


def guess_role(sock: TcpSocket, listen_ports: Container[int]) -> str:
    """``server`` when the local port is a listening port of the namespace, else ``client``."""
    return "server" if sock.local.port in listen_ports else "client"
