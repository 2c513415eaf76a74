"""Scale: 100,000 tracked connections, most idle keep-alive (issue 7, part 3).

A fresh daemon, then 6 server processes (one loopback port each) and 6 client processes of
16,667 connections each (within RLIMIT_NOFILE's hard limit and the ephemeral port range).
One connection in ACTIVE_EVERY carries a request with a traceparent and gets an answer; the
rest stay idle. Reports the daemon's RSS before, with all connections open, and after they
close, the connection gauges and any loss, and writes bench/RESULTS-scale.md.

Run as root after `make setup`:  .venv/bin/python bench/scale_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import SYSTEM_PYTHON, Daemon, Snapshot, free_port, named, wait_port

BENCH = Path(__file__).resolve().parent
PEER = str(BENCH / "scale_peer.py")


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def gauges(s: Snapshot) -> dict[str, float]:
    return {
        "connections_tracked": s.total("hopwatch_connections_tracked"),
        "capture_kernel_connections": s.total("hopwatch_capture_kernel_connections"),
        "events_lost": s.total("hopwatch_events_lost_total"),
        "conn_table_full": s.total("hopwatch_events_lost_total", reason="conn_table_full"),
        "ring_full": s.total("hopwatch_events_lost_total", reason="ring_full"),
        "scheduling_yields": s.total("hopwatch_capture_scheduling_yields_total"),
        "requests_counted": s.total(
            "hopwatch_http_messages_total", process="sc_client", kind="request"
        ),
    }


def settle_gauge(d: Daemon, want: float, timeout: float = 120) -> Snapshot:
    """Scrape until the connection table holds `want` or stops moving."""
    deadline = time.monotonic() + timeout
    last, since = -1.0, time.monotonic()
    snap = d.scrape()
    while time.monotonic() < deadline:
        snap = d.scrape()
        n = snap.total("hopwatch_connections_tracked")
        if n >= want:
            return snap
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 5:
            return snap
        time.sleep(0.5)
    return snap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--active-every", type=int, default=10)
    ap.add_argument("--out", default=str(BENCH / "RESULTS-scale.md"))
    args = ap.parse_args()
    per_client = args.connections // args.clients
    tmp = Path(tempfile.mkdtemp(prefix="hw-scale-"))
    procs: list[subprocess.Popen[str]] = []
    res: dict[str, Any] = {"connections": per_client * args.clients, "clients": args.clients}
    config = "[connections]\nmax = 262144\n"
    d = Daemon(tmp, config=config, name="hw_scale")
    try:
        res["rss_idle_mib"] = rss_mib(d.proc.pid)
        info = d.python_info()
        res["runtime"] = f"{info['implementation']} {info['version']}"
        base = gauges(d.settle())
        ports = [free_port() for _ in range(args.clients)]
        # One server process per port: each holds at most one client's connections (the
        # RLIMIT_NOFILE hard limit cannot be raised without CAP_SYS_RESOURCE).
        servers = [
            subprocess.Popen(
                [named(tmp, "sc_server", SYSTEM_PYTHON), PEER, "server", str(port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for port in ports
        ]
        procs += servers
        for p in ports:
            wait_port("127.0.0.1", p)
        t0 = time.monotonic()
        clients = [
            subprocess.Popen(
                [
                    named(tmp, "sc_client", SYSTEM_PYTHON),
                    PEER,
                    "client",
                    str(port),
                    str(per_client),
                    str(args.active_every),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for port in ports
        ]
        procs += clients
        for c in clients:
            assert c.stdout is not None
            line = c.stdout.readline()
            assert line.startswith("connected"), line
        res["connect_seconds"] = time.monotonic() - t0
        sockets = 2 * per_client * args.clients  # both ends are tracked
        snap = settle_gauge(d, base["connections_tracked"] + sockets)
        time.sleep(2)
        snap = d.settle(timeout=60)
        res["open"] = {k: v - base[k] for k, v in gauges(snap).items()}
        res["rss_open_mib"] = rss_mib(d.proc.pid)
        # Anonymous memory (heap, objects) and resident pages of files (the interpreter's
        # own library among them: ~7 MiB for CPython's, ~50 MiB for PyPy's libpypy).
        res["rss_anon_open_mib"] = rss_mib(d.proc.pid, "RssAnon")
        res["rss_file_open_mib"] = rss_mib(d.proc.pid, "RssFile")
        res["hwm_mib"] = rss_mib(d.proc.pid, "VmHWM")
        # Idle HTTP/1 connections give up their parser after 5 s (checked every 5 s).
        time.sleep(12)
        res["rss_open_rested_mib"] = rss_mib(d.proc.pid)
        res["tracked_sockets_expected"] = sockets
        res["requests_sent"] = sum(len(range(0, per_client, args.active_every)) for _ in clients)
        for c in clients:
            assert c.stdin is not None
            c.stdin.close()
        for c in clients:
            c.wait(120)
        snap = settle_gauge(d, 0, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snap = d.scrape()
            if snap.total("hopwatch_connections_tracked") <= base["connections_tracked"] + 10:
                break
            time.sleep(0.5)
        for srv in servers:
            srv.kill()
            srv.wait()
        time.sleep(2)
        res["closed"] = {k: v - base[k] for k, v in gauges(d.scrape()).items()}
        res["rss_closed_mib"] = rss_mib(d.proc.pid)
        res["hwm_closed_mib"] = rss_mib(d.proc.pid, "VmHWM")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1))
    o = res["open"]
    lines = [
        "# Scale benchmark (bench/scale_bench.py)",
        "",
        f"Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}. "
        "`.venv/bin/python bench/scale_bench.py` (root).",
        "",
        f"{res['connections']} loopback TCP connections from {res['clients']} client processes "
        "to as many server processes (one port each), opened in "
        f"{res['connect_seconds']:.1f} s; one in "
        f"{args.active_every} carried one request with a traceparent, the rest idle "
        "keep-alive. Both ends of each connection are tracked: "
        f"{res['tracked_sockets_expected']} (tgid, fd) entries. Daemon config: "
        "`[connections] max = 262144`.",
        "",
        "| | value |",
        "| --- | ---: |",
        f"| daemon RSS after start (idle) | {res['rss_idle_mib']:.0f} MiB |",
        f"| daemon runtime | {res['runtime']} |",
        f"| daemon RSS, all connections open | **{res['rss_open_mib']:.0f} MiB** |",
        f"| of which anonymous / file pages | {res['rss_anon_open_mib']:.0f} / "
        f"{res['rss_file_open_mib']:.0f} MiB |",
        f"| daemon RSS, all open, 12 s later (idle HTTP/1 connections at rest) | "
        f"{res['rss_open_rested_mib']:.0f} MiB |",
        f"| daemon peak RSS (VmHWM) | {res['hwm_closed_mib']:.0f} MiB |",
        f"| daemon RSS after they closed | {res['rss_closed_mib']:.0f} MiB |",
        f"| connection table (userspace) | {o['connections_tracked']:.0f} |",
        f"| kernel connection map | {o['capture_kernel_connections']:.0f} |",
        f"| requests sent / counted (client side) | {res['requests_sent']} / "
        f"{o['requests_counted']:.0f} |",
        f"| lost events (all reasons) / conn_table_full | {o['events_lost']:.0f} / "
        f"{o['conn_table_full']:.0f} |",
        f"| after close: table / kernel map | {res['closed']['connections_tracked']:.0f} / "
        f"{res['closed']['capture_kernel_connections']:.0f} |",
        "",
        "```json",
        json.dumps(res, indent=1),
        "```",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
