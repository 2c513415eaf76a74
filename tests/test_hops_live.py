"""Hop findings on the real kernel, with real peers: exact counts (issue 4 §5).

One `hopwatch run` serves this module, with its own configuration: the allowlist admits
loopback and the session namespace (10.213.0.0/16) but not this module's "third-party"
namespace (10.214.x.0/30), and the audit log is on. Every peer runs under a unique command
name (a symlink), so the `process` label isolates each scenario's traffic; each scenario
has a control run with correct propagation that must produce zero findings.

The last test (10,000 distinct peers) drives the pipeline with synthetic events, not real
hosts: it is a pure test and carries no `kernel` mark.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    PEERS,
    REPO,
    SYSTEM_PYTHON,
    Daemon,
    Delta,
    NetNS,
    Snapshot,
    free_port,
    named,
    run,
    server,
    veth_namespace,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
TP = f"00-{TRACE}-b7ad6b7169203331-01"
TP_BAD = f"00-{TRACE.upper()}-b7ad6b7169203331-01"  # uppercase hex: malformed
BAGGAGE = "userId=alice-7781,tenant=acme"
N = 5
FIND = "hopwatch_findings_total"
HOPS = "hopwatch_hops_total"

kernel = pytest.mark.kernel

Key = tuple[str, str, str]  # (finding, header, peer)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def third_party() -> Iterator[NetNS]:
    """A namespace outside the module daemon's allowlist (10.214.x.0/30)."""
    with veth_namespace("hx", "10.214") as ns:
        yield ns


@pytest.fixture(scope="module")
def hop_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hops")


@pytest.fixture(scope="module")
def hopd(hop_tmp: Path) -> Iterator[Daemon]:
    audit = hop_tmp / "audit.jsonl"
    d = Daemon(
        hop_tmp,
        config=(
            '[egress]\nallow = ["127.0.0.0/8", "10.213.0.0/16"]\n'
            f'[audit]\npath = "{audit}"\n'
            '[processes]\nexclude = ["t_hx_*"]\n'
        ),
    )
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, f"hopwatch exited {rc} on SIGTERM:\n{d.log_text()}"


# -- reading the results ----------------------------------------------------------------------


def _mine(snap: Snapshot, processes: tuple[str, ...]) -> float:
    names = {("process", p) for p in processes}
    return sum(v for (_n, labels), v in snap.samples.items() if not names.isdisjoint(labels))


def traffic(
    daemon: Daemon, fn: Any, *processes: str, quiet: float = 0.6, timeout: float = 20.0
) -> Delta:
    """Run ``fn``, then scrape until the series of ``processes`` moved and stopped moving.

    `Daemon.settle` waits for the whole machine to go quiet, which never happens while
    other tests run beside these ones; every peer here has a unique name, so its own
    series are what to wait for.
    """
    before = daemon.scrape()
    start = _mine(before, processes)
    fn()
    deadline = time.monotonic() + timeout
    last = daemon.scrape()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = daemon.scrape()
        if _mine(now, processes) != _mine(last, processes):
            last, stable_since = now, time.monotonic()
        elif _mine(now, processes) != start and time.monotonic() - stable_since >= quiet:
            return now - before
    raise AssertionError(f"the series of {processes} did not settle within {timeout}s")


def findings(delta: Delta, process: str) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for labels, value in delta.series(FIND, process=process).items():
        d = dict(labels)
        key = (d["finding"], d["header"], d["peer"])
        out[key] = out.get(key, 0) + value
    return out


def hops(delta: Delta, process: str) -> dict[tuple[str, str, str], float]:
    """(peer, inbound_context, outbound_context) -> count for one process."""
    out: dict[tuple[str, str, str], float] = {}
    for labels, value in delta.series(HOPS, process=process).items():
        d = dict(labels)
        key = (d["peer"], d["inbound_context"], d["outbound_context"])
        out[key] = out.get(key, 0) + value
    return out


def audit_lines(daemon: Daemon, comm: str) -> list[dict[str, Any]]:
    path = daemon.log.parent / "audit.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if x["process"]["comm"] == comm]


def audit_counts(daemon: Daemon, comm: str) -> dict[tuple[str, str], int]:
    return dict(Counter((x["finding"], x["header"]) for x in audit_lines(daemon, comm)))


def metric_counts(found: dict[Key, float]) -> dict[tuple[str, str], int]:
    out: Counter[tuple[str, str]] = Counter()
    for (finding, header, _peer), n in found.items():
        out[(finding, header)] += int(n)
    return dict(out)


def py(tmp: Path, name: str, script: str, *args: object) -> list[str]:
    return [named(tmp, name, SYSTEM_PYTHON), str(PEERS / script), *map(str, args)]


def client(
    tmp: Path, name: str, host: str, port: int, status: int, *headers: str, netns: str | None = None
) -> None:
    run(py(tmp, name, "hop_client.py", host, port, N, status, *headers), netns=netns)


# -- a Python service between a client and a downstream -----------------------------------------

# mode, inbound traceparent, the service's findings (finding, header, peer kind) ->
# count, and its hops (inbound_context, outbound_context)
HOP_CASES: list[tuple[str, str, dict[tuple[str, str, str], int], tuple[str, str]]] = [
    ("propagate", TP, {}, ("w3c", "w3c")),  # control
    ("both", TP, {}, ("w3c", "both")),  # control: W3C kept, B3 added
    ("strip", TP, {("stripped", "traceparent", "down"): N}, ("w3c", "none")),
    ("restart", TP, {("restarted", "traceparent", "down"): N}, ("w3c", "w3c")),
    ("b3", TP, {("format_changed", "b3", "down"): N}, ("w3c", "b3")),
    ("flip", TP, {("sampling_flipped", "traceparent", "down"): N}, ("w3c", "w3c")),
    (
        "forward",
        TP_BAD,
        {
            ("malformed", "traceparent", "client"): N,  # the inbound request
            ("malformed", "traceparent", "down"): N,  # the outbound request
            ("malformed_forwarded", "traceparent", "down"): N,
        },
        ("none", "none"),
    ),
    # control of `forward`: the malformed header dropped, a new root started
    ("propagate", TP_BAD, {("malformed", "traceparent", "client"): N}, ("none", "w3c")),
]


@kernel
@pytest.mark.parametrize(
    ("mode", "inbound", "expect", "hop"),
    HOP_CASES,
    ids=[
        "propagate-control",
        "both-control",
        "stripped",
        "restarted",
        "format_changed",
        "sampling_flipped",
        "malformed_forwarded",
        "malformed-dropped-control",
    ],
)
def test_python_service_hop(
    hopd: Daemon,
    tmp_path: Path,
    mode: str,
    inbound: str,
    expect: dict[tuple[str, str, str], int],
    hop: tuple[str, str],
) -> None:
    tag = mode[:8] + ("x" if inbound == TP_BAD else "")
    svc, down, cli = f"t_hs_{tag}", f"t_hd_{tag}", f"t_hc_{tag}"
    sport, dport = free_port(), free_port()
    down_label = f"127.0.0.1:{dport}"
    with (
        server(py(tmp_path, down, "echo_server.py", "127.0.0.1", dport), dport),
        server(
            py(tmp_path, svc, "hop_service.py", "127.0.0.1", sport, mode, "127.0.0.1", dport),
            sport,
        ),
    ):
        headers = [
            f"traceparent: {inbound}",
            "tracestate: congo=t61rcWkgMzE",
            f"baggage: {BAGGAGE}",
        ]
        delta = traffic(
            hopd,
            lambda: client(tmp_path, cli, "127.0.0.1", sport, 200, *headers),
            svc,
            down,
            cli,
        )

    peers = {"down": down_label, "client": "127.0.0.1"}
    want = {(f, h, peers[p]): float(n) for (f, h, p), n in expect.items()}
    assert findings(delta, svc) == want
    assert hops(delta, svc) == {(down_label, *hop): N}
    # The audit log holds one line per finding, the same ones.
    assert audit_counts(hopd, svc) == metric_counts(want)
    # The client originates traces and the downstream answers: no hop finding there.
    bad = inbound == TP_BAD
    assert findings(delta, cli) == (
        {("malformed", "traceparent", f"127.0.0.1:{sport}"): N} if bad else {}
    )
    assert hops(delta, cli) == {} and hops(delta, down) == {}
    assert findings(delta, down) == (
        {("malformed", "traceparent", "127.0.0.1"): N} if mode == "forward" else {}
    )


# -- nginx as a reverse proxy --------------------------------------------------------------------

NGINX_PROXY = """
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            {extra}
        }}
    }}
}}
"""


@kernel
@pytest.mark.parametrize("strip", [True, False], ids=["stripped", "propagating-control"])
def test_nginx_reverse_proxy(hopd: Daemon, tmp_path: Path, strip: bool) -> None:
    tag = "strip" if strip else "ctl"
    proxy, up, cli = f"t_ngx_{tag}", f"t_ngu_{tag}", f"t_ngc_{tag}"
    port, uport = free_port(), free_port()
    conf = tmp_path / f"{proxy}.conf"
    conf.write_text(
        NGINX_PROXY.format(
            tmp=tmp_path,
            name=proxy,
            port=port,
            upstream=uport,
            extra='proxy_set_header traceparent "";' if strip else "",
        )
    )
    nginx = [
        named(tmp_path, proxy, "/usr/sbin/nginx"),
        "-e",
        str(tmp_path / "e.log"),
        "-c",
        str(conf),
    ]
    with (
        server(py(tmp_path, up, "echo_server.py", "127.0.0.1", uport), uport),
        server(nginx, port),
    ):
        delta = traffic(
            hopd,
            lambda: client(tmp_path, cli, "127.0.0.1", port, 200, f"traceparent: {TP}"),
            proxy,
            up,
            cli,
        )
    up_label = f"127.0.0.1:{uport}"  # nginx sends Host: $proxy_host
    if strip:
        assert findings(delta, proxy) == {("stripped", "traceparent", up_label): N}
        assert hops(delta, proxy) == {(up_label, "w3c", "none"): N}
        assert audit_counts(hopd, proxy) == {("stripped", "traceparent"): N}
    else:
        assert findings(delta, proxy) == {}
        assert hops(delta, proxy) == {(up_label, "w3c", "w3c"): N}
        assert audit_counts(hopd, proxy) == {}
    assert findings(delta, up) == {} and findings(delta, cli) == {}


# -- egress: leak and response_leak ------------------------------------------------------------


@kernel
def test_leak_to_a_third_party_host(
    hopd: Daemon, tmp_path: Path, third_party: NetNS, netns: NetNS
) -> None:
    port = free_port()
    headers = (f"traceparent: {TP}", f"baggage: {BAGGAGE}")
    with (
        server(
            py(tmp_path, "t_3p_srv", "echo_server.py", third_party.ns_ip, port),
            port,
            host=third_party.ns_ip,
            netns=third_party.name,
        ),
        server(
            py(tmp_path, "t_ok_srv", "echo_server.py", netns.ns_ip, port),
            port,
            host=netns.ns_ip,
            netns=netns.name,
        ),
    ):

        def drive() -> None:
            client(tmp_path, "t_leak_cli", third_party.ns_ip, port, 200, *headers)
            # control: the same requests to an allowlisted namespace
            client(tmp_path, "t_leak_ctl", netns.ns_ip, port, 200, *headers)

        delta = traffic(hopd, drive, "t_leak_cli", "t_leak_ctl", "t_3p_srv", "t_ok_srv")
    dest = f"{third_party.ns_ip}:{port}"
    assert findings(delta, "t_leak_cli") == {
        ("leak", "traceparent", dest): N,
        ("leak", "baggage", dest): N,
    }
    assert findings(delta, "t_leak_ctl") == {}
    assert findings(delta, "t_3p_srv") == {} and findings(delta, "t_ok_srv") == {}

    lines = audit_lines(hopd, "t_leak_cli")
    assert Counter((x["finding"], x["header"]) for x in lines) == {
        ("leak", "traceparent"): N,
        ("leak", "baggage"): N,
    }
    pids = set()
    for x in lines:
        assert x["direction"] == "outbound" and x["kind"] == "request"
        assert x["peer"] == dest and x["host"] == dest  # Host: names the port too
        assert x["local"].startswith(f"{third_party.host_ip}:")
        assert x["process"]["comm"] == "t_leak_cli" and x["process"]["pid"] > 0
        assert x["destination"] == dest and x["via"] == "direct"
        assert x["reason"] == "leak.destination_not_allowed"
        assert x["time"] and len(x["trace_id_hash"]) >= 16
        pids.add(x["process"]["pid"])
    assert len(pids) == 1
    assert len({x["trace_id_hash"] for x in lines}) == 1  # correlatable
    assert audit_lines(hopd, "t_leak_ctl") == []
    text = (hopd.log.parent / "audit.jsonl").read_text()
    for raw in (TRACE, TRACE[16:], "alice-7781", "acme", "b7ad6b7169203331"):
        assert raw not in text
    # The report a person reads names the destination and the process.
    report = run([str(REPO / ".venv/bin/hopwatch"), "audit", str(hopd.log.parent / "audit.jsonl")])
    assert dest in report.stdout and "t_leak_cli" in report.stdout


@kernel
def test_response_leak_to_a_client_outside_the_allowlist(
    hopd: Daemon, tmp_path: Path, third_party: NetNS
) -> None:
    port = free_port()
    headers = (f"traceparent: {TP}", f"baggage: {BAGGAGE}")
    with server(py(tmp_path, "t_echo_srv", "echo_server.py", "0.0.0.0", port, "echo"), port):

        def drive() -> None:
            # The client in the third-party namespace calls the server on the host side.
            client(
                tmp_path,
                "t_rl_cli",
                third_party.host_ip,
                port,
                200,
                *headers,
                netns=third_party.name,
            )
            client(tmp_path, "t_rl_ctl", "127.0.0.1", port, 200, *headers)  # control

        delta = traffic(hopd, drive, "t_echo_srv", "t_rl_cli", "t_rl_ctl")
    outsider = third_party.ns_ip
    assert findings(delta, "t_echo_srv") == {
        ("response_leak", "traceparent", outsider): N,
        ("response_leak", "baggage", outsider): N,
    }
    # The outsider sent context to a destination outside the allowlist too: a leak.
    dest = f"{third_party.host_ip}:{port}"
    assert findings(delta, "t_rl_cli") == {
        ("leak", "traceparent", dest): N,
        ("leak", "baggage", dest): N,
    }
    assert findings(delta, "t_rl_ctl") == {}
    lines = audit_lines(hopd, "t_echo_srv")
    assert Counter((x["finding"], x["header"]) for x in lines) == {
        ("response_leak", "traceparent"): N,
        ("response_leak", "baggage"): N,
    }
    for x in lines:
        assert x["direction"] == "outbound" and x["kind"] == "response" and x["status"] == 200
        assert x["peer"].startswith(f"{outsider}:")


# -- oversized_rejected ------------------------------------------------------------------------


@kernel
def test_oversized_baggage_answered_431(hopd: Daemon, tmp_path: Path) -> None:
    port, lax = free_port(), free_port()
    big = "k=" + "v" * 8998  # 9000 bytes: over the 8192-byte default
    with (
        server(py(tmp_path, "t_431_srv", "echo_server.py", "127.0.0.1", port, "reject:8192"), port),
        server(py(tmp_path, "t_lax_srv", "echo_server.py", "127.0.0.1", lax), lax),
    ):

        def drive() -> None:
            client(
                tmp_path,
                "t_big_cli",
                "127.0.0.1",
                port,
                431,
                f"traceparent: {TP}",
                f"baggage: {big}",
            )
            # controls: a small baggage to the same server; the big one to a lax server
            client(
                tmp_path,
                "t_small_cli",
                "127.0.0.1",
                port,
                200,
                f"traceparent: {TP}",
                f"baggage: {BAGGAGE}",
            )
            client(
                tmp_path,
                "t_lax_cli",
                "127.0.0.1",
                lax,
                200,
                f"traceparent: {TP}",
                f"baggage: {big}",
            )

        delta = traffic(
            hopd, drive, "t_big_cli", "t_small_cli", "t_lax_cli", "t_431_srv", "t_lax_srv"
        )
    to = f"127.0.0.1:{port}"
    assert findings(delta, "t_big_cli") == {
        ("oversized", "baggage", to): N,
        ("oversized_rejected", "baggage", to): N,
    }
    assert findings(delta, "t_431_srv") == {
        ("oversized", "baggage", "127.0.0.1"): N,
        ("oversized_rejected", "baggage", "127.0.0.1"): N,
    }
    assert findings(delta, "t_small_cli") == {}
    assert findings(delta, "t_lax_cli") == {("oversized", "baggage", f"127.0.0.1:{lax}"): N}
    assert findings(delta, "t_lax_srv") == {("oversized", "baggage", "127.0.0.1"): N}
    rejected = [x for x in audit_lines(hopd, "t_431_srv") if x["finding"] == "oversized_rejected"]
    assert len(rejected) == N
    assert {x["reason"] for x in rejected} == {"oversized_rejected.status_431"}
    assert "v" * 64 not in (hopd.log.parent / "audit.jsonl").read_text()


# -- [processes] exclude, live ---------------------------------------------------------------


@kernel
def test_excluded_processes_are_not_analysed(hopd: Daemon, tmp_path: Path) -> None:
    port = free_port()
    with server(py(tmp_path, "t_hx_srv", "echo_server.py", "127.0.0.1", port, "echo"), port):

        def drive() -> None:
            client(tmp_path, "t_hx_cli", "127.0.0.1", port, 200, f"traceparent: {TP_BAD}")
            client(tmp_path, "t_hi_cli", "127.0.0.1", port, 200, f"traceparent: {TP_BAD}")

        delta = traffic(hopd, drive, "t_hi_cli")
    for excluded in ("t_hx_srv", "t_hx_cli"):
        assert delta.series("hopwatch_http_messages_total", process=excluded) == {}
        assert findings(delta, excluded) == {}
    # N requests, and N responses echoing the malformed header back
    assert findings(delta, "t_hi_cli") == {("malformed", "traceparent", f"127.0.0.1:{port}"): 2 * N}
    assert delta.total("hopwatch_http_messages_total", process="t_hi_cli") == 2 * N


# -- SIGHUP reload ------------------------------------------------------------------------------


def _wait_log(daemon: Daemon, needle: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while daemon.log_text().count(needle) < count:
        assert daemon.proc.poll() is None, daemon.log_text()
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{daemon.log_text()}"
        time.sleep(0.05)


@kernel
def test_sighup_reloads_and_a_bad_file_keeps_the_running_config(tmp_path: Path) -> None:
    first = '[egress]\nallow = ["127.0.0.0/8"]\n[sensitive]\nemail = false\n'
    d = Daemon(tmp_path, config=first)
    cfg = tmp_path / "hopwatch.toml"
    port = free_port()
    headers = (f"traceparent: {TP}", "baggage: user=alice%40example.com")
    try:
        with server(py(tmp_path, "t_hup_srv", "echo_server.py", "127.0.0.1", port), port):

            def drive() -> None:
                client(tmp_path, "t_hup_cli", "127.0.0.1", port, 200, *headers)

            # 1. loopback allowed, e-mail detector off: nothing to report.
            assert findings(traffic(d, drive, "t_hup_cli", "t_hup_srv"), "t_hup_cli") == {}

            # 2. loopback no longer allowed, e-mail detector on: leak and sensitive.
            cfg.write_text('[egress]\nallow = ["10.0.0.0/8"]\n')
            d.proc.send_signal(signal.SIGHUP)
            _wait_log(d, "configuration reloaded", 1)
            dest = f"127.0.0.1:{port}"
            second = {
                ("leak", "traceparent", dest): N,
                ("leak", "baggage", dest): N,
                ("sensitive", "baggage", dest): N,
            }
            assert findings(traffic(d, drive, "t_hup_cli", "t_hup_srv"), "t_hup_cli") == second

            # 3. garbage: the daemon keeps running with the previous configuration and
            #    logs the error with its line.
            cfg.write_text('[egress]\nallow = ["10.0.0.0/8"]\n[limits]\nbaggage_bytes = "lots"\n')
            d.proc.send_signal(signal.SIGHUP)
            _wait_log(d, "keeping the running configuration", 1)
            assert f"{cfg}:4: limits.baggage_bytes must be an integer" in d.log_text()
            cfg.write_text("[egress\n")
            d.proc.send_signal(signal.SIGHUP)
            _wait_log(d, "keeping the running configuration", 2)
            assert f"{cfg}:1: not valid TOML" in d.log_text()
            assert d.proc.poll() is None
            assert findings(traffic(d, drive, "t_hup_cli", "t_hup_srv"), "t_hup_cli") == second
    finally:
        rc = d.stop()
    assert rc == 0, d.log_text()


# -- label cap: 10,000 distinct peers (synthetic events, no kernel) -----------------------------


def test_ten_thousand_peers_stay_within_the_label_cap() -> None:
    """Pure: synthetic capture events through `Pipeline` + `HopAnalyzer`, as the daemon
    wires them. Driving 10,000 real hosts is not practical on one test machine."""
    from hopwatch.capture._types import ConnClosed, ConnOpened, DataChunk, Direction, SockAddr
    from hopwatch.config import parse_config
    from hopwatch.conntrack import ConnectionTable
    from hopwatch.hops import HopAnalyzer
    from hopwatch.metrics import Metrics
    from hopwatch.pipeline import Pipeline

    cap = 100
    cfg = parse_config(f'[egress]\nallow = ["10.0.0.0/8"]\n[metrics]\nmax_peer_labels = {cap}\n')
    metrics = Metrics(max_peer_labels=cfg.max_peer_labels, max_process_labels=10)
    hopper = HopAnalyzer(cfg, metrics)
    pipe = Pipeline(cfg, metrics, ConnectionTable(), observers=(hopper,))
    tgid, n = 4_000_100, 10_000  # no such process: identity falls back to the event's comm

    def feed(ev: object) -> None:
        pipe.handle(ev)  # type: ignore[arg-type]
        hopper.handle_event(ev)  # type: ignore[arg-type]

    for i in range(n):
        client_ip = SockAddr(socket.AF_INET, f"10.{i >> 8}.{i & 255}.9", 40000)
        outside = SockAddr(socket.AF_INET, f"203.0.{i >> 8}.{i & 255}", 443)
        # A request with context comes in from a distinct client ...
        feed(ConnOpened(tgid, tgid, 5, "server", client_ip, 1, comm="svc"))
        req = f"GET /a HTTP/1.1\r\nHost: svc\r\ntraceparent: {TP}\r\n\r\n".encode()
        feed(DataChunk(tgid, tgid, 5, Direction.RECV, 2, len(req), req, comm="svc"))
        # ... and the service calls a distinct third party without it (stripped), then
        # with it (leak), both through distinct peers.
        feed(ConnOpened(tgid, tgid, 9, "client", outside, 3, comm="svc"))
        for ctx in ("", f"traceparent: {TP}\r\n"):
            out = f"GET /b HTTP/1.1\r\nHost: h{i}.example\r\n{ctx}\r\n".encode()
            feed(DataChunk(tgid, tgid, 9, Direction.SEND, 4, len(out), out, comm="svc"))
        feed(ConnClosed(tgid, 9, 5))
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        feed(DataChunk(tgid, tgid, 5, Direction.SEND, 6, len(resp), resp, comm="svc"))
        feed(ConnClosed(tgid, 5, 7))
    metrics.overflow_check()

    def series(name: str) -> list[Any]:
        return [s for f in metrics.registry.collect() for s in f.samples if s.name == name]

    found, hop_series = series(FIND), series(HOPS)
    by_finding = Counter[str]()
    for s in found:
        by_finding[s.labels["finding"]] += int(s.value)
    assert by_finding == {"stripped": n, "leak": n}
    assert sum(s.value for s in hop_series) == 2 * n
    peers = {s.labels["peer"] for s in (*found, *hop_series)}
    assert len(peers) <= cap + 1 and "other" in peers
    assert len(found) <= 2 * (cap + 1)  # (stripped|leak) x (<= cap peers + other)
    assert len(hop_series) <= 2 * (cap + 1)  # (w3c->none|w3c->w3c) x peers
    assert hopper.open_requests() == 0 and hopper.tracked_processes() <= 1
    overflow = metrics.registry.get_sample_value("hopwatch_label_overflow_total", {"label": "peer"})
    assert overflow is not None and overflow > 0


def test_findings_complete_a_deferred_local_address() -> None:
    """Pure: the data path's budgeted /proc lookup may defer a connection's local address
    (connection churn); a finding's audit line then reads it unbudgeted, once."""
    from dataclasses import dataclass as _dataclass

    from hopwatch.capture._types import SockAddr
    from hopwatch.config import Config
    from hopwatch.hops import HopAnalyzer, HopFinding
    from hopwatch.metrics import Metrics
    from hopwatch.pipeline import Observation, Pipeline
    from hopwatch.propagation import check_message
    from hopwatch.protocols._events import MessageParsed, Origin

    local = SockAddr(socket.AF_INET, "10.0.0.7", 45000)

    @_dataclass
    class Conn:
        local: SockAddr | None = None
        peer: SockAddr | None = None
        resolved: bool = False

    class Table:
        def __init__(self) -> None:
            self.conn, self.reads = Conn(), 0

        def get(self, tgid: int, fd: int) -> Conn | None:
            return self.conn if (tgid, fd) == (7, 9) else None

        def resolve(self, conn: Conn, *, budgeted: bool = False) -> bool:
            if not conn.resolved:
                self.reads += 1
                conn.resolved, conn.local = True, local
            return conn.local is not None

    class Sink:
        def __init__(self) -> None:
            self.got: list[HopFinding] = []

        def hop_finding(self, finding: HopFinding) -> None:
            self.got.append(finding)

    sink, table = Sink(), Table()
    cfg = Config()
    hopper = HopAnalyzer(cfg, Metrics(), sink)
    Pipeline(cfg, Metrics(), table, observers=(hopper,))  # type: ignore[arg-type]
    assert hopper.resolve_local is not None
    headers = (("traceparent", TP), ("baggage", BAGGAGE))
    msg = MessageParsed(
        Origin.CLIENT, "http1", method="GET", path="/", authority="tracker.example",
        headers=headers, header_block_bytes=100,
    )  # fmt: skip
    obs = Observation(
        message=msg, verdict=check_message(headers), direction="outbound", tgid=7, tid=7,
        fd=9, ts_ns=1, process="svc", comm="svc", role="client", local=None,
        peer=SockAddr(socket.AF_INET, "203.0.113.7", 443),
    )  # fmt: skip
    hopper(obs)
    assert [(f.finding, f.header) for f in sink.got] == [
        ("leak", "traceparent"),
        ("leak", "baggage"),
    ]
    assert all(f.obs.local == local for f in sink.got)
    assert table.reads == 1
