"""Prometheus metrics: one registry built when the daemon is wired, passed explicitly.

Counters for what Python processes; a custom collector for kernel-side state read at
scrape time (prometheus/client_python habits). Label values that come from traffic
(process, peer) go through a `LabelCap`: the number of distinct values is bounded, the
rest lands in ``other``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ._compat import SLOTS

__all__ = ["OVERFLOW_LABEL", "FastCounter", "KernelStatsCollector", "LabelCap", "Metrics"]

OVERFLOW_LABEL = "other"


class LabelCap:
    """Admits at most `limit` distinct values; later new values map to ``other``."""

    __slots__ = ("_limit", "_seen", "overflowed")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self.overflowed = 0

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        self.overflowed += 1
        return OVERFLOW_LABEL

    def __len__(self) -> int:
        return len(self._seen)


class _CounterChild:
    """One labelled series: a plain number the loop thread adds to (no lock: one writer,
    and the scrape thread's read of an int or float is atomic under the GIL)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class FastCounter(Collector):
    """A counter for the per-message hot path, exposed by a custom collector.

    ``prometheus_client.Counter`` takes a lock and validates on every ``inc`` (~0.7 µs, three
    or more per message); this keeps one plain number per label set and yields the family at
    scrape time. Same surface as the Counter subset the daemon uses: ``labels(*values)``
    returns a child with ``inc(amount=1)``; an unlabelled counter has ``inc`` itself.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name.removesuffix("_total")
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}
        if not self._labelnames:
            self._children[()] = self._only = _CounterChild()
        registry.register(self)

    def labels(self, *values: str) -> _CounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            key = tuple(str(v) for v in values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _CounterChild()
            self._children[values] = child
        return child

    def inc(self, amount: float = 1) -> None:
        if self._labelnames:
            raise ValueError(f"{self._name}: counter has labels {self._labelnames}")
        self._only.inc(amount)

    def value(self, *values: str) -> float:
        """The current value of one label set (0 when never incremented)."""
        child = self._children.get(tuple(str(v) for v in values))
        return child.value if child is not None else 0

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._doc, labels=list(self._labelnames))

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = self._family()
        seen: set[int] = set()
        for key, child in list(self._children.items()):
            if id(child) in seen:  # a child is also kept under its un-stringified key
                continue
            seen.add(id(child))
            family.add_metric(list(key), child.value)
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield self._family()


@dataclass(frozen=True, **SLOTS)
class KernelStat:
    name: str  # metric name without the hopwatch_ prefix
    doc: str
    kind: str  # "counter" | "gauge"


class KernelStatsCollector(Collector):
    """Yields the capture path's counters (BPF maps, connection table) at scrape time.

    `read` returns {metric name: value or {label value: value}}; labelled families use the
    label name given in `labels`.
    """

    def __init__(
        self,
        read: Callable[[], Mapping[str, float | Mapping[str, float]]],
        docs: Mapping[str, tuple[str, str, str | None]],
    ) -> None:
        # docs: metric name -> (kind, help, label name or None)
        self._read = read
        self._docs = docs

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        values = self._read()
        for name, (kind, doc, label) in self._docs.items():
            value = values.get(name)
            if value is None:
                continue
            full = f"hopwatch_{name}"
            if kind == "counter":
                family: CounterMetricFamily | GaugeMetricFamily = CounterMetricFamily(
                    full.removesuffix("_total"), doc, labels=[label] if label else None
                )
            else:
                family = GaugeMetricFamily(full, doc, labels=[label] if label else None)
            if isinstance(value, Mapping):
                for label_value, v in sorted(value.items()):
                    family.add_metric([label_value], v)
            else:
                family.add_metric([], value)
            yield family

    def describe(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        return []


class Metrics:
    """Every metric the pipeline updates, on one explicit registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_process_labels: int = 200,
        max_peer_labels: int = 500,
    ) -> None:
        disable_created_metrics()  # *_created series double the output and say nothing here
        self.registry = registry if registry is not None else CollectorRegistry()
        self.process_label = LabelCap(max_process_labels)
        self.peer_label = LabelCap(max_peer_labels)
        r = self.registry
        self.messages = FastCounter(
            "hopwatch_http_messages",
            "HTTP messages observed, by direction seen from the observed process, kind, "
            "protocol and the trace context they carry (w3c, b3, both, none).",
            ["direction", "kind", "protocol", "context", "process"],
            registry=r,
        )
        self.findings = FastCounter(
            "hopwatch_findings",
            "Trace-context findings; one message adds at most 1 per (finding, header).",
            ["finding", "header", "process", "peer"],
            registry=r,
        )
        self.parse_errors = FastCounter(
            "hopwatch_parse_errors",
            "Bytes the stream parsers could not parse, by protocol and reason code.",
            ["protocol", "code"],
            registry=r,
        )
        self.desyncs = FastCounter(
            "hopwatch_stream_desyncs",
            "Times a stream parser lost its place (gap, garbage, HPACK failure).",
            ["protocol", "reason"],
            registry=r,
        )
        self.gap_bytes = FastCounter(
            "hopwatch_stream_gap_bytes",
            "Bytes of HTTP streams the parsers never saw (copy cap, lost events).",
            registry=r,
        )
        self.chunks = FastCounter(
            "hopwatch_capture_chunks",
            "Syscall payloads delivered to the pipeline.",
            ["direction"],
            registry=r,
        )
        self.bytes = FastCounter(
            "hopwatch_capture_bytes",
            "Payload bytes delivered to the pipeline.",
            ["direction"],
            registry=r,
        )
        self.unknown_fd = FastCounter(
            "hopwatch_unknown_fd_chunks",
            "Data on descriptors that are not (or no longer) tracked inet sockets.",
            registry=r,
        )
        self.not_http = FastCounter(
            "hopwatch_non_http_connections",
            "Tracked connections whose first bytes were not HTTP (then ignored).",
            registry=r,
        )
        self.label_overflow = FastCounter(
            "hopwatch_label_overflow",
            "Label values folded into 'other' because a label's cap was reached.",
            ["label"],
            registry=r,
        )
        # Hop analysis (hops.py) and the audit log (audit.py).
        self.hops = FastCounter(
            "hopwatch_hops",
            "Outbound requests attributed to the inbound request they serve, by the trace "
            "context each carried (w3c, b3, both, none): the B3-to-W3C migration view.",
            ["process", "peer", "inbound_context", "outbound_context"],
            registry=r,
        )
        self.unattributed = FastCounter(
            "hopwatch_unattributed_requests",
            "Outbound requests of a process with open inbound requests that could not be "
            "attributed to one of them (never guessed).",
            ["process"],
            registry=r,
        )
        self.hop_evictions = FastCounter(
            "hopwatch_hop_state_evictions",
            "Hop-analysis state dropped before completion, by reason (process_cap, open_cap, "
            "connection_cap, pending_cap, expired).",
            ["reason"],
            registry=r,
        )
        self.audit_lines = FastCounter(
            "hopwatch_audit_lines",
            "Lines written to the audit log.",
            registry=r,
        )
        self.audit_write_errors = FastCounter(
            "hopwatch_audit_write_errors",
            "Audit-log lines that could not be written (disk full, unwritable); the "
            "daemon keeps running.",
            registry=r,
        )
        self.audit_rotations = FastCounter(
            "hopwatch_audit_rotations",
            "Size-based rotations of the audit log.",
            registry=r,
        )
        self.up = Gauge(
            "hopwatch_capture_attached",
            "1 while the eBPF programs are loaded and attached.",
            registry=r,
        )

    def overflow_check(self) -> None:
        """Move LabelCap overflow counts into the counter (called once per poll loop)."""
        for name, cap in (("process", self.process_label), ("peer", self.peer_label)):
            if cap.overflowed:
                self.label_overflow.labels(name).inc(cap.overflowed)
                cap.overflowed = 0
