"""Golden cases and properties for hopwatch.propagation.

Vectors are built from the W3C Trace Context test suite (w3c/trace-context test/test.py,
Level 2 key grammar after w3c/trace-context#584), the W3C Baggage spec and its tests
(w3c/baggage), the openzipkin/b3-propagation README and the OpenTelemetry propagator
documentation. Secret-shaped test values are assembled from pieces so that the source
file itself never holds one.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopwatch.propagation import (
    DEFAULT_LIMITS,
    HEADER_NAMES,
    SENSITIVE_DETECTORS,
    Finding,
    Limits,
    TraceContext,
    Verdict,
    check_header,
    check_message,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP_ID = "0af7651916cd43dd8448eb211c80319c"
T = "12345678901234567890123456789012"  # the W3C suite's trace-id
P = "1234567890123456"  # the W3C suite's parent-id
B3_T = "80f198ee56343ba864fe8b2a57d3eff7"
B3_S = "e457b5a2e4d86bd1"
B3_P = "05e3ac9a4f6e3b90"


def tp(version: str = "00", trace: str = T, parent: str = P, flags: str = "01") -> str:
    return f"{version}-{trace}-{parent}-{flags}"


def members(n: int, prefix: str = "bar") -> str:
    return ",".join(f"{prefix}{i:02d}={i:02d}" for i in range(1, n + 1))


@dataclass(frozen=True)
class Case:
    id: str
    headers: list[tuple[str, str]]
    codes: frozenset[str] = field(default_factory=frozenset)
    context: str | None = None  # expected Verdict.context when given


def case(
    id: str,
    headers: list[tuple[str, str]] | tuple[str, str],
    *codes: str,
    context: str | None = None,
) -> Case:
    hs = [headers] if isinstance(headers, tuple) else headers
    return Case(id, hs, frozenset(codes), context)


# --- clean values: no finding at all ----------------------------------------------------

CLEAN = [
    # traceparent (W3C examples and test suite)
    case("tp-spec-sampled", ("traceparent", TP), context="w3c"),
    case("tp-spec-unsampled", ("traceparent", TP[:-2] + "00"), context="w3c"),
    case("tp-suite", ("traceparent", tp()), context="w3c"),
    case("tp-name-mixed-case", ("TrAcEpArEnT", tp()), context="w3c"),
    case("tp-name-upper", ("TRACEPARENT", tp()), context="w3c"),
    case("tp-ows-leading-space", ("traceparent", " " + tp()), context="w3c"),
    case("tp-ows-leading-tab", ("traceparent", "\t" + tp()), context="w3c"),
    case("tp-ows-trailing-space", ("traceparent", tp() + " "), context="w3c"),
    case("tp-ows-trailing-tab", ("traceparent", tp() + "\t"), context="w3c"),
    case("tp-ows-both", ("traceparent", "\t " + tp() + " \t"), context="w3c"),
    case("tp-future-version-cc", ("traceparent", tp("cc")), context="w3c"),
    case(
        "tp-future-version-extra-fields",
        ("traceparent", tp("cc") + "-what-the-future-will-be-like"),
        context="w3c",
    ),
    case("tp-future-version-01-empty-extra", ("traceparent", tp("01") + "-"), context="w3c"),
    case("tp-version-fe", ("traceparent", tp("fe")), context="w3c"),
    case("tp-flags-random-l2", ("traceparent", tp(flags="02")), context="w3c"),
    case("tp-flags-reserved-bits", ("traceparent", tp(flags="ff")), context="w3c"),
    case("tp-flags-09", ("traceparent", tp(flags="09")), context="w3c"),
    # tracestate
    case("ts-otel-example", ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")),
    case("ts-single", ("tracestate", "congo=t61rcWkgMzE")),
    case("ts-empty-header", ("tracestate", "")),
    case("ts-ows-only", ("tracestate", " \t ")),
    case("ts-empty-members", ("tracestate", ",foo=1,, ,bar=2,")),
    case("ts-ows-around-members", ("tracestate", "foo=1 \t , \t bar=2, \t baz=3")),
    case("ts-ows-tabs", ("tracestate", "foo=1\t \t,\t \tbar=2,\t \tbaz=3")),
    case("ts-ows-leading", ("tracestate", "\t foo=1 \t")),
    case("ts-value-leading-space", ("tracestate", "foo= bar")),
    case("ts-tenant-system-key", ("tracestate", "fw529a3039@dt=1,rojo=2")),
    case("ts-digit-first-key", ("tracestate", "0a1b@vendor=1,9key=2")),
    case("ts-l2-at-sign-end", ("tracestate", "foo@=1,bar=2")),
    case("ts-l2-double-at", ("tracestate", "foo@@bar=1,bar=2")),
    case("ts-l2-two-at", ("tracestate", "foo@bar@baz=1,bar=2")),
    case("ts-key-256", ("tracestate", "z" * 256 + "=1")),
    case("ts-tenant-241-system-14", ("tracestate", "t" * 241 + "@" + "v" * 14 + "=1")),
    case("ts-l2-long-tenant", ("tracestate", "t" * 242 + "@v=1")),
    case("ts-l2-long-system", ("tracestate", "t@" + "v" * 15 + "=1")),
    case("ts-value-256", ("tracestate", "k=" + "v" * 256)),
    case(
        "ts-all-allowed-characters",
        (
            "tracestate",
            string.ascii_lowercase
            + string.digits
            + "_-*/@a-z0-9_-*/="
            + "".join(map(chr, range(0x20, 0x2C)))
            + "".join(map(chr, range(0x2D, 0x3D)))
            + "".join(map(chr, range(0x3E, 0x7F))),
        ),
    ),
    case(
        "ts-32-members-over-4-lines",
        [
            ("tracestate", members(10)),
            ("tracestate", ",".join(f"bar{i}={i}" for i in range(11, 21))),
            ("tracestate", ",".join(f"bar{i}={i}" for i in range(21, 31))),
            ("tracestate", "bar31=31,bar32=32"),
        ],
    ),
    case("ts-combined-empty-line", [("tracestate", "foo=1"), ("tracestate", "")]),
    # baggage (W3C examples and w3c/baggage tests)
    case("bg-spec-example", ("baggage", "userId=alice,serverNode=DF%2028,isProduction=false")),
    case(
        "bg-spec-split-lines",
        [("baggage", "userId=alice"), ("baggage", "serverNode=DF%2028,isProduction=false")],
    ),
    case(
        "bg-spec-ows-around-equals",
        [
            ("baggage", "userId =   alice"),
            ("baggage", "serverNode = DF%2028, isProduction = false"),
        ],
    ),
    case(
        "bg-spec-properties",
        (
            "baggage",
            "key1=value1;property1;property2, key2 = value2, "
            "key3=value3; propertyKey=propertyValue",
        ),
    ),
    case(
        "bg-suite-ows-everywhere",
        (
            "baggage",
            "SomeKey \t = \t SomeValue \t ; \t SomeProp \t , \t SomeKey2 \t = \t SomeValue2"
            " \t ; \t ValueProp \t = \t PropVal",
        ),
    ),
    case("bg-equals-in-value", ("baggage", "SomeKey=SomeValue=equals")),
    case(
        "bg-percent-encoded-specials",
        ("baggage", "SomeKey=%09%20%22%27%3B%3Dasdf%21%40%23%24%25%5E%26%2A%28%29"),
    ),
    case("bg-utf8-encoded", ("baggage", "city=K%C3%B8benhavn")),
    case("bg-empty-value", ("baggage", "flag=")),
    case("bg-token-key-chars", ("baggage", "a!#$%&'*+-.^_`|~z=1")),
    case("bg-duplicate-keys-allowed", ("baggage", "k=1,k=2")),
    case("bg-empty-elements-ignored", ("baggage", "a=1,,b=2, ,")),
    case("bg-64-members", ("baggage", ",".join(f"key{i}=value" for i in range(64)))),
    case("bg-8192-bytes", ("baggage", "a=" + "0123456789" * 819)),
    case("bg-uuid", ("baggage", "session=3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b")),
    case("bg-ms-timestamp", ("baggage", "ts=1700000000000,ts2=1712345678901")),
    case("bg-luhn-invalid-card", ("baggage", "n=4111111111111112")),
    case("bg-long-digits-not-card", ("baggage", "order=12345678901234567890123")),
    case("bg-at-sign-not-email", ("baggage", "handle=%40alice")),
    # b3 single (README forms)
    case("b3-trace-span", ("b3", f"{B3_T}-{B3_S}"), context="b3"),
    case("b3-sampled", ("b3", f"{B3_T}-{B3_S}-1"), context="b3"),
    case("b3-deny", ("b3", f"{B3_T}-{B3_S}-0"), context="b3"),
    case("b3-debug", ("b3", f"{B3_T}-{B3_S}-d"), context="b3"),
    case("b3-with-parent", ("b3", f"{B3_T}-{B3_S}-1-{B3_P}"), context="b3"),
    case("b3-64bit-trace", ("b3", f"{B3_T[16:]}-{B3_S}-1"), context="b3"),
    case("b3-sampling-only-0", ("b3", "0"), context="none"),
    case("b3-sampling-only-1", ("b3", "1"), context="none"),
    case("b3-sampling-only-d", ("b3", "d"), context="none"),
    case("b3-ows", ("b3", f" {B3_T}-{B3_S}-1 "), context="b3"),
    case("b3-same-value-twice", [("b3", f"{B3_T}-{B3_S}"), ("b3", f"{B3_T}-{B3_S}")]),
    # x-b3-* (README)
    case(
        "xb3-trace-span",
        [("X-B3-TraceId", "463ac35c9f6413ad48485a3953bb6124"), ("X-B3-SpanId", "a2fb4a1d1a96d312")],
        context="b3",
    ),
    case(
        "xb3-full-set",
        [
            ("X-B3-TraceId", B3_T),
            ("X-B3-ParentSpanId", "0020000000000001"),
            ("X-B3-SpanId", B3_S),
            ("X-B3-Sampled", "1"),
        ],
        context="b3",
    ),
    case(
        "xb3-64bit",
        [("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", "a2fb4a1d1a96d312")],
        context="b3",
    ),
    case(
        "xb3-debug-flag",
        [("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-flags", "1")],
        context="b3",
    ),
    case(
        "xb3-lenient-true",
        [("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-sampled", "true")],
        context="b3",
    ),
    case("xb3-sampled-deny-alone", ("x-b3-sampled", "0"), context="none"),
    case(
        "b3-single-and-multi-agree",
        [("b3", f"{B3_T}-{B3_S}-1"), ("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S)],
        context="b3",
    ),
    # W3C + B3 in one message
    case(
        "both-same-128",
        [("traceparent", f"00-{B3_T}-{B3_S}-01"), ("b3", f"{B3_T}-{B3_S}-1")],
        context="both",
    ),
    case(
        "both-64bit-b3-low-half",
        [("traceparent", TP), ("x-b3-traceid", TP_ID[16:]), ("x-b3-spanid", B3_S)],
        context="both",
    ),
    case("both-b3-deferred", [("traceparent", TP), ("b3", f"{TP_ID}-{B3_S}")], context="both"),
    # unrelated headers are ignored
    case("other-headers", [("Host", "x"), ("Content-Type", "text/plain"), ("trace-parent", "zz")]),
    case("nothing", [], context="none"),
]

# --- findings ----------------------------------------------------------------------------

FINDINGS = [
    # traceparent
    case(
        "tp-duplicate",
        [("traceparent", tp(trace=T[:-1] + "1")), ("traceparent", tp())],
        "traceparent.duplicate",
        context="none",
    ),
    case(
        "tp-duplicate-identical",
        [("traceparent", tp()), ("TraceParent", tp())],
        "traceparent.duplicate",
        context="none",
    ),
    case("tp-folded-comma", ("traceparent", tp() + ", " + tp()), "traceparent.multiple_values"),
    case("tp-empty", ("traceparent", ""), "traceparent.empty"),
    case("tp-uppercase", ("traceparent", TP.upper()), "traceparent.uppercase_hex"),
    case("tp-uppercase-flags", ("traceparent", tp(flags="0A")), "traceparent.uppercase_hex"),
    case("tp-v00-trailing-dot", ("traceparent", tp() + "."), "traceparent.bad_flags"),
    case(
        "tp-v00-extra-fields",
        ("traceparent", tp() + "-what-the-future-will-be-like"),
        "traceparent.bad_length",
    ),
    case("tp-v00-trailing-dash", ("traceparent", tp() + "-"), "traceparent.bad_length"),
    case(
        "tp-future-dot-after-flags",
        ("traceparent", tp("cc") + ".what-the-future-will-be-like"),
        "traceparent.bad_flags",
    ),
    case("tp-future-too-short", ("traceparent", "cc-" + T + "-" + P), "traceparent.bad_format"),
    case("tp-version-ff", ("traceparent", tp("ff")), "traceparent.version_ff"),
    case("tp-version-illegal-1", ("traceparent", tp(".0")), "traceparent.bad_version"),
    case("tp-version-illegal-2", ("traceparent", tp("0.")), "traceparent.bad_version"),
    case("tp-version-too-long", ("traceparent", tp("000")), "traceparent.bad_version"),
    case("tp-version-too-long-4", ("traceparent", tp("0000")), "traceparent.bad_version"),
    case("tp-version-too-short", ("traceparent", tp("0")), "traceparent.bad_version"),
    case("tp-trace-id-zero", ("traceparent", tp(trace="0" * 32)), "traceparent.zero_trace_id"),
    case(
        "tp-trace-id-illegal-1", ("traceparent", tp(trace="." + T[1:])), "traceparent.bad_trace_id"
    ),
    case(
        "tp-trace-id-illegal-2", ("traceparent", tp(trace=T[:-1] + ".")), "traceparent.bad_trace_id"
    ),
    case("tp-trace-id-too-long", ("traceparent", tp(trace=T + "3")), "traceparent.bad_trace_id"),
    case("tp-trace-id-too-short", ("traceparent", tp(trace=T[:-1])), "traceparent.bad_trace_id"),
    case("tp-parent-id-zero", ("traceparent", tp(parent="0" * 16)), "traceparent.zero_parent_id"),
    case(
        "tp-parent-id-illegal-1",
        ("traceparent", tp(parent="." + P[1:])),
        "traceparent.bad_parent_id",
    ),
    case(
        "tp-parent-id-illegal-2",
        ("traceparent", tp(parent=P[:-1] + ".")),
        "traceparent.bad_parent_id",
    ),
    case("tp-parent-id-too-long", ("traceparent", tp(parent=P + "7")), "traceparent.bad_parent_id"),
    case("tp-parent-id-too-short", ("traceparent", tp(parent=P[:-1])), "traceparent.bad_parent_id"),
    case("tp-flags-illegal-1", ("traceparent", tp(flags=".0")), "traceparent.bad_flags"),
    case("tp-flags-illegal-2", ("traceparent", tp(flags="0.")), "traceparent.bad_flags"),
    case("tp-flags-too-long", ("traceparent", tp(flags="001")), "traceparent.bad_flags"),
    case("tp-flags-too-short", ("traceparent", tp(flags="1")), "traceparent.bad_flags"),
    case(
        "tp-both-ids-zero",
        ("traceparent", tp(trace="0" * 32, parent="0" * 16)),
        "traceparent.zero_trace_id",
        "traceparent.zero_parent_id",
    ),
    case(
        "tp-inner-whitespace",
        ("traceparent", tp().replace("-", " -", 1)),
        "traceparent.bad_version",
    ),
    case("tp-crlf-not-ows", ("traceparent", tp() + "\r\n"), "traceparent.bad_flags"),
    case("tp-garbage", ("traceparent", "hello"), "traceparent.bad_version"),
    # tracestate
    case("ts-duplicate-key", ("tracestate", "foo=1,foo=1"), "tracestate.duplicate_key"),
    case("ts-duplicate-key-diff", ("tracestate", "foo=1,foo=2"), "tracestate.duplicate_key"),
    case(
        "ts-duplicate-key-lines",
        [("tracestate", "foo=1"), ("tracestate", "foo=2")],
        "tracestate.duplicate_key",
    ),
    case("ts-key-space", ("tracestate", "foo =1"), "tracestate.bad_key"),
    case("ts-key-upper", ("tracestate", "FOO=1"), "tracestate.bad_key"),
    case("ts-key-dot", ("tracestate", "foo.bar=1"), "tracestate.bad_key"),
    case("ts-key-at-first", ("tracestate", "@foo=1,bar=2"), "tracestate.bad_key"),
    case("ts-key-empty", ("tracestate", "=1"), "tracestate.bad_key"),
    case("ts-key-257", ("tracestate", "foo=1," + "z" * 257 + "=1"), "tracestate.key_too_long"),
    case("ts-value-with-equals", ("tracestate", "foo=bar=baz"), "tracestate.bad_value"),
    case("ts-value-empty", ("tracestate", "foo=,bar=3"), "tracestate.empty_value"),
    case("ts-value-257", ("tracestate", "k=" + "v" * 257), "tracestate.value_too_long"),
    case("ts-value-tab", ("tracestate", "k=a\tb"), "tracestate.bad_value"),
    case("ts-value-non-ascii", ("tracestate", "k=caf\u00e9"), "tracestate.bad_value"),
    case("ts-no-equals", ("tracestate", "foo"), "tracestate.bad_member"),
    case(
        "ts-33-members",
        [("tracestate", members(30)), ("tracestate", "bar31=31,bar32=32,bar33=33")],
        "tracestate.too_many_members",
    ),
    case(
        "ts-over-512-bytes",
        ("tracestate", "a=" + "x" * 200 + ",b=" + "y" * 200 + ",c=" + "z" * 200),
        "tracestate.too_long",
    ),
    # baggage
    case("bg-no-equals", ("baggage", "alice"), "baggage.bad_member"),
    case("bg-bad-key", ("baggage", "user id=1"), "baggage.bad_key"),
    case("bg-empty-key", ("baggage", "=1"), "baggage.bad_key"),
    case("bg-key-with-slash", ("baggage", "a/b=1"), "baggage.bad_key"),
    case("bg-space-in-value", ("baggage", "serverNode=DF 28"), "baggage.bad_value"),
    case("bg-quote-in-value", ("baggage", 'k="v"'), "baggage.bad_value"),
    case("bg-backslash-in-value", ("baggage", "k=a\\b"), "baggage.bad_value"),
    case("bg-non-ascii-value", ("baggage", "city=K\u00f8benhavn"), "baggage.bad_value"),
    case("bg-empty-property", ("baggage", "k=v;"), "baggage.bad_property"),
    case("bg-bad-property-key", ("baggage", "k=v;a b"), "baggage.bad_property"),
    case("bg-bad-percent", ("baggage", "k=100%"), "baggage.bad_percent_encoding"),
    case("bg-bad-percent-hex", ("baggage", "k=%zz"), "baggage.bad_percent_encoding"),
    case("bg-bad-utf8", ("baggage", "k=%C3%28"), "baggage.bad_utf8"),
    case(
        "bg-65-members",
        ("baggage", ",".join(f"key{i}=value" for i in range(65))),
        "baggage.too_many_members",
    ),
    case("bg-8193-bytes", ("baggage", "a=" + "0123456789" * 819 + "b"), "baggage.too_long"),
    case(
        "bg-8193-bytes-over-lines",
        [("baggage", "a=" + "0" * 4095), ("baggage", "b=" + "1" * 4094)],
        "baggage.too_long",
    ),
    # b3 single
    case("b3-empty", ("b3", ""), "b3.empty"),
    case("b3-uppercase", ("b3", f"{B3_T.upper()}-{B3_S}-1"), "b3.uppercase_hex"),
    case("b3-trace-bad-length", ("b3", f"{B3_T[:20]}-{B3_S}"), "b3.bad_trace_id"),
    case("b3-trace-not-hex", ("b3", f"{'g' * 16}-{B3_S}"), "b3.bad_trace_id"),
    case("b3-trace-zero", ("b3", f"{'0' * 32}-{B3_S}"), "b3.zero_trace_id"),
    case("b3-trace-zero-64", ("b3", f"{'0' * 16}-{B3_S}"), "b3.zero_trace_id"),
    case("b3-span-bad", ("b3", f"{B3_T}-{B3_S[:15]}"), "b3.bad_span_id"),
    case("b3-span-zero", ("b3", f"{B3_T}-{'0' * 16}"), "b3.zero_span_id"),
    case("b3-bad-sampling", ("b3", f"{B3_T}-{B3_S}-2"), "b3.bad_sampling"),
    case("b3-sampling-true", ("b3", f"{B3_T}-{B3_S}-true"), "b3.bad_sampling"),
    case("b3-parent-in-third-field", ("b3", f"{B3_T}-{B3_S}-{B3_P}"), "b3.bad_sampling"),
    case("b3-parent-bad", ("b3", f"{B3_T}-{B3_S}-1-{B3_P[:8]}"), "b3.bad_parent_id"),
    case("b3-parent-zero", ("b3", f"{B3_T}-{B3_S}-1-{'0' * 16}"), "b3.zero_parent_id"),
    case("b3-too-many-fields", ("b3", f"{B3_T}-{B3_S}-1-{B3_P}-x"), "b3.bad_format"),
    case("b3-sampling-only-bad", ("b3", "2"), "b3.bad_sampling"),
    case("b3-word", ("b3", "true"), "b3.bad_format"),
    case("b3-duplicate-different", [("b3", f"{B3_T}-{B3_S}"), ("b3", "0")], "b3.duplicate"),
    # x-b3-* values
    case(
        "xb3-trace-bad-length",
        [("x-b3-traceid", B3_T[:30]), ("x-b3-spanid", B3_S)],
        "x-b3-traceid.bad_length",
    ),
    case(
        "xb3-trace-upper",
        [("x-b3-traceid", B3_T.upper()), ("x-b3-spanid", B3_S)],
        "x-b3-traceid.uppercase_hex",
    ),
    case(
        "xb3-trace-not-hex",
        [("x-b3-traceid", "z" * 16), ("x-b3-spanid", B3_S)],
        "x-b3-traceid.not_hex",
    ),
    case(
        "xb3-trace-zero",
        [("x-b3-traceid", "0" * 16), ("x-b3-spanid", B3_S)],
        "x-b3-traceid.zero_id",
    ),
    case(
        "xb3-span-bad",
        [("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S + "0")],
        "x-b3-spanid.bad_length",
    ),
    case(
        "xb3-span-zero", [("x-b3-traceid", B3_T), ("x-b3-spanid", "0" * 16)], "x-b3-spanid.zero_id"
    ),
    case(
        "xb3-parent-bad",
        [("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-parentspanid", "x")],
        "x-b3-parentspanid.bad_length",
    ),
    case(
        "xb3-sampled-bad",
        [("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-sampled", "d")],
        "x-b3-sampled.bad_value",
    ),
    case(
        "xb3-flags-bad",
        [("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-flags", "2")],
        "x-b3-flags.bad_value",
    ),
    case(
        "xb3-duplicate-trace",
        [("x-b3-traceid", B3_T), ("x-b3-traceid", TP_ID), ("x-b3-spanid", B3_S)],
        "x-b3-traceid.duplicate",
    ),
    # x-b3-* set
    case("xb3-span-without-trace", ("x-b3-spanid", B3_S), "x-b3.span_without_trace"),
    case("xb3-trace-without-span", ("x-b3-traceid", B3_T), "x-b3.trace_without_span"),
    case(
        "xb3-parent-without-span",
        [("x-b3-traceid", B3_T), ("x-b3-parentspanid", B3_P)],
        "x-b3.trace_without_span",
        "x-b3.parent_without_span",
    ),
    case(
        "xb3-debug-but-deny",
        [("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-flags", "1"), ("x-b3-sampled", "0")],
        "x-b3.debug_not_sampled",
    ),
    case(
        "b3-single-contradicts-multi",
        [("b3", f"{B3_T}-{B3_S}-1"), ("x-b3-traceid", TP_ID), ("x-b3-spanid", B3_S)],
        "b3.contradicts_multi",
        context="b3",
    ),
    case(
        "b3-single-sampling-contradicts-multi",
        [("b3", "0"), ("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-sampled", "1")],
        "b3.contradicts_multi",
        context="b3",
    ),
    # cross-format
    case(
        "conflict-trace-id",
        [("traceparent", TP), ("b3", f"{B3_T}-{B3_S}-1")],
        "conflict.trace_id",
        context="both",
    ),
    case(
        "conflict-64bit-low-half-differs",
        [("traceparent", TP), ("x-b3-traceid", B3_T[16:]), ("x-b3-spanid", B3_S)],
        "conflict.trace_id",
        context="both",
    ),
    case(
        "conflict-sampled",
        [("traceparent", TP), ("b3", f"{TP_ID}-{B3_S}-0")],
        "conflict.sampled",
        context="both",
    ),
    case(
        "conflict-not-with-invalid-b3",
        [("traceparent", TP), ("b3", f"{B3_T}-{B3_S}-x")],
        "b3.bad_sampling",
        context="w3c",
    ),
]


def _codes(v: Verdict) -> frozenset[str]:
    return frozenset(f.code for f in v.findings)


@pytest.mark.parametrize("c", CLEAN, ids=lambda c: c.id)
def test_clean_values_have_no_findings(c: Case) -> None:
    v = check_message(c.headers)
    assert v.findings == ()
    assert v.valid
    if c.context is not None:
        assert v.context == c.context


@pytest.mark.parametrize("c", FINDINGS, ids=lambda c: c.id)
def test_findings(c: Case) -> None:
    v = check_message(c.headers)
    assert _codes(v) == c.codes
    kinds = {f.kind for f in v.findings}
    assert v.valid == (not kinds & {"malformed", "oversized"})
    if c.context is not None:
        assert v.context == c.context
    for f in v.findings:
        assert f.code.split(".")[0] in {
            "traceparent",
            "tracestate",
            "baggage",
            "b3",
            "x-b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
            "conflict",
        }
        assert f.header == f.header.lower()


def test_every_code_family_is_exercised() -> None:
    kinds = {f.kind for c in FINDINGS for f in check_message(c.headers).findings}
    assert kinds == {"malformed", "oversized", "conflict"}


# --- sensitive baggage --------------------------------------------------------------------

AWS = "AKIA" + "IOSFODNN7" + "EXAMPLE"
GH = "ghp" + "_" + "a1B2c3D4e5F6g7H8i9J0" + "k1L2m3N4o5P6q7R8"
GH_PAT = "github" + "_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
SLACK = "xox" + "b-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE = "sk" + "_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
GOOGLE = "AIza" + "SyA-1234567890abcdefghijklmnopqrstu"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)

SENSITIVE_CASES = [
    ("email", "user=alice@example.com", "sensitive.email"),
    ("email-encoded", "user=alice%40example.com", "sensitive.email"),
    ("email-in-property", "k=v;owner=bob%40corp.example.org", "sensitive.email"),
    ("card-visa", "pan=4111111111111111", "sensitive.card_number"),
    ("card-spaces", "pan=4111%201111%201111%201111", "sensitive.card_number"),
    ("card-dashes", "pan=5555-5555-5555-4444", "sensitive.card_number"),
    ("card-amex", "pan=378282246310005", "sensitive.card_number"),
    ("card-discover-19", "pan=6011000990139424", "sensitive.card_number"),
    ("jwt", f"session={JWT}", "sensitive.jwt"),
    ("bearer", "auth=Bearer%20abcdefghijklmnopqrstuvwx", "sensitive.bearer_token"),
    ("bearer-plus", "auth=bearer+abcdefghijklmnop1234", "sensitive.bearer_token"),
    ("aws", f"k={AWS}", "sensitive.aws_access_key"),
    ("github", f"k={GH}", "sensitive.github_token"),
    ("github-pat", f"k={GH_PAT}", "sensitive.github_token"),
    ("gitlab", "k=glpat-" + "abcdefghij0123456789", "sensitive.gitlab_token"),
    ("slack", f"k={SLACK}", "sensitive.slack_token"),
    ("stripe", f"k={STRIPE}", "sensitive.stripe_key"),
    ("google", f"k={GOOGLE}", "sensitive.google_api_key"),
    ("npm", "k=npm_" + "a" * 36, "sensitive.npm_token"),
    ("sk-api-key", "k=sk-" + "proj-" + "A1b2" * 10, "sensitive.api_key"),
    ("private-key", "k=-----BEGIN%20RSA%20PRIVATE%20KEY-----MIIE", "sensitive.private_key"),
    ("url-credentials", "k=https://admin:hunter2@db.example", "sensitive.url_credentials"),
    ("in-malformed-member", "user=alice@example.com ok", "sensitive.email"),
]


@pytest.mark.parametrize(
    ("value", "code"),
    [(v, c) for _, v, c in SENSITIVE_CASES],
    ids=[i for i, _, _ in SENSITIVE_CASES],
)
def test_sensitive_detectors(value: str, code: str) -> None:
    v = check_message([("baggage", value)])
    sens = [f for f in v.findings if f.kind == "sensitive"]
    assert code in {f.code for f in sens}
    secret = value.partition("=")[2]
    for f in v.findings:
        assert f.header == "baggage"
        assert secret not in f.detail
        assert "example.com" not in f.detail
    # sensitive alone leaves the message valid
    if not any(f.kind == "malformed" for f in v.findings):
        assert v.valid


def test_every_detector_has_a_case() -> None:
    assert {c for _, _, c in SENSITIVE_CASES} == set(SENSITIVE_DETECTORS)


def test_sensitive_detail_names_member_and_key_not_value() -> None:
    v = check_message([("baggage", "a=1,user_email=carol%40example.net")])
    (f,) = v.findings
    assert f == Finding(
        "sensitive",
        "baggage",
        "sensitive.email",
        "member 2 (key 'user_email') carries an e-mail address",
    )


def test_sensitive_can_be_disabled() -> None:
    v = check_message([("baggage", "user=alice@example.com")], sensitive=False)
    assert v.findings == ()
    assert v.has_baggage


def test_several_detectors_one_finding_each() -> None:
    v = check_message(
        [("baggage", "a=x@example.com,b=y@example.com"), ("baggage", f"c={AWS},d=4111111111111111")]
    )
    assert [f.code for f in v.findings] == [
        "sensitive.email",
        "sensitive.card_number",
        "sensitive.aws_access_key",
    ]


# --- verdict semantics ----------------------------------------------------------------------


def test_w3c_context_fields() -> None:
    v = check_message([("traceparent", TP)])
    assert v.w3c == TraceContext("w3c", TP_ID, "b7ad6b7169203331", True)
    assert v.b3 is None and v.context == "w3c" and not v.has_baggage


def test_b3_64bit_is_padded() -> None:
    v = check_message([("b3", f"{B3_T[16:]}-{B3_S}-d")])
    assert v.b3 == TraceContext("b3", "0" * 16 + B3_T[16:], B3_S, True)


@pytest.mark.parametrize(
    ("headers", "sampled"),
    [
        ([("b3", f"{B3_T}-{B3_S}")], None),
        ([("b3", f"{B3_T}-{B3_S}-0")], False),
        ([("b3", f"{B3_T}-{B3_S}-1")], True),
        ([("b3", f"{B3_T}-{B3_S}-d")], True),
        ([("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S)], None),
        ([("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-sampled", "0")], False),
        ([("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-sampled", "False")], False),
        ([("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S), ("x-b3-flags", "1")], True),
        ([("traceparent", tp(flags="00"))], False),
        ([("traceparent", tp(flags="03"))], True),
    ],
    ids=[
        "b3-defer",
        "b3-deny",
        "b3-accept",
        "b3-debug",
        "x-defer",
        "x-deny",
        "x-false",
        "x-debug",
        "tp-00",
        "tp-03",
    ],
)
def test_sampling_decision(headers: list[tuple[str, str]], sampled: bool | None) -> None:
    v = check_message(headers)
    ctx = v.w3c or v.b3
    assert ctx is not None
    assert ctx.sampled is sampled


def test_single_header_wins_over_multi_when_both_valid() -> None:
    v = check_message([("b3", f"{B3_T}-{B3_S}"), ("x-b3-traceid", TP_ID), ("x-b3-spanid", B3_S)])
    assert v.b3 is not None and v.b3.trace_id == B3_T


def test_invalid_single_falls_back_to_valid_multi() -> None:
    v = check_message([("b3", "garbage-x"), ("x-b3-traceid", B3_T), ("x-b3-spanid", B3_S)])
    assert v.b3 is not None and v.b3.trace_id == B3_T
    assert not v.valid


def test_baggage_alone_is_not_context() -> None:
    v = check_message([("baggage", "a=1")])
    assert v.context == "none" and v.has_baggage


def test_empty_baggage_is_not_baggage() -> None:
    assert not check_message([("baggage", " ")]).has_baggage
    assert check_message([("baggage", "bad value")]).has_baggage


def test_header_block_over_limit() -> None:
    v = check_message([("traceparent", TP)], header_block_bytes=16385)
    assert [(f.kind, f.header, f.code) for f in v.findings] == [
        ("oversized", "*", "headers.block_too_large")
    ]
    assert not v.valid and v.context == "w3c"
    assert check_message([], header_block_bytes=16384).findings == ()


def test_custom_limits() -> None:
    lim = Limits(baggage_bytes=10, baggage_members=1, tracestate_members=1, tracestate_bytes=5)
    v = check_message([("baggage", "a=1,b=2222222"), ("tracestate", "a=1,b=2")], lim)
    assert _codes(v) == {
        "baggage.too_many_members",
        "baggage.too_long",
        "tracestate.too_many_members",
        "tracestate.too_long",
    }
    assert {f.kind for f in v.findings} == {"oversized"}
    assert DEFAULT_LIMITS == Limits(8192, 64, 32, 512, 16384)


def test_check_header_skips_set_rules() -> None:
    assert check_header("X-B3-SpanId", B3_S).findings == ()
    assert check_header("x-b3-traceid", B3_T).findings == ()
    assert _codes(check_header("x-b3-spanid", "xyz")) == {"x-b3-spanid.bad_length"}
    assert check_header("content-type", "text/html").findings == ()


def test_repeated_findings_are_reported_once() -> None:
    v = check_message([("traceparent", "00-zz"), ("traceparent", "00-yy")])
    codes = [f.code for f in v.findings]
    assert len(codes) == len(set(codes))


def test_many_bad_members_are_summarised() -> None:
    v = check_message([("tracestate", ",".join(["BAD=1"] * 5000))])
    bad = [f for f in v.findings if f.code == "tracestate.bad_key"]
    assert len(bad) == 1 and "and 4,999 more" in bad[0].detail


def test_megabyte_values_are_handled() -> None:
    big = "a" * (1 << 20)
    for name in sorted(HEADER_NAMES):
        assert not check_message([(name, big)]).valid


def test_header_names_lists_every_recognised_field() -> None:
    assert HEADER_NAMES == {
        "traceparent",
        "tracestate",
        "baggage",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    }


# --- properties -----------------------------------------------------------------------------

HEX = "0123456789abcdef"
names = st.sampled_from([*sorted(HEADER_NAMES), "TraceParent", "X-B3-TraceId", "other"])
pairs = st.lists(st.tuples(names, st.text(max_size=300)), max_size=8)


def _nonzero_hex(n: int) -> st.SearchStrategy[str]:
    return st.text(HEX, min_size=n, max_size=n).filter(lambda s: s.strip("0") != "")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(pairs, st.integers(min_value=0, max_value=40000), st.booleans())
def test_arbitrary_input_never_raises(
    headers: list[tuple[str, str]], block: int, sensitive: bool
) -> None:
    v = check_message(headers, header_block_bytes=block, sensitive=sensitive)
    assert isinstance(v, Verdict)
    assert v.context in {"w3c", "b3", "both", "none"}
    assert all(isinstance(f, Finding) for f in v.findings)
    for name, value in headers:
        assert isinstance(check_header(name, value), Verdict)


@given(
    st.integers(min_value=0, max_value=254),
    _nonzero_hex(32),
    _nonzero_hex(16),
    st.integers(min_value=0, max_value=255),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", max_size=20),
    st.sampled_from(["", " ", "\t", " \t "]),
    st.sampled_from(["", " ", "\t", "\t "]),
)
def test_generated_valid_traceparent_is_valid(
    version: int, trace_id: str, parent_id: str, flags: int, extra: str, lead: str, trail: str
) -> None:
    value = f"{version:02x}-{trace_id}-{parent_id}-{flags:02x}"
    if version != 0 and extra:
        value += "-" + extra
    v = check_message([("traceparent", lead + value + trail)])
    assert v.findings == ()
    assert v.w3c == TraceContext("w3c", trace_id, parent_id, bool(flags & 1))


@given(
    _nonzero_hex(32) | _nonzero_hex(16),
    _nonzero_hex(16),
    st.sampled_from([None, "0", "1", "d"]),
    st.none() | _nonzero_hex(16),
)
def test_generated_valid_b3_is_valid(
    trace_id: str, span_id: str, sampling: str | None, parent: str | None
) -> None:
    value = f"{trace_id}-{span_id}"
    if sampling is not None:
        value += "-" + sampling
        if parent is not None:
            value += "-" + parent
    v = check_message([("b3", value)])
    assert v.findings == ()
    assert v.b3 is not None and v.b3.trace_id.endswith(trace_id) and len(v.b3.trace_id) == 32


ts_key = st.from_regex(r"[a-z0-9][a-z0-9_\-*/@]{0,40}", fullmatch=True)
ts_value = st.from_regex(
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,40}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", fullmatch=True
)


@given(st.dictionaries(ts_key, ts_value, max_size=32))
def test_generated_valid_tracestate_is_valid(entries: dict[str, str]) -> None:
    value = ",".join(f"{k}={v}" for k, v in entries.items())
    v = check_message([("tracestate", value)], Limits(tracestate_bytes=1 << 20))
    assert v.findings == ()


printable = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=12, max_size=200
)


@settings(max_examples=300)
@given(st.sampled_from(sorted(HEADER_NAMES)), printable)
def test_privacy_raw_value_never_in_detail(name: str, value: str) -> None:
    stripped = value.strip(" \t")
    for v in (check_message([(name, value), (name, value)]), check_header(name, value)):
        for f in v.findings:
            assert stripped not in f.detail


secrets = st.sampled_from(
    [
        AWS,
        GH,
        SLACK,
        STRIPE,
        GOOGLE,
        JWT,
        "4111111111111111",
        "dana@example.org",
        "Bearer%20" + "t0ken" * 4,
    ]
)


@given(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), secrets, st.booleans())
def test_privacy_secret_never_in_detail(key: str, secret: str, malformed: bool) -> None:
    value = f"{key}={secret}" + (" x" if malformed else "")
    v = check_message([("baggage", value), ("traceparent", TP), ("b3", f"{B3_T}-{B3_S}")])
    assert any(f.kind == "sensitive" for f in v.findings)
    for f in v.findings:
        assert secret not in f.detail
        assert TP_ID not in f.detail and B3_T not in f.detail


@pytest.mark.parametrize(
    "value",
    ["auth=Bearer%20abcdefghijklmnopqrst%zz", "auth=Bearer%20abcdefghijklmnopqrst%C3%28"],
    ids=["bad-percent", "bad-utf8"],
)
def test_secret_found_despite_broken_encoding(value: str) -> None:
    codes = _codes(check_message([("baggage", value)]))
    assert "sensitive.bearer_token" in codes
