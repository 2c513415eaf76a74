"""Audit log (JSON lines, one per finding) and the `hopwatch audit` report.

Privacy: a line names the finding, the header, the reason code, the process, the
addresses, the Host/:authority and the direction. It never carries a header value, a raw
trace id, a path or a baggage value: trace ids appear only as ``trace_id_hash``, a keyed
hash (HMAC-SHA256, truncated to 64 bits) under a key that is random per install (a file of
mode 0600, or given by the configuration). The same trace hashes the same within an
install, so lines correlate; the hash cannot be reversed or matched against a trace id
without the key.

Durability: every line is one ``write(2)`` on an ``O_APPEND`` descriptor, so a crash loses
no line already reported as written. Size-based rotation renames ``FILE`` to ``FILE.1``
(``FILE.1`` to ``FILE.2``, ... up to ``backups``) before the line that would cross the
limit, and that line goes to the fresh file: rotation itself loses nothing. A failure
(disk full, read-only, permissions) is counted in ``hopwatch_audit_write_errors_total``
and logged, never raised into the pipeline; the log retries on the next line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hopwatch.metrics import Metrics

from ._compat import SLOTS

if TYPE_CHECKING:
    from hopwatch.hops import HopFinding
    from hopwatch.pipeline import Observation

__all__ = [
    "DEFAULT_BACKUPS",
    "DEFAULT_MAX_BYTES",
    "LEAK_FINDINGS",
    "AuditError",
    "AuditLog",
    "AuditReport",
    "LeakRow",
    "default_key_path",
    "format_report",
    "load_or_create_key",
    "read_audit_lines",
    "summarize",
    "trace_id_hash",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_BACKUPS = 5
KEY_BYTES = 32
HASH_HEX_CHARS = 16  # 64 bits: plenty to correlate, nothing to reverse
LEAK_FINDINGS = ("leak", "response_leak")
_HOST_MAX = 255


class AuditError(OSError):
    """The audit log cannot be set up (key file); the message says what to fix."""


# -- the key ------------------------------------------------------------------------------------


def default_key_path(audit_path: str | os.PathLike[str]) -> Path:
    """Where the install's key lives when the configuration names none: next to the log."""
    return Path(audit_path).parent / "hopwatch-audit.key"


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """Read the hashing key (hex) at ``path``, or create a random one with mode 0600."""
    p = Path(path)
    try:
        return _read_key(p)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(KEY_BYTES)
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:  # another starter won the race: use its key
        return _read_key(p)
    except OSError as exc:
        raise AuditError(
            exc.errno or errno.EIO,
            f"cannot create the audit hashing key {p}: {exc.strerror or exc}; make its "
            "directory writable or set an existing key file",
        ) from exc
    try:
        os.write(fd, key.hex().encode() + b"\n")
    finally:
        os.close(fd)
    log.info("created the audit hashing key %s (mode 0600)", p)
    return key


def _read_key(p: Path) -> bytes:
    try:
        st = p.stat()
        text = p.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AuditError(
            exc.errno or errno.EIO, f"cannot read the audit hashing key {p}: {exc.strerror or exc}"
        ) from exc
    if st.st_mode & 0o077:
        log.warning("audit hashing key %s is readable by others; setting mode 0600", p)
        with contextlib.suppress(OSError):
            os.chmod(p, 0o600)
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = text
    if len(key) < 16:
        raise AuditError(errno.EINVAL, f"audit hashing key {p} is shorter than 16 bytes")
    return key


def trace_id_hash(key: bytes, trace_id: str) -> str:
    """The keyed hash of a (normalised, 32-hex) trace id: 16 hex characters."""
    digest = hmac.new(key, trace_id.lower().encode("ascii", "replace"), hashlib.sha256)
    return digest.hexdigest()[:HASH_HEX_CHARS]


# -- the log ------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _host(authority: str | None) -> str | None:
    if not authority:
        return None
    host = authority.rsplit("@", 1)[-1].strip().lower()  # never userinfo
    return host[:_HOST_MAX] or None


class AuditLog:
    """Appends one JSON line per finding to ``path``; see the module docstring.

    `message_findings` is the `Pipeline` audit hook (per-message findings), `hop_finding`
    the `HopAnalyzer` sink. Neither raises.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: bytes,
        metrics: Metrics | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the audit hashing key must be at least 16 bytes")
        if backups < 1:
            raise ValueError("backups must be at least 1 (rotation must not lose lines)")
        self.path = Path(path)
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.backups = backups
        self._key = key
        self._clock = clock
        self._fd: int | None = None
        self._size = 0
        self._regular = True
        self._partial = False  # a failed write may have left half a line
        self._failing = False
        self._rotate_failing = False
        self.lines_written = 0
        self.write_errors = 0
        self.rotations = 0

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        key_path: str | os.PathLike[str] | None = None,
        metrics: Metrics | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ) -> AuditLog:
        """The daemon's constructor: the key from config, else from (or created at)
        ``key_path`` (default `default_key_path`). Raises `AuditError` only for the key;
        an unwritable log file is counted at each write, not fatal."""
        if key is None:
            key = load_or_create_key(key_path or default_key_path(path))
        return cls(path, key=key, metrics=metrics, max_bytes=max_bytes, backups=backups)

    def hash(self, trace_id: str | None) -> str | None:
        return trace_id_hash(self._key, trace_id) if trace_id else None

    # -- sinks --------------------------------------------------------------------------------
    def message_findings(self, obs: Observation) -> None:
        """Pipeline hook: one line per (finding, header) of the message's verdict."""
        try:
            findings = obs.verdict.findings
            if not findings:
                return
            grouped: dict[tuple[str, str], list[str]] = {}
            for f in findings:
                grouped.setdefault((f.kind, f.header), []).append(f.code)
            v = obs.verdict
            ctx = v.w3c or v.b3
            trace = self.hash(ctx.trace_id if ctx is not None else None)
            for (kind, header), codes in grouped.items():
                self.write(self._record(obs, kind, header, codes, trace))
        except Exception:
            self._failed("record", None)

    def hop_finding(self, finding: HopFinding) -> None:
        """HopAnalyzer sink."""
        try:
            rec = self._record(
                finding.obs,
                finding.finding,
                finding.header,
                [finding.reason],
                self.hash(finding.trace_id),
            )
            if finding.other_trace_id:
                rec["other_trace_id_hash"] = self.hash(finding.other_trace_id)
            if finding.destination is not None:
                rec["destination"] = finding.destination
                rec["via"] = finding.via
            self.write(rec)
        except Exception:
            self._failed("record", None)

    def _record(
        self, obs: Observation, finding: str, header: str, codes: list[str], trace: str | None
    ) -> dict[str, Any]:
        msg = obs.message
        sid = f".{msg.stream_id}" if msg.stream_id is not None else ""
        return {
            "time": _rfc3339(self._clock()),
            "finding": finding,
            "header": header,
            "reason": codes[0],
            "reasons": codes,
            "process": {
                "pid": obs.tgid,
                "comm": obs.comm,
                "unit": obs.process if obs.process not in (obs.comm, "unknown") else None,
                "label": obs.process,
            },
            "local": str(obs.local) if obs.local is not None else None,
            "peer": str(obs.peer) if obs.peer is not None else None,
            "host": _host(msg.authority),
            "direction": obs.direction,
            "kind": msg.kind,
            "protocol": msg.protocol,
            "method": msg.method,
            "status": msg.status,
            "message": f"{obs.tgid}.{obs.fd}.{obs.ts_ns}{sid}",
            "trace_id_hash": trace,
        }

    # -- writing ------------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> bool:
        """Append one line; False (counted, logged) when it could not be written."""
        try:
            data = (json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n").encode()
        except (TypeError, ValueError):
            self._failed("encode", None)
            return False
        try:
            self._ensure_open()
            if self._regular and self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
                self._ensure_open()
            if self._partial:
                data = b"\n" + data  # end the half line a failed write left behind
            self._write_all(data)
        except OSError as exc:
            self._failed("write", exc)
            return False
        except Exception:  # never into the pipeline
            self._failed("write", None)
            return False
        self._partial = False
        self.lines_written += 1
        if self.metrics is not None:
            self.metrics.audit_lines.inc()
        if self._failing:
            self._failing = False
            log.warning("audit log %s is writable again", self.path)
        return True

    def _ensure_open(self) -> None:
        if self._fd is not None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        # A FIFO or a character device (/dev/stdout under a supervisor) is never rotated.
        self._regular = stat.S_ISREG(st.st_mode)
        self._size = st.st_size if self._regular else 0
        if self._regular and st.st_size > 0 and not self._partial:
            # A line cut short by a crash or a full disk before we started: end it.
            with contextlib.suppress(OSError), open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                self._partial = f.read(1) != b"\n"

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError:
                if len(view) != len(data):
                    self._partial = True
                raise
            if n <= 0:
                self._partial = len(view) != len(data)
                raise OSError(errno.EIO, "short write")
            self._size += n
            view = view[n:]

    def _rotate(self) -> None:
        """FILE.(N-1) -> FILE.N, ..., FILE -> FILE.1, then a fresh FILE.

        A rename failure is logged and the current file kept (it grows past the limit
        rather than lose a line); the next line tries again."""
        base = str(self.path)
        try:
            for i in range(self.backups - 1, 0, -1):
                src = f"{base}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{base}.{i + 1}")
            os.replace(base, f"{base}.1")
        except FileNotFoundError:
            pass  # removed behind our back: start a fresh file
        except OSError as exc:
            if not self._rotate_failing:
                self._rotate_failing = True
                log.error("audit log %s: cannot rotate: %s", self.path, exc.strerror or exc)
            return
        self._rotate_failing = False
        self._close_fd()
        self._partial = False
        self.rotations += 1
        if self.metrics is not None:
            self.metrics.audit_rotations.inc()
        self._ensure_open()

    def _failed(self, what: str, exc: OSError | None) -> None:
        self.write_errors += 1
        if self.metrics is not None:
            self.metrics.audit_write_errors.inc()
        if not self._failing:
            self._failing = True
            if exc is not None:
                log.error("audit log %s: %s failed: %s", self.path, what, exc.strerror or exc)
            else:
                log.exception("audit log %s: %s failed", self.path, what)
        if exc is not None and exc.errno in (errno.EBADF, errno.ESTALE, errno.ENOENT):
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_fd()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# -- the report ---------------------------------------------------------------------------------


def read_audit_lines(
    path: str | os.PathLike[str], *, rotated: bool = True
) -> Iterator[str]:
    """The lines of ``path``, oldest first: ``path.N`` ... ``path.1`` then ``path``."""
    base = Path(path)
    files: list[Path] = []
    if rotated:
        n = 1
        while Path(f"{base}.{n}").exists():
            n += 1
        files += [Path(f"{base}.{i}") for i in range(n - 1, 0, -1)]
    files.append(base)
    for f in files:
        with open(f, "rb") as fh:
            for raw in fh:
                yield raw.decode("utf-8", "replace")


@dataclass(**SLOTS)
class LeakRow:
    """One (destination, process, finding) of the report."""

    destination: str
    process: str
    finding: str  # leak | response_leak
    headers: dict[str, int] = field(default_factory=dict)  # header -> lines
    messages: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    first: str = ""
    last: str = ""

    @property
    def count(self) -> int:
        """How many messages carried context or baggage there."""
        return len(self.messages)

    def as_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "process": self.process,
            "finding": self.finding,
            "messages": self.count,
            "headers": dict(sorted(self.headers.items())),
            "pids": sorted(self.pids),
            "first_seen": self.first,
            "last_seen": self.last,
        }


@dataclass(**SLOTS)
class AuditReport:
    rows: list[LeakRow]
    other: dict[str, int]  # other findings: finding -> lines
    lines: int
    unreadable: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "destinations": [r.as_dict() for r in self.rows],
            "other_findings": dict(sorted(self.other.items())),
            "lines": self.lines,
            "unreadable_lines": self.unreadable,
        }


def summarize(lines: Iterable[str]) -> AuditReport:
    """Who sent trace context or baggage to which third party, how often, when."""
    rows: dict[tuple[str, str, str], LeakRow] = {}
    other: dict[str, int] = {}
    total = unreadable = 0
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        total += 1
        try:
            rec = json.loads(line)
            finding = str(rec["finding"])
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if finding not in LEAK_FINDINGS:
            other[finding] = other.get(finding, 0) + 1
            continue
        proc = rec.get("process") or {}
        process = str(proc.get("label") or proc.get("comm") or "unknown")
        dest = rec.get("destination")
        if not dest:
            peer = str(rec.get("peer") or "unknown")
            dest = peer.rsplit(":", 1)[0].strip("[]") if finding == "response_leak" else peer
        key = (str(dest), process, finding)
        row = rows.get(key)
        if row is None:
            row = rows[key] = LeakRow(str(dest), process, finding)
        header = str(rec.get("header") or "?")
        row.headers[header] = row.headers.get(header, 0) + 1
        row.messages.add(str(rec.get("message") or f"line{n}"))
        pid = proc.get("pid")
        if isinstance(pid, int):
            row.pids.add(pid)
        t = str(rec.get("time") or "")
        if t:
            if not row.first or t < row.first:
                row.first = t
            if not row.last or t > row.last:
                row.last = t
    ordered = sorted(rows.values(), key=lambda r: (r.destination, -r.count, r.process, r.finding))
    return AuditReport(ordered, other, total, unreadable)


def format_report(report: AuditReport) -> str:
    """The report for a person."""
    out: list[str] = []
    if not report.rows:
        out.append("No third-party destination received trace context or baggage.")
    else:
        dests = sorted({r.destination for r in report.rows})
        out.append(
            f"Trace context or baggage sent outside the egress allowlist: "
            f"{len(dests)} destination(s)."
        )
        current = None
        for r in report.rows:
            if r.destination != current:
                current = r.destination
                out.append("")
                out.append(r.destination)
            what = "requests to it" if r.finding == "leak" else "responses to it (client)"
            headers = ", ".join(f"{h} x{c}" for h, c in sorted(r.headers.items()))
            out.append(f"  {r.process}: {r.count} {what}; headers {headers}")
            out.append(f"    first {r.first or '?'}, last {r.last or '?'}")
    if report.other:
        out.append("")
        out.append(
            "Other findings: "
            + ", ".join(f"{k} {v}" for k, v in sorted(report.other.items()))
        )
    out.append("")
    tail = f"{report.lines} audit line(s) read"
    if report.unreadable:
        tail += f", {report.unreadable} unreadable (skipped)"
    out.append(tail + ".")
    return "\n".join(out)
