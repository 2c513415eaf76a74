"""Audit log: line contents, privacy, the keyed hash, rotation, failures; the report."""

from __future__ import annotations

import json
import os
import socket
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hopwatch.audit import (
    AuditError,
    AuditLog,
    default_key_path,
    format_report,
    load_or_create_key,
    read_audit_lines,
    summarize,
    trace_id_hash,
)
from hopwatch.capture._types import ConnOpened, DataChunk, Direction, SockAddr
from hopwatch.cli import app
from hopwatch.config import Config, EgressRule
from hopwatch.conntrack import ConnectionTable
from hopwatch.hops import HopAnalyzer
from hopwatch.metrics import Metrics
from hopwatch.pipeline import Pipeline
from tests.test_hops import (
    BAGGAGE,
    THIRD_PARTY,
    TP_A,
    TP_B,
    TRACE_A,
    TRACE_B,
    _obs,
    request,
    response,
)

KEY = bytes(range(32))
SECRET_BAGGAGE = "user=alice%40example.com,session=s3cr3t-v4lue"
RAW = (TRACE_A, TRACE_B, TRACE_A[16:], TP_A, TP_B, BAGGAGE, "alice", "s3cr3t-v4lue", "example.com")


def lines_of(*paths: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for p in paths:
        out += [json.loads(x) for x in p.read_text().splitlines()]
    return out


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


def allow(*entries: str) -> Config:
    return Config(egress_allow=tuple(EgressRule.parse(e) for e in entries))


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- lines ------------------------------------------------------------------------------------


def test_leak_line_fields_and_keyed_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    metrics = Metrics()
    log = AuditLog(path, key=KEY, metrics=metrics, clock=Clock())
    hops = HopAnalyzer(allow("10.0.0.0/8"), metrics, log)
    hops(
        _obs(
            "outbound",
            request((("traceparent", TP_A), ("baggage", BAGGAGE)), authority="Tracker.Example"),
            peer=THIRD_PARTY,
            tgid=4242,
        )
    )
    log.close()
    first, second = lines_of(path)
    assert first == {
        "time": "2026-03-01T12:00:01.000Z",
        "finding": "leak",
        "header": "traceparent",
        "reason": "leak.destination_not_allowed",
        "reasons": ["leak.destination_not_allowed"],
        "process": {
            "pid": 4242,
            "comm": "orders",
            "unit": "orders.service",
            "label": "orders.service",
        },
        "local": "10.0.0.7:45000",
        "peer": "203.0.113.7:443",
        "host": "tracker.example",
        "direction": "outbound",
        "kind": "request",
        "protocol": "http1",
        "method": "GET",
        "status": None,
        "message": "4242.5.1000",
        "trace_id_hash": trace_id_hash(KEY, TRACE_A),
        "destination": "tracker.example",
        "via": "direct",
    }
    assert second["header"] == "baggage"
    assert second["trace_id_hash"] == first["trace_id_hash"]
    assert len(str(first["trace_id_hash"])) == 16
    assert trace_id_hash(b"another key, 32 bytes long......", TRACE_A) != first["trace_id_hash"]
    assert value(metrics, "hopwatch_audit_lines_total") == 2.0
    assert value(metrics, "hopwatch_audit_write_errors_total") == 0.0


def test_restarted_line_hashes_both_traces(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY)
    hops = HopAnalyzer(Config(), Metrics(), log)
    hops(_obs("inbound", request((("traceparent", TP_A),))))
    hops(_obs("outbound", request((("traceparent", TP_B),)), fd=9))
    (line,) = lines_of(path)
    assert line["finding"] == "restarted"
    assert line["trace_id_hash"] == trace_id_hash(KEY, TRACE_A)
    assert line["other_trace_id_hash"] == trace_id_hash(KEY, TRACE_B)


def test_per_message_findings_reach_the_log_through_the_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    metrics = Metrics()
    log = AuditLog(path, key=KEY, metrics=metrics)
    pipeline = Pipeline(Config(), metrics, ConnectionTable(), audit=log)
    tgid = 4_000_000  # no such process: identity falls back to the event's comm
    peer = SockAddr(socket.AF_INET, "10.0.0.5", 40000)
    pipeline.handle(ConnOpened(tgid, tgid, 7, "server", peer, 1, comm="api"))
    head = (
        b"GET /x HTTP/1.1\r\nHost: api.local\r\n"
        b"traceparent: " + TP_A.upper().encode() + b"\r\n"
        b"baggage: " + SECRET_BAGGAGE.encode() + b"\r\n\r\n"
    )
    pipeline.handle(DataChunk(tgid, tgid, 7, Direction.RECV, 2, len(head), head, comm="api"))
    got = lines_of(path)
    assert {(x["finding"], x["header"]) for x in got} == {
        ("malformed", "traceparent"),
        ("sensitive", "baggage"),
    }
    malformed = next(x for x in got if x["finding"] == "malformed")
    assert malformed["reason"] == "traceparent.uppercase_hex"
    assert malformed["direction"] == "inbound"
    assert malformed["trace_id_hash"] is None  # no valid context in that message
    text = path.read_text()
    for raw in (*RAW, TP_A.upper(), TRACE_A.upper(), SECRET_BAGGAGE):
        assert raw not in text


def test_privacy_no_raw_ids_or_values_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    metrics = Metrics()
    log = AuditLog(path, key=KEY, metrics=metrics)
    hops = HopAnalyzer(allow("10.0.0.0/8"), metrics, log)
    # every hop finding at least once
    hops(_obs("inbound", request((("traceparent", TP_A), ("baggage", SECRET_BAGGAGE)))))
    hops(
        _obs(
            "outbound",
            request(
                (("traceparent", TP_B), ("baggage", SECRET_BAGGAGE)), authority="tracker.example"
            ),
            peer=THIRD_PARTY,
            fd=9,
        )
    )
    hops(
        _obs(
            "outbound",
            response(200, (("traceparent", TP_A), ("baggage", SECRET_BAGGAGE))),
            peer=SockAddr(socket.AF_INET, "198.51.100.20", 5000),
        )
    )
    for f in ((("traceparent", TP_A),), ()):
        hops(_obs("inbound", request((("traceparent", TP_A),))))
        hops(_obs("outbound", request(f), fd=9))
        hops(_obs("outbound", response(200)))
    text = path.read_text()
    findings = {x["finding"] for x in lines_of(path)}
    assert findings == {"restarted", "leak", "response_leak", "stripped"}
    labels = " ".join(
        v for fam in metrics.registry.collect() for s in fam.samples for v in s.labels.values()
    )
    for raw in RAW:
        assert raw not in text
        assert raw not in labels


# -- the key ----------------------------------------------------------------------------------


def test_key_created_once_with_mode_0600(tmp_path: Path) -> None:
    key_path = tmp_path / "state" / "audit.key"
    key = load_or_create_key(key_path)
    assert len(key) == 32
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_or_create_key(key_path) == key
    log = AuditLog.open(tmp_path / "audit.jsonl", key_path=key_path)
    assert log.hash(TRACE_A) == trace_id_hash(key, TRACE_A)
    # the default key path sits next to the log
    other = AuditLog.open(tmp_path / "logs" / "a.jsonl")
    assert default_key_path(tmp_path / "logs" / "a.jsonl").exists()
    assert other.hash(TRACE_A) != log.hash(TRACE_A)


def test_key_with_loose_mode_is_tightened_and_short_key_refused(tmp_path: Path) -> None:
    key_path = tmp_path / "k"
    key_path.write_text(KEY.hex() + "\n")
    os.chmod(key_path, 0o644)
    assert load_or_create_key(key_path) == KEY
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key_path.write_text("abcd\n")
    with pytest.raises(AuditError):
        load_or_create_key(key_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AuditError):
        load_or_create_key(blocker / "key")  # a file where a directory should be


# -- rotation and failures --------------------------------------------------------------------


def _record(i: int) -> dict[str, object]:
    return {"finding": "leak", "header": "traceparent", "seq": i, "pad": "x" * 40}


def test_rotation_loses_no_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    metrics = Metrics()
    log = AuditLog(path, key=KEY, metrics=metrics, max_bytes=300, backups=50)
    for i in range(100):
        assert log.write(_record(i))
    log.close()
    files = sorted(tmp_path.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    seqs = [x["seq"] for x in lines_of(*files, path)]
    assert seqs == list(range(100))  # every line, once, in order, oldest file first
    for p in (*files, path):
        assert p.stat().st_size <= 300
    assert value(metrics, "hopwatch_audit_rotations_total") == float(len(files))
    assert [x["seq"] for x in map(json.loads, read_audit_lines(path))] == list(range(100))


def test_rotation_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY, max_bytes=300, backups=2)
    for i in range(100):
        log.write(_record(i))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
    ]
    seqs = [
        x["seq"] for x in lines_of(tmp_path / "audit.jsonl.2", tmp_path / "audit.jsonl.1", path)
    ]
    assert seqs == list(range(100 - len(seqs), 100))  # the newest lines, contiguous


def test_rotation_failure_keeps_writing_to_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.1").mkdir()  # a directory where the backup must go
    (tmp_path / "audit.jsonl.1" / "x").write_text("")
    metrics = Metrics()
    log = AuditLog(path, key=KEY, metrics=metrics, max_bytes=300, backups=1)
    for i in range(20):
        assert log.write(_record(i))
    assert [x["seq"] for x in lines_of(path)] == list(range(20))
    assert value(metrics, "hopwatch_audit_write_errors_total") == 0.0
    assert value(metrics, "hopwatch_audit_rotations_total") == 0.0
    # the obstacle gone, the next line rotates
    (tmp_path / "audit.jsonl.1" / "x").unlink()
    (tmp_path / "audit.jsonl.1").rmdir()
    assert log.write(_record(20))
    assert [x["seq"] for x in lines_of(tmp_path / "audit.jsonl.1", path)] == list(range(21))
    assert value(metrics, "hopwatch_audit_rotations_total") == 1.0


def test_unwritable_path_is_counted_never_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    metrics = Metrics()
    log = AuditLog(blocker / "audit.jsonl", key=KEY, metrics=metrics)
    hops = HopAnalyzer(allow("10.0.0.0/8"), metrics, log)
    hops(
        _obs(
            "outbound",
            request((("traceparent", TP_A), ("baggage", BAGGAGE)), authority="tracker.example"),
            peer=THIRD_PARTY,
        )
    )
    assert value(metrics, "hopwatch_audit_write_errors_total") == 2.0
    assert value(metrics, "hopwatch_audit_lines_total") == 0.0
    # the findings themselves are still counted
    assert (
        value(
            metrics,
            "hopwatch_findings_total",
            finding="leak",
            header="traceparent",
            process="orders.service",
            peer="tracker.example",
        )
        == 1.0
    )


def test_disk_full_is_counted_then_recovers(tmp_path: Path) -> None:
    metrics = Metrics()
    log = AuditLog("/dev/full", key=KEY, metrics=metrics)
    assert log.write(_record(1)) is False
    assert log.write(_record(2)) is False
    assert value(metrics, "hopwatch_audit_write_errors_total") == 2.0
    # a half line left by a failed write is ended before the next one
    path = tmp_path / "audit.jsonl"
    path.write_text('{"finding": "leak", "hea')
    log = AuditLog(path, key=KEY, metrics=metrics)
    assert log.write(_record(3))
    assert path.read_text().splitlines()[1] == json.dumps(_record(3), separators=(",", ":"))


def test_failure_inside_a_sink_never_raises(tmp_path: Path) -> None:
    metrics = Metrics()
    log = AuditLog(tmp_path / "a.jsonl", key=KEY, metrics=metrics)
    log.message_findings(object())  # type: ignore[arg-type]
    assert value(metrics, "hopwatch_audit_write_errors_total") == 1.0


# -- report -----------------------------------------------------------------------------------


def _leaky_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY, clock=Clock(), max_bytes=2000, backups=5)
    hops = HopAnalyzer(allow("10.0.0.0/8"), Metrics(), log)
    for i in range(3):
        hops(
            _obs(
                "outbound",
                request((("traceparent", TP_A), ("baggage", BAGGAGE)), authority="tracker.example"),
                peer=THIRD_PARTY,
                ts_ns=1000 + i,
                tgid=10,
                process="checkout.service",
            )
        )
    hops(
        _obs(
            "outbound",
            request(
                (("b3", f"{TRACE_B}-e457b5a2e4d86bd1-1"),),
                path="http://ads.example/p",
                authority="ads.example",
            ),
            peer=SockAddr(socket.AF_INET, "10.0.0.3", 3128),
            tgid=11,
            process="cart",
        )
    )
    hops(
        _obs(
            "outbound",
            response(200, (("traceparent", TP_A),)),
            peer=SockAddr(socket.AF_INET, "198.51.100.20", 5000),
            tgid=12,
            process="web",
        )
    )
    hops(_obs("inbound", request((("traceparent", TP_A),)), tgid=13))
    hops(_obs("outbound", request(()), tgid=13, fd=9))
    log.close()
    with open(path, "a") as f:
        f.write("not json\n")
    return path


def test_summarize_groups_by_destination_and_process(tmp_path: Path) -> None:
    report = summarize(read_audit_lines(_leaky_log(tmp_path)))
    rows = [r.as_dict() for r in report.rows]
    assert rows == [
        {
            "destination": "198.51.100.20",
            "process": "web",
            "finding": "response_leak",
            "messages": 1,
            "headers": {"traceparent": 1},
            "pids": [12],
            "first_seen": "2026-03-01T12:00:08.000Z",
            "last_seen": "2026-03-01T12:00:08.000Z",
        },
        {
            "destination": "ads.example:80",
            "process": "cart",
            "finding": "leak",
            "messages": 1,
            "headers": {"b3": 1},
            "pids": [11],
            "first_seen": "2026-03-01T12:00:07.000Z",
            "last_seen": "2026-03-01T12:00:07.000Z",
        },
        {
            "destination": "tracker.example",
            "process": "checkout.service",
            "finding": "leak",
            "messages": 3,
            "headers": {"baggage": 3, "traceparent": 3},
            "pids": [10],
            "first_seen": "2026-03-01T12:00:01.000Z",
            "last_seen": "2026-03-01T12:00:06.000Z",
        },
    ]
    assert report.other == {"stripped": 1}
    assert report.unreadable == 1
    text = format_report(report)
    assert (
        "tracker.example\n  checkout.service: 3 requests to it; headers baggage x3, "
        "traceparent x3" in text
    )
    assert "first 2026-03-01T12:00:01.000Z, last 2026-03-01T12:00:06.000Z" in text
    assert "Other findings: stripped 1" in text
    assert "1 unreadable" in text


def test_cli_audit_reads_rotated_files(tmp_path: Path) -> None:
    path = _leaky_log(tmp_path)
    assert (tmp_path / "audit.jsonl.1").exists()  # the log rotated at 2000 bytes
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [d["messages"] for d in doc["destinations"]] == [1, 1, 3]
    assert doc["lines"] == 10  # 9 findings and one line that is not JSON
    result = runner.invoke(app, ["audit", str(path), "--no-rotated", "--json"])
    assert json.loads(result.output)["lines"] < 10
    result = runner.invoke(app, ["audit", str(path)])
    assert result.exit_code == 0
    assert "3 destination(s)" in result.output
    for raw in RAW:
        assert raw not in result.output
    result = runner.invoke(app, ["audit", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 1
