"""The connection table: ``(tgid, fd) -> Connection``.

Theory of operation
-------------------
The capture source reports connect() and accept() on inet sockets (``ConnOpened``), close()
(``ConnClosed``) and process exit (``ProcessExited``). Each open creates a ``Connection`` with
the peer address from the event, the role, and the process identity read from /proc right
away (a short-lived client may be gone a moment later; then the event's ``comm`` stands in).

An fd is a small integer the process reuses as soon as it closes one, so the table trusts the
event order: a new ``ConnOpened`` on a key still present replaces the old entry (counted as
``replaced``: the close was lost or not traced), a ``ConnClosed`` removes it, and a process
exit removes every fd of the process. An exec (``ProcessExecuted``) closes the sockets opened
close-on-exec without a close() call, so it removes every connection whose fd no longer holds
its socket (asked of /proc); one the new image inherited stays.

Data can arrive on an fd the table never saw opened: a keep-alive connection that existed
before the daemon started, or an open event that was lost. ``get_or_adopt`` then asks /proc:
only an inet TCP socket with a peer becomes a Connection (``adopted``, role guessed from the
namespace's listening ports). Anything else (unix sockets, pipes, files, vanished fds) is
remembered negatively for ``negative_ttl_ns`` so that a process writing a file in a loop
costs one dictionary lookup per write, not a /proc walk.

Addresses are resolved lazily: when the first data arrives (``get_or_adopt``; with
``eager_local=False`` only when the open event gave no peer) or when someone calls
``resolve()`` (the daemon does for a finding's audit line), the socket is asked for its
addresses (``pidfd_getfd`` and ``getsockname``), else the local address (and the peer, when
the event had none) is read from the namespace's TCP table: connections that never carry data
cost no /proc access at all (100k idle keep-alive connections are common). On the data path
the table re-read is budgeted (see ``hopwatch.procfs``): when the budget says "not yet", the
attempt is repeated on the next data. A result whose remote end disagrees with the peer from
the event is rejected (the fd was reused before we looked); the outcome, success or failure,
is then kept on the connection.

Bounds: at most ``max_entries`` connections; the least recently used one is evicted beyond
that (``evicted``). ``evict_idle`` removes connections with no traffic for a while. Every
removal that the caller did not ask for by name (replacement, LRU eviction, idle eviction)
is reported through ``on_drop`` so the pipeline can finish the per-connection parser state.

Sources without processes (pcap replay) pass ``identity``: a function that names the
process and the local address of each ``ConnOpened`` from the event alone. The table then
never reads /proc: no inode pinning, no address resolution, no adoption of unknown fds
(data on an fd that was never opened is dropped, counted as ``not_inet``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Union

from hopwatch.capture._types import ConnOpened, SockAddr
from hopwatch.procfs import Lookup, ProcessInfo, ProcFS, SocketFd, TcpSocket, normalize_addr

from ._compat import PYPY, SLOTS

__all__ = ["Connection", "ConnectionTable", "DropReason", "Identity", "IdentityFn"]

DropReason = str  # "replaced" | "evicted" | "idle"

_COUNTERS = (
    "opened",  # ConnOpened events taken in
    "closed",  # ConnClosed that matched an entry
    "adopted",  # unknown fds with data that turned out to be inet TCP sockets
    "scanned",  # connections found by scan_existing
    "replaced",  # ConnOpened on a key still in the table (fd reuse, lost close)
    "evicted",  # dropped by the max_entries bound (least recently used)
    "idle_evicted",  # dropped by evict_idle
    "exited",  # dropped because their process exited
    "exec_closed",  # closed by their process's exec (close-on-exec sockets)
    "not_inet",  # adoption refused: not an inet TCP socket, or the fd is gone
    "resolve_failed",  # /proc could not tell the addresses of a connection
    "resolve_deferred",  # a resolution postponed by the table re-read budget (retried)
)


@dataclass(frozen=True, **SLOTS)
class Identity:
    """Who holds a connection, when a capture source says so itself (pcap replay)."""

    process: ProcessInfo
    local: SockAddr | None


IdentityFn = Callable[[ConnOpened], Identity]


@dataclass(eq=False, **SLOTS)
class Connection:
    """One tracked connection. ``state`` belongs to the pipeline (the stream parser)."""

    tgid: int
    fd: int
    role: str  # "client" | "server"
    process: ProcessInfo
    peer: SockAddr | None
    local: SockAddr | None
    created_ns: int
    last_seen_ns: int
    origin: str  # "opened" | "adopted" | "scanned"
    inode: int = 0  # socket inode when known (0: unknown)
    resolved: bool = False  # /proc resolution was attempted (its result is cached)
    state: object | None = None
    sni: str | None = None  # TLS: the server name the client set (SNI), once known

    @property
    def key(self) -> tuple[int, int]:
        return (self.tgid, self.fd)


class ConnectionTable:
    """Bounded map of ``(tgid, fd)`` to ``Connection``. Not thread-safe: one consumer."""

    def __init__(
        self,
        procfs: ProcFS | None = None,
        *,
        max_entries: int = 200_000,
        negative_ttl_ns: int = 5_000_000_000,
        max_negative: int = 65_536,
        on_drop: Callable[[Connection, DropReason], None] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        identity: IdentityFn | None = None,
        eager_local: bool = True,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.procfs = procfs if procfs is not None else ProcFS()
        self.max_entries = max_entries
        self.negative_ttl_ns = negative_ttl_ns
        self.max_negative = max_negative
        self._on_drop = on_drop
        self._clock = clock
        self._identity = identity
        # False: the local address is not looked up on the data path (findings ask for it):
        # each lookup is ~8 syscalls, once per connection, for an address only an audit
        # line shows.
        self.eager_local = eager_local
        # Insertion/touch order is the LRU order: the first item is the least recently used.
        self._conns: OrderedDict[tuple[int, int], Connection] = OrderedDict()
        # tgid -> {fd: None} (dicts: a set costs ~3x the memory per entry)
        self._by_tgid: dict[int, dict[int, None]] = {}
        # Opened, no data yet (``open_quiet``): tgid -> {fd: packed open event} (`_pack`),
        # a few words instead of a Connection (~120 bytes instead of ~420: most of 100k
        # keep-alive connections never carry data while we watch).
        self._quiet: dict[int, dict[int, Packed]] = {}
        self._quiet_count = 0
        self._quiet_names: dict[int, ProcessInfo] = {}  # tgid -> identity at its opens
        # tgid -> {fd: expiry_ns}; the whole map is bounded by max_negative entries.
        self._negative: dict[int, dict[int, int]] = {}
        self._negative_count = 0
        self._counters = dict.fromkeys(_COUNTERS, 0)

    # -- introspection ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._conns) + self._quiet_count

    def __contains__(self, key: object) -> bool:
        if key in self._conns:
            return True
        if isinstance(key, tuple) and len(key) == 2:
            quiet = self._quiet.get(key[0])
            return quiet is not None and key[1] in quiet
        return False

    def __iter__(self) -> Iterator[Connection]:
        """A snapshot, least recently used first (safe to mutate the table meanwhile).

        Quiet connections (``open_quiet``, no data yet) come first, built for the snapshot.
        """
        quiet = [
            self._unpack(tgid, fd, packed)
            for tgid, fds in self._quiet.items()
            for fd, packed in fds.items()
        ]
        return iter(quiet + list(self._conns.values()))

    def counters(self) -> dict[str, int]:
        """Monotonic counters by event, for ``connections_total{event}``."""
        return dict(self._counters)

    @property
    def negative_cached(self) -> int:
        """How many (tgid, fd) pairs are remembered as not worth a /proc look."""
        return self._negative_count

    # -- events ----------------------------------------------------------------------------

    def open(self, ev: ConnOpened) -> Connection:
        """connect()/accept() seen: track the connection, replacing an older one on the fd."""
        key = (ev.tgid, ev.fd)
        self._forget_negative(ev.tgid, ev.fd)
        if self._quiet and self._take_quiet(ev.tgid, ev.fd) is not None:
            self._counters["replaced"] += 1  # a quiet entry on the fd: no state to finish
        old = self._conns.get(key)
        if old is not None:
            self._remove(key)
            self._counters["replaced"] += 1
            self._dropped(old, "replaced")
        if self._identity is not None:
            conn = self._synthetic(ev)
            self._insert(conn)
            self._counters["opened"] += 1
            return conn
        conn = Connection(
            tgid=ev.tgid,
            fd=ev.fd,
            role=ev.role,
            process=self._process(ev.tgid, ev.comm, ev.tid),
            peer=normalize_addr(ev.peer),
            local=None,
            created_ns=ev.ts_ns,
            last_seen_ns=ev.ts_ns,
            origin="opened",
        )
        self._insert(conn)
        self._counters["opened"] += 1
        return conn

    def open_quiet(self, ev: ConnOpened) -> None:
        """Like :meth:`open`, but keep the connection packed until its first data.

        The data path (``get_or_adopt``, ``get``) turns it into a :class:`Connection`;
        one that closes first costs no Connection at all (``close`` then returns None: it
        has no parser state to finish). Pcap sources (``identity``) use :meth:`open`.
        """
        packed = _pack(ev) if self._identity is None else None
        if packed is None:
            self.open(ev)
            return
        tgid, fd = ev.tgid, ev.fd
        self._forget_negative(tgid, fd)
        old = self._conns.get((tgid, fd))
        if old is not None:
            self._remove((tgid, fd))
            self._counters["replaced"] += 1
            self._dropped(old, "replaced")
        quiet = self._quiet.get(tgid)
        if quiet is None:
            quiet = self._quiet[tgid] = {}
            # Named now: a short-lived client may be gone from /proc at its first data.
            self._quiet_names[tgid] = self._process(tgid, ev.comm, ev.tid)
        if fd in quiet:
            self._counters["replaced"] += 1
        else:
            self._quiet_count += 1
        quiet[fd] = packed
        self._counters["opened"] += 1
        self._bound()

    def _take_quiet(self, tgid: int, fd: int) -> Packed | None:
        quiet = self._quiet.get(tgid)
        if quiet is None:
            return None
        packed = quiet.pop(fd, None)
        if packed is not None:
            self._quiet_count -= 1
            if not quiet:
                del self._quiet[tgid]
                self._quiet_names.pop(tgid, None)
        return packed

    def _pop_quiet(self, tgid: int, fd: int) -> Connection | None:
        """Remove a quiet entry, as a Connection (None when there is none)."""
        quiet = self._quiet.get(tgid)
        packed = None if quiet is None else quiet.get(fd)
        if packed is None:
            return None
        conn = self._unpack(tgid, fd, packed)  # before _take_quiet forgets the name
        self._take_quiet(tgid, fd)
        return conn

    def _wake(self, tgid: int, fd: int) -> Connection | None:
        """A quiet connection's first data: it becomes a tracked Connection."""
        conn = self._pop_quiet(tgid, fd)
        if conn is not None:
            self._insert(conn)
        return conn

    def _unpack(self, tgid: int, fd: int, packed: Packed) -> Connection:
        role, peer, ts_ns = _unpack(packed)
        return Connection(
            tgid=tgid,
            fd=fd,
            role=role,
            process=self._quiet_names.get(tgid) or self._process(tgid, ""),
            peer=peer,
            local=None,
            created_ns=ts_ns,
            last_seen_ns=ts_ns,
            origin="opened",
        )

    def close(self, tgid: int, fd: int) -> Connection | None:
        """close() seen: the removed connection, or None when the fd was not tracked (or
        was quiet: opened with ``open_quiet`` and no data since)."""
        self._forget_negative(tgid, fd)
        conn = self._conns.get((tgid, fd))
        if conn is None:
            if self._take_quiet(tgid, fd) is not None:
                self._counters["closed"] += 1
            return None
        self._remove((tgid, fd))
        self._counters["closed"] += 1
        return conn

    def process_exited(self, tgid: int) -> list[Connection]:
        """The process exited: every connection it held, removed."""
        self._forget_process(tgid)
        quiet = self._quiet.pop(tgid, None)
        self._quiet_names.pop(tgid, None)
        if quiet:
            self._quiet_count -= len(quiet)
            self._counters["exited"] += len(quiet)
        fds = self._by_tgid.pop(tgid, None)
        if not fds:
            return []
        out = [self._conns.pop((tgid, fd)) for fd in sorted(fds)]
        self._counters["exited"] += len(out)
        return out

    def process_executed(self, tgid: int) -> list[Connection]:
        """The process ran exec: every connection whose fd no longer holds its socket (one
        opened close-on-exec, as most runtimes open them), removed. A socket the new image
        inherited stays tracked. What is cached about the process goes: the new image has
        its own name."""
        self._forget_process(tgid)
        out, kept = [], []
        quiet = self._quiet.get(tgid)
        for fd, packed in list(quiet.items()) if quiet else ():
            conn = self._unpack(tgid, fd, packed)
            if self._still_held(conn):
                kept.append(conn)
            else:
                self._take_quiet(tgid, fd)
                out.append(conn)
        for fd in sorted(self._by_tgid.get(tgid, ())):
            conn = self._conns[(tgid, fd)]
            if self._still_held(conn):
                kept.append(conn)
            else:
                self._remove((tgid, fd))
                out.append(conn)
        self._counters["exec_closed"] += len(out)
        if kept:  # what they carry from now on is the new image's
            info = self._process(tgid, "")
            for conn in kept:
                conn.process = info
            if tgid in self._quiet:
                self._quiet_names[tgid] = info
        return out

    def _forget_process(self, tgid: int) -> None:
        """What is cached about the process (its identity, fds that were no socket)."""
        self.procfs.forget(tgid)
        dropped = self._negative.pop(tgid, None)
        if dropped:
            self._negative_count -= len(dropped)

    def _still_held(self, conn: Connection) -> bool:
        """The connection's fd still holds its socket (asked after an exec)."""
        if self._identity is not None:
            return True  # no /proc behind a synthetic identity
        if conn.inode:  # None when the fd is closed or holds another file now
            return self.procfs.socket_inode(conn.tgid, conn.fd) == conn.inode
        found = self.procfs.resolve_fd(conn.tgid, conn.fd, conn.role)
        if found is None or not found.socket.connected:
            return False
        sock = found.socket
        return (conn.peer is None or normalize_addr(sock.remote) == conn.peer) and (
            conn.local is None or normalize_addr(sock.local) == conn.local
        )

    # -- lookups ---------------------------------------------------------------------------

    def get(self, tgid: int, fd: int) -> Connection | None:
        """Peek: no adoption, no LRU touch."""
        conn = self._conns.get((tgid, fd))
        if conn is None and self._quiet:
            return self._wake(tgid, fd)
        return conn

    def touch(self, conn: Connection, ts_ns: int) -> None:
        """Traffic on a tracked connection: mark it recently used."""
        conn.last_seen_ns = max(conn.last_seen_ns, ts_ns)
        self._conns.move_to_end((conn.tgid, conn.fd))

    def get_or_adopt(
        self, tgid: int, fd: int, ts_ns: int, comm: str = "", role: str | None = None
    ) -> Connection | None:
        """The data path: the tracked connection (touched), or one adopted from /proc.

        ``role``: for an adopted one, known from what it wrote (no listening-port guess).
        None when the fd is not an inet TCP socket with a peer (remembered for a while).
        """
        key = (tgid, fd)
        conn = self._conns.get(key)
        if conn is None and self._quiet:
            conn = self._wake(tgid, fd)
        if conn is not None:
            if ts_ns > conn.last_seen_ns:
                conn.last_seen_ns = ts_ns
            self._conns.move_to_end(key)
            if not conn.resolved and (self.eager_local or conn.peer is None):
                self.resolve(conn, budgeted=True)
            return conn
        if self._identity is not None:
            self._counters["not_inet"] += 1  # no /proc behind a synthetic identity
            return None
        negs = self._negative.get(tgid)
        if negs is not None:
            expiry = negs.get(fd)
            if expiry is not None:
                if ts_ns < expiry:
                    return None
                del negs[fd]
                self._negative_count -= 1
        found = self.procfs.resolve_fd(tgid, fd, role)
        if found is None or not found.socket.connected:
            self._counters["not_inet"] += 1
            self._remember_negative(tgid, fd, ts_ns + self.negative_ttl_ns)
            return None
        conn = self._from_socket(found, ts_ns, "adopted", comm)
        self._insert(conn)
        self._counters["adopted"] += 1
        return conn

    def resolve(self, conn: Connection, *, budgeted: bool = False) -> bool:
        """Fill ``local`` (and ``peer`` if missing) from /proc, once. True when ``local`` is known.

        Cheap after the first call: the outcome, success or failure, is kept on the connection.
        ``budgeted``: when the namespace table was re-read too recently, leave the connection
        unresolved (False) so that a later call tries again.
        """
        if conn.resolved or self._identity is not None:
            return conn.local is not None
        inode = conn.inode or self.procfs.socket_inode(conn.tgid, conn.fd) or 0
        ends = self.procfs.socket_ends(conn.tgid, conn.fd, inode)
        if ends is Lookup.GONE:
            # Closed (or the process exited) before its data was read: no table can say
            # more, and reading one costs tens of MiB on a node with 100k sockets.
            conn.resolved = True
            self._counters["resolve_failed"] += 1
            return False
        if isinstance(ends, tuple):  # asked of the socket itself: no table read
            conn.resolved = True
            local, remote = ends
            if conn.peer is not None and not _same_addr(conn.peer, remote):
                self._counters["resolve_failed"] += 1
                return False
            conn.inode = inode
            conn.local = local
            if conn.peer is None:
                conn.peer = remote
            return True
        sock = self.procfs.tcp_socket(conn.tgid, inode, budgeted=budgeted) if inode else None
        if sock is Lookup.DEFERRED:
            self._counters["resolve_deferred"] += 1
            return False
        conn.resolved = True
        if not isinstance(sock, TcpSocket) or (
            conn.peer is not None and not _same_addr(conn.peer, sock.remote)
        ):
            self._counters["resolve_failed"] += 1
            return False
        conn.inode = inode
        conn.local = sock.local
        if conn.peer is None:
            conn.peer = sock.remote
        return True

    # -- bulk ------------------------------------------------------------------------------

    def scan_existing(self, pids: Iterable[int] | None = None) -> list[Connection]:
        """Track every connected inet TCP socket already open (at daemon start).

        ``pids`` None means every process but the daemon itself. Listeners and sockets
        without a peer are not connections; fds already tracked are left alone.
        """
        if pids is None:
            me = os.getpid()
            pids = [p for p in self.procfs.pids() if p != me]
        now = self._clock()
        out: list[Connection] = []
        for pid in pids:
            for found in self.procfs.tcp_fds(pid):
                if not found.socket.connected or (pid, found.fd) in self._conns:
                    continue
                conn = self._from_socket(found, now, "scanned", "")
                self._insert(conn)
                self._counters["scanned"] += 1
                out.append(conn)
        return out

    def evict_idle(self, now_ns: int, idle_ns: int) -> list[Connection]:
        """Drop connections without traffic since ``now_ns - idle_ns``; also expire caches."""
        cutoff = now_ns - idle_ns
        out: list[Connection] = []
        while self._conns:
            key, conn = next(iter(self._conns.items()))
            if conn.last_seen_ns > cutoff:
                break
            self._remove(key)
            out.append(conn)
        for tgid in list(self._quiet):
            quiet = self._quiet[tgid]
            while quiet:  # per process in open order: the oldest first
                fd, packed = next(iter(quiet.items()))
                if _opened_ns(packed) > cutoff:
                    break
                conn = self._pop_quiet(tgid, fd)  # drops the process's dict once empty
                assert conn is not None
                out.append(conn)
        self._counters["idle_evicted"] += len(out)
        for conn in out:
            self._dropped(conn, "idle")
        self._expire_negative(now_ns)
        self.procfs.expire_tables()
        return out

    # -- internals -------------------------------------------------------------------------

    def _process(self, tgid: int, comm: str, tid: int = 0) -> ProcessInfo:
        """``comm``: the name the event saw (its thread's), standing in when the process is
        gone. The main thread's is the process's name when the event happened, so it wins
        over /proc's, read later: the process may have run exec since."""
        info = self.procfs.process(tgid)
        if info is None:
            return ProcessInfo(tgid, comm or "unknown")
        if tid == tgid and comm and comm != info.comm:
            return replace(info, comm=comm)
        return info

    def _synthetic(self, ev: ConnOpened) -> Connection:
        """A connection named by the source (``identity``), not by /proc."""
        assert self._identity is not None
        ident = self._identity(ev)
        return Connection(
            tgid=ev.tgid,
            fd=ev.fd,
            role=ev.role,
            process=ident.process,
            peer=normalize_addr(ev.peer),
            local=normalize_addr(ident.local),
            created_ns=ev.ts_ns,
            last_seen_ns=ev.ts_ns,
            origin="opened",
            resolved=True,
        )

    def _from_socket(self, found: SocketFd, ts_ns: int, origin: str, comm: str) -> Connection:
        sock = found.socket
        return Connection(
            tgid=found.pid,
            fd=found.fd,
            role=found.role,
            process=self._process(found.pid, comm),
            peer=sock.remote,
            local=sock.local,
            created_ns=ts_ns,
            last_seen_ns=ts_ns,
            origin=origin,
            inode=sock.inode,
            resolved=True,
        )

    def _insert(self, conn: Connection) -> None:
        key = (conn.tgid, conn.fd)
        self._conns[key] = conn
        fds = self._by_tgid.get(conn.tgid)
        if fds is None:
            self._by_tgid[conn.tgid] = {conn.fd: None}
        else:
            fds[conn.fd] = None
        self._bound()

    def _bound(self) -> None:
        """Evict beyond ``max_entries``: quiet connections first (the oldest process's
        oldest), then the least recently used."""
        while len(self._conns) + self._quiet_count > self.max_entries:
            if self._quiet:
                tgid = next(iter(self._quiet))
                popped = self._pop_quiet(tgid, next(iter(self._quiet[tgid])))
                assert popped is not None
                old = popped
            else:
                old_key, old = next(iter(self._conns.items()))
                self._remove(old_key)
            self._counters["evicted"] += 1
            self._dropped(old, "evicted")

    def _remove(self, key: tuple[int, int]) -> None:
        del self._conns[key]
        fds = self._by_tgid.get(key[0])
        if fds is not None:
            fds.pop(key[1], None)
            if not fds:
                del self._by_tgid[key[0]]

    def _dropped(self, conn: Connection, reason: DropReason) -> None:
        if self._on_drop is not None:
            self._on_drop(conn, reason)

    def _remember_negative(self, tgid: int, fd: int, expiry_ns: int) -> None:
        if self.max_negative <= 0:
            return
        while self._negative_count >= self.max_negative and self._negative:
            # Oldest process first: a cache, so coarse eviction is fine.
            oldest = next(iter(self._negative))
            self._negative_count -= len(self._negative.pop(oldest))
        negs = self._negative.setdefault(tgid, {})
        if fd not in negs:
            self._negative_count += 1
        negs[fd] = expiry_ns

    def _forget_negative(self, tgid: int, fd: int) -> None:
        negs = self._negative.get(tgid)
        if negs is not None and negs.pop(fd, None) is not None:
            self._negative_count -= 1
            if not negs:
                del self._negative[tgid]

    def _expire_negative(self, now_ns: int) -> None:
        for tgid in list(self._negative):
            negs = self._negative[tgid]
            for fd in [fd for fd, exp in negs.items() if exp <= now_ns]:
                del negs[fd]
                self._negative_count -= 1
            if not negs:
                del self._negative[tgid]


def _same_addr(a: SockAddr, b: SockAddr) -> bool:
    if a.port != b.port:
        return False
    try:
        return ipaddress.ip_address(a.host) == ipaddress.ip_address(b.host)
    except ValueError:
        return a.host == b.host


# A quiet connection packed: its open time and the rest (address << 20 | port << 4 |
# v6 << 3 | has-peer << 2 | role code). Ints are compact objects; a Connection with its
# SockAddr is not. On CPython one int, ts_ns << _TS_SHIFT | rest (~56 B for IPv4). PyPy
# stores a ~210-bit int as a list of digits (~5x that) but a tuple of two ints unboxed in
# one small object, so there it is (ts_ns, rest).
_TS_SHIFT = 148
_REST = (1 << _TS_SHIFT) - 1
_ROLES = ("", "client", "server")
Packed = Union[int, "tuple[int, int]"]


def _pack(ev: ConnOpened) -> Packed | None:
    """The open event packed; None when it does not fit (then a Connection is made)."""
    try:
        role = _ROLES.index(ev.role)
    except ValueError:
        return None
    peer = normalize_addr(ev.peer)
    addr = port = v6 = 0
    if peer is not None:
        try:  # inet_pton, not ipaddress: ~10x faster (a storm opens 20k connections/s)
            raw = socket.inet_pton(peer.family, peer.host)
        except (OSError, ValueError):
            return None
        addr, port, v6 = int.from_bytes(raw, "big"), peer.port, int(len(raw) == 16)
    head = 0 if peer is None else 1
    rest = addr << 20 | port << 4 | v6 << 3 | head << 2 | role
    return (ev.ts_ns, rest) if PYPY else ev.ts_ns << _TS_SHIFT | rest


def _opened_ns(packed: Packed) -> int:
    return packed[0] if type(packed) is tuple else packed >> _TS_SHIFT  # type: ignore[operator]


def _unpack(packed: Packed) -> tuple[str, SockAddr | None, int]:
    if type(packed) is tuple:
        ts_ns, rest = packed
    else:
        ts_ns, rest = packed >> _TS_SHIFT, packed & _REST  # type: ignore[operator]
    role = _ROLES[rest & 3]
    peer = None
    if rest >> 2 & 1:
        v6 = rest >> 3 & 1
        port = rest >> 4 & 0xFFFF
        addr = rest >> 20 & ((1 << 128) - 1)
        family = socket.AF_INET6 if v6 else socket.AF_INET
        host = socket.inet_ntop(family, addr.to_bytes(16 if v6 else 4, "big"))
        peer = SockAddr(family, host, port)
    return role, peer, ts_ns
