"""From capture events to observations: connection table -> stream parsers -> header checks.

`Pipeline.handle(event)` is fed the plain events of any capture source (live eBPF or a pcap)
and calls its observers with one `Observation` per parsed HTTP message. It never touches
the kernel itself; the optional `control` (the live capture) is told which connections are
not HTTP and which bytes are bodies it need not copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

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
from hopwatch.config import Config
from hopwatch.conntrack import Connection, ConnectionTable
from hopwatch.metrics import Metrics
from hopwatch.propagation import Verdict, check_message
from hopwatch.protocols import (
    ConnectionParser,
    Desynced,
    Event,
    MessageParsed,
    Origin,
    ParseFailed,
)

from ._compat import SLOTS

__all__ = ["AuditHook", "CaptureControl", "Observation", "Pipeline"]

log = logging.getLogger(__name__)

#: Bodies shorter than this are copied anyway: a map update costs more than the copy.
SKIP_MIN_BYTES = 1024

#: `Connection.state` of a connection whose process `[processes]` leaves out.
_EXCLUDED = "excluded"
# Listening sockets whose port `exclude_ports` looked up, remembered (per process and fd).
_LISTEN_PORTS_MAX = 4096


class CaptureControl(Protocol):
    """What the pipeline may ask of a live capture (pcap replay passes None)."""

    # ``as_of_ns``: the time of the record the decision comes from; a connection that took
    # the same fd after it (the reader lags behind the kernel) must be left alone.
    def ignore(self, tgid: int, fd: int, *, as_of_ns: int) -> None: ...

    def adopt(self, tgid: int, fd: int, role: str) -> bool: ...

    # The connection ended without a close() (an exec closed its socket).
    def forget(self, tgid: int, fd: int, *, as_of_ns: int) -> None: ...

    def set_skip_until(
        self,
        tgid: int,
        fd: int,
        direction: Direction,
        offset: int,
        *,
        tls: bool = False,
        as_of_ns: int,
    ) -> bool: ...


# Not frozen: one is built per message, and a frozen dataclass's __init__ costs ~5x more.
@dataclass(**SLOTS)
class Observation:
    """One HTTP message seen by one observed process."""

    message: MessageParsed
    verdict: Verdict
    direction: str  # "inbound" | "outbound" (seen from the observed process)
    tgid: int
    tid: int
    fd: int
    ts_ns: int
    process: str  # label: unit, container or comm
    comm: str
    role: str  # the observed process's end: "client" | "server"
    local: SockAddr | None
    peer: SockAddr | None
    sni: str | None = None  # TLS: the server name the client asked for


Observer = Callable[[Observation], None]


class AuditHook(Protocol):
    """Where the per-message findings go besides the metrics (the audit log)."""

    def message_findings(self, obs: Observation) -> None: ...


class _ConnState:
    """What the pipeline keeps per connection: its parser and where each direction is."""

    __slots__ = ("next_offset", "parser", "tls")

    def __init__(self, tls: bool = False) -> None:
        self.parser = ConnectionParser()
        self.next_offset = [-1, -1]  # [send, recv]; -1 = nothing seen yet
        # TLS: the parser reads the plaintext (DataChunk.tls) and its offsets; the socket's
        # own bytes (ciphertext) never reach it.
        self.tls = tls

    def rest(self) -> _Resting | None:
        """What a connection at rest keeps instead (None when it is not at rest)."""
        if not self.parser.at_rest:
            return None
        return (self.next_offset[0], self.next_offset[1], self.tls)

    @classmethod
    def woken(cls, resting: _Resting) -> _ConnState:
        state = cls(resting[2])
        state.parser = ConnectionParser.http1()
        state.next_offset = [resting[0], resting[1]]
        return state


# An HTTP/1 connection at rest (between messages, nothing held, idle for a while): its
# parser is given up, and only (next send offset, next receive offset, tls) is kept: ~100
# bytes instead of ~1.2 KB (~2.6 KB on PyPy). Most of 100k keep-alive connections rest.
_Resting = tuple[int, int, bool]


class Pipeline:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        conns: ConnectionTable,
        *,
        control: CaptureControl | None = None,
        observers: Iterable[Observer] = (),
        audit: AuditHook | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.conns = conns
        self.control = control
        self.observers: list[Observer] = [self._count, *observers]
        for observer in observers:
            # Observers that report findings (the hop analyzer) complete the local address
            # of the observations they report through `with_local`.
            if getattr(observer, "resolve_local", False) is None:
                observer.resolve_local = self.with_local  # type: ignore[attr-defined]
        self.audit = audit
        self.lost: dict[str, int] = {}
        # Prometheus label children of the hot counters (a labels() call costs ~1 µs).
        # [send, recv]: indexed, not keyed by the enum (its hash and `.value` are Python calls)
        self._chunk_children: list[tuple[Any, Any] | None] = [None, None]
        self._message_children: dict[tuple[str, str, str, str, str], Any] = {}
        self.tls_ciphertext_chunks = 0  # socket bytes of TLS connections kept from the parsers
        # Connections that have a parser (a `_ConnState`), for `rest_idle`.
        self._awake: dict[tuple[int, int], Connection] = {}
        self._listen_ports: dict[tuple[int, int], tuple[int, int]] = {}  # _listen_port

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """SIGHUP: the next message is checked with the new limits and detectors, the next
        new connection filtered by the new `[processes]` (existing ones keep their fate)."""
        self._config = config
        self._sensitive = config.sensitive_selection

    # -- events -----------------------------------------------------------------------
    def handle(self, ev: CaptureEvent) -> None:
        if isinstance(ev, DataChunk):
            self._data(ev)
        elif isinstance(ev, ConnOpened):
            if self.config.capture.exclude_ports and self._open_excluded(ev):
                return
            self.conns.open_quiet(ev)
        elif isinstance(ev, ConnClosed):
            conn = self.conns.close(ev.tgid, ev.fd)
            if conn is not None:
                self._eof(conn)
        elif isinstance(ev, ProcessExited):
            for conn in self.conns.process_exited(ev.tgid):
                self._eof(conn)
            self._forget_listeners(ev.tgid)
        elif isinstance(ev, ProcessExecuted):
            # Its close-on-exec sockets are closed, but the kernel saw no close(): their
            # entries would take the new image's files opened on the same fds for traffic.
            for conn in self.conns.process_executed(ev.tgid):
                self._eof(conn)
                if self.control is not None:
                    self.control.forget(conn.tgid, conn.fd, as_of_ns=ev.ts_ns)
            self._forget_listeners(ev.tgid)
        elif isinstance(ev, LostEvents):
            self.lost[ev.reason] = self.lost.get(ev.reason, 0) + ev.count
        elif isinstance(ev, UnknownFd):
            self._unknown_fd(ev)
        elif isinstance(ev, TlsServerName):
            conn = self.conns.get_or_adopt(ev.tgid, ev.fd, ev.ts_ns)
            if conn is not None:
                conn.sni = ev.server_name

    def _forget_listeners(self, tgid: int) -> None:
        if self._listen_ports:
            for key in [k for k in self._listen_ports if k[0] == tgid]:
                del self._listen_ports[key]

    def _selected(self, conn: Connection) -> bool:
        """`[processes]` include/exclude by comm, systemd unit or label (container), and
        `[capture] exclude_ports` for a connection the kernel did not see open."""
        ports = self.config.capture.exclude_ports
        if ports and self._port_excluded(conn, ports):
            return False
        wanted = self.config.processes
        if not wanted.active:
            return True
        proc = conn.process
        return wanted.selects(proc.comm, proc.unit, proc.label)

    # `[capture] exclude_ports`: never copy traffic on these local or remote ports. The kernel
    # leaves out a connect() to one, and an accept() on a listening socket it saw this
    # process bind to one. It cannot know the port of a socket bound before the start or by
    # another process (a prefork server's parent), and a connection it did not see open
    # comes back through adoption (its first HTTP write, the scan at start). So userspace
    # decides those: an accepted connection by its listening socket's port, asked of that
    # socket (which outlives the connection) once per socket; an adopted one by both ends,
    # at its first data. What it excludes gets no parser, and the kernel stops copying it
    # (its syscalls count as "ignored").

    def _open_excluded(self, ev: ConnOpened) -> bool:
        ports = self.config.capture.exclude_ports
        excluded = ev.peer is not None and ev.peer.port in ports
        if not excluded and ev.role == "server" and ev.listen_fd >= 0:
            excluded = self._listen_port(ev.tgid, ev.listen_fd) in ports
        if not excluded:
            return False
        conn = self.conns.open(ev)
        conn.state = _EXCLUDED
        if self.control is not None:
            self.control.ignore(ev.tgid, ev.fd, as_of_ns=ev.ts_ns)
        return True

    def _listen_port(self, tgid: int, fd: int) -> int:
        """The port of a process's listening socket, remembered with the socket's inode: a
        listening fd closed and reused for another port is asked again. When the fd is gone
        already, the port it last had is the answer (0: unknown)."""
        procfs = self.conns.procfs
        inode = procfs.socket_inode(tgid, fd)
        known = self._listen_ports.get((tgid, fd))
        if known is not None and (inode is None or inode == known[0]):
            return known[1]
        if inode is None:
            return 0
        port = procfs.local_port(tgid, fd) or 0
        if len(self._listen_ports) >= _LISTEN_PORTS_MAX:
            self._listen_ports.clear()
        self._listen_ports[(tgid, fd)] = (inode, port)
        return port

    def _port_excluded(self, conn: Connection, ports: tuple[int, ...]) -> bool:
        if conn.peer is not None and conn.peer.port in ports:
            return True
        if conn.origin != "opened":  # an opened one was judged at its open (or replayed)
            self.conns.resolve(conn)
        return conn.local is not None and conn.local.port in ports

    def _unknown_fd(self, ev: UnknownFd) -> None:
        """An untracked fd wrote HTTP-looking bytes: adopt it if /proc says inet socket."""
        if self.control is None:
            return
        hint = ev.role_hint if ev.role_hint in ("client", "server") else None
        conn = self.conns.get_or_adopt(ev.tgid, ev.fd, ev.ts_ns, role=hint)
        if conn is None:
            self.metrics.unknown_fd.inc()
            self.control.ignore(ev.tgid, ev.fd, as_of_ns=ev.ts_ns)
            return
        if ev.role_hint in ("client", "server"):
            conn.role = ev.role_hint  # what it wrote beats the listening-port guess
        self.control.adopt(ev.tgid, ev.fd, conn.role)

    def handle_many(self, events: Iterable[CaptureEvent]) -> None:
        for ev in events:
            self.handle(ev)

    def rest_idle(self, cutoff_ns: int) -> int:
        """Connections with a parser and without traffic since ``cutoff_ns`` that are at
        rest give it up (see `_Resting`); returns how many did."""
        rested = 0
        awake = self._awake
        for key, conn in list(awake.items()):
            if conn.last_seen_ns > cutoff_ns:
                continue
            state = conn.state
            if isinstance(state, _ConnState):
                resting = state.rest()
                if resting is None:
                    parser = state.parser
                    if not parser.done and parser.protocol != "http2":
                        continue  # in a message (or not sniffed yet): asked again next time
                else:
                    conn.state = resting
                    rested += 1
            # Resting, nothing more to parse, or HTTP/2, which never rests (its HPACK tables
            # are state): not visited again.
            del awake[key]
        return rested

    def connection_dropped(self, conn: Connection, reason: object = None) -> None:
        """The table let go of a connection (replaced, evicted): finish its parser."""
        self._eof(conn)

    def _eof(self, conn: Connection) -> None:
        key = (conn.tgid, conn.fd)
        if self._awake.get(key) is conn:
            del self._awake[key]
        state = conn.state
        if isinstance(state, _ConnState):
            for origin in (Origin.CLIENT, Origin.SERVER):
                self._emit(conn, state.parser.receive_eof(origin), None, Direction.RECV)

    def _data(self, chunk: DataChunk) -> None:
        m = self.metrics
        direction = chunk.direction
        send = direction is Direction.SEND
        slot = 0 if send else 1
        children = self._chunk_children[slot]
        if children is None:
            label = direction.value
            children = (m.chunks.labels(label), m.bytes.labels(label))
            self._chunk_children[slot] = children
        # The children's own numbers, not inc(): two Python calls per chunk saved.
        children[0].value += 1
        children[1].value += len(chunk.data)
        # The kernel's role, when it tracks the fd: adopting needs no table read then.
        conn = self.conns.get_or_adopt(
            chunk.tgid, chunk.fd, chunk.ts_ns, chunk.comm, chunk.role or None
        )
        if conn is None:
            m.unknown_fd.inc()
            return
        state = conn.state
        if state is None:
            if not self._selected(conn):
                # `[processes]` leaves this process out: never parsed, and the kernel stops
                # copying the connection (its syscalls count as "ignored").
                conn.state = _EXCLUDED
                if self.control is not None:
                    self.control.ignore(chunk.tgid, chunk.fd, as_of_ns=chunk.ts_ns)
                return
            state = conn.state = _ConnState(chunk.tls)
            self._awake[(conn.tgid, conn.fd)] = conn
        elif not isinstance(state, _ConnState):
            if type(state) is not tuple:
                return  # _EXCLUDED
            state = conn.state = _ConnState.woken(state)
            self._awake[(conn.tgid, conn.fd)] = conn
        if state.tls != chunk.tls:
            if not chunk.tls:
                self.tls_ciphertext_chunks += 1  # a TLS socket's own bytes: never parsed
                return
            # The connection turned out to be TLS (or started TLS after a CONNECT): the
            # plaintext gets a parser of its own, in its own offset space.
            state = conn.state = _ConnState(tls=True)
            self._awake[(conn.tgid, conn.fd)] = conn
        parser = state.parser
        if parser.done:
            return
        # A client sends requests and receives responses; a server the reverse.
        if conn.role == "client":
            origin = Origin.CLIENT if send else Origin.SERVER
        else:
            origin = Origin.SERVER if send else Origin.CLIENT
        events: list[Event] = []
        # Offsets are the kernel's byte count of this direction: a jump means bytes that
        # moved but never reached us (a syscall in flight at attach, a lost record).
        expected = state.next_offset[slot]
        state.next_offset[slot] = chunk.offset + chunk.total_len
        if expected >= 0 and chunk.offset > expected:
            lost = chunk.offset - expected
            m.gap_bytes.inc(lost)
            events += parser.receive_gap(origin, lost)
        if chunk.skipped:
            events += parser.receive_skipped(origin, chunk.skipped)
        if chunk.data:
            events += parser.receive_data(origin, chunk.data)
        missed = chunk.total_len - chunk.skipped - len(chunk.data)  # DataChunk.missed
        if missed > 0:
            m.gap_bytes.inc(missed)
            events += parser.receive_gap(origin, missed)
        self._emit(conn, events, chunk, chunk.direction)
        control = self.control
        if control is None:
            return
        if parser.done:
            if parser.not_http:
                m.not_http.inc()
            control.ignore(chunk.tgid, chunk.fd, as_of_ns=chunk.ts_ns)
            return
        hint = parser.skip_hint(origin)
        if hint >= SKIP_MIN_BYTES:
            # Body bytes the parser does not need: the kernel stops copying them.
            control.set_skip_until(
                chunk.tgid,
                chunk.fd,
                chunk.direction,
                chunk.offset + chunk.total_len + hint,
                tls=chunk.tls,
                as_of_ns=chunk.ts_ns,
            )

    # -- parser events -> observations ------------------------------------------------
    def _emit(
        self,
        conn: Connection,
        events: list[Event],
        chunk: DataChunk | None,
        direction: Direction,
    ) -> None:
        for ev in events:
            if type(ev) is MessageParsed:
                self._message(conn, ev, chunk, direction)
            elif isinstance(ev, ParseFailed):
                self.metrics.parse_errors.labels(self._protocol(conn), ev.code).inc()
            elif isinstance(ev, Desynced):
                self.metrics.desyncs.labels(self._protocol(conn), ev.reason).inc()

    @staticmethod
    def _protocol(conn: Connection) -> str:
        state = conn.state
        protocol = state.parser.protocol if isinstance(state, _ConnState) else None
        return protocol or "unknown"

    def _message(
        self, conn: Connection, msg: MessageParsed, chunk: DataChunk | None, direction: Direction
    ) -> None:
        headers = msg.headers + msg.inferred_headers if msg.inferred_headers else msg.headers
        verdict = check_message(
            headers,
            self._config.limits,  # the attribute, not the property: once per message
            header_block_bytes=msg.header_block_bytes,
            sensitive=self._sensitive,
        )
        proc = conn.process
        obs = Observation(  # positional (once per message): the fields in their order
            msg,
            verdict,
            "outbound" if direction is Direction.SEND else "inbound",
            conn.tgid,
            chunk.tid if chunk is not None else 0,
            conn.fd,
            chunk.ts_ns if chunk is not None else 0,
            proc.label if proc is not None else "unknown",
            proc.comm if proc is not None else "",
            conn.role,
            conn.local,
            conn.peer,
            conn.sni,
        )
        for observer in self.observers:
            try:
                observer(obs)
            except Exception:  # an observer bug must not stop capture
                log.exception("observer %r failed", observer)

    def _count(self, obs: Observation) -> None:
        m = self.metrics
        process = m.process_label(obs.process)
        msg = obs.message
        kind = "request" if msg.origin is Origin.CLIENT else "response"  # not the property
        key = (obs.direction, kind, msg.protocol, obs.verdict.context, process)
        child = self._message_children.get(key)
        if child is None:
            # Bounded: 2 x 2 x 2 x 4 x the process label cap.
            child = self._message_children[key] = m.messages.labels(*key)
        child.value += 1
        if not obs.verdict.findings:
            return
        peer = m.peer_label(peer_label(obs))
        seen: set[tuple[str, str]] = set()
        for f in obs.verdict.findings:
            key = (f.kind, f.header)
            if key in seen:
                continue
            seen.add(key)
            m.findings.labels(f.kind, f.header, process, peer).inc()
        if self.audit is not None:
            self.audit.message_findings(self.with_local(obs))

    def with_local(self, obs: Observation) -> Observation:
        """``obs`` with its local address, read from /proc now when the budgeted lookup of
        the data path put it off (connection churn). Findings are rare; their audit lines
        must name both ends."""
        if obs.local is not None:
            return obs
        conn = self.conns.get(obs.tgid, obs.fd)
        if conn is None or not self.conns.resolve(conn) or conn.local is None:
            return obs  # resolve() tries /proc once per connection, then keeps the outcome
        return replace(obs, local=conn.local, peer=obs.peer or conn.peer)


def peer_label(obs: Observation) -> str:
    """The other end, as a bounded-cardinality label.

    Outbound requests: the host the request names (Host/:authority) when there is one,
    else ``ip:port``. Everything else: the peer's IP (client ports are ephemeral).
    """
    msg = obs.message
    if obs.role == "client":
        if msg.authority:
            return msg.authority.lower()
        return str(obs.peer) if obs.peer is not None else "unknown"
    return obs.peer.host if obs.peer is not None else "unknown"
