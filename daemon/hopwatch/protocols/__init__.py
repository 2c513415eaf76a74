"""Sans-IO HTTP/1.1 and HTTP/2 stream parsers for a passive observer."""

from __future__ import annotations

from hopwatch.protocols._connection import SNIFF_BYTES, ConnectionParser
from hopwatch.protocols._events import (
    PROPAGATION_HEADERS,
    BodySkipped,
    Desynced,
    Event,
    MessageParsed,
    Origin,
    ParseFailed,
    ProtocolSwitched,
    StreamReset,
)
from hopwatch.protocols.http1 import Http1Parser
from hopwatch.protocols.http2 import Http2Parser, looks_like_http2

__all__ = [
    "PROPAGATION_HEADERS",
    "SNIFF_BYTES",
    "BodySkipped",
    "ConnectionParser",
    "Desynced",
    "Event",
    "Http1Parser",
    "Http2Parser",
    "MessageParsed",
    "Origin",
    "ParseFailed",
    "ProtocolSwitched",
    "StreamReset",
    "looks_like_http2",
]
