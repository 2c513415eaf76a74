"""`hopwatch trace`: follow one synthetic trace id through every hop on this node.

Theory of operation
-------------------
The command sends a request carrying a freshly generated trace context (`Probe`) while a
short-lived capture runs (the daemon's own wiring: capture -> pipeline -> hop analyzer).
`TraceRecorder` sits in that wiring twice: as a pipeline observer it keeps the messages
that concern a watched trace id, and as the hop analyzer's `FindingSink` it keeps the hop
findings about it. Nothing here touches the kernel or the network; `build_report` turns
what was recorded into a `TraceReport` (a tree of hops) that `render_tree` and
`report_json` print.

What is recorded, per watched trace id:

* *hops*: inbound requests that carry the trace id (any format; a 64-bit B3 id matches
  the low half). A hop stays *open* until its process writes the response on the same
  connection (and HTTP/2 stream): outbound requests are only attributed to open hops.
* *edges*: outbound requests that carry the trace id, and the outbound requests the hop
  analyzer blamed on a hop of the trace (``stripped``, ``restarted``: those carry no
  context or another trace id, so only the analyzer's attribution ties them to it).
  Every finding about an edge (``leak``, ``format_changed``, ``sampling_flipped`` ...)
  is attached to it.
* every inbound request seen meanwhile (bounded), to find who received an edge that no
  longer carries the trace id: the receiving socket is the sending socket mirrored
  (local and peer addresses swapped).

The tree: the probe request is the root edge (known locally: its socket addresses are
ours, even when TLS hides it from the capture). An edge's receiver is the inbound request
on the mirrored socket; a hop's children are the edges attributed to it. Hops that carry
the trace id but whose arriving edge was not seen (an uncaptured TLS hop, a message queue)
hang under the root, marked ``unobserved``.

Outcome: ``broken`` when some edge stripped or restarted the context (or its receiver got
the request without the trace id); else ``flagged`` when an edge leaked it to a
non-allowlisted destination or changed its format or sampling decision; else
``survived``. ``not_observed`` when no process on this node was seen receiving it,
``request_failed`` when the probe got no response and nothing was seen.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hopwatch.capture._types import SockAddr
from hopwatch.hops import HopFinding, destination_of
from hopwatch.pipeline import Observation
from hopwatch.propagation import TraceContext, Verdict

from ._compat import SLOTS

__all__ = [
    "BREAK_FINDINGS",
    "EXIT_BROKEN",
    "EXIT_FLAGGED",
    "EXIT_NOT_FOLLOWED",
    "EXIT_OK",
    "EXIT_USAGE",
    "FLAG_FINDINGS",
    "JSON_SCHEMA",
    "TRACE_ID_PREFIX",
    "Edge",
    "Hop",
    "Probe",
    "ProbeResult",
    "Recorded",
    "TraceRecorder",
    "TraceReport",
    "build_report",
    "combined_exit",
    "new_probe",
    "render_tree",
    "report_json",
]

#: Every probe trace id starts with this ("h0pwatch", roughly): grep for it in your tracing
#: backend. The remaining 24 hex digits are random.
TRACE_ID_PREFIX = "4077a7c4"
JSON_SCHEMA = "hopwatch.trace/1"

EXIT_OK = 0  # the context reached every hop on this node intact
EXIT_BROKEN = 1  # stripped or restarted somewhere (or a hop received it without the id)
EXIT_USAGE = 2  # bad options, not root, capture could not start
EXIT_NOT_FOLLOWED = 3  # the request failed, or no process on this node received it
EXIT_FLAGGED = 4  # survived, but leaked to a non-allowlisted host or converted / flipped

#: Findings that break the chain, and findings that only flag it.
BREAK_FINDINGS = frozenset({"stripped", "restarted"})
FLAG_FINDINGS = frozenset({"leak", "format_changed", "sampling_flipped", "malformed_forwarded"})

_OUTCOME_EXIT = {
    "survived": EXIT_OK,
    "broken": EXIT_BROKEN,
    "flagged": EXIT_FLAGGED,
    "not_observed": EXIT_NOT_FOLLOWED,
    "request_failed": EXIT_NOT_FOLLOWED,
}
# --count: the exit status of the worst request, in this order.
_EXIT_RANK = (EXIT_BROKEN, EXIT_NOT_FOLLOWED, EXIT_FLAGGED, EXIT_OK)

_ZERO_HIGH = "0" * 16


def _same_trace(a: str, b: str) -> bool:
    """Equal ids; a 64-bit B3 id (zero high half once padded) names the low 64 bits."""
    if a == b:
        return True
    return (a.startswith(_ZERO_HIGH) or b.startswith(_ZERO_HIGH)) and a[16:] == b[16:]


def _short(trace_id: str) -> str:
    """Another trace id (not ours) is shown truncated, never in full."""
    return trace_id[:8] + "…"


# -- the probe ----------------------------------------------------------------------------------


@dataclass(frozen=True, **SLOTS)
class Probe:
    """The trace context one probe request carries (same ids in every format)."""

    trace_id: str
    span_id: str
    formats: tuple[str, ...]  # ("w3c",), ("b3",) or ("w3c", "b3")
    sampled: bool = True

    def headers(self) -> list[tuple[str, str]]:
        flag = "01" if self.sampled else "00"
        out: list[tuple[str, str]] = []
        if "w3c" in self.formats:
            out.append(("traceparent", f"00-{self.trace_id}-{self.span_id}-{flag}"))
        if "b3" in self.formats:
            out.append(("b3", f"{self.trace_id}-{self.span_id}-{int(self.sampled)}"))
        return out


def new_probe(fmt: str) -> Probe:
    """A fresh probe context; ``fmt`` is ``w3c``, ``b3`` or ``both``."""
    formats = {"w3c": ("w3c",), "b3": ("b3",), "both": ("w3c", "b3")}[fmt]
    span = secrets.token_hex(8)
    while span == "0" * 16:
        span = secrets.token_hex(8)
    return Probe(TRACE_ID_PREFIX + secrets.token_hex(12), span, formats)


@dataclass(frozen=True, **SLOTS)
class ProbeResult:
    """What the probe request itself did (known locally, captured or not)."""

    url: str
    method: str
    protocol: str  # "http1" | "http2"
    tls: bool
    local: SockAddr | None
    peer: SockAddr | None
    authority: str
    path: str
    status: int | None = None
    error: str | None = None
    elapsed_ms: float | None = None


# -- recording ----------------------------------------------------------------------------------


def _contexts(v: Verdict) -> tuple[TraceContext, ...]:
    return tuple(c for c in (v.w3c, v.b3) if c is not None)


def _carries(v: Verdict, trace_id: str) -> bool:
    return any(_same_trace(c.trace_id, trace_id) for c in _contexts(v))


ObsKey = tuple[int, int, str, int, Optional[int]]


def _key(obs: Observation) -> ObsKey:
    return (obs.tgid, obs.fd, obs.direction, obs.ts_ns, obs.message.stream_id)


@dataclass(**SLOTS)
class Recorded:
    """Everything captured about one trace id (a copy: safe to read off the loop thread)."""

    trace_id: str
    hops: list[Observation] = field(default_factory=list)  # inbound, carrying the id
    edges: list[Observation] = field(default_factory=list)  # outbound requests, see module
    edge_parent: dict[ObsKey, ObsKey | None] = field(default_factory=dict)  # -> hop key
    findings: list[HopFinding] = field(default_factory=list)
    inbound: list[Observation] = field(default_factory=list)  # all inbound requests seen
    answered: set[ObsKey] = field(default_factory=set)  # hops whose response was written


@dataclass(**SLOTS)
class _Walk:
    rec: Recorded
    open: dict[int, list[Observation]] = field(default_factory=dict)  # tgid -> open hops
    last_activity: float = 0.0


class TraceRecorder:
    """Pipeline observer and hop-analyzer `FindingSink` for the watched trace ids.

    Called on the capture loop's thread; `recorded` and `settled` are called from others.
    """

    def __init__(self, max_inbound: int = 20000) -> None:
        self._lock = threading.Lock()
        self._walks: dict[str, _Walk] = {}
        self._inbound: deque[Observation] = deque(maxlen=max_inbound)

    # -- control ---------------------------------------------------------------------------
    def watch(self, trace_id: str) -> None:
        with self._lock:
            self._walks[trace_id] = _Walk(Recorded(trace_id), last_activity=time.monotonic())

    def recorded(self, trace_id: str, *, forget: bool = False) -> Recorded:
        with self._lock:
            walk = self._walks.pop(trace_id) if forget else self._walks[trace_id]
            rec = walk.rec
            first = min((o.ts_ns for o in rec.hops), default=0)
            return Recorded(
                trace_id,
                list(rec.hops),
                list(rec.edges),
                dict(rec.edge_parent),
                list(rec.findings),
                [o for o in self._inbound if o.ts_ns >= first] if rec.hops else [],
                set(rec.answered),
            )

    def settled(self, trace_id: str, quiet: float) -> bool:
        """Some hop received the trace, every such hop has answered, and nothing about
        the trace happened for ``quiet`` seconds."""
        with self._lock:
            walk = self._walks[trace_id]
            rec = walk.rec
            if not rec.hops or any(_key(h) not in rec.answered for h in rec.hops):
                return False
            return time.monotonic() - walk.last_activity >= quiet

    # -- observer --------------------------------------------------------------------------
    def __call__(self, obs: Observation) -> None:
        msg = obs.message
        with self._lock:
            if not self._walks:
                return
            if obs.direction == "inbound":
                if msg.is_request:
                    self._inbound.append(obs)
                    for tid, walk in self._walks.items():
                        if _carries(obs.verdict, tid):
                            walk.rec.hops.append(obs)
                            walk.open.setdefault(obs.tgid, []).append(obs)
                            walk.last_activity = time.monotonic()
                return
            if not msg.is_request:
                if not msg.informational:
                    self._answered(obs)
                return
            for tid, walk in self._walks.items():
                if _carries(obs.verdict, tid):
                    self._edge(walk, obs)

    def _answered(self, obs: Observation) -> None:
        for walk in self._walks.values():
            hops = walk.open.get(obs.tgid)
            if not hops:
                continue
            for hop in hops:  # oldest first: HTTP/1 answers in order; HTTP/2 by stream
                if hop.fd == obs.fd and hop.message.stream_id == obs.message.stream_id:
                    hops.remove(hop)
                    walk.rec.answered.add(_key(hop))
                    walk.last_activity = time.monotonic()
                    break

    def _edge(self, walk: _Walk, obs: Observation) -> None:
        key = _key(obs)
        rec = walk.rec
        walk.last_activity = time.monotonic()
        if key in rec.edge_parent:
            return
        rec.edges.append(obs)
        rec.edge_parent[key] = self._parent(walk, obs)

    @staticmethod
    def _parent(walk: _Walk, obs: Observation) -> ObsKey | None:
        """The hop an outbound request serves: an open hop of its process, the one its
        thread read first; else the latest hop of that process (a send after the answer)."""
        open_hops = walk.open.get(obs.tgid) or []
        same_tid = [h for h in open_hops if h.tid == obs.tid]
        for choice in (same_tid, open_hops):
            if choice:
                return _key(choice[-1])
        earlier = [h for h in walk.rec.hops if h.tgid == obs.tgid and h.ts_ns <= obs.ts_ns]
        return _key(earlier[-1]) if earlier else None

    # -- finding sink ----------------------------------------------------------------------
    def hop_finding(self, finding: HopFinding) -> None:
        with self._lock:
            for tid, walk in self._walks.items():
                ids = [i for i in (finding.trace_id, finding.other_trace_id) if i]
                mine = any(_same_trace(i, tid) for i in ids)
                if not mine and finding.reason == "restarted.orphan":
                    # No attribution: ours only if a hop of the trace is open there.
                    mine = bool(walk.open.get(finding.obs.tgid))
                if not mine:
                    continue
                walk.rec.findings.append(finding)
                obs = finding.obs
                if obs.direction == "outbound" and obs.message.is_request:
                    self._edge(walk, obs)


# -- the report ---------------------------------------------------------------------------------


def _addr(a: SockAddr | None) -> str | None:
    return str(a) if a is not None else None


def _norm(a: SockAddr | None) -> tuple[str, int] | None:
    if a is None:
        return None
    try:
        ip = ipaddress.ip_address(a.host)
    except ValueError:
        return (a.host, a.port)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), a.port)


def _context_label(formats: Sequence[str]) -> str:
    """For people: ``w3c+b3``."""
    return "+".join(formats) if formats else "none"


def _context_name(formats: Sequence[str]) -> str:
    """For machines, as the metrics say it: ``w3c``, ``b3``, ``both`` or ``none``."""
    if len(formats) > 1:
        return "both"
    return formats[0] if formats else "none"


@dataclass(**SLOTS)
class Problem:
    severity: str  # "break" | "flag"
    finding: str  # stripped, restarted, no_context, leak, format_changed, ...
    hop: int | None  # the hop that sent the edge (None: the probe)
    to_hop: int | None
    destination: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "finding": self.finding,
            "hop": self.hop,
            "to_hop": self.to_hop,
            "destination": self.destination,
            "detail": self.detail,
        }


@dataclass(**SLOTS)
class Edge:
    """A request on the trace's path: the probe (``sender`` None) or an outbound one."""

    sender: int | None  # hop index; None: the probe request
    protocol: str
    method: str | None
    path: str | None
    destination: str
    formats: tuple[str, ...]  # the trace-context formats it carried
    carries_trace: bool
    other_trace_id: str | None = None  # truncated: the trace id it carried instead
    findings: list[dict[str, str]] = field(default_factory=list)
    receiver: int | None = None  # hop index
    ts_ns: int = 0
    source: Observation | None = field(default=None, repr=False)
    problems: list[Problem] = field(default_factory=list, repr=False)

    def problem(self, severity: str, finding: str, detail: str) -> Problem:
        p = Problem(severity, finding, self.sender, self.receiver, self.destination, detail)
        self.problems.append(p)
        return p

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "method": self.method,
            "path": self.path,
            "destination": self.destination,
            "context": _context_name(self.formats),
            "carries_trace": self.carries_trace,
            "other_trace_id": self.other_trace_id,
            "findings": list(self.findings),
            "to_hop": self.receiver,
        }


@dataclass(**SLOTS)
class Hop:
    """A process that received a request on the trace's path."""

    index: int
    parent: int | None  # the hop that sent the request; None: the probe
    depth: int
    pid: int
    comm: str
    process: str
    protocol: str | None
    method: str | None
    path: str | None
    authority: str | None
    local: str | None
    peer: str | None
    formats: tuple[str, ...]
    carries_trace: bool
    arrived: str  # "probe" | "observed" (an edge we saw) | "unobserved"
    other_trace_id: str | None = None
    outbound: list[Edge] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "parent": self.parent,
            "depth": self.depth,
            "pid": self.pid,
            "comm": self.comm,
            "process": self.process,
            "protocol": self.protocol,
            "method": self.method,
            "path": self.path,
            "authority": self.authority,
            "local": self.local,
            "peer": self.peer,
            "context": _context_name(self.formats),
            "carries_trace": self.carries_trace,
            "other_trace_id": self.other_trace_id,
            "arrived": self.arrived,
            "outbound": [e.as_dict() for e in self.outbound],
        }


@dataclass(**SLOTS)
class TraceReport:
    probe: Probe
    request: ProbeResult
    root: Edge
    hops: list[Hop]
    problems: list[Problem]
    outcome: str

    @property
    def exit_code(self) -> int:
        return _OUTCOME_EXIT[self.outcome]

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "trace_id": self.probe.trace_id,
            "span_id": self.probe.span_id,
            "formats": list(self.probe.formats),
            "request": {
                "method": r.method,
                "url": r.url,
                "protocol": r.protocol,
                "tls": r.tls,
                "local": _addr(r.local),
                "peer": _addr(r.peer),
                "status": r.status,
                "error": r.error,
                "elapsed_ms": r.elapsed_ms,
                "headers": dict(self.probe.headers()),
                "to_hop": self.root.receiver,
            },
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "problems": [p.as_dict() for p in self.problems],
            "hops": [h.as_dict() for h in self.hops],
        }


def _formats(v: Verdict) -> tuple[str, ...]:
    return tuple(c.format for c in _contexts(v))


def _edge_of(obs: Observation, trace_id: str, sender: int | None) -> Edge:
    v = obs.verdict
    carries = _carries(v, trace_id)
    other = next((c.trace_id for c in _contexts(v) if not carries), None)
    return Edge(
        sender=sender,
        protocol=obs.message.protocol,
        method=obs.message.method,
        path=obs.message.path,
        destination=destination_of(obs).label,
        formats=_formats(v),
        carries_trace=carries,
        other_trace_id=_short(other) if other else None,
        ts_ns=obs.ts_ns,
        source=obs,
    )


def _finding_detail(f: HopFinding, sender: str) -> str:
    kind = f.finding
    if kind == "stripped":
        return f"{sender} sent this request without any trace context"
    if kind == "restarted":
        return f"{sender} started a new trace instead of continuing this one"
    if kind == "leak":
        return f"trace context sent to {f.destination or 'a host'} outside the egress allowlist"
    if kind == "format_changed":
        turn = f.reason.split(".", 1)[-1].replace("_", " ")
        return f"{sender} converted the context ({turn})"
    if kind == "sampling_flipped":
        return f"{sender} changed the sampling decision"
    return f"{sender}: {f.reason}"


def _name(pid: int, comm: str, process: str) -> str:
    base = f"{comm or process or '?'}[{pid}]"
    return base if not process or process in (comm, "unknown") else f"{base} ({process})"


class _Builder:
    """Links what the recorder kept into the hop tree (see the module docstring)."""

    def __init__(
        self, probe: Probe, rec: Recorded, listens: Callable[[int], Container[int]] | None
    ) -> None:
        self.tid = probe.trace_id
        self.listens = listens
        self._listening: dict[int, Container[int]] = {}
        self.hops: list[Hop] = []
        self.hop_obs: list[Observation | None] = []
        self.linked: set[ObsKey] = set()
        self.children: dict[ObsKey | None, list[Observation]] = {}
        for e in sorted(rec.edges, key=lambda o: o.ts_ns):
            self.children.setdefault(rec.edge_parent.get(_key(e)), []).append(e)
        # Receiving ends of edges: inbound requests, oldest first, and by their peer (the
        # sender's local address: unique on the node while the connection lives).
        unique = {_key(o): o for o in (*rec.inbound, *rec.hops)}
        self.inbound = sorted(unique.values(), key=lambda o: o.ts_ns)
        self.by_peer: dict[tuple[str, int] | None, list[Observation]] = {}
        for obs in self.inbound:
            self.by_peer.setdefault(_norm(obs.peer), []).append(obs)

    def _listens_on(self, obs: Observation, port: int) -> bool:
        """The receiving process of ``obs`` listens on ``port`` (its local address when
        the capture knew it, else the process's listening sockets)."""
        if obs.local is not None:
            return obs.local.port == port
        if self.listens is None:
            return False
        ports = self._listening.get(obs.tgid)
        if ports is None:
            ports = self._listening[obs.tgid] = self.listens(obs.tgid)
        return port in ports

    def receiver_of(
        self,
        local: SockAddr | None,
        peer: SockAddr | None,
        stream: int | None,
        ts: int,
        ours: bool,
    ) -> Observation | None:
        """The inbound request at the other end of an edge (same HTTP/2 stream).

        Exact when the sender's local address is known: the receiver's peer is that address
        (the probe's own socket, or a connection the capture resolved). Else the first
        request after the edge, read by a process listening on the edge's destination port
        (confirmed by the trace id when the edge carries it).
        """
        want = _norm(peer)
        if local is not None:
            pool = self.by_peer.get(_norm(local), [])
            match = [o for o in pool if o.local is None or _norm(o.local) == want]
        elif peer is not None:
            match = [o for o in self.inbound if self._listens_on(o, peer.port)]
        else:
            return None
        cands = [o for o in match if _key(o) not in self.linked and o.message.stream_id == stream]
        if ours:
            cands = [o for o in cands if _carries(o.verdict, self.tid)] or cands
        later = [o for o in cands if o.ts_ns >= ts]
        pick = later or cands
        return pick[0] if pick else None

    def add_hop(
        self,
        obs: Observation | None,
        parent: int | None,
        arrived: str,
        tgid: int = 0,
        comm: str = "",
        process: str = "",
        reached_at: SockAddr | None = None,
    ) -> int:
        """``reached_at``: the edge's peer, the receiver's local address by construction."""
        if obs is None:  # a process that sent the trace on but was not seen receiving it
            hop = Hop(
                index=len(self.hops),
                parent=parent,
                depth=0,
                pid=tgid,
                comm=comm,
                process=process,
                protocol=None,
                method=None,
                path=None,
                authority=None,
                local=None,
                peer=None,
                formats=(),
                carries_trace=False,
                arrived=arrived,
            )
        else:
            v = obs.verdict
            carries = _carries(v, self.tid)
            other = next((c.trace_id for c in _contexts(v) if not carries), None)
            msg = obs.message
            hop = Hop(
                index=len(self.hops),
                parent=parent,
                depth=0,
                pid=obs.tgid,
                comm=obs.comm,
                process=obs.process,
                protocol=msg.protocol,
                method=msg.method,
                path=msg.path,
                authority=msg.authority,
                local=_addr(obs.local or reached_at),
                peer=_addr(obs.peer),
                formats=_formats(v),
                carries_trace=carries,
                arrived=arrived,
                other_trace_id=_short(other) if other else None,
            )
            self.linked.add(_key(obs))
        self.hops.append(hop)
        self.hop_obs.append(obs)
        return hop.index

    def follow(self, index: int, outs: Iterable[Observation]) -> None:
        """Add hop ``index``'s edges and, depth first, the hops they reached."""
        for out in outs:
            edge = _edge_of(out, self.tid, index)
            self.hops[index].outbound.append(edge)
            recv = self.receiver_of(
                out.local, out.peer, out.message.stream_id, out.ts_ns, edge.carries_trace
            )
            if recv is not None:
                edge.receiver = self.add_hop(recv, index, "observed", reached_at=out.peer)
                self.follow(edge.receiver, self.children.get(_key(recv), []))


def build_report(
    probe: Probe,
    request: ProbeResult,
    rec: Recorded,
    listens: Callable[[int], Container[int]] | None = None,
) -> TraceReport:
    """The hop tree of one probe from what the recorder kept (see the module docstring).

    ``listens(pid)``: the ports ``pid`` listens on, to find an edge's receiver when the
    capture did not learn the sender's local address (it reads /proc lazily).
    """
    b = _Builder(probe, rec, listens)
    root = Edge(
        sender=None,
        protocol=request.protocol,
        method=request.method,
        path=request.path,
        destination=request.authority,
        formats=probe.formats,
        carries_trace=True,
    )
    # The probe's own socket is known locally: its receiver is the mirrored inbound.
    if request.local is not None:
        stream = 1 if request.protocol == "http2" else None
        first = b.receiver_of(request.local, request.peer, stream, 0, True)
        if first is not None:
            root.receiver = b.add_hop(first, None, "probe", reached_at=request.peer)
            b.follow(root.receiver, b.children.get(_key(first), []))
    # Hops carrying the trace that no seen edge reached (an uncaptured TLS hop, a queue).
    for obs in sorted(rec.hops, key=lambda o: o.ts_ns):
        if _key(obs) not in b.linked:
            i = b.add_hop(obs, None, "unobserved")
            b.follow(i, b.children.get(_key(obs), []))
    # Edges sent by a process never seen receiving the trace: one pseudo hop per process.
    hop_keys = {_key(h) for h in rec.hops}
    pseudo: dict[int, int] = {}
    for parent_key, outs in b.children.items():
        if parent_key is not None and parent_key in hop_keys:
            continue
        for out in outs:
            if out.tgid not in pseudo:
                pseudo[out.tgid] = b.add_hop(
                    None, None, "unobserved", out.tgid, out.comm, out.process
                )
            b.follow(pseudo[out.tgid], [out])

    hops = _preorder(b.hops, root)
    findings_of: dict[ObsKey, list[HopFinding]] = {}
    for f in rec.findings:
        findings_of.setdefault(_key(f.obs), []).append(f)
    problems: list[Problem] = []
    if root.receiver is not None and not hops[root.receiver].carries_trace:
        problems.append(
            root.problem(
                "break", "no_context", "the first hop received the probe without its trace id"
            )
        )
    for hop in hops:
        sender = _name(hop.pid, hop.comm, hop.process)
        for edge in hop.outbound:
            kinds: set[str] = set()
            for f in findings_of.get(_key(edge.source), []) if edge.source else []:
                edge.findings.append({"finding": f.finding, "header": f.header, "reason": f.reason})
                if f.finding not in kinds:
                    kinds.add(f.finding)
                    sev = "break" if f.finding in BREAK_FINDINGS else "flag"
                    problems.append(edge.problem(sev, f.finding, _finding_detail(f, sender)))
            recv = hops[edge.receiver] if edge.receiver is not None else None
            if recv is not None and not recv.carries_trace and not kinds & BREAK_FINDINGS:
                problems.append(
                    edge.problem(
                        "break",
                        "no_context",
                        f"{_name(recv.pid, recv.comm, recv.process)} received the request "
                        "without this trace id",
                    )
                )
    if any(p.severity == "break" for p in problems):
        outcome = "broken"
    elif not any(h.carries_trace for h in hops):
        outcome = "request_failed" if request.status is None else "not_observed"
    elif problems:
        outcome = "flagged"
    else:
        outcome = "survived"
    return TraceReport(probe, request, root, hops, problems, outcome)


def _preorder(hops: list[Hop], root: Edge) -> list[Hop]:
    """Renumber the hops depth first (the order a person reads the tree in)."""
    order: list[Hop] = []
    by_index = {h.index: h for h in hops}

    def visit(h: Hop, depth: int) -> None:
        h.depth = depth
        order.append(h)
        for e in h.outbound:
            if e.receiver is not None:
                visit(by_index[e.receiver], depth + 1)

    for h in hops:
        if h.parent is None:
            visit(h, 0)
    new = {h.index: i for i, h in enumerate(order)}
    for h in order:
        h.index = new[h.index]
        h.parent = new[h.parent] if h.parent is not None else None
        for e in h.outbound:
            e.sender = h.index
            e.receiver = new[e.receiver] if e.receiver is not None else None
    root.receiver = new[root.receiver] if root.receiver is not None else None
    return order


# -- output -------------------------------------------------------------------------------------

_OUTCOME_TEXT = {
    "survived": "context SURVIVED every hop on this node",
    "broken": "context BROKEN",
    "flagged": "context survived, but FLAGGED",
    "not_observed": "NOT OBSERVED: no process on this node was seen receiving the probe "
    "(a remote host, or a TLS hop this capture cannot read)",
    "request_failed": "REQUEST FAILED: no response, and no process on this node received it",
}


def render_tree(report: TraceReport) -> str:
    """The hop chain as an indented tree: ✓ the context arrived, ✗ a break, ⚠ a flag."""
    r = report.request
    p = report.probe
    answer = f"{r.status}" if r.status is not None else f"no response ({r.error or 'error'})"
    took = f" in {r.elapsed_ms:.0f} ms" if r.elapsed_ms is not None else ""
    lines = [
        f"trace {p.trace_id}  ({_context_label(p.formats)}, span {p.span_id})",
        f"{r.method} {r.url}  {r.protocol}{' tls' if r.tls else ''}  → {answer}{took}",
        "hopwatch trace (this process)",
    ]
    by_index = {h.index: h for h in report.hops}

    def emit(prefix: str, last: bool, edge: Edge | None, hop: Hop | None) -> None:
        branch, cont = ("└─▶ ", "    ") if last else ("├─▶ ", "│   ")
        problems = edge.problems if edge is not None else []
        if any(pr.severity == "break" for pr in problems) or (
            hop is not None and not hop.carries_trace and hop.protocol is not None
        ):
            mark = "✗"
        elif any(pr.finding == "leak" for pr in problems):
            mark = "✗"
        elif problems:
            mark = "⚠"
        else:
            mark = "✓" if hop is None or hop.carries_trace or hop.protocol is None else "✗"
        if hop is None:
            assert edge is not None
            what = f"{edge.method or ''} {edge.path or ''}".strip()
            text = (
                f"{edge.destination}  {what}  {edge.protocol}  "
                f"{_ctx(edge.formats, edge.other_trace_id)}  (not observed on this node)"
            )
        else:
            text = _hop_text(hop, edge.destination if edge is not None else None)
        lines.append(f"{prefix}{branch}{mark} {text}")
        for pr in problems:
            sym = "✗" if pr.severity == "break" or pr.finding == "leak" else "⚠"
            lines.append(f"{prefix}{cont}  {sym} {pr.finding}: {pr.detail}")
        if hop is None:
            return
        for i, e in enumerate(hop.outbound):
            nxt = by_index[e.receiver] if e.receiver is not None else None
            emit(prefix + cont, i == len(hop.outbound) - 1, e, nxt)

    root_hop = by_index.get(report.root.receiver) if report.root.receiver is not None else None
    tops: list[tuple[Edge | None, Hop | None]] = [] if root_hop else [(report.root, None)]
    tops += [(report.root if h is root_hop else None, h) for h in report.hops if h.parent is None]
    for i, (e, h) in enumerate(tops):
        emit("", i == len(tops) - 1, e, h)

    summary = _OUTCOME_TEXT[report.outcome]
    breaks = [pr for pr in report.problems if pr.severity == "break"]
    shown = breaks or report.problems
    if shown:
        summary += ": " + "; ".join(_problem_text(report, pr) for pr in shown)
    lines.append(f"{summary}  (exit {report.exit_code})")
    return "\n".join(lines)


def _ctx(formats: tuple[str, ...], other: str | None) -> str:
    if not formats:
        return "no context"
    label = _context_label(formats)
    return f"{label} (other trace {other})" if other else label


def _hop_text(h: Hop, reached_at: str | None) -> str:
    name = _name(h.pid, h.comm, h.process)
    if h.protocol is None:
        return f"{name}  (sent the trace on; how it got it was not seen)"
    what = f"{h.method or ''} {h.path or ''}".strip()
    where = h.local or reached_at
    at = f" at {where}" if where else ""
    extra = "  (reached through a hop not seen)" if h.arrived == "unobserved" else ""
    return f"{name}{at}  {what}  {h.protocol}  {_ctx(h.formats, h.other_trace_id)}{extra}"


def _problem_text(report: TraceReport, pr: Problem) -> str:
    if pr.hop is None:
        where = "the probe request"
    else:
        h = report.hops[pr.hop]
        where = _name(h.pid, h.comm, h.process)
    return f"{pr.finding} at {where} → {pr.destination}"


def report_json(reports: Iterable[TraceReport]) -> str:
    """One JSON document for all probes (``--json``)."""
    rs = list(reports)
    return json.dumps(
        {
            "schema": JSON_SCHEMA,
            "exit_code": combined_exit(r.exit_code for r in rs),
            "traces": [r.as_dict() for r in rs],
        },
        indent=2,
    )


def combined_exit(codes: Iterable[int]) -> int:
    """``--count``: the worst request decides (broken, then not followed, then flagged)."""
    got = set(codes)
    for code in _EXIT_RANK:
        if code in got:
            return code
    return EXIT_OK
