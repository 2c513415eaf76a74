"""TLS (issue 5): OpenSSL plaintext through uprobes, attributed to the socket it travels on.

Kernel tests (marked ``kernel``) run real peers over TLS on loopback or in a network
namespace: curl and nginx (the distro's libssl, SSL_write/SSL_read), Python's ssl module
(SSL_write_ex/SSL_read_ex), Node.js (OpenSSL embedded in the binary, memory BIOs). Counts
are exact per peer (each runs under a unique command name). The other tests check the
pieces that need no kernel: OpenSSL discovery, the pipeline's TLS handling, SNI judgement.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hopwatch.capture import (
    ConnOpened,
    DataChunk,
    Direction,
    SockAddr,
    TlsServerName,
    UnknownFd,
)
from hopwatch.config import Config, EgressRule
from hopwatch.conntrack import ConnectionTable
from hopwatch.hops import destination_of, is_allowed
from hopwatch.metrics import Metrics
from hopwatch.pipeline import Observation, Pipeline
from hopwatch.propagation import Limits, check_message
from hopwatch.protocols._events import MessageParsed, Origin
from hopwatch.tls import SslFinder, elf_info
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
    run,
    server,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
B3 = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"
FIND = "hopwatch_findings_total"


# -- helpers ---------------------------------------------------------------------------------


def findings(delta: Delta, process: str) -> dict[tuple[str, str, str], float]:
    """(finding, header, peer) -> count for one process."""
    out: dict[tuple[str, str, str], float] = {}
    for labels, value in delta.series(FIND, process=process).items():
        d = dict(labels)
        key = (d["finding"], d["header"], d["peer"])
        out[key] = out.get(key, 0) + value
    return out


def traffic(daemon: Daemon, fn) -> Delta:  # type: ignore[no-untyped-def]
    before = daemon.settle()
    fn()
    return daemon.settle(since=before) - before


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for every name the tests use."""
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-subj",
            "/CN=hopwatch.test",
            "-addext",
            "subjectAltName=DNS:localhost,DNS:*.allowed.test,DNS:api.thirdparty.test,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return str(crt), str(key)


def nginx_tls(tmp: Path, name: str, listen: str, cert: tuple[str, str]) -> list[str]:
    return nginx_args(
        tmp, name, listen, f"ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]};"
    )


def h1(
    direction_req: str, n_with: dict[str, int], proto: str
) -> dict[tuple[str, str, str, str], float]:
    """Exact counts of a clean exchange: requests by context, as many responses."""
    resp_dir = "inbound" if direction_req == "outbound" else "outbound"
    out: dict[tuple[str, str, str, str], float] = {}
    for ctx, n in n_with.items():
        if n:
            out[(direction_req, "request", proto, ctx)] = n
    out[(resp_dir, "response", proto, "none")] = sum(n_with.values())
    return out


# -- real peers through the session daemon --------------------------------------------------


@pytest.mark.kernel
def test_curl_https_http1_and_http2_alpn_to_nginx(
    daemon: Daemon, tmp_path: Path, cert: tuple[str, str]
) -> None:
    port = free_port()
    ngx = nginx_tls(tmp_path, "t_tlsnginx", f"127.0.0.1:{port} ssl http2", cert)
    curl1, curl2 = named(tmp_path, "t_tlscurl1", "curl"), named(tmp_path, "t_tlscurl2", "curl")
    url = f"https://127.0.0.1:{port}/tls"
    before_tls = daemon.settle()
    with server(ngx, port):

        def drive() -> None:
            # one keep-alive connection each: 3 requests with context, then 1 without
            run([curl1, "-sfk", "--http1.1", "-H", f"traceparent: {TP}", *[url] * 3])
            run([curl1, "-sfk", "--http1.1", url])
            # HTTP/2 chosen by ALPN: 4 streams with context on one connection, 2 without
            run([curl2, "-sfk", "--http2", "-H", f"traceparent: {TP}", *[url] * 4])
            run([curl2, "-sfk", "--http2", *[url] * 2])

        delta = traffic(daemon, drive)
    assert counts(delta, "t_tlscurl1") == h1("outbound", {"w3c": 3, "none": 1}, "http1")
    assert counts(delta, "t_tlscurl2") == h1("outbound", {"w3c": 4, "none": 2}, "http2")
    assert counts(delta, "t_tlsnginx") == {
        **h1("inbound", {"w3c": 3, "none": 1}, "http1"),
        **h1("inbound", {"w3c": 4, "none": 2}, "http2"),
    }
    for process in ("t_tlscurl1", "t_tlscurl2", "t_tlsnginx"):
        assert findings(delta, process) == {}, process
    # The plaintext came from the uprobes; the sockets' ciphertext was not copied.
    tls = (daemon.scrape() - before_tls).series("hopwatch_capture_tls_total")
    by_event = {dict(k)["event"]: v for k, v in tls.items()}
    assert by_event.get("calls", 0) >= 2 * (4 + 6)  # a write and a read per message, at least
    assert by_event.get("ciphertext_syscalls", 0) > 0


@pytest.mark.kernel
def test_python_ssl_client_and_server(
    daemon: Daemon, tmp_path: Path, cert: tuple[str, str]
) -> None:
    port = free_port()
    srv = named(tmp_path, "t_pytlssrv", SYSTEM_PYTHON)
    cli = named(tmp_path, "t_pytlscli", SYSTEM_PYTHON)
    curl = named(tmp_path, "t_tlscurlpost", "curl")
    body = tmp_path / "body.bin"
    body.write_bytes(b"x" * 256 * 1024)
    peer = str(PEERS / "tls_py.py")
    with server([srv, peer, "server", "127.0.0.1", str(port), *cert], port):

        def drive() -> None:
            run(
                [
                    cli,
                    peer,
                    "client",
                    "127.0.0.1",
                    str(port),
                    "5",
                    "svc.allowed.test",
                    f"traceparent: {TP}",
                ]
            )
            run([cli, peer, "client", "127.0.0.1", str(port), "3", "svc.allowed.test", f"b3: {B3}"])
            run([cli, peer, "client", "127.0.0.1", str(port), "2", "svc.allowed.test"])
            # Large bodies over TLS: the kernel skips them in the plaintext offsets. The upload
            # is paced (512 KiB/s, half a second per body) so that the daemon, which sets the
            # skip once it has parsed the head, is not racing bytes already in flight.
            run(
                [
                    curl,
                    "-sfk",
                    "--http1.1",
                    "--limit-rate",
                    "512k",
                    "-H",
                    f"traceparent: {TP}",
                    "-X",
                    "POST",
                    "--data-binary",
                    f"@{body}",
                    *[f"https://127.0.0.1:{port}/up"] * 3,
                ]
            )

        delta = traffic(daemon, drive)
    assert counts(delta, "t_pytlscli") == h1("outbound", {"w3c": 5, "b3": 3, "none": 2}, "http1")
    assert counts(delta, "t_tlscurlpost") == h1("outbound", {"w3c": 3}, "http1")
    assert counts(delta, "t_pytlssrv") == h1("inbound", {"w3c": 8, "b3": 3, "none": 2}, "http1")
    assert findings(delta, "t_pytlscli") == {} and findings(delta, "t_pytlssrv") == {}
    # The kernel skipped body bytes in the plaintext offsets (how much depends on how fast
    # the daemon set the skip while the paced body flowed: at least half of one body)
    assert delta.total("hopwatch_capture_skipped_bytes_total") >= 128 * 1024


@pytest.mark.kernel
def test_node_https_and_http2_clients_and_https_server(
    daemon: Daemon, tmp_path: Path, cert: tuple[str, str]
) -> None:
    nport, sport = free_port(), free_port()
    ngx = nginx_tls(tmp_path, "t_tlsngx3", f"127.0.0.1:{nport} ssl http2", cert)
    node1, node2 = named(tmp_path, "t_nodetls1", "node"), named(tmp_path, "t_nodetls2", "node")
    nsrv, curl = named(tmp_path, "t_nodetlssrv", "node"), named(tmp_path, "t_tlscurl3", "curl")
    peer = str(PEERS / "tls_node.js")
    url = f"https://127.0.0.1:{nport}/node"
    with server(ngx, nport), server([nsrv, peer, "server", str(sport), *cert], sport):

        def drive() -> None:
            run([node1, peer, "https", url, "4", "svc.allowed.test", f"traceparent: {TP}"])
            run([node1, peer, "https", url, "2", "svc.allowed.test"])
            run([node2, peer, "h2", url, "3", "svc.allowed.test", f"traceparent: {TP}"])
            # Node as the TLS server (its reads are attributed through the ciphertext read)
            surl = f"https://127.0.0.1:{sport}/srv"
            run([curl, "-sfk", "--http1.1", "-H", f"b3: {B3}", *[surl] * 3])

        delta = traffic(daemon, drive)
    assert counts(delta, "t_nodetls1") == h1("outbound", {"w3c": 4, "none": 2}, "http1")
    assert counts(delta, "t_nodetls2") == h1("outbound", {"w3c": 3}, "http2")
    assert counts(delta, "t_tlsngx3") == {
        **h1("inbound", {"w3c": 4, "none": 2}, "http1"),
        **h1("inbound", {"w3c": 3}, "http2"),
    }
    assert counts(delta, "t_tlscurl3") == h1("outbound", {"b3": 3}, "http1")
    assert counts(delta, "t_nodetlssrv") == h1("inbound", {"b3": 3}, "http1")
    for process in ("t_nodetls1", "t_nodetls2", "t_tlsngx3", "t_tlscurl3", "t_nodetlssrv"):
        assert findings(delta, process) == {}, process


@pytest.mark.kernel
def test_leak_to_tls_host_judged_by_sni(
    tmp_path: Path, netns: NetNS, cert: tuple[str, str]
) -> None:
    """Egress allows loopback and *.allowed.test only; the server sits at a 10.x address.

    The destination's hostname is the SNI the client asked for: a Host header naming an
    allowed host does not hide a handshake with api.thirdparty.test, and the reverse.
    """
    config = '[egress]\nallow = ["127.0.0.0/8", "*.allowed.test"]\n'
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", config)
    try:
        ngx = nginx_tls(tmp_path, "t_snisrv", f"{netns.ns_ip}:443 ssl", cert)
        leak, ok = named(tmp_path, "t_leakcli", "curl"), named(tmp_path, "t_okcli", "curl")
        sni_leak, sni_ok = named(tmp_path, "t_snileak", "curl"), named(tmp_path, "t_sniok", "curl")
        ip = netns.ns_ip

        def curl(exe: str, name: str, n: int, *extra: str) -> None:
            run(
                [
                    exe,
                    "-sfk",
                    "--http1.1",
                    "--resolve",
                    f"{name}:443:{ip}",
                    "-H",
                    f"traceparent: {TP}",
                    *extra,
                    *[f"https://{name}/x"] * n,
                ]
            )

        with server(ngx, 443, host=ip, netns=netns.name):

            def drive() -> None:
                curl(leak, "api.thirdparty.test", 2)
                curl(ok, "svc.allowed.test", 2)
                curl(sni_leak, "api.thirdparty.test", 1, "-H", "Host: svc.allowed.test")
                curl(sni_ok, "svc.allowed.test", 1, "-H", "Host: api.thirdparty.test")

            delta = traffic(d, drive)
    finally:
        assert d.stop() == 0, d.log_text()
    assert counts(delta, "t_leakcli") == h1("outbound", {"w3c": 2}, "http1")
    assert findings(delta, "t_leakcli") == {("leak", "traceparent", "api.thirdparty.test"): 2}
    assert counts(delta, "t_okcli") == h1("outbound", {"w3c": 2}, "http1")
    assert findings(delta, "t_okcli") == {}
    assert findings(delta, "t_snileak") == {("leak", "traceparent", "api.thirdparty.test"): 1}
    assert counts(delta, "t_sniok") == h1("outbound", {"w3c": 1}, "http1")
    assert findings(delta, "t_sniok") == {}


# -- the capture adapter itself ---------------------------------------------------------------


@pytest.fixture(scope="module")
def capture() -> Iterator[object]:
    from hopwatch.capture.live import LiveCapture

    cap = LiveCapture()
    cap.open()
    try:
        yield cap
    finally:
        cap.close()


@pytest.mark.kernel
def test_capture_plaintext_exact_bytes_sni_and_no_ciphertext(
    capture: object, tmp_path: Path, cert: tuple[str, str]
) -> None:
    """Python ssl on both ends: the plaintext each end wrote is what the other end read,
    byte for byte, at contiguous offsets from 0; no syscall bytes of either TLS socket are
    delivered; the client's SNI arrives on its socket before its first plaintext."""
    from hopwatch.capture.live import LiveCapture

    assert isinstance(capture, LiveCapture)
    port = free_port()
    srv = named(tmp_path, "t_capts", SYSTEM_PYTHON)
    cli = named(tmp_path, "t_captc", SYSTEM_PYTHON)
    peer = str(PEERS / "tls_py.py")
    events: list[object] = []
    capture.poll(0)
    with server([srv, peer, "server", "127.0.0.1", str(port), *cert], port) as sproc:
        events += capture.poll(50)
        client = subprocess.Popen(
            [
                cli,
                peer,
                "client",
                "127.0.0.1",
                str(port),
                "4",
                "api.thirdparty.test",
                f"traceparent: {TP}",
            ]
        )
        assert client.wait(30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events += capture.poll(50)
            got = [e for e in events if isinstance(e, DataChunk) and e.tgid == sproc.pid]
            if sum(1 for e in got if e.direction is Direction.SEND) >= 8:
                break
        for _ in range(10):
            events += capture.poll(50)
        spid, cpid = sproc.pid, client.pid

    def chunks(tgid: int) -> list[DataChunk]:
        return [e for e in events if isinstance(e, DataChunk) and e.tgid == tgid]

    cchunks, schunks = chunks(cpid), chunks(spid)
    # Both processes hold only TLS sockets: every delivered chunk is plaintext.
    assert cchunks and all(c.tls for c in cchunks)
    assert schunks and all(c.tls for c in schunks)
    assert len({c.fd for c in cchunks}) == 1 and len({c.fd for c in schunks}) == 1

    def stream(cs: list[DataChunk], direction: Direction) -> bytes:
        out, offset = b"", 0
        for c in cs:
            if c.direction is direction:
                assert c.offset == offset and c.missed == 0 and c.skipped == 0
                out += c.data
                offset += c.total_len
        return out

    sent, received = stream(cchunks, Direction.SEND), stream(schunks, Direction.RECV)
    assert sent == received and sent.count(b"GET /tls/") == 4
    assert sent.startswith(b"GET /tls/0 HTTP/1.1\r\n") and f"traceparent: {TP}".encode() in sent
    answers, read = stream(schunks, Direction.SEND), stream(cchunks, Direction.RECV)
    assert (
        answers == read
        and answers.count(b"HTTP/1.0 200 OK\r\n") + answers.count(b"HTTP/1.1 200 OK\r\n") == 4
    )
    # The SNI, on the client's socket, before its first plaintext
    names = [
        (i, e) for i, e in enumerate(events) if isinstance(e, TlsServerName) and e.tgid == cpid
    ]
    assert [e.server_name for _i, e in names] == ["api.thirdparty.test"]
    first = next(i for i, e in enumerate(events) if isinstance(e, DataChunk) and e.tgid == cpid)
    assert names[0][0] < first and names[0][1].fd == cchunks[0].fd
    # The connections were opened on those fds (the ciphertext's sockets)
    opened = {(e.tgid, e.fd) for e in events if isinstance(e, ConnOpened)}
    assert (cpid, cchunks[0].fd) in opened and (spid, schunks[0].fd) in opened
    stats = capture.stats()
    assert stats["tls_calls"] >= 16 and stats["tls_ciphertext"] > 0


# A TLS client driven line by line: "go NAME" sends one request on the same connection and
# reads its answer; it prints its socket's fd once connected (the handshake done).
TLS_DRIVEN = """
import http.client, socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
conn = http.client.HTTPSConnection(sys.argv[1], int(sys.argv[2]), timeout=10, context=ctx)
conn.connect()
print("connected", conn.sock.fileno(), flush=True)
for line in sys.stdin:
    conn.request("GET", "/" + line.split()[1])
    resp = conn.getresponse()
    resp.read()
    print(resp.status, flush=True)
"""

# Fills a ring: 4,000 plain HTTP requests of ~100 bytes over loopback, then exits.
RING_FILLER = """
import socket, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
def drain():
    while conn.recv(1 << 16):
        pass
t = threading.Thread(target=drain)
t.start()
req = b"GET /fill HTTP/1.1\\r\\nHost: filler\\r\\nX-Pad: %s\\r\\n\\r\\n" % (b"p" * 50)
for i in range(4000):
    cli.sendall(req)
cli.close()
t.join()
"""


@pytest.mark.kernel
def test_tls_connection_made_while_the_ring_is_full_is_captured_once_it_drains(
    tmp_path: Path, cert: tuple[str, str]
) -> None:
    """A TLS client connects and sends its first request while the ring is full (nothing
    read: the kernel sheds; the connection's open event is lost, so the kernel does not
    track it). Once the ring drains, its next write inside SSL_write announces the socket
    (an unknown fd with the TLS hint: its ciphertext never looks like HTTP), the capture
    adopts it as the daemon's pipeline does, and the connection's requests arrive as
    plaintext bound to its socket, whole from the first one after the gap; no ciphertext
    is delivered. Before, the notice was lost with the ring full and never tried again,
    and a TLS socket was never announced at all: nothing of it was ever seen."""
    from hopwatch.capture.live import CaptureConfig, LiveCapture

    port = free_port()
    srv = named(tmp_path, "t_shts", SYSTEM_PYTHON)
    cli = named(tmp_path, "t_shtc", SYSTEM_PYTHON)
    fill = named(tmp_path, "t_shtf", SYSTEM_PYTHON)
    events: list[object] = []
    with (
        LiveCapture(CaptureConfig(ring_bytes=64 * 1024)) as cap,
        server([srv, str(PEERS / "tls_py.py"), "server", "127.0.0.1", str(port), *cert], port),
    ):
        cap.poll(0)
        full0 = cap.stats()["ring_full"]
        subprocess.run([fill, "-c", RING_FILLER], check=True, timeout=60)
        client = subprocess.Popen(
            [cli, "-c", TLS_DRIVEN, "127.0.0.1", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None
        try:
            first = client.stdout.readline().split()
            assert first[0] == "connected", first
            fd = int(first[1])

            def request(name: str) -> None:
                assert client.stdin is not None and client.stdout is not None
                client.stdin.write(f"go {name}\n")
                client.stdin.flush()
                assert client.stdout.readline().strip() == "200"

            request("during")  # the ring is still full: shed
            cap.poll(0)
            assert cap.stats()["ring_full"] > full0  # the kernel did shed
            # Drain the ring (the filler's records and whatever fit after), then more.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                got = cap.poll(100)
                if not got:
                    break
            adopted = False
            for i in range(3):
                request(f"after/{i}")
                # The daemon's loop reads continuously: adopt as its pipeline would.
                for _ in range(20):
                    new = cap.poll(50)
                    events += new
                    if adopted or any(
                        isinstance(e, UnknownFd) and (e.tgid, e.fd) == (client.pid, fd) for e in new
                    ):
                        break
                if not adopted and any(
                    isinstance(e, UnknownFd) and (e.tgid, e.fd) == (client.pid, fd) for e in events
                ):
                    assert cap.adopt(client.pid, fd, "client")
                    adopted = True
            assert adopted
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                events += cap.poll(50)
                sent = [
                    e
                    for e in events
                    if isinstance(e, DataChunk)
                    and e.tgid == client.pid
                    and e.direction is Direction.SEND
                ]
                if sum(c.data.count(b"GET /after/") for c in sent) >= 3:
                    break
            for _ in range(5):
                events += cap.poll(50)
        finally:
            client.stdin.close()
            client.wait(10)
        mine = [e for e in events if isinstance(e, DataChunk) and e.tgid == client.pid]
        stats = cap.stats()
    # Only plaintext, all of it on the connection's socket (bound to its SSL object).
    assert mine and all(c.tls and c.fd == fd for c in mine)
    sent = b"".join(c.data for c in mine if c.direction is Direction.SEND)
    assert sent.count(b"GET /after/") == 3 and b"GET /during" not in sent
    assert sent.startswith(b"GET /after/0 HTTP/1.1\r\n")
    read = b"".join(c.data for c in mine if c.direction is Direction.RECV)
    assert read.count(b"HTTP/1.0 200 OK\r\n") + read.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert stats["tls_unbound_dropped"] == 0


# -- no kernel: discovery, pipeline, judgement -------------------------------------------------


def test_elf_info_finds_the_distro_openssl_and_rejects_others() -> None:
    targets = SslFinder().scan_disk()
    libs = [t for t in targets if "libssl.so" in t.display]
    assert libs, "the distro's libssl.so.3 must be found"
    assert set(libs[0].symbols) == {
        "SSL_write",
        "SSL_read",
        "SSL_write_ex",
        "SSL_read_ex",
        "SSL_ctrl",
    }
    node = [t for t in targets if t.embedded and t.display.endswith("/node")]
    assert node and {"SSL_write", "SSL_read_ex"} <= set(node[0].symbols)
    info = elf_info("/bin/true")
    assert info is not None and info.symbols == {}
    assert elf_info(__file__) is None  # not an ELF file
    # NSS's libssl3.so defines SSL_* of its own API, not SSL_read/SSL_write
    for nss in Path("/usr/lib").glob("*/libssl3.so"):
        nss_info = elf_info(str(nss))
        assert nss_info is not None and "SSL_write" not in nss_info.symbols


def test_finder_reports_each_file_once() -> None:
    finder = SslFinder()
    first = finder.scan_disk()
    assert first and finder.scan_disk() == []


def _request(authority: str) -> MessageParsed:
    return MessageParsed(
        origin=Origin.CLIENT,
        protocol="http1",
        method="GET",
        path="/x",
        authority=authority,
        headers=(("traceparent", TP),),
        header_block_bytes=100,
    )


def _outbound(msg: MessageParsed, sni: str | None, peer: SockAddr) -> Observation:
    return Observation(
        message=msg,
        verdict=check_message(msg.headers, Limits(), header_block_bytes=100),
        direction="outbound",
        tgid=1,
        tid=1,
        fd=3,
        ts_ns=0,
        process="p",
        comm="p",
        role="client",
        local=None,
        peer=peer,
        sni=sni,
    )


def test_destination_prefers_sni_over_host() -> None:
    rules = [EgressRule.parse("127.0.0.0/8"), EgressRule.parse("*.allowed.test")]
    peer = SockAddr(socket.AF_INET, "10.1.2.3", 443)
    dest = destination_of(_outbound(_request("svc.allowed.test"), "api.thirdparty.test", peer))
    assert (dest.host, dest.port, dest.label) == ("api.thirdparty.test", 443, "api.thirdparty.test")
    assert is_allowed(rules, dest) is False
    dest = destination_of(_outbound(_request("api.thirdparty.test:8443"), "svc.allowed.test", peer))
    assert dest.host == "svc.allowed.test" and is_allowed(rules, dest) is True
    # same name in both: the port the request named is kept
    dest = destination_of(_outbound(_request("svc.allowed.test:8443"), "svc.allowed.test", peer))
    assert (dest.host, dest.port, dest.label) == ("svc.allowed.test", 8443, "svc.allowed.test:8443")
    # no SNI: the Host name, as before
    dest = destination_of(_outbound(_request("api.thirdparty.test"), None, peer))
    assert dest.host == "api.thirdparty.test" and is_allowed(rules, dest) is False


def test_pipeline_parses_plaintext_and_drops_ciphertext() -> None:
    metrics = Metrics(max_process_labels=50, max_peer_labels=50)
    seen: list[Observation] = []
    pipe = Pipeline(Config(), metrics, ConnectionTable(), observers=(seen.append,))
    tgid, fd = 2**22 + 12345, 7  # no such process: the table names it from the event
    peer = SockAddr(socket.AF_INET, "127.0.0.1", 443)
    pipe.handle(ConnOpened(tgid, tgid, fd, "client", peer, 1, "tlscli"))
    # ciphertext that happened to be delivered before the connection was known as TLS
    pipe.handle(
        DataChunk(
            tgid, tgid, fd, Direction.SEND, 2, 5, b"\x16\x03\x01\x00\x05", comm="tlscli", offset=0
        )
    )
    pipe.handle(TlsServerName(tgid, fd, "api.thirdparty.test", 3))
    req = f"GET /a HTTP/1.1\r\nHost: x\r\ntraceparent: {TP}\r\n\r\n".encode()
    # plaintext offsets start at 0 again: no gap, the request is parsed in full
    pipe.handle(
        DataChunk(
            tgid, tgid, fd, Direction.SEND, 4, len(req), req, tls=True, comm="tlscli", offset=0
        )
    )
    # socket bytes of the TLS connection after that: never parsed, even if they look HTTP
    pipe.handle(
        DataChunk(tgid, tgid, fd, Direction.SEND, 5, len(req), req, comm="tlscli", offset=5)
    )
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    pipe.handle(
        DataChunk(
            tgid, tgid, fd, Direction.RECV, 6, len(resp), resp, tls=True, comm="tlscli", offset=0
        )
    )
    assert [(o.direction, o.message.kind, o.sni) for o in seen] == [
        ("outbound", "request", "api.thirdparty.test"),
        ("inbound", "response", "api.thirdparty.test"),
    ]
    assert pipe.tls_ciphertext_chunks == 1


def test_unobservable_processes_names_plain_grpc_and_not_openssl_users(tmp_path: Path) -> None:
    """Processes with TCP connections: no OpenSSL mapped, grpcio's BoringSSL, and one that
    maps the distro's libssl (observable, so not listed)."""
    from hopwatch.tls import unobservable_processes
    from tests.helpers import python_env

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    hold = (
        f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); "
        "print('up', flush=True); time.sleep(60)"
    )
    procs = {
        "plain": [named(tmp_path, "t_plaintcp", SYSTEM_PYTHON), "-c", hold],
        "grpc": [named(tmp_path, "t_grpctcp", SYSTEM_PYTHON), "-c", "import grpc; " + hold],
        "ssl": [named(tmp_path, "t_ssltcp", SYSTEM_PYTHON), "-c", "import ssl; " + hold],
    }
    running = {
        k: subprocess.Popen(v, stdout=subprocess.PIPE, env=python_env()) for k, v in procs.items()
    }
    accepted = []
    try:
        for p in running.values():
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
            accepted.append(listener.accept()[0])
        found = {u.pid: (u.comm, u.reason) for u in unobservable_processes()}
    finally:
        for p in running.values():
            p.kill()
            p.wait()
        for s in accepted:
            s.close()
        listener.close()
    assert running["plain"].pid in found, (found, {k: p.pid for k, p in running.items()})
    assert found[running["plain"].pid] == (
        "t_plaintcp",
        "no OpenSSL (libssl or exported SSL_*) mapped",
    )
    assert found[running["grpc"].pid] == ("t_grpctcp", "grpcio: BoringSSL linked without symbols")
    assert running["ssl"].pid not in found
