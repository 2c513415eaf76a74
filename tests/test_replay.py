"""`hopwatch replay`: the pcap capture source, the replay wiring, the command, and a
real-traffic cross-check against a live `hopwatch run`.

Unit tests build their captures with scapy (every segment placed by hand: out of order,
retransmitted, overlapping, missing, IPv6, cooked and raw link types, no handshake) and
assert exact message counts, findings and reassembly counters. The kernel test captures
real loopback traffic with tcpdump while the session daemon watches it, then asserts that
the replay reports the same findings and the same message counts per process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import PcapNgWriter, wrpcap
from typer.testing import CliRunner

from hopwatch._replay_cmd import Replay, ReplayResult
from hopwatch.capture._types import ConnClosed, ConnOpened, DataChunk, Direction
from hopwatch.capture.pcap import PcapCapture, PcapError
from hopwatch.cli import app
from hopwatch.config import Config
from tests.helpers import (
    HOPWATCH,
    PEERS,
    REPO,
    SYSTEM_PYTHON,
    Daemon,
    Delta,
    free_port,
    named,
    nginx_args,
    run,
    server,
)

FIXTURES = REPO / "tests" / "fixtures"
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP_BAD = "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"  # uppercase hex
B3 = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"


# -- building captures ---------------------------------------------------------------------


def request(path: str = "/", *headers: str, host: str = "svc") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *headers, "", ""]
    return "\r\n".join(lines).encode()


def response(body: bytes = b"ok\n") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return head + body


class Conv:
    """One TCP connection drawn segment by segment. Each method returns the packets of one
    step; the test arranges them (reorders, duplicates, drops) before writing the file."""

    def __init__(
        self,
        client: tuple[str, int] = ("10.0.0.1", 40000),
        server: tuple[str, int] = ("10.0.0.2", 8080),
        *,
        isn_c: int = 1000,
        isn_s: int = 5000,
        link: str = "ether",
    ) -> None:
        self.c, self.s = client, server
        self.seq = {True: isn_c, False: isn_s}  # next sequence number, per sender
        self.link = link
        self.v6 = ":" in client[0]

    def _pkt(self, from_client: bool, flags: str, payload: bytes = b"", seq: int | None = None,
             ack: bool = True) -> Packet:
        src, dst = (self.c, self.s) if from_client else (self.s, self.c)
        ipl = IPv6(src=src[0], dst=dst[0]) if self.v6 else IP(src=src[0], dst=dst[0])
        s = self.seq[from_client] if seq is None else seq
        a = self.seq[not from_client] & 0xFFFFFFFF if ack and "A" in flags else 0
        p = ipl / TCP(sport=src[1], dport=dst[1], flags=flags, seq=s & 0xFFFFFFFF, ack=a)
        if payload:
            p = p / Raw(payload)
        l2: Packet
        if self.link == "ether":
            l2 = Ether(src="00:00:00:00:00:00", dst="00:00:00:00:00:00") / p
        elif self.link == "vlan":
            l2 = Ether() / Dot1Q(vlan=7) / p
        elif self.link == "sll":
            l2 = CookedLinux(proto=0x86DD if self.v6 else 0x0800) / p
        elif self.link == "sll2":
            l2 = CookedLinuxV2(proto=0x86DD if self.v6 else 0x0800) / p
        else:
            l2 = p
        return l2

    def handshake(self) -> list[Packet]:
        syn = self._pkt(True, "S", ack=False)
        self.seq[True] += 1
        synack = self._pkt(False, "SA")
        self.seq[False] += 1
        return [syn, synack, self._pkt(True, "A")]

    def send(self, from_client: bool, data: bytes, seg: int = 0) -> list[Packet]:
        """``data`` in segments of ``seg`` bytes (0: one segment), then the peer's ACK."""
        out = []
        seg = seg or len(data)
        for i in range(0, len(data), seg):
            part = data[i : i + seg]
            out.append(self._pkt(from_client, "PA", part))
            self.seq[from_client] += len(part)
        out.append(self._pkt(not from_client, "A"))
        return out

    def fin(self) -> list[Packet]:
        a = self._pkt(True, "FA")
        self.seq[True] += 1
        b = self._pkt(False, "FA")
        self.seq[False] += 1
        return [a, b, self._pkt(True, "A")]

    def rst(self, from_client: bool = True) -> list[Packet]:
        return [self._pkt(from_client, "R", ack=False)]


def flat(steps: list[list[Packet]]) -> list[Packet]:
    return [p for step in steps for p in step]


def write(path: Path, packets: list[Packet], *, pcapng: bool = False) -> Path:
    for i, p in enumerate(packets):
        p.time = 1_700_000_000 + i / 1000
    if pcapng:
        with PcapNgWriter(str(path)) as w:
            for p in packets:
                w.write(p)
    else:
        wrpcap(str(path), packets)
    return path


def replay(path: Path, *, ends: str = "both", config: Config | None = None,
           **kw: Any) -> tuple[ReplayResult, list[dict[str, Any]]]:
    lines: list[str] = []
    with PcapCapture(path, ends=ends, **kw) as cap:
        result = Replay(config or Config(), cap, emit=lines.append).run()
    return result, [json.loads(x) for x in lines]


def events(path: Path, **kw: Any) -> list[Any]:
    with PcapCapture(path, **kw) as cap:
        return list(cap.events())


def msgs(r: ReplayResult, process: str) -> dict[tuple[str, str, str, str], int]:
    return {k[1:]: int(v) for k, v in r.messages.items() if k[0] == process and v}


def finds(r: ReplayResult) -> dict[tuple[str, str, str], int]:
    out: Counter[tuple[str, str, str]] = Counter()
    for (finding, header, process, _peer), v in r.findings.items():
        out[(finding, header, process)] += int(v)
    return dict(out)


def clean_exchange(n: int, ctx: str = "w3c", proto: str = "http1") -> tuple[dict[Any, int], ...]:
    client = {("outbound", "request", proto, ctx): n, ("inbound", "response", proto, "none"): n}
    srv = {("inbound", "request", proto, ctx): n, ("outbound", "response", proto, "none"): n}
    return client, srv


def three_requests(conv: Conv, *, seg: int = 0) -> list[list[Packet]]:
    """Three request/response pairs with traceparent on one keep-alive connection."""
    steps = []
    for i in range(3):
        steps.append(conv.send(True, request(f"/r{i}", f"traceparent: {TP}"), seg))
        steps.append(conv.send(False, response()))
    return steps


# -- reassembly ------------------------------------------------------------------------------


def test_clean_exchange_both_ends_and_close(tmp_path: Path) -> None:
    conv = Conv()
    pkts = conv.handshake() + flat(three_requests(conv)) + conv.fin()
    path = write(tmp_path / "clean.pcap", pkts)
    r, lines = replay(path)
    client, srv = clean_exchange(3)
    assert msgs(r, "10.0.0.1") == client
    assert msgs(r, "10.0.0.2") == srv
    assert r.findings == {} and lines == []
    st = r.stats
    assert (st.connections, st.connections_without_syn, st.gaps, st.retransmitted_segments) == (
        1, 0, 0, 0
    )
    evs = events(path)
    opened = [e for e in evs if isinstance(e, ConnOpened)]
    closed = [e for e in evs if isinstance(e, ConnClosed)]
    assert sorted(e.role for e in opened) == ["client", "server"]
    assert {(e.tgid, e.fd) for e in closed} == {(e.tgid, e.fd) for e in opened}
    by_role = {e.role: e for e in opened}
    assert str(by_role["client"].peer) == "10.0.0.2:8080"
    assert str(by_role["server"].peer) == "10.0.0.1:40000"
    # Offsets count each direction from 0 and every byte arrives twice: sent and received.
    chunks = [e for e in evs if isinstance(e, DataChunk)]
    sent = [c for c in chunks if c.direction is Direction.SEND and c.fd == by_role["client"].fd]
    assert [c.offset for c in sent] == [0, len(sent[0].data), 2 * len(sent[0].data)]
    assert sum(c.total_len for c in chunks) == 2 * sum(
        len(p[Raw].load) for p in pkts if p.haslayer(Raw)
    )


def test_out_of_order_segments_are_reordered(tmp_path: Path) -> None:
    conv = Conv()
    hs = conv.handshake()
    steps = three_requests(conv, seg=20)
    first = steps[0]  # request in 20-byte segments, then the ACK
    data_pkts = first[:-1]
    shuffled = [data_pkts[0], data_pkts[3], data_pkts[2], data_pkts[1], *data_pkts[4:]]
    steps[0] = [*shuffled, first[-1]]
    path = write(tmp_path / "ooo.pcap", hs + flat(steps))
    r, _ = replay(path)
    client, srv = clean_exchange(3)
    assert msgs(r, "10.0.0.1") == client and msgs(r, "10.0.0.2") == srv
    assert r.stats.out_of_order_segments == 2
    assert r.stats.gaps == 0 and r.stats.retransmitted_segments == 0


def test_retransmissions_and_overlaps_are_dropped(tmp_path: Path) -> None:
    conv = Conv()
    hs = conv.handshake()
    steps = three_requests(conv, seg=30)
    req = steps[2][:-1]  # the second request's segments
    # the 2nd segment sent twice; a segment re-cut to overlap the 3rd by 10 bytes
    again = req[1].copy()
    overlap = req[2].copy()
    load = overlap[Raw].load
    overlap[TCP].seq -= 10
    overlap[Raw].load = bytes(req[1][Raw].load[-10:]) + load
    steps[2] = [req[0], req[1], again, req[2], overlap, *req[3:], steps[2][-1]]
    path = write(tmp_path / "retrans.pcap", hs + flat(steps))
    r, _ = replay(path)
    client, srv = clean_exchange(3)
    assert msgs(r, "10.0.0.1") == client and msgs(r, "10.0.0.2") == srv
    st = r.stats
    assert st.retransmitted_segments == 2  # `again` and `overlap` (wholly behind by then)
    assert st.retransmitted_bytes == 30 + len(load) + 10
    assert st.gaps == 0


def test_partial_overlap_is_trimmed(tmp_path: Path) -> None:
    conv = Conv()
    hs = conv.handshake()
    data = request("/a", f"traceparent: {TP}")
    p1 = conv._pkt(True, "PA", data[:40])
    # a segment that repeats bytes 30..40 and carries the rest
    p2 = conv._pkt(True, "PA", data[30:], seq=conv.seq[True] + 30)
    conv.seq[True] += len(data)
    ack = conv._pkt(False, "A")
    path = write(tmp_path / "overlap.pcap", [*hs, p1, p2, ack, *conv.send(False, response())])
    r, _ = replay(path)
    assert msgs(r, "10.0.0.1") == clean_exchange(1)[0]
    assert r.stats.overlap_bytes == 10 and r.stats.retransmitted_segments == 0


def test_missing_segment_is_a_counted_gap_and_the_parser_resyncs(tmp_path: Path) -> None:
    conv = Conv()
    hs = conv.handshake()
    steps = three_requests(conv, seg=25)
    lost = steps[2][1]  # a segment inside the second request's header block
    steps[2] = [p for p in steps[2] if p is not lost]
    path = write(tmp_path / "gap.pcap", hs + flat(steps))
    r, _ = replay(path)
    st = r.stats
    assert (st.gaps, st.gap_bytes) == (1, 25)
    assert r.counters["hopwatch_stream_gap_bytes_total"] == 2 * 25  # both ends
    # requests 1 and 3 parsed on both ends; all three responses (the server answered).
    assert msgs(r, "10.0.0.1") == {
        ("outbound", "request", "http1", "w3c"): 2,
        ("inbound", "response", "http1", "none"): 3,
    }
    assert msgs(r, "10.0.0.2") == {
        ("inbound", "request", "http1", "w3c"): 2,
        ("outbound", "response", "http1", "none"): 3,
    }
    # The gap is declared when the server's ACK passes it, not at the end of the file:
    evs = events(path)
    gap_at = next(i for i, e in enumerate(evs) if isinstance(e, DataChunk) and e.missed)
    third = next(
        i for i, e in enumerate(evs) if isinstance(e, DataChunk) and b"/r2 " in e.data
    )
    assert gap_at < third


def test_hole_without_ack_is_given_up_at_the_reorder_bound(tmp_path: Path) -> None:
    conv = Conv()
    hs = conv.handshake()
    pkts = []
    for i in range(6):  # client requests only, no ACKs from the server
        data = request(f"/n{i}", f"traceparent: {TP}")
        p = conv._pkt(True, "PA", data)
        conv.seq[True] += len(data)
        if i != 1:
            pkts.append(p)
    path = write(tmp_path / "hole.pcap", hs + pkts)
    r, _ = replay(path, max_reorder_bytes=200)
    assert r.stats.gaps == 1
    assert msgs(r, "10.0.0.2") == {("inbound", "request", "http1", "w3c"): 5}


def test_sequence_numbers_wrap(tmp_path: Path) -> None:
    conv = Conv(isn_c=0xFFFFFFF0, isn_s=0xFFFFFF00)
    hs = conv.handshake()
    steps = three_requests(conv, seg=16)
    path = write(tmp_path / "wrap.pcap", hs + flat(steps))
    r, _ = replay(path)
    client, srv = clean_exchange(3)
    assert msgs(r, "10.0.0.1") == client and msgs(r, "10.0.0.2") == srv
    assert r.stats.gaps == 0 and r.stats.retransmitted_segments == 0


def test_snap_length_cut_is_a_gap(tmp_path: Path) -> None:
    conv = Conv()
    hs = conv.handshake()
    body = b"x" * 400
    post = b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 400\r\n\r\n" + body
    full = conv._pkt(True, "PA", post)
    conv.seq[True] += len(post)
    raw = bytes(full)
    cut = Ether(raw[: len(raw) - 300])
    cut.wirelen = len(raw)
    after = conv.send(True, request("/next", f"traceparent: {TP}"))
    path = write(tmp_path / "snap.pcap", [*hs, cut, *after])
    r, _ = replay(path)
    assert r.stats.truncated_bytes == 300
    assert msgs(r, "10.0.0.2") == {
        ("inbound", "request", "http1", "none"): 1,
        ("inbound", "request", "http1", "w3c"): 1,
    }


# -- addresses and link types --------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "client", "server", "pcapng"),
    [
        ("sll2", ("fd00::1", 40000), ("fd00::2", 8080), False),
        ("sll", ("fd00::1", 40000), ("fd00::2", 8080), True),
        ("raw", ("10.0.0.1", 40000), ("10.0.0.2", 8080), True),
        ("vlan", ("10.0.0.1", 40000), ("10.0.0.2", 8080), False),
        ("ether", ("::1", 40000), ("::1", 8080), False),
    ],
)
def test_link_types_and_ipv6(
    tmp_path: Path, link: str, client: tuple[str, int], server: tuple[str, int], pcapng: bool
) -> None:
    conv = Conv(client, server, link=link)
    pkts = conv.handshake() + flat(three_requests(conv)) + conv.fin()
    path = write(tmp_path / f"{link}.pcap", pkts, pcapng=pcapng)
    r, _ = replay(path)
    c, s = clean_exchange(3)
    if client[0] == server[0]:  # one host: both ends are one process
        assert msgs(r, client[0]) == {**c, **s}
    else:
        assert msgs(r, client[0]) == c and msgs(r, server[0]) == s
    assert r.stats.unsupported_link == 0 and r.stats.malformed == 0
    opened = [e for e in events(path) if isinstance(e, ConnOpened)]
    assert {str(e.peer) for e in opened} == {
        str(ConnOpened(0, 0, 0, "", _addr(*server), 0).peer),
        str(ConnOpened(0, 0, 0, "", _addr(*client), 0).peer),
    }


def _addr(host: str, port: int) -> Any:
    from hopwatch.capture._types import SockAddr

    return SockAddr(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port)


def test_http2_prior_knowledge_from_recorded_bytes(tmp_path: Path) -> None:
    """curl -> hypercorn h2c bytes (a golden fixture) re-cut into TCP segments."""
    rec = json.loads((FIXTURES / "http2" / "curl_hypercorn.json").read_text())
    conv = Conv(("127.0.0.5", 41000), ("127.0.0.6", 8000))
    pkts = conv.handshake()
    for side, hexdata in rec["chunks"]:
        pkts += conv.send(side == "c", bytes.fromhex(hexdata), seg=50)
    path = write(tmp_path / "h2.pcap", pkts + conv.fin())
    r, _ = replay(path)
    assert msgs(r, "127.0.0.5") == {
        ("outbound", "request", "http2", "both"): 1,  # curl sent traceparent and b3
        ("inbound", "response", "http2", "none"): 1,
    }
    assert msgs(r, "127.0.0.6") == {
        ("inbound", "request", "http2", "both"): 1,
        ("outbound", "response", "http2", "none"): 1,
    }


# -- connections without a handshake, FIN and RST -------------------------------------------


def test_connection_already_open_when_the_capture_started(tmp_path: Path) -> None:
    # A keep-alive connection between two high ports: only the bytes tell the roles.
    conv = Conv(("10.0.0.1", 50000), ("10.0.0.2", 40000))
    conv.handshake()  # not written
    steps = three_requests(conv)
    path = write(tmp_path / "midstream.pcap", flat(steps))
    r, _ = replay(path)
    client, srv = clean_exchange(3)
    assert msgs(r, "10.0.0.1") == client and msgs(r, "10.0.0.2") == srv
    assert r.stats.connections_without_syn == 1
    roles = {e.role: str(e.peer) for e in events(path) if isinstance(e, ConnOpened)}
    assert roles == {"client": "10.0.0.2:40000", "server": "10.0.0.1:50000"}


def test_midstream_first_bytes_a_response(tmp_path: Path) -> None:
    conv = Conv(("10.0.0.1", 50000), ("10.0.0.2", 40000))
    conv.handshake()
    conv.send(True, request("/before"))  # sent before the capture
    pkts = conv.send(False, response()) + flat(three_requests(conv))
    path = write(tmp_path / "midresp.pcap", pkts)
    roles = {e.role: str(e.peer) for e in events(path) if isinstance(e, ConnOpened)}
    assert roles == {"client": "10.0.0.2:40000", "server": "10.0.0.1:50000"}
    r, _ = replay(path)
    assert msgs(r, "10.0.0.2")[("inbound", "request", "http1", "w3c")] == 3


def test_midstream_opaque_bytes_use_well_known_ports(tmp_path: Path) -> None:
    conv = Conv(("10.0.0.1", 50000), ("10.0.0.2", 8080))
    conv.handshake()
    path = write(tmp_path / "port.pcap", conv.send(False, b"\x00\x01binary"))
    roles = {e.role: str(e.peer) for e in events(path) if isinstance(e, ConnOpened)}
    assert roles == {"client": "10.0.0.2:8080", "server": "10.0.0.1:50000"}


def test_fin_and_rst_close_both_ends_and_late_packets_are_ignored(tmp_path: Path) -> None:
    a = Conv(("10.0.0.1", 40001), ("10.0.0.2", 8080))
    b = Conv(("10.0.0.1", 40002), ("10.0.0.2", 8080))
    late = None
    pkts = a.handshake() + b.handshake()
    pkts += a.send(True, request("/a")) + a.send(False, response()) + a.fin()
    req_b = b.send(True, request("/b"))
    late = req_b[0].copy()  # retransmitted after the reset
    pkts += req_b + b.rst(from_client=False) + [late]
    path = write(tmp_path / "close.pcap", pkts)
    evs = events(path)
    opened = [e for e in evs if isinstance(e, ConnOpened)]
    closed = [e for e in evs if isinstance(e, ConnClosed)]
    assert len(opened) == 4 and len(closed) == 4
    assert {(e.tgid, e.fd) for e in closed} == {(e.tgid, e.fd) for e in opened}
    r, _ = replay(path)
    assert r.stats.late_packets == 1 and r.stats.connections == 2
    assert msgs(r, "10.0.0.2") == {
        ("inbound", "request", "http1", "none"): 2,
        ("outbound", "response", "http1", "none"): 1,
    }


def test_port_reuse_with_a_new_syn_is_a_new_connection(tmp_path: Path) -> None:
    a = Conv(isn_c=100)
    b = Conv(isn_c=900_000)
    pkts = a.handshake() + a.send(True, request("/1")) + a.send(False, response())
    pkts += b.handshake() + b.send(True, request("/2")) + b.send(False, response())
    path = write(tmp_path / "reuse.pcap", pkts)
    r, _ = replay(path)
    assert r.stats.connections == 2
    closed = [e for e in events(path) if isinstance(e, ConnClosed)]
    assert len(closed) == 2  # the first connection's ends, when the new SYN replaced it
    assert msgs(r, "10.0.0.2") == clean_exchange(2, ctx="none")[1]


# -- ends, identity, hop analysis, JSON ----------------------------------------------------


def strip_capture(tmp_path: Path) -> Path:
    """10.0.0.1 -> 10.0.0.2 with traceparent; 10.0.0.2 -> 10.0.0.3 without; answers."""
    front = Conv(("10.0.0.1", 40000), ("10.0.0.2", 8080))
    back = Conv(("10.0.0.2", 45000), ("10.0.0.3", 9090))
    pkts = front.handshake() + back.handshake()
    for i in range(2):
        pkts += front.send(True, request(f"/order/{i}", f"traceparent: {TP}"))
        pkts += back.send(True, request(f"/stock/{i}", host="stock"))
        pkts += back.send(False, response())
        pkts += front.send(False, response())
    pkts += front.send(True, request("/bad", f"traceparent: {TP_BAD}"))
    pkts += front.send(False, response())
    return write(tmp_path / "strip.pcap", pkts)


def test_stripping_hop_found_with_host_ip_as_process(tmp_path: Path) -> None:
    r, lines = replay(strip_capture(tmp_path))
    assert finds(r) == {
        ("stripped", "traceparent", "10.0.0.2"): 2,
        ("malformed", "traceparent", "10.0.0.1"): 1,
        ("malformed", "traceparent", "10.0.0.2"): 1,
    }
    assert r.findings[("stripped", "traceparent", "10.0.0.2", "stock")] == 2
    # --json: one line per finding, the audit log's fields, no raw trace id.
    assert len(lines) == 4 == r.findings_lines
    strip = [x for x in lines if x["finding"] == "stripped"]
    assert {x["process"]["label"] for x in strip} == {"10.0.0.2"}
    x = strip[0]
    assert x["direction"] == "outbound" and x["local"] == "10.0.0.2:45000"
    assert x["peer"] == "10.0.0.3:9090" and x["host"] == "stock"
    assert x["time"].startswith("2023-11-14T")  # the packet's time, not now
    assert "0af7651916cd43dd8448eb211c80319c" not in json.dumps(lines)
    assert len(x["trace_id_hash"]) == 16


@pytest.mark.parametrize("ends", ["client", "server"])
def test_ends_option_observes_one_side(tmp_path: Path, ends: str) -> None:
    r, _ = replay(strip_capture(tmp_path), ends=ends)
    directions = {k[1] + " " + k[2] for k in r.messages}
    if ends == "client":
        assert directions == {"outbound request", "inbound response"}
        # 10.0.0.2's calls out are seen, the requests it received are not: no hop finding
        assert finds(r) == {("malformed", "traceparent", "10.0.0.1"): 1}
    else:
        assert directions == {"inbound request", "outbound response"}
        assert finds(r) == {("malformed", "traceparent", "10.0.0.2"): 1}


# -- a real loopback capture (tcpdump -i lo, recorded by the kernel test below) -----------

LOOPBACK = FIXTURES / "pcap" / "loopback_strip_h1_h2c.pcap"


def test_recorded_loopback_capture() -> None:
    """client (127.0.0.4) -> strip (127.0.0.2) -> backend (127.0.0.3); curl (127.0.0.7)
    -> nginx h2c (127.0.0.6). The counts the live daemon reported when it was recorded."""
    progress: list[int] = []
    with PcapCapture(LOOPBACK, progress=progress.append, progress_every=100) as cap:
        r = Replay(Config(), cap).run()
        size = cap.size
    assert progress == [p for p in progress if p <= size] and progress[-1] == size
    assert len(progress) == 3  # records 100 and 200, then the end
    st = r.stats
    assert (st.packets, st.connections, st.gaps, st.retransmitted_segments) == (273, 18, 0, 0)
    assert finds(r) == {
        ("stripped", "traceparent", "127.0.0.2"): 4,
        ("malformed", "traceparent", "127.0.0.4"): 3,
        ("malformed", "traceparent", "127.0.0.3"): 3,
        ("conflict", "b3", "127.0.0.4"): 1,
        ("conflict", "b3", "127.0.0.3"): 1,
        ("malformed", "traceparent", "127.0.0.7"): 2,
        ("malformed", "traceparent", "127.0.0.6"): 2,
    }
    assert msgs(r, "127.0.0.2") == {
        ("inbound", "request", "http1", "w3c"): 4,
        ("inbound", "request", "http1", "none"): 2,
        ("outbound", "response", "http1", "none"): 6,
        ("outbound", "request", "http1", "none"): 6,
        ("inbound", "response", "http1", "none"): 6,
    }
    assert msgs(r, "127.0.0.6") == {
        ("inbound", "request", "http2", "w3c"): 3,
        ("inbound", "request", "http2", "none"): 4,
        ("outbound", "response", "http2", "none"): 7,
    }


def test_recorded_capture_server_ends_only() -> None:
    """--ends server: what a node running only the servers would report."""
    r, _ = replay(LOOPBACK, ends="server")
    assert {k[1] for k in r.messages} == {"inbound"} | {"outbound"}
    assert all((k[1], k[2]) in {("inbound", "request"), ("outbound", "response")}
               for k in r.messages)
    # the strip service's calls out are client ends: not observed, so nothing to strip
    assert finds(r) == {
        ("malformed", "traceparent", "127.0.0.3"): 3,
        ("conflict", "b3", "127.0.0.3"): 1,
        ("malformed", "traceparent", "127.0.0.6"): 2,
    }


# -- the command ---------------------------------------------------------------------------


def test_cli_json_and_summary(tmp_path: Path) -> None:
    path = strip_capture(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["replay", str(path), "--json"])
    assert res.exit_code == 0, res.output
    objs = [json.loads(x) for x in res.stdout.splitlines()]
    assert Counter((o["finding"], o["header"]) for o in objs) == {
        ("stripped", "traceparent"): 2,
        ("malformed", "traceparent"): 2,
    }
    res = runner.invoke(app, ["replay", str(path)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "HTTP messages" in out and "stripped" in out and "10.0.0.2" in out
    assert "lost: 0 missing segment(s)" in out


def test_cli_missing_file_and_not_a_capture(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["replay", str(tmp_path / "nope.pcap")])
    assert res.exit_code == 1
    assert "no such file" in res.stderr and "Traceback" not in res.output
    text = tmp_path / "notes.pcap"
    text.write_text("GET / HTTP/1.1\r\n\r\n" * 10)
    res = runner.invoke(app, ["replay", str(text)])
    assert res.exit_code == 1
    assert "not a pcap or pcapng capture" in res.stderr and "Traceback" not in res.output
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    res = runner.invoke(app, ["replay", str(empty), "--json"])
    assert res.exit_code == 1 and "not a pcap" in res.stderr
    res = runner.invoke(app, ["replay", str(tmp_path)])
    assert res.exit_code == 1 and "directory" in res.stderr
    res = runner.invoke(app, ["replay", str(text), "--ends", "middle"])
    assert res.exit_code == 2


def test_console_script_on_a_non_capture(tmp_path: Path) -> None:
    """The installed command, as an operator runs it: one line on stderr, exit 1."""
    bogus = tmp_path / "x.pcapng"
    bogus.write_bytes(os.urandom(4096))
    res = subprocess.run([str(HOPWATCH), "replay", str(bogus)], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.startswith("hopwatch replay: ") and len(res.stderr.splitlines()) == 1


def test_json_into_a_closed_pipe_stops_quietly() -> None:
    """`hopwatch replay --json F | head -1`: the reader goes away; exit 0, no traceback."""
    import io

    from hopwatch._replay_cmd import replay as replay_cmd

    class Head(io.StringIO):
        def write(self, s: str) -> int:
            if self.getvalue():
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(s)

    out, err = Head(), io.StringIO()
    assert replay_cmd(str(LOOPBACK), None, True, "both", stdout=out, stderr=err) == 0
    assert len(out.getvalue().splitlines()) == 1 and err.getvalue() == ""


def test_pcap_error_is_raised_by_the_source(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xd4\xc3\xb2")
    with pytest.raises(PcapError):
        PcapCapture(junk)
    with pytest.raises(FileNotFoundError):
        PcapCapture(tmp_path / "missing.pcap")


# -- real traffic: tcpdump and the live daemon see the same thing --------------------------

PEER = FIXTURES / "pcap" / "replay_peers.py"
MSG = "hopwatch_http_messages_total"
FIND = "hopwatch_findings_total"


class Tcpdump:
    """``tcpdump -i lo -w FILE`` running until `stop`; its own drop counters checked."""

    def __init__(self, path: Path, ports: list[int]) -> None:
        expr = " or ".join(f"port {p}" for p in ports)
        self.path = path
        self.proc = subprocess.Popen(
            # --immediate-mode: no packet waits in a kernel buffer block when it stops; a
            # 16 MiB buffer (-B, KiB): on a busy 2-CPU machine (the whole suite) the default
            # one overflowed once (9 packets dropped by the kernel).
            ["tcpdump", "-i", "lo", "-nU", "--immediate-mode", "-B", "16384", "-Z", "root",
             "-w", str(path), expr],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 15
        first = ""
        while "listening on" not in first:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                first = self.proc.stderr.readline()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tcpdump did not start: {first}")
        self.report = ""

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.report = self.proc.communicate(timeout=15)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.report = self.proc.communicate()[1]
        return self.report


@contextlib.contextmanager
def tcpdump(path: Path, ports: list[int]) -> Iterator[Tcpdump]:
    dump = Tcpdump(path, ports)
    try:
        yield dump
    finally:
        dump.stop()


def _by_process(delta: Delta, name: str, names: dict[str, str]) -> dict[tuple[str, ...], int]:
    """Daemon samples of `name` for the test's processes, the process renamed by `names`."""
    out: Counter[tuple[str, ...]] = Counter()
    for labels, value in delta.samples.items():
        metric, ls = labels
        d = dict(ls)
        if metric != name or d.get("process") not in names or not value:
            continue
        d["process"] = names[d["process"]]
        if name == MSG:
            key = (d["process"], d["direction"], d["kind"], d["protocol"], d["context"])
        else:
            key = (d["finding"], d["header"], d["process"], d["peer"])
        out[key] += int(value)
    return dict(out)


@pytest.mark.kernel
def test_replay_matches_the_live_daemon(daemon: Daemon, tmp_path: Path) -> None:
    """HTTP/1.1 and h2c, with and without traceparent, malformed and conflicting headers
    and a stripping hop: captured by tcpdump while `hopwatch run` watched; the replay of
    the capture reports the same findings and the same message counts, process by process
    (the daemon's command names are the replay's host addresses)."""
    cli_ip, strip_ip, back_ip, curl_ip, ngx_ip = (
        "127.0.0.4", "127.0.0.2", "127.0.0.3", "127.0.0.7", "127.0.0.6"
    )
    tag = f"rp{os.getpid() % 10000}"  # unique per run: a concurrent run's daemon sees ours
    names = {
        f"{tag}cli": cli_ip,
        f"{tag}strip": strip_ip,
        f"{tag}back": back_ip,
        f"{tag}curl": curl_ip,
        f"{tag}ngx": ngx_ip,
    }
    sport, bport, nport = free_port(), free_port(), free_port()
    cli = named(tmp_path, f"{tag}cli", SYSTEM_PYTHON)
    strip = named(tmp_path, f"{tag}strip", SYSTEM_PYTHON)
    back = named(tmp_path, f"{tag}back", SYSTEM_PYTHON)
    curl = named(tmp_path, f"{tag}curl", "curl")
    pcap = tmp_path / "live.pcap"
    with (
        server([back, str(PEERS / "h1_server.py"), back_ip, str(bport)], bport, host=back_ip),
        server(
            [strip, str(PEER), "strip", strip_ip, str(sport), back_ip, str(bport)],
            sport,
            host=strip_ip,
        ),
        server(nginx_args(tmp_path, f"{tag}ngx", f"{ngx_ip}:{nport} http2"), nport, host=ngx_ip),
        tcpdump(pcap, [sport, bport, nport]) as dump,
    ):
        before = daemon.settle()

        def h1(host: str, port: int, n: int, *headers: str) -> None:
            run([cli, str(PEER), "client", host, str(port), cli_ip, str(n), *headers])

        def h2(n: int, *headers: str) -> None:
            args = [curl, "-sf", "-o", "/dev/null", "--http2-prior-knowledge"]
            args += ["--interface", curl_ip]
            for h in headers:
                args += ["-H", h]
            for _ in range(n):  # one URL per curl: curl 7.88 fails reusing an h2c connection
                run([*args, f"http://{ngx_ip}:{nport}/x"])

        h1(strip_ip, sport, 4, f"traceparent: {TP}")  # stripped by the strip service
        h1(strip_ip, sport, 2)  # nothing to strip
        h1(back_ip, bport, 3, f"traceparent: {TP_BAD}")  # malformed, both ends
        h1(back_ip, bport, 1, f"traceparent: {TP}", "b3: 1111111111111111-2222222222222222-1")
        h1(back_ip, bport, 2, f"b3: {B3}")
        h2(3, f"traceparent: {TP}")
        h2(2)
        h2(2, f"traceparent: {TP_BAD}")
        delta = daemon.settle(since=before) - before
    report = dump.report
    assert re.search(r"^0 packets dropped by kernel", report, re.M), report

    live_msgs = _by_process(delta, MSG, names)
    live_finds = _by_process(delta, FIND, names)
    # What the traffic must have produced (the daemon is the reference; check it first).
    assert live_finds == {
        ("stripped", "traceparent", strip_ip, f"{back_ip}:{bport}"): 4,
        ("malformed", "traceparent", cli_ip, f"{back_ip}:{bport}"): 3,
        ("malformed", "traceparent", back_ip, cli_ip): 3,
        ("conflict", "b3", cli_ip, f"{back_ip}:{bport}"): 1,
        ("conflict", "b3", back_ip, cli_ip): 1,
        ("malformed", "traceparent", curl_ip, f"{ngx_ip}:{nport}"): 2,
        ("malformed", "traceparent", ngx_ip, curl_ip): 2,
    }, live_finds
    assert sum(v for k, v in live_msgs.items() if k[0] == strip_ip) == 4 * 6

    # The replay, in process: message counts and findings from its metrics.
    with PcapCapture(pcap) as cap:
        result = Replay(Config(), cap).run()
    assert result.stats.gaps == 0 and result.stats.connections_without_syn == 0
    replay_msgs = {k: int(v) for k, v in result.messages.items() if v}
    assert replay_msgs == live_msgs
    assert {k: int(v) for k, v in result.findings.items() if v} == live_finds

    # The command, as an operator runs it: one JSON line per finding.
    res = run([str(HOPWATCH), "replay", str(pcap), "--json"])
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    from_json = Counter(
        (x["finding"], x["header"], x["process"]["label"]) for x in lines
    )
    assert dict(from_json) == {(f, h, p): n for (f, h, p, _peer), n in live_finds.items()}
    stripped = [x for x in lines if x["finding"] == "stripped"]
    assert {(x["local"].rsplit(":", 1)[0], x["peer"]) for x in stripped} == {
        (strip_ip, f"{back_ip}:{bport}")
    }
