"""Helpers for real-kernel tests: the daemon, /metrics snapshots, peers with unique names."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "tests" / "peers"  # the peer programs the kernel tests run
VENV = REPO / ".venv"
HOPWATCH = VENV / "bin" / "hopwatch"
SITE_PACKAGES = next((VENV / "lib").glob("python3*/site-packages"), None)
SYSTEM_PYTHON = "/usr/bin/python3"

Sample = tuple[str, frozenset[tuple[str, str]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0, netns: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if netns is None:
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
                return
        else:
            rc = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    SYSTEM_PYTHON,
                    "-c",
                    f"import socket; socket.create_connection(({host!r}, {port}), 0.2)",
                ],
                capture_output=True,
            ).returncode
            if rc == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept within {timeout}s")


@dataclass
class Snapshot:
    samples: dict[Sample, float]

    def total(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def __sub__(self, other: Snapshot) -> Delta:
        keys = set(self.samples) | set(other.samples)
        return Delta({k: self.samples.get(k, 0.0) - other.samples.get(k, 0.0) for k in keys})


@dataclass
class Delta(Snapshot):
    def series(self, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
        want = set(labels.items())
        return {ls: v for (n, ls), v in self.samples.items() if n == name and want <= ls and v}


def scrape(addr: str) -> Snapshot:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return (samples and Snapshot(samples)) or Snapshot({})


# The counters `Daemon.settle` waits on: everything the traffic under test moves, and
# nothing the settle's own scrapes move except in series labelled with this process.
_PROGRESS = (
    "hopwatch_http_messages_total",
    "hopwatch_findings_total",
    "hopwatch_hops_total",
    "hopwatch_unattributed_requests_total",
    "hopwatch_parse_errors_total",
    "hopwatch_stream_desyncs_total",
    "hopwatch_stream_gap_bytes_total",
    "hopwatch_non_http_connections_total",
    "hopwatch_unknown_fd_chunks_total",
    "hopwatch_events_lost_total",
    "hopwatch_audit_lines_total",
)


def _own_comm() -> str:
    return Path("/proc/self/comm").read_text().strip()


class Daemon:
    """A real `hopwatch run` subprocess (the console script, as an operator starts it)."""

    def __init__(
        self,
        tmp: Path,
        config: str | None = None,
        name: str = "hopwatch",
        env: Mapping[str, str] | None = None,
        exe: str | None = None,
    ) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = tmp / "hopwatch.log"
        # Started through a symlink named `name`: its comm, so tests can tell this daemon
        # from any other hopwatch on the machine.
        target = exe or str(HOPWATCH)
        exe = named(tmp, name, target) if name != "hopwatch" else target
        self.name = name
        args = [exe, "run", "--metrics-addr", self.addr]
        if config is not None:
            cfg = tmp / "hopwatch.toml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        self._logf = self.log.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env is not None else None,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hopwatch exited {self.proc.returncode}:\n{self.log_text()}")
            if "hopwatch ready" in self.log_text():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"hopwatch not ready:\n{self.log_text()}")
            time.sleep(0.05)
        self.ready_after = time.monotonic() - self.started

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def scrape(self) -> Snapshot:
        return scrape(self.addr)

    def python_info(self) -> dict[str, str]:
        """The labels of ``python_info``: which interpreter serves (implementation, version)."""
        series = [ls for (name, ls), _v in self.scrape().samples.items() if name == "python_info"]
        assert len(series) == 1, series
        return dict(series[0])

    def settle(
        self,
        timeout: float = 10.0,
        quiet: float = 0.5,
        processes: tuple[str, ...] = (),
        since: Snapshot | None = None,
    ) -> Snapshot:
        """Scrape until the capture's counters stop moving for `quiet` seconds. An overloaded
        daemon pauses on purpose (up to 1 s, its CPU budget) with records still in the ring:
        that is not settled.

        The scrapes themselves are traffic the daemon counts (this process's requests to
        /metrics, 10 per second), so they are left out: the series labelled with this
        process's name, and the chunk and byte counters, which have no process label. With
        `processes`, only the messages of those processes are watched. With `since` (the
        snapshot taken before the traffic under test), the counters must also have moved
        from it: a daemon that has not started on the traffic yet is not settled."""

        def progress(s: Snapshot) -> tuple[float, ...]:
            if processes:
                return tuple(s.total("hopwatch_http_messages_total", process=p) for p in processes)
            return tuple(
                sum(v for (n, ls), v in s.samples.items() if n == key and own not in ls)
                for key in _PROGRESS
            )

        own = ("process", _own_comm())
        start = None if since is None else progress(since)
        deadline = time.monotonic() + timeout
        last = self.scrape()
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.scrape()
            if now.total("hopwatch_capture_overloaded") or progress(now) != progress(last):
                stable_since = time.monotonic()
                last = now
            elif time.monotonic() - stable_since >= quiet and progress(now) != start:
                return now
        raise AssertionError(f"the daemon's counters did not settle within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode


@dataclass(frozen=True)
class NetNS:
    name: str
    host_ip: str  # the root namespace's end of the veth pair
    ns_ip: str  # the namespace's end


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def veth_namespace(prefix: str, subnet: str) -> Iterator[NetNS]:
    """A network namespace joined to the root namespace by a veth pair.

    `prefix` (2-3 letters) names the namespace and links, `subnet` is the first two octets
    ("10.213"); the /30 inside it and the names are unique per test run.
    """
    tag = os.getpid() % 250
    name, host_if, ns_if = f"{prefix}t{tag}", f"{prefix}h{tag}", f"{prefix}n{tag}"
    ns = NetNS(name, f"{subnet}.{tag}.1", f"{subnet}.{tag}.2")
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns.ns_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def counts(delta: Delta, process: str) -> dict[tuple[str, str, str, str], float]:
    """(direction, kind, protocol, context) -> messages counted for one process."""
    out: dict[tuple[str, str, str, str], float] = {}
    for labels, value in delta.series("hopwatch_http_messages_total", process=process).items():
        d = dict(labels)
        key = (d["direction"], d["kind"], d["protocol"], d["context"])
        out[key] = out.get(key, 0) + value
    return out


def named(tmp: Path, name: str, target: str) -> str:
    """A symlink named `name` (<= 15 chars: the kernel's comm) to the executable `target`."""
    assert len(name) <= 15, name
    real = shutil.which(target) or target
    link = tmp / "bin" / name
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(os.path.realpath(real))
    return str(link)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {listen};
        {extra}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_args(tmp: Path, name: str, listen: str, extra: str = "") -> list[str]:
    """`name` (a symlink to nginx) in the foreground with a config in `tmp`."""
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, listen=listen, extra=extra))
    return [
        named(tmp, name, "/usr/sbin/nginx"),
        "-e",
        str(tmp / "nginx-error.log"),
        "-c",
        str(conf),
    ]


def python_env() -> dict[str, str]:
    """Environment for a named system-Python peer that needs the venv's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SITE_PACKAGES) if SITE_PACKAGES else "", str(PEERS)) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` passes (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def make_env() -> dict[str, str]:
    """Environment for `make` as a user runs it: without the RUNTIME, PYPY or MAKEFLAGS of a
    `make test` that started these tests."""
    drop = {"RUNTIME", "PYPY", "PYPY_VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextlib.contextmanager
def server(
    args: list[str],
    port: int,
    *,
    host: str = "127.0.0.1",
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    full = (["ip", "netns", "exec", netns] if netns else []) + args
    proc = subprocess.Popen(
        full,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_port(host, port, netns=netns)
        except TimeoutError:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")
            raise RuntimeError(f"server {args} did not start:\n{out}") from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(
    args: list[str],
    *,
    env: Mapping[str, str] | None = None,
    netns: str | None = None,
    timeout: float = 60,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", netns] if netns else []) + args
    res = subprocess.run(
        full,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{args} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


__all__ = [
    "HOPWATCH",
    "REPO",
    "SYSTEM_PYTHON",
    "VENV",
    "Daemon",
    "Delta",
    "NetNS",
    "Snapshot",
    "counts",
    "free_port",
    "make_env",
    "named",
    "nginx_args",
    "python_env",
    "run",
    "scrape",
    "server",
    "sys",
    "veth_namespace",
    "wait_for",
    "wait_port",
]
