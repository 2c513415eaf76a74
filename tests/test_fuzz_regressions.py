"""The fuzz harness's oracle (fuzz/hopwatch_fuzz.py) over its seeds and edge inputs.

`make fuzz` found no crash in its campaigns so far (docs/performance.md has the counts);
each crash it finds is added to EDGE_CASES with the target it crashed. The seeds (the real
captures) and these inputs run through the same entry points and the same crash definition
(an escaping exception or an ``*.internal_error`` event), without atheris.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hopwatch_fuzz", REPO / "fuzz/hopwatch_fuzz.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hopwatch_fuzz"] = mod
    spec.loader.exec_module(mod)
    return mod


FUZZ = _harness()

#: (target, input) pairs: inputs that hit edges of the record format and the parsers.
EDGE_CASES: list[tuple[str, bytes]] = [
    ("http1", b""),
    (
        "http1",
        FUZZ.encode([(False, b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n")]),
    ),
    (
        "http1",
        FUZZ.encode(
            [
                (
                    False,
                    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
                )
            ]
        ),
    ),
    (
        "http1",
        FUZZ.encode([(False, b"GET / HTTP/1.1\r\n")])
        + bytes([2, 0xFF, 0xFF])
        + FUZZ.encode([(False, b"\r\n")]),
    ),
    (
        "http2",
        FUZZ.encode(
            [(False, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff\xff\xff\x01\x04\x00\x00\x00\x01")]
        ),
    ),
    (
        "conn",
        FUZZ.encode(
            [
                (False, b"CONNECT a:443 HTTP/1.1\r\n\r\n"),
                (True, b"HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01"),
            ]
        ),
    ),
    ("header", bytes([0]) + b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"),
    ("header", bytes([2]) + b"k=" + b"%" * 9000),
    ("header", bytes([3]) + b"\x00\xff-\n-"),
    # Found by the pipeline target (session 14): a Host port ending in byte 0xb3 ('³' in
    # latin-1, a digit to str.isdigit() but not to int()) made the hop analysis raise.
    (
        "pipeline",
        b"\0"
        + FUZZ.encode_ops(
            [
                (0 | FUZZ.OP_OPEN_CLIENT << 2, 0),
                (0, b"GET / HTTP/1.1\r\nHost: api:5293\xb3\r\n\r\n"),
            ]
        ),
    ),
]


def _seeds(tmp: Path) -> list[tuple[str, bytes]]:
    FUZZ.seed(tmp)
    return [(t, p.read_bytes()) for t in FUZZ.TARGETS for p in sorted((tmp / t).iterdir())]


def test_every_target_runs_every_seed(tmp_path: Path) -> None:
    cases = _seeds(tmp_path)
    assert {t for t, _ in cases} == set(FUZZ.TARGETS)
    for target, data in cases:
        FUZZ.ONE[target](data)


@pytest.mark.parametrize(("target", "data"), EDGE_CASES)
def test_edge_inputs_do_not_crash(target: str, data: bytes) -> None:
    FUZZ.ONE[target](data)


def test_the_oracle_turns_internal_errors_into_crashes() -> None:
    from hopwatch.protocols import ParseFailed

    with pytest.raises(FUZZ.InternalError):
        FUZZ._raise_internal([ParseFailed(None, "http1.internal_error", "boom")])  # type: ignore[arg-type]


def test_the_pipeline_target_analyses_what_its_seeds_carry() -> None:
    """Not a vacuous harness: a seed (one request and its response, relayed by process 1)
    is counted on every end and attributed as one hop; the same input with the bytes of the
    first request lost is counted as one message less on its receiver and no crash."""
    exchange = [
        (
            False,
            b"GET /x HTTP/1.1\r\nHost: a\r\ntraceparent: 00-"
            + b"1" * 32
            + b"-"
            + b"2" * 16
            + b"-01\r\n\r\n",
        ),
        (True, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ]

    def counted(metrics: object) -> dict[tuple[str, str, str], float]:
        out: dict[tuple[str, str, str], float] = {}
        for fam in metrics.registry.collect():  # type: ignore[attr-defined]
            for s in fam.samples:
                if s.name == "hopwatch_http_messages_total" and s.value:
                    key = (s.labels["process"], s.labels["direction"], s.labels["kind"])
                    out[key] = out.get(key, 0) + s.value
                if s.name == "hopwatch_hops_total" and s.value:
                    out[("hops", s.labels["process"], "")] = s.value
        return out

    m = FUZZ.one_pipeline(FUZZ._pipeline_seed(exchange))
    assert counted(m) == {
        ("p0", "outbound", "request"): 1,
        ("p0", "inbound", "response"): 1,
        ("p1", "inbound", "request"): 1,
        ("p1", "outbound", "request"): 1,
        ("p1", "inbound", "response"): 1,
        ("p1", "outbound", "response"): 1,
        ("hops", "p1", ""): 1,
    }
    # Process 1's receive of the request lost all its bytes (a dropped record): a gap.
    ops = list(FUZZ.pipeline_ops(FUZZ._pipeline_seed(exchange)[1:]))
    lossy = []
    for tag, op, n, payload in ops:
        if op == FUZZ.OP_DATA and tag & 3 == 2 and tag & FUZZ.TAG_RECV:
            lossy.append((tag & 3 | FUZZ.TAG_RECV | FUZZ.OP_LOST << 2, n))
            continue
        lossy.append((tag, payload if op == FUZZ.OP_DATA else n))
    m = FUZZ.one_pipeline(b"\0" + FUZZ.encode_ops(lossy))
    assert ("p1", "inbound", "request") not in counted(m)
    # The configuration byte matters: with the peers outside [egress], both outbound
    # requests carrying the trace context leak it.
    m = FUZZ.one_pipeline(FUZZ._pipeline_seed(exchange, config=1))
    leaks = {
        (s.labels["finding"], s.labels["process"]): s.value
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "hopwatch_findings_total" and s.value
    }
    assert leaks == {("leak", "p0"): 1, ("leak", "p1"): 1}, leaks
    # Process 1 runs exec with half a request read: that connection ends there, cut short.
    half = [
        (0 | FUZZ.OP_OPEN_CLIENT << 2, 0),
        (2 | FUZZ.OP_OPEN_SERVER << 2, 0),
        (2 | FUZZ.TAG_RECV, exchange[0][1][:10]),
        (3 | FUZZ.OP_EXIT << 2, 1),
    ]
    m = FUZZ.one_pipeline(b"\0" + FUZZ.encode_ops(half))
    errors = {
        s.labels["code"]: s.value
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "hopwatch_parse_errors_total" and s.value
    }
    assert errors == {"http1.truncated_head": 1}, errors
