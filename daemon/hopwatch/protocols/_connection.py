"""One parser per observed connection, whatever HTTP version it speaks.

Theory of operation
-------------------
The capture layer starts a `ConnectionParser` when a tracked socket first carries data.
Until the protocol is known the parser *sniffs*: the first bytes of a direction decide.

* client bytes ``PRI * HTTP/2.0`` (the preface), or server/client bytes that parse as a
  plausible sequence of HTTP/2 frame headers (attached mid-connection) -> HTTP/2;
* client bytes that start with a method token and a space, or server bytes ``HTTP/1.`` -> HTTP/1.

A few bytes may not be enough to decide (a 1-byte write), so undecided bytes are held, up
to `SNIFF_BYTES`. Bytes that are clearly neither make the connection `not_http`: every
later call returns at once and the capture layer is told (via `not_http`) so the kernel
stops copying it.

An HTTP/1.1 connection that upgrades to h2c (``Upgrade: h2c`` answered by 101) switches to
an `Http2Parser` seeded with the upgrade request; the bytes the HTTP/1 parser had not
consumed are replayed into it. Other upgrades (websocket) and CONNECT tunnels end parsing:
the connection becomes `opaque`.
"""

from __future__ import annotations

from collections.abc import Callable

from hopwatch.protocols._events import (
    Event,
    Origin,
    ParseFailed,
    ProtocolSwitched,
)
from hopwatch.protocols.http1 import Http1Parser
from hopwatch.protocols.http2 import Http2Parser, looks_like_http2

__all__ = ["SNIFF_BYTES", "ConnectionParser"]

SNIFF_BYTES = 64
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
)


def _sniff(origin: Origin, data: bytes) -> str | None:
    """'http1' | 'http2' | 'none' (not HTTP) | None (need more bytes)."""
    if origin is Origin.CLIENT:
        if data.startswith(_PREFACE[: len(data)]):
            return "http2" if len(data) >= len(_PREFACE) else None
        for m in _METHODS:
            if data.startswith(m):
                return "http1"
            if m.startswith(data):
                return None
    else:
        if data.startswith(b"HTTP/1."):
            return "http1"
        if b"HTTP/1.".startswith(data):
            return None
    if len(data) >= 9 and looks_like_http2(data):
        return "http2"
    if len(data) < 9:
        return None
    return "none"


class ConnectionParser:
    __slots__ = ("_direct", "_h1", "_held", "_impl", "done", "opaque", "protocol")

    def __init__(self) -> None:
        self._impl: Http1Parser | Http2Parser | None = None
        # Once the protocol is known and while parsing goes on, `receive_data` only
        # forwards (the per-chunk hot path): to ``_direct`` (HTTP/2: nothing to watch for)
        # or to ``_h1``, whose events need a look only when it switched protocol.
        self._direct: Callable[[Origin, bytes], list[Event]] | None = None
        self._h1: Http1Parser | None = None
        self._held: dict[Origin, bytes] = {}
        self.protocol: str | None = None  # "http1" | "http2" | "none" | None (undecided)
        self.opaque = False  # tunnel / websocket: nothing more to parse
        # Nothing more will be parsed: the capture layer may stop copying. Not HTTP, or
        # opaque; an attribute set where those change (read twice per chunk).
        self.done = False

    @classmethod
    def http1(cls) -> ConnectionParser:
        """A parser for a connection already known to speak HTTP/1 (one woken from rest)."""
        parser = cls()
        parser.protocol = "http1"
        parser._use(Http1Parser())
        return parser

    @property
    def at_rest(self) -> bool:
        """HTTP/1 between messages with nothing held (see `Http1Parser.at_rest`)."""
        h1 = self._h1
        return h1 is not None and not self.done and h1.at_rest

    @property
    def not_http(self) -> bool:
        return self.protocol == "none"

    def receive_data(self, origin: Origin, data: bytes) -> list[Event]:
        direct = self._direct
        if direct is not None:
            return direct(origin, data) if data else []
        h1 = self._h1
        if h1 is not None:
            if not data:
                return []
            out = h1.receive_data(origin, data)
            return self._after(out) if h1.switched else out
        if self.done or not data:
            return []
        if self._impl is None:
            held = self._held.get(origin, b"") + data
            verdict = _sniff(origin, held)
            if verdict is None:
                if len(held) > SNIFF_BYTES:
                    verdict = "none"
                else:
                    self._held[origin] = held
                    return []
            if verdict == "none":
                self.protocol = "none"
                self.done = True
                self._held.clear()
                return [ParseFailed(origin, "sniff.not_http", "first bytes are not HTTP")]
            self.protocol = verdict
            impl = Http1Parser() if verdict == "http1" else Http2Parser()
            self._use(impl)
            events: list[Event] = []
            for other, pending in self._held.items():
                if other is not origin:
                    events += impl.receive_data(other, pending)
            self._held.clear()
            events += impl.receive_data(origin, held)
            return self._after(events)
        return self._after(self._impl.receive_data(origin, data))  # pragma: no cover

    def _use(self, impl: Http1Parser | Http2Parser) -> None:
        self._impl = impl
        self._h1 = impl if isinstance(impl, Http1Parser) else None
        self._direct = impl.receive_data if isinstance(impl, Http2Parser) else None

    def receive_gap(self, origin: Origin, nbytes: int) -> list[Event]:
        if self.done or nbytes <= 0:
            return []
        if self._impl is None:
            # A gap before we know the protocol: drop what was held in that direction.
            self._held.pop(origin, None)
            return []
        return self._after(self._impl.receive_gap(origin, nbytes))

    def receive_skipped(self, origin: Origin, nbytes: int) -> list[Event]:
        if self.done or nbytes <= 0 or self._impl is None:
            return []
        return self._after(self._impl.receive_skipped(origin, nbytes))

    def receive_eof(self, origin: Origin) -> list[Event]:
        if self.done or self._impl is None:
            return []
        return self._after(self._impl.receive_eof(origin))

    def skip_hint(self, origin: Origin) -> int:
        if self._impl is None or self.done:
            return 0
        return self._impl.skip_hint(origin)

    def _after(self, events: list[Event]) -> list[Event]:
        for i, ev in enumerate(events):
            if not isinstance(ev, ProtocolSwitched):
                continue
            impl = self._impl
            if ev.protocol == "http2" and isinstance(impl, Http1Parser):
                leftover = impl.detach_leftover()
                # RFC 9113 3.1: the upgrade request is stream 1 of the HTTP/2 connection
                h2 = Http2Parser(upgraded_request=impl.last_request)
                self._use(h2)
                self.protocol = "http2"
                rest: list[Event] = []
                for origin, data in leftover.items():
                    if data:
                        rest += h2.receive_data(origin, data)
                return events[: i + 1] + self._after(rest) + events[i + 1 :]
            self.opaque = True
            self.done = True
            self._direct = self._h1 = None
            return events[: i + 1]
        return events
