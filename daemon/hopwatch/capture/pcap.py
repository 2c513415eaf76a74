"""A capture file as a capture source: the same plain events as live capture.

Theory of operation
-------------------
scapy's `RawPcapReader` streams the file (pcap, pcapng, either gzipped) one record at a
time; the link, IP and TCP headers are decoded here with `struct` (building a scapy packet
per record would cost ~50x more and tell us nothing we need). Link types: Ethernet (with
802.1Q/802.1ad tags: what ``tcpdump -i lo`` writes), Linux cooked SLL and SLL2 (``-i any``),
raw IP (101, 228, 229) and BSD loopback (NULL, LOOP). IPv4 and IPv6; IP fragments and
anything but TCP are counted and passed over.

Each TCP connection (a 4-tuple) is reassembled per direction:

* The SYN (or the SYN-ACK when the SYN was not captured) gives the initial sequence number;
  a connection already running when the capture started (no SYN) starts at its first
  payload byte, and the side that sent it is told apart by what it sent (a request line or
  the HTTP/2 preface: the client; ``HTTP/1.x``: the server), else by well-known ports.
* Sequence numbers are unwrapped into 64-bit stream offsets. A segment wholly behind the
  delivered offset is a retransmission (counted, dropped); one that overlaps it is trimmed
  (the overlap counted); one ahead of it waits in a bounded reorder buffer.
* A hole is declared lost (a *gap*) as soon as the other side acknowledges bytes past it
  (the receiver had them: the capture dropped them, no retransmission will ever come), when
  the reorder buffer of the direction outgrows its bound, when it has waited
  ``max_hole_age_ns`` of capture time, and at close or end of file. A gap becomes a
  `DataChunk` with no data whose ``total_len`` covers the hole, so the parser is told how
  many bytes it missed and resynchronises, exactly as for a lost kernel event. Bytes cut by
  the capture's snap length are gaps too (the chunk's ``missed`` tail).
* FIN in both directions (once every byte before it was delivered) or RST ends the
  connection: `ConnClosed`.

Observed ends and process identity
----------------------------------
Live capture sees a connection once per local process holding it: a client that connected
and a server that accepted. A capture file has no processes, so each connection yields up
to two synthetic *ends*, each its own ``(tgid, fd)`` connection: the client end (role
client: its sends are requests) and the server end (role server). ``ends`` chooses which
are reported: ``both`` (the default: what live capture reports on a node where both peers
are local, e.g. a loopback capture), ``client`` (only the requests the capture point's
host sent and their answers) or ``server`` (only the requests it received).

The process of an end is its host IP address: every connection that ends at one address is
one process, so the requests a service at 10.0.0.2 received and the requests it sent belong
together and hop analysis pairs them. Its ``tgid`` is a small number per address, its
label (``comm``) the address itself. On loopback everything ends at 127.0.0.1 unless the
peers bind distinct addresses of 127.0.0.0/8: then give each service its own address, or
read hop findings with care. A capture has no threads either: each end is its own thread
(``tid`` = its ``fd``), so an outbound request is attributed by trace id, by method and
path, or as the only open inbound request (DESIGN.md), never by thread.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from hopwatch.capture._types import (
    CaptureEvent,
    ConnClosed,
    ConnOpened,
    DataChunk,
    Direction,
    SockAddr,
)
from hopwatch.conntrack import Identity
from hopwatch.procfs import ProcessInfo

from .._compat import SLOTS

__all__ = ["ENDS", "PcapCapture", "PcapError", "PcapStats"]

log = logging.getLogger(__name__)

ENDS = ("both", "client", "server")

#: Largest record read from the file (loopback segments reach 64 KiB; GSO more).
_MAX_RECORD = 256 * 1024
_MASK32 = 0xFFFFFFFF
_HALF32 = 1 << 31

# TCP flags
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10

# Link types (https://www.tcpdump.org/linktypes.html)
_LT_NULL, _LT_EN10MB, _LT_RAW_BSD, _LT_RAW, _LT_LOOP = 0, 1, 12, 101, 108
_LT_SLL, _LT_SLL2, _LT_IPV4, _LT_IPV6 = 113, 276, 228, 229
_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
_ETH_VLAN = (0x8100, 0x88A8, 0x9100)
_BSD_INET6 = (24, 28, 30)

_IPV6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options (fragment: 44)

#: Server ports a connection without a SYN is judged by, when its bytes cannot tell.
WELL_KNOWN_PORTS = frozenset(
    {80, 443, 3000, 5000, 8000, 8008, 8080, 8081, 8443, 8888, 9000, 9090, 50051}
)
_REQUEST_START = re.compile(rb"[A-Z][A-Z-]{2,15} [^ \r\n]")
_H2_PREFACE = b"PRI * HTTP/2.0"


class PcapError(Exception):
    """The file cannot be read as a capture; the message says why."""


@dataclass(**SLOTS)
class PcapStats:
    """What reading the capture found; every gap and every packet passed over is counted."""

    packets: int = 0
    tcp_segments: int = 0
    not_tcp: int = 0  # not TCP, or not IP at all (ARP, UDP, ...)
    unsupported_link: int = 0  # records of a link type this reader does not decode
    fragments: int = 0  # IP fragments (TCP over fragmented IP is not reassembled)
    malformed: int = 0  # records too short for the headers they announce
    connections: int = 0
    connections_without_syn: int = 0  # already open when the capture started
    late_packets: int = 0  # payload of a connection already closed (passed over)
    retransmitted_segments: int = 0
    retransmitted_bytes: int = 0
    overlap_bytes: int = 0  # bytes seen twice in partly overlapping segments
    out_of_order_segments: int = 0  # segments that waited in the reorder buffer
    gaps: int = 0  # holes declared lost (each yielded as a gap)
    gap_bytes: int = 0
    truncated_bytes: int = 0  # payload cut by the capture's snap length
    evicted_connections: int = 0  # dropped by the max_connections bound

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(**SLOTS)
class _End:
    """One synthetic observed end: a process (host IP) holding one fd."""

    tgid: int
    fd: int
    label: str


@dataclass(**SLOTS)
class _Seg:
    data: bytes
    total: int  # segment length on the wire (data may be cut by the snap length)


@dataclass(**SLOTS)
class _Dir:
    """One direction of a connection: delivered offset, reorder buffer, FIN."""

    started: bool = False
    base: int = 0  # sequence number of stream offset 0
    next_off: int = 0  # offset of the next byte to deliver
    pending: dict[int, _Seg] = field(default_factory=dict)
    heap: list[int] = field(default_factory=list)
    pending_bytes: int = 0
    hole_since_ns: int = 0
    fin_off: int | None = None
    max_seen: int = 0  # end offset of the furthest segment seen

    def offset(self, seq: int) -> int:
        """``seq`` as a stream offset, unwrapped around the next expected byte."""
        diff = (seq - self.base - self.next_off) & _MASK32
        if diff >= _HALF32:
            diff -= 1 << 32
        return self.next_off + diff

    @property
    def finished(self) -> bool:
        return self.fin_off is not None and self.next_off >= self.fin_off


@dataclass(**SLOTS)
class _Conn:
    client: tuple[str, int]
    server: tuple[str, int]
    family: int
    isn: int | None  # the client's ISN when its SYN was seen
    dirs: tuple[_Dir, _Dir] = field(default_factory=lambda: (_Dir(), _Dir()))  # c->s, s->c
    ends: tuple[_End | None, _End | None] = (None, None)  # client end, server end


@dataclass(frozen=True, **SLOTS)
class _Packet:
    family: int
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes  # what was captured
    seg_len: int  # what the headers say was sent


class PcapCapture:
    """Read a capture file as `CaptureEvent` s. See the module docstring.

    Open it (the constructor raises `PcapError` or `OSError` at once for a file that is not
    a capture), iterate `events()` once, `close()`. ``identity`` is the
    `ConnectionTable` identity function for the synthetic ends.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ends: str = "both",
        max_reorder_bytes: int = 1 << 20,
        max_hole_age_ns: int = 2 * 10**9,
        max_connections: int = 65_536,
        progress: Callable[[int], None] | None = None,
        progress_every: int = 2048,
    ) -> None:
        if ends not in ENDS:
            raise ValueError(f"ends must be one of {', '.join(ENDS)}, not {ends!r}")
        self.path = os.fspath(path)
        self.ends = ends
        self.max_reorder_bytes = max_reorder_bytes
        self.max_hole_age_ns = max_hole_age_ns
        self.max_connections = max_connections
        self.stats = PcapStats()
        self.size = os.path.getsize(self.path)  # OSError (missing file) before scapy
        self.progress = progress  # called with position() every progress_every records
        self._progress_every = max(1, progress_every)
        self._reader = _open_reader(self.path)
        self._conns: OrderedDict[tuple[Any, ...], _Conn] = OrderedDict()
        self._closed: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._tgids: dict[str, int] = {}
        self._labels: dict[int, str] = {}
        self._locals: dict[tuple[int, int], SockAddr] = {}
        self._next_fd = 3
        self._out: list[CaptureEvent] = []
        self.first_ts_ns = 0
        self.last_ts_ns = 0

    # -- public ---------------------------------------------------------------------------
    def __enter__(self) -> PcapCapture:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def position(self) -> int:
        """Bytes of the file read so far (for a progress bar)."""
        reader = self._reader
        if reader is None:
            return self.size
        try:
            return min(int(reader.f.tell()), self.size)
        except (OSError, ValueError, AttributeError):
            return 0

    def identity(self, ev: ConnOpened) -> Identity:
        """`ConnectionTable` identity: the end's host IP is its process."""
        label = self._labels.get(ev.tgid, ev.comm or "unknown")
        return Identity(ProcessInfo(ev.tgid, label), self._locals.pop((ev.tgid, ev.fd), None))

    def process_addresses(self) -> dict[str, int]:
        """Host IP -> synthetic tgid, for every process seen."""
        return dict(self._tgids)

    def events(self) -> Iterator[CaptureEvent]:
        """Every event of the capture, in packet order; then what end of file resolves."""
        reader = self._reader
        if reader is None:
            raise PcapError("the capture is closed")
        pcapng = hasattr(reader, "interfaces")
        nano = bool(getattr(reader, "nano", False))
        file_linktype = int(getattr(reader, "linktype", -1))
        every = self._progress_every
        while True:
            try:
                record = reader._read_packet(_MAX_RECORD)
            except EOFError:
                break
            if record is None:
                continue
            data, meta = record
            st = self.stats
            st.packets += 1
            if pcapng:
                linktype = int(meta.linktype)
                ts_ns = ((meta.tshigh << 32) | meta.tslow) * 10**9 // int(meta.tsresol)
            else:
                linktype = file_linktype
                ts_ns = meta.sec * 10**9 + (meta.usec if nano else meta.usec * 1000)
            if not self.first_ts_ns:
                self.first_ts_ns = ts_ns
            self.last_ts_ns = ts_ns
            self._packet(linktype, bytes(data), ts_ns)
            if self._out:
                yield from self._out
                self._out.clear()
            if self.progress is not None and st.packets % every == 0:
                self.progress(self.position())
        self._finish(self.last_ts_ns)
        yield from self._out
        self._out.clear()
        if self.progress is not None:
            self.progress(self.size)

    # -- decoding -------------------------------------------------------------------------
    def _packet(self, linktype: int, data: bytes, ts_ns: int) -> None:
        ip = _ip_offset(linktype, data)
        st = self.stats
        if ip is None:
            st.unsupported_link += 1
            return
        if ip < 0:
            st.not_tcp += 1
            return
        try:
            pkt = _decode_ip(data, ip, st)
        except (struct.error, IndexError, ValueError):
            st.malformed += 1
            return
        if pkt is None:
            return
        st.tcp_segments += 1
        self._segment(pkt, ts_ns)

    # -- connections ----------------------------------------------------------------------
    def _segment(self, p: _Packet, ts_ns: int) -> None:
        a, b = (p.src, p.sport), (p.dst, p.dport)
        key = (a, b) if a <= b else (b, a)
        conn = self._conns.get(key)
        flags = p.flags
        if flags & _SYN:
            if not flags & _ACK:  # SYN: a client connects
                if conn is not None and conn.isn == p.seq and conn.client == a:
                    return  # the SYN retransmitted
                if conn is not None:
                    self._close(key, conn, ts_ns)
                conn = self._new(key, a, b, p.family, ts_ns, isn=p.seq, midstream=False)
                d = conn.dirs[0]
            else:  # SYN-ACK: the server answers (its SYN may have been all we caught)
                if conn is None:
                    conn = self._new(key, b, a, p.family, ts_ns, isn=None, midstream=False)
                elif conn.server != a:
                    return  # simultaneous open: not HTTP as anyone speaks it
                d = conn.dirs[1]
            if not d.started:
                d.started, d.base = True, (p.seq + 1) & _MASK32
            if p.seg_len:  # data on a SYN (TCP Fast Open)
                self._data(conn, d is conn.dirs[0], (p.seq + 1) & _MASK32, p, ts_ns)
            return
        if conn is None:
            if key in self._closed:
                if p.seg_len:  # a retransmission after the close (pure ACKs are expected)
                    self.stats.late_packets += 1
                return
            if not p.seg_len:
                return  # pure ACKs and FINs of a connection we never saw carry nothing
            client, server = (a, b) if _sender_is_client(p) else (b, a)
            conn = self._new(key, client, server, p.family, ts_ns, isn=None, midstream=True)
        else:
            self._conns.move_to_end(key)
        from_client = conn.client == a
        d = conn.dirs[0 if from_client else 1]
        if flags & _ACK:
            self._acked(conn, not from_client, p.ack, ts_ns)
        if p.seg_len:
            self._data(conn, from_client, p.seq, p, ts_ns)
        if flags & _FIN:
            if not d.started:
                d.started, d.base = True, p.seq
            fin = d.offset(p.seq) + p.seg_len
            if d.fin_off is None or fin < d.fin_off:
                d.fin_off = fin
        if flags & _RST:
            self._close(key, conn, ts_ns)
            return
        c2s, s2c = conn.dirs
        if c2s.finished and s2c.finished:
            self._close(key, conn, ts_ns)
            return
        if self.max_hole_age_ns > 0:
            for i, dd in enumerate(conn.dirs):
                if dd.heap and ts_ns - dd.hole_since_ns > self.max_hole_age_ns:
                    self._skip_hole(conn, i == 0, dd, ts_ns)

    def _new(
        self,
        key: tuple[Any, ...],
        client: tuple[str, int],
        server: tuple[str, int],
        family: int,
        ts_ns: int,
        *,
        isn: int | None,
        midstream: bool,
    ) -> _Conn:
        while len(self._conns) >= self.max_connections:
            old_key, old = next(iter(self._conns.items()))
            self.stats.evicted_connections += 1
            self._close(old_key, old, ts_ns)
        self._closed.pop(key, None)
        conn = _Conn(client=client, server=server, family=family, isn=isn)
        self._conns[key] = conn
        self.stats.connections += 1
        if midstream:
            self.stats.connections_without_syn += 1
        client_addr = SockAddr(family, *client)
        server_addr = SockAddr(family, *server)
        ends: list[_End | None] = [None, None]
        for i, (role, local, peer) in enumerate(
            (("client", client_addr, server_addr), ("server", server_addr, client_addr))
        ):
            if self.ends not in ("both", role):
                continue
            end = self._end(local)
            ends[i] = end
            self._locals[(end.tgid, end.fd)] = local
            self._out.append(
                ConnOpened(end.tgid, end.fd, end.fd, role, peer, ts_ns, comm=end.label)
            )
        conn.ends = (ends[0], ends[1])
        return conn

    def _end(self, local: SockAddr) -> _End:
        label = local.host
        tgid = self._tgids.get(label)
        if tgid is None:
            tgid = self._tgids[label] = len(self._tgids) + 1
            self._labels[tgid] = label
        fd = self._next_fd
        self._next_fd += 1
        return _End(tgid, fd, label)

    def _close(self, key: tuple[Any, ...], conn: _Conn, ts_ns: int) -> None:
        for i, d in enumerate(conn.dirs):
            self._flush(conn, i == 0, d, ts_ns)
        for end in conn.ends:
            if end is not None:
                self._locals.pop((end.tgid, end.fd), None)
                self._out.append(ConnClosed(end.tgid, end.fd, ts_ns))
        self._conns.pop(key, None)
        self._closed[key] = None
        while len(self._closed) > self.max_connections:
            self._closed.popitem(last=False)

    def _finish(self, ts_ns: int) -> None:
        """End of file: holes left are lost; connections fully finished are closed.

        Connections still open stay open (the capture stopped, they did not), as a daemon
        that stops does not close them either.
        """
        for key, conn in list(self._conns.items()):
            for i, d in enumerate(conn.dirs):
                self._flush(conn, i == 0, d, ts_ns)
            if all(d.fin_off is not None for d in conn.dirs):
                self._close(key, conn, ts_ns)

    # -- reassembly -----------------------------------------------------------------------
    def _data(self, conn: _Conn, from_client: bool, seq: int, p: _Packet, ts_ns: int) -> None:
        st = self.stats
        d = conn.dirs[0 if from_client else 1]
        if not d.started:
            d.started, d.base = True, seq
        off = d.offset(seq)
        data, total = p.payload, p.seg_len
        if len(data) < total:
            st.truncated_bytes += total - len(data)
        end = off + total
        if end <= d.next_off:
            st.retransmitted_segments += 1
            st.retransmitted_bytes += total
            return
        if off < d.next_off:
            cut = d.next_off - off
            st.overlap_bytes += cut
            data, total, off = data[cut:], total - cut, d.next_off
        d.max_seen = max(d.max_seen, off + total)
        if off == d.next_off:
            self._deliver(conn, from_client, d, off, data, total, ts_ns)
            self._drain(conn, from_client, d, ts_ns)
            return
        # Ahead of the delivered offset: wait for the hole to fill.
        old = d.pending.get(off)
        if old is not None:
            if old.total >= total:
                st.retransmitted_segments += 1
                st.retransmitted_bytes += total
                return
            d.pending_bytes -= old.total
        else:
            heapq.heappush(d.heap, off)
        if not d.pending:
            d.hole_since_ns = ts_ns
        d.pending[off] = _Seg(data, total)
        d.pending_bytes += total
        st.out_of_order_segments += 1
        if d.pending_bytes > self.max_reorder_bytes or (
            self.max_hole_age_ns > 0 and ts_ns - d.hole_since_ns > self.max_hole_age_ns
        ):
            self._skip_hole(conn, from_client, d, ts_ns)

    def _acked(self, conn: _Conn, client_data: bool, ack: int, ts_ns: int) -> None:
        """The peer acknowledged bytes up to ``ack``: any hole before it is lost for good."""
        d = conn.dirs[0 if client_data else 1]
        if not d.started:
            return
        acked = d.offset(ack)
        if d.fin_off is not None and acked > d.fin_off:
            acked = d.fin_off  # the FIN takes a sequence number, not a byte
        if acked <= d.next_off or acked - d.next_off > _HALF32:
            return
        first = d.heap[0] if d.heap else None
        upto = acked if first is None else min(acked, first)
        if upto > d.next_off:
            self._gap(conn, client_data, d, upto - d.next_off, ts_ns)
            self._drain(conn, client_data, d, ts_ns)

    def _skip_hole(self, conn: _Conn, from_client: bool, d: _Dir, ts_ns: int) -> None:
        """Give up on the first hole: a gap, then what was waiting behind it."""
        while d.heap and d.heap[0] <= d.next_off:
            self._drain(conn, from_client, d, ts_ns)
        if d.heap:
            self._gap(conn, from_client, d, d.heap[0] - d.next_off, ts_ns)
            self._drain(conn, from_client, d, ts_ns)

    def _flush(self, conn: _Conn, from_client: bool, d: _Dir, ts_ns: int) -> None:
        """Deliver everything buffered, holes as gaps (close, end of file)."""
        while d.heap:
            self._skip_hole(conn, from_client, d, ts_ns)
        if d.fin_off is not None and d.fin_off > d.next_off and d.fin_off - d.next_off < _HALF32:
            self._gap(conn, from_client, d, d.fin_off - d.next_off, ts_ns)

    def _drain(self, conn: _Conn, from_client: bool, d: _Dir, ts_ns: int) -> None:
        st = self.stats
        while d.heap and d.heap[0] <= d.next_off:
            off = heapq.heappop(d.heap)
            seg = d.pending.pop(off)
            d.pending_bytes -= seg.total
            end = off + seg.total
            if end <= d.next_off:
                st.retransmitted_segments += 1
                st.retransmitted_bytes += seg.total
                continue
            data, total = seg.data, seg.total
            if off < d.next_off:
                cut = d.next_off - off
                st.overlap_bytes += cut
                data, total = data[cut:], total - cut
            self._deliver(conn, from_client, d, d.next_off, data, total, ts_ns)
        if d.heap:
            d.hole_since_ns = ts_ns

    def _gap(self, conn: _Conn, from_client: bool, d: _Dir, nbytes: int, ts_ns: int) -> None:
        self.stats.gaps += 1
        self.stats.gap_bytes += nbytes
        log.debug("gap of %d bytes in %s -> %s", nbytes, *_names(conn, from_client))
        self._deliver(conn, from_client, d, d.next_off, b"", nbytes, ts_ns)

    def _deliver(
        self,
        conn: _Conn,
        from_client: bool,
        d: _Dir,
        off: int,
        data: bytes,
        total: int,
        ts_ns: int,
    ) -> None:
        d.next_off = off + total
        sender, receiver = conn.ends if from_client else (conn.ends[1], conn.ends[0])
        for end, direction in ((sender, Direction.SEND), (receiver, Direction.RECV)):
            if end is not None:
                self._out.append(
                    DataChunk(
                        end.tgid,
                        end.fd,
                        end.fd,
                        direction,
                        ts_ns,
                        total,
                        data,
                        offset=off,
                        comm=end.label,
                    )
                )


# -- helpers ---------------------------------------------------------------------------------


def _names(conn: _Conn, from_client: bool) -> tuple[str, str]:
    c = f"{conn.client[0]}:{conn.client[1]}"
    s = f"{conn.server[0]}:{conn.server[1]}"
    return (c, s) if from_client else (s, c)


def _open_reader(path: str) -> Any:
    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapReader

    # scapy warns through its own logger (truncated records, ...): we count those ourselves.
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    if os.path.isdir(path):
        raise PcapError(f"{path} is a directory, not a capture file")
    try:
        return RawPcapReader(path)
    except Scapy_Exception as exc:
        raise PcapError(f"{path} is not a pcap or pcapng capture ({exc})") from None
    except EOFError:
        raise PcapError(f"{path} is not a pcap or pcapng capture (too short)") from None


def _sender_is_client(p: _Packet) -> bool:
    """Mid-stream: did the sender of this first payload open the connection?"""
    data = p.payload
    if data.startswith(_H2_PREFACE) or _REQUEST_START.match(data):
        return True
    if data.startswith(b"HTTP/"):
        return False
    s_known, d_known = p.sport in WELL_KNOWN_PORTS, p.dport in WELL_KNOWN_PORTS
    if s_known != d_known:
        return d_known
    if (p.sport < 1024) != (p.dport < 1024):
        return p.dport < 1024
    return p.dport < p.sport  # ephemeral ports are the high ones


def _ip_offset(linktype: int, data: bytes) -> int | None:
    """Where the IP header starts; -1 for a frame that is not IP; None: link not decoded."""
    if linktype == _LT_EN10MB:
        if len(data) < 14:
            return -1
        off, etype = 14, int.from_bytes(data[12:14], "big")
        while etype in _ETH_VLAN and len(data) >= off + 4:
            etype = int.from_bytes(data[off + 2 : off + 4], "big")
            off += 4
        return off if etype in (_ETH_IPV4, _ETH_IPV6) else -1
    if linktype == _LT_SLL:
        if len(data) < 16:
            return -1
        etype = int.from_bytes(data[14:16], "big")
        return 16 if etype in (_ETH_IPV4, _ETH_IPV6) else -1
    if linktype == _LT_SLL2:
        if len(data) < 20:
            return -1
        etype = int.from_bytes(data[0:2], "big")
        return 20 if etype in (_ETH_IPV4, _ETH_IPV6) else -1
    if linktype in (_LT_RAW, _LT_RAW_BSD, _LT_IPV4, _LT_IPV6):
        return 0
    if linktype in (_LT_NULL, _LT_LOOP):
        if len(data) < 4:
            return -1
        fam_le = int.from_bytes(data[:4], "little")
        fam_be = int.from_bytes(data[:4], "big")
        fam = fam_be if linktype == _LT_LOOP else (fam_le if fam_le < 256 else fam_be)
        return 4 if fam == 2 or fam in _BSD_INET6 else -1
    return None


def _decode_ip(data: bytes, off: int, st: PcapStats) -> _Packet | None:
    """The TCP segment in the IP packet at ``off``, or None (counted) if there is none."""
    version = data[off] >> 4
    if version == 4:
        ihl = (data[off] & 0x0F) * 4
        if ihl < 20 or len(data) < off + ihl:
            raise ValueError("short IPv4 header")
        total = int.from_bytes(data[off + 2 : off + 4], "big")
        frag = int.from_bytes(data[off + 6 : off + 8], "big")
        proto = data[off + 9]
        if proto != 6:
            st.not_tcp += 1
            return None
        if frag & 0x3FFF:  # more fragments, or a fragment offset
            st.fragments += 1
            return None
        family = socket.AF_INET
        src = socket.inet_ntop(family, data[off + 12 : off + 16])
        dst = socket.inet_ntop(family, data[off + 16 : off + 20])
        # total 0: a TSO-offloaded packet captured before segmentation; trust the capture.
        end = off + total if total else len(data)
        tcp = off + ihl
    elif version == 6:
        if len(data) < off + 40:
            raise ValueError("short IPv6 header")
        plen = int.from_bytes(data[off + 4 : off + 6], "big")
        nxt = data[off + 6]
        family = socket.AF_INET6
        src = socket.inet_ntop(family, data[off + 8 : off + 24])
        dst = socket.inet_ntop(family, data[off + 24 : off + 40])
        end = off + 40 + plen if plen else len(data)
        tcp = off + 40
        while nxt in _IPV6_EXT:
            nxt = data[tcp]
            tcp += (data[tcp + 1] + 1) * 8
        if nxt == 44:
            st.fragments += 1
            return None
        if nxt != 6:
            st.not_tcp += 1
            return None
    else:
        st.not_tcp += 1
        return None
    if len(data) < tcp + 20:
        raise ValueError("short TCP header")
    sport, dport, seq, ack, doff_flags = struct.unpack_from("!HHIIH", data, tcp)
    hlen = (doff_flags >> 12) * 4
    if hlen < 20 or len(data) < tcp + hlen:
        raise ValueError("short TCP header")
    start = tcp + hlen
    seg_len = max(0, end - start)
    payload = data[start : min(end, len(data))]  # Ethernet pads short frames: not payload
    return _Packet(family, src, dst, sport, dport, seq, ack, doff_flags & 0xFF, payload, seg_len)

