"""Events the sans-IO stream parsers emit.

A parser is fed the bytes of ONE connection, each chunk tagged with the side that sent it
(`Origin.CLIENT` for the bytes the client wrote, `Origin.SERVER` for the server's). It never
does IO. Events are immutable, named in the past tense (h2 habit): frozen dataclasses,
except `MessageParsed` (see its docstring).

Who is "inbound" or "outbound" is not the parser's business: the capture layer knows
which end of the connection the observed process is, and maps `origin` to a direction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, Union

from .._compat import SLOTS

__all__ = [
    "PROPAGATION_HEADERS",
    "BodySkipped",
    "Desynced",
    "Event",
    "MessageParsed",
    "Origin",
    "ParseFailed",
    "ProtocolSwitched",
    "StreamReset",
]

#: Header names (lowercase) the parsers keep with their raw values; every other header is
#: only counted into ``header_block_bytes``.
PROPAGATION_HEADERS: frozenset[str] = frozenset(
    {
        "traceparent",
        "tracestate",
        "baggage",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "uber-trace-id",
        "x-amzn-trace-id",
        "traceresponse",
    }
)


class Origin(enum.Enum):
    """Which end of the connection sent the bytes."""

    CLIENT = "client"
    SERVER = "server"

    @property
    def peer(self) -> Origin:
        return Origin.SERVER if self is Origin.CLIENT else Origin.CLIENT


class MessageParsed(NamedTuple):
    """One request or response head, fully parsed.

    ``headers`` holds only the propagation headers (see ``PROPAGATION_HEADERS``), lowercase
    names, raw values (HTTP/1 values with surrounding whitespace stripped as RFC 9110 says),
    in wire order; a header repeated on several lines appears several times.
    ``inferred_headers`` holds (name, value) pairs whose NAME could not be decoded (HTTP/2
    attached mid-connection: unknown dynamic-table index) but whose value has the shape of
    a propagation header; the name is the guess.
    ``body_bytes`` is how many body bytes follow on the wire for HTTP/1 (``None`` when
    unknown until the end: chunked or read-until-close); for HTTP/2 always ``None`` (DATA
    frames are skipped by the parser itself).

    The one event built per message, so it is a ``NamedTuple`` rather than a frozen
    dataclass: just as immutable, but built in a fifth of the time (a frozen slots
    dataclass sets each of its 14 fields through ``object.__setattr__``; see
    docs/parser-performance.md). Equality and hashing are those of an event (a
    ``MessageParsed`` never equals a plain tuple); do not rely on it being a tuple.
    """

    origin: Origin
    protocol: str  # "http1" | "http2"
    method: str | None = None  # requests only
    path: str | None = None  # request-target or :path
    status: int | None = None  # responses only
    authority: str | None = None  # Host or :authority
    headers: tuple[tuple[str, str], ...] = ()
    inferred_headers: tuple[tuple[str, str], ...] = ()
    header_block_bytes: int = 0
    body_bytes: int | None = None
    stream_id: int | None = None  # HTTP/2 stream; HTTP/1: None
    informational: bool = False  # a 1xx response (not the final answer)
    end_stream: bool = False  # HTTP/2: the HEADERS frame closed the stream
    #: Some propagation header was cut to the parser's value cap, or dropped because the
    #: message's kept headers exceeded the parser's budget: ``headers`` is incomplete.
    truncated: bool = False

    @property
    def is_request(self) -> bool:
        return self.origin is Origin.CLIENT

    @property
    def kind(self) -> str:
        return "request" if self.origin is Origin.CLIENT else "response"

    # Value semantics of an event, as the dataclass had them: equal only to another
    # MessageParsed with equal fields, never to a bare tuple; no ordering.
    def __eq__(self, other: object) -> bool:
        if type(other) is MessageParsed:
            return tuple.__eq__(self, other)
        return False if isinstance(other, tuple) else NotImplemented

    def __ne__(self, other: object) -> bool:
        if type(other) is MessageParsed:
            return tuple.__ne__(self, other)
        return True if isinstance(other, tuple) else NotImplemented

    def __hash__(self) -> int:
        return tuple.__hash__(self)


@dataclass(frozen=True, **SLOTS)
class ParseFailed:
    """Bytes that could not be parsed. ``code`` is stable and may become a metric label."""

    origin: Origin
    code: str
    detail: str = ""


@dataclass(frozen=True, **SLOTS)
class Desynced:
    """The parser lost its place in a direction (gap, garbage, HPACK failure) and
    ``dropped`` bytes were thrown away before it found the next message boundary
    (or gave up the direction)."""

    origin: Origin
    reason: str
    dropped: int = 0


@dataclass(frozen=True, **SLOTS)
class BodySkipped:
    """Body bytes consumed without parsing (informational; lets a caller account bytes)."""

    origin: Origin
    length: int


@dataclass(frozen=True, **SLOTS)
class ProtocolSwitched:
    """The connection changed protocol (HTTP/1.1 ``Upgrade: h2c`` answered 101)."""

    protocol: str


@dataclass(frozen=True, **SLOTS)
class StreamReset:
    """HTTP/2 RST_STREAM or GOAWAY: requests on these streams will get no response."""

    origin: Origin
    stream_ids: tuple[int, ...] = field(default_factory=tuple)
    goaway: bool = False
    error_code: int = 0


Event = Union[MessageParsed, ParseFailed, Desynced, BodySkipped, ProtocolSwitched, StreamReset]
