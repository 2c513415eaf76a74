"""Warm the analysis path up before real traffic arrives (for PyPy's JIT).

Under PyPy the loop runs interpreted until the JIT has traced and compiled it: the first
seconds of traffic cost 3-5x what they cost warm. A daemon started into a connection storm
or a saturated node (a restart, a reboot) would spend that time behind, with the ring
filling. So before the capture attaches, :func:`warm_up` runs the daemon's own code
(``LiveCapture._drain``, ``Daemon.process``: the decoder, the connection table, the parsers,
the header checks and the hop analysis) over synthetic ring records of the traffic a node
sees: HTTP/1.1 keep-alive through a proxy that propagates, strips or leaks trace context,
large bodies skipped, HTTP/2 with HPACK, connection storms of idle keep-alive connections,
short-lived processes. The compiled code is what the live daemon then runs.

Nothing of it reaches the outside: it runs on a throwaway daemon object with its own
metrics registry, no audit log, no /metrics listener and a capture that is never opened;
its processes are numbered above the kernel's ``pid_max`` limit (2^22), so no name, address
or cgroup lookup can find a real process.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from hopwatch.capture import live
from hopwatch.capture.live import CaptureConfig, LiveCapture
from hopwatch.config import Config

__all__ = ["WarmUp", "warm_up"]

_FIRST_TGID = (1 << 22) + 1000  # above any pid_max: no /proc entry can match
_TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Records:
    """Ring records as capture.c writes them, with each direction's stream offset kept."""

    def __init__(self) -> None:
        self.ts = time.monotonic_ns()
        self.offsets: dict[tuple[int, int, int], int] = {}
        self.out: list[bytes] = []

    def _tick(self) -> int:
        self.ts += 1500
        return self.ts

    def open(self, tgid: int, fd: int, role: int, comm: bytes, peer: str, port: int) -> None:
        ts = self._tick()
        addr = socket.inet_pton(socket.AF_INET, peer).ljust(16, b"\0")
        self.offsets[(tgid, fd, 0)] = self.offsets[(tgid, fd, 1)] = 0
        self.out.append(
            live._HDR.pack(live.EV_OPEN, 0, 0, role, fd, tgid, tgid, ts, comm)
            + live._CONN.pack(socket.AF_INET, port, 0, addr, ts)
        )

    def data(
        self, tgid: int, fd: int, d: int, role: int, comm: bytes, data: bytes,
        *, total: int = 0, skipped: int = 0,
    ) -> None:
        """One syscall's record: ``d`` 0 sent, 1 received; ``total`` bytes moved (default:
        ``data``), of which ``skipped`` at the start were not copied."""
        total = total or skipped + len(data)
        key = (tgid, fd, d)
        offset = self.offsets.get(key, 0)
        self.offsets[key] = offset + total
        self.out.append(
            live._HDR_DATA.pack(
                live.EV_DATA, d, live.DF_FIRST | live.DF_LAST, role, fd, tgid, tgid,
                self._tick(), comm, total, offset, skipped, 0, len(data), 0,
            )
            + data
        )

    def close(self, tgid: int, fd: int) -> None:
        self.out.append(live._HDR.pack(live.EV_CLOSE, 0, 0, 0, fd, tgid, tgid, self._tick(), b""))

    def exit(self, tgid: int) -> None:
        self.out.append(live._HDR.pack(live.EV_EXIT, 0, 0, 0, -1, tgid, tgid, self._tick(), b""))


def _http1_round(r: _Records, n: int) -> None:
    """A client, a proxy that calls an upstream (or a third party), keep-alive, 8 requests
    per connection; one upstream call in 10 without trace context, one in 16 to a public
    address, one response in 8 with a large body the kernel skips."""
    client, proxy = _FIRST_TGID, _FIRST_TGID + 1
    cfd, sfd, ufd = 100 + n % 50, 200 + n % 50, 300 + n % 50
    public = n % 16 == 15
    upstream = "203.0.113.7" if public else "10.20.0.5"
    r.open(client, cfd, 1, b"wu_client", "127.0.0.1", 8080)
    r.open(proxy, sfd, 2, b"wu_proxy", "127.0.0.1", 40000 + n % 20000)
    r.open(proxy, ufd, 1, b"wu_proxy", upstream, 443 if public else 9000)
    for i in range(8):
        tp = b"traceparent: " + _TRACEPARENT + b"\r\n"
        req = b"GET /api/items/%d HTTP/1.1\r\nHost: proxy.local\r\nUser-Agent: wu\r\n%s" % (
            i, tp)
        req += b"baggage: tenant=a,region=b\r\n\r\n" if i % 3 == 0 else b"\r\n"
        r.data(client, cfd, 0, 1, b"wu_client", req)
        r.data(proxy, sfd, 1, 2, b"wu_proxy", req)
        up = b"GET /v1/x HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
            b"api.partner.example" if public else b"svc.internal",
            b"" if (n + i) % 10 == 0 else tp,
        )
        r.data(proxy, ufd, 0, 1, b"wu_proxy", up)
        r.data(proxy, ufd, 1, 1, b"wu_proxy", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if (n + i) % 8 == 0:
            head = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 20000\r\n\r\n"
            )
            for pid, fd, d, role in ((proxy, sfd, 0, 2), (client, cfd, 1, 1)):
                comm = b"wu_proxy" if pid == proxy else b"wu_client"
                r.data(pid, fd, d, role, comm, head + b"x" * 1000)
                r.data(pid, fd, d, role, comm, b"", skipped=20000 - 1000)
        else:
            resp = b"HTTP/1.1 200 OK\r\nServer: wu\r\nContent-Length: 12\r\n\r\n{\"ok\":true}\n"
            r.data(proxy, sfd, 0, 2, b"wu_proxy", resp)
            r.data(client, cfd, 1, 1, b"wu_client", resp)
    for pid, fd in ((client, cfd), (proxy, sfd), (proxy, ufd)):
        r.close(pid, fd)


def _http2_round(r: _Records, n: int) -> None:
    """An h2c client and server: preface, SETTINGS, 4 requests with HPACK-encoded trace
    context (one in 4 without), responses with DATA."""
    client, server = _FIRST_TGID + 2, _FIRST_TGID + 3
    cfd, sfd = 100 + n % 50, 200 + n % 50
    r.open(client, cfd, 1, b"wu_h2c", "127.0.0.1", 8443)
    r.open(server, sfd, 2, b"wu_h2s", "127.0.0.1", 41000 + n % 20000)
    req_enc, resp_enc = Encoder(), Encoder()
    settings = SettingsFrame(0).serialize()
    first = True
    for i in range(4):
        sid = 1 + 2 * i
        headers = [
            (":method", "GET"), (":scheme", "http"), (":path", f"/svc.Items/Get{i}"),
            (":authority", "items.internal"),
        ]
        if i % 4 != 3:
            headers.append(("traceparent", _TRACEPARENT.decode()))
        req = HeadersFrame(sid, req_enc.encode(headers), flags=["END_HEADERS", "END_STREAM"])
        out = req.serialize()
        if first:
            out = _PREFACE + settings + out
        r.data(client, cfd, 0, 1, b"wu_h2c", out)
        r.data(server, sfd, 1, 2, b"wu_h2s", out)
        resp = HeadersFrame(sid, resp_enc.encode([(":status", "200")]), flags=["END_HEADERS"])
        body = DataFrame(sid, b"{}", flags=["END_STREAM"])
        out = resp.serialize() + body.serialize()
        if first:
            out = settings + out
            first = False
        r.data(server, sfd, 0, 2, b"wu_h2s", out)
        r.data(client, cfd, 1, 1, b"wu_h2c", out)
    r.close(client, cfd)
    r.close(server, sfd)


def _storm_round(r: _Records, n: int) -> None:
    """100 keep-alive connections opened (both ends) that never carry data, then closed;
    and a short-lived client process that exits with its connection open."""
    client, server = _FIRST_TGID + 4, _FIRST_TGID + 5
    for fd in range(1000, 1100):
        r.open(client, fd, 1, b"wu_idle_client", "127.0.0.1", 9090)
        r.open(server, fd, 2, b"wu_idle_server", "127.0.0.1", 30000 + fd)
    for fd in range(1000, 1100):
        r.close(client, fd)
        r.close(server, fd)
    short = _FIRST_TGID + 10 + n % 1000
    r.open(short, 3, 1, b"wu_short", "127.0.0.1", 8080)
    r.data(short, 3, 0, 1, b"wu_short",
           b"GET /h HTTP/1.1\r\nHost: x\r\ntraceparent: " + _TRACEPARENT + b"\r\n\r\n")
    r.exit(short)


@dataclass
class WarmUp:
    """What a warm-up ran: ring records, and what the throwaway daemon made of them."""

    records: int = 0
    messages: int = 0  # HTTP messages counted
    findings: int = 0  # per-message and hop findings
    faults: int = 0  # parse errors, desyncs, gap bytes, unknown-fd chunks: 0 when in step


def _total(registry: Any, *names: str) -> int:
    return int(sum(s.value for m in registry.collect() for s in m.samples if s.name in names))


def warm_up(config: Config, *, seconds: float = 4.0, max_records: int = 150_000) -> WarmUp:
    """Run the analysis path over synthetic traffic for about ``seconds`` (at most
    ``max_records`` ring records, in batches of ~2,000)."""
    from hopwatch.server import Daemon

    started = time.monotonic()
    daemon = Daemon(config, serve_metrics=False)
    capture = LiveCapture(CaptureConfig())
    daemon.wire(capture)
    done = n = 0
    rounds = (_http1_round, _http1_round, _http1_round, _http2_round, _storm_round)
    while done < max_records and time.monotonic() - started < seconds:
        records = _Records()
        while len(records.out) < 2048:
            rounds[n % len(rounds)](records, n)
            n += 1
        batch = records.out
        for i in range(0, len(batch), capture.config.batch_records):
            capture._raw = batch[i : i + capture.config.batch_records]
            daemon.process(capture._drain())
        done += len(batch)
    registry = daemon.metrics.registry
    result = WarmUp(
        records=done,
        messages=_total(registry, "hopwatch_http_messages_total"),
        findings=_total(registry, "hopwatch_findings_total"),
        faults=_total(
            registry,
            "hopwatch_parse_errors_total",
            "hopwatch_stream_desyncs_total",
            "hopwatch_stream_gap_bytes_total",
            "hopwatch_unknown_fd_chunks_total",
        ),
    )
    # Its garbage goes with the rest of start-up's (``Daemon.start`` collects and trims
    # once start-up is over).
    return result
