"""`hopwatch trace`: the hop tree from hand-built observations, and real chains on loopback.

The unit half feeds hand-built observations through the recorder and the real hop analyzer
(in the daemon's order: recorder first, analyzer second) and checks the report, its JSON
schema and the rendered tree. The kernel half runs `hopwatch trace` as an operator does,
against chains of small services (tests/peers/chain_service.py) and nginx, each under a
unique command name.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hopwatch import _trace_cmd
from hopwatch.capture._types import SockAddr
from hopwatch.cli import app
from hopwatch.config import Config, EgressRule
from hopwatch.hops import HopAnalyzer
from hopwatch.metrics import Metrics
from hopwatch.pipeline import Observation
from hopwatch.propagation import check_message
from hopwatch.protocols import MessageParsed, Origin
from hopwatch.trace import (
    EXIT_BROKEN,
    EXIT_FLAGGED,
    EXIT_NOT_FOLLOWED,
    EXIT_OK,
    JSON_SCHEMA,
    TRACE_ID_PREFIX,
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
from tests.helpers import HOPWATCH, PEERS, SYSTEM_PYTHON, free_port, named, nginx_args, server

LO = "127.0.0.1"


# -- hand-built observations ------------------------------------------------------------------


def addr(port: int) -> SockAddr:
    return SockAddr(socket.AF_INET, LO, port)


class World:
    """Observations of a few processes, fed as the daemon feeds them."""

    def __init__(self, config: Config | None = None) -> None:
        self.recorder = TraceRecorder()
        self.hops = HopAnalyzer(config or Config(), Metrics(), self.recorder)
        self.ts = 1_000_000
        self.comms: dict[int, str] = {}

    def feed(
        self,
        pid: int,
        direction: str,
        *,
        request: bool = True,
        fd: int,
        local: SockAddr | None,
        peer: SockAddr | None,
        headers: tuple[tuple[str, str], ...] = (),
        path: str = "/x",
        status: int | None = None,
        stream_id: int | None = None,
        protocol: str = "http1",
    ) -> Observation:
        self.ts += 1000
        msg = MessageParsed(
            origin=Origin.CLIENT if request else Origin.SERVER,
            protocol=protocol,
            method="GET" if request else None,
            path=path if request else None,
            status=None if request else (status or 200),
            authority=str(peer) if request and direction == "outbound" and peer else None,
            headers=headers,
            stream_id=stream_id,
        )
        role = "server" if (direction == "inbound") == request else "client"
        obs = Observation(
            message=msg,
            verdict=check_message(headers),
            direction=direction,
            tgid=pid,
            tid=pid + 1,
            fd=fd,
            ts_ns=self.ts,
            process=self.comms.get(pid, f"svc{pid}"),
            comm=self.comms.get(pid, f"svc{pid}"),
            role=role,
            local=local,
            peer=peer,
        )
        self.recorder(obs)
        self.hops(obs)
        return obs


def tp(probe: Probe) -> tuple[tuple[str, str], ...]:
    return tuple(probe.headers())


def chain(
    modes: tuple[str, str],
    *,
    fmt: str = "w3c",
    config: Config | None = None,
    sender_local_known: bool = True,
) -> tuple[Probe, TraceReport]:
    """probe -> a (pid 100, :8001) -> b (200, :8002) -> c (300, :8003), synchronous.

    ``modes``: what a and b send downstream: propagate, strip, restart, b3.
    """
    probe = new_probe(fmt)
    w = World(config)
    w.comms = {100: "svc_a", 200: "svc_b", 300: "svc_c"}
    w.recorder.watch(probe.trace_id)
    inbound_headers = tp(probe)
    ports = {100: 8001, 200: 8002, 300: 8003}
    client_port = 50000
    for pid, mode in zip((100, 200), modes, strict=True):
        w.feed(pid, "inbound", fd=4, local=addr(ports[pid]), peer=addr(client_port),
               headers=inbound_headers)  # fmt: skip
        client_port += 1
        if mode == "propagate":
            out = inbound_headers
        elif mode == "strip":
            out = ()
        elif mode == "restart":
            out = (("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-01"),)
        else:  # b3
            out = (("b3", f"{probe.trace_id}-{'ef' * 8}-1"),)
        local = addr(client_port) if sender_local_known else None
        w.feed(pid, "outbound", fd=5, local=local, peer=addr(ports[pid + 100]), headers=out)
        inbound_headers = out
    w.feed(300, "inbound", fd=4, local=addr(8003), peer=addr(client_port),
           headers=inbound_headers)  # fmt: skip
    for pid in (300, 200, 100):
        w.feed(pid, "outbound", request=False, fd=4, local=addr(ports[pid]), peer=None)
        if pid != 100:
            w.feed(pid - 100, "inbound", request=False, fd=5, local=None, peer=addr(ports[pid]))
    result = ProbeResult(
        url="http://127.0.0.1:8001/x", method="GET", protocol="http1", tls=False,
        local=addr(50000), peer=addr(8001), authority="127.0.0.1:8001", path="/x",
        status=200, elapsed_ms=3.0,
    )  # fmt: skip
    assert w.recorder.settled(probe.trace_id, 0.0)
    rec = w.recorder.recorded(probe.trace_id, forget=True)
    listens = {100: {8001}, 200: {8002}, 300: {8003}}
    return probe, build_report(probe, result, rec, lambda pid: listens.get(pid, set()))


def comms(doc: dict[str, Any]) -> list[str]:
    return [h["comm"] for h in doc["hops"]]


def test_probe_headers_carry_one_recognisable_trace_id() -> None:
    p = new_probe("both")
    assert p.trace_id.startswith(TRACE_ID_PREFIX) and len(p.trace_id) == 32
    assert dict(p.headers()) == {
        "traceparent": f"00-{p.trace_id}-{p.span_id}-01",
        "b3": f"{p.trace_id}-{p.span_id}-1",
    }
    assert [n for n, _ in new_probe("w3c").headers()] == ["traceparent"]
    assert [n for n, _ in new_probe("b3").headers()] == ["b3"]
    assert new_probe("w3c").trace_id != new_probe("w3c").trace_id
    v = check_message(p.headers())
    assert v.valid and v.context == "both" and not v.findings


def test_propagating_chain_survives() -> None:
    probe, report = chain(("propagate", "propagate"), fmt="both")
    doc = report.as_dict()
    assert report.outcome == "survived" and report.exit_code == EXIT_OK
    assert comms(doc) == ["svc_a", "svc_b", "svc_c"]
    assert [h["parent"] for h in doc["hops"]] == [None, 0, 1]
    assert [h["depth"] for h in doc["hops"]] == [0, 1, 2]
    assert all(h["carries_trace"] and h["context"] == "both" for h in doc["hops"])
    assert doc["request"]["to_hop"] == 0 and doc["hops"][0]["arrived"] == "probe"
    assert [h["outbound"][0]["to_hop"] for h in doc["hops"][:2]] == [1, 2]
    assert doc["hops"][2]["outbound"] == [] and doc["problems"] == []
    assert doc["trace_id"] == probe.trace_id


def test_stripping_middle_hop_breaks_the_chain_there() -> None:
    _, report = chain(("propagate", "strip"))
    doc = report.as_dict()
    assert report.outcome == "broken" and report.exit_code == EXIT_BROKEN
    assert comms(doc) == ["svc_a", "svc_b", "svc_c"]
    assert [h["carries_trace"] for h in doc["hops"]] == [True, True, False]
    edge = doc["hops"][1]["outbound"][0]
    assert edge["carries_trace"] is False and edge["context"] == "none" and edge["to_hop"] == 2
    assert edge["findings"] == [
        {"finding": "stripped", "header": "traceparent", "reason": "stripped.no_context"}
    ]
    assert [(p["finding"], p["hop"], p["to_hop"]) for p in doc["problems"]] == [("stripped", 1, 2)]


def test_restarting_hop_and_its_new_trace_id_is_truncated() -> None:
    _, report = chain(("restart", "propagate"))
    doc = report.as_dict()
    assert report.outcome == "broken"
    assert doc["problems"][0]["finding"] == "restarted" and doc["problems"][0]["hop"] == 0
    assert doc["hops"][1]["carries_trace"] is False
    assert doc["hops"][1]["other_trace_id"] == "abababab…"
    assert "ab" * 16 not in json.dumps(doc)


def test_format_conversion_survives_but_is_flagged() -> None:
    _, report = chain(("propagate", "b3"))
    doc = report.as_dict()
    assert report.outcome == "flagged" and report.exit_code == EXIT_FLAGGED
    assert [h["context"] for h in doc["hops"]] == ["w3c", "w3c", "b3"]
    assert all(h["carries_trace"] for h in doc["hops"])
    assert [p["finding"] for p in doc["problems"]] == ["format_changed"]


def test_leak_to_a_host_outside_the_allowlist_is_flagged() -> None:
    config = Config(egress_allow=(EgressRule.parse("127.0.0.1:8002"),))
    _, report = chain(("propagate", "propagate"), config=config)
    doc = report.as_dict()
    assert report.outcome == "flagged"
    assert [(p["finding"], p["hop"], p["destination"]) for p in doc["problems"]] == [
        ("leak", 1, "127.0.0.1:8003")
    ]


def test_receiver_found_through_listening_port_when_local_address_unknown() -> None:
    _, report = chain(("propagate", "strip"), sender_local_known=False)
    doc = report.as_dict()
    assert comms(doc) == ["svc_a", "svc_b", "svc_c"]
    assert [h["carries_trace"] for h in doc["hops"]] == [True, True, False]


def test_hop_reached_through_an_unseen_hop_hangs_under_the_root() -> None:
    # The probe's own hop is invisible (TLS the capture cannot read): b still shows.
    probe = new_probe("w3c")
    w = World()
    w.recorder.watch(probe.trace_id)
    w.feed(200, "inbound", fd=4, local=addr(8002), peer=addr(50001), headers=tp(probe))
    w.feed(200, "outbound", request=False, fd=4, local=addr(8002), peer=addr(50001))
    result = ProbeResult("https://127.0.0.1:8443/", "GET", "http1", True, addr(50000),
                         addr(8443), "127.0.0.1:8443", "/", status=200)  # fmt: skip
    report = build_report(probe, result, w.recorder.recorded(probe.trace_id))
    doc = report.as_dict()
    assert report.outcome == "survived"
    assert doc["request"]["to_hop"] is None
    assert [(h["comm"], h["arrived"]) for h in doc["hops"]] == [("svc200", "unobserved")]
    text = render_tree(report)
    assert "127.0.0.1:8443  GET /  http1  w3c  (not observed on this node)" in text
    assert (
        "svc200[200] at 127.0.0.1:8002  GET /x  http1  w3c  (reached through a hop not seen)"
        in (text)
    )


def test_nothing_observed_and_failed_request() -> None:
    probe = new_probe("w3c")
    rec = TraceRecorder()
    rec.watch(probe.trace_id)
    ok = ProbeResult("http://10.9.9.9/", "GET", "http1", False, addr(50000), None, "10.9.9.9",
                     "/", status=200)  # fmt: skip
    failed = ProbeResult("http://127.0.0.1:1/", "GET", "http1", False, None, None,
                         "127.0.0.1:1", "/", error="Connection refused")  # fmt: skip
    seen = rec.recorded(probe.trace_id)
    assert build_report(probe, ok, seen).outcome == "not_observed"
    r = build_report(probe, failed, seen)
    assert r.outcome == "request_failed" and r.exit_code == EXIT_NOT_FOLLOWED
    assert "no response (Connection refused)" in render_tree(r)


def test_settled_waits_for_every_hop_to_answer() -> None:
    probe = new_probe("w3c")
    w = World()
    w.recorder.watch(probe.trace_id)
    assert not w.recorder.settled(probe.trace_id, 0.0)  # nothing seen yet
    w.feed(100, "inbound", fd=4, local=addr(8001), peer=addr(50000), headers=tp(probe))
    assert not w.recorder.settled(probe.trace_id, 0.0)  # open
    w.feed(100, "outbound", request=False, fd=4, local=addr(8001), peer=addr(50000))
    assert w.recorder.settled(probe.trace_id, 0.0)
    assert not w.recorder.settled(probe.trace_id, 60.0)  # not quiet for a minute


def test_tree_rendering_marks_the_break() -> None:
    probe, report = chain(("propagate", "strip"))
    lines = render_tree(report).splitlines()
    assert lines[0] == f"trace {probe.trace_id}  (w3c, span {probe.span_id})"
    assert lines[1] == "GET http://127.0.0.1:8001/x  http1  → 200 in 3 ms"
    assert lines[2:] == [
        "hopwatch trace (this process)",
        "└─▶ ✓ svc_a[100] at 127.0.0.1:8001  GET /x  http1  w3c",
        "    └─▶ ✓ svc_b[200] at 127.0.0.1:8002  GET /x  http1  w3c",
        "        └─▶ ✗ svc_c[300] at 127.0.0.1:8003  GET /x  http1  no context",
        "              ✗ stripped: svc_b[200] sent this request without any trace context",
        "context BROKEN: stripped at svc_b[200] → 127.0.0.1:8003  (exit 1)",
    ]


def test_tree_rendering_of_a_surviving_chain() -> None:
    _, report = chain(("propagate", "propagate"), fmt="both")
    text = render_tree(report)
    assert text.count("✓") == 3 and "✗" not in text
    assert text.endswith("context SURVIVED every hop on this node  (exit 0)")


def test_json_schema() -> None:
    _, report = chain(("propagate", "strip"))
    doc = json.loads(report_json([report]))
    assert set(doc) == {"schema", "exit_code", "traces"}
    assert doc["schema"] == JSON_SCHEMA and doc["exit_code"] == EXIT_BROKEN
    (t,) = doc["traces"]
    assert set(t) == {
        "trace_id", "span_id", "formats", "request", "outcome", "exit_code", "problems", "hops",
    }  # fmt: skip
    assert set(t["request"]) == {
        "method", "url", "protocol", "tls", "local", "peer", "status", "error", "elapsed_ms",
        "headers", "to_hop",
    }  # fmt: skip
    assert set(t["hops"][0]) == {
        "index", "parent", "depth", "pid", "comm", "process", "protocol", "method", "path",
        "authority", "local", "peer", "context", "carries_trace", "other_trace_id", "arrived",
        "outbound",
    }  # fmt: skip
    assert set(t["hops"][0]["outbound"][0]) == {
        "protocol", "method", "path", "destination", "context", "carries_trace",
        "other_trace_id", "findings", "to_hop",
    }  # fmt: skip
    assert set(t["problems"][0]) == {
        "severity", "finding", "hop", "to_hop", "destination", "detail",
    }  # fmt: skip
    assert [h["index"] for h in t["hops"]] == [0, 1, 2]
    assert t["formats"] == ["w3c"] and t["request"]["headers"]["traceparent"].startswith("00-")


def test_combined_exit_worst_first() -> None:
    assert combined_exit([0, 0]) == EXIT_OK
    assert combined_exit([0, 4]) == EXIT_FLAGGED
    assert combined_exit([4, 3, 0]) == EXIT_NOT_FOLLOWED
    assert combined_exit([3, 1, 4]) == EXIT_BROKEN


# -- options (no capture needed) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["ftp://127.0.0.1/"],
        ["http:///nohost"],
        ["http://127.0.0.1/", "-H", "traceparent: 00-x"],
        ["http://127.0.0.1/", "-H", "no colon"],
        ["http://127.0.0.1/", "--format", "jaeger"],
        ["http://127.0.0.1/", "--count", "0"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    res = CliRunner().invoke(app, ["trace", *args])
    assert res.exit_code == 2, res.output


def test_not_root_is_a_clear_setup_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_trace_cmd.os, "geteuid", lambda: 1000)
    assert _trace_cmd.run("http://127.0.0.1:1/") == 2
    assert "needs root" in capsys.readouterr().err


def test_parse_url_and_header() -> None:
    t = _trace_cmd.parse_url("https://user@[::1]:8443/a/b?q=1")
    assert (t.tls, t.host, t.port, t.authority, t.path) == (True, "::1", 8443, "[::1]:8443",
                                                            "/a/b?q=1")  # fmt: skip
    assert _trace_cmd.parse_url("http://example.test").port == 80
    assert _trace_cmd.parse_header("baggage:  k=v ") == ("baggage", "k=v")


# -- real kernel, real chains ----------------------------------------------------------------------


def trace(*args: str, expect: int) -> dict[str, Any]:
    res = subprocess.run(
        [str(HOPWATCH), "trace", "--json", *args], capture_output=True, text=True, timeout=90
    )
    assert res.returncode == expect, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    doc: dict[str, Any] = json.loads(res.stdout)
    assert doc["schema"] == JSON_SCHEMA and doc["exit_code"] == expect
    return doc


@contextlib.contextmanager
def services(tmp: Path, specs: list[tuple[str, str]]) -> Iterator[list[int]]:
    """Start chain services, last first: specs are (comm, mode), each calls the next."""
    ports = [free_port() for _ in specs]
    with contextlib.ExitStack() as stack:
        for i in reversed(range(len(specs))):
            name, mode = specs[i]
            downstream = f"http://{LO}:{ports[i + 1]}" if i + 1 < len(specs) else "-"
            exe = named(tmp, name, SYSTEM_PYTHON)
            args = [exe, str(PEERS / "chain_service.py"), str(ports[i]), downstream, mode]
            stack.enter_context(server(args, ports[i]))
        yield ports


def assert_chain(doc: dict[str, Any], names: list[str], carried: list[bool]) -> dict[str, Any]:
    (t,) = doc["traces"]
    assert t["trace_id"].startswith(TRACE_ID_PREFIX)
    assert [h["comm"] for h in t["hops"]] == names, json.dumps(t, indent=1)
    assert [h["parent"] for h in t["hops"]] == [None, *range(len(names) - 1)]
    assert [h["carries_trace"] for h in t["hops"]] == carried
    assert t["request"]["to_hop"] == 0 and t["request"]["status"] == 200
    for h, nxt in zip(t["hops"], t["hops"][1:], strict=False):
        assert [e["to_hop"] for e in h["outbound"]] == [nxt["index"]]
    return t


@pytest.mark.kernel
def test_kernel_three_service_chain_propagates(tmp_path: Path) -> None:
    names = ["t_tc_pa", "t_tc_pb", "t_tc_pc"]
    with services(tmp_path, [(n, "propagate") for n in names]) as ports:
        doc = trace(f"http://{LO}:{ports[0]}/orders/7", "--format", "both", expect=EXIT_OK)
    t = assert_chain(doc, names, [True, True, True])
    assert t["outcome"] == "survived" and t["problems"] == []
    assert all(h["context"] == "both" and h["path"] == "/orders/7" for h in t["hops"])
    assert [h["local"] for h in t["hops"]] == [f"{LO}:{p}" for p in ports]
    assert [h["pid"] for h in t["hops"]] == sorted({h["pid"] for h in t["hops"]}, key=[
        h["pid"] for h in t["hops"]].index)  # fmt: skip
    assert [h["outbound"][0]["destination"] for h in t["hops"][:2]] == [
        f"{LO}:{ports[1]}", f"{LO}:{ports[2]}"
    ]  # fmt: skip


@pytest.mark.kernel
def test_kernel_middle_service_strips(tmp_path: Path) -> None:
    names = ["t_tc_sa", "t_tc_sb", "t_tc_sc"]
    modes = ["propagate", "strip", "propagate"]
    with services(tmp_path, list(zip(names, modes, strict=True))) as ports:
        doc = trace(f"http://{LO}:{ports[0]}/x", expect=EXIT_BROKEN)
    t = assert_chain(doc, names, [True, True, False])
    assert t["outcome"] == "broken"
    assert [(p["finding"], p["hop"], p["to_hop"]) for p in t["problems"]] == [("stripped", 1, 2)]
    edge = t["hops"][1]["outbound"][0]
    assert edge["context"] == "none" and edge["findings"][0]["finding"] == "stripped"


@pytest.mark.kernel
def test_kernel_restart_and_conversion(tmp_path: Path) -> None:
    names = ["t_tc_ra", "t_tc_rb", "t_tc_rc"]
    with services(tmp_path, list(zip(names, ["b3", "restart", "propagate"], strict=True))) as p:
        doc = trace(f"http://{LO}:{p[0]}/x", expect=EXIT_BROKEN)
    t = assert_chain(doc, names, [True, True, False])
    assert [h["context"] for h in t["hops"]] == ["w3c", "b3", "w3c"]
    assert [(x["finding"], x["hop"]) for x in t["problems"]] == [
        ("format_changed", 0), ("restarted", 1)
    ]  # fmt: skip


NGINX_PROXY = "location /api/ {{ proxy_pass http://127.0.0.1:{port}; {extra} }}"


@pytest.mark.kernel
@pytest.mark.parametrize("strip", [False, True], ids=["propagates", "strips"])
def test_kernel_chain_through_nginx(tmp_path: Path, strip: bool) -> None:
    ngx = "t_tc_ngx_s" if strip else "t_tc_ngx"
    leaf = "t_tc_nleaf_s" if strip else "t_tc_nleaf"
    nport = free_port()
    with services(tmp_path, [(leaf, "propagate")]) as (port,):
        extra = NGINX_PROXY.format(
            port=port, extra='proxy_set_header traceparent "";' if strip else ""
        )
        with server(nginx_args(tmp_path, ngx, f"{LO}:{nport}", extra), nport):
            doc = trace(
                f"http://{LO}:{nport}/api/items", "--format", "w3c",
                expect=EXIT_BROKEN if strip else EXIT_OK,
            )  # fmt: skip
    t = assert_chain(doc, [ngx, leaf], [True, not strip])
    if strip:
        assert [(p["finding"], p["hop"]) for p in t["problems"]] == [("stripped", 0)]
    else:
        assert t["outcome"] == "survived" and t["hops"][1]["path"] == "/api/items"


@pytest.mark.kernel
def test_kernel_http2_prior_knowledge_count_2(tmp_path: Path) -> None:
    nport = free_port()
    with services(tmp_path, [("t_tc_h2leaf", "propagate")]) as (port,):
        extra = NGINX_PROXY.format(port=port, extra="")
        args = nginx_args(tmp_path, "t_tc_h2ngx", f"{LO}:{nport} http2", extra)
        with server(args, nport):
            doc = trace(f"http://{LO}:{nport}/api/h2", "--http2", "-n", "2", expect=EXIT_OK)
    assert len(doc["traces"]) == 2
    assert len({t["trace_id"] for t in doc["traces"]}) == 2
    for t in doc["traces"]:
        assert t["request"]["protocol"] == "http2" and t["outcome"] == "survived"
        assert [(h["comm"], h["protocol"]) for h in t["hops"]] == [
            ("t_tc_h2ngx", "http2"), ("t_tc_h2leaf", "http1")
        ]  # fmt: skip


@pytest.mark.kernel
def test_kernel_refused_request_is_not_followed(tmp_path: Path) -> None:
    doc = trace(f"http://{LO}:{free_port()}/", "--wait", "1", expect=EXIT_NOT_FOLLOWED)
    (t,) = doc["traces"]
    assert t["outcome"] == "request_failed" and t["request"]["error"] and t["hops"] == []


@pytest.mark.kernel
def test_kernel_https_through_nginx(tmp_path: Path) -> None:
    """The probe's own hop over TLS: nginx reads it through the OpenSSL uprobes."""
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(crt), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    nport = free_port()
    with services(tmp_path, [("t_tc_tlsleaf", "propagate")]) as (port,):
        extra = f"ssl_certificate {crt}; ssl_certificate_key {key}; " + NGINX_PROXY.format(
            port=port, extra=""
        )
        with server(nginx_args(tmp_path, "t_tc_tlsngx", f"{LO}:{nport} ssl", extra), nport):
            doc = trace(f"https://{LO}:{nport}/api/s", "-k", expect=EXIT_OK)
    t = assert_chain(doc, ["t_tc_tlsngx", "t_tc_tlsleaf"], [True, True])
    assert t["request"]["tls"] is True and t["outcome"] == "survived"
