"""Real kernel, real peers, real /metrics: exact counts (issue 3 §4).

One `hopwatch run` serves the session (conftest `daemon`); every peer runs under a unique
command name (a symlink), so the `process` label isolates each test's traffic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hopwatch.capture.live import regs_args_supported
from tests.helpers import (
    PEERS,
    SYSTEM_PYTHON,
    Daemon,
    Delta,
    NetNS,
    counts,
    free_port,
    named,
    nginx_args,
    python_env,
    run,
    server,
    wait_for,
)

pytestmark = pytest.mark.kernel

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
B3 = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"
FIND = "hopwatch_findings_total"


def findings(delta: Delta, process: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for labels, value in delta.series(FIND, process=process).items():
        d = dict(labels)
        out[(d["finding"], d["header"])] = out.get((d["finding"], d["header"]), 0) + value
    return out


def traffic(daemon: Daemon, fn) -> Delta:  # type: ignore[no-untyped-def]
    before = daemon.settle()
    fn()
    return daemon.settle(since=before) - before


def exchange(
    client: str, server_name: str, proto: str, n_with: int, n_without: int, ctx: str = "w3c"
) -> dict[str, dict[tuple[str, str, str, str], float]]:
    """The exact counts a clean request/response exchange must produce."""
    req_c = {(ctx, n_with), ("none", n_without)}
    expect_client: dict[tuple[str, str, str, str], float] = {}
    expect_server: dict[tuple[str, str, str, str], float] = {}
    for c, n in req_c:
        if n:
            expect_client[("outbound", "request", proto, c)] = n
            expect_server[("inbound", "request", proto, c)] = n
    expect_client[("inbound", "response", proto, "none")] = n_with + n_without
    expect_server[("outbound", "response", proto, "none")] = n_with + n_without
    return {client: expect_client, server_name: expect_server}


# -- HTTP/1.1 -----------------------------------------------------------------------------


def test_python_http1_loopback(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    srv, cli = named(tmp_path, "t_h1srv", SYSTEM_PYTHON), named(tmp_path, "t_h1cli", SYSTEM_PYTHON)
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):

        def drive() -> None:
            run(
                [
                    cli,
                    str(PEERS / "h1_client.py"),
                    "127.0.0.1",
                    str(port),
                    "5",
                    f"traceparent: {TP}",
                    "tracestate: congo=t61rcWkgMzE",
                ]
            )
            run([cli, str(PEERS / "h1_client.py"), "127.0.0.1", str(port), "4"])
            run([cli, str(PEERS / "h1_client.py"), "127.0.0.1", str(port), "3", f"b3: {B3}"])
            run(
                [
                    cli,
                    str(PEERS / "h1_client.py"),
                    "127.0.0.1",
                    str(port),
                    "2",
                    f"traceparent: {TP}",
                    f"b3: {B3}",
                ]
            )

        delta = traffic(daemon, drive)
    assert counts(delta, "t_h1cli") == {
        ("outbound", "request", "http1", "w3c"): 5,
        ("outbound", "request", "http1", "none"): 4,
        ("outbound", "request", "http1", "b3"): 3,
        ("outbound", "request", "http1", "both"): 2,
        ("inbound", "response", "http1", "none"): 14,
    }
    assert counts(delta, "t_h1srv") == {
        ("inbound", "request", "http1", "w3c"): 5,
        ("inbound", "request", "http1", "none"): 4,
        ("inbound", "request", "http1", "b3"): 3,
        ("inbound", "request", "http1", "both"): 2,
        ("outbound", "response", "http1", "none"): 14,
    }
    assert findings(delta, "t_h1cli") == {} and findings(delta, "t_h1srv") == {}


def test_curl_http1_to_hypercorn_and_h2_prior_knowledge_to_nginx(
    daemon: Daemon, tmp_path: Path
) -> None:
    port, nport = free_port(), free_port()
    hyper = named(tmp_path, "t_hyper", SYSTEM_PYTHON)
    curl1, curl2 = named(tmp_path, "t_curl1", "curl"), named(tmp_path, "t_curl2", "curl")
    url, nurl = f"http://127.0.0.1:{port}/x", f"http://127.0.0.1:{nport}/x"
    with (
        server(
            [hyper, "-m", "hypercorn", "asgi_app:app", "-b", f"127.0.0.1:{port}"],
            port,
            env=python_env(),
            cwd=PEERS,
        ),
        server(nginx_args(tmp_path, "t_nginx2", f"127.0.0.1:{nport} http2"), nport),
    ):

        def drive() -> None:
            run([curl1, "-sf", "-o", "/dev/null", "-H", f"traceparent: {TP}", *[url] * 3])
            # One URL per curl: curl 7.88 fails (exit 16) reusing an h2c connection.
            h2 = [curl2, "-sf", "--http2-prior-knowledge", "-o", "/dev/null"]
            for _ in range(4):
                run([*h2, "-H", f"traceparent: {TP}", nurl])
            for _ in range(2):
                run([*h2, nurl])

        delta = traffic(daemon, drive)
    assert counts(delta, "t_curl1") == exchange("c", "s", "http1", 3, 0)["c"]
    assert counts(delta, "t_hyper") == exchange("c", "s", "http1", 3, 0)["s"]
    assert counts(delta, "t_curl2") == exchange("c", "s", "http2", 4, 2)["c"]
    assert counts(delta, "t_nginx2") == exchange("c", "s", "http2", 4, 2)["s"]
    for process in ("t_curl1", "t_hyper", "t_curl2", "t_nginx2"):
        assert findings(delta, process) == {}, process


def test_httpx_h2c_to_hypercorn(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    hyper, cli = (
        named(tmp_path, "t_hyper2", SYSTEM_PYTHON),
        named(tmp_path, "t_httpx", SYSTEM_PYTHON),
    )
    with server(
        [hyper, "-m", "hypercorn", "asgi_app:app", "-b", f"127.0.0.1:{port}"],
        port,
        env=python_env(),
        cwd=PEERS,
    ):

        def drive() -> None:
            run(
                [
                    cli,
                    str(PEERS / "httpx_client.py"),
                    f"http://127.0.0.1:{port}",
                    "6",
                    f"traceparent: {TP}",
                ],
                env=python_env(),
            )
            run(
                [cli, str(PEERS / "httpx_client.py"), f"http://127.0.0.1:{port}", "3", f"b3: {B3}"],
                env=python_env(),
            )

        delta = traffic(daemon, drive)
    assert counts(delta, "t_httpx") == {
        ("outbound", "request", "http2", "w3c"): 6,
        ("outbound", "request", "http2", "b3"): 3,
        ("inbound", "response", "http2", "none"): 9,
    }
    assert counts(delta, "t_hyper2") == {
        ("inbound", "request", "http2", "w3c"): 6,
        ("inbound", "request", "http2", "b3"): 3,
        ("outbound", "response", "http2", "none"): 9,
    }


def test_node_http2(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    srv, cli = named(tmp_path, "t_nodesrv", "node"), named(tmp_path, "t_nodecli", "node")
    with server([srv, str(PEERS / "node_h2.js"), "server", str(port)], port):

        def drive() -> None:
            run([cli, str(PEERS / "node_h2.js"), "client", str(port), "5", f"traceparent: {TP}"])
            run([cli, str(PEERS / "node_h2.js"), "client", str(port), "2"])

        delta = traffic(daemon, drive)
    want = exchange("t_nodecli", "t_nodesrv", "http2", 5, 2)
    assert counts(delta, "t_nodecli") == want["t_nodecli"]
    assert counts(delta, "t_nodesrv") == want["t_nodesrv"]


def test_grpcio_h2c_metadata(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    srv, cli = (
        named(tmp_path, "t_grpcsrv", SYSTEM_PYTHON),
        named(tmp_path, "t_grpccli", SYSTEM_PYTHON),
    )
    with server(
        [srv, str(PEERS / "grpc_peer.py"), "server", "127.0.0.1", str(port)], port, env=python_env()
    ):

        def drive() -> None:
            run(
                [
                    cli,
                    str(PEERS / "grpc_peer.py"),
                    "client",
                    "127.0.0.1",
                    str(port),
                    "7",
                    f"traceparent: {TP}",
                ],
                env=python_env(),
            )

        delta = traffic(daemon, drive)
    # gRPC answers with a response HEADERS block and a trailers block per call: the
    # trailers are not a second response.
    assert counts(delta, "t_grpccli") == {
        ("outbound", "request", "http2", "w3c"): 7,
        ("inbound", "response", "http2", "none"): 7,
    }
    assert counts(delta, "t_grpcsrv") == {
        ("inbound", "request", "http2", "w3c"): 7,
        ("outbound", "response", "http2", "none"): 7,
    }


def test_across_network_namespaces(daemon: Daemon, tmp_path: Path, netns: NetNS) -> None:
    port = free_port()
    srv, cli = named(tmp_path, "t_nssrv", SYSTEM_PYTHON), named(tmp_path, "t_nscli", SYSTEM_PYTHON)
    gsrv, gcli = (
        named(tmp_path, "t_nsgsrv", SYSTEM_PYTHON),
        named(tmp_path, "t_nsgcli", SYSTEM_PYTHON),
    )
    with (
        server(
            [srv, str(PEERS / "h1_server.py"), netns.ns_ip, str(port)],
            port,
            host=netns.ns_ip,
            netns=netns.name,
        ),
        server(
            [gsrv, str(PEERS / "grpc_peer.py"), "server", netns.ns_ip, str(port + 1)],
            port + 1,
            host=netns.ns_ip,
            netns=netns.name,
            env=python_env(),
        ),
    ):

        def drive() -> None:
            run(
                [
                    cli,
                    str(PEERS / "h1_client.py"),
                    netns.ns_ip,
                    str(port),
                    "4",
                    f"traceparent: {TP}",
                ]
            )
            run(
                [
                    gcli,
                    str(PEERS / "grpc_peer.py"),
                    "client",
                    netns.ns_ip,
                    str(port + 1),
                    "3",
                    f"traceparent: {TP}",
                ],
                env=python_env(),
            )

        delta = traffic(daemon, drive)
    h1 = exchange("c", "s", "http1", 4, 0)
    assert counts(delta, "t_nscli") == h1["c"]
    assert counts(delta, "t_nssrv") == h1["s"]
    h2 = exchange("c", "s", "http2", 3, 0)
    assert counts(delta, "t_nsgcli") == h2["c"]
    assert counts(delta, "t_nsgsrv") == h2["s"]
    # The peer label of the client's findings-free traffic is not exported; check the
    # namespace server saw the host end of the veth as its peer through a finding:
    bad = "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"
    with server(
        [srv, str(PEERS / "h1_server.py"), netns.ns_ip, str(port + 2)],
        port + 2,
        host=netns.ns_ip,
        netns=netns.name,
    ):
        delta = traffic(
            daemon,
            lambda: run(
                [
                    cli,
                    str(PEERS / "h1_client.py"),
                    netns.ns_ip,
                    str(port + 2),
                    "2",
                    f"traceparent: {bad}",
                ]
            ),
        )
    assert delta.series(FIND, process="t_nssrv", finding="malformed") == {
        frozenset(
            {
                ("finding", "malformed"),
                ("header", "traceparent"),
                ("process", "t_nssrv"),
                ("peer", netns.host_ip),
            }
        ): 2
    }
    assert delta.series(FIND, process="t_nscli", finding="malformed") == {
        frozenset(
            {
                ("finding", "malformed"),
                ("header", "traceparent"),
                ("process", "t_nscli"),
                ("peer", f"{netns.ns_ip}:{port + 2}"),
            }
        ): 2
    }


# -- findings where injected, none on clean traffic ---------------------------------------


def test_findings_exactly_where_injected(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    srv, cli = named(tmp_path, "t_fsrv", SYSTEM_PYTHON), named(tmp_path, "t_fcli", SYSTEM_PYTHON)
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):

        def drive() -> None:
            c = [cli, str(PEERS / "h1_client.py"), "127.0.0.1", str(port)]
            run([*c, "3", "traceparent: 00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"])
            run([*c, "2", f"traceparent: {TP}", "baggage: user=alice%40example.com"])
            run(
                [
                    *c,
                    "4",
                    f"traceparent: {TP}",
                    "baggage: " + ",".join(f"k{i}=v" for i in range(70)),
                ]
            )
            run([*c, "1", f"traceparent: {TP}", "b3: 1111111111111111-2222222222222222-1"])
            run([*c, "5", f"traceparent: {TP}", "baggage: userId=alice,isProduction=false"])

        delta = traffic(daemon, drive)
    for process in ("t_fcli", "t_fsrv"):
        assert findings(delta, process) == {
            ("malformed", "traceparent"): 3,
            ("sensitive", "baggage"): 2,
            ("oversized", "baggage"): 4,
            ("conflict", "b3"): 1,
        }, process
    assert counts(delta, "t_fcli")[("outbound", "request", "http1", "none")] == 3
    assert counts(delta, "t_fcli")[("outbound", "request", "http1", "w3c")] == 11


def test_64k_baggage_header(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    hyper = named(tmp_path, "t_bighyp", SYSTEM_PYTHON)
    curl = named(tmp_path, "t_bigcurl", "curl")
    baggage = "big=" + "x" * (64 * 1024)
    with server(
        [hyper, "-m", "hypercorn", "asgi_app:app", "-b", f"127.0.0.1:{port}"],
        port,
        env=python_env(),
        cwd=PEERS,
    ):

        def drive() -> None:
            run(
                [
                    curl,
                    "-s",
                    "-o",
                    "/dev/null",
                    "-H",
                    f"traceparent: {TP}",
                    "-H",
                    f"baggage: {baggage}",
                    f"http://127.0.0.1:{port}/",
                ],
                check=False,
            )

        delta = traffic(daemon, drive)
    assert counts(delta, "t_bigcurl")[("outbound", "request", "http1", "w3c")] == 1
    # hypercorn refuses the head (431): the header cost the request.
    assert findings(delta, "t_bigcurl") == {
        ("oversized", "baggage"): 1,
        ("oversized", "*"): 1,
        ("oversized_rejected", "baggage"): 1,
        ("oversized_rejected", "*"): 1,
    }
    assert findings(delta, "t_bighyp") == findings(delta, "t_bigcurl")


# -- awkward writers ----------------------------------------------------------------------

ONE_BYTE = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
req = b"GET /one HTTP/1.1\r\nHost: x\r\ntraceparent: %s\r\n\r\n" % sys.argv[2].encode()
for b in req:
    s.send(bytes([b]))
    time.sleep(0.001)
f = s.makefile("rb")
assert f.readline().startswith(b"HTTP/1.1 200")
"""

PIPELINED = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
req = b"GET /p HTTP/1.1\r\nHost: x\r\ntraceparent: %s\r\n\r\n" % sys.argv[2].encode()
s.sendall(req * 3)
f = s.makefile("rb")
for _ in range(3):
    assert f.readline().startswith(b"HTTP/1.1 200")
    while f.readline() not in (b"\r\n", b""):
        pass
    f.read(3)
"""

HALF_REQUEST = r"""
import os, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.send(b"GET /half HTTP/1.1\r\nHost: x\r\ntracepar")
print("sent", flush=True)
time.sleep(60)
"""


def test_one_byte_writes_and_pipelining(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    srv = named(tmp_path, "t_awksrv", SYSTEM_PYTHON)
    one, pipe = (
        named(tmp_path, "t_onebyte", SYSTEM_PYTHON),
        named(tmp_path, "t_pipe", SYSTEM_PYTHON),
    )
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):

        def drive() -> None:
            run([one, "-c", ONE_BYTE, str(port), TP])
            run([pipe, "-c", PIPELINED, str(port), TP])

        delta = traffic(daemon, drive)
    assert counts(delta, "t_onebyte") == exchange("c", "s", "http1", 1, 0)["c"]
    assert counts(delta, "t_pipe") == exchange("c", "s", "http1", 3, 0)["c"]
    assert counts(delta, "t_awksrv") == exchange("c", "s", "http1", 4, 0)["s"]


FD_REUSE = r"""
import socket, sys, time
port, rounds = int(sys.argv[1]), int(sys.argv[2])
req = b"GET %s HTTP/1.1\r\nHost: x\r\ntraceparent: " + sys.argv[3].encode() + b"\r\n\r\n"
for _ in range(rounds):
    a = socket.create_connection(("127.0.0.1", port))
    a.sendall(req % b"/big")
    got = b""
    while b"\r\n\r\n" not in got or len(got) < 4096:
        got += a.recv(4096)
    fd = a.fileno()
    a.close()  # most of the 64 KiB body unread
    b = socket.create_connection(("127.0.0.1", port))
    assert b.fileno() == fd  # the same descriptor, a new connection
    time.sleep(0.3)  # the daemon reads A's records now, while B holds the fd
    b.sendall(req % b"/small")
    f = b.makefile("rb")
    assert f.readline().startswith(b"HTTP/1.1 200")
    while f.readline() != b"\r\n":
        pass
    assert f.read(3) == b"ok\n"
    b.close()
"""


def test_body_skip_of_a_closed_connection_never_reaches_the_next_on_its_fd(
    daemon: Daemon, tmp_path: Path
) -> None:
    # A reads a response head and part of a 64 KiB body, then closes; B opens on the same
    # fd before the daemon has read A's records. The daemon asks the kernel to skip the
    # rest of A's body: that must not land on B (it skipped B's response once).
    port = free_port()
    srv = named(tmp_path, "t_reusesrv", SYSTEM_PYTHON)
    cli = named(tmp_path, "t_reusecli", SYSTEM_PYTHON)
    rounds = 5
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):
        delta = traffic(daemon, lambda: run([cli, "-c", FD_REUSE, str(port), str(rounds), TP]))
    assert counts(delta, "t_reusecli") == {
        ("outbound", "request", "http1", "w3c"): 2 * rounds,
        ("inbound", "response", "http1", "none"): 2 * rounds,
    }
    assert delta.total("hopwatch_stream_desyncs_total") == 0


def test_client_killed_mid_request(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    srv = named(tmp_path, "t_killsrv", SYSTEM_PYTHON)
    victim, cli = (
        named(tmp_path, "t_victim", SYSTEM_PYTHON),
        named(tmp_path, "t_after", SYSTEM_PYTHON),
    )
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):

        def drive() -> None:
            p = subprocess.Popen([victim, "-c", HALF_REQUEST, str(port)], stdout=subprocess.PIPE)
            assert p.stdout is not None and p.stdout.readline() == b"sent\n"
            time.sleep(0.2)
            p.send_signal(signal.SIGKILL)
            p.wait()
            run(
                [
                    cli,
                    str(PEERS / "h1_client.py"),
                    "127.0.0.1",
                    str(port),
                    "2",
                    f"traceparent: {TP}",
                ]
            )

        delta = traffic(daemon, drive)
    # The half request is never counted; http.server still answers it (it reads EOF as
    # the end of the head) into the dead socket: one more response than requests.
    assert counts(delta, "t_victim") == {}
    assert counts(delta, "t_after") == exchange("c", "s", "http1", 2, 0)["c"]
    assert counts(delta, "t_killsrv") == {
        ("inbound", "request", "http1", "w3c"): 2,
        ("outbound", "response", "http1", "none"): 3,
    }
    assert daemon.proc.poll() is None


FILE_WRITER = r"""
import os, socket, sys
path = sys.argv[1]
with open(path, "wb", buffering=0) as f:
    for _ in range(20):
        f.write(b"GET / HTTP/1.1\r\nHost: x\r\ntraceparent: %s\r\n\r\n" % sys.argv[2].encode())
a, b = socket.socketpair()
for _ in range(20):
    a.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    b.recv(4096)
r, w = os.pipe()
for _ in range(20):
    os.write(w, b"GET / HTTP/1.1\r\n\r\n")
    os.read(r, 4096)
"""


def test_files_pipes_and_unix_sockets_are_not_http(daemon: Daemon, tmp_path: Path) -> None:
    writer = named(tmp_path, "t_filew", SYSTEM_PYTHON)
    delta = traffic(daemon, lambda: run([writer, "-c", FILE_WRITER, str(tmp_path / "f"), TP]))
    assert counts(delta, "t_filew") == {}
    assert findings(delta, "t_filew") == {}


# -- a connection that existed before the daemon started ----------------------------------

KEEPALIVE = r"""
import http.client, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
def one(i):
    conn.request("GET", f"/ka/{i}", headers={"traceparent": sys.argv[2]})
    r = conn.getresponse(); r.read(); assert r.status == 200
one(0)
print("connected", flush=True)
sys.stdin.readline()
for i in range(1, 6):
    one(i)
print("done", flush=True)
"""


def test_keepalive_connection_opened_before_daemon(tmp_path: Path) -> None:
    port = free_port()
    srv, cli = named(tmp_path, "t_kasrv", SYSTEM_PYTHON), named(tmp_path, "t_kacli", SYSTEM_PYTHON)
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):
        client = subprocess.Popen(
            [cli, "-c", KEEPALIVE, str(port), TP], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == b"connected\n"
        d = Daemon(tmp_path)  # started after the connection exists
        try:
            before = d.settle()
            client.stdin.write(b"go\n")
            client.stdin.flush()
            assert client.stdout.readline() == b"done\n"
            client.wait(10)
            delta = d.settle(since=before) - before
        finally:
            t0 = time.monotonic()
            rc = d.stop()
            stop_s = time.monotonic() - t0
    assert rc == 0
    assert stop_s < 2.0, f"SIGTERM took {stop_s:.2f}s"
    assert counts(delta, "t_kacli") == exchange("c", "s", "http1", 5, 0)["c"]
    # The server thread was already blocked in recv() when the probes attached; the
    # daemon adopted the connection at start (its scan of existing sockets) while that
    # recv() still waited. An exit program that reads the arguments from the
    # saved registers (x86-64) copies it: all five requests are counted. Where the
    # arguments are stashed at enter, that syscall's enter was never seen: the first
    # request cannot be copied. Every later one is; all five responses are.
    assert counts(delta, "t_kasrv") == {
        ("inbound", "request", "http1", "w3c"): 5 if regs_args_supported() else 4,
        ("outbound", "response", "http1", "none"): 5,
    }


def test_exclude_ports_leaves_out_both_ends(tmp_path: Path) -> None:
    """`exclude_ports` leaves out a port's clients and its server, short connections and a
    keep-alive one alike; the same traffic to another port is counted exactly."""
    out_port, in_port = free_port(), free_port()
    d = Daemon(tmp_path, config=f"[capture]\nexclude_ports = [{out_port}]\n", name="hw_xports")
    names = ("t_xp_cli", "t_xp_ka", "t_xp_ctl", "t_xp_ngx", "t_xp_ngx2")
    try:
        with (
            server(nginx_args(tmp_path, "t_xp_ngx", f"127.0.0.1:{out_port}", ""), out_port),
            server(nginx_args(tmp_path, "t_xp_ngx2", f"127.0.0.1:{in_port}", ""), in_port),
        ):
            cli = named(tmp_path, "t_xp_cli", "curl")
            ka = named(tmp_path, "t_xp_ka", "curl")
            ctl = named(tmp_path, "t_xp_ctl", "curl")
            before = d.settle(processes=names, quiet=2.0)
            get = ["-sf", "-H", f"traceparent: {TP}", "-o", "/dev/null"]
            for _ in range(5):
                run([cli, *get, f"http://127.0.0.1:{out_port}/"])
                run([ctl, *get, f"http://127.0.0.1:{in_port}/"])
            # One connection, five requests: the kernel did not track its connect(), so its
            # first HTTP write asks the daemon to adopt it; it must stay left out.
            urls = [f"http://127.0.0.1:{out_port}/{i}" for i in range(5)]
            run([ka, *get, *["-o", "/dev/null"] * 4, *urls])
            delta = d.settle(processes=names, quiet=2.0) - before
    finally:
        d.stop()
    assert counts(delta, "t_xp_ctl") == exchange("c", "s", "http1", 5, 0)["c"]
    assert counts(delta, "t_xp_ngx2") == exchange("c", "s", "http1", 5, 0)["s"]
    for excluded in ("t_xp_cli", "t_xp_ka", "t_xp_ngx"):
        assert counts(delta, excluded) == {}, excluded
    assert delta.total("hopwatch_events_lost_total") == 0


def test_exclude_ports_follows_a_listening_fd_reused_for_another_port(tmp_path: Path) -> None:
    """A process serves an excluded port, closes that listening socket and listens on
    another port under the same fd number: the connections it accepts there are counted
    exactly (the daemon's memory of the fd's port must not outlive the socket)."""
    out_port, in_port = free_port(), free_port()
    d = Daemon(tmp_path, config=f"[capture]\nexclude_ports = [{out_port}]\n", name="hw_xreuse")
    srv = named(tmp_path, "t_xr_srv", SYSTEM_PYTHON)
    cli_out, cli_in = named(tmp_path, "t_xr_out", "curl"), named(tmp_path, "t_xr_in", "curl")
    n_out, n_in = 3, 4
    args = [srv, str(PEERS / "relisten_server.py"), str(out_port), str(n_out), str(in_port)]
    proc = subprocess.Popen([*args, str(n_in)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        before = d.settle()
        get = ["-sf", "-H", f"traceparent: {TP}", "-o", "/dev/null"]
        first_fd = proc.stdout.readline().strip()
        for _ in range(n_out):
            run([cli_out, *get, f"http://127.0.0.1:{out_port}/"])
        second_fd = proc.stdout.readline().strip()
        assert first_fd == second_fd != "", (first_fd, second_fd)
        for _ in range(n_in):
            run([cli_in, *get, f"http://127.0.0.1:{in_port}/"])
        assert proc.wait(10) == 0
        delta = d.settle(since=before) - before
    finally:
        proc.kill()
        proc.wait()
        d.stop()
    assert counts(delta, "t_xr_in") == exchange("c", "s", "http1", n_in, 0)["c"]
    assert counts(delta, "t_xr_srv") == exchange("c", "s", "http1", n_in, 0)["s"]
    assert counts(delta, "t_xr_out") == {}
    assert delta.total("hopwatch_events_lost_total", reason="ring_full") == 0


def test_exclude_ports_drops_an_fd_replaced_by_dup2(tmp_path: Path) -> None:
    """dup2 closes a tracked connection's socket without close(), and the new socket on
    that fd connects to an excluded port: its traffic is not counted as the old one's."""
    port, excluded = free_port(), free_port()
    d = Daemon(tmp_path, config=f"[capture]\nexclude_ports = [{excluded}]\n", name="hw_xdup")
    srv, ex = named(tmp_path, "t_dp_srv", SYSTEM_PYTHON), named(tmp_path, "t_dp_ex", SYSTEM_PYTHON)
    cli = named(tmp_path, "t_dp_cli", SYSTEM_PYTHON)
    try:
        with (
            server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port),
            server([ex, str(PEERS / "h1_server.py"), "127.0.0.1", str(excluded)], excluded),
        ):
            before = d.settle()
            run([cli, str(PEERS / "dup_client.py"), str(port), str(excluded)])
            delta = d.settle(since=before) - before
    finally:
        d.stop()
    assert counts(delta, "t_dp_cli") == exchange("c", "s", "http1", 1, 0)["c"]
    assert counts(delta, "t_dp_srv") == exchange("c", "s", "http1", 1, 0)["s"]
    assert counts(delta, "t_dp_ex") == {}
    assert delta.total("hopwatch_parse_errors_total") == 0
    assert delta.total("hopwatch_events_lost_total") == 0


@pytest.mark.parametrize("how", ["dup2", "dup3"])
def test_dup2_ends_the_connection_whose_fd_it_replaced(
    daemon: Daemon, tmp_path: Path, how: str
) -> None:
    """dup2/dup3 put a file on a tracked connection's fd, closing its socket without
    close(): the connection ends there, and the request-shaped bytes then written to and
    read from the file through that fd are neither copied nor parsed (before, they were
    taken for the old connection's: parse errors or phantom requests)."""
    port = free_port()
    srv = named(tmp_path, "t_df_srv", SYSTEM_PYTHON)
    cli = named(tmp_path, f"t_df_{how}", SYSTEM_PYTHON)
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):
        before = daemon.settle()
        out = run([cli, str(PEERS / "dup_file_client.py"), str(port), str(tmp_path / "f"), how])
        delta = daemon.settle(since=before) - before
    assert int(out.stdout) >= 3
    assert counts(delta, f"t_df_{how}") == exchange("c", "s", "http1", 1, 0)["c"]
    assert counts(delta, "t_df_srv") == exchange("c", "s", "http1", 1, 0)["s"]
    assert delta.total("hopwatch_parse_errors_total") == 0
    assert delta.total("hopwatch_stream_desyncs_total") == 0
    assert delta.total("hopwatch_events_lost_total") == 0


def test_close_range_ends_the_connections_in_its_range(daemon: Daemon, tmp_path: Path) -> None:
    """close_range() closes a tracked connection's socket without close(): the daemon ends
    the connection, and the request-shaped bytes then written to and read from a file
    opened on the same fd number are not parsed as the connection's (before: phantom
    requests and parse errors). Bytes the kernel copied before the daemon read the
    close_range event arrive for an fd it no longer tracks and are not parsed either."""
    port = free_port()
    srv = named(tmp_path, "t_cr_srv", SYSTEM_PYTHON)
    cli = named(tmp_path, "t_cr_cli", SYSTEM_PYTHON)
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):
        before = daemon.settle()
        run([cli, str(PEERS / "close_range_client.py"), str(port), str(tmp_path / "f")])
        delta = daemon.settle(since=before) - before
    assert counts(delta, "t_cr_cli") == exchange("c", "s", "http1", 1, 0)["c"]
    assert counts(delta, "t_cr_srv") == exchange("c", "s", "http1", 1, 0)["s"]
    assert delta.total("hopwatch_parse_errors_total") == 0
    assert delta.total("hopwatch_stream_desyncs_total") == 0
    assert delta.total("hopwatch_events_lost_total") == 0


def test_exec_ends_the_connections_it_closed(daemon: Daemon, tmp_path: Path) -> None:
    """A client runs exec with three keep-alive connections open, one of them inherited by
    the new image. The two that exec closed end there: the file the new image then reads
    through their fd numbers is neither parsed nor copied. The inherited one and a new one
    carry the new image's requests, under its name."""
    port = free_port()
    names = ("t_ex_srv", "t_ex_cli", "t_ex_new")
    srv, cli, new = (named(tmp_path, n, SYSTEM_PYTHON) for n in names)
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):
        before = daemon.settle()
        proc = subprocess.Popen(
            [cli, str(PEERS / "exec_client.py"), str(port), new],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline() == "before\n"
            assert proc.stdout.readline() == "ready\n"
            # The daemon has read the exec: the files go on fds it no longer tracks.
            assert wait_for(
                lambda: (daemon.scrape() - before).total(
                    "hopwatch_connections_total", event="exec_closed"
                )
                == 2
            )
            proc.stdin.write("\n")
            proc.stdin.close()
            assert proc.wait(30) == 0
        finally:
            proc.kill()
            proc.wait()
        delta = daemon.settle(since=before) - before
    assert counts(delta, "t_ex_cli") == exchange("c", "s", "http1", 3, 0)["c"]
    assert counts(delta, "t_ex_new") == exchange("c", "s", "http1", 3, 0)["c"]
    assert counts(delta, "t_ex_srv") == exchange("c", "s", "http1", 6, 0)["s"]
    assert delta.total("hopwatch_connections_total", event="exec_closed") == 2
    assert delta.total("hopwatch_unknown_fd_chunks_total") == 0  # the file was not copied
    assert delta.total("hopwatch_parse_errors_total") == 0
    assert delta.total("hopwatch_stream_desyncs_total") == 0
    assert delta.total("hopwatch_events_lost_total") == 0


def test_self_metrics_present(daemon: Daemon, tmp_path: Path) -> None:
    # One exchange of its own: the per-chunk counters exist once a chunk was delivered, and
    # the test must not depend on the tests run before it.
    port = free_port()
    srv, cli = (
        named(tmp_path, "t_selfsrv", SYSTEM_PYTHON),
        named(tmp_path, "t_selfcli", SYSTEM_PYTHON),
    )
    with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):
        delta = traffic(
            daemon, lambda: run([cli, str(PEERS / "h1_client.py"), "127.0.0.1", str(port), "1"])
        )
    assert counts(delta, "t_selfcli") == {
        ("outbound", "request", "http1", "none"): 1,
        ("inbound", "response", "http1", "none"): 1,
    }
    snap = daemon.scrape()
    names = {n for n, _ in snap.samples}
    for required in (
        "hopwatch_events_lost_total",
        "hopwatch_capture_chunks_total",
        "hopwatch_capture_bytes_total",
        "hopwatch_connections_tracked",
        "hopwatch_capture_attached",
    ):
        assert required in names, required
    assert snap.total("hopwatch_capture_attached") == 1
    # the ring's size (default 16 MiB) and what waits in it (read in place: known)
    assert snap.total("hopwatch_capture_ring_bytes") == 16 << 20
    assert "hopwatch_capture_ring_backlog_bytes" in names
    assert 0 <= snap.total("hopwatch_capture_ring_backlog_bytes") < 16 << 20
    assert os.path.exists(f"/proc/{daemon.proc.pid}")


def test_daemon_excludes_its_own_traffic(daemon: Daemon, tmp_path: Path) -> None:
    scraper = named(tmp_path, "t_scraper", "curl")
    url = f"http://{daemon.addr}/metrics"
    delta = traffic(
        daemon, lambda: [run([scraper, "-sf", "-o", "/dev/null", url]) for _ in range(5)]
    )
    # The scraper's side is seen; the daemon's own side of the same requests is not.
    assert counts(delta, "t_scraper") == exchange("c", "s", "http1", 0, 5)["c"]
    assert counts(delta, daemon.name) == {}
