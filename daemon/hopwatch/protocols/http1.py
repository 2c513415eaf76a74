"""Passive, sans-IO HTTP/1.x parser for ONE observed TCP connection.

Theory of operation
-------------------
The parser watches a connection it does not take part in. It is fed both directions,
each chunk tagged with the side that wrote it (`Origin.CLIENT` bytes are requests,
`Origin.SERVER` bytes are responses), and it must never raise, never grow without bound,
and never stop for good because of bytes it did not like: real traffic is lossy (the
kernel caps copies, ring buffers drop events) and the parser was not there to negotiate it.

Each direction is a small state machine (`_Side`):

``IDLE``        between messages; leading empty lines are skipped (RFC 9112 2.2).
                The whole head is usually in one chunk: it is found with two
                ``bytes.find`` calls (``\\n\\r\\n`` / ``\\n\\n``: LF-only peers are
                tolerated) and parsed in one go (the *block* path).
``HEAD``        a head bigger than ``max_buffer``: parsed line by line as it streams
                (the *streaming* path); a line longer than ``max_buffer`` is consumed
                piecewise, keeping at most ``max_value + 1`` bytes of a value we want.
``BODY``        Content-Length body, ``remaining`` bytes to go.
``CHUNK_SIZE``, ``CHUNK_DATA``, ``CHUNK_END``, ``TRAILER``: chunked transfer coding.
``UNTIL_EOF``   a response delimited by the connection close.
``HUNT``        lost place (gap, garbage): bytes are dropped up to the next line that
                starts like a message (a known method and a space, or ``HTTP/1.``) and
                whose whole start line is valid; then one `Desynced` reports the episode
                with every byte thrown away (lost in a gap, buffered, or skipped over).
``WAIT``        the client sent ``CONNECT`` or an ``Upgrade`` request: its next bytes
                may be another protocol, so they are held (bounded) until the response
                says whether the connection switched.
``SWITCHED``    101 / CONNECT 2xx / HTTP/2 preface: nothing more is parsed; the bytes
                not consumed wait for `Http1Parser.detach_leftover`.

The two paths over a head give the same messages for the same bytes however they are
split (a property test drives both): every rule is defined on whole lines, and the
streaming path only ever applies it to pieces in a way that adds up to the same result.

Rules on a head (a tolerant reader: what real peers send, plus what a strict endpoint
would still have had to answer):

* a line ends at LF; one CR before it is dropped; the head ends at the first empty line;
* request line ``method SP+ target SP+ HTTP/1.d``, status line ``HTTP/1.d SP+ ddd [reason]``;
  anything else is ``http1.bad_start_line`` (a start line over ``max_buffer`` bytes:
  ``http1.start_line_too_large``), and the direction hunts;
* a header line is ``name ":" value``; the name is matched exactly, case-insensitively
  (whitespace before the colon makes it an unknown name); the value has SP, HTAB and CR
  stripped at both ends; a line without a colon is ignored; a line starting with SP or
  HTAB continues the previous header (obs-fold, joined with one SP);
* only propagation headers (see `PROPAGATION_HEADERS`) and the framing headers
  (Host, Content-Length, Transfer-Encoding, Upgrade) are decoded at all. A value longer
  than ``max_value`` is cut to it; a message keeps at most ``max_buffer`` bytes of
  propagation values; either sets ``MessageParsed.truncated``.

Responses are paired with the queued request methods (pipelining), so a response to
HEAD, a 1xx/204/304 has no body, and a 2xx to CONNECT opens a tunnel.

Events besides `MessageParsed`: `ParseFailed` at once for each error (stable ``code``);
`Desynced` once per lost-place episode, when the next message start is found or at EOF,
with every byte thrown away; `BodySkipped` only for body bytes accounted without being
seen (`receive_gap` / `receive_skipped` inside a body); `ProtocolSwitched` last.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Union

from hopwatch.protocols._events import (
    PROPAGATION_HEADERS,
    BodySkipped,
    Desynced,
    Event,
    MessageParsed,
    Origin,
    ParseFailed,
    ProtocolSwitched,
)

__all__ = ["Http1Parser"]

_Data = Union[bytes, bytearray]

# Direction states (plain ints: compared on every chunk).
_IDLE = 0
_HEAD = 1
_BODY = 2
_CHUNK_SIZE = 3
_CHUNK_DATA = 4
_CHUNK_END = 5
_TRAILER = 6
_UNTIL_EOF = 7
_HUNT = 8
_WAIT = 9
_SWITCHED = 10

_MIN_BUFFER = 64
_MAX_PENDING = 1024  # queued request methods awaiting a response (pipelining depth)
_OWS = b" \t\r"
_PREFACE_LINE = b"PRI * HTTP/2.0"

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN_RUN = re.compile(_TCHAR + rb"{0,33}")
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"{1,32}) +([^\x00-\x20\x7f]+) +HTTP/1\.([0-9])\r?")
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) +([1-9][0-9][0-9])(?:[ \t][^\r\n]*)?\r?")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?")

# Methods a resynchronising request direction accepts as a message start.
_KNOWN_METHODS = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
    b"PATCH", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK",
    b"REPORT", b"SEARCH", b"QUERY", b"PURGE", b"MKCALENDAR",
)  # fmt: skip
_METHOD_STARTS = tuple(m + b" " for m in _KNOWN_METHODS)
_METHOD_START_MAX = max(len(m) for m in _METHOD_STARTS)
_KNOWN_METHOD_START = re.compile(rb"(?:" + b"|".join(_KNOWN_METHODS) + rb") ")
_REQUEST_HUNT = re.compile(rb"\n(?=(?:" + b"|".join(_KNOWN_METHODS) + rb") )")
_RESPONSE_HUNT = re.compile(rb"\nHTTP/1\.")
_METHOD_NAMES = {m: m.decode("ascii") for m in _KNOWN_METHODS}
# Hot path (`Http1Parser._fast_head`): the ordinary heads, a subset of the general rules.
_FAST_REQUEST = re.compile(
    rb"(GET|POST|PUT|DELETE|HEAD|PATCH|OPTIONS) ([!-~\x80-\xff]+) HTTP/1\.[0-9]\r\n"
)
_FAST_STATUS = re.compile(rb"HTTP/1\.[0-9] ([2-9][0-9][0-9])(?:[ \t][^\r\n]*)?\r\n")

_HOST = "host"
_CONTENT_LENGTH = "content-length"
_TRANSFER_ENCODING = "transfer-encoding"
_UPGRADE = "upgrade"
_FRAMING = (_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _UPGRADE)
_NAME_MAX = max(len(n) for n in (*PROPAGATION_HEADERS, *_FRAMING))


def _header_keys() -> dict[bytes, str]:
    """Header name (as sent) -> key ("" for a name we do not need).

    Exact spellings real peers use are looked up first; any other spelling of a short
    name is lowercased and looked up again. Mapping common names we ignore to "" saves
    lowercasing them on every message.
    """
    keys: dict[bytes, str] = {}
    for name in (*PROPAGATION_HEADERS, *_FRAMING):
        raw = name.encode("ascii")
        title = b"-".join(part.capitalize() for part in raw.split(b"-"))
        for spelling in (raw, title, raw.upper()):
            keys[spelling] = name
    for spelling in (b"X-B3-TraceId", b"X-B3-SpanId", b"X-B3-ParentSpanId", b"TraceParent"):
        keys[spelling] = spelling.decode("ascii").lower()
    ignored = (
        "accept", "accept-encoding", "accept-language", "accept-ranges", "age",
        "authorization", "cache-control", "connection", "content-encoding",
        "content-type", "cookie", "date", "etag", "expect", "expires", "if-modified-since",
        "if-none-match", "keep-alive", "last-modified", "location", "origin", "pragma",
        "referer", "server", "set-cookie", "user-agent", "vary", "via", "x-forwarded-for",
        "x-forwarded-proto", "x-real-ip", "x-request-id", "http2-settings",
        "strict-transport-security", "content-range", "range", "x-powered-by",
    )  # fmt: skip
    for name in ignored:
        raw = name.encode("ascii")
        keys[raw] = ""
        keys[b"-".join(part.capitalize() for part in raw.split(b"-"))] = ""
    keys[b"User-agent"] = ""
    keys[b"ETag"] = ""
    keys[b"HTTP2-Settings"] = ""
    return keys


def _trie(words: list[bytes]) -> bytes:
    """A regex alternation matching exactly ``words`` (distinct, non-empty), factored by
    common prefixes.

    sre tries every branch of an alternation at every line start; factored, a line whose
    name starts with a letter no wanted name starts with is rejected after one test per
    first letter instead of one per name (a third of the header search in `_fast_head`)."""
    groups: dict[bytes, list[bytes]] = {}
    for w in sorted(words):
        groups.setdefault(w[:1], []).append(w[1:])
    alts: list[bytes] = []
    for first, rests in groups.items():
        common = min(rests)
        top = max(rests)
        while not top.startswith(common):  # the common prefix of the sorted rests
            common = common[:-1]
        rests = [r[len(common) :] for r in rests]
        nonempty = [r for r in rests if r]
        alt = re.escape(first + common)
        if nonempty:
            alt += b"(?:" + _trie(nonempty) + b")" + (b"?" if len(nonempty) < len(rests) else b"")
        alts.append(alt)
    return b"|".join(alts)


_KEYS = _header_keys()
_FAST_NAMES = sorted(n.encode("ascii") for n in (*PROPAGATION_HEADERS, *_FRAMING))
# Every line start of the head is visited: a wanted header gives (name, value, b""); an
# obs-fold line or an empty line (an LF-only head end) gives (b"", b"", the odd byte),
# which leaves the head to the general rules.
_FAST_HEADER = re.compile(rb"\n(?:(?i:(" + _trie(_FAST_NAMES) + rb")):([^\n]*)|([ \t\n]))")


def _lookup(name: bytes) -> str:
    """The key of a header name, "" when the parser does not need that header."""
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS.get(name.lower(), "") if len(name) <= _NAME_MAX else ""
    return key


def _upgrade_protocol(values: Sequence[bytes]) -> str | None:
    """First protocol named by Upgrade header lines, lowercased; h2c is reported as http2."""
    for value in values:
        for token in value.split(b","):
            token = token.strip(_OWS).lower()
            if token:
                name = token.decode("latin-1")
                return "http2" if name in ("h2c", "h2") else name
    return None


class _Side:
    """State of one direction."""

    __slots__ = (
        "after_body",
        "at_line_start",
        "body_run",
        "buf",
        "dropped",
        "h_bytes",
        "h_cl",
        "h_host",
        "h_kept",
        "h_size",
        "h_start",
        "h_te",
        "h_trunc",
        "h_up",
        "is_client",
        "l_cont",
        "l_key",
        "l_lost",
        "l_mode",
        "l_val",
        "origin",
        "p_key",
        "p_trunc",
        "p_val",
        "reason",
        "remaining",
        "scan",
        "state",
        "trailer_mid",
    )

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.is_client = origin is Origin.CLIENT
        self.buf = bytearray()
        self.state = _IDLE
        self.after_body = _IDLE  # state once the current body ends (WAIT after CONNECT)
        self.remaining = 0  # body / chunk bytes still to come
        self.body_run = 0  # body bytes consumed and not yet reported in a BodySkipped
        self.scan = 0  # IDLE: head-end search resumes here (relative to the buffer start)
        self.trailer_mid = False  # TRAILER: inside a line too long to buffer
        # HUNT
        self.reason = ""
        self.dropped = 0
        self.at_line_start = False
        # The head being parsed.
        self.h_start: tuple[str, str, int] | None = None  # (method, target, status)
        self.h_bytes = 0
        # Empty tuples until a header is stored (`_store` makes the list): a connection
        # whose heads all take the fast path never allocates them (100k connections).
        self.h_kept: list[tuple[str, str]] | tuple[()] = ()
        self.h_size = 0
        self.h_trunc = False
        self.h_host: bytes | None = None
        self.h_cl: list[bytes] | tuple[()] = ()
        self.h_te: list[bytes] | tuple[()] = ()
        self.h_up: list[bytes] | tuple[()] = ()
        # Pending header (its value may still be continued by obs-fold lines).
        self.p_key = ""
        self.p_val = b""
        self.p_trunc = False
        # A line longer than max_buffer, consumed piecewise.
        self.l_mode = False
        self.l_cont = False
        self.l_key = ""
        self.l_val = bytearray()
        self.l_lost = False

    def reset_head(self) -> None:
        self.h_start = None
        self.h_bytes = 0
        self.h_kept = ()
        self.h_size = 0
        self.h_trunc = False
        self.h_host = None
        self.h_cl = ()
        self.h_te = ()
        self.h_up = ()
        self.p_key = ""
        self.p_val = b""
        self.p_trunc = False
        self.l_mode = False


def _side_at_rest(side: _Side) -> bool:
    # IDLE: no head, body or resync in progress (the head fields are reset when one starts).
    return side.state == _IDLE and not side.buf and side.body_run == 0 and side.scan == 0


class Http1Parser:
    """Passive HTTP/1.x observer of one connection (both directions). Never raises.

    ``max_buffer`` bounds the bytes held per direction (and the propagation-header bytes
    kept per message); ``max_value`` caps one kept header value.
    """

    __slots__ = ("_client", "_last_request", "_max_buffer", "_max_value", "_pending", "_server")

    def __init__(self, *, max_buffer: int = 65536, max_value: int = 16384) -> None:
        self._max_buffer = max(int(max_buffer), _MIN_BUFFER)
        self._max_value = max(int(max_value), 1)
        self._client = _Side(Origin.CLIENT)
        self._server = _Side(Origin.SERVER)
        # Requests waiting for their final response: (method, upgrade protocol or None).
        # A list, not a deque: one connection holds at most a few (a deque costs ~760 B
        # even when empty, and 100k connections each have a parser).
        self._pending: list[tuple[str, str | None]] = []
        self._last_request: MessageParsed | None = None  # the last one asking to upgrade

    # ------------------------------------------------------------------ public API

    def receive_data(self, origin: Origin, data: bytes) -> list[Event]:
        """Bytes written by ``origin``; returns what they completed."""
        out: list[Event] = []
        side = self._client if origin is Origin.CLIENT else self._server
        try:
            if side.state == _IDLE and not side.buf and type(data) is bytes:
                pos = self._fast_head(side, data, out)  # one write, one head: the usual
                if pos == len(data):
                    return out
                pos = self._run(side, data, pos, out)
                if pos < len(data):
                    side.buf = bytearray(data[pos:])
            elif data:
                self._feed(side, data, out)
        except Exception as exc:  # the API boundary: nothing escapes
            self._crash(side, exc, out)
        return out

    def receive_gap(self, origin: Origin, nbytes: int) -> list[Event]:
        """``nbytes`` written by ``origin`` were lost (never seen)."""
        out: list[Event] = []
        side = self._client if origin is Origin.CLIENT else self._server
        try:
            if nbytes > 0:
                self._lost(side, nbytes, "gap", out)
                self._flush_body(side, out)
        except Exception as exc:
            self._crash(side, exc, out)
        return out

    def receive_skipped(self, origin: Origin, nbytes: int) -> list[Event]:
        """``nbytes`` were not copied because `skip_hint` said they are body bytes."""
        out: list[Event] = []
        side = self._client if origin is Origin.CLIENT else self._server
        try:
            if nbytes > 0:
                self._lost(side, nbytes, "skip_outside_body", out)
                self._flush_body(side, out)
        except Exception as exc:
            self._crash(side, exc, out)
        return out

    def receive_eof(self, origin: Origin) -> list[Event]:
        """``origin`` closed its side: a read-until-close body ends, a partial head fails."""
        out: list[Event] = []
        side = self._client if origin is Origin.CLIENT else self._server
        try:
            self._eof(side, out)
        except Exception as exc:
            self._crash(side, exc, out)
        return out

    def skip_hint(self, origin: Origin) -> int:
        """How many of the next bytes from ``origin`` are body bytes the parser does not
        need (rest of a Content-Length body or of the current chunk); 0 when unknown."""
        side = self._client if origin is Origin.CLIENT else self._server
        if side.state == _BODY or side.state == _CHUNK_DATA:
            return side.remaining
        return 0

    def detach_leftover(self) -> dict[Origin, bytes]:
        """The bytes not consumed per direction (after `ProtocolSwitched`: the first bytes
        of the new protocol). They are handed over, not kept."""
        out: dict[Origin, bytes] = {}
        for side in (self._client, self._server):
            out[side.origin] = bytes(side.buf)
            side.buf = bytearray()
        return out

    @property
    def last_request(self) -> MessageParsed | None:
        """The last request head that asked to upgrade (after an h2c upgrade: HTTP/2
        stream 1). Others are not kept: a parser lives as long as its connection."""
        return self._last_request

    @property
    def at_rest(self) -> bool:
        """Between messages with nothing held: a new parser would carry on the same (an
        idle keep-alive connection can give this one up and take a new one later)."""
        return (
            not self._pending
            and self._last_request is None
            and _side_at_rest(self._client)
            and _side_at_rest(self._server)
        )

    @property
    def switched(self) -> bool:
        """The connection left HTTP/1 (101, CONNECT tunnel or HTTP/2 preface)."""
        return self._client.state == _SWITCHED

    # ------------------------------------------------------------------ driving

    def _feed(self, side: _Side, data: _Data, out: list[Event]) -> None:
        buf = side.buf
        state = side.state
        if state == _SWITCHED:
            # Held for detach_leftover, bounded: a caller detaches right after the switch.
            room = self._max_buffer - len(buf)
            if room > 0:
                buf += data[:room]
            return
        if buf:
            buf += data
            pos = self._run(side, buf, 0, out)
            if pos:
                del side.buf[:pos]
            return
        pos = 0
        if state == _IDLE and type(data) is bytes:
            pos = self._fast_head(side, data, out)
            if pos == len(data):
                return
        pos = self._run(side, data, pos, out)
        if pos < len(data):
            side.buf = bytearray(data[pos:]) if pos else bytearray(data)

    def _fast_head(self, side: _Side, data: bytes, out: list[Event]) -> int:
        """The hot path: a chunk that starts with a whole, ordinary head (CRLF lines, a
        common method or a final status, no obs-fold, no Transfer-Encoding or Upgrade,
        short values). Returns the end of the head (and of its body too, when the body is
        all in the chunk), or 0 to leave the chunk to the general path (having changed
        nothing). Gives exactly what `_idle` (and `_run` over the body) would."""
        i = data.find(b"\n\r\n")
        if i < 0:
            return 0
        end = i + 3
        is_client = side.is_client
        m = (_FAST_REQUEST if is_client else _FAST_STATUS).match(data)
        if m is None:
            return 0
        s = m.end() - 1
        if s > self._max_buffer:  # over the bound
            return 0
        kept: list[tuple[str, str]] = []
        size = 0
        cap = self._max_value
        host = cl = None
        for name, raw, odd in _FAST_HEADER.findall(data, s, end):
            if odd:  # obs-fold, or the head ended earlier at an LF-only empty line
                return 0
            key = _KEYS.get(name) or _KEYS[name.lower()]
            value = raw.strip(_OWS)
            if len(value) > cap:
                return 0
            if key in PROPAGATION_HEADERS:
                size += len(value)
                if size > self._max_buffer:
                    return 0
                kept.append((key, value.decode("latin-1")))
            elif key == _HOST:
                if host is None:
                    host = value
            elif key == _CONTENT_LENGTH and cl is None and value.isdigit() and len(value) <= 18:
                cl = value
            else:  # Transfer-Encoding, Upgrade, several or odd Content-Length
                return 0
        pending = self._pending
        if is_client:
            if len(pending) >= _MAX_PENDING:
                return 0
            method = _METHOD_NAMES[m.group(1)]
            body = int(cl) if cl is not None else 0
            msg = MessageParsed(
                side.origin,
                "http1",
                method,
                m.group(2).decode("latin-1"),
                None,
                host.decode("latin-1") if host is not None else None,
                tuple(kept),
                (),
                end,
                body,
            )
            out.append(msg)
            pending.append((method, None))
        else:
            entry = pending[0] if pending else None
            if entry is not None and (entry[1] is not None or entry[0] == "CONNECT"):
                return 0
            status = int(m.group(1))
            if (entry is not None and entry[0] == "HEAD") or status == 204 or status == 304:
                body = 0
            elif cl is not None:
                body = int(cl)
            else:
                body = -1
            if entry is not None:
                pending.pop(0)
            out.append(
                MessageParsed(
                    side.origin,
                    "http1",
                    None,
                    None,
                    status,
                    host.decode("latin-1") if host is not None else None,
                    tuple(kept),
                    (),
                    end,
                    body if body >= 0 else None,
                )
            )
            if body < 0:
                side.state = _UNTIL_EOF
                return end
        if body:
            if len(data) - end >= body and not side.body_run:
                # the whole body came with the head: what `_run` would do with it
                side.state = side.after_body
                side.after_body = _IDLE
                return end + body
            side.state = _BODY
            side.remaining = body
        return end

    def _run(self, side: _Side, data: _Data, pos: int, out: list[Event]) -> int:
        """Consume ``data`` from ``pos`` as far as the state machine can; return where it
        stopped (the rest is kept for the next chunk)."""
        n = len(data)
        while pos < n:
            state = side.state
            if state == _IDLE:
                new = self._idle(side, data, pos, out)
            elif state == _BODY:
                take = min(side.remaining, n - pos)
                side.remaining -= take
                new = pos + take
                if not side.remaining:
                    self._message_done(side, out)
            elif state == _CHUNK_DATA:
                take = min(side.remaining, n - pos)
                side.remaining -= take
                new = pos + take
                if not side.remaining:
                    side.state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                new = self._chunk_size(side, data, pos, out)
            elif state == _CHUNK_END:
                new = self._chunk_end(side, data, pos, out)
            elif state == _TRAILER:
                new = self._trailer(side, data, pos, out)
            elif state == _UNTIL_EOF:
                new = n
            elif state == _HEAD:
                new = self._head_stream(side, data, pos, out)
            elif state == _HUNT:
                new = self._hunt(side, data, pos, out)
            elif state == _WAIT:
                if n - pos > self._max_buffer:
                    side.state = _IDLE  # no answer came: the client went on in HTTP/1
                new = pos
            else:  # _SWITCHED
                new = pos
            if new == pos and side.state == state:
                break
            pos = new
        return pos

    # ------------------------------------------------------------------ heads

    def _idle(self, side: _Side, data: _Data, pos: int, out: list[Event]) -> int:
        n = len(data)
        c = data[pos]
        if c == 13 or c == 10:  # empty lines before a start line are ignored
            while pos < n and data[pos] in b"\r\n":
                pos += 1
            if pos == n:
                return pos
            c = data[pos]
        if c == 0x50 and side.is_client:  # "P": HTTP/2 prior-knowledge preface?
            lead = bytes(data[pos : pos + len(_PREFACE_LINE)])
            if lead == _PREFACE_LINE:
                self._switch("http2", out)
                return pos
            if len(lead) < len(_PREFACE_LINE) and _PREFACE_LINE.startswith(lead):
                return pos
        start = pos + side.scan
        i = data.find(b"\n\r\n", start)
        if i >= 0:
            j = data.find(b"\n\n", start, i + 1)
            end = j + 2 if j >= 0 else i + 3
        else:
            j = data.find(b"\n\n", start)
            if j < 0:
                if self._implausible(side, data, pos):
                    self._fail(side, "http1.bad_start_line", "not a start line", out)
                    self._enter_hunt(side, "http1.bad_start_line", False)
                elif n - pos > self._max_buffer:
                    side.scan = 0
                    side.reset_head()
                    side.state = _HEAD
                else:
                    side.scan = max(0, n - pos - 2)
                return pos
            end = j + 2
        side.scan = 0
        return self._head_block(side, data, pos, end, out)

    def _implausible(self, side: _Side, data: _Data, pos: int) -> bool:
        """The first bytes already rule out a start line (decided early on garbage).

        Only rejects what the full start-line rules would reject as well."""
        if side.is_client:
            m = _TOKEN_RUN.match(data, pos)
            if m is None:  # pragma: no cover - the pattern matches the empty string
                return True
            end = m.end()
            if end - pos > 32:
                return True
            if end == len(data):
                return False
            return end == pos or data[end] != 0x20
        lead = bytes(data[pos : pos + 5])
        return not b"HTTP/".startswith(lead)

    def _start_line(self, side: _Side, line: bytes) -> tuple[str, str, int] | str:
        """Parse a start line (without its LF): (method, target, 0) for a request,
        ("", "", status) for a response, or an error code."""
        if side.is_client:
            m = _TOKEN_RUN.match(line)
            token = m.end() if m is not None else 0
            if token > 32 or token == 0 or token >= len(line) or line[token] != 0x20:
                return "http1.bad_start_line"
            if len(line) > self._max_buffer:
                return "http1.start_line_too_large"
            r = _REQUEST_LINE.fullmatch(line)
            if r is None:
                return "http1.bad_start_line"
            raw_method, target, _minor = r.groups()
            method = _METHOD_NAMES.get(raw_method) or raw_method.decode("ascii")
            return (method, target.decode("latin-1"), 0)
        if not line.startswith(b"HTTP/"):
            return "http1.bad_start_line"
        if len(line) > self._max_buffer:
            return "http1.start_line_too_large"
        s = _STATUS_LINE.fullmatch(line)
        if s is None:
            return "http1.bad_start_line"
        return ("", "", int(s.group(2)))

    def _head_block(self, side: _Side, data: _Data, pos: int, end: int, out: list[Event]) -> int:
        """A whole head is in ``data[pos:end]``: parse it in one go."""
        head = data[pos:end] if isinstance(data, bytes) else bytes(data[pos:end])
        lines = head.split(b"\n")
        first = lines[0]
        start = self._start_line(side, first)
        if isinstance(start, str):
            self._fail(side, start, repr(first[:64]), out)
            self._enter_hunt(side, start, False)
            return pos
        side.reset_head()
        side.h_start = start
        if b"\n " in head or b"\n\t" in head:
            # obs-fold somewhere: the general line-by-line rules
            for line in lines[1:-2]:
                self._header_line(side, line)
            self._finish_pending(side)
        else:
            cap = self._max_value
            keys = _KEYS
            for line in lines[1:-2]:
                c = line.find(b":")
                if c < 0:
                    continue
                key = keys.get(line[:c])
                if key is None:
                    key = keys.get(line[:c].lower(), "") if c <= _NAME_MAX else ""
                if not key:
                    continue
                value = line[c + 1 :].strip(_OWS)
                if len(value) > cap:
                    self._store(side, key, value[:cap], True)
                else:
                    self._store(side, key, value, False)
        self._complete_head(side, end - pos, out)
        return end

    def _head_stream(self, side: _Side, data: _Data, pos: int, out: list[Event]) -> int:
        """A head bigger than max_buffer: consume it line by line as it arrives."""
        n = len(data)
        limit = self._max_buffer
        while pos < n:
            nl = data.find(b"\n", pos)
            if side.l_mode:
                stop = n if nl < 0 else nl
                self._long_value(side, data[pos:stop])
                side.h_bytes += stop - pos
                if nl < 0:
                    return n
                side.h_bytes += 1
                pos = nl + 1
                self._long_end(side)
                continue
            if nl < 0:
                if n - pos <= limit:
                    return pos
                if side.h_start is None:
                    self._fail(side, "http1.start_line_too_large", "", out)
                    self._enter_hunt(side, "http1.start_line_too_large", False)
                    return pos
                self._long_begin(side, bytes(data[pos:n]))
                side.h_bytes += n - pos
                return n
            line = bytes(data[pos:nl])
            if side.h_start is None:
                start = self._start_line(side, line)
                if isinstance(start, str):
                    self._fail(side, start, repr(line[:64]), out)
                    self._enter_hunt(side, start, False)
                    return pos
                side.h_start = start
                side.h_bytes = nl + 1 - pos
                pos = nl + 1
                continue
            side.h_bytes += nl + 1 - pos
            pos = nl + 1
            if not line or line == b"\r":
                self._finish_pending(side)
                self._complete_head(side, side.h_bytes, out)
                return pos
            self._header_line(side, line)
        return pos

    def _header_line(self, side: _Side, line: bytes) -> None:
        """One complete header line (general rules, obs-fold included)."""
        c0 = line[:1]
        if c0 == b" " or c0 == b"\t":
            if side.p_key:
                value = line.strip(_OWS)
                cap = self._max_value
                if len(value) > cap:
                    self._continue(side, value[:cap], True)
                else:
                    self._continue(side, value, False)
            return
        self._finish_pending(side)
        c = line.find(b":")
        if c < 0:
            return
        key = _lookup(line[:c])
        if not key:
            return
        value = line[c + 1 :].strip(_OWS)
        cap = self._max_value
        side.p_key = key
        if len(value) > cap:
            side.p_val = value[:cap]
            side.p_trunc = True
        else:
            side.p_val = value
            side.p_trunc = False

    def _continue(self, side: _Side, value: bytes, truncated: bool) -> None:
        """An obs-fold line continues the pending header's value."""
        if side.p_trunc:
            return
        if truncated:
            side.p_trunc = True
        if value:
            joined = side.p_val + b" " + value if side.p_val else value
            if len(joined) > self._max_value:
                joined = joined[: self._max_value]
                side.p_trunc = True
            side.p_val = joined

    def _finish_pending(self, side: _Side) -> None:
        if side.p_key:
            self._store(side, side.p_key, side.p_val, side.p_trunc)
            side.p_key = ""

    def _store(self, side: _Side, key: str, value: bytes, truncated: bool) -> None:
        """A complete header we need."""
        if key in PROPAGATION_HEADERS:
            if truncated:
                side.h_trunc = True
            size = side.h_size + len(value)
            if size > self._max_buffer:
                side.h_trunc = True
                return
            side.h_size = size
            kept = side.h_kept
            if not kept:
                kept = side.h_kept = []
            kept.append((key, value.decode("latin-1")))
        elif key == _HOST:
            if side.h_host is None:
                side.h_host = value
        else:
            # Content-Length, Transfer-Encoding, Upgrade: kept for the framing decision.
            if key == _CONTENT_LENGTH:
                values = side.h_cl
                if not values:
                    values = side.h_cl = []
            elif key == _TRANSFER_ENCODING:
                values = side.h_te
                if not values:
                    values = side.h_te = []
            else:
                values = side.h_up
                if not values:
                    values = side.h_up = []
            values.append(value)

    # A line longer than max_buffer, consumed in pieces (streaming path only). The result
    # equals what `_header_line` gives for the whole line: the value keeps at most
    # max_value + 1 bytes after leading OWS, and remembers whether anything but OWS came
    # after them.

    def _long_begin(self, side: _Side, piece: bytes) -> None:
        side.l_mode = True
        side.l_val = bytearray()
        side.l_lost = False
        if piece[0] in b" \t":
            side.l_cont = True
            side.l_key = side.p_key
            if side.l_key:
                self._long_value(side, piece)
            return
        self._finish_pending(side)
        side.l_cont = False
        c = piece.find(b":")
        side.l_key = _lookup(piece[:c]) if c >= 0 else ""
        if side.l_key:
            self._long_value(side, piece[c + 1 :])

    def _long_value(self, side: _Side, piece: _Data) -> None:
        if not side.l_key:
            return
        val = side.l_val
        if not val:
            piece = piece.lstrip(_OWS)
        room = self._max_value + 1 - len(val)
        if room > 0:
            val += piece[:room]
            piece = piece[room:]
        if piece and not side.l_lost and piece.strip(_OWS):
            side.l_lost = True

    def _long_end(self, side: _Side) -> None:
        side.l_mode = False
        key = side.l_key
        if not key:
            if not side.l_cont:
                side.p_key = ""
            return
        cap = self._max_value
        raw = bytes(side.l_val)
        side.l_val = bytearray()
        if side.l_lost:
            value, truncated = raw[:cap], True
        else:
            value = raw.rstrip(_OWS)
            truncated = len(value) > cap
            if truncated:
                value = value[:cap]
        if side.l_cont:
            self._continue(side, value, truncated)
        else:
            side.p_key = key
            side.p_val = value
            side.p_trunc = truncated

    # ------------------------------------------------------------------ framing

    def _complete_head(self, side: _Side, nbytes: int, out: list[Event]) -> None:
        """The head is parsed: emit it and decide what follows it on the wire."""
        start = side.h_start
        assert start is not None
        method, target, status = start
        host = side.h_host
        authority = host.decode("latin-1") if host is not None else None
        headers = tuple(side.h_kept)
        truncated = side.h_trunc
        if side.is_client:
            body, error = self._request_body(side)
            upgrade = _upgrade_protocol(side.h_up) if side.h_up else None
            msg = MessageParsed(
                origin=side.origin,
                protocol="http1",
                method=method,
                path=target,
                authority=authority,
                headers=headers,
                header_block_bytes=nbytes,
                body_bytes=body,
                truncated=truncated,
            )
            out.append(msg)
            if upgrade is not None:
                self._last_request = msg
            pending = self._pending
            if len(pending) >= _MAX_PENDING:
                pending.pop(0)
                self._fail(side, "http1.pipeline_overflow", "oldest request forgotten", out)
            pending.append((method, upgrade))
            waits = method == "CONNECT" or upgrade is not None
            if error:
                self._fail(side, error, "", out)
                self._enter_hunt(side, error, True)
            elif body is None:
                side.state = _CHUNK_SIZE
                side.after_body = _WAIT if waits else _IDLE
            elif body:
                side.state = _BODY
                side.remaining = body
                side.after_body = _WAIT if waits else _IDLE
            else:
                side.state = _WAIT if waits else _IDLE
            return

        if status < 200:
            switched = status == 101
            entry = self._pending.pop(0) if switched and self._pending else None
            out.append(
                MessageParsed(
                    origin=side.origin,
                    protocol="http1",
                    status=status,
                    authority=authority,
                    headers=headers,
                    header_block_bytes=nbytes,
                    body_bytes=0,
                    informational=True,
                    truncated=truncated,
                )
            )
            side.state = _IDLE
            if switched:
                proto = _upgrade_protocol(side.h_up) or (entry[1] if entry else None)
                self._switch(proto or "unknown", out)
            return
        entry = self._pending.pop(0) if self._pending else None
        asked = entry[0] if entry is not None else None
        tunnel = asked == "CONNECT" and status < 300
        body, error = (0, "") if tunnel else self._response_body(side, asked, status)
        out.append(
            MessageParsed(
                origin=side.origin,
                protocol="http1",
                status=status,
                authority=authority,
                headers=headers,
                header_block_bytes=nbytes,
                body_bytes=body if body is not None and body >= 0 else None,
                truncated=truncated,
            )
        )
        if tunnel:
            self._switch("tunnel", out)
            return
        if error:
            self._fail(side, error, "", out)
            self._enter_hunt(side, error, True)
        elif body is None:
            side.state = _CHUNK_SIZE
        elif body < 0:
            side.state = _UNTIL_EOF
        elif body:
            side.state = _BODY
            side.remaining = body
        else:
            side.state = _IDLE
        if entry is not None and (entry[0] == "CONNECT" or entry[1] is not None):
            self._release_client(out)

    def _request_body(self, side: _Side) -> tuple[int | None, str]:
        """(Content-Length | None for chunked, error code or "")."""
        if side.h_te:
            if _chunked(side.h_te):
                return None, ""
            return None, "http1.bad_transfer_encoding"
        if side.h_cl:
            length = _content_length(side.h_cl)
            if length < 0:
                return None, "http1.bad_content_length"
            return length, ""
        return 0, ""

    def _response_body(
        self, side: _Side, method: str | None, status: int
    ) -> tuple[int | None, str]:
        """(length | None for chunked | -1 until close, error code or "")."""
        if method == "HEAD" or status == 204 or status == 304:
            return 0, ""
        if side.h_te:
            return (None, "") if _chunked(side.h_te) else (-1, "")
        if side.h_cl:
            length = _content_length(side.h_cl)
            if length < 0:
                return None, "http1.bad_content_length"
            return length, ""
        return -1, ""

    def _release_client(self, out: list[Event]) -> None:
        """The CONNECT/Upgrade request got an answer that did not switch: the client's
        held bytes are HTTP/1 after all."""
        client = self._client
        if client.state == _WAIT:
            client.state = _IDLE
            if client.buf:
                pos = self._run(client, client.buf, 0, out)
                if pos:
                    del client.buf[:pos]
                self._flush_body(client, out)
        elif client.after_body == _WAIT:
            client.after_body = _IDLE

    def _switch(self, protocol: str, out: list[Event]) -> None:
        for side in (self._client, self._server):
            self._flush_body(side, out)
            side.state = _SWITCHED
            side.l_mode = False
        out.append(ProtocolSwitched(protocol))

    # ------------------------------------------------------------------ bodies

    def _chunk_size(self, side: _Side, data: _Data, pos: int, out: list[Event]) -> int:
        nl = data.find(b"\n", pos)
        if nl < 0:
            if len(data) - pos > self._max_buffer:
                return self._bad_chunk(side, "chunk-size line too long", out, pos)
            return pos
        line = bytes(data[pos:nl])
        m = _CHUNK_SIZE_LINE.fullmatch(line) if len(line) <= self._max_buffer else None
        if m is None:
            return self._bad_chunk(side, repr(line[:32]), out, pos)
        size = int(m.group(1), 16)
        if size:
            side.state = _CHUNK_DATA
            side.remaining = size
        else:
            side.state = _TRAILER
            side.trailer_mid = False
        return nl + 1

    def _chunk_end(self, side: _Side, data: _Data, pos: int, out: list[Event]) -> int:
        c = data[pos]
        if c == 10:
            side.state = _CHUNK_SIZE
            return pos + 1
        if c == 13:
            if pos + 1 == len(data):
                return pos
            if data[pos + 1] == 10:
                side.state = _CHUNK_SIZE
                return pos + 2
        return self._bad_chunk(side, "no CRLF after chunk data", out, pos)

    def _bad_chunk(self, side: _Side, detail: str, out: list[Event], pos: int) -> int:
        self._flush_body(side, out)
        self._fail(side, "http1.bad_chunk", detail, out)
        self._enter_hunt(side, "http1.bad_chunk", True)
        return pos

    def _trailer(self, side: _Side, data: _Data, pos: int, out: list[Event]) -> int:
        n = len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                if n - pos > self._max_buffer:  # a trailer line too long to hold: skip it
                    side.trailer_mid = True
                    return n
                return pos
            empty = not side.trailer_mid and (nl == pos or (nl == pos + 1 and data[pos] == 13))
            side.trailer_mid = False
            pos = nl + 1
            if empty:
                self._message_done(side, out)
                return pos
        return pos

    def _message_done(self, side: _Side, out: list[Event]) -> None:
        self._flush_body(side, out)
        side.state = side.after_body
        side.after_body = _IDLE

    def _flush_body(self, side: _Side, out: list[Event]) -> None:
        if side.body_run:
            out.append(BodySkipped(side.origin, side.body_run))
            side.body_run = 0

    # ------------------------------------------------------------------ loss and errors

    def _fail(self, side: _Side, code: str, detail: str, out: list[Event]) -> None:
        out.append(ParseFailed(side.origin, code, detail))

    def _enter_hunt(self, side: _Side, reason: str, at_line_start: bool) -> None:
        """Lose place: from the current position on, bytes are dropped until a message
        start (see `_hunt`). A response direction that lost its place can no longer tell
        which request a response answers: the queue is forgotten."""
        if side.state != _HUNT:
            side.reason = reason
            side.dropped = 0
        side.state = _HUNT
        side.at_line_start = at_line_start
        side.after_body = _IDLE
        side.remaining = 0
        side.scan = 0
        side.trailer_mid = False
        side.reset_head()
        if not side.is_client:
            self._pending.clear()

    def _hunt(self, side: _Side, data: _Data, pos: int, out: list[Event]) -> int:
        n = len(data)
        finder = _REQUEST_HUNT if side.is_client else _RESPONSE_HUNT
        while pos < n:
            if side.at_line_start:
                verdict = self._candidate(side, data, pos)
                if verdict > 0:
                    out.append(Desynced(side.origin, side.reason, side.dropped))
                    side.dropped = 0
                    side.state = _IDLE
                    return pos
                if verdict == 0:
                    return pos
                side.at_line_start = False
            m = finder.search(data, pos)
            if m is not None:
                cut = m.start() + 1
            else:
                k = data.rfind(b"\n", pos)
                if k < 0:
                    side.dropped += n - pos
                    return n
                cut = k + 1
            side.dropped += cut - pos
            pos = cut
            side.at_line_start = True
        return pos

    def _candidate(self, side: _Side, data: _Data, pos: int) -> int:
        """Is a message starting at ``pos``? 1 yes, 0 cannot tell yet, -1 no."""
        n = len(data)
        if side.is_client:
            if _KNOWN_METHOD_START.match(data, pos) is None:
                lead = bytes(data[pos : pos + _METHOD_START_MAX])
                if len(lead) < _METHOD_START_MAX and any(
                    m.startswith(lead) for m in _METHOD_STARTS
                ):
                    return 0
                return -1
        elif not data.startswith(b"HTTP/1.", pos):
            lead = bytes(data[pos : pos + 7])
            return 0 if len(lead) < 7 and b"HTTP/1.".startswith(lead) else -1
        nl = data.find(b"\n", pos)
        if nl < 0:
            return 0 if n - pos <= self._max_buffer else -1
        start = self._start_line(side, bytes(data[pos:nl]))
        return -1 if isinstance(start, str) else 1

    def _lost(self, side: _Side, nbytes: int, reason: str, out: list[Event]) -> None:
        """``nbytes`` of ``side`` will never be seen: inside a body of known length they
        are just consumed; anywhere else the direction lost its place."""
        state = side.state
        if state == _SWITCHED:
            return
        if state == _UNTIL_EOF:
            side.body_run += nbytes
            return
        if state == _BODY or state == _CHUNK_DATA:
            take = min(nbytes, side.remaining)
            side.remaining -= take
            side.body_run += take
            nbytes -= take
            if not side.remaining:
                if state == _BODY:
                    self._message_done(side, out)
                else:
                    side.state = _CHUNK_END
            if not nbytes:
                return
            reason = "gap_past_body" if reason == "gap" else reason
        dropped = nbytes + len(side.buf) + (side.h_bytes if side.state == _HEAD else 0)
        side.buf = bytearray()
        self._flush_body(side, out)
        self._enter_hunt(side, reason, True)
        side.dropped += dropped

    def _eof(self, side: _Side, out: list[Event]) -> None:
        state = side.state
        if state == _SWITCHED:
            return
        if state == _WAIT:
            side.state = _IDLE
            if side.buf:
                pos = self._run(side, side.buf, 0, out)
                if pos:
                    del side.buf[:pos]
            state = side.state
        rest = bytes(side.buf)
        if state == _UNTIL_EOF:
            self._message_done(side, out)
        elif state == _HUNT:
            out.append(Desynced(side.origin, side.reason, side.dropped + len(rest)))
        elif state == _IDLE:
            if rest.strip(b"\r\n"):
                self._fail(side, "http1.truncated_head", f"{len(rest)} bytes of a head", out)
        elif state == _HEAD:
            self._fail(side, "http1.truncated_head", f"{side.h_bytes + len(rest)} bytes", out)
        else:
            self._flush_body(side, out)
            self._fail(side, "http1.truncated_body", "", out)
        side.buf = bytearray()
        side.body_run = 0
        side.state = _IDLE
        side.after_body = _IDLE
        side.remaining = 0
        side.dropped = 0
        side.scan = 0
        side.reset_head()

    def _crash(self, side: _Side, exc: Exception, out: list[Event]) -> None:
        """A bug met bytes it did not expect: report it, drop the direction's state, hunt."""
        out.append(ParseFailed(side.origin, "http1.internal_error", f"{type(exc).__name__}: {exc}"))
        try:
            dropped = len(side.buf)
            side.buf = bytearray()
            side.state = _IDLE
            self._enter_hunt(side, "http1.internal_error", False)
            side.dropped += dropped  # what was held; the chunk being parsed is not known
        except Exception:  # pragma: no cover - resetting plain attributes cannot fail
            pass


def _chunked(values: Sequence[bytes]) -> bool:
    """Transfer-Encoding lines: is chunked the final coding?"""
    last = values[-1].rsplit(b",", 1)[-1].strip(_OWS)
    return last.lower() == b"chunked"


def _content_length(values: Sequence[bytes]) -> int:
    """Content-Length lines -> length, or -1 when invalid or contradictory."""
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 18:
            return int(value)
    length = -1
    for value in values:
        for item in value.split(b","):
            item = item.strip(_OWS)
            if not item.isdigit() or len(item) > 18:
                return -1
            n = int(item)
            if length >= 0 and n != length:
                return -1
            length = n
    return length
