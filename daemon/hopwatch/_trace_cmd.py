"""`hopwatch trace`: the IO half (the probe request, the capture session), kept out of cli.py.

The capture is the daemon's own wiring (`hopwatch.server.Daemon`) with the recorder as an
extra observer and finding sink, no /metrics listener and no audit log, its loop driven
on a thread for the life of the command. It is started (programs loaded and attached)
before the first probe is sent, so nothing the probe causes is missed.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

from hopwatch.capture._types import SockAddr
from hopwatch.config import Config, ConfigError, load_config
from hopwatch.procfs import TcpState
from hopwatch.trace import (
    EXIT_NOT_FOLLOWED,
    EXIT_USAGE,
    Probe,
    ProbeResult,
    TraceRecorder,
    TraceReport,
    build_report,
    combined_exit,
    new_probe,
    render_tree,
    report_json,
)

from ._compat import SLOTS

__all__ = ["CaptureSession", "Target", "UsageError", "parse_header", "parse_url", "run", "send"]

log = logging.getLogger(__name__)

#: Headers the probe sets itself: --header may not override them (the trace id must be ours).
_RESERVED = frozenset(
    {"traceparent", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled",
     "x-b3-flags", "host", ":authority", "content-length", "transfer-encoding", "connection"}
)  # fmt: skip
_QUIET_S = 0.3  # nothing about the trace for this long after every hop answered: settled
_FAILED_GRACE_S = 1.0  # a failed probe that no process was seen receiving: stop waiting


class UsageError(ValueError):
    """A bad URL, header or option (exit 2)."""


# -- options --------------------------------------------------------------------------------


@dataclass(frozen=True, **SLOTS)
class Target:
    url: str
    tls: bool
    host: str  # for connect(); brackets removed
    port: int
    authority: str  # Host / :authority
    path: str  # origin-form target, with the query


def parse_url(url: str) -> Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"bad URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"bad URL {url!r}: the scheme must be http or https")
    if not parts.hostname:
        raise UsageError(f"bad URL {url!r}: no host")
    tls = scheme == "https"
    authority = parts.netloc.rsplit("@", 1)[-1]
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, tls, parts.hostname, port or (443 if tls else 80), authority, path)


def parse_header(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n"):
        raise UsageError(f"bad --header {line!r}: expected 'Name: value'")
    if name.lower() in _RESERVED:
        raise UsageError(
            f"--header {name}: the probe sets {name.lower()} itself (choose --format for the "
            "trace context)"
        )
    if any(c in value for c in "\r\n\0"):
        raise UsageError(f"bad --header {line!r}: control characters in the value")
    return name, value.strip()


# -- the probe request ------------------------------------------------------------------------


def _sockaddr(sock: socket.socket, peer: bool) -> SockAddr | None:
    try:
        addr = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    return SockAddr(sock.family, str(addr[0]), int(addr[1]))


def _tls_context(insecure: bool, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def send(
    target: Target,
    probe: Probe,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    http2: bool = False,
    insecure: bool = False,
    timeout: float = 10.0,
) -> ProbeResult:
    """Send the probe request once; never raises for network errors (see ``error``)."""
    all_headers = [*probe.headers(), *headers]
    base = ProbeResult(
        url=target.url,
        method=method,
        protocol="http2" if http2 else "http1",
        tls=target.tls,
        local=None,
        peer=None,
        authority=target.authority,
        path=target.path,
    )
    t0 = time.monotonic()
    sender = _send_http2 if http2 else _send_http1
    result = sender(target, base, method, all_headers, insecure, timeout)
    return dataclasses.replace(result, elapsed_ms=(time.monotonic() - t0) * 1000)


def _send_http1(
    target: Target,
    base: ProbeResult,
    method: str,
    headers: Sequence[tuple[str, str]],
    insecure: bool,
    timeout: float,
) -> ProbeResult:
    conn: http.client.HTTPConnection
    if target.tls:
        ctx = _tls_context(insecure, ["http/1.1"])
        conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    result = base
    try:
        conn.connect()
        assert conn.sock is not None
        result = dataclasses.replace(
            base, local=_sockaddr(conn.sock, False), peer=_sockaddr(conn.sock, True)
        )
        conn.putrequest(method, target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.authority)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return dataclasses.replace(result, status=resp.status)
    except (OSError, http.client.HTTPException) as exc:
        return dataclasses.replace(result, error=_error_text(exc))
    finally:
        conn.close()


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _H2Error(Exception):
    pass


def _send_http2(
    target: Target,
    base: ProbeResult,
    method: str,
    headers: Sequence[tuple[str, str]],
    insecure: bool,
    timeout: float,
) -> ProbeResult:
    """One request on a fresh HTTP/2 connection: prior knowledge (h2c) or ALPN h2 (TLS).

    A minimal client over hyperframe and hpack (the daemon's own dependencies): SETTINGS
    and PING are acknowledged, received DATA is credited back, nothing else is needed for
    one request on stream 1.
    """
    result = base
    sock: socket.socket | None = None
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        if target.tls:
            ctx = _tls_context(insecure, ["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=target.host)
            alpn = sock.selected_alpn_protocol()
            if alpn != "h2":
                raise _H2Error(f"the server did not negotiate h2 over TLS (ALPN {alpn!r})")
        result = dataclasses.replace(base, local=_sockaddr(sock, False), peer=_sockaddr(sock, True))
        status = _h2_exchange(sock, target, method, headers)
        return dataclasses.replace(result, status=status)
    except (OSError, _H2Error, ValueError) as exc:
        return dataclasses.replace(result, error=_error_text(exc))
    finally:
        if sock is not None:
            sock.close()


def _h2_exchange(
    sock: socket.socket, target: Target, method: str, headers: Sequence[tuple[str, str]]
) -> int:
    import hpack
    from hyperframe.frame import (
        ContinuationFrame,
        DataFrame,
        Frame,
        GoAwayFrame,
        HeadersFrame,
        PingFrame,
        RstStreamFrame,
        SettingsFrame,
        WindowUpdateFrame,
    )

    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    fields = [
        (":method", method),
        (":scheme", "https" if target.tls else "http"),
        (":authority", target.authority),
        (":path", target.path),
        *((n.lower(), v) for n, v in headers),
    ]
    block = encoder.encode(fields)
    if len(block) > 16384:
        raise _H2Error("header block over the default HTTP/2 frame size")
    sock.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + SettingsFrame(0).serialize()
        + HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
    )
    buf = bytearray()
    pending = bytearray()  # header block fragments of stream 1
    status: int | None = None

    def frames() -> Iterable[Frame]:
        while True:
            while len(buf) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
                if len(buf) < 9 + length:
                    break
                frame.parse_body(memoryview(bytes(buf[9 : 9 + length])))
                del buf[: 9 + length]
                yield frame
            data = sock.recv(65536)
            if not data:
                raise _H2Error("connection closed before the response ended")
            buf.extend(data)

    for frame in frames():
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            sock.sendall(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(frame, GoAwayFrame):
            raise _H2Error(f"GOAWAY (error code {frame.error_code})")
        elif frame.stream_id != 1:
            continue
        elif isinstance(frame, RstStreamFrame):
            raise _H2Error(f"stream reset (error code {frame.error_code})")
        elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
            pending.extend(frame.data)
            if "END_HEADERS" in frame.flags:
                got = {_text(n): _text(v) for n, v in decoder.decode(bytes(pending))}
                pending.clear()
                code = int(got.get(":status", "0"))
                if code >= 200:
                    status = code
        elif isinstance(frame, DataFrame) and frame.flow_controlled_length:
            n = frame.flow_controlled_length
            sock.sendall(WindowUpdateFrame(0, n).serialize() + WindowUpdateFrame(1, n).serialize())
        if frame.stream_id == 1 and "END_STREAM" in frame.flags and status is not None:
            break
    with_goaway = GoAwayFrame(0, last_stream_id=0).serialize()
    try:
        sock.sendall(with_goaway)
    except OSError:
        pass
    assert status is not None
    return status


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


# -- the capture ------------------------------------------------------------------------------


class CaptureSession:
    """The daemon's capture wiring with ``recorder`` attached, its loop on a thread."""

    def __init__(self, config: Config, recorder: TraceRecorder) -> None:
        from hopwatch.server import Daemon

        # The trace joins hops by address: every connection's local address, at once.
        self.daemon = Daemon(
            config,
            observers=(recorder,),
            finding_sinks=(recorder,),
            serve_metrics=False,
            eager_local=True,
        )
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def __enter__(self) -> CaptureSession:
        self.daemon.start()
        self._thread = threading.Thread(target=self._loop, name="hopwatch-capture", daemon=True)
        self._thread.start()
        return self

    def listening_ports(self, pid: int) -> frozenset[int]:
        """Ports ``pid`` has a listening TCP socket on (from /proc; empty once it exited)."""
        fds = self.daemon.conns.procfs.tcp_fds(pid)
        return frozenset(f.socket.local.port for f in fds if f.socket.state == TcpState.LISTEN)

    def _loop(self) -> None:
        try:
            self.daemon.loop()
        except BaseException as exc:  # reported by `alive`, then by the command
            self.failure = exc
            log.exception("capture loop failed")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.daemon.stop()
        if self._thread is not None:
            self._thread.join(10)
        self.daemon.shutdown()


# -- the command ------------------------------------------------------------------------------


def _config(path: str | None) -> Config:
    config = load_config(path)
    # The trace's capture writes no audit lines: it is a probe, not the node's record.
    return dataclasses.replace(config, audit_log=None)


def _settle(recorder: TraceRecorder, session: CaptureSession, result: ProbeResult,
            trace_id: str, wait: float) -> None:  # fmt: skip
    """Until every hop that received the trace answered and the capture went quiet
    (bounded by ``wait`` seconds after the response)."""
    start = time.monotonic()
    deadline = start + wait
    while time.monotonic() < deadline and session.alive:
        if recorder.settled(trace_id, _QUIET_S):
            return
        if result.status is None and time.monotonic() - start > _FAILED_GRACE_S:
            if not recorder.recorded(trace_id).hops:
                return
        time.sleep(0.05)


def run(
    url: str,
    *,
    header_lines: Sequence[str] = (),
    fmt: str = "w3c",
    count: int = 1,
    json_output: bool = False,
    http2: bool = False,
    method: str = "GET",
    insecure: bool = False,
    timeout: float = 10.0,
    wait: float = 3.0,
    config_path: str | None = None,
) -> int:
    logging.basicConfig(
        level=logging.WARNING,
        format="hopwatch trace: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        target = parse_url(url)
        headers = [parse_header(h) for h in header_lines]
        if fmt not in ("w3c", "b3", "both"):
            raise UsageError(f"--format {fmt!r}: choose w3c, b3 or both")
        if count < 1:
            raise UsageError("--count must be at least 1")
        if timeout <= 0 or wait < 0:
            raise UsageError("--timeout must be positive and --wait not negative")
        if not method.isalpha():
            raise UsageError(f"bad --method {method!r}")
        config = _config(config_path)
    except (UsageError, ConfigError) as exc:
        print(f"hopwatch trace: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print(
            "hopwatch trace: needs root: it loads eBPF programs to watch every process on this "
            "node (run it with sudo)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    from hopwatch.server import StartupError

    recorder = TraceRecorder()
    reports: list[TraceReport] = []
    try:
        with CaptureSession(config, recorder) as session:
            for _ in range(count):
                probe = new_probe(fmt)
                recorder.watch(probe.trace_id)
                result = send(
                    target, probe, method=method.upper(), headers=headers, http2=http2,
                    insecure=insecure, timeout=timeout,
                )  # fmt: skip
                _settle(recorder, session, result, probe.trace_id, wait)
                if not session.alive:
                    raise StartupError(f"the capture stopped: {session.failure}")
                rec = recorder.recorded(probe.trace_id, forget=True)
                report = build_report(probe, result, rec, session.listening_ports)
                reports.append(report)
                if not json_output:
                    print(render_tree(report) + ("\n" if count > 1 else ""), flush=True)
    except StartupError as exc:
        print(f"hopwatch trace: cannot capture: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hopwatch trace: interrupted", file=sys.stderr)
        return EXIT_NOT_FOLLOWED if not reports else combined_exit(r.exit_code for r in reports)
    code = combined_exit(r.exit_code for r in reports)
    if json_output:
        print(report_json(reports))
    elif count > 1:
        tally: dict[str, int] = {}
        for r in reports:
            tally[r.outcome] = tally.get(r.outcome, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))
        print(f"{count} probes: {parts}  (exit {code})")
    return code
