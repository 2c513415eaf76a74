"""The passive HTTP/2 parser: golden bytes from real peers, synthetic frames, properties."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopwatch.protocols._events import (
    BodySkipped,
    Desynced,
    Event,
    MessageParsed,
    Origin,
    ParseFailed,
    StreamReset,
)
from hopwatch.protocols._hpack import BlockState, HpackMalformed, huffman_decode, walk
from hopwatch.protocols.http2 import PREFACE, Http2Parser, looks_like_http2

FIXTURES = Path(__file__).parent / "fixtures" / "http2"
C, S = Origin.CLIENT, Origin.SERVER
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
B3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

Chunks = list[tuple[Origin, bytes]]


# ------------------------------------------------------------------------- helpers


def load(name: str) -> Chunks:
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    return [(C if tag == "c" else S, bytes.fromhex(hx)) for tag, hx in fixture["chunks"]]


def feed(
    parser: Http2Parser, chunks: Iterable[tuple[Origin, bytes]], eof: bool = True
) -> list[Event]:
    events: list[Event] = []
    for origin, data in chunks:
        events += parser.receive_data(origin, data)
    if eof:
        events += parser.receive_eof(C) + parser.receive_eof(S)
    return events


def messages(events: Iterable[Event]) -> list[MessageParsed]:
    return [e for e in events if isinstance(e, MessageParsed)]


def failures(events: Iterable[Event]) -> list[str]:
    return [e.code for e in events if isinstance(e, ParseFailed)]


def summary(m: MessageParsed) -> tuple[object, ...]:
    return (m.kind, m.stream_id, m.method, m.path, m.status, m.headers, m.end_stream)


def frame(f: Frame) -> bytes:
    return f.serialize()


def settings_frame(**values: int) -> bytes:
    f = SettingsFrame(0)
    for key, value in values.items():
        f.settings[getattr(SettingsFrame, key)] = value
    return f.serialize()


def headers(
    sid: int,
    block: bytes,
    *,
    end_stream: bool = False,
    end_headers: bool = True,
    pad: int = 0,
    priority: bool = False,
) -> bytes:
    f = HeadersFrame(sid, data=block)
    if end_stream:
        f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    if pad:
        f.flags.add("PADDED")
        f.pad_length = pad
    if priority:
        f.flags.add("PRIORITY")
        f.depends_on, f.stream_weight, f.exclusive = 3, 200, True
    return f.serialize()


def header_frames(sid: int, block: bytes, end_stream: bool = True, size: int = 16384) -> bytes:
    """HEADERS + CONTINUATIONs of at most ``size`` bytes each."""
    pieces = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
    out = headers(sid, pieces[0], end_headers=len(pieces) == 1, end_stream=end_stream)
    for i, piece in enumerate(pieces[1:], 2):
        out += continuation(sid, piece, i == len(pieces))
    return out


def continuation(sid: int, block: bytes, end_headers: bool) -> bytes:
    f = ContinuationFrame(sid, data=block)
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def data(sid: int, payload: bytes, end_stream: bool = False, pad: int = 0) -> bytes:
    f = DataFrame(sid, data=payload)
    if end_stream:
        f.flags.add("END_STREAM")
    if pad:
        f.flags.add("PADDED")
        f.pad_length = pad
    return f.serialize()


def request(path: str = "/", tp: str | None = TP, **extra: str) -> list[tuple[str, str]]:
    fields = [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", "svc")]
    if tp is not None:
        fields.append(("traceparent", tp))
    fields += [(k.replace("_", "-"), v) for k, v in extra.items()]
    return fields


def response(status: str = "200", **extra: str) -> list[tuple[str, str]]:
    return [(":status", status)] + [(k.replace("_", "-"), v) for k, v in extra.items()]


class Conn:
    """Synthetic connection: one hpack.Encoder per direction, frames built by hyperframe."""

    def __init__(self, preface: bool = True) -> None:
        self.enc = {C: hpack.Encoder(), S: hpack.Encoder()}
        self.chunks: Chunks = []
        if preface:
            self.chunks.append((C, PREFACE + settings_frame()))
            self.chunks.append((S, settings_frame(MAX_CONCURRENT_STREAMS=100)))

    def block(
        self, origin: Origin, fields: Sequence[tuple[str, str]], huffman: bool = True
    ) -> bytes:
        return bytes(self.enc[origin].encode(list(fields), huffman=huffman))

    def send(self, origin: Origin, *frames: bytes) -> None:
        self.chunks.append((origin, b"".join(frames)))


def grpc_like_connection(rpcs: int) -> Chunks:
    """Chunks of a gRPC-like connection: request HEADERS + DATA, response HEADERS + DATA +
    trailers; every request with a fresh traceparent."""
    conn = Conn()
    rnd = os.urandom
    for i in range(rpcs):
        sid = 2 * i + 1
        tp = f"00-{rnd(16).hex()}-{rnd(8).hex()}-01"
        req = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/helloworld.Greeter/SayHello"),
            (":authority", "greeter.default.svc.cluster.local:50051"),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-python/1.85.1 grpc-c/44.0.0 (linux; chttp2)"),
            ("te", "trailers"),
            ("grpc-accept-encoding", "identity,deflate,gzip"),
            ("grpc-timeout", "4999m"),
            ("traceparent", tp),
        ]
        conn.send(
            C, headers(sid, conn.block(C, req)), data(sid, b"\x00\x00\x00\x00\x07\n\x05world", True)
        )
        resp = [("content-type", "application/grpc"), ("grpc-accept-encoding", "identity,gzip")]
        conn.send(
            S,
            headers(sid, conn.block(S, [(":status", "200"), *resp])),
            data(sid, b"\x00\x00\x00\x00\x0d\n\x0bHello world"),
            headers(
                sid, conn.block(S, [("grpc-status", "0"), ("grpc-message", "")]), end_stream=True
            ),
        )
    return conn.chunks


# ------------------------------------------------------------------------- golden: real peers

REAL: dict[str, list[tuple[object, ...]]] = {
    "curl_hypercorn": [
        (
            "request",
            1,
            "POST",
            "/first?q=1",
            None,
            (("traceparent", TP), ("tracestate", "vendor=abc"), ("b3", B3)),
            False,
        ),
        ("response", 1, None, None, 200, (("traceresponse", TP),), False),
    ],
    "node": [
        (
            "request",
            1,
            "GET",
            "/a",
            None,
            (("traceparent", TP), ("baggage", "userId=alice,isVip=true")),
            True,
        ),
        ("response", 1, None, None, 200, (("traceparent", TP),), False),
        (
            "request",
            3,
            "POST",
            "/b",
            None,
            (("traceparent", TP2), ("baggage", "userId=alice,isVip=true")),
            False,
        ),
        ("response", 3, None, None, 200, (("traceparent", TP2),), False),
    ],
    "grpc": [
        ("request", 1, "POST", "/demo.Echo/Ping", None, (("traceparent", TP), ("b3", B3)), False),
        ("response", 1, None, None, 200, (), False),
        ("request", 3, "POST", "/demo.Echo/Ping", None, (("traceparent", TP2), ("b3", B3)), False),
        ("response", 3, None, None, 200, (), False),
        ("request", 5, "POST", "/demo.Echo/Ping", None, (("traceparent", TP), ("b3", B3)), False),
        ("response", 5, None, None, 200, (), False),
    ],
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_peer_capture(name: str) -> None:
    events = feed(Http2Parser(), load(name))
    assert [summary(m) for m in messages(events)] == REAL[name]
    assert failures(events) == []
    assert not [e for e in events if isinstance(e, Desynced)]
    for m in messages(events):
        assert m.protocol == "http2"
        assert not m.truncated and m.inferred_headers == ()
        if m.is_request:
            assert m.authority is not None and m.authority.startswith("127.0.0.1:")
        # decoded size: at least name + value + 32 for each propagation header
        assert m.header_block_bytes >= sum(len(k) + len(v) + 32 for k, v in m.headers)


def test_real_capture_grpc_trailers_are_not_messages() -> None:
    events = feed(Http2Parser(), load("grpc"))
    # 3 RPCs, each: request, response; the trailers (grpc-status) close the stream
    assert len(messages(events)) == 6


def test_real_capture_node_goaway() -> None:
    resets = [e for e in feed(Http2Parser(), load("node")) if isinstance(e, StreamReset)]
    assert resets and all(r.goaway and r.stream_ids == () and r.error_code == 0 for r in resets)


def test_real_capture_h2c_upgrade() -> None:
    """curl --http2 -> hypercorn: HTTP/1.1 request with Upgrade: h2c, 101, then HTTP/2."""
    chunks = load("curl_h2c_upgrade")
    head_end = chunks[1][1].index(b"\r\n\r\n") + 4
    assert chunks[0][0] is C and chunks[0][1].startswith(b"GET /upgraded HTTP/1.1")
    assert chunks[1][1][:head_end].startswith(b"HTTP/1.1 101")
    upgrade = MessageParsed(
        C, "http1", method="GET", path="/upgraded", headers=(("traceparent", TP),)
    )
    parser = Http2Parser(upgraded_request=upgrade)
    events = feed(parser, [(S, chunks[1][1][head_end:]), *chunks[2:]])
    assert [summary(m) for m in messages(events)] == [
        ("response", 1, None, None, 200, (("traceresponse", TP),), False)
    ]
    assert failures(events) == []


# ------------------------------------------------------------------------- golden: synthetic


def case_padding_priority() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/p")), pad=17, priority=True, end_stream=True))
    c.send(S, headers(1, c.block(S, response()), pad=3), data(1, b"body", True, pad=10))
    return (
        c.chunks,
        [
            ("request", 1, "GET", "/p", None, (("traceparent", TP),), True),
            ("response", 1, None, None, 200, (), False),
        ],
        [],
    )


def case_continuation() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    c = Conn()
    block = c.block(C, request("/cont", baggage="k=v"))
    c.send(
        C,
        headers(1, block[:5], end_headers=False, end_stream=True),
        continuation(1, block[5:20], False),
        continuation(1, b"", False),
        continuation(1, block[20:], True),
    )
    return (
        c.chunks,
        [("request", 1, "GET", "/cont", None, (("traceparent", TP), ("baggage", "k=v")), True)],
        [],
    )


def case_trailers_and_informational() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    c = Conn()
    c.send(C, headers(1, c.block(C, [*request("/t"), ("expect", "100-continue")])))
    c.send(S, headers(1, c.block(S, response("100"))))
    c.send(C, data(1, b"x" * 100), headers(1, c.block(C, [("x-b3-sampled", "1")]), end_stream=True))
    c.send(S, headers(1, c.block(S, response("200", traceresponse=TP2))))
    c.send(S, data(1, b"y"), headers(1, c.block(S, [("grpc-status", "0")]), end_stream=True))
    return (
        c.chunks,
        [
            ("request", 1, "GET", "/t", None, (("traceparent", TP),), False),
            ("response", 1, None, None, 100, (), False),
            ("response", 1, None, None, 200, (("traceresponse", TP2),), False),
        ],
        [],
    )


def case_rst_and_goaway() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    c = Conn()
    for sid in (1, 3, 5):
        c.send(C, headers(sid, c.block(C, request(f"/{sid}")), end_stream=True))
    c.send(S, frame(RstStreamFrame(1, error_code=8)))
    c.send(S, frame(GoAwayFrame(0, last_stream_id=3, error_code=0)))
    c.send(C, frame(PingFrame(0, opaque_data=b"12345678")), frame(WindowUpdateFrame(0, 1000)))
    return (
        c.chunks,
        [
            ("request", sid, "GET", f"/{sid}", None, (("traceparent", TP),), True)
            for sid in (1, 3, 5)
        ],
        [],
    )


def case_push_promise() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/page")), end_stream=True))
    push = PushPromiseFrame(1, promised_stream_id=2, data=c.block(S, request("/style.css", None)))
    push.flags.add("END_HEADERS")
    c.send(S, frame(push), headers(1, c.block(S, response())), data(1, b"page", True))
    c.send(S, headers(2, c.block(S, response(traceresponse=TP)), end_stream=True))
    return (
        c.chunks,
        [
            ("request", 1, "GET", "/page", None, (("traceparent", TP),), True),
            ("response", 1, None, None, 200, (), False),
            ("response", 2, None, None, 200, (("traceresponse", TP),), True),
        ],
        [],
    )


def case_table_size_zero() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    """Client SETTINGS_HEADER_TABLE_SIZE=0: the server's encoder must stop indexing."""
    c = Conn(preface=False)
    c.send(C, PREFACE + settings_frame(HEADER_TABLE_SIZE=0))
    c.send(S, settings_frame())
    c.enc[S].header_table_size = 0  # emits a size update in the next block
    c.send(C, headers(1, c.block(C, request("/z")), end_stream=True))
    c.send(S, headers(1, c.block(S, response(traceresponse=TP)), end_stream=True))
    return (
        c.chunks,
        [
            ("request", 1, "GET", "/z", None, (("traceparent", TP),), True),
            ("response", 1, None, None, 200, (("traceresponse", TP),), True),
        ],
        [],
    )


def case_table_size_over_setting() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    """A size update above what the peer's SETTINGS allow is reported, still decoded."""
    c = Conn(preface=False)
    c.send(C, PREFACE + settings_frame(HEADER_TABLE_SIZE=256))
    c.send(S, settings_frame())
    c.send(C, headers(1, c.block(C, request("/o")), end_stream=True))
    c.send(S, headers(1, c.block(S, response()), end_stream=True))  # no update: 4096 > 256
    c.enc[S].header_table_size = 8192
    c.send(C, headers(3, c.block(C, request("/o2")), end_stream=True))
    c.send(S, headers(3, c.block(S, response()), end_stream=True))
    return (
        c.chunks,
        [
            ("request", 1, "GET", "/o", None, (("traceparent", TP),), True),
            ("response", 1, None, None, 200, (), True),
            ("request", 3, "GET", "/o2", None, (("traceparent", TP),), True),
            ("response", 3, None, None, 200, (), True),
        ],
        ["http2.hpack_table_size"],
    )


def case_extension_frames_and_big_data() -> tuple[Chunks, list[tuple[object, ...]], list[str]]:
    c = Conn()
    c.send(C, bytes([0, 0, 3, 0x10, 0, 0, 0, 0, 0]) + b"abc")  # PRIORITY_UPDATE-like
    c.send(C, headers(1, c.block(C, request("/big"))), data(1, b"d" * 16384), data(1, b"e", True))
    c.send(S, headers(1, c.block(S, response()), end_stream=True))
    return (
        c.chunks,
        [
            ("request", 1, "GET", "/big", None, (("traceparent", TP),), False),
            ("response", 1, None, None, 200, (), True),
        ],
        [],
    )


SYNTHETIC = {
    "padding_priority": case_padding_priority,
    "continuation": case_continuation,
    "trailers_and_informational": case_trailers_and_informational,
    "rst_and_goaway": case_rst_and_goaway,
    "push_promise": case_push_promise,
    "table_size_zero": case_table_size_zero,
    "table_size_over_setting": case_table_size_over_setting,
    "extension_frames_and_big_data": case_extension_frames_and_big_data,
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic(name: str) -> None:
    chunks, expected, codes = SYNTHETIC[name]()
    events = feed(Http2Parser(), chunks)
    assert [summary(m) for m in messages(events)] == expected
    assert failures(events) == codes
    assert not [e for e in events if isinstance(e, Desynced)]


def test_informational_flag() -> None:
    chunks, _, _ = case_trailers_and_informational()
    msgs = messages(feed(Http2Parser(), chunks))
    assert [m.informational for m in msgs] == [False, True, False]


def test_rst_and_goaway_events() -> None:
    chunks, _, _ = case_rst_and_goaway()
    resets = [e for e in feed(Http2Parser(), chunks) if isinstance(e, StreamReset)]
    assert resets == [
        StreamReset(S, (1,), goaway=False, error_code=8),
        StreamReset(S, (5,), goaway=True, error_code=0),
    ]


def test_header_block_bytes_is_decoded_size() -> None:
    c = Conn()
    fields = request("/size", baggage="a=1")
    c.send(C, headers(1, c.block(C, fields), end_stream=True))
    (m,) = messages(feed(Http2Parser(), c.chunks))
    assert m.header_block_bytes == sum(len(k) + len(v) + 32 for k, v in fields)


def test_host_header_when_no_authority() -> None:
    c = Conn()
    fields = [(":method", "GET"), (":scheme", "http"), (":path", "/h"), ("host", "h.example")]
    c.send(C, headers(1, c.block(C, fields), end_stream=True))
    (m,) = messages(feed(Http2Parser(), c.chunks))
    assert m.authority == "h.example"


def test_repeated_propagation_headers_kept_in_order() -> None:
    c = Conn()
    fields = [*request("/r"), ("baggage", "a=1"), ("tracestate", "x=1"), ("baggage", "b=2")]
    c.send(C, headers(1, c.block(C, fields), end_stream=True))
    (m,) = messages(feed(Http2Parser(), c.chunks))
    assert m.headers == (
        ("traceparent", TP),
        ("baggage", "a=1"),
        ("tracestate", "x=1"),
        ("baggage", "b=2"),
    )


# ------------------------------------------------------------------------- huge header blocks


def test_one_mib_header_block_over_continuations_stays_in_sync() -> None:
    c = Conn()
    fields = request("/huge") + [(f"x-filler-{i}", "v" * 1000) for i in range(1100)]
    block = c.block(C, fields, huffman=False)
    assert len(block) > 1 << 20
    c.send(C, header_frames(1, block))
    # the next request refers back to the dynamic table: it must still decode exactly
    c.send(C, headers(3, c.block(C, request("/after", TP2)), end_stream=True))
    parser = Http2Parser(max_buffer=64 * 1024)
    events = feed(parser, c.chunks)
    first, second = messages(events)
    assert (first.path, first.headers) == ("/huge", (("traceparent", TP),))
    assert first.header_block_bytes == sum(len(k) + len(v) + 32 for k, v in fields)
    assert first.header_block_bytes > 1 << 20
    assert (second.path, second.headers) == ("/after", (("traceparent", TP2),))
    assert failures(events) == []


def test_one_mib_single_field_is_reported_and_message_kept() -> None:
    c = Conn()
    fields = [*request("/one-field"), ("baggage", "k=" + "v" * (1 << 20))]
    block = c.block(C, fields, huffman=False)  # hpack's Huffman encoder is quadratic
    c.send(C, header_frames(1, block))
    c.send(C, headers(3, c.block(C, request("/next", TP2)), end_stream=True))
    events = feed(Http2Parser(max_buffer=64 * 1024), c.chunks)
    first, second = messages(events)
    assert (first.path, first.headers, first.truncated) == (
        "/one-field",
        (("traceparent", TP),),
        True,
    )
    assert "http2.header_block_too_large" in failures(events)
    # the table was reset: what the encoder indexed before is unknown, yet the literal
    # traceparent value is still recognised
    assert second.stream_id == 3
    assert ("traceparent", TP2) in second.headers + second.inferred_headers


def test_huge_single_headers_frame_is_streamed() -> None:
    """A peer allowing 16 MiB frames: one HEADERS frame larger than max_buffer."""
    c = Conn(preface=False)
    c.send(C, PREFACE + settings_frame())
    c.send(S, settings_frame(MAX_FRAME_SIZE=(1 << 24) - 1))
    fields = request("/wide") + [(f"x-f{i}", "w" * 500) for i in range(400)]
    block = c.block(C, fields)
    c.send(C, headers(1, block, pad=200, priority=True, end_stream=True))
    c.send(C, headers(3, c.block(C, request("/after")), end_stream=True))
    parser = Http2Parser(max_buffer=16 * 1024)
    events = feed(
        parser, [(o, d[i : i + 7000]) for o, d in c.chunks for i in range(0, len(d), 7000)]
    )
    assert [m.path for m in messages(events)] == ["/wide", "/after"]
    assert messages(events)[0].header_block_bytes == sum(len(k) + len(v) + 32 for k, v in fields)
    assert failures(events) == []


def test_many_propagation_values_are_bounded() -> None:
    c = Conn()
    fields = request("/many") + [("baggage", f"k{i}=" + "v" * 900) for i in range(300)]
    c.send(C, header_frames(1, c.block(C, fields)))
    events = feed(Http2Parser(max_buffer=32 * 1024), c.chunks)
    (m,) = messages(events)
    assert m.truncated and sum(len(v) for _, v in m.headers) <= 32 * 1024
    assert "http2.header_block_too_large" in failures(events)


# ------------------------------------------------------------------------- attach, gaps, skips


def test_attach_mid_connection_infers_traceparent() -> None:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/one", TP)), end_stream=True))
    c.send(S, headers(1, c.block(S, response(traceresponse=TP)), end_stream=True))
    start = len(c.chunks)
    c.send(C, headers(3, c.block(C, request("/two", TP2)), end_stream=True))
    c.send(S, headers(3, c.block(S, response(traceresponse=TP2)), end_stream=True))
    tail = c.chunks[start:]
    assert looks_like_http2(tail[0][1]) and looks_like_http2(tail[1][1])
    events = feed(Http2Parser(), tail)
    req, resp = messages(events)
    assert (req.kind, req.stream_id, req.method) == ("request", 3, "GET")
    assert req.inferred_headers == (("traceparent", TP2),)
    assert resp.status == 200 and resp.inferred_headers == (("traceparent", TP2),)
    assert failures(events) == ["http2.hpack_partial", "http2.hpack_partial"]


def test_attach_infers_b3() -> None:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/1", None, b3=B3)), end_stream=True))
    start = len(c.chunks)
    c.send(C, headers(3, c.block(C, request("/2", None, b3=B3[:-1] + "0")), end_stream=True))
    (m,) = messages(feed(Http2Parser(), c.chunks[start:]))
    assert m.inferred_headers == (("b3", B3[:-1] + "0"),)


def test_gap_inside_data_is_consumed() -> None:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/up"))), data(1, b"z" * 5000)[:1009])
    parser = Http2Parser()
    events = feed(parser, c.chunks, eof=False)
    assert parser.skip_hint(C) == 4000
    events += parser.receive_gap(C, 1500)
    assert parser.skip_hint(C) == 2500
    events += parser.receive_skipped(C, 2500)
    assert parser.skip_hint(C) == 0
    events += parser.receive_data(C, data(1, b"end", True))
    events += parser.receive_data(C, headers(3, c.block(C, request("/again")), end_stream=True))
    assert [e.length for e in events if isinstance(e, BodySkipped)] == [1500, 2500]
    assert [m.path for m in messages(events)] == ["/up", "/again"]
    assert not [e for e in events if isinstance(e, (Desynced, ParseFailed))]
    assert parser.data_bytes(C) == 5003


def test_gap_outside_data_desyncs_then_resyncs() -> None:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/a")), end_stream=True))
    lost = headers(3, c.block(C, request("/lost", TP)), end_stream=True)
    c.send(C, headers(5, c.block(C, request("/b", TP2)), end_stream=True))
    parser = Http2Parser()
    events = feed(parser, c.chunks[:3], eof=False)
    events += parser.receive_gap(C, len(lost))
    events += feed(parser, c.chunks[3:])
    desyncs = [e for e in events if isinstance(e, Desynced)]
    assert desyncs == [Desynced(C, "http2.gap", len(lost))]
    a, b = messages(events)
    assert a.path == "/a"
    # /b's :path was indexed by the lost block; the dynamic table was reset
    assert b.stream_id == 5 and b.method == "GET"
    assert ("traceparent", TP2) in b.headers + b.inferred_headers


def test_skipped_beyond_data_payload_is_a_gap() -> None:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/s"))), data(1, b"q" * 100)[:9])
    parser = Http2Parser()
    feed(parser, c.chunks, eof=False)
    assert parser.skip_hint(C) == 100
    events = parser.receive_skipped(C, 150)
    assert events == [BodySkipped(C, 100)]
    events += parser.receive_data(C, b"\xee" * 7 + headers(3, c.block(C, request("/t"))))
    assert [e for e in events if isinstance(e, Desynced)] == [Desynced(C, "http2.gap", 57)]


def test_garbage_after_preface_resyncs() -> None:
    c = Conn()
    c.send(C, headers(1, c.block(C, request("/ok")), end_stream=True))
    garbage = b"\xff" * 40 + b"GET / HTTP/1.1\r\n\r\n"
    c.chunks.append((C, garbage))
    c.send(
        C,
        frame(PingFrame(0, opaque_data=b"abcdefgh")),
        headers(3, c.block(C, request("/ok2")), end_stream=True),
    )
    events = feed(Http2Parser(), c.chunks)
    assert [m.stream_id for m in messages(events)] == [1, 3]
    assert [e for e in events if isinstance(e, Desynced)] == [
        Desynced(C, "http2.bad_frame", len(garbage))
    ]


def test_truncated_at_eof() -> None:
    c = Conn()
    full = headers(1, c.block(C, request("/cut")), end_stream=True)
    c.chunks.append((C, full[:-3]))
    events = feed(Http2Parser(), c.chunks)
    assert messages(events) == []
    assert failures(events) == ["http2.truncated"]


def test_data_after_eof_and_broken_preface() -> None:
    parser = Http2Parser()
    assert parser.receive_data(C, PREFACE[:10] + b"XXXX") == []
    events = parser.receive_eof(C) + parser.receive_data(C, b"more")
    assert isinstance(events[0], Desynced) and events[0].reason == "http2.bad_preface"
    assert failures(events) == ["http2.data_after_eof"]


def test_hpack_error_with_complete_table() -> None:
    c = Conn()
    bad = bytes([0x80 | 0x7F, 0x10])  # indexed field 0x7f+0x10: not in an empty table
    c.send(C, headers(1, bytes(c.block(C, request("/x"))) + bad, end_stream=True))
    c.send(C, headers(3, c.block(C, request("/y")), end_stream=True))
    events = feed(Http2Parser(), c.chunks)
    assert failures(events) == ["http2.hpack_error"]
    assert [m.path for m in messages(events)] == ["/x", "/y"]


def test_looks_like_http2() -> None:
    assert looks_like_http2(PREFACE)
    assert looks_like_http2(PREFACE[:6])
    assert looks_like_http2(settings_frame() + frame(WindowUpdateFrame(0, 5)))
    assert looks_like_http2(headers(1, b"\x82\x84", end_stream=True))
    assert not looks_like_http2(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not looks_like_http2(b"HTTP/1.1 200 OK\r\n\r\n")
    assert not looks_like_http2(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert not looks_like_http2(b"\x00\x00")


# ------------------------------------------------------------------------- HPACK walker


def _walk_all(decoder: hpack.Decoder, block: bytes) -> list[tuple[bytes | None, bytes]]:
    state = BlockState()
    assert walk(decoder, block, 0, len(block), state) == len(block)
    return state.fields


header_names = st.sampled_from(
    [":path", "traceparent", "baggage", "content-type", "x-custom", "user-agent", "te"]
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
header_lists = st.lists(
    st.tuples(header_names, header_values, st.booleans()), min_size=1, max_size=12
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(header_lists, min_size=1, max_size=6), st.booleans(), st.sampled_from([0, 256, 4096])
)
def test_walker_matches_hpack_decoder(
    blocks: list[list[tuple[str, str, bool]]], huffman: bool, table_size: int
) -> None:
    enc = hpack.Encoder()
    enc.header_table_size = table_size
    ours, theirs = hpack.Decoder(), hpack.Decoder()
    for fields in blocks:
        block = enc.encode(
            [hpack.NeverIndexedHeaderTuple(n, v) if s else (n, v) for n, v, s in fields],
            huffman=huffman,
        )
        expected = [(bytes(n), bytes(v)) for n, v in theirs.decode(block, raw=True)]
        assert _walk_all(ours, block) == expected
        assert list(ours.header_table.dynamic_entries) == list(theirs.header_table.dynamic_entries)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_huffman_matches_hpack(raw: bytes) -> None:
    try:
        expected: bytes | None = decode_huffman(raw)
    except hpack.HPACKDecodingError:
        expected = None
    try:
        got: bytes | None = huffman_decode(raw)
    except HpackMalformed:
        got = None
    assert got == expected


@given(st.binary(max_size=30))
def test_huffman_round_trip(value: bytes) -> None:
    assert huffman_decode(HUFFMAN.encode(value)) == value


# ------------------------------------------------------------------------- properties


def _interleavings(chunks: Chunks, cuts: list[int]) -> Chunks:
    """Re-split each chunk at the given offsets (mod its length), keeping the order."""
    out: Chunks = []
    for k, (origin, blob) in enumerate(chunks):
        points = sorted({c % (len(blob) + 1) for c in cuts[k % len(cuts) :: 3]} | {0, len(blob)})
        out += [(origin, blob[a:b]) for a, b in itertools.pairwise(points) if b > a]
    return out


ALL_STREAMS = {
    **{name: (lambda name=name: load(name)) for name in sorted(REAL)},
    **{name: (lambda fn=fn: fn()[0]) for name, fn in SYNTHETIC.items()},
}


@pytest.mark.parametrize("name", sorted(ALL_STREAMS))
def test_split_at_every_byte_boundary(name: str) -> None:
    chunks = ALL_STREAMS[name]()
    expected = feed(Http2Parser(), chunks)
    one_byte = [(o, blob[i : i + 1]) for o, blob in chunks for i in range(len(blob))]
    assert feed(Http2Parser(), one_byte) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(ALL_STREAMS)), st.lists(st.integers(0, 1 << 16), min_size=1, max_size=30)
)
def test_any_split_yields_the_same_events(name: str, cuts: list[int]) -> None:
    chunks = ALL_STREAMS[name]()
    assert feed(Http2Parser(), _interleavings(chunks, cuts)) == feed(Http2Parser(), chunks)


api_calls = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.sampled_from([C, S]), st.binary(max_size=80)),
        st.tuples(st.just("gap"), st.sampled_from([C, S]), st.integers(0, 100)),
        st.tuples(st.just("skipped"), st.sampled_from([C, S]), st.integers(0, 100)),
        st.tuples(st.just("eof"), st.sampled_from([C, S]), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=400, deadline=None)
@given(st.booleans(), api_calls)
def test_arbitrary_input_never_raises(
    with_preface: bool, calls: list[tuple[str, Origin, object]]
) -> None:
    parser = Http2Parser(max_buffer=1024)
    if with_preface:
        parser.receive_data(C, PREFACE)
    for kind, origin, arg in calls:
        if kind == "data":
            assert isinstance(arg, bytes)
            events = parser.receive_data(origin, arg)
        elif kind == "eof":
            events = parser.receive_eof(origin)
        else:
            assert isinstance(arg, int)
            events = (parser.receive_gap if kind == "gap" else parser.receive_skipped)(origin, arg)
        assert "http2.internal_error" not in failures(events)
        assert parser.skip_hint(origin) >= 0


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(0, 5))
def test_garbage_with_valid_frame_tail_never_raises(garbage: bytes, n: int) -> None:
    c = Conn()
    for i in range(n):
        c.send(C, headers(2 * i + 1, c.block(C, request(f"/{i}")), end_stream=True))
    c.chunks.insert(1 + (n > 0), (C, garbage))
    events = feed(Http2Parser(), c.chunks)
    assert "http2.internal_error" not in failures(events)


hex_digits = st.text("0123456789abcdef", min_size=1, max_size=1)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=8, max_size=8),
    st.sampled_from(["00", "01"]),
    st.integers(1, 4),
    st.booleans(),
)
def test_attach_recognises_any_traceparent(
    trace: bytes, span: bytes, flags: str, earlier: int, huffman: bool
) -> None:
    value = f"00-{trace.hex()}-{span.hex()}-{flags}"
    enc = hpack.Encoder()
    for i in range(earlier):  # the name "traceparent" enters the dynamic table
        enc.encode(request(f"/{i}", f"00-{'1' * 32}-{'2' * 16}-01"), huffman=huffman)
    block = enc.encode(request("/now", value, x_other="o"), huffman=huffman)
    parser = Http2Parser()
    (m,) = messages(parser.receive_data(C, headers(99, block, end_stream=True)))
    assert ("traceparent", value) in m.headers + m.inferred_headers
    assert m.stream_id == 99 and m.method == "GET"
