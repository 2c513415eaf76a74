"""Hop analysis: pair each outbound request of a process with the inbound request it serves.

Theory of operation
-------------------
`HopAnalyzer` is a pipeline observer. It sees every parsed HTTP message of every observed
process, already checked (`Observation.verdict`), and keeps per process (tgid):

* the *open* inbound requests: request head read, final response not yet written. A
  response the process writes closes the oldest open request of its connection (HTTP/1:
  FIFO, which is what pipelining guarantees) or the one of its stream (HTTP/2). Each open
  request remembers the thread that read it, its method and path, its contexts (trace ids,
  sampled flags), the headers that were malformed with a keyed hash of each raw value, and
  the headers that broke a size limit. Raw values are never kept.
* the outbound requests still waiting for their answer, but only as much as
  `oversized_rejected` needs (a counter per HTTP/1 connection, the oversized ones by
  sequence number or HTTP/2 stream);
* the CONNECT tunnels it opened (requests inside are judged by the tunnel's target).

An outbound request O is attributed to an open inbound request I (DESIGN.md, "Attributing
an outbound request"), strongest rule first:

0. O continues the trace of an open I (same trace id): the trace id is the strongest
   evidence there is, and it keeps single-threaded event loops (one tid reads every
   request) from being misattributed; among several such I the rules below choose, and
   the most recent wins a tie (they are one trace);
1. the thread that wrote O read I (the most recent such I; when that thread reads many
   requests, an event loop, one of them with O's method and path is preferred);
2. O repeats the method and path of exactly one open I (proxies);
3. I is the only open inbound request.

Otherwise O is unattributed: counted (`hopwatch_unattributed_requests_total`) when the
process had open inbound requests at all, never guessed. The one conclusion that needs no
attribution: when every open inbound request carries context and O's trace id matches none
of them, O is `restarted`. A process that never receives requests has no open inbound
requests, so it produces no hop findings (it still can leak).

Findings that do not need attribution are judged on the message alone: `leak` (outbound
request with propagation headers to a destination outside the egress allowlist),
`response_leak` (outbound response with propagation headers to a client outside it) and
`oversized_rejected` (a request with an `oversized` finding answered 400/413/431, seen from
the server that read it and from the client that sent it).

Counting follows the pipeline: one message adds at most 1 per (finding, header); the
reason codes go to the audit sink. State is bounded (processes, open requests per
process, tracked connections per process) and every eviction is counted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from hopwatch.capture._types import (
    CaptureEvent,
    ConnClosed,
    ConnOpened,
    ProcessExecuted,
    ProcessExited,
    SockAddr,
)
from hopwatch.config import Config, EgressRule
from hopwatch.metrics import Metrics
from hopwatch.pipeline import Observation, peer_label
from hopwatch.propagation import TraceContext, Verdict
from hopwatch.protocols import Origin

from ._compat import SLOTS

__all__ = [
    "REJECT_STATUSES",
    "Destination",
    "FindingSink",
    "HopAnalyzer",
    "HopFinding",
    "destination_of",
    "is_allowed",
]

log = logging.getLogger(__name__)

#: Statuses that mean "your request was refused" for `oversized_rejected`.
REJECT_STATUSES: frozenset[int] = frozenset({400, 413, 431})

#: The header label of each trace-context format (B3 single and multi are both "b3").
FORMAT_HEADER = {"w3c": "traceparent", "b3": "b3"}

_MAX_PENDING_OVERSIZED = 64  # per connection, waiting for their answer
_MALFORMED = "malformed"
_OVERSIZED = "oversized"


# -- what the analyzer reports ----------------------------------------------------------------


@dataclass(frozen=True, **SLOTS)
class HopFinding:
    """One hop-level finding, for the audit sink.

    ``obs`` is the message that completed the finding (the outbound request, or the
    response). ``trace_id`` is the trace the finding concerns (the inbound one for hop
    findings); ``other_trace_id`` the outbound's when it differs (``restarted``). Both are
    raw: a sink must hash them before they leave the process.
    """

    finding: str
    header: str
    reason: str
    obs: Observation
    trace_id: str | None = None
    other_trace_id: str | None = None
    destination: str | None = None  # leak: the judged destination; else None
    via: str | None = None  # leak: "direct" | "proxy" | "connect" | "tunnel"


class FindingSink(Protocol):
    def hop_finding(self, finding: HopFinding) -> None: ...


# -- egress judgement -------------------------------------------------------------------------


@dataclass(frozen=True, **SLOTS)
class Destination:
    """Where an outbound request goes, as far as the allowlist is concerned.

    ``via`` says how it was found: ``direct`` (peer address, and the TLS server name, else the
    Host/:authority name),
    ``proxy`` (absolute-form target through a forward proxy), ``connect`` (a CONNECT
    request) or ``tunnel`` (a request inside a CONNECT tunnel). For the last three the
    proxy's address is irrelevant: only ``host``/``port`` (the named target) are judged.
    """

    via: str
    host: str | None  # hostname or IP literal (lowercase, no brackets, no port)
    port: int | None
    ip: str | None = None  # direct only: the peer's address
    ip_port: int | None = None
    port_named: bool = True  # False: Host without a port (``port`` is the peer's)

    @property
    def label(self) -> str:
        """The ``peer`` label: the host as the request named it, else ``ip:port``."""
        if self.host is not None:
            if self.port is None or not self.port_named:
                return self.host
            return _join(self.host, self.port)
        if self.ip is not None:
            return _join(self.ip, self.ip_port)
        return "unknown"


def _join(host: str, port: int | None) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


_AUTHORITIES: dict[str, tuple[str, int | None]] = {}  # a node names few hosts: bounded cache


def _split_authority(authority: str) -> tuple[str, int | None]:
    """'Host:port', '[v6]:port', 'host' -> (host lowercase, port or None)."""
    known = _AUTHORITIES.get(authority)
    if known is None:
        if len(_AUTHORITIES) >= 4096:
            _AUTHORITIES.clear()
        known = _AUTHORITIES[authority] = _parse_authority(authority)
    return known


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '³' or '٣', which int() refuses or reads."""
    return text.isascii() and text.isdigit()


def _parse_authority(authority: str) -> tuple[str, int | None]:
    a = authority.strip().lower()
    if "@" in a:  # userinfo never belongs here, but never judge by it
        a = a.rsplit("@", 1)[1]
    if a.startswith("["):
        end = a.find("]")
        host = a[1:end] if end > 0 else a[1:]
        rest = a[end + 1 :] if end > 0 else ""
        port_text = rest[1:] if rest.startswith(":") else ""
    elif a.count(":") == 1:
        host, port_text = a.split(":")
    else:
        host, port_text = a, ""
    port = int(port_text) if _digits(port_text) and 0 < int(port_text) < 65536 else None
    return host.rstrip("."), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _absolute_target(path: str | None) -> tuple[str, int | None] | None:
    """The host an absolute-form request-target names (``http://host:port/x``), or None."""
    if not path or "://" not in path[:10]:
        return None
    try:
        parts = urlsplit(path)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if port is None:
        port = 443 if scheme == "https" else 80
    return parts.hostname.lower().rstrip("."), port


def destination_of(obs: Observation, tunnel: Destination | None = None) -> Destination:
    """The destination of an outbound request (see `Destination`)."""
    msg = obs.message
    if msg.method == "CONNECT" and msg.path:
        target, target_port = _split_authority(msg.path)
        return Destination("connect", target, target_port)
    if tunnel is not None:
        return Destination("tunnel", tunnel.host, tunnel.port)
    absolute = _absolute_target(msg.path)
    if absolute is not None:
        return Destination("proxy", absolute[0], absolute[1])
    # Direct: a function of (authority, server name, peer), the same for every request on a
    # connection; kept (a Destination is immutable), bounded like the authority cache.
    peer = obs.peer
    key = (
        (msg.authority, obs.sni, peer.host, peer.port)
        if peer is not None
        else (msg.authority, obs.sni, None, None)
    )
    dest = _DIRECT.get(key)
    if dest is None:
        if len(_DIRECT) >= 4096:
            _DIRECT.clear()
        dest = _DIRECT[key] = _direct(msg.authority, obs.sni, peer)
    return dest


_DIRECT: dict[tuple[str | None, str | None, str | None, int | None], Destination] = {}


def _direct(authority: str | None, sni: str | None, peer: SockAddr | None) -> Destination:
    host: str | None = None
    port: int | None = None
    named = True
    if authority:
        host, port = _split_authority(authority)
    if sni and host != sni and not _is_ip(sni):
        # TLS: the name the client asked the handshake for beats what the request says.
        host, port = sni, None
    if (authority or host) and port is None and peer is not None:
        port, named = peer.port, False  # the port the request really went to
    return Destination(
        "direct",
        host or None,
        port,
        ip=peer.host if peer is not None else None,
        ip_port=peer.port if peer is not None else None,
        port_named=named,
    )


def is_allowed(rules: Iterable[EgressRule], dest: Destination) -> bool | None:
    """Whether the allowlist admits ``dest``; None when nothing about it is known.

    Direct: the peer address matches a CIDR entry, or the hostname (TLS SNI, else the
    Host/:authority name) matches a hostname entry (port-aware). Through a proxy or tunnel:
    the named target only (an IP literal against CIDR entries, a name against hostname
    entries).
    """
    rules = tuple(rules)
    if dest.via == "direct":
        if dest.ip is None and dest.host is None:
            return None
        if dest.ip is not None and any(r.matches_ip(dest.ip, dest.ip_port) for r in rules):
            return True
        if dest.host is not None and not _is_ip(dest.host):
            return any(r.matches_host(dest.host, dest.port) for r in rules)
        return False
    if dest.host is None:
        return None
    if _is_ip(dest.host):
        return any(r.matches_ip(dest.host, dest.port) for r in rules)
    return any(r.matches_host(dest.host, dest.port) for r in rules)


def _client_allowed(rules: Iterable[EgressRule], ip: str) -> bool:
    # A client's port is ephemeral: only port-less CIDR entries can admit it.
    return any(r.matches_ip(ip, None) for r in rules)


# -- per-process state ------------------------------------------------------------------------


@dataclass(**SLOTS)
class _Inbound:
    seq: int
    fd: int
    stream_id: int | None
    tid: int
    ts_ns: int
    method: str | None
    path: str | None
    context: str
    contexts: tuple[TraceContext, ...]
    malformed: dict[str, frozenset[bytes]]  # header -> keyed hashes of its raw values
    oversized: tuple[str, ...]  # headers with an `oversized` finding

    @property
    def trace_ids(self) -> frozenset[str]:
        return frozenset(c.trace_id for c in self.contexts)


@dataclass(**SLOTS)
class _ClientConn:
    """Outbound requests of one connection still waiting for their response."""

    sent: int = 0  # HTTP/1 requests written
    answered: int = 0  # HTTP/1 final responses read
    # HTTP/1 request number, or HTTP/2 stream id -> (oversized headers, peer label, trace id)
    oversized: dict[int, tuple[tuple[str, ...], str, str | None]] = field(default_factory=dict)


@dataclass(**SLOTS)
class _Process:
    open: OrderedDict[int, _Inbound] = field(default_factory=OrderedDict)  # seq -> oldest first
    clients: OrderedDict[int, _ClientConn] = field(default_factory=OrderedDict)  # fd ->
    tunnels: dict[int, Destination] = field(default_factory=dict)  # fd -> CONNECT target
    seq: int = 0


# -- the analyzer -----------------------------------------------------------------------------


def _contexts(v: Verdict) -> tuple[TraceContext, ...]:
    # Once per inbound request: spelled out (a generator costs a frame and an iterator).
    w3c, b3 = v.w3c, v.b3
    if w3c is None:
        return () if b3 is None else (b3,)
    return (w3c,) if b3 is None else (w3c, b3)


def _origin_path(path: str | None) -> str | None:
    """Absolute-form targets compare equal to their origin-form (forward proxies)."""
    if path and "://" in path[:10]:
        try:
            parts = urlsplit(path)
        except ValueError:
            return path
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return path


_VERDICT_CACHE = 4096  # allowlist verdicts kept per analyzer


class HopAnalyzer:
    """Pipeline observer producing the hop findings (see the module docstring).

    Wiring: register it as a `Pipeline` observer, and forward the capture's lifecycle
    events to `handle_event` (or call `connection_closed` / `process_exited` directly)
    after the pipeline has handled them.
    """

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        audit: FindingSink | None = None,
        *,
        max_processes: int = 4096,
        max_open_per_process: int = 1024,
        max_connections_per_process: int = 4096,
        max_open_age_ns: int = 300 * 10**9,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.audit = audit
        self.max_processes = max_processes
        self.max_open = max_open_per_process
        self.max_conns = max_connections_per_process
        self.max_age_ns = max_open_age_ns
        self._procs: OrderedDict[int, _Process] = OrderedDict()  # least recently used first
        self._key = secrets.token_bytes(32)  # hashes malformed values held in memory
        # Set by the `Pipeline` this observes: completes an observation's local address
        # before it reaches the audit log.
        self.resolve_local: Callable[[Observation], Observation] | None = None
        # Allowlist verdicts by destination / client address: a CIDR test parses the address
        # (~4 µs), and a node talks to few distinct peers. Bounded; emptied on reload.
        self._allowed: dict[Destination, bool | None] = {}
        self._clients_allowed: dict[str, bool] = {}

    # -- lifecycle --------------------------------------------------------------------------
    def update_config(self, config: Config) -> None:
        """SIGHUP: the new allowlist applies to the next message."""
        self.config = config
        self._allowed.clear()
        self._clients_allowed.clear()

    def _dest_allowed(self, dest: Destination) -> bool | None:
        cache = self._allowed
        try:
            return cache[dest]
        except KeyError:
            pass
        if len(cache) >= _VERDICT_CACHE:
            cache.clear()
        verdict = cache[dest] = is_allowed(self.config.egress_allow, dest)
        return verdict

    def _client_allowed(self, ip: str) -> bool:
        cache = self._clients_allowed
        verdict = cache.get(ip)
        if verdict is None:
            if len(cache) >= _VERDICT_CACHE:
                cache.clear()
            verdict = cache[ip] = _client_allowed(self.config.egress_allow, ip)
        return verdict

    def process_exited(self, tgid: int) -> None:
        self._procs.pop(tgid, None)

    def connection_closed(self, tgid: int, fd: int) -> None:
        """The connection's open requests will never be answered: forget them."""
        proc = self._procs.get(tgid)
        if proc is None:
            return
        for seq in [s for s, i in proc.open.items() if i.fd == fd]:
            del proc.open[seq]
        proc.clients.pop(fd, None)
        proc.tunnels.pop(fd, None)

    def handle_event(self, ev: CaptureEvent) -> None:
        """Forward every capture event after `Pipeline.handle`: frees state on close/exit
        (an fd reopened without a seen close is a new connection too)."""
        if isinstance(ev, (ConnClosed, ConnOpened)):
            self.connection_closed(ev.tgid, ev.fd)
        elif isinstance(ev, (ProcessExited, ProcessExecuted)):
            # After an exec, the new image answers none of the old one's requests.
            self.process_exited(ev.tgid)

    def open_requests(self) -> int:
        """Open inbound requests tracked, all processes (a gauge for the daemon)."""
        return sum(len(p.open) for p in self._procs.values())

    def tracked_processes(self) -> int:
        return len(self._procs)

    # -- observer ---------------------------------------------------------------------------
    def __call__(self, obs: Observation) -> None:
        request = obs.message.origin is Origin.CLIENT  # not the property: once per message
        if obs.direction == "inbound":
            if request:
                self._inbound_request(obs)
            else:
                self._inbound_response(obs)
        elif request:
            self._outbound_request(obs)
        else:
            self._outbound_response(obs)

    # -- state helpers ------------------------------------------------------------------------
    def _proc(self, tgid: int, create: bool) -> _Process | None:
        proc = self._procs.get(tgid)
        if proc is not None:
            self._procs.move_to_end(tgid)
            return proc
        if not create:
            return None
        while len(self._procs) >= self.max_processes:
            self._procs.popitem(last=False)
            self.metrics.hop_evictions.labels("process_cap").inc()
        proc = self._procs[tgid] = _Process()
        return proc

    def _expire(self, proc: _Process, now_ns: int) -> None:
        if now_ns <= 0 or self.max_age_ns <= 0:
            return
        deadline = now_ns - self.max_age_ns
        while proc.open:
            first = next(iter(proc.open.values()))
            if first.ts_ns <= 0 or first.ts_ns >= deadline:
                return
            proc.open.popitem(last=False)
            self.metrics.hop_evictions.labels("expired").inc()

    def _hash(self, value: str) -> bytes:
        return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), key=self._key,
                               digest_size=16).digest()

    def _values(self, obs: Observation, header: str) -> list[str]:
        msg = obs.message
        return [v for n, v in (*msg.headers, *msg.inferred_headers) if n == header]

    def _client_conn(self, proc: _Process, fd: int) -> _ClientConn:
        conn = proc.clients.get(fd)
        if conn is not None:
            proc.clients.move_to_end(fd)
        else:
            while len(proc.clients) >= self.max_conns:
                proc.clients.popitem(last=False)
                self.metrics.hop_evictions.labels("connection_cap").inc()
            conn = proc.clients[fd] = _ClientConn()
        return conn

    # -- inbound requests (server side) -------------------------------------------------------
    def _inbound_request(self, obs: Observation) -> None:
        msg = obs.message
        v = obs.verdict
        proc = self._proc(obs.tgid, create=True)
        assert proc is not None
        self._expire(proc, obs.ts_ns)
        malformed: dict[str, frozenset[bytes]] = {}
        oversized: list[str] = []
        for f in v.findings:
            if f.kind == _MALFORMED and f.header not in malformed:
                malformed[f.header] = frozenset(self._hash(x) for x in self._values(obs, f.header))
            elif f.kind == _OVERSIZED and f.header not in oversized:
                oversized.append(f.header)
        if malformed:
            malformed = {h: s for h, s in malformed.items() if s}
        proc.seq += 1
        inbound = _Inbound(  # positional (once per inbound request): the fields in order
            proc.seq,
            obs.fd,
            msg.stream_id,
            obs.tid,
            obs.ts_ns,
            msg.method,
            _origin_path(msg.path),
            v.context,
            _contexts(v),
            malformed,
            tuple(oversized),
        )
        while len(proc.open) >= self.max_open:
            proc.open.popitem(last=False)
            self.metrics.hop_evictions.labels("open_cap").inc()
        proc.open[inbound.seq] = inbound

    def _outbound_response(self, obs: Observation) -> None:
        msg = obs.message
        seen: set[tuple[str, str]] = set()
        self._response_leak(obs, seen)
        if msg.informational:
            return
        proc = self._proc(obs.tgid, create=False)
        if proc is None:
            return
        inbound = self._pair_response(proc, obs.fd, msg.stream_id)
        if inbound is None or not inbound.oversized or msg.status not in REJECT_STATUSES:
            return
        trace_id = inbound.contexts[0].trace_id if inbound.contexts else None
        for header in inbound.oversized:
            self._report(
                obs, seen, "oversized_rejected", header, f"oversized_rejected.status_{msg.status}",
                peer_label(obs), trace_id=trace_id,
            )

    def _pair_response(self, proc: _Process, fd: int, stream_id: int | None) -> _Inbound | None:
        # Oldest first: HTTP/1 answers in request order; HTTP/2 by stream.
        for seq, inbound in proc.open.items():
            if inbound.fd == fd and inbound.stream_id == stream_id:
                del proc.open[seq]
                return inbound
        return None

    def _response_leak(self, obs: Observation, seen: set[tuple[str, str]]) -> None:
        peer = obs.peer
        if peer is None or self._client_allowed(peer.host):
            return
        names = self._header_names(obs)
        if not names:
            return
        trace_id = _first_trace_id(obs.verdict)
        for name in names:
            self._report(
                obs, seen, "response_leak", name, "response_leak.client_not_allowed",
                peer.host, trace_id=trace_id, destination=peer.host, via="direct",
            )

    # -- outbound requests (client side) ----------------------------------------------------
    def _outbound_request(self, obs: Observation) -> None:
        msg = obs.message
        v = obs.verdict
        seen: set[tuple[str, str]] = set()
        proc = self._procs.get(obs.tgid)
        tunnel = proc.tunnels.get(obs.fd) if proc is not None else None
        dest = destination_of(obs, tunnel)
        self._leak(obs, dest, seen)

        oversized = (
            tuple(dict.fromkeys(f.header for f in v.findings if f.kind == _OVERSIZED))
            if v.findings
            else ()
        )
        if oversized or msg.stream_id is None or msg.method == "CONNECT":
            proc = self._proc(obs.tgid, create=True)
            assert proc is not None
        if proc is not None:
            self._track_request(proc, obs, dest, oversized)

        if proc is None or not proc.open:
            return  # never received requests (or none open): originates traces
        self._expire(proc, obs.ts_ns)
        if not proc.open:
            return
        process = self.metrics.process_label(obs.process)
        inbound = self._attribute(proc, obs)
        if inbound is None:
            self.metrics.unattributed.labels(process).inc()
            self._orphan(proc, obs, dest, seen)
            return
        self.metrics.hops.labels(
            process, self.metrics.peer_label(dest.label), inbound.context, v.context
        ).inc()
        self._compare(inbound, obs, dest, seen)

    def _track_request(
        self, proc: _Process, obs: Observation, dest: Destination, oversized: tuple[str, ...]
    ) -> None:
        """Remember what `oversized_rejected` and tunnels need of an outbound request."""
        msg = obs.message
        if msg.method == "CONNECT" and dest.host is not None:
            proc.tunnels[obs.fd] = dest
        conn: _ClientConn | None
        if msg.stream_id is None:  # HTTP/1: answers come in request order
            conn = self._client_conn(proc, obs.fd)
            conn.sent += 1
            key = conn.sent
        else:
            conn = self._client_conn(proc, obs.fd) if oversized else None
            key = msg.stream_id
        if oversized and conn is not None:
            conn.oversized[key] = (oversized, dest.label, _first_trace_id(obs.verdict))
            if len(conn.oversized) > _MAX_PENDING_OVERSIZED:
                del conn.oversized[next(iter(conn.oversized))]
                self.metrics.hop_evictions.labels("pending_cap").inc()

    def _attribute(self, proc: _Process, obs: Observation) -> _Inbound | None:
        candidates = list(proc.open.values())
        out_ids = {c.trace_id for c in _contexts(obs.verdict)}
        if out_ids:
            same_trace = [i for i in candidates if _any_same(out_ids, i.trace_ids)]
            if same_trace:  # one trace: a tie is no guess, the most recent wins
                return self._choose(same_trace, obs) or same_trace[-1]
        return self._choose(candidates, obs)

    @staticmethod
    def _choose(candidates: list[_Inbound], obs: Observation) -> _Inbound | None:
        msg = obs.message
        path = _origin_path(msg.path)
        if obs.tid:
            same_tid = [i for i in candidates if i.tid == obs.tid]
            if len(same_tid) > 1:
                # An event loop (nginx worker, asyncio) reads many requests on one thread:
                # method+path tells them apart when it can; else the most recent one.
                same = [i for i in same_tid if i.method == msg.method and i.path == path]
                if len(same) == 1:
                    return same[0]
            if same_tid:
                return same_tid[-1]
        same = [i for i in candidates if i.method == msg.method and i.path == path]
        if len(same) == 1:
            return same[0]
        if len(candidates) == 1:
            return candidates[0]
        return None

    def _orphan(
        self, proc: _Process, obs: Observation, dest: Destination, seen: set[tuple[str, str]]
    ) -> None:
        out = _contexts(obs.verdict)
        if not out or not all(i.contexts for i in proc.open.values()):
            return
        # _attribute already tried every open request's trace id: none matched.
        for ctx in out:
            self._report(
                obs, seen, "restarted", FORMAT_HEADER[ctx.format], "restarted.orphan",
                dest.label, trace_id=None, other_trace_id=ctx.trace_id,
            )

    def _compare(
        self, inbound: _Inbound, obs: Observation, dest: Destination, seen: set[tuple[str, str]]
    ) -> None:
        v = obs.verdict
        out = _contexts(v)
        label = dest.label
        in_trace = inbound.contexts[0].trace_id if inbound.contexts else None
        if inbound.contexts:
            if not out:
                for ctx in inbound.contexts:
                    self._report(
                        obs, seen, "stripped", FORMAT_HEADER[ctx.format], "stripped.no_context",
                        label, trace_id=ctx.trace_id,
                    )
            else:
                in_ids = inbound.trace_ids
                same = [c for c in out if _any_same((c.trace_id,), in_ids)]
                if not same:
                    for ctx in out:
                        self._report(
                            obs, seen, "restarted", FORMAT_HEADER[ctx.format],
                            "restarted.new_trace_id", label,
                            trace_id=in_trace, other_trace_id=ctx.trace_id,
                        )
                else:
                    in_formats = {c.format for c in inbound.contexts}
                    if in_formats.isdisjoint(c.format for c in out):
                        for ctx in same:
                            was = next(iter(in_formats))
                            self._report(
                                obs, seen, "format_changed", FORMAT_HEADER[ctx.format],
                                f"format_changed.{was}_to_{ctx.format}", label,
                                trace_id=ctx.trace_id,
                            )
                    for ctx in same:
                        ref = _reference(inbound.contexts, ctx)
                        if (
                            ref is not None
                            and ref.sampled is not None
                            and ctx.sampled is not None
                            and ref.sampled != ctx.sampled
                        ):
                            turn = "sampled_to_unsampled" if ref.sampled else "unsampled_to_sampled"
                            self._report(
                                obs, seen, "sampling_flipped", FORMAT_HEADER[ctx.format],
                                f"sampling_flipped.{turn}", label, trace_id=ctx.trace_id,
                            )
        if inbound.malformed:
            out_malformed = {f.header for f in v.findings if f.kind == _MALFORMED}
            for header, hashes in inbound.malformed.items():
                if header not in out_malformed:
                    continue
                if any(self._hash(x) in hashes for x in self._values(obs, header)):
                    self._report(
                        obs, seen, "malformed_forwarded", header, "malformed_forwarded.unchanged",
                        label, trace_id=in_trace,
                    )

    # -- client side: responses ---------------------------------------------------------------
    def _inbound_response(self, obs: Observation) -> None:
        msg = obs.message
        if msg.informational:
            return
        proc = self._proc(obs.tgid, create=False)
        if proc is None:
            return
        conn = proc.clients.get(obs.fd)
        if conn is None:
            return
        if msg.stream_id is None:
            if conn.answered >= conn.sent:
                return  # an answer to a request sent before we watched
            conn.answered += 1
            key = conn.answered
        else:
            key = msg.stream_id
        if not conn.oversized:
            return
        pending = conn.oversized.pop(key, None)
        if pending is None or msg.status not in REJECT_STATUSES:
            return
        headers, label, trace_id = pending
        seen: set[tuple[str, str]] = set()
        for header in headers:
            self._report(
                obs, seen, "oversized_rejected", header, f"oversized_rejected.status_{msg.status}",
                label, trace_id=trace_id,
            )

    # -- egress -------------------------------------------------------------------------------
    @staticmethod
    def _header_names(obs: Observation) -> list[str]:
        msg = obs.message
        return list(dict.fromkeys(n for n, _ in (*msg.headers, *msg.inferred_headers)))

    def _leak(self, obs: Observation, dest: Destination, seen: set[tuple[str, str]]) -> None:
        if self._dest_allowed(dest) is not False:
            return
        names = self._header_names(obs)
        if not names:
            return
        reason = {
            "direct": "leak.destination_not_allowed",
            "proxy": "leak.proxy_target_not_allowed",
            "connect": "leak.connect_target_not_allowed",
            "tunnel": "leak.tunnel_target_not_allowed",
        }[dest.via]
        trace_id = _first_trace_id(obs.verdict)
        for name in names:
            self._report(
                obs, seen, "leak", name, reason, dest.label,
                trace_id=trace_id, destination=dest.label, via=dest.via,
            )

    # -- output -------------------------------------------------------------------------------
    def _report(
        self,
        obs: Observation,
        seen: set[tuple[str, str]],
        finding: str,
        header: str,
        reason: str,
        peer: str,
        *,
        trace_id: str | None = None,
        other_trace_id: str | None = None,
        destination: str | None = None,
        via: str | None = None,
    ) -> None:
        key = (finding, header)
        if key in seen:
            return
        seen.add(key)
        m = self.metrics
        m.findings.labels(finding, header, m.process_label(obs.process), m.peer_label(peer)).inc()
        if self.audit is not None:
            try:
                if obs.local is None and self.resolve_local is not None:
                    obs = self.resolve_local(obs)
                self.audit.hop_finding(
                    HopFinding(finding, header, reason, obs, trace_id, other_trace_id,
                               destination, via)
                )
            except Exception:  # an audit bug must not stop the analysis
                log.exception("audit sink failed")


def _first_trace_id(v: Verdict) -> str | None:
    for ctx in (v.w3c, v.b3):
        if ctx is not None:
            return ctx.trace_id
    return None


_ZERO_HIGH = "0" * 16


def _same_trace(a: str, b: str) -> bool:
    """Equal ids; a 64-bit B3 id (zero high half once padded) names the low 64 bits."""
    if a == b:
        return True
    return (a.startswith(_ZERO_HIGH) or b.startswith(_ZERO_HIGH)) and a[16:] == b[16:]


def _any_same(a: Iterable[str], b: Iterable[str]) -> bool:
    bs = tuple(b)
    return any(_same_trace(x, y) for x in a for y in bs)


def _reference(inbound: tuple[TraceContext, ...], ctx: TraceContext) -> TraceContext | None:
    """The inbound context an outbound one continues: same format first, same trace id."""
    same_id = [c for c in inbound if _same_trace(c.trace_id, ctx.trace_id)]
    for c in same_id:
        if c.format == ctx.format:
            return c
    return same_id[0] if same_id else None
