"""The daemon: wire capture -> pipeline -> sinks, serve /metrics, stop cleanly.

Signal handlers only set flags; the loop checks them between polls (uvicorn habit).
SIGTERM/SIGINT: detach the programs, drain what the ring still holds, stop the metrics
server, exit 0. SIGHUP: reload the configuration file; a bad file keeps the running one.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from prometheus_client import PlatformCollector, start_http_server

from hopwatch._compat import PYPY
from hopwatch.audit import AuditError, AuditLog
from hopwatch.capture._types import DataChunk
from hopwatch.capture.live import rss_bytes, trim_heap
from hopwatch.config import Config, ConfigError, load_config, split_host_port
from hopwatch.conntrack import ConnectionTable
from hopwatch.hops import FindingSink, HopAnalyzer, HopFinding
from hopwatch.metrics import KernelStatsCollector, Metrics
from hopwatch.pipeline import Observer, Pipeline
from hopwatch.scheduling import IdleScheduling, Overload, budget_pause
from hopwatch.sdnotify import Notifier

__all__ = ["Daemon", "HeapSettle", "StartupError"]

log = logging.getLogger(__name__)

# Kernel-side and table counters exposed at scrape time: name -> (kind, help, label)
_STATS_DOCS: dict[str, tuple[str, str, str | None]] = {
    "events_lost_total": (
        "counter",
        "Capture events the kernel could not deliver, by reason (ring_full, ...).",
        "reason",
    ),
    "capture_kernel_events_total": ("counter", "Events the eBPF programs emitted.", None),
    "capture_kernel_bytes_total": ("counter", "Payload bytes the eBPF programs copied.", None),
    "capture_truncated_bytes_total": (
        "counter",
        "Bytes beyond the per-syscall copy cap, never copied (the parsers see a gap).",
        None,
    ),
    "capture_truncated_syscalls_total": (
        "counter",
        "Syscalls that moved more bytes than the per-syscall copy cap.",
        None,
    ),
    "capture_skipped_bytes_total": (
        "counter",
        "Body bytes the kernel did not copy because the parsers did not need them.",
        None,
    ),
    "capture_filtered_total": (
        "counter",
        "Syscalls not copied: pid/cgroup/port filters, not HTTP, or ignored connections.",
        "reason",
    ),
    "capture_unknown_fd_total": (
        "counter",
        "Untracked descriptors that wrote HTTP-looking bytes (checked in /proc).",
        None,
    ),
    "capture_kernel_connections": ("gauge", "Connections tracked in the kernel map.", None),
    "capture_ring_bytes": (
        "gauge",
        "Size of the ring buffer between the eBPF programs and the daemon ([capture] "
        "ring_buffer_bytes).",
        None,
    ),
    "capture_ring_backlog_bytes": (
        "gauge",
        "Bytes in the ring buffer not read yet (absent with libbpf's reader). Close to "
        "capture_ring_bytes, the kernel is about to shed records (events_lost_total "
        "reason=\"ring_full\").",
        None,
    ),
    "capture_tls_total": (
        "counter",
        "TLS capture: SSL calls reported (calls), of which the socket was unknown at return "
        "(unbound), socket syscalls of TLS connections not copied (ciphertext_syscalls), "
        "ciphertext kept from the parsers (ciphertext_chunks).",
        "event",
    ),
    "capture_tls_targets": (
        "gauge",
        "OpenSSL copies (libssl, binaries exporting SSL_*) the uprobes are attached to.",
        None,
    ),
    "capture_scheduling_yields_total": (
        "counter",
        "Times the analysis loop switched to SCHED_IDLE because the capture was shedding "
        "or the loop was busy ([capture] scheduling = \"idle\").",
        None,
    ),
    "capture_scheduling_boosts_total": (
        "counter",
        "Times the idle analysis loop starved (no iteration finished for 2 s) and was lifted "
        "to the ordinary policy.",
        None,
    ),
    "capture_shed_pause_seconds_total": (
        "counter",
        "Seconds the analysis loop paused to stay within [capture] shed_cpu_percent while "
        "overloaded.",
        None,
    ),
    "capture_overloaded": (
        "gauge",
        "1 while more than twice what the analysis loop can take on one CPU arrives, or more "
        "than once that goes unread while the kernel sheds: it analyses a sample, within "
        "[capture] shed_cpu_percent.",
        None,
    ),
    "capture_scheduling_idle": (
        "gauge",
        "1 while the analysis loop runs SCHED_IDLE (yielding the CPU to the workloads).",
        None,
    ),
    "connections_tracked": ("gauge", "Connections in the connection table.", None),
    "connections_total": ("counter", "Connection-table operations, by event.", "event"),
    "hop_open_requests": (
        "gauge",
        "Inbound requests open (head read, response not yet written) in hop analysis.",
        None,
    ),
    "hop_processes": ("gauge", "Processes with hop-analysis state.", None),
}


# The loop yields the CPU for this long after the capture last shed (ring full)...
_SHEDDING_S = 1.0
# ... unless this many connection events wait in the ring (a connection storm): ~1/20 of
# what the default ring holds.
_URGENT_BACKLOG = 10_000
# Records per poll while the traffic is far beyond the loop (``Overload``): ~10 ms of work,
# so that the CPU budget's pauses stay short and exact (a whole batch of 4,096 is ~80 ms,
# whose pause the 1 s cap cut short: ~7 % of a CPU instead of 5).
_OVERLOAD_BATCH = 512
# The share of one CPU above which the loop runs SCHED_IDLE even though it keeps up.
_BUSY_SHARE = 0.5
# HTTP/1 connections idle this long, between messages, give up their parser (~1.2 KB; a
# new one costs a few µs at their next request).
_REST_AFTER_NS = 1 * 10**9
_REST_EVERY_S = 1.0

_LOST_REASONS = (
    "ring_full",
    "conn_table_full",
    "stash_full",
    "incomplete_syscalls",
    "orphan_chunks",
    "tls_unbound_dropped",
)
_FILTER_REASONS = ("filtered", "sniff_rejected", "ignored")


class HeapSettle:
    """When a burst is over, one full garbage collection and a heap trim.

    A burst (a connection storm, a flood) leaves garbage that the collector takes only at
    its next major collection, and memory freed inside the heap or PyPy's arenas stays
    resident until then. A node at rest after a burst should not carry that. So every
    check (the loop's 5 s housekeeping) the loop asks :meth:`due`: true when the process
    grew by more than ``growth_bytes`` since it last settled and fewer than
    ``quiet_records`` ring records were read since the previous check (a busy loop is left
    to the collector: a full collection pauses the loop). Measured with 100,000
    connections opened in a storm: docs/performance.md ("Session 10").
    """

    def __init__(self, *, growth_bytes: int = 8 << 20, quiet_records: int = 5_000) -> None:
        self.growth_bytes = growth_bytes
        self.quiet_records = quiet_records
        self.baseline: int | None = None  # RSS after the last settle (or the lowest since)
        self._records = 0
        self.settles = 0

    def due(self, records_read: int, rss: int) -> bool:
        quiet = records_read - self._records < self.quiet_records
        self._records = records_read
        if self.baseline is None or rss < self.baseline:
            self.baseline = rss  # memory went back: measure growth from there
            return False
        return quiet and rss > self.baseline + self.growth_bytes

    def settled(self, rss: int) -> None:
        self.baseline = rss
        self.settles += 1


class _FindingTee:
    """Hands each hop finding to every sink; one failing sink does not starve the others."""

    def __init__(self, sinks: tuple[FindingSink, ...]) -> None:
        self.sinks = sinks

    def hop_finding(self, finding: HopFinding) -> None:
        for sink in self.sinks:
            try:
                sink.hop_finding(finding)
            except Exception:
                log.exception("finding sink %r failed", sink)


class _WarmUp(threading.Thread):
    """``hopwatch.warmup`` in a thread; the result is logged by whoever joins it (while
    bcc compiles, stderr is captured, so the thread itself stays quiet)."""

    def __init__(self, config: Config) -> None:
        super().__init__(name="hopwatch-warm-up", daemon=True)
        self.config = config
        self.result: Any = None  # hopwatch.warmup.WarmUp
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        from hopwatch.warmup import warm_up

        started = time.monotonic()
        try:
            self.result = warm_up(self.config)
        except Exception as exc:  # a warm-up that fails costs speed, never the daemon
            self.error = exc
        self.seconds = time.monotonic() - started

    def finish(self) -> None:
        self.join()
        if self.error is not None:
            log.error("warm-up failed (the JIT compiles on live traffic instead)",
                      exc_info=self.error)
        else:
            r = self.result
            log.info("warm-up: the JIT compiled the analysis path on %d synthetic records "
                     "(%d messages, %d findings) in %.1fs", r.records, r.messages, r.findings,
                     self.seconds)


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why and how to fix it."""


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        observers: tuple[Observer, ...] = (),
        on_ready: Callable[[], None] | None = None,
        finding_sinks: tuple[FindingSink, ...] = (),
        serve_metrics: bool = True,
        eager_local: bool = False,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics(
            max_process_labels=config.max_process_labels,
            max_peer_labels=config.max_peer_labels,
        )
        self.conns = ConnectionTable(
            max_entries=config.max_connections,
            on_drop=self._connection_dropped,
            eager_local=eager_local,
        )
        self.capture: Any = None
        self.pipeline: Pipeline | None = None
        self.hops: HopAnalyzer | None = None
        self.audit: AuditLog | None = None
        self._observers = observers
        self._on_ready = on_ready
        self._finding_sinks = finding_sinks  # besides the audit log (hopwatch trace)
        self._serve_metrics = serve_metrics  # False: no /metrics listener (hopwatch trace)
        self._stop = threading.Event()
        self.scheduling = IdleScheduling()
        self.shed_pause_s = 0.0  # paused to keep the CPU budget while shedding
        self.heap = HeapSettle()
        self.overload = Overload()
        self._reload = False
        self._http: Any = None
        self.notifier = Notifier()

    def _connection_dropped(self, conn: Any, reason: object) -> None:
        if self.pipeline is not None:
            self.pipeline.connection_dropped(conn, reason)

    # -- signals ------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def stop(self) -> None:
        self._stop.set()

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        from hopwatch.capture.live import CaptureConfig, LiveCapture
        from hopwatch.kernel import KernelError

        host, port = split_host_port(self.config.metrics_addr)
        settings = self.config.capture
        capture = LiveCapture(
            CaptureConfig(
                ring_bytes=settings.ring_buffer_bytes,
                max_cap=max(262144, settings.max_copy_bytes),
                cap_bytes=settings.max_copy_bytes,
                conn_max=max(1024, min(self.config.max_connections, 1 << 20)),
            )
        )
        # PyPy: the JIT compiles the analysis path on synthetic traffic while bcc compiles
        # the programs (ctypes releases the interpreter lock), before anything attaches.
        warm = _WarmUp(self.config) if PYPY else None
        if warm is not None:
            warm.start()
        try:
            capture.open()
            if settings.include_pids or settings.exclude_pids:
                capture.set_pid_filter(set(settings.include_pids), set(settings.exclude_pids))
            if settings.include_cgroups or settings.exclude_cgroups:
                capture.set_cgroup_filter(
                    set(settings.include_cgroups), set(settings.exclude_cgroups)
                )
            if settings.exclude_ports:
                capture.set_port_exclude(set(settings.exclude_ports))
        except KernelError as exc:
            capture.close()
            raise StartupError(str(exc)) from exc
        finally:
            if warm is not None:
                warm.finish()
        self.capture = capture
        cfg = self.config
        if cfg.audit_log:
            try:
                self.audit = AuditLog.open(
                    cfg.audit_log,
                    key_path=cfg.audit_key_file,
                    metrics=self.metrics,
                    max_bytes=cfg.audit_max_bytes,
                    backups=max(cfg.audit_backups, 1),
                )
            except AuditError as exc:
                self.capture.close()
                raise StartupError(f"audit log: {exc}") from exc
        self.wire(capture)
        # Sockets that existed before we started (keep-alive connections).
        adopted = 0
        for conn in self.conns.scan_existing():
            self.capture.adopt(conn.tgid, conn.fd, conn.role)
            adopted += 1
        log.info("adopted %d existing inet sockets", adopted)
        # Start-up is over: what it left (the warm-up's records, the ELF tables of the TLS
        # scan, /proc tables) goes now, not at the first major collection, and the heap
        # gives back what it freed. On PyPy that is ~9 MiB of the idle RSS (153 -> 143).
        gc.collect()
        trim_heap()
        self.heap.baseline = rss_bytes()
        self.metrics.registry.register(KernelStatsCollector(self._stats, _STATS_DOCS))
        # python_info{implementation="PyPy"|"CPython", version=...}: which runtime serves.
        PlatformCollector(registry=self.metrics.registry)
        try:
            if self._serve_metrics:
                self._http, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as exc:
            self.capture.close()
            raise StartupError(
                f"cannot serve metrics on {self.config.metrics_addr}: {exc.strerror or exc}; "
                "choose another with --metrics-addr HOST:PORT"
            ) from exc
        self.metrics.up.set(1)
        log.info("hopwatch ready: metrics on http://%s/metrics", self.config.metrics_addr)
        self.notifier.ready(f"capturing; metrics on {self.config.metrics_addr}")
        if self._on_ready is not None:
            self._on_ready()

    def wire(self, capture: Any) -> None:
        """The analysis (pipeline, hop analysis, finding sinks) around ``capture``."""
        self.capture = capture
        sinks = tuple(s for s in (self.audit, *self._finding_sinks) if s is not None)
        sink = sinks[0] if len(sinks) == 1 else _FindingTee(sinks) if sinks else None
        self.hops = HopAnalyzer(self.config, self.metrics, sink)
        self.pipeline = Pipeline(
            self.config,
            self.metrics,
            self.conns,
            control=capture,
            observers=(*self._observers, self.hops),
            audit=self.audit,
        )

    def _stats(self) -> Mapping[str, float | Mapping[str, float]]:
        out: dict[str, float | Mapping[str, float]] = {}
        if self.capture is not None and self.capture.is_open:
            k = self.capture.stats()
            out["events_lost_total"] = {r: k.get(r, 0) for r in _LOST_REASONS}
            out["capture_kernel_events_total"] = k["events"]
            out["capture_kernel_bytes_total"] = k["bytes"]
            out["capture_truncated_bytes_total"] = k["truncated_bytes"]
            out["capture_truncated_syscalls_total"] = k["truncated_syscalls"]
            out["capture_skipped_bytes_total"] = k["skipped_bytes"]
            out["capture_filtered_total"] = {r: k.get(r, 0) for r in _FILTER_REASONS}
            out["capture_unknown_fd_total"] = k["unknown_fd"]
            out["capture_kernel_connections"] = k["connections"]
            out["capture_ring_bytes"] = self.capture.ring_bytes
            backlog = self.capture.ring_backlog()
            if backlog is not None:
                out["capture_ring_backlog_bytes"] = backlog
            out["capture_tls_total"] = {
                "calls": k["tls_calls"],
                "unbound": k["tls_unbound"],
                "ciphertext_syscalls": k["tls_ciphertext"],
                "ciphertext_chunks": self.pipeline.tls_ciphertext_chunks if self.pipeline else 0,
            }
            out["capture_tls_targets"] = k["tls_targets"]
        out["capture_scheduling_yields_total"] = self.scheduling.yields
        out["capture_scheduling_boosts_total"] = self.scheduling.boosts
        out["capture_scheduling_idle"] = int(self.scheduling.idle)
        out["capture_shed_pause_seconds_total"] = self.shed_pause_s
        out["capture_overloaded"] = int(self.overload.active)
        out["connections_tracked"] = len(self.conns)
        out["connections_total"] = dict(self.conns.counters())
        if self.hops is not None:
            for _ in range(3):  # the loop thread may resize the table while we sum it
                try:
                    out["hop_open_requests"] = self.hops.open_requests()
                    break
                except RuntimeError:
                    continue
            out["hop_processes"] = self.hops.tracked_processes()
        return out

    def run(self) -> None:
        """Start, loop until SIGTERM/SIGINT (or `stop()`), then shut down."""
        self.start()
        try:
            if self.config.capture.scheduling == "idle":
                self.scheduling.start()
            self.loop()
        finally:
            self.scheduling.stop()
            self.shutdown(exiting=True)

    def loop(self) -> None:
        assert self.capture is not None and self.pipeline is not None
        cap = self.config.capture
        timeout = cap.poll_timeout_ms
        overload = self.overload
        last_evict = last_rest = time.monotonic()
        was_overloaded = False
        while not self._stop.is_set():
            if self._reload:
                self._reload = False
                self.reload()
            cpu0 = time.thread_time()
            self.process(self.capture.poll(timeout))
            polled, cpu1 = time.monotonic(), time.thread_time()
            capture = self.capture
            overloaded = overload.update(
                polled,
                capture.records_read,
                capture.shed_syscalls,
                cpu1,
                capture.waiting_records(),
            )
            if overloaded != was_overloaded:
                was_overloaded = overloaded
                capture.limit_batch(_OVERLOAD_BATCH if overloaded else None)
            if self.scheduling.idle and overloaded:
                # Yielding, and the traffic far beyond the loop: also cap its CPU (what
                # stays in the ring is shed by the kernel and counted); SIGTERM ends the
                # pause.
                pause = budget_pause(cpu1 - cpu0, cap.shed_cpu_percent)
                if pause:
                    self.shed_pause_s += pause
                    self._stop.wait(pause)
            self.metrics.overflow_check()
            self.notifier.watchdog()
            if self.scheduling.active:
                # Yield the CPU while the capture sheds, or is about to (the ring fills far
                # faster than the loop reads): the node is saturated, and competing would
                # slow the workloads and see no more. As of the poll, not of now: a pause
                # would make any shedding look over. And yield while the loop is busy (half
                # a CPU or more): a loop fast enough to keep up with a saturated node by
                # taking a whole CPU from it (PyPy: 0.40 of wrk's throughput, nothing shed)
                # gets only the CPU the workloads leave; where there is enough of it, it
                # still keeps up. Not while connection events queue.
                shedding = overloaded or polled - capture.ring_full_at < _SHEDDING_S
                busy = overload.cpu_share >= _BUSY_SHARE
                self.scheduling.beat(
                    yield_cpu=(shedding or busy)
                    and capture.lifecycle_backlog() < _URGENT_BACKLOG
                )
            now = time.monotonic()
            if now - last_rest > _REST_EVERY_S:
                last_rest = now
                self.pipeline.rest_idle(time.monotonic_ns() - _REST_AFTER_NS)
            if now - last_evict > 5:
                # Idle connections out, cached /proc tables expired, and the heap that a
                # burst (a connection storm, a table of 100k sockets) left free given back.
                last_evict = now
                now_ns = time.monotonic_ns()
                self.conns.evict_idle(now_ns, 3600 * 10**9)
                rss = rss_bytes()
                if self.heap.due(capture.records_read, rss):
                    gc.collect()
                    trim_heap()
                    after = rss_bytes()
                    self.heap.settled(after)
                    log.info("a burst is over: collected and trimmed the heap, RSS %.0f -> "
                             "%.0f MiB", rss / 2**20, after / 2**20)
                else:
                    trim_heap()

    def process(self, events: list[Any]) -> None:
        """Every capture event through the pipeline, then the hop analyzer."""
        assert self.pipeline is not None and self.hops is not None
        handle, hop_event = self.pipeline.handle, self.hops.handle_event
        for ev in events:
            handle(ev)
            if type(ev) is not DataChunk:  # the hop analyzer gets messages as observations
                hop_event(ev)

    def reload(self) -> None:
        if self.config_path is None:
            log.info("SIGHUP: no config file given, nothing to reload")
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running configuration: %s", exc)
            self.notifier.ready("reload failed; running configuration kept")
            return
        if new.capture != self.config.capture or new.metrics_addr != self.config.metrics_addr:
            log.warning("SIGHUP: [capture] and metrics address changes need a restart")
        self.config = new
        if self.pipeline is not None:
            self.pipeline.config = new
        if self.hops is not None:
            self.hops.update_config(new)
        log.info("SIGHUP: configuration reloaded from %s", self.config_path)
        self.notifier.ready("configuration reloaded")

    def shutdown(self, *, exiting: bool = False) -> None:
        """``exiting``: the process ends right after (TLS uprobes then detach in a helper)."""
        self.notifier.stopping()
        if self.capture is not None:
            try:
                if self.capture.is_open and self.pipeline is not None:
                    # Drain what the ring still holds, batch by batch, for at most 2 s.
                    deadline = time.monotonic() + 2.0
                    self.process(self.capture.poll(0))
                    while self.capture.behind and time.monotonic() < deadline:
                        self.process(self.capture.poll(0))
            except Exception:
                log.exception("draining the ring buffer failed")
            finally:
                self.capture.close(exiting=exiting)
                self.metrics.up.set(0)
        if self.audit is not None:
            self.audit.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        log.info("hopwatch stopped")
