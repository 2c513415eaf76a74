"""Sans-IO passive HTTP/2 parser: both directions of one connection in, messages out.

This is an observer, not an endpoint: it never answers, never enforces flow control, and
forgives what an endpoint would punish, as long as it can still tell where frames start.
Control frames (SETTINGS, RST_STREAM, GOAWAY) are parsed with hyperframe's frame classes;
the per-frame hot path (the 9-byte frame header, HEADERS/PUSH_PROMISE padding and
priority) is read by hand with ``struct``, because building a hyperframe object per
request costs a fifth of the parse time. Header blocks go through one ``hpack.Decoder``
per direction, whose table is driven by the tolerant, faster walker in ``_hpack``.

Theory of operation
-------------------
Each direction (``_Side``) is a small state machine over its byte stream:

``PREFACE``  client only, at the start: matching ``PRI * HTTP/2.0...``. A full match means
             we saw the connection from its first byte: the HPACK table is *complete*.
             The first byte that cannot be the preface sends the side to ``START``.
``START``    no preface: the first nine bytes must be a plausible frame header (we are
             attached mid-connection at a write boundary). Then ``FRAMES``; otherwise
             ``HUNT``. A server whose first frame is a (non-ACK) SETTINGS is at its start.
``FRAMES``   in step with the framing. Per frame header:
             * DATA (and frames we ignore: PING, PRIORITY, WINDOW_UPDATE, extensions) are
               *skipped*: a counter of payload bytes still to pass, never copied. For DATA
               this counter is ``skip_hint``, so the kernel may skip them too.
             * header-block frames (HEADERS, PUSH_PROMISE, CONTINUATION) are decoded as
               one frame when it arrived whole (the fast path); otherwise the fragment
               bytes are *streamed* into the block decoder as they arrive, so a 1 MiB
               block over CONTINUATIONs never sits in memory: the decoder keeps only an
               incomplete HPACK representation (bounded by ``max_buffer``).
             * SETTINGS, RST_STREAM, GOAWAY are buffered whole (bounded) and parsed.
             A frame header that breaks the rules (length over the receiver's
             SETTINGS_MAX_FRAME_SIZE, wrong fixed length, stream 0 where a stream is due)
             means we lost the framing: ``HUNT``.
``HUNT``     desynchronised (garbage, or ``receive_gap`` outside a DATA payload): bytes
             are held (bounded) and scanned for a frame header that is plausible AND
             followed by another plausible one (or ending exactly where the bytes end,
             since writes are usually whole frames). Then one ``Desynced`` event with all
             the bytes dropped, back to ``FRAMES``. The HPACK table of the direction is
             reset at the desync (we may have lost a HEADERS frame): from there on, as
             after attaching mid-connection, unknown dynamic indices are expected.
``EOF``      nothing more is read.

Messages. Each complete header block yields one ``MessageParsed``, except trailers (a
second block on a stream after the request / the final response) and PUSH_PROMISE blocks,
which are decoded only to keep the HPACK table in step. Pairing is by ``stream_id``:
stream ids are never reused in a connection, so the response to a request is the
server-origin, non-informational message with the same ``stream_id``.

``header_block_bytes`` is the DECODED header list size of RFC 9113 6.5.2 (name + value + 32
per field), the measure SETTINGS_MAX_HEADER_LIST_SIZE limits; a field whose dynamic-table
entry we do not know counts 32 plus what we know of it (a lower bound).

Errors never escape: each public method catches everything and reports a ``ParseFailed``
with a stable code (``CODE_*`` below) and drops the direction into ``HUNT``.
"""

from __future__ import annotations

import re
import struct
from enum import Enum

from hpack import Decoder
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import GoAwayFrame, RstStreamFrame, SettingsFrame

from hopwatch.protocols._events import (
    PROPAGATION_HEADERS,
    BodySkipped,
    Desynced,
    Event,
    MessageParsed,
    Origin,
    ParseFailed,
    StreamReset,
)
from hopwatch.protocols._hpack import TABLE_SIZE_CAP, BlockState, HpackMalformed, walk

__all__ = [
    "CODE_BAD_CONTINUATION",
    "CODE_BAD_FRAME",
    "CODE_BAD_PREFACE",
    "CODE_DATA_AFTER_EOF",
    "CODE_FRAME_TOO_LARGE",
    "CODE_GAP",
    "CODE_HEADER_BLOCK_TOO_LARGE",
    "CODE_HPACK_ERROR",
    "CODE_HPACK_PARTIAL",
    "CODE_HPACK_TABLE_SIZE",
    "CODE_INTERNAL",
    "CODE_NO_FRAME_BOUNDARY",
    "CODE_TRUNCATED",
    "PREFACE",
    "Http2Parser",
    "looks_like_http2",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Stable codes (ParseFailed.code / Desynced.reason); they may become metric labels.
CODE_BAD_FRAME = "http2.bad_frame"  # a frame breaking the framing rules: desync
CODE_BAD_PREFACE = "http2.bad_preface"  # the client started the preface, then broke it
CODE_NO_FRAME_BOUNDARY = "http2.no_frame_boundary"  # attached, first bytes not a frame
CODE_GAP = "http2.gap"  # receive_gap outside a DATA payload: framing lost
CODE_BAD_CONTINUATION = "http2.bad_continuation"  # CONTINUATION rules broken
CODE_HPACK_ERROR = "http2.hpack_error"  # block undecodable where the table was complete
CODE_HPACK_PARTIAL = "http2.hpack_partial"  # unknown indices, table known to be partial
CODE_HPACK_TABLE_SIZE = "http2.hpack_table_size"  # size update over SETTINGS limit
CODE_HEADER_BLOCK_TOO_LARGE = "http2.header_block_too_large"  # over max_buffer
CODE_FRAME_TOO_LARGE = "http2.frame_too_large"  # a control frame over max_buffer
CODE_TRUNCATED = "http2.truncated"  # EOF inside a frame or header block
CODE_DATA_AFTER_EOF = "http2.data_after_eof"
CODE_INTERNAL = "http2.internal_error"  # a bug: caught at the API boundary

DEFAULT_MAX_BUFFER = 128 * 1024
_DEFAULT_MAX_FRAME = 16_384
_MAX_FRAME_LIMIT = (1 << 24) - 1
_MAX_STREAMS = 4096  # streams remembered for pairing / trailer detection

_DATA = 0x0
_HEADERS = 0x1
_PRIORITY = 0x2
_RST_STREAM = 0x3
_SETTINGS = 0x4
_PUSH_PROMISE = 0x5
_PING = 0x6
_GOAWAY = 0x7
_WINDOW_UPDATE = 0x8
_CONTINUATION = 0x9

_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20

_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_MAX_FRAME_SIZE = 0x5

# Frame types whose payload we skip without looking (or, for DATA, count).
_SKIPPED_TYPES = frozenset({_DATA, _PRIORITY, _PING, _WINDOW_UPDATE})
# Defined flag bits per known type (used only to judge plausibility when sniffing/hunting).
_VALID_FLAGS = (0x09, 0x2D, 0x00, 0x00, 0x01, 0x0C, 0x01, 0x00, 0x00, 0x04)
_ON_STREAM_0 = frozenset({_SETTINGS, _PING, _GOAWAY})  # must be on stream 0
_ANY_STREAM = frozenset({_WINDOW_UPDATE})
_FIXED_LENGTH = {_PRIORITY: 5, _RST_STREAM: 4, _PING: 8, _WINDOW_UPDATE: 4}

_HEADER = struct.Struct(">HBBBL")
# A cheap prefilter for hunting: type 0..9, flags within the defined bits, R bit clear.
_CANDIDATE = re.compile(rb"(?=[\x00-\xff]{3}[\x00-\x09][\x00-\x2d][\x00-\x7f])", re.S)

_PROPAGATION_B = {name.encode("ascii"): name for name in PROPAGATION_HEADERS}
_TRACEPARENT_SHAPE = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_B3_SHAPE = re.compile(
    rb"(?:[0-9a-f]{32}|[0-9a-f]{16})-[0-9a-f]{16}(?:-[01d](?:-[0-9a-f]{16})?)?\Z"
)


def _decode_header(data: bytes | bytearray, pos: int) -> tuple[int, int, int, int]:
    hi, lo, ftype, flags, sid = _HEADER.unpack_from(data, pos)
    return (hi << 8) | lo, ftype, flags, sid


def _plausible(length: int, ftype: int, flags: int, sid: int, limit: int) -> bool:
    """Could these nine bytes be a frame header a real peer sent? (sniffing/hunting)"""
    if ftype > _CONTINUATION or length > limit or sid & 0x80000000:
        return False
    if flags & ~_VALID_FLAGS[ftype]:
        return False
    if ftype in _ON_STREAM_0:
        if sid != 0:
            return False
    elif sid == 0 and ftype not in _ANY_STREAM:
        return False
    fixed = _FIXED_LENGTH.get(ftype)
    if fixed is not None and length != fixed:
        return False
    if ftype == _SETTINGS:
        return length == 0 if flags & _ACK else length % 6 == 0
    if ftype == _GOAWAY:
        return length >= 8
    return True


def looks_like_http2(data: bytes) -> bool:
    """True for the client preface (or a prefix of it of 4+ bytes), or when ``data``
    starts with a plausible chain of HTTP/2 frame headers (a dispatcher attached
    mid-connection). Needs 9 bytes for the frame test; lengths over 16 KiB are refused."""
    if data.startswith(PREFACE) or (len(data) >= 4 and PREFACE.startswith(data)):
        return True
    pos = 0
    seen = 0
    end = len(data)
    while pos + 9 <= end:
        length, ftype, flags, sid = _decode_header(data, pos)
        if not _plausible(length, ftype, flags, sid, _DEFAULT_MAX_FRAME):
            return False
        seen += 1
        pos += 9 + length
    return seen > 0


class _Mode(Enum):
    PREFACE = 1
    START = 2
    FRAMES = 3
    HUNT = 4
    EOF = 5


_PREFIX_OF = 0x100  # ftype | _PREFIX_OF: the buffered prefix of a large, streamed frame
_COMPACT_AT = 64  # fields held per block before dropping the uninteresting ones
# field name -> what _finish does with it: a str (propagation header name) or an int code
_K_METHOD, _K_PATH, _K_AUTHORITY, _K_STATUS, _K_HOST, _K_SCHEME, _K_PROTOCOL = range(7)
_FIELD_KINDS: dict[bytes | None, str | int] = {
    b":scheme": _K_SCHEME,
    b":protocol": _K_PROTOCOL,
    b":method": _K_METHOD,
    b":path": _K_PATH,
    b":authority": _K_AUTHORITY,
    b":status": _K_STATUS,
    b"host": _K_HOST,
}
_FIELD_KINDS.update(_PROPAGATION_B.items())


class _Stream:
    __slots__ = ("client_done", "final_seen", "request_seen", "server_done")

    def __init__(self) -> None:
        self.request_seen = False
        self.final_seen = False
        self.client_done = False
        self.server_done = False


class _Block:
    """One header block being received (HEADERS/PUSH_PROMISE + CONTINUATIONs)."""

    __slots__ = (
        "broken",
        "complete_at_start",
        "end_stream",
        "frame_sid",
        "is_push",
        "overflow",
        "pending",
        "state",
        "stream_id",
    )

    def __init__(
        self, frame_sid: int, stream_id: int, end_stream: bool, is_push: bool, complete: bool
    ) -> None:
        self.frame_sid = frame_sid  # the stream its frames travel on (CONTINUATION check)
        self.stream_id = stream_id  # the stream it describes (the promised one for a push)
        self.end_stream = end_stream
        self.is_push = is_push
        self.complete_at_start = complete
        self.state = BlockState()
        self.pending = bytearray()  # an incomplete representation, awaiting more bytes
        self.broken: str | None = None  # why the rest of the block is not decoded
        self.overflow = False  # over max_buffer: part of it was not kept


class _Side:
    """The state of one direction."""

    __slots__ = (
        "block",
        "buf",
        "data_bytes",
        "decoder",
        "dropped",
        "end_headers",
        "frag_left",
        "frame",
        "frames",
        "hunt",
        "max_frame",
        "mode",
        "origin",
        "pad_left",
        "preface_pos",
        "reason",
        "skip_data",
        "skip_left",
        "stream_rest",
        "strict",
        "table_complete",
    )

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.mode = _Mode.PREFACE if origin is Origin.CLIENT else _Mode.START
        self.preface_pos = 0
        self.decoder = Decoder()
        self.table_complete = False  # the decoder saw every block since the first byte
        self.strict = False  # we saw the start: frame size limits are known
        self.max_frame = _DEFAULT_MAX_FRAME  # largest frame this side may send (SETTINGS)
        # a frame whose payload is being buffered: (length, type, flags, stream id)
        self.buf = bytearray()  # its bytes so far (or those of an incomplete frame header)
        self.frame: tuple[int, int, int, int] | None = None
        self.skip_left = 0  # payload bytes to pass unseen
        self.skip_data = False  # ... and they are DATA payload (skip_hint)
        self.frag_left = 0  # streamed header-block fragment bytes still to come
        self.pad_left = 0  # then padding to pass
        self.stream_rest = 0  # payload after the prefix of a large streamed frame
        self.end_headers = False  # the streamed frame ends its block
        self.block: _Block | None = None
        self.hunt = bytearray()  # HUNT: bytes held while looking for a frame boundary
        self.dropped = 0  # bytes thrown away in the current desync
        self.reason = ""  # what started the current desync
        self.data_bytes = 0
        self.frames = 0


class Http2Parser:
    """Passive HTTP/2 parser for ONE connection; see the module docstring."""

    def __init__(
        self,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        upgraded_request: MessageParsed | None = None,
    ) -> None:
        self.max_buffer = max(max_buffer, 1024)
        self._client = _Side(Origin.CLIENT)
        self._server = _Side(Origin.SERVER)
        self._streams: dict[int, _Stream] = {}
        if upgraded_request is not None:
            # RFC 9113 3.1 / RFC 7540 3.2: the upgrade request is stream 1, half-closed
            # for the client; its response comes as HEADERS on stream 1 after the 101.
            stream = self._stream(1)
            stream.request_seen = True
            stream.client_done = True

    # ---------------------------------------------------------------- public API

    def receive_data(self, origin: Origin, data: bytes) -> list[Event]:
        """Bytes ``origin`` wrote, in order."""
        events: list[Event] = []
        if not data:
            return events
        side = self._side(origin)
        try:
            if side.mode is _Mode.EOF:
                events.append(ParseFailed(origin, CODE_DATA_AFTER_EOF, f"{len(data)} B"))
            else:
                self._feed(side, bytes(data), events)
        except Exception as exc:  # the API boundary: nothing escapes
            self._crash(side, exc, events)
        return events

    def receive_gap(self, origin: Origin, nbytes: int) -> list[Event]:
        """``nbytes`` that ``origin`` wrote were lost (not seen, not skipped on purpose)."""
        events: list[Event] = []
        side = self._side(origin)
        try:
            if nbytes > 0 and side.mode is not _Mode.EOF:
                self._lose(side, nbytes, events)
        except Exception as exc:
            self._crash(side, exc, events)
        return events

    def receive_skipped(self, origin: Origin, nbytes: int) -> list[Event]:
        """The kernel passed ``nbytes`` without copying them, as ``skip_hint`` allowed.
        Beyond the DATA payload that was announced they count as a gap."""
        return self.receive_gap(origin, nbytes)

    def receive_eof(self, origin: Origin) -> list[Event]:
        """``origin`` will write no more."""
        events: list[Event] = []
        side = self._side(origin)
        try:
            self._eof(side, events)
        except Exception as exc:
            self._crash(side, exc, events)
        side.mode = _Mode.EOF
        return events

    def skip_hint(self, origin: Origin) -> int:
        """DATA payload bytes still to come in this direction (the kernel may skip them)."""
        side = self._side(origin)
        return side.skip_left if side.skip_data else 0

    def data_bytes(self, origin: Origin) -> int:
        """DATA payload bytes passed in this direction (read over, skipped or lost)."""
        return self._side(origin).data_bytes

    def frame_count(self, origin: Origin) -> int:
        """Frames read in this direction."""
        return self._side(origin).frames

    def _side(self, origin: Origin) -> _Side:
        # not a dict: hashing an Enum member runs Python code
        return self._client if origin is Origin.CLIENT else self._server

    # ---------------------------------------------------------------- byte stream

    def _feed(self, side: _Side, data: bytes, events: list[Event]) -> None:
        pos = 0
        end = len(data)
        origin = side.origin
        while pos < end:
            if side.skip_left:
                take = min(side.skip_left, end - pos)
                side.skip_left -= take
                pos += take
                if side.skip_data:
                    side.data_bytes += take
                    side.skip_data = side.skip_left > 0
                continue
            if side.frag_left:
                take = min(side.frag_left, end - pos)
                side.frag_left -= take
                self._fragment(side, data[pos : pos + take])
                pos += take
                if not side.frag_left:
                    self._streamed_frame_done(side, events)
                continue
            if side.pad_left:
                take = min(side.pad_left, end - pos)
                side.pad_left -= take
                pos += take
                continue
            mode = side.mode
            if mode is _Mode.FRAMES:
                if side.frame is not None:
                    pos = self._fill(side, data, pos, events)
                    continue
                buf = side.buf
                if buf or end - pos < 9:
                    take = min(9 - len(buf), end - pos)
                    buf += data[pos : pos + take]
                    pos += take
                    if len(buf) < 9:
                        continue
                    length, ftype, flags, sid = _decode_header(buf, 0)
                    held = bytes(buf)
                    buf.clear()
                else:
                    length, ftype, flags, sid = _decode_header(data, pos)
                    held = b""
                    pos += 9
                if not self._check(side, length, ftype, flags, sid):
                    if not held:
                        pos -= 9
                    self._desync(side, CODE_BAD_FRAME, held, events)
                    continue
                side.frames += 1
                sid &= 0x7FFFFFFF
                if not self._route(side, length, ftype, flags, sid, events):
                    continue
                if end - pos >= length:
                    # the whole payload is here: no buffering (the common case)
                    self._frame(side, ftype, flags, sid, data[pos : pos + length], events)
                    pos += length
                else:
                    side.frame = (length, ftype, flags, sid)
                continue
            if mode is _Mode.PREFACE:
                pos = self._preface(side, data, pos, events)
                continue
            if mode is _Mode.START:
                buf = side.buf
                take = min(9 - len(buf), end - pos)
                buf += data[pos : pos + take]
                pos += take
                if len(buf) < 9:
                    continue
                length, ftype, flags, sid = _decode_header(buf, 0)
                held = bytes(buf)
                buf.clear()
                if _plausible(length, ftype, flags, sid, _MAX_FRAME_LIMIT):
                    side.mode = _Mode.FRAMES
                    if origin is Origin.SERVER and ftype == _SETTINGS and not flags & _ACK:
                        # a server's first frame is SETTINGS: we are at its first byte
                        self._at_start(side)
                    data = held + data[pos:]
                    pos = 0
                    end = len(data)
                    continue
                self._desync(side, CODE_NO_FRAME_BOUNDARY, held, events)
                continue
            if mode is _Mode.HUNT:
                side.hunt += data[pos:]
                resumed = self._hunt(side, events)
                if resumed is None:
                    return
                data = resumed
                pos = 0
                end = len(data)
                continue
            return  # EOF

    def _at_start(self, side: _Side) -> None:
        side.table_complete = True
        side.strict = True

    def _preface(self, side: _Side, data: bytes, pos: int, events: list[Event]) -> int:
        want = PREFACE[side.preface_pos :]
        got = data[pos : pos + len(want)]
        if want.startswith(got):
            side.preface_pos += len(got)
            if side.preface_pos == len(PREFACE):
                side.mode = _Mode.FRAMES
                self._at_start(side)
            return pos + len(got)
        matched = side.preface_pos
        while got[: matched - side.preface_pos + 1] == want[: matched - side.preface_pos + 1]:
            matched += 1
        if matched == 0:
            side.mode = _Mode.START  # attached mid-connection
            return pos
        # the client began the preface and broke it: hunt, counting its bytes as dropped
        held = PREFACE[: side.preface_pos]
        side.preface_pos = 0
        self._desync(side, CODE_BAD_PREFACE, held, events)
        return pos

    def _fill(self, side: _Side, data: bytes, pos: int, events: list[Event]) -> int:
        """Buffer the payload of ``side.frame``; process it once complete."""
        assert side.frame is not None
        length, ftype, flags, sid = side.frame
        buf = side.buf
        take = min(length - len(buf), len(data) - pos)
        buf += data[pos : pos + take]
        pos += take
        if len(buf) == length:
            side.frame = None
            payload = bytes(buf)
            buf.clear()
            self._frame(side, ftype, flags, sid, payload, events)
        return pos

    def _check(self, side: _Side, length: int, ftype: int, flags: int, sid: int) -> bool:
        """Framing rules whose breach means we are not at a frame boundary."""
        if side.strict and length > side.max_frame:
            return False
        if ftype > _CONTINUATION:
            return True  # an extension frame: ignored
        sid &= 0x7FFFFFFF
        if ftype in _ON_STREAM_0:
            if sid:
                return False
        elif not sid and ftype not in _ANY_STREAM:
            return False
        fixed = _FIXED_LENGTH.get(ftype)
        if fixed is not None:
            return length == fixed
        if ftype == _SETTINGS:
            return length == 0 if flags & _ACK else length % 6 == 0
        if ftype == _GOAWAY:
            return length >= 8
        return True

    def _route(
        self, side: _Side, length: int, ftype: int, flags: int, sid: int, events: list[Event]
    ) -> bool:
        """A frame header was read. True: get the whole payload, then call ``_frame``.
        False: handled here (payload skipped, or streamed into the header block)."""
        if side.block is not None and ftype != _CONTINUATION:
            self._abandon_block(side, f"frame type {ftype} inside a header block", events)
        if ftype == _DATA:
            side.skip_left = length
            side.skip_data = length > 0
            if flags & _END_STREAM:
                self._end_stream(side.origin, sid)
            return False
        if ftype in (_HEADERS, _PUSH_PROMISE):
            if length <= self.max_buffer:
                return True
            # too large to hold: buffer only the small prefix, then stream the fragment
            prefix = (1 if flags & _PADDED else 0) + (
                (5 if flags & _PRIORITY_FLAG else 0) if ftype == _HEADERS else 4
            )
            side.stream_rest = length - prefix
            if prefix:
                side.frame = (prefix, ftype | _PREFIX_OF, flags, sid)
                return False
            self._prefix_done(side, ftype, flags, sid, b"", events)
            return False
        if ftype == _CONTINUATION:
            if not self._continuation(side, sid, events):
                side.skip_left = length
                return False
            if length <= self.max_buffer:
                return True
            side.end_headers = bool(flags & _END_HEADERS)
            side.frag_left = length
            return False
        if ftype in (_SETTINGS, _RST_STREAM, _GOAWAY):
            if length > self.max_buffer:
                events.append(
                    ParseFailed(side.origin, CODE_FRAME_TOO_LARGE, f"type {ftype}, {length} B")
                )
                side.skip_left = length
                return False
            return True
        # PRIORITY, PING, WINDOW_UPDATE, extension frames: nothing for us
        side.skip_left = length
        return False

    # ---------------------------------------------------------------- frames

    def _frame(
        self, side: _Side, ftype: int, flags: int, sid: int, payload: bytes, events: list[Event]
    ) -> None:
        """A whole frame payload (or the prefix of a streamed one) is here."""
        try:
            if ftype == _HEADERS:
                self._headers_frame(side, flags, sid, payload, events)
            elif ftype == _CONTINUATION:
                self._fragment(side, payload)
                if flags & _END_HEADERS:
                    self._finish(side, events)
            elif ftype == _SETTINGS:
                self._settings(side, flags, payload)
            elif ftype == _RST_STREAM:
                rst = RstStreamFrame(sid)
                rst.parse_body(memoryview(payload))
                self._streams.pop(sid, None)
                events.append(StreamReset(side.origin, (sid,), False, rst.error_code))
            elif ftype == _GOAWAY:
                goaway = GoAwayFrame(0)
                goaway.parse_body(memoryview(payload))
                last = goaway.last_stream_id & 0x7FFFFFFF
                # streams the GOAWAY's receiver opened that its sender will not process
                parity = 0 if side.origin is Origin.CLIENT else 1
                gone = tuple(s for s in self._streams if s > last and s % 2 == parity)
                for s in gone:
                    del self._streams[s]
                events.append(StreamReset(side.origin, gone, True, goaway.error_code))
            elif ftype == _PUSH_PROMISE:
                self._push_promise(side, flags, sid, payload, events)
            elif ftype & _PREFIX_OF:
                self._prefix_done(side, ftype & 0xFF, flags, sid, payload, events)
        except HyperframeError as exc:
            events.append(ParseFailed(side.origin, CODE_BAD_FRAME, f"type {ftype}: {exc}"))

    def _settings(self, side: _Side, flags: int, payload: bytes) -> None:
        frame = SettingsFrame(0)
        frame.parse_flags(flags)
        frame.parse_body(memoryview(payload))
        peer = self._side(side.origin.peer)
        for key, value in frame.settings.items():
            if key == _SETTINGS_HEADER_TABLE_SIZE:
                # it limits the encoder of the OTHER side, i.e. our decoder of its bytes
                peer.decoder.max_allowed_table_size = min(value, TABLE_SIZE_CAP)
            elif key == _SETTINGS_MAX_FRAME_SIZE:
                # observer leniency: never check against less than the largest ever allowed
                peer.max_frame = max(peer.max_frame, min(value, _MAX_FRAME_LIMIT))

    def _headers_frame(
        self, side: _Side, flags: int, sid: int, payload: bytes, events: list[Event]
    ) -> None:
        # The hot path: padding and priority by hand (what hyperframe's HeadersFrame does,
        # without building a frame object per request).
        start = 0
        stop = len(payload)
        if flags & _PADDED:
            stop -= payload[0] if payload else stop + 1
            start = 1
        if flags & _PRIORITY_FLAG:
            start += 5
        if stop < start:
            # bad padding: the fragment is lost, and with it the HPACK table
            events.append(ParseFailed(side.origin, CODE_BAD_FRAME, "HEADERS padding"))
            self._reset_table(side)
            return
        side.block = _Block(
            sid, sid, bool(flags & _END_STREAM), is_push=False, complete=side.table_complete
        )
        self._fragment(side, payload[start:stop] if start or stop != len(payload) else payload)
        if flags & _END_HEADERS:
            self._finish(side, events)

    def _push_promise(
        self, side: _Side, flags: int, sid: int, payload: bytes, events: list[Event]
    ) -> None:
        start = 1 if flags & _PADDED else 0
        pad = payload[0] if start and payload else 0
        if len(payload) < start + 4 or pad > len(payload) - start - 4:
            events.append(ParseFailed(side.origin, CODE_BAD_FRAME, "PUSH_PROMISE length"))
            self._reset_table(side)
            return
        promised = int.from_bytes(payload[start : start + 4], "big") & 0x7FFFFFFF
        side.block = _Block(sid, promised, False, is_push=True, complete=side.table_complete)
        self._fragment(side, payload[start + 4 : len(payload) - pad])
        if flags & _END_HEADERS:
            self._finish(side, events)

    def _prefix_done(
        self, side: _Side, ftype: int, flags: int, sid: int, prefix: bytes, events: list[Event]
    ) -> None:
        """The prefix of a large HEADERS/PUSH_PROMISE arrived: stream the fragment."""
        rest = side.stream_rest
        side.stream_rest = 0
        pad = prefix[0] if flags & _PADDED else 0
        if pad > rest:
            events.append(ParseFailed(side.origin, CODE_BAD_FRAME, "padding too long"))
            self._reset_table(side)
            side.skip_left = rest
            return
        if ftype == _HEADERS:
            end_stream = bool(flags & _END_STREAM)
            side.block = _Block(sid, sid, end_stream, False, side.table_complete)
        else:
            promised = int.from_bytes(prefix[-4:], "big") & 0x7FFFFFFF
            side.block = _Block(sid, promised, False, True, side.table_complete)
        side.end_headers = bool(flags & _END_HEADERS)
        side.frag_left = rest - pad
        side.pad_left = pad
        if not side.frag_left:
            self._streamed_frame_done(side, events)

    def _streamed_frame_done(self, side: _Side, events: list[Event]) -> None:
        if side.end_headers and side.block is not None:
            side.end_headers = False
            self._finish(side, events)

    def _continuation(self, side: _Side, sid: int, events: list[Event]) -> bool:
        block = side.block
        if block is None or sid != block.frame_sid:
            if block is not None:
                self._abandon_block(side, f"CONTINUATION on stream {sid}", events)
            else:
                events.append(
                    ParseFailed(side.origin, CODE_BAD_CONTINUATION, f"stray on stream {sid}")
                )
            # it carries a fragment we cannot place: the table may now be behind
            self._reset_table(side)
            return False
        return True

    def _abandon_block(self, side: _Side, why: str, events: list[Event]) -> None:
        """A header block that will never end: the message and the table are lost."""
        side.block = None
        side.frag_left = side.pad_left = 0
        side.end_headers = False
        events.append(ParseFailed(side.origin, CODE_BAD_CONTINUATION, why))
        self._reset_table(side)

    def _reset_table(self, side: _Side) -> None:
        """Forget the dynamic table: from here on it is a prefix of the encoder's (see
        ``_hpack``), and unknown indices are expected."""
        table = side.decoder.header_table
        limit = table.maxsize
        table.maxsize = 0  # the setter empties the table and its size count
        table.maxsize = limit
        side.table_complete = False

    # ---------------------------------------------------------------- header blocks

    def _fragment(self, side: _Side, fragment: bytes) -> None:
        """Decode what ``fragment`` completes of the current block."""
        block = side.block
        if block is None or block.broken is not None:
            return
        state = block.state
        try:
            pending = block.pending
            if pending:
                pending += fragment
                whole = bytes(pending)
                used = walk(side.decoder, whole, 0, len(whole), state)
                del pending[:used]
            else:
                used = walk(side.decoder, fragment, 0, len(fragment), state)
                if used < len(fragment):
                    pending += fragment[used:]
        except HpackMalformed as exc:
            block.broken = str(exc)
            block.pending.clear()
            self._reset_table(side)
            return
        if len(block.pending) > self.max_buffer:
            # one representation larger than we hold: the table cannot follow
            block.broken = f"a header field over {self.max_buffer} B"
            block.overflow = True
            block.pending.clear()
            self._reset_table(side)
        if len(state.fields) > _COMPACT_AT:
            self._compact(block)

    def _compact(self, block: _Block) -> None:
        """Keep only the fields a message needs, and at most max_buffer of their values."""
        kept: list[tuple[bytes | None, bytes]] = []
        budget = self.max_buffer
        for name, value in block.state.fields:
            if name is None or name in _FIELD_KINDS:
                budget -= len(value)
                if budget < 0:
                    block.overflow = True
                    continue
                kept.append((name, value))
        block.state.fields = kept

    def _finish(self, side: _Side, events: list[Event]) -> None:
        """END_HEADERS: the block is complete; emit what it means."""
        block = side.block
        assert block is not None
        side.block = None
        origin = side.origin
        state = block.state
        if block.pending:
            block.broken = "block ends inside a field"
            block.pending.clear()
            self._reset_table(side)
        if state.unresolved or state.reset:
            side.table_complete = False
        if block.broken is not None and not block.overflow:
            events.append(ParseFailed(origin, CODE_HPACK_ERROR, block.broken))
        elif state.unresolved:
            code = CODE_HPACK_ERROR if block.complete_at_start else CODE_HPACK_PARTIAL
            events.append(ParseFailed(origin, code, f"{state.unresolved} unknown table indices"))
        if state.size_update_over and block.complete_at_start:
            events.append(ParseFailed(origin, CODE_HPACK_TABLE_SIZE, "over SETTINGS limit"))
        if len(state.fields) > _COMPACT_AT or block.overflow:
            self._compact(block)
        if block.overflow:
            events.append(
                ParseFailed(origin, CODE_HEADER_BLOCK_TOO_LARGE, block.broken or "values")
            )

        pseudo: dict[int, bytes] = {}
        headers: list[tuple[str, str]] = []
        inferred: list[tuple[str, str]] = []
        kinds = _FIELD_KINDS
        for name, value in state.fields:
            kind = kinds.get(name)
            if kind is None:
                if name is None:
                    guess = _infer(value)
                    if guess is not None:
                        inferred.append((guess, value.decode("latin-1")))
            elif isinstance(kind, str):
                headers.append((kind, value.decode("latin-1")))
            else:
                pseudo.setdefault(kind, value)
        method = pseudo.get(_K_METHOD)
        path = pseudo.get(_K_PATH)
        authority = pseudo.get(_K_AUTHORITY)
        status_raw = pseudo.get(_K_STATUS)
        host = pseudo.pop(_K_HOST, None)
        has_pseudo = bool(pseudo)

        sid = block.stream_id
        if block.is_push:
            # a promised request: remember it for the pushed response; not a message
            promised = self._stream(sid)
            promised.request_seen = promised.client_done = True
            return
        stream = self._streams.get(sid)
        clean = not state.unresolved and block.broken is None
        if origin is Origin.CLIENT:
            trailers = stream is not None and stream.request_seen
        else:
            trailers = stream is not None and stream.final_seen
        if not trailers and not has_pseudo:
            # a block without pseudo-headers is trailers (attached: we missed the head);
            # when unsure, prefer a message if it carries something we care about
            trailers = clean or (block.end_stream and not headers and not inferred)
        if trailers:
            if block.end_stream:
                self._end_stream(origin, sid)
            return

        stream = self._stream(sid)
        status: int | None = None
        informational = False
        if origin is Origin.CLIENT:
            stream.request_seen = True
        else:
            if status_raw is not None and len(status_raw) == 3 and status_raw.isdigit():
                status = int(status_raw)
            informational = status is not None and 100 <= status < 200
            if not informational:
                stream.final_seen = True
        if authority is None:
            authority = host
        events.append(
            MessageParsed(  # positional: keywords would double the cost of building it
                origin,
                "http2",
                method.decode("latin-1") if method is not None else None,
                path.decode("latin-1") if path is not None else None,
                status,
                authority.decode("latin-1") if authority is not None else None,
                tuple(headers),
                tuple(inferred),
                state.size,
                None,  # body_bytes: DATA frames are skipped here
                sid,
                informational,
                block.end_stream,
                block.overflow or block.broken is not None,
            )
        )
        if block.end_stream:
            self._end_stream(origin, sid)

    # ---------------------------------------------------------------- streams

    def _stream(self, sid: int) -> _Stream:
        stream = self._streams.get(sid)
        if stream is None:
            if len(self._streams) >= _MAX_STREAMS:
                del self._streams[next(iter(self._streams))]  # the oldest
            stream = self._streams[sid] = _Stream()
        return stream

    def _end_stream(self, origin: Origin, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        if origin is Origin.CLIENT:
            stream.client_done = True
        else:
            stream.server_done = True
        if stream.client_done and stream.server_done:
            del self._streams[sid]

    # ---------------------------------------------------------------- losing the place

    def _desync(self, side: _Side, reason: str, held: bytes, events: list[Event]) -> None:
        """The framing is lost: hunt for the next frame boundary (see module docstring)."""
        if side.block is not None:
            side.block = None  # its message is lost; counted with the Desynced
        side.mode = _Mode.HUNT
        side.reason = side.reason or reason
        side.dropped += len(side.buf)
        side.buf.clear()
        side.frame = None
        side.skip_left = side.frag_left = side.pad_left = side.stream_rest = 0
        side.skip_data = side.end_headers = False
        side.hunt += held
        self._reset_table(side)

    def _hunt(self, side: _Side, events: list[Event]) -> bytes | None:
        """Find a frame boundary in ``side.hunt``: the bytes from there on, or None."""
        buf = side.hunt
        snapshot = bytes(buf)  # no buffer export may outlive a resize of side.hunt
        n = len(snapshot)
        limit = min(side.max_frame, _DEFAULT_MAX_FRAME)
        keep_from = max(0, n - 8)  # a header may straddle the end
        for match in _CANDIDATE.finditer(snapshot):
            i = match.start()
            if i + 9 > n:
                break
            length, ftype, flags, sid = _decode_header(snapshot, i)
            if ftype == _CONTINUATION or not _plausible(length, ftype, flags, sid, limit):
                continue
            j = i + 9 + length
            if j + 9 <= n:
                nlen, ntype, nflags, nsid = _decode_header(snapshot, j)
                if not _plausible(nlen, ntype, nflags, nsid, _MAX_FRAME_LIMIT):
                    continue
            elif j != n:
                keep_from = i  # cannot tell yet: wait for more bytes
                break
            side.dropped += i
            events.append(Desynced(side.origin, side.reason, side.dropped))
            side.dropped = 0
            side.reason = ""
            rest = snapshot[i:]
            buf.clear()
            side.mode = _Mode.FRAMES
            return rest
        side.dropped += keep_from
        del buf[:keep_from]
        return None

    def _lose(self, side: _Side, nbytes: int, events: list[Event]) -> None:
        """``nbytes`` of ``side`` will never be seen (gap, or skipped by the kernel)."""
        origin = side.origin
        if side.skip_left:
            take = min(side.skip_left, nbytes)
            side.skip_left -= take
            nbytes -= take
            if side.skip_data:
                side.data_bytes += take
                side.skip_data = side.skip_left > 0
                events.append(BodySkipped(origin, take))
        if nbytes and side.frag_left:
            # inside a streamed header fragment: the framing holds, the block is lost
            take = min(side.frag_left, nbytes)
            side.frag_left -= take
            nbytes -= take
            if side.block is not None and side.block.broken is None:
                side.block.broken = "bytes lost inside the header block"
                side.block.pending.clear()
                self._reset_table(side)
            events.append(ParseFailed(origin, CODE_GAP, "inside a header block"))
            if not side.frag_left:
                self._streamed_frame_done(side, events)
        if nbytes and side.pad_left:
            take = min(side.pad_left, nbytes)
            side.pad_left -= take
            nbytes -= take
        if nbytes and side.frame is not None and side.mode is _Mode.FRAMES:
            length, ftype, _flags, _sid = side.frame
            missing = length - len(side.buf)
            if nbytes <= missing:
                # inside a buffered frame: the framing holds, the frame is lost
                side.frame = None
                side.buf.clear()
                side.skip_left = missing - nbytes
                if ftype & _PREFIX_OF:
                    side.skip_left += side.stream_rest
                    side.stream_rest = 0
                nbytes = 0
                events.append(ParseFailed(origin, CODE_GAP, f"inside a frame of type {ftype}"))
                if ftype & 0xFF in (_HEADERS, _CONTINUATION, _PUSH_PROMISE):
                    if side.block is not None:
                        side.block = None
                    self._reset_table(side)
        if not nbytes:
            return
        if side.mode is _Mode.HUNT:
            side.dropped += nbytes + len(side.hunt)
            side.hunt.clear()
            return
        side.dropped += nbytes
        self._desync(side, CODE_GAP, b"", events)

    def _eof(self, side: _Side, events: list[Event]) -> None:
        origin = side.origin
        if side.mode is _Mode.EOF:
            return
        if side.mode is _Mode.HUNT:
            side.dropped += len(side.hunt)
            side.hunt.clear()
            events.append(Desynced(origin, side.reason, side.dropped))
            side.dropped = 0
            return
        partial = []
        if side.buf or side.frame is not None:
            partial.append("frame")
        if side.skip_left or side.frag_left or side.pad_left:
            partial.append("frame payload")
        if side.block is not None:
            partial.append("header block")
        if 0 < side.preface_pos < len(PREFACE):
            partial.append("preface")
        if partial:
            events.append(ParseFailed(origin, CODE_TRUNCATED, "EOF inside a " + ", ".join(partial)))

    def _crash(self, side: _Side, exc: Exception, events: list[Event]) -> None:
        """A bug met input it did not expect: report it and resynchronise."""
        events.append(ParseFailed(side.origin, CODE_INTERNAL, f"{type(exc).__name__}: {exc}"))
        if side.mode is not _Mode.EOF:
            side.hunt.clear()
            side.block = None
            self._desync(side, CODE_INTERNAL, b"", events)


def _infer(value: bytes) -> str | None:
    """Guess the name of a field whose name we could not decode, from its value."""
    if len(value) >= 55 and _TRACEPARENT_SHAPE.match(value):
        return "traceparent"
    if 33 <= len(value) <= 68 and _B3_SHAPE.match(value):
        return "b3"
    return None
