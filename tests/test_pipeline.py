"""The pipeline's per-connection state: idle HTTP/1 connections rest (give up their parser)
and wake with their stream offsets intact."""

from __future__ import annotations

import socket

from hopwatch.capture._types import (
    ConnClosed,
    ConnOpened,
    DataChunk,
    Direction,
    ProcessExecuted,
    SockAddr,
)
from hopwatch.config import Config, parse_config
from hopwatch.conntrack import ConnectionTable
from hopwatch.metrics import Metrics
from hopwatch.pipeline import Observation, Pipeline, _ConnState
from hopwatch.procfs import ProcFS

TGID = 4_000_000  # no such process: the identity comes from the event
PEER = SockAddr(socket.AF_INET, "10.0.0.5", 40000)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
REQ = b"GET /x HTTP/1.1\r\nHost: api.local\r\ntraceparent: " + TP + b"\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
S = 10**9


class Server:
    """One server connection fed by hand, its offsets kept like the kernel's."""

    def __init__(self, fd: int = 7) -> None:
        self.metrics = Metrics()
        self.seen: list[Observation] = []
        self.table = ConnectionTable()
        self.pipe = Pipeline(Config(), self.metrics, self.table, observers=(self.seen.append,))
        self.fd = fd
        self.offset = {Direction.RECV: 0, Direction.SEND: 0}
        self.pipe.handle(ConnOpened(TGID, TGID, fd, "server", PEER, 1, comm="api"))

    def chunk(self, d: Direction, data: bytes, ts_ns: int, *, lost: int = 0) -> None:
        self.offset[d] += lost
        self.pipe.handle(
            DataChunk(TGID, TGID, self.fd, d, ts_ns, len(data), data, comm="api",
                      offset=self.offset[d], role="server")
        )
        self.offset[d] += len(data)

    def exchange(self, ts_ns: int) -> None:
        self.chunk(Direction.RECV, REQ, ts_ns)
        self.chunk(Direction.SEND, RESP, ts_ns + 1)

    @property
    def state(self) -> object:
        conn = self.table.get(TGID, self.fd)
        assert conn is not None
        return conn.state

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def test_an_idle_connection_rests_and_wakes_with_its_offsets() -> None:
    srv = Server()
    for i in range(3):
        srv.exchange(i * S)
    assert isinstance(srv.state, _ConnState)
    assert srv.pipe.rest_idle(cutoff_ns=10 * S) == 1
    assert srv.state == (len(RESP) * 3, len(REQ) * 3, False)  # (send, recv) offsets, not TLS
    assert srv.pipe.rest_idle(cutoff_ns=10 * S) == 0  # resting already
    for i in range(2):
        srv.exchange((20 + i) * S)
    assert isinstance(srv.state, _ConnState)
    assert [o.message.is_request for o in srv.seen] == [True, False] * 5
    labels = {"direction": "inbound", "protocol": "http1", "process": "api"}
    assert srv.count("hopwatch_http_messages_total", kind="request", context="w3c", **labels) == 5
    assert srv.count("hopwatch_http_messages_total", kind="response", context="none",
                     direction="outbound", protocol="http1", process="api") == 5
    # The offsets survived the rest: bytes lost after it are seen as a gap.
    srv.pipe.rest_idle(cutoff_ns=30 * S)
    srv.chunk(Direction.RECV, REQ, 40 * S, lost=100)
    assert srv.count("hopwatch_stream_gap_bytes_total") == 100
    assert srv.count("hopwatch_parse_errors_total") == 0


def test_only_connections_idle_since_the_cutoff_rest() -> None:
    srv = Server()
    srv.exchange(5 * S)
    assert srv.pipe.rest_idle(cutoff_ns=4 * S) == 0
    assert isinstance(srv.state, _ConnState)
    assert srv.pipe.rest_idle(cutoff_ns=6 * S) == 1


def test_connections_in_a_message_or_not_http1_keep_their_parser() -> None:
    mid_body = Server(fd=7)
    mid_body.chunk(Direction.RECV, b"POST /u HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc", S)
    waiting = Server(fd=8)
    waiting.chunk(Direction.RECV, REQ, S)  # the response has not come yet
    h2 = Server(fd=9)
    h2.chunk(Direction.RECV, PREFACE + bytes.fromhex("000000040000000000"), S)
    for srv in (mid_body, waiting, h2):
        assert srv.pipe.rest_idle(cutoff_ns=10 * S) == 0
        assert isinstance(srv.state, _ConnState)
    # The body goes on where it was: no desync, one request.
    mid_body.chunk(Direction.RECV, b"x" * 97, 11 * S)
    mid_body.chunk(Direction.SEND, RESP, 11 * S)
    assert [o.message.is_request for o in mid_body.seen] == [True, False]
    assert mid_body.count("hopwatch_stream_desyncs_total") == 0


def test_a_resting_connection_closes_quietly() -> None:
    srv = Server()
    srv.exchange(S)
    srv.pipe.rest_idle(cutoff_ns=10 * S)
    srv.pipe.handle(ConnClosed(TGID, srv.fd, 11 * S))
    assert (TGID, srv.fd) not in srv.table and len(srv.seen) == 2
    assert srv.count("hopwatch_parse_errors_total") == 0


def test_the_rest_sweep_visits_connections_with_a_parser_only_and_forgets_closed_ones() -> None:
    srv = Server(fd=7)  # opened, never used: no parser, never visited
    for fd in range(100, 1100):  # opened, one exchange, closed
        srv.fd, srv.offset = fd, {Direction.RECV: 0, Direction.SEND: 0}
        srv.pipe.handle(ConnOpened(TGID, TGID, fd, "server", PEER, 1, comm="api"))
        srv.exchange(2 * S)
        srv.pipe.handle(ConnClosed(TGID, fd, 3 * S))
    assert srv.pipe._awake == {}
    h2 = Server(fd=9)
    h2.chunk(Direction.RECV, PREFACE + bytes.fromhex("000000040000000000"), S)
    not_http = Server(fd=10)
    not_http.chunk(Direction.RECV, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), S)
    for srv in (h2, not_http):
        assert len(srv.pipe._awake) == 1
        assert srv.pipe.rest_idle(cutoff_ns=10 * S) == 0
    # HTTP/2 never rests (its HPACK tables are state) and the rest: not asked again. 100k
    # HTTP/2 connections would otherwise be visited every second for nothing.
    assert h2.pipe._awake == {} and isinstance(h2.state, _ConnState)
    assert not_http.pipe._awake == {}  # nothing more to parse: not asked again
    # Its parser goes on: a SETTINGS frame after the sweep parses without a fault.
    h2.chunk(Direction.RECV, bytes.fromhex("000000040000000000"), 11 * S)
    assert h2.count("hopwatch_parse_errors_total") == 0 and isinstance(h2.state, _ConnState)


class _Listeners(ProcFS):
    """/proc as far as listening sockets go: fd -> (inode, port), changed by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: dict[int, tuple[int, int]] = {}
        self.asked = 0

    def socket_inode(self, pid: int, fd: int) -> int | None:
        return self.fds[fd][0] if fd in self.fds else None

    def local_port(self, pid: int, fd: int) -> int | None:
        self.asked += 1
        return self.fds[fd][1] if fd in self.fds else None


def test_exclude_ports_asks_a_reused_listening_fd_again() -> None:
    """Listening sockets the kernel did not see bound (bound before the start, or by a
    prefork parent) are asked once per socket; a listening fd reused for another port is
    asked again, and one gone already keeps the port it last had."""
    procfs = _Listeners()
    control = _Ignored()
    pipe = Pipeline(
        parse_config("[capture]\nexclude_ports = [8080]\n"),
        Metrics(),
        ConnectionTable(procfs=procfs),
        control=control,  # type: ignore[arg-type]
    )

    def accept(fd: int) -> None:
        pipe.handle(ConnOpened(TGID, TGID, fd, "server", PEER, fd, comm="api", listen_fd=3))

    procfs.fds[3] = (100, 8080)
    accept(10)
    accept(11)
    assert control.ignored == [(TGID, 10), (TGID, 11)] and procfs.asked == 1
    procfs.fds[3] = (200, 9090)  # closed, and the fd now listens on another port
    accept(12)
    assert control.ignored == [(TGID, 10), (TGID, 11)] and procfs.asked == 2
    del procfs.fds[3]  # gone by the time its connection is read: the port it last had
    accept(13)
    procfs.fds[3] = (300, 8080)
    accept(14)
    assert control.ignored == [(TGID, 10), (TGID, 11), (TGID, 14)] and procfs.asked == 3


class _Ignored:
    def __init__(self) -> None:
        self.ignored: list[tuple[int, int]] = []

    def ignore(self, tgid: int, fd: int, *, as_of_ns: int | None = None) -> None:
        self.ignored.append((tgid, fd))


class _Forgets:
    def __init__(self) -> None:
        self.forgotten: list[tuple[int, int, int]] = []

    def forget(self, tgid: int, fd: int, *, as_of_ns: int) -> None:
        self.forgotten.append((tgid, fd, as_of_ns))


def test_exec_ends_a_connection_mid_message_and_tells_the_capture() -> None:
    """The process (gone from /proc here, so its fd holds nothing) ran exec in the middle of
    a request head: the connection ends as at a close (the head counted as cut short), the
    capture is told to stop tracking the fd as of the exec, and bytes read on that fd later
    (a file of the new image's) are no connection's traffic."""
    srv = Server()
    control = _Forgets()
    srv.pipe.control = control  # type: ignore[assignment]
    srv.exchange(S)
    srv.chunk(Direction.RECV, REQ[:10], 2 * S)
    srv.pipe.handle(ProcessExecuted(TGID, 3 * S))
    assert control.forgotten == [(TGID, 7, 3 * S)] and srv.table.get(TGID, 7) is None
    cut = {"protocol": "http1", "code": "http1.truncated_head"}
    assert srv.count("hopwatch_parse_errors_total", **cut) == 1
    elf = b"\x7fELF\x02"
    srv.pipe.handle(DataChunk(TGID, TGID, 7, Direction.RECV, 4 * S, 5, elf, comm="api"))
    assert srv.table.get(TGID, 7) is None
    assert srv.count("hopwatch_parse_errors_total", **cut) == 1
    assert srv.count("hopwatch_unknown_fd_chunks_total") == 1
    assert srv.table.counters()["exec_closed"] == 1
