"""The passive HTTP/1.x parser: golden byte cases, real-peer captures, properties."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopwatch.protocols._events import (
    BodySkipped,
    Desynced,
    Event,
    MessageParsed,
    Origin,
    ParseFailed,
    ProtocolSwitched,
)
from hopwatch.protocols.http1 import Http1Parser

C, S = Origin.CLIENT, Origin.SERVER
FIXTURES = Path(__file__).parent / "fixtures" / "http1"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TPB = TP.encode()

# A step of a conversation: (origin, bytes) data, ("gap"|"skip", origin, n), ("eof", origin).
Step = tuple[object, ...]


def fmt(ev: Event) -> str:
    """One event as a short line the golden cases compare against."""
    if isinstance(ev, MessageParsed):
        if ev.is_request:
            s = f"> {ev.method} {ev.path}"
        else:
            s = f"< {ev.status}"
        if ev.authority is not None:
            s += f" host={ev.authority}"
        s += f" hb={ev.header_block_bytes} body={ev.body_bytes}"
        for name, value in ev.headers:
            s += f" {name}={value!r}"
        if ev.informational:
            s += " 1xx"
        if ev.truncated:
            s += " truncated"
        assert ev.protocol == "http1"
        return s
    if isinstance(ev, ParseFailed):
        return f"fail {ev.origin.value} {ev.code}"
    if isinstance(ev, Desynced):
        return f"desync {ev.origin.value} {ev.reason} dropped={ev.dropped}"
    if isinstance(ev, BodySkipped):
        return f"skipped {ev.origin.value} {ev.length}"
    if isinstance(ev, ProtocolSwitched):
        return f"switch {ev.protocol}"
    raise AssertionError(ev)


def play(parser: Http1Parser, steps: Sequence[Step]) -> list[Event]:
    events: list[Event] = []
    for step in steps:
        if step[0] == "gap":
            events += parser.receive_gap(step[1], step[2])  # type: ignore[arg-type]
        elif step[0] == "skip":
            events += parser.receive_skipped(step[1], step[2])  # type: ignore[arg-type]
        elif step[0] == "eof":
            events += parser.receive_eof(step[1])  # type: ignore[arg-type]
        else:
            events += parser.receive_data(step[0], step[1])  # type: ignore[arg-type]
    return events


def load(name: str) -> list[tuple[Origin, bytes]]:
    raw = (FIXTURES / f"{name}.rec").read_bytes()
    out: list[tuple[Origin, bytes]] = []
    i = 0
    while i < len(raw):
        origin = C if raw[i : i + 1] == b"C" else S
        (n,) = struct.unpack(">I", raw[i + 1 : i + 5])
        out.append((origin, raw[i + 5 : i + 5 + n]))
        i += 5 + n
    return out


def req(line: str = "GET / HTTP/1.1", *headers: str, body: bytes = b"", eol: str = "\r\n") -> bytes:
    return (line + eol + "".join(h + eol for h in headers) + eol).encode("latin-1") + body


def resp(status: str = "200 OK", *headers: str, body: bytes = b"", eol: str = "\r\n") -> bytes:
    return req(f"HTTP/1.1 {status}", *headers, body=body, eol=eol)


# --------------------------------------------------------------------- golden: synthetic

GOLDEN: list[tuple[str, list[Step], list[str]]] = [
    (
        "keepalive_two_exchanges",
        [
            (C, req("GET /a HTTP/1.1", "Host: svc", f"traceparent: {TP}")),
            (S, resp("200 OK", "Content-Length: 2", body=b"ok")),
            (C, req("GET /b HTTP/1.1", "Host: svc")),
            (S, resp("404 Not Found", "Content-Length: 0")),
        ],
        [
            f"> GET /a host=svc hb=100 body=0 traceparent='{TP}'",
            "< 200 hb=38 body=2",
            "> GET /b host=svc hb=30 body=0",
            "< 404 hb=45 body=0",
        ],
    ),
    (
        "lf_only_line_endings",
        [
            (
                C,
                req(
                    "POST /x HTTP/1.1",
                    "Host: h",
                    "Content-Length: 3",
                    "b3: 1",
                    eol="\n",
                    body=b"abc",
                ),
            ),
            (S, resp("200 OK", "Content-Length: 1", eol="\n", body=b"!")),
        ],
        ["> POST /x host=h hb=50 body=3 b3='1'", "< 200 hb=35 body=1"],
    ),
    (
        "mixed_crlf_and_lf",
        [(C, b"GET / HTTP/1.1\nHost: h\r\nb3: 0\n\r\n")],
        ["> GET / host=h hb=32 body=0 b3='0'"],
    ),
    (
        "obs_fold_continues_value",
        [(C, req("GET / HTTP/1.1", "baggage: a=1,", " \t b=2", "\tc=3", "Host: h"))],
        ["> GET / host=h hb=56 body=0 baggage='a=1, b=2 c=3'"],
    ),
    (
        "obs_fold_on_ignored_header_and_before_first_header",
        [(C, req("GET / HTTP/1.1", " stray", "X-Long: a", "  traceparent: no", "b3: 1"))],
        ["> GET / hb=63 body=0 b3='1'"],
    ),
    (
        "names_case_insensitive",
        [
            (
                C,
                req(
                    "GET / HTTP/1.1",
                    "TRACEPARENT: a",
                    "TraceState: b",
                    "x-B3-tRaCeId: c",
                    "HOST: h",
                    "BAGGAGE: d",
                ),
            )
        ],
        ["> GET / host=h hb=87 body=0 traceparent='a' tracestate='b' x-b3-traceid='c' baggage='d'"],
    ),
    (
        "ows_stripped_repeats_kept_in_order",
        [
            (
                C,
                req(
                    "GET / HTTP/1.1",
                    "tracestate:\t a=1 \t",
                    "baggage:k=v",
                    "tracestate:  b=2",
                    "baggage: ",
                ),
            )
        ],
        ["> GET / hb=80 body=0 tracestate='a=1' baggage='k=v' tracestate='b=2' baggage=''"],
    ),
    (
        "every_propagation_header",
        [
            (
                C,
                req(
                    "GET / HTTP/1.1",
                    "x-b3-spanid: 1",
                    "x-b3-parentspanid: 2",
                    "x-b3-sampled: 3",
                    "x-b3-flags: 4",
                    "uber-trace-id: 5",
                    "x-amzn-trace-id: 6",
                ),
            ),
            (S, resp("200 OK", "traceresponse: 7", "Content-Length: 0")),
        ],
        [
            "> GET / hb=126 body=0 x-b3-spanid='1' x-b3-parentspanid='2' x-b3-sampled='3' "
            "x-b3-flags='4' uber-trace-id='5' x-amzn-trace-id='6'",
            "< 200 hb=56 body=0 traceresponse='7'",
        ],
    ),
    (
        "whitespace_before_colon_is_another_name",
        [(C, req("GET / HTTP/1.1", "traceparent : x", "b3 :y"))],
        ["> GET / hb=42 body=0"],
    ),
    (
        "line_without_colon_ignored",
        [(C, req("GET / HTTP/1.1", "garbage line", "b3: 1"))],
        ["> GET / hb=39 body=0 b3='1'"],
    ),
    (
        "absolute_form_and_odd_targets",
        [
            (C, req("GET http://example.com:8080/p?q=1 HTTP/1.1", "Host: example.com:8080")),
            (C, req("OPTIONS * HTTP/1.1", "Host: h")),
            (C, req("PROPFIND /dav/%C3%A9 HTTP/1.1")),
        ],
        [
            "> GET http://example.com:8080/p?q=1 host=example.com:8080 hb=70 body=0",
            "> OPTIONS * host=h hb=31 body=0",
            "> PROPFIND /dav/%C3%A9 hb=33 body=0",
        ],
    ),
    (
        "first_host_wins_missing_host_is_none",
        [(C, req("GET / HTTP/1.1", "Host: a", "Host: b")), (C, req("GET / HTTP/1.0"))],
        ["> GET / host=a hb=36 body=0", "> GET / hb=18 body=0"],
    ),
    (
        "leading_empty_lines_ignored",
        [(C, b"\r\n\r\n\n" + req("GET / HTTP/1.1"))],
        ["> GET / hb=18 body=0"],
    ),
    (
        "http10_request_and_response_until_close",
        [
            (C, req("GET /old HTTP/1.0", f"traceparent: {TP}")),
            (S, b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nbody bytes"),
            (S, b" and more"),
            ("eof", S),
        ],
        [f"> GET /old hb=91 body=0 traceparent='{TP}'", "< 200 hb=30 body=None"],
    ),
    (
        "pipelined_head_and_get",
        [
            (C, req("HEAD /a HTTP/1.1") + req("GET /b HTTP/1.1") + req("HEAD /c HTTP/1.1")),
            (
                S,
                resp("200 OK", "Content-Length: 100")
                + resp("200 OK", "Content-Length: 3", body=b"abc")
                + resp("200 OK", "Transfer-Encoding: chunked")
                + resp("204 No Content"),
            ),
        ],
        [
            "> HEAD /a hb=20 body=0",
            "> GET /b hb=19 body=0",
            "> HEAD /c hb=20 body=0",
            "< 200 hb=40 body=0",
            "< 200 hb=38 body=3",
            "< 200 hb=47 body=0",
            "< 204 hb=27 body=0",
        ],
    ),
    (
        "no_body_204_304_even_with_length",
        [
            (C, req("GET /a HTTP/1.1") + req("GET /b HTTP/1.1")),
            (S, resp("204 No Content", "Content-Length: 10")),
            (S, resp("304 Not Modified", "Content-Length: 10", "ETag: x")),
        ],
        [
            "> GET /a hb=19 body=0",
            "> GET /b hb=19 body=0",
            "< 204 hb=47 body=0",
            "< 304 hb=58 body=0",
        ],
    ),
    (
        "expect_100_continue",
        [
            (C, req("PUT /u HTTP/1.1", "Expect: 100-continue", "Content-Length: 4")),
            (S, resp("100 Continue")),
            (C, b"data"),
            (S, resp("201 Created", "Content-Length: 0")),
        ],
        [
            "> PUT /u hb=60 body=4",
            "< 100 hb=25 body=0 1xx",
            "< 201 hb=43 body=0",
        ],
    ),
    (
        "early_hints_103_with_header",
        [
            (C, req("GET / HTTP/1.1")),
            (S, resp("103 Early Hints", "Link: </a.css>", f"traceparent: {TP}")),
            (S, resp("200 OK", "Content-Length: 0")),
        ],
        [
            "> GET / hb=18 body=0",
            f"< 103 hb=114 body=0 traceparent='{TP}' 1xx",
            "< 200 hb=38 body=0",
        ],
    ),
    (
        "chunked_with_extensions_and_trailers",
        [
            (
                C,
                req("POST /c HTTP/1.1", "Transfer-Encoding: chunked", "b3: 1")
                + b'5;name=value;q="x y"\r\nhello\r\nA ; ext\r\n0123456789\r\n0\r\n'
                + b"traceparent: ignored-in-trailer\r\nX-Sum: 1\r\n\r\n",
            ),
            (C, req("GET /next HTTP/1.1")),
        ],
        ["> POST /c hb=55 body=None b3='1'", "> GET /next hb=22 body=0"],
    ),
    (
        "chunked_response_lf_only_and_uppercase_hex",
        [
            (C, req("GET / HTTP/1.1")),
            (
                S,
                resp("200 OK", "transfer-encoding: gzip, chunked", eol="\n")
                + b"1F\n"
                + b"x" * 31
                + b"\n0\n\n",
            ),
            (C, req("GET /2 HTTP/1.1")),
            (S, resp("200 OK", "Content-Length: 1", body=b"z")),
        ],
        [
            "> GET / hb=18 body=0",
            "< 200 hb=50 body=None",
            "> GET /2 hb=19 body=0",
            "< 200 hb=38 body=1",
        ],
    ),
    (
        "response_transfer_encoding_not_chunked_reads_until_close",
        [
            (C, req("GET / HTTP/1.1")),
            (S, resp("200 OK", "Transfer-Encoding: gzip", body=b"\x1f\x8b...")),
            ("eof", S),
        ],
        ["> GET / hb=18 body=0", "< 200 hb=44 body=None"],
    ),
    (
        "response_without_request_seen",
        [
            (
                S,
                resp("200 OK", "Content-Length: 2", body=b"ok")
                + resp("200 OK", "Content-Length: 0"),
            )
        ],
        ["< 200 hb=38 body=2", "< 200 hb=38 body=0"],
    ),
    (
        "duplicate_equal_content_length_accepted",
        [(C, req("POST / HTTP/1.1", "Content-Length: 3, 3", "Content-Length: 3", body=b"abc"))],
        ["> POST / hb=60 body=3"],
    ),
    (
        "h2c_upgrade_switches",
        [
            (
                C,
                req(
                    "GET / HTTP/1.1",
                    "Host: h",
                    "Connection: Upgrade, HTTP2-Settings",
                    "Upgrade: h2c",
                ),
            ),
            (C, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            (
                S,
                resp("101 Switching Protocols", "Connection: Upgrade", "Upgrade: h2c")
                + b"\x00\x00\x00\x04",
            ),
        ],
        ["> GET / host=h hb=78 body=0", "< 101 hb=71 body=0 1xx", "switch http2"],
    ),
    (
        "websocket_upgrade_switches",
        [
            (
                C,
                req(
                    "GET /ws HTTP/1.1",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    f"traceparent: {TP}",
                ),
            ),
            (
                S,
                resp("101 Switching Protocols", "Upgrade: WebSocket", "Connection: Upgrade")
                + b"\x81\x05hello",
            ),
            (C, b"\x81\x85abcd....."),
        ],
        [
            f"> GET /ws hb=131 body=0 traceparent='{TP}'",
            "< 101 hb=77 body=0 1xx",
            "switch websocket",
        ],
    ),
    (
        "upgrade_name_from_request_when_101_has_none",
        [(C, req("GET / HTTP/1.1", "Upgrade: foo/2")), (S, resp("101 Switching Protocols"))],
        ["> GET / hb=34 body=0", "< 101 hb=36 body=0 1xx", "switch foo/2"],
    ),
    (
        "upgrade_refused_client_continues",
        [
            (C, req("GET /a HTTP/1.1", "Upgrade: h2c", "Content-Length: 2", body=b"hi")),
            (C, req("GET /b HTTP/1.1", "b3: 1")),
            (S, resp("200 OK", "Content-Length: 0")),
            (S, resp("200 OK", "Content-Length: 0")),
        ],
        [
            "> GET /a hb=52 body=2",
            "< 200 hb=38 body=0",
            "> GET /b hb=26 body=0 b3='1'",
            "< 200 hb=38 body=0",
        ],
    ),
    (
        "connect_refused_then_more_requests",
        [
            (C, req("CONNECT db:5432 HTTP/1.1", "Host: db:5432")),
            (S, resp("407 Proxy Authentication Required", "Content-Length: 4", body=b"nope")),
            (C, req("GET http://a/ HTTP/1.1", "Host: a")),
            (S, resp("200 OK", "Content-Length: 0")),
        ],
        [
            "> CONNECT db:5432 host=db:5432 hb=43 body=0",
            "< 407 hb=65 body=4",
            "> GET http://a/ host=a hb=35 body=0",
            "< 200 hb=38 body=0",
        ],
    ),
    (
        "connect_2xx_opens_tunnel",
        [
            (C, req("CONNECT api.example:443 HTTP/1.1", "Host: api.example:443")),
            (S, resp("200 Connection established")),
            (C, b"\x16\x03\x01\x02\x00tls hello"),
        ],
        [
            "> CONNECT api.example:443 host=api.example:443 hb=59 body=0",
            "< 200 hb=39 body=0",
            "switch tunnel",
        ],
    ),
    (
        "http2_prior_knowledge_preface",
        [(C, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")],
        ["switch http2"],
    ),
    (
        "unknown_method_token_accepted_when_in_sync",
        [(C, req("BREW /pot HTTP/1.1", "b3: 1"))],
        ["> BREW /pot hb=29 body=0 b3='1'"],
    ),
    # ---- bad input
    (
        "garbage_then_request",
        [(C, b"\x00\x01\x02garbage\r\nmore garbage\r\n" + req("GET /ok HTTP/1.1"))],
        [
            "fail client http1.bad_start_line",
            "desync client http1.bad_start_line dropped=26",
            "> GET /ok hb=20 body=0",
        ],
    ),
    (
        "bad_request_line_then_request",
        [(C, req("GET /no-version") + req("POST /ok HTTP/1.1", "Content-Length: 0"))],
        [
            "fail client http1.bad_start_line",
            "desync client http1.bad_start_line dropped=19",
            "> POST /ok hb=40 body=0",
        ],
    ),
    (
        "response_garbage_resyncs_at_status_line",
        [
            (S, b"<html>oops</html>\nHTTP/1.1 oops\n" + resp("200 OK", "Content-Length: 0")),
        ],
        [
            "fail server http1.bad_start_line",
            "desync server http1.bad_start_line dropped=32",
            "< 200 hb=38 body=0",
        ],
    ),
    (
        "bad_status_code",
        [(S, resp("2000 OK") + resp("200 OK", "Content-Length: 0"))],
        [
            "fail server http1.bad_start_line",
            "desync server http1.bad_start_line dropped=20",
            "< 200 hb=38 body=0",
        ],
    ),
    (
        "bad_content_length",
        [
            (
                C,
                req("POST / HTTP/1.1", "Content-Length: 12abc", "b3: 1")
                + b"xyz\r\n"
                + req("GET / HTTP/1.1"),
            )
        ],
        [
            "> POST / hb=49 body=None b3='1'",
            "fail client http1.bad_content_length",
            "desync client http1.bad_content_length dropped=5",
            "> GET / hb=18 body=0",
        ],
    ),
    (
        "conflicting_content_lengths",
        [
            (
                C,
                req("POST / HTTP/1.1", "Content-Length: 3", "Content-Length: 4")
                + req("GET / HTTP/1.1"),
            )
        ],
        [
            "> POST / hb=57 body=None",
            "fail client http1.bad_content_length",
            "desync client http1.bad_content_length dropped=0",
            "> GET / hb=18 body=0",
        ],
    ),
    (
        "request_transfer_encoding_not_chunked",
        [(C, req("POST / HTTP/1.1", "Transfer-Encoding: gzip"))],
        ["> POST / hb=44 body=None", "fail client http1.bad_transfer_encoding"],
    ),
    (
        "bad_chunk_size",
        [
            (
                C,
                req("POST / HTTP/1.1", "Transfer-Encoding: chunked")
                + b"zz\r\nhello\r\n"
                + req("GET /after HTTP/1.1"),
            )
        ],
        [
            "> POST / hb=47 body=None",
            "fail client http1.bad_chunk",
            "desync client http1.bad_chunk dropped=11",
            "> GET /after hb=23 body=0",
        ],
    ),
    (
        "chunk_data_not_followed_by_crlf",
        [(C, req("POST / HTTP/1.1", "Transfer-Encoding: chunked") + b"3\r\nabcX\r\n0\r\n\r\n")],
        ["> POST / hb=47 body=None", "fail client http1.bad_chunk"],
    ),
    (
        "truncated_head_at_eof",
        [(C, b"GET / HTTP/1.1\r\nHost: h\r\n"), ("eof", C)],
        ["fail client http1.truncated_head"],
    ),
    (
        "truncated_body_at_eof",
        [(S, resp("200 OK", "Content-Length: 10", body=b"abc")), ("eof", S)],
        ["< 200 hb=39 body=10", "fail server http1.truncated_body"],
    ),
    (
        "eof_while_hunting_reports_desync",
        [(C, b"\x16\x03\x01 tls?\r\nno http here"), ("eof", C)],
        ["fail client http1.bad_start_line", "desync client http1.bad_start_line dropped=22"],
    ),
    (
        "hunt_ignores_method_lookalikes",
        [(C, b"xx\nGET nothing\nGETS / HTTP/1.1\nGET /real HTTP/1.1\n\n")],
        [
            "fail client http1.bad_start_line",
            "desync client http1.bad_start_line dropped=31",
            "> GET /real hb=20 body=0",
        ],
    ),
    # ---- loss
    (
        "gap_inside_body_keeps_sync",
        [
            (C, req("POST /a HTTP/1.1", "Content-Length: 100") + b"x" * 10),
            ("gap", C, 80),
            (C, b"y" * 10 + req("GET /b HTTP/1.1")),
        ],
        ["> POST /a hb=41 body=100", "skipped client 80", "> GET /b hb=19 body=0"],
    ),
    (
        "skipped_inside_chunk_keeps_sync",
        [
            (C, req("POST /a HTTP/1.1", "Transfer-Encoding: chunked") + b"64\r\n" + b"x" * 4),
            ("skip", C, 96),
            (C, b"\r\n0\r\n\r\n" + req("GET /b HTTP/1.1")),
        ],
        ["> POST /a hb=48 body=None", "skipped client 96", "> GET /b hb=19 body=0"],
    ),
    (
        "gap_past_body_desyncs_then_resyncs",
        [
            (S, resp("200 OK", "Content-Length: 5") + b"ab"),
            ("gap", S, 40),
            (S, b"tail of a lost head\r\n\r\n" + resp("200 OK", "Content-Length: 0")),
        ],
        [
            "< 200 hb=38 body=5",
            "skipped server 3",
            "desync server gap_past_body dropped=60",
            "< 200 hb=38 body=0",
        ],
    ),
    (
        "gap_in_head_drops_partial_head",
        [(C, b"GET /a HTTP/1.1\r\nHo"), ("gap", C, 10), (C, req("GET /b HTTP/1.1"))],
        ["desync client gap dropped=29", "> GET /b hb=19 body=0"],
    ),
    (
        "gap_between_messages_next_write_starts_one",
        [(C, req("GET /a HTTP/1.1")), ("gap", C, 500), (C, req("GET /c HTTP/1.1"))],
        ["> GET /a hb=19 body=0", "desync client gap dropped=500", "> GET /c hb=19 body=0"],
    ),
    (
        "skipped_outside_body_is_a_gap",
        [(C, req("GET /a HTTP/1.1")), ("skip", C, 7), (C, req("GET /c HTTP/1.1"))],
        [
            "> GET /a hb=19 body=0",
            "desync client skip_outside_body dropped=7",
            "> GET /c hb=19 body=0",
        ],
    ),
    (
        "gap_in_until_close_body",
        [
            (C, req("GET / HTTP/1.1")),
            (S, b"HTTP/1.0 200 OK\r\n\r\nabc"),
            ("gap", S, 1000),
            ("eof", S),
        ],
        ["> GET / hb=18 body=0", "< 200 hb=19 body=None", "skipped server 1000"],
    ),
    (
        "server_desync_forgets_request_queue",
        [
            (C, req("HEAD /a HTTP/1.1") + req("HEAD /b HTTP/1.1")),
            (S, b"junk\r\n"),
            (S, resp("200 OK", "Content-Length: 2", body=b"ok")),
        ],
        [
            "> HEAD /a hb=20 body=0",
            "> HEAD /b hb=20 body=0",
            "fail server http1.bad_start_line",
            "desync server http1.bad_start_line dropped=6",
            "< 200 hb=38 body=2",
        ],
    ),
]


@pytest.mark.parametrize(("steps", "expected"), [pytest.param(s, e, id=i) for i, s, e in GOLDEN])
def test_golden(steps: list[Step], expected: list[str]) -> None:
    events = play(Http1Parser(), steps)
    assert [fmt(e) for e in events] == expected


@pytest.mark.parametrize(("steps", "expected"), [pytest.param(s, e, id=i) for i, s, e in GOLDEN])
def test_golden_one_byte_feeds(steps: list[Step], expected: list[str]) -> None:
    """Every golden case fed one byte at a time gives the same events."""
    one_byte: list[Step] = []
    for step in steps:
        if isinstance(step[0], Origin):
            data = step[1]
            assert isinstance(data, bytes)
            one_byte += [(step[0], data[i : i + 1]) for i in range(len(data))]
        else:
            one_byte.append(step)
    events = play(Http1Parser(), one_byte)
    assert [fmt(e) for e in events] == expected


# --------------------------------------------------------------------- golden: real peers

REAL: list[tuple[str, list[str], dict[Origin, bytes]]] = [
    (
        "curl_nginx_keepalive",
        [
            f"> GET / host=127.0.0.1:52935 hb=202 body=0 traceparent='{TP}' "
            "tracestate='rojo=00f067aa0ba902b7,congo=t61rcWkgMzE'",
            "< 200 hb=236 body=30",
            f"> GET /empty host=127.0.0.1:52935 hb=207 body=0 traceparent='{TP}' "
            "tracestate='rojo=00f067aa0ba902b7,congo=t61rcWkgMzE'",
            "< 204 hb=110 body=0",
        ],
        {},
    ),
    (
        "curl_nginx_head",
        [f"> HEAD / host=127.0.0.1:34781 hb=150 body=0 traceparent='{TP}'", "< 200 hb=236 body=0"],
        {},
    ),
    (
        "raw_nginx_pipelined",
        [
            f"> GET / host=a hb=97 body=0 traceparent='{TP}'",
            "> HEAD / host=a hb=69 body=0 b3='4bf92f3577b34da6-00f067aa0ba902b7-1'",
            "> POST /post host=a hb=51 body=5",
            "> GET /missing host=a hb=34 body=0",
            "> GET /empty host=a hb=51 body=0",
            "< 200 hb=236 body=30",
            "< 200 hb=236 body=0",
            "< 200 hb=147 body=7",
            "< 404 hb=155 body=153",
            "< 204 hb=105 body=0",
        ],
        {},
    ),
    (
        "nginx_proxy_to_pyserver10",
        [
            f"> GET /index host=127.0.0.1:40471 hb=173 body=0 traceparent='{TP}'",
            f"< 200 hb=190 body=None traceresponse='{TP}'",
        ],
        {},
    ),
    (
        "curl_pyserver_expect100",
        [
            f"> POST /upload host=127.0.0.1:43843 hb=248 body=300 traceparent='{TP}'",
            "< 100 hb=25 body=0 1xx",
            f"< 200 hb=210 body=23 traceresponse='{TP}'",
        ],
        {},
    ),
    (
        "httpclient_pyserver10_until_close",
        [
            f"> GET /x host=127.0.0.1:43701 hb=139 body=0 traceparent='{TP}'",
            f"< 200 hb=190 body=None traceresponse='{TP}'",
        ],
        {},
    ),
    (
        "httpclient_chunked_post_nginx",
        ["> POST /post host=127.0.0.1:51283 hb=115 body=None baggage='k=v'", "< 200 hb=147 body=7"],
        {},
    ),
    (
        "node_client_node_server",
        [
            f"> POST /items/1 host=127.0.0.1:53005 hb=290 body=None traceparent='{TP}' "
            "x-b3-traceid='4bf92f3577b34da6a3ce929d0e0e4736' x-b3-spanid='00f067aa0ba902b7' "
            "x-b3-sampled='1' baggage='userId=alice'",
            "< 200 hb=178 body=None",
            f"> POST /items/2 host=127.0.0.1:53005 hb=290 body=None traceparent='{TP}' "
            "x-b3-traceid='4bf92f3577b34da6a3ce929d0e0e4736' x-b3-spanid='00f067aa0ba902b7' "
            "x-b3-sampled='1' baggage='userId=alice'",
            "< 200 hb=178 body=None",
        ],
        {},
    ),
    (
        "curl_hypercorn_h2c_upgrade",
        [
            f"> GET /h2c host=127.0.0.1:32769 hb=245 body=0 traceparent='{TP}'",
            "< 101 hb=112 body=0 1xx",
            "switch http2",
        ],
        {C: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"},
    ),
    (
        "raw_connect_tunnel",
        [
            "> CONNECT 127.0.0.1:58667 host=127.0.0.1:58667 hb=114 body=0",
            "< 200 hb=39 body=0",
            "switch tunnel",
        ],
        {C: b"GET / HTTP/1.1\r\nHost: 127.0.0.1:58667\r\n"},
    ),
]


@pytest.mark.parametrize(
    ("name", "expected", "leftover"), [pytest.param(n, e, lo, id=n) for n, e, lo in REAL]
)
@pytest.mark.parametrize("mode", ["as_recorded", "one_byte", "clients_first"])
def test_real_peer_capture(
    name: str, expected: list[str], leftover: dict[Origin, bytes], mode: str
) -> None:
    records = load(name)
    if mode == "one_byte":
        records = [(o, d[i : i + 1]) for o, d in records for i in range(len(d))]
    elif mode == "clients_first":
        records = [r for r in records if r[0] is C] + [r for r in records if r[0] is S]
    parser = Http1Parser()
    events: list[Event] = []
    for origin, data in records:  # after a switch the bytes are held for detach_leftover
        events += parser.receive_data(origin, data)
    if not parser.switched:
        events += parser.receive_eof(C) + parser.receive_eof(S)
    got = [fmt(e) for e in events]
    if mode == "clients_first":  # requests all come first: compare each direction's order
        assert sorted(got) == sorted(expected)
    else:
        assert got == expected
    rest = parser.detach_leftover()
    for origin, start in leftover.items():
        assert rest[origin].startswith(start)


def test_h2c_leftover_is_exactly_the_unparsed_bytes() -> None:
    parser = Http1Parser()
    records = load("curl_hypercorn_h2c_upgrade")
    for origin, data in records[:3]:  # request, 101 (+ nothing), client preface + SETTINGS
        parser.receive_data(origin, data)
    rest = parser.detach_leftover()
    assert rest[C] == records[2][1]
    assert rest[S] == records[1][1][112:]
    assert parser.detach_leftover() == {C: b"", S: b""}


# --------------------------------------------------------------------- hints, bounds


def test_skip_hint_content_length_and_chunks() -> None:
    p = Http1Parser()
    assert p.skip_hint(C) == 0
    p.receive_data(C, req("POST / HTTP/1.1", "Content-Length: 1000") + b"x" * 100)
    assert p.skip_hint(C) == 900
    assert p.skip_hint(S) == 0
    assert [fmt(e) for e in p.receive_skipped(C, 900)] == ["skipped client 900"]
    assert p.skip_hint(C) == 0
    p.receive_data(S, resp("200 OK", "Transfer-Encoding: chunked") + b"400\r\n" + b"y" * 24)
    assert p.skip_hint(S) == 1000
    p.receive_skipped(S, 1000)
    assert p.skip_hint(S) == 0
    assert p.receive_data(S, b"\r\n0\r\n\r\n") == []
    assert p.skip_hint(S) == 0
    p.receive_data(C, req("GET / HTTP/1.1"))
    assert [fmt(e) for e in p.receive_data(S, resp("200 OK", body=b"until close"))] == [
        "< 200 hb=19 body=None"
    ]
    assert p.skip_hint(S) == 0  # read-until-close: unknown


def test_skipped_more_than_body_is_a_gap() -> None:
    p = Http1Parser()
    p.receive_data(C, req("POST / HTTP/1.1", "Content-Length: 10"))
    got = [fmt(e) for e in p.receive_skipped(C, 15)]
    assert got == ["skipped client 10"]
    got = [fmt(e) for e in p.receive_data(C, req("GET / HTTP/1.1"))]
    assert got == ["desync client skip_outside_body dropped=5", "> GET / hb=18 body=0"]


def _megabyte_head(at_end: bytes) -> bytes:
    filler = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"v" * 80) for i in range(10923))
    return b"GET /big HTTP/1.1\r\nHost: h\r\n" + filler + at_end + b"\r\n"


@pytest.mark.parametrize("piece", [1 << 22, 65536, 4096, 1000, 7])
def test_one_mebibyte_head_streams_with_bounded_buffer(piece: int) -> None:
    head = _megabyte_head(b"traceparent: " + TPB + b"\r\n")
    assert len(head) > 1 << 20
    p = Http1Parser(max_buffer=65536)
    events: list[Event] = []
    for i in range(0, len(head), piece):
        events += p.receive_data(C, head[i : i + piece])
        assert len(p._client.buf) <= 65536 or piece > 65536  # white-box: the bound
    events += p.receive_data(C, req("GET /next HTTP/1.1"))
    assert [fmt(e) for e in events] == [
        f"> GET /big host=h hb={len(head)} body=0 traceparent='{TP}'",
        "> GET /next hb=22 body=0",
    ]
    assert len(p._client.buf) == 0


@pytest.mark.parametrize("piece", [1 << 21, 65536, 1000, 3])
def test_huge_propagation_value_is_truncated_and_marked(piece: int) -> None:
    value = b"k=" + b"v" * 200_000
    head = req("GET / HTTP/1.1", "baggage: " + value.decode(), "b3: 1")
    p = Http1Parser(max_buffer=65536, max_value=16384)
    events: list[Event] = []
    for i in range(0, len(head), piece):
        events += p.receive_data(C, head[i : i + piece])
    assert len(events) == 1
    msg = events[0]
    assert isinstance(msg, MessageParsed)
    assert msg.truncated
    assert msg.header_block_bytes == len(head)
    assert msg.headers == (("baggage", value[:16384].decode()), ("b3", "1"))


def test_kept_bytes_per_message_are_bounded() -> None:
    lines = [f"baggage: k{i}=" + "v" * 1000 for i in range(200)]
    p = Http1Parser(max_buffer=65536, max_value=16384)
    (msg,) = p.receive_data(C, req("GET / HTTP/1.1", *lines))
    assert isinstance(msg, MessageParsed)
    assert msg.truncated
    assert 60 <= len(msg.headers) < 200
    assert sum(len(v) for _, v in msg.headers) <= 65536


def test_start_line_too_large() -> None:
    p = Http1Parser(max_buffer=1024)
    head = req("GET /" + "a" * 5000 + " HTTP/1.1") + req("GET /ok HTTP/1.1")
    got = [fmt(e) for e in p.receive_data(C, head)]
    assert got == [
        "fail client http1.start_line_too_large",
        "desync client http1.start_line_too_large dropped=5018",
        "> GET /ok hb=20 body=0",
    ]


def test_garbage_without_newlines_never_grows_the_buffer() -> None:
    p = Http1Parser(max_buffer=4096)
    events: list[Event] = []
    for _ in range(1000):
        events += p.receive_data(S, b"\xff" * 1000)
        assert len(p._server.buf) <= 4096
    events += p.receive_data(S, b"\n" + resp("200 OK", "Content-Length: 0"))
    assert [fmt(e) for e in events] == [
        "fail server http1.bad_start_line",
        "desync server http1.bad_start_line dropped=1000001",
        "< 200 hb=38 body=0",
    ]


def test_waiting_client_is_bounded() -> None:
    p = Http1Parser(max_buffer=1024)
    p.receive_data(C, req("GET / HTTP/1.1", "Upgrade: websocket"))
    p.receive_data(C, b"x" * 600)
    assert len(p._client.buf) == 600
    events = p.receive_data(C, b"y" * 600)  # no answer came; parse on
    assert [fmt(e) for e in events][:1] == ["fail client http1.bad_start_line"]
    assert len(p._client.buf) <= 1024


def test_after_switch_data_is_held_bounded_for_the_next_parser() -> None:
    p = Http1Parser(max_buffer=1024)
    p.receive_data(C, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert p.switched
    assert p.receive_data(C, b"z" * 5000) == []
    assert p.receive_gap(C, 10) == []
    assert p.receive_eof(C) == []
    rest = p.detach_leftover()
    assert rest[C].startswith(b"PRI * HTTP/2.0")
    assert len(rest[C]) == 1024


def test_internal_errors_are_reported_never_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Http1Parser()

    def boom(*args: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(Http1Parser, "_fast_head", boom)
    monkeypatch.setattr(Http1Parser, "_run", boom)
    for call in (
        lambda: p.receive_data(C, b"GET / HTTP/1.1\r\n\r\n"),
        lambda: p.receive_data(C, b"more"),
    ):
        (ev,) = call()
        assert isinstance(ev, ParseFailed)
        assert ev.code == "http1.internal_error"
    monkeypatch.undo()
    got = [fmt(e) for e in p.receive_data(C, b"\r\n" + req("GET / HTTP/1.1"))]
    assert got == ["desync client http1.internal_error dropped=2", "> GET / hb=18 body=0"]


# --------------------------------------------------------------------- properties

_NAMES = [
    "traceparent", "Traceparent", "TRACESTATE", "tracestate", "baggage", "b3", "X-B3-TraceId",
    "x-b3-sampled", "User-Agent", "Accept", "X-Custom", "Host", "host", "Content-Type",
]  # fmt: skip
_values = st.text(alphabet="abcdef0123456789-=,;: \t", max_size=40) | st.text(
    alphabet="ab \t\r", min_size=50, max_size=150
)  # the long ones cross max_buffer=64: lines consumed piecewise, values cut at max_value


@st.composite
def heads(draw: st.DrawFn, *, request: bool) -> tuple[bytes, str]:
    """One head (without framing headers) and its line ending."""
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    if request:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
        target = "/" + draw(st.text(alphabet="abc/?=&%", max_size=20))
        start = f"{method} {target} HTTP/1.{draw(st.sampled_from('01'))}"
    else:
        start = f"HTTP/1.1 {draw(st.sampled_from([200, 201, 400, 404, 500]))} Whatever"
    lines = [start]
    for _ in range(draw(st.integers(0, 8))):
        line = f"{draw(st.sampled_from(_NAMES))}:{draw(_values)}"
        lines.append(line)
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from([" ", "\t"])) + draw(_values))
    return eol.join(lines).encode(), eol


@st.composite
def messages(draw: st.DrawFn, *, request: bool) -> bytes:
    head, eol = draw(heads(request=request))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    e = eol.encode()
    if framing == "length":
        body = draw(st.binary(max_size=60))
        return head + e + b"Content-Length: %d" % len(body) + e + e + body
    if framing == "chunked":
        out = head + e + b"Transfer-Encoding: chunked" + e + e
        for chunk in draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4)):
            ext = draw(st.sampled_from([b"", b";a=b", b" ;x"]))
            out += b"%x" % len(chunk) + ext + e + chunk + e
        out += b"0" + e
        for trailer in draw(st.lists(st.sampled_from([b"X-T: 1", b"traceparent: t"]), max_size=2)):
            out += trailer + e
        return out + e
    if request:
        return head + e + e
    return head + e + b"Content-Length: 0" + e + e


@st.composite
def streams(draw: st.DrawFn, *, request: bool, garbage: bool = False) -> bytes:
    parts = draw(st.lists(messages(request=request), min_size=1, max_size=5))
    if garbage:
        noise = st.binary(max_size=30) | st.sampled_from(
            [b"GET ", b"\nHTTP/1.", b"\r\n", b"HTTP/1.1 200"]
        )
        parts = [p for part in parts for p in (part, draw(noise))]
    return b"".join(parts)


def _feed_split(parser: Http1Parser, origin: Origin, data: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(bounds):
        events += parser.receive_data(origin, data[a:b])
    return events


def _whole_vs_split(client: bytes, server: bytes, cuts: list[int], max_buffer: int) -> None:
    whole = Http1Parser(max_buffer=max_buffer, max_value=48)
    expected = whole.receive_data(C, client) + whole.receive_data(S, server)
    expected += whole.receive_eof(C) + whole.receive_eof(S)
    split = Http1Parser(max_buffer=max_buffer, max_value=48)
    got = _feed_split(split, C, client, cuts) + _feed_split(split, S, server, cuts)
    got += split.receive_eof(C) + split.receive_eof(S)
    assert [fmt(e) for e in got] == [fmt(e) for e in expected]
    single = Http1Parser(max_buffer=max_buffer, max_value=48)
    bytewise = _feed_split(single, C, client, list(range(len(client))))
    bytewise += _feed_split(single, S, server, list(range(len(server))))
    bytewise += single.receive_eof(C) + single.receive_eof(S)
    assert [fmt(e) for e in bytewise] == [fmt(e) for e in expected]


_PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPS
@given(
    client=streams(request=True),
    server=streams(request=False),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    max_buffer=st.sampled_from([64, 100, 65536]),
)
def test_any_split_yields_the_same_messages(
    client: bytes, server: bytes, cuts: list[int], max_buffer: int
) -> None:
    """Whole chunks take the block path; small pieces of heads bigger than max_buffer take
    the streaming path: both give the same events."""
    whole = Http1Parser(max_buffer=max_buffer)
    msgs = [e for e in whole.receive_data(C, client) if isinstance(e, MessageParsed)]
    assert msgs  # the generator makes real messages
    _whole_vs_split(client, server, cuts, max_buffer)


@_PROPS
@given(
    client=streams(request=True, garbage=True),
    server=streams(request=False, garbage=True),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    max_buffer=st.sampled_from([64, 65536]),
)
def test_any_split_of_damaged_streams_gives_the_same_events(
    client: bytes, server: bytes, cuts: list[int], max_buffer: int
) -> None:
    _whole_vs_split(client, server, cuts, max_buffer)


_ops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([C, S]), st.binary(max_size=80)),
        st.tuples(
            st.sampled_from([C, S]),
            st.sampled_from(
                [
                    b"GET / HTTP/1.1\r\n",
                    b"HTTP/1.1 101 x\r\nUpgrade: h2c\r\n\r\n",
                    b"Transfer-Encoding: chunked\r\n\r\n",
                    b"Content-Length: 5\r\n\r\n",
                    b"CONNECT a:1 HTTP/1.1\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\n",
                    b"Upgrade: websocket\r\n",
                    b" fold\r\n",
                    b"\r\n",
                    b"ffffffffffffffff\r\n",
                    b"PRI * HTTP/2.0",
                ]
            ),
        ),
        st.tuples(st.sampled_from(["gap", "skip"]), st.sampled_from([C, S]), st.integers(1, 100)),
        st.tuples(st.just("eof"), st.sampled_from([C, S])),
    ),
    max_size=30,
)


@settings(max_examples=400, deadline=None)
@given(steps=_ops, max_buffer=st.sampled_from([64, 256, 65536]))
def test_arbitrary_input_never_raises_and_stays_bounded(steps: list[Step], max_buffer: int) -> None:
    p = Http1Parser(max_buffer=max_buffer)
    for step in steps:
        events = play(p, [step])
        for ev in events:
            assert not (isinstance(ev, ParseFailed) and ev.code == "http1.internal_error"), ev
        for origin in (C, S):
            assert p.skip_hint(origin) >= 0
        if not p.switched:
            assert len(p._client.buf) <= max(max_buffer, 80 + 64)
            assert len(p._server.buf) <= max(max_buffer, 80 + 64)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), count=st.integers(1, 6))
def test_gaps_inside_bodies_keep_sync(data: st.DataObject, count: int) -> None:
    """Replace part of every Content-Length body by a gap: the same messages come out."""
    pieces: list[tuple[bytes, bytes]] = []
    for i in range(count):
        body = data.draw(st.binary(min_size=1, max_size=200))
        head = req(f"POST /{i} HTTP/1.1", f"traceparent: {TP}", f"Content-Length: {len(body)}")
        pieces.append((head, body))
    clean = Http1Parser()
    expected = [fmt(e) for e in clean.receive_data(C, b"".join(h + b for h, b in pieces))]
    lossy = Http1Parser()
    got: list[Event] = []
    for head, body in pieces:
        a = data.draw(st.integers(0, len(body)))
        b = data.draw(st.integers(a, len(body)))
        got += lossy.receive_data(C, head + body[:a])
        assert lossy.skip_hint(C) == len(body) - a
        if b > a:
            got += lossy.receive_gap(C, b - a)
        got += lossy.receive_data(C, body[b:])
    assert [fmt(e) for e in got if not isinstance(e, BodySkipped)] == expected


# --------------------------------------------------------------------- at rest

REST_CASES: list[tuple[str, list[Step], bool]] = [
    ("fresh", [], True),
    ("exchange", [(C, req("GET / HTTP/1.1", "Host: a")), (S, resp("200 OK", "Content-Length: 0"))],
     True),
    ("response-until-close", [(C, req()), (S, resp("200 OK", body=b"abc"))], False),
    ("exchange-with-bodies", [
        (C, req("POST /p HTTP/1.1", "Content-Length: 3", body=b"abc")),
        (S, resp("200 OK", "Content-Length: 2", body=b"ok")),
    ], True),
    ("head-request", [(C, req("HEAD / HTTP/1.1")), (S, resp("200 OK", "Content-Length: 9"))], True),
    ("request-waiting", [(C, req("GET / HTTP/1.1"))], False),
    ("half-a-head", [(C, b"GET / HTTP/1.1\r\nHost: a\r\n")], False),
    ("in-a-body", [(C, req("POST / HTTP/1.1", "Content-Length: 10", body=b"abc"))], False),
    ("in-a-chunked-response", [
        (C, req()), (S, resp("200 OK", "Transfer-Encoding: chunked", body=b"5\r\nab")),
    ], False),
    ("interim-response-only", [(C, req()), (S, resp("100 Continue"))], False),
    ("desynced", [(C, req()), (S, resp("200 OK", "Content-Length: 2", body=b"ok")),
                  ("gap", C, 7), (C, b"ET /x HT")], False),
    ("upgraded", [(C, req("GET / HTTP/1.1", "Upgrade: websocket", "Connection: upgrade")),
                  (S, resp("101 Switching Protocols", "Upgrade: websocket"))], False),
    ("upgrade-asked", [(C, req("GET / HTTP/1.1", "Upgrade: h2c", "Connection: upgrade"))],
     False),
]


@pytest.mark.parametrize(("steps", "rest"), [pytest.param(s, r, id=n) for n, s, r in REST_CASES])
def test_at_rest_only_between_messages_with_nothing_held(steps: list[Step], rest: bool) -> None:
    parser = Http1Parser()
    play(parser, steps)
    assert parser.at_rest is rest


_EXCHANGES: list[list[Step]] = [
    [(C, req("GET /a HTTP/1.1", f"traceparent: {TP}")),
     (S, resp("200 OK", "Content-Length: 2", body=b"ok"))],
    [(C, req("POST /b HTTP/1.1", "Content-Length: 4", body=b"abcd")),
     (S, resp("201 Created", "Transfer-Encoding: chunked", body=b"3\r\nabc\r\n0\r\n\r\n"))],
    [(C, req("HEAD /c HTTP/1.1")), (S, resp("200 OK", "Content-Length: 99"))],
    [(C, req("GET /d HTTP/1.1", "Expect: 100-continue")), (S, resp("100 Continue")),
     (S, resp("204 No Content"))],
    # a body the kernel skipped (the daemon asked it to)
    [(C, req("GET /e HTTP/1.1")), (S, resp("200 OK", "Content-Length: 10", body=b"ab")),
     ("skip", S, 8)],
]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(0, len(_EXCHANGES) - 1), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
)
def test_a_parser_at_rest_can_be_replaced_by_a_new_one(picks: list[int], cuts: list[int]) -> None:
    """Whatever the exchanges and however they are split: swapping in a new parser at every
    point where the old one is at rest gives the same events as keeping one parser."""
    steps: list[Step] = []
    cut = itertools.cycle(cuts)
    for i in picks:
        for step in _EXCHANGES[i]:
            if step[0] == "skip":
                steps.append(step)
                continue
            origin, data = step
            assert isinstance(data, bytes)
            pos = 0
            while pos < len(data):
                n = next(cut)
                steps.append((origin, data[pos : pos + n]))
                pos += n
    whole = [fmt(ev) for ev in play(Http1Parser(), steps)]
    parser, swapped, rests = Http1Parser(), [], 0
    for step in steps:
        swapped += [fmt(ev) for ev in play(parser, [step])]
        if parser.at_rest:
            parser, rests = Http1Parser(), rests + 1
    assert swapped == whole
    assert rests >= len(picks)  # at least after every exchange
