"""Configuration: a TOML file, every key optional, validated into a frozen `Config`.

Errors name the file, the line and the key, so an operator can fix them (`ConfigError`).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hopwatch.propagation import SENSITIVE_DETECTORS, Limits

from ._compat import SLOTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # PyPy 3.9
    import tomli as tomllib

__all__ = [
    "DEFAULT_ALLOW",
    "DEFAULT_METRICS_ADDR",
    "CaptureSettings",
    "Config",
    "ConfigError",
    "EgressRule",
    "ProcessFilter",
    "load_config",
    "parse_config",
]

#: 9647 is not in the Prometheus default-port allocations of common exporters.
DEFAULT_METRICS_ADDR = "127.0.0.1:9647"

#: Without `[egress] allow`: loopback and the private ranges.
DEFAULT_ALLOW: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


class ConfigError(ValueError):
    """A configuration that cannot be used. ``line`` is 1-based when known.

    Raised for the first problem of a file; ``errors`` holds every problem found (this one
    first), so `hopwatch config check` can list them all in one run.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str = "<config>",
        line: int | None = None,
        errors: tuple[ConfigError, ...] = (),
    ):
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")
        self.errors: tuple[ConfigError, ...] = errors or (self,)


@dataclass(frozen=True, **SLOTS)
class EgressRule:
    """One allowlist entry: a CIDR network or a hostname pattern, with an optional port."""

    text: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    host: str | None = None  # lowercase; may start with "*." (any subdomain)
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> EgressRule:
        entry = text.strip()
        if not entry:
            raise ValueError("empty allowlist entry")
        port: int | None = None
        body = entry
        if body.startswith("["):  # [v6]:port or [v6/len]
            end = body.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in {entry!r}")
            rest = body[end + 1 :]
            body = body[1:end]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"junk after ']' in {entry!r}")
                port = _parse_port(rest[1:], entry)
        elif body.count(":") == 1:
            body, port_text = body.split(":")
            port = _parse_port(port_text, entry)
        try:
            network = ipaddress.ip_network(body, strict=False)
        except ValueError:
            network = None
        if network is not None:
            return cls(entry, network=network, port=port)
        host = body.lower().rstrip(".")
        if not _HOST_PATTERN.fullmatch(host):
            raise ValueError(f"{entry!r} is neither a CIDR nor a hostname pattern")
        return cls(entry, host=host, port=port)

    def matches_ip(self, ip: str, port: int | None = None) -> bool:
        if self.network is None:
            return False
        if self.port is not None and port != self.port:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.version == self.network.version and addr in self.network

    def matches_host(self, hostname: str, port: int | None = None) -> bool:
        if self.host is None:
            return False
        if self.port is not None and port != self.port:
            return False
        name = hostname.lower().rstrip(".")
        if self.host.startswith("*."):
            return name.endswith(self.host[1:]) and len(name) > len(self.host) - 1
        return name == self.host


_HOST_PATTERN = re.compile(
    r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*"
)


def _parse_port(text: str, entry: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {entry!r}")
    return int(text)


@dataclass(frozen=True, **SLOTS)
class ProcessFilter:
    """`[processes]`: which processes the pipeline looks at, by name.

    A name is a process's ``comm``, its systemd unit (``nginx.service``) or its label
    (container name); patterns are shell wildcards (``nginx*``, ``*.service``), matched
    case-sensitively. A process is selected when ``include`` is empty or one of its names
    matches an include pattern, and none matches an exclude pattern. pid and cgroup
    filters are `[capture]`'s and act in the kernel; these act on the first bytes of each
    connection (the kernel is then told to ignore it).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    _include_re: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)
    _exclude_re: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for attr, patterns in (("_include_re", self.include), ("_exclude_re", self.exclude)):
            if patterns:
                regex = "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)
                object.__setattr__(self, attr, re.compile(regex))

    @property
    def active(self) -> bool:
        return bool(self.include or self.exclude)

    def selects(self, *names: str | None) -> bool:
        present = [n for n in names if n]
        inc, exc = self._include_re, self._exclude_re
        if inc is not None and not any(inc.match(n) for n in present):
            return False
        return exc is None or not any(exc.match(n) for n in present)


#: `[sensitive]` keys naming one detector each: "email" -> "sensitive.email".
DETECTOR_KEYS: dict[str, str] = {
    code.removeprefix("sensitive."): code for code in SENSITIVE_DETECTORS
}


@dataclass(frozen=True, **SLOTS)
class CaptureSettings:
    ring_buffer_bytes: int = 16 << 20
    max_copy_bytes: int = 262144  # per syscall; the rest is counted as truncated
    include_pids: tuple[int, ...] = ()
    exclude_pids: tuple[int, ...] = ()
    include_cgroups: tuple[int, ...] = ()
    exclude_cgroups: tuple[int, ...] = ()
    exclude_ports: tuple[int, ...] = ()
    poll_timeout_ms: int = 100
    # "idle": while the capture sheds (the ring is full), the traffic is far beyond the
    # loop (below), or the loop is busy (half a CPU or more), the analysis thread runs
    # SCHED_IDLE (only CPU no workload wants; lifted when it starves). "normal": always an
    # ordinary thread.
    scheduling: str = "idle"
    # While more than twice what the loop can analyse on a whole CPU goes unread (shed by the
    # kernel, or piling up in the ring: it can only see a sample then), the loop also sleeps
    # so as to use at most this percentage of one CPU (100: no cap); what it leaves unread is
    # shed and counted. Below that it runs uncapped and catches up.
    shed_cpu_percent: int = 5


SCHEDULING = ("idle", "normal")


@dataclass(frozen=True, **SLOTS)
class Config:
    egress_allow: tuple[EgressRule, ...] = field(
        default_factory=lambda: tuple(EgressRule.parse(e) for e in DEFAULT_ALLOW)
    )
    limits: Limits = field(default_factory=Limits)
    sensitive: bool = True
    # Detector codes switched on (keys of propagation.SENSITIVE_DETECTORS).
    sensitive_detectors: frozenset[str] = frozenset(SENSITIVE_DETECTORS)
    processes: ProcessFilter = field(default_factory=ProcessFilter)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    metrics_addr: str = DEFAULT_METRICS_ADDR
    audit_log: str | None = None
    audit_key_file: str | None = None  # default: hopwatch-audit.key beside the log
    audit_max_bytes: int = 64 << 20
    audit_backups: int = 5
    max_process_labels: int = 200
    max_peer_labels: int = 500
    max_connections: int = 200_000
    source: str = "<defaults>"

    @property
    def sensitive_selection(self) -> bool | frozenset[str]:
        """What `check_message(sensitive=...)` takes: True (all), False (none) or a set."""
        if not self.sensitive or not self.sensitive_detectors:
            return False
        if self.sensitive_detectors >= frozenset(SENSITIVE_DETECTORS):
            return True
        return self.sensitive_detectors

    def summary(self) -> str:
        """The effective configuration, for a person (`hopwatch config check`)."""
        lim = self.limits
        cap = self.capture
        off = sorted(k for k, c in DETECTOR_KEYS.items() if c not in self.sensitive_detectors)
        if not self.sensitive:
            sensitive = "off"
        elif off:
            sensitive = f"on, except {', '.join(off)}"
        else:
            sensitive = f"on (all {len(DETECTOR_KEYS)} detectors)"
        procs = self.processes

        def listed(items: tuple[object, ...]) -> str:
            return ", ".join(str(i) for i in items) if items else "-"

        lines = [
            f"source: {self.source}",
            f"egress allow: {listed(tuple(r.text for r in self.egress_allow))}",
            f"limits: baggage {lim.baggage_bytes} bytes / {lim.baggage_members} members; "
            f"tracestate {lim.tracestate_bytes} bytes / {lim.tracestate_members} members; "
            f"header block {lim.header_block_bytes} bytes",
            f"sensitive baggage: {sensitive}",
            f"processes: include {listed(procs.include)}; exclude {listed(procs.exclude)}",
            f"capture: ring buffer {cap.ring_buffer_bytes} bytes; copy cap "
            f"{cap.max_copy_bytes} bytes/syscall; filters: {_capture_filters(cap)}",
            f"metrics: {self.metrics_addr}; label caps: process {self.max_process_labels}, "
            f"peer {self.max_peer_labels}",
            f"audit log: {self.audit_log or 'off'}"
            + (
                f" (rotate at {self.audit_max_bytes} bytes, keep {self.audit_backups})"
                if self.audit_log
                else ""
            ),
            f"connections: at most {self.max_connections}",
        ]
        return "\n".join(lines)


def _capture_filters(cap: CaptureSettings) -> str:
    parts = [
        f"{what} {', '.join(str(v) for v in values)}"
        for what, values in (
            ("only pids", cap.include_pids),
            ("not pids", cap.exclude_pids),
            ("only cgroups", cap.include_cgroups),
            ("not cgroups", cap.exclude_cgroups),
            ("not ports", cap.exclude_ports),
        )
        if values
    ]
    return "; ".join(parts) if parts else "none"


# section -> key -> (type, attribute path)
_INT = int
_SCHEMA: dict[str, dict[str, tuple[type, str]]] = {
    "egress": {"allow": (list, "egress_allow")},
    "limits": {
        "baggage_bytes": (_INT, "limits.baggage_bytes"),
        "baggage_members": (_INT, "limits.baggage_members"),
        "tracestate_members": (_INT, "limits.tracestate_members"),
        "tracestate_bytes": (_INT, "limits.tracestate_bytes"),
        "header_block_bytes": (_INT, "limits.header_block_bytes"),
    },
    "sensitive": {
        "enabled": (bool, "sensitive"),
        **{key: (bool, f"detector.{code}") for key, code in DETECTOR_KEYS.items()},
    },
    "processes": {
        "include": (list, "processes.include"),
        "exclude": (list, "processes.exclude"),
    },
    "capture": {
        "ring_buffer_bytes": (_INT, "capture.ring_buffer_bytes"),
        "max_copy_bytes": (_INT, "capture.max_copy_bytes"),
        "include_pids": (list, "capture.include_pids"),
        "exclude_pids": (list, "capture.exclude_pids"),
        "include_cgroups": (list, "capture.include_cgroups"),
        "exclude_cgroups": (list, "capture.exclude_cgroups"),
        "exclude_ports": (list, "capture.exclude_ports"),
        "poll_timeout_ms": (_INT, "capture.poll_timeout_ms"),
        "scheduling": (str, "capture.scheduling"),
        "shed_cpu_percent": (_INT, "capture.shed_cpu_percent"),
    },
    "metrics": {
        "addr": (str, "metrics_addr"),
        "max_process_labels": (_INT, "max_process_labels"),
        "max_peer_labels": (_INT, "max_peer_labels"),
    },
    "audit": {
        "path": (str, "audit_log"),
        "key_file": (str, "audit_key_file"),
        "max_bytes": (_INT, "audit_max_bytes"),
        "backups": (_INT, "audit_backups"),
    },
    "connections": {"max": (_INT, "max_connections")},
}


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Best-effort line number of `key` inside `[section]` (or of the section header)."""
    current = ""
    section_line = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.fullmatch(r"\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1)
            if current == section:
                section_line = number
            continue
        if current == section and key is not None and re.match(rf"{re.escape(key)}\s*=", line):
            return number
    return section_line


def parse_config(text: str, *, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            f"not valid TOML: {exc}", source=source, line=int(match.group(1)) if match else None
        ) from None
    return _from_mapping(data, text=text, source=source)


def load_config(path: str | Path | None) -> Config:
    """The built-in defaults when `path` is None; else the file, validated."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=str(p)) from None
    return parse_config(text, source=str(p))


def _from_mapping(data: Mapping[str, Any], *, text: str, source: str) -> Config:
    values: dict[str, Any] = {}
    errors: list[ConfigError] = []

    def fail(msg: str, section: str, key: str | None = None) -> None:
        errors.append(ConfigError(msg, source=source, line=_line_of(text, section, key)))

    for section, body in data.items():
        if section not in _SCHEMA:
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            fail(f"unknown section [{section}] (known: {known})", section)
            continue
        if not isinstance(body, dict):
            fail(f"[{section}] must be a table", section)
            continue
        for key, value in body.items():
            spec = _SCHEMA[section].get(key)
            if spec is None:
                known = ", ".join(_SCHEMA[section])
                fail(f"unknown key {key!r} in [{section}] (known: {known})", section, key)
                continue
            checked = _check_value(section, key, value, spec)
            if isinstance(checked, _Problem):
                fail(checked.message, section, key)
                continue
            values[spec[1]] = checked

    limits = Limits(
        **{
            f.name: values.pop(f"limits.{f.name}")
            for f in fields(Limits)
            if f"limits.{f.name}" in values
        }
    )
    capture = CaptureSettings(
        **{
            f.name: values.pop(f"capture.{f.name}")
            for f in fields(CaptureSettings)
            if f"capture.{f.name}" in values
        }
    )
    if (
        capture.ring_buffer_bytes & (capture.ring_buffer_bytes - 1)
        or capture.ring_buffer_bytes < 4096
    ):
        fail(
            "capture.ring_buffer_bytes must be a power of two >= 4096",
            "capture",
            "ring_buffer_bytes",
        )
    detectors = set(SENSITIVE_DETECTORS)
    for code in SENSITIVE_DETECTORS:
        switch = values.pop(f"detector.{code}", None)
        if switch is False:
            detectors.discard(code)
    processes = ProcessFilter(
        include=values.pop("processes.include", ()), exclude=values.pop("processes.exclude", ())
    )
    if errors:
        first = errors[0]
        raise ConfigError(first.message, source=source, line=first.line, errors=tuple(errors))
    return Config(
        limits=limits,
        capture=capture,
        sensitive_detectors=frozenset(detectors),
        processes=processes,
        source=source,
        **values,
    )


@dataclass(frozen=True, **SLOTS)
class _Problem:
    message: str


def _check_value(section: str, key: str, value: Any, spec: tuple[type, str]) -> Any:
    """The value to store for ``section.key``, or a `_Problem` saying what is wrong."""
    typ, target = spec
    if typ is _INT and (not isinstance(value, int) or isinstance(value, bool)):
        return _Problem(f"{section}.{key} must be an integer")
    if typ is _INT and value < 0:
        return _Problem(f"{section}.{key} must not be negative")
    if typ in (bool, str, list) and not isinstance(value, typ):
        return _Problem(f"{section}.{key} must be a {typ.__name__}")
    if target == "egress_allow":
        try:
            return tuple(EgressRule.parse(str(v)) for v in value)
        except ValueError as exc:
            return _Problem(f"egress.allow: {exc}")
    if target.startswith("capture.") and typ is list:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return _Problem(f"{section}.{key} must be a list of integers")
        return tuple(value)
    if target.startswith("processes."):
        if not all(isinstance(v, str) and v.strip() for v in value):
            return _Problem(f"{section}.{key} must be a list of non-empty names or patterns")
        return tuple(v.strip() for v in value)
    if target == "capture.shed_cpu_percent" and not 1 <= value <= 100:
        return _Problem("capture.shed_cpu_percent must be between 1 and 100")
    if target == "capture.scheduling" and value not in SCHEDULING:
        return _Problem(f"capture.scheduling must be one of {', '.join(map(repr, SCHEDULING))}")
    if target == "metrics_addr":
        try:
            split_host_port(value)
        except ValueError as exc:
            return _Problem(f"metrics.addr: {exc}")
    return value


def split_host_port(addr: str) -> tuple[str, int]:
    """'127.0.0.1:9647', '[::1]:9647', ':9647' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
