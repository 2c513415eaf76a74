"""``hopwatch replay FILE``: the daemon's pipeline over a capture file.

The wiring is `Daemon`'s (connection table -> pipeline -> hop analyzer -> metrics and
audit sinks) with `PcapCapture` as the capture source and no kernel: the same findings and
message counts a live daemon reports for the same traffic, with the host IP address as the
process (see `hopwatch.capture.pcap`).

``--json`` prints one JSON object per finding with the audit log's fields (`AuditLog`'s
record builder), its ``time`` being the capture time of the packet that completed it.
Trace ids are hashed with the configured ``[audit] key_file`` when it exists (the hashes
then match the daemon's audit log), else with a key random to this run.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

from hopwatch.audit import AuditError, AuditLog, load_or_create_key
from hopwatch.capture.pcap import PcapCapture, PcapError, PcapStats
from hopwatch.config import Config, ConfigError, load_config
from hopwatch.conntrack import ConnectionTable
from hopwatch.hops import HopAnalyzer
from hopwatch.metrics import Metrics
from hopwatch.pipeline import Pipeline

__all__ = ["Replay", "ReplayResult", "replay"]

log = logging.getLogger(__name__)


class _LineAudit(AuditLog):
    """`AuditLog` whose lines go to a callable (stdout) instead of a file."""

    def __init__(
        self, emit: Callable[[str], None], key: bytes, clock: Callable[[], datetime]
    ) -> None:
        super().__init__("<stdout>", key=key, clock=clock)
        self._emit = emit

    def write(self, record: dict[str, Any]) -> bool:
        self._emit(json.dumps(record, separators=(",", ":")))
        self.lines_written += 1
        return True


@dataclass
class ReplayResult:
    """What a replay saw: the capture's counters and the metric samples."""

    stats: PcapStats
    messages: dict[tuple[str, str, str, str, str], float] = field(default_factory=dict)
    findings: dict[tuple[str, str, str, str], float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # other self-metrics
    processes: dict[str, int] = field(default_factory=dict)  # host IP -> synthetic tgid
    findings_lines: int = 0


class Replay:
    """Feed a capture file through the daemon's pipeline. Tests call it directly."""

    def __init__(
        self,
        config: Config,
        capture: PcapCapture,
        *,
        emit: Callable[[str], None] | None = None,
        key: bytes | None = None,
    ) -> None:
        self.config = config
        self.capture = capture
        self.metrics = Metrics(
            max_process_labels=config.max_process_labels,
            max_peer_labels=config.max_peer_labels,
        )
        self._ts_ns = 0
        self._stopped = False
        self.audit: _LineAudit | None = None
        if emit is not None:
            self.audit = _LineAudit(emit, key or secrets.token_bytes(32), self._packet_time)
        self.conns = ConnectionTable(
            max_entries=config.max_connections,
            on_drop=self._dropped,
            identity=capture.identity,
        )
        self.hops = HopAnalyzer(config, self.metrics, self.audit)
        self.pipeline = Pipeline(
            config, self.metrics, self.conns, observers=(self.hops,), audit=self.audit
        )

    def _packet_time(self) -> datetime:
        return datetime.fromtimestamp(self._ts_ns / 1e9, timezone.utc)

    def _dropped(self, conn: Any, reason: object) -> None:
        self.pipeline.connection_dropped(conn, reason)

    def stop(self) -> None:
        """Stop `run` after the current event (the reader of the output went away)."""
        self._stopped = True

    def run(self) -> ReplayResult:
        handle, hop_event = self.pipeline.handle, self.hops.handle_event
        for ev in self.capture.events():
            if self._stopped:
                break
            ts = getattr(ev, "ts_ns", 0)
            if ts:
                self._ts_ns = ts
            handle(ev)
            hop_event(ev)
        self.metrics.overflow_check()
        return self.result()

    def result(self) -> ReplayResult:
        out = ReplayResult(self.capture.stats, processes=self.capture.process_addresses())
        for family in self.metrics.registry.collect():
            for s in family.samples:
                if not s.name.endswith("_total"):
                    continue
                labels = s.labels
                if s.name == "hopwatch_http_messages_total":
                    key5 = (
                        labels["process"],
                        labels["direction"],
                        labels["kind"],
                        labels["protocol"],
                        labels["context"],
                    )
                    out.messages[key5] = out.messages.get(key5, 0) + s.value
                elif s.name == "hopwatch_findings_total":
                    key4 = (labels["finding"], labels["header"], labels["process"], labels["peer"])
                    out.findings[key4] = out.findings.get(key4, 0) + s.value
                elif s.value:
                    suffix = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
                    name = f"{s.name}{{{suffix}}}" if suffix else s.name
                    out.counters[name] = out.counters.get(name, 0) + s.value
        out.findings_lines = self.audit.lines_written if self.audit is not None else 0
        return out


# -- the command ------------------------------------------------------------------------------


def _key(config: Config) -> bytes | None:
    """The install's audit key when the configuration names one that exists."""
    path = config.audit_key_file
    if not path or not os.path.exists(path):
        return None
    try:
        return load_or_create_key(path)
    except AuditError as exc:
        log.warning("%s; trace ids hashed with a key random to this run", exc)
        return None


def replay(
    path: str,
    config_path: str | None,
    json_output: bool,
    ends: str,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=err, format="hopwatch: %(message)s")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"hopwatch replay: configuration error: {exc}", file=err)
        return 2
    try:
        capture = PcapCapture(path, ends=ends)
    except FileNotFoundError:
        print(f"hopwatch replay: {path}: no such file", file=err)
        return 1
    except PcapError as exc:
        print(f"hopwatch replay: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"hopwatch replay: cannot read {path}: {exc.strerror or exc}", file=err)
        return 1

    reader_gone = False

    def emit(line: str) -> None:
        nonlocal reader_gone
        if reader_gone:
            return
        try:
            out.write(line + "\n")
        except BrokenPipeError:  # `hopwatch replay --json F | head`: stop quietly
            reader_gone = True
            rep.stop()

    with capture:
        rep = Replay(config, capture, emit=emit if json_output else None, key=_key(config))
        try:
            result = _run_with_progress(rep, capture, err)
        except OSError as exc:
            print(f"hopwatch replay: reading {path} failed: {exc.strerror or exc}", file=err)
            return 1
    if reader_gone:
        if out is sys.stdout:  # no second EPIPE when the interpreter flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if json_output:
        out.flush()
        _warn_losses(result.stats, err)
    else:
        out.write(format_summary(path, ends, result) + "\n")
    return 0


def _run_with_progress(rep: Replay, capture: PcapCapture, err: IO[str]) -> ReplayResult:
    """A progress bar on stderr, only for a person watching (a TTY) and a file worth it."""
    if not (err.isatty() and capture.size >= 4 << 20):
        return rep.run()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("replaying"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(file=err),
        transient=True,
    ) as bar:
        task = bar.add_task("replay", total=capture.size)
        capture.progress = lambda pos: bar.update(task, completed=pos)
        return rep.run()


def _warn_losses(st: PcapStats, err: IO[str]) -> None:
    if st.gaps or st.truncated_bytes:
        print(
            f"hopwatch replay: {st.gaps} missing segment(s), {st.gap_bytes} bytes never "
            f"captured; {st.truncated_bytes} bytes cut by the snap length",
            file=err,
        )


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    out = []
    for r in (head, *rows):
        cells = (c.rjust(w) if c.isdigit() else c.ljust(w) for c, w in zip(r, widths))
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def format_summary(path: str, ends: str, r: ReplayResult) -> str:
    st = r.stats
    lines = [
        f"{path}: {st.packets} packets, {st.tcp_segments} TCP segments, "
        f"{st.connections} connections ({st.connections_without_syn} already open when "
        f"the capture started); ends observed: {ends}; process = host IP address",
    ]
    passed = {
        "not TCP": st.not_tcp,
        "IP fragments": st.fragments,
        "undecodable link type": st.unsupported_link,
        "malformed": st.malformed,
        "after their connection closed": st.late_packets,
    }
    if any(passed.values()):
        lines.append(
            "  passed over: " + ", ".join(f"{n} {k}" for k, n in passed.items() if n)
        )
    lines.append(
        f"  reassembly: {st.out_of_order_segments} out-of-order segments reordered, "
        f"{st.retransmitted_segments} retransmitted segments ({st.retransmitted_bytes} B) "
        f"and {st.overlap_bytes} overlapping bytes dropped"
    )
    lines.append(
        f"  lost: {st.gaps} missing segment(s) ({st.gap_bytes} B never captured), "
        f"{st.truncated_bytes} B cut by the snap length"
        + (": the parsers resynchronised after each" if st.gaps or st.truncated_bytes else "")
    )
    desync = {k: v for k, v in r.counters.items() if k.startswith("hopwatch_stream_desyncs")}
    errors = {k: v for k, v in r.counters.items() if k.startswith("hopwatch_parse_errors")}
    for title, d in (("parser desyncs", desync), ("parse errors", errors)):
        if d:
            labels = (f"{k.split('{', 1)[1].rstrip('}')} {int(v)}" for k, v in sorted(d.items()))
            lines.append(f"  {title}: " + ", ".join(labels))
    lines.append("")
    if r.messages:
        lines.append("HTTP messages")
        rows = [(*k, str(int(v))) for k, v in sorted(r.messages.items()) if v]
        lines += _table(("PROCESS", "DIRECTION", "KIND", "PROTOCOL", "CONTEXT", "COUNT"), rows)
    else:
        lines.append("No HTTP message found.")
    lines.append("")
    if r.findings:
        total = int(sum(r.findings.values()))
        lines.append(f"Findings ({total})")
        rows = [(*k, str(int(v))) for k, v in sorted(r.findings.items()) if v]
        lines += _table(("FINDING", "HEADER", "PROCESS", "PEER", "COUNT"), rows)
    else:
        lines.append("No findings.")
    unattributed = {
        k: v for k, v in r.counters.items() if k.startswith("hopwatch_unattributed_requests")
    }
    if unattributed:
        lines.append("")
        per = (f"{k.split('=', 1)[1].rstrip('}')} {int(v)}" for k, v in unattributed.items())
        lines.append("Outbound requests not attributed to an inbound request: " + ", ".join(per))
    return "\n".join(lines)
