"""Where the kernel side's time goes under saturation: CPU per run of each eBPF program.

wrk against nginx `return 200` (as in bench/load_bench.py (b)), with the daemon running and
then stopped (SIGSTOP: its ring full, every data syscall on the shedding path), with the
kernel's BPF statistics on (`kernel.bpf_stats_enabled`, restored afterwards): run count and
nanoseconds per run of every program, from `bpftool prog show`. For comparison, trivial
programs (`return 0`) on the same data tracepoints give the floor: what the statistics
themselves and a program's invocation cost. The statistics add that floor to every run, so
the throughputs here are lower than load_bench's; only the per-program figures matter.

Run as root after `make setup`:  .venv/bin/python bench/probe_cost.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_bench import KEEPALIVE, PEERS, cpu_seconds, trivial_programs, wrk
from tests.helpers import Daemon, free_port, named, nginx_args, server


def programs() -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of every loaded program."""
    out = subprocess.run(
        ["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True
    ).stdout
    return {
        p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0))
        for p in json.loads(out)
    }


def measure(wrk_exe: str, port: int, seconds: int, pid: int | None = None) -> dict[str, Any]:
    p0, c0 = programs(), cpu_seconds(pid) if pid else 0.0
    w = wrk(wrk_exe, port, seconds, 32)
    p1, c1 = programs(), cpu_seconds(pid) if pid else 0.0
    progs = {}
    for pid_, (name, t, n) in p1.items():
        if pid_ in p0 and n > p0[pid_][2]:
            dn, dt = n - p0[pid_][2], t - p0[pid_][1]
            progs[name] = {"runs": dn, "ns_per_run": dt / dn, "cpu_s": dt / 1e9}
    return {
        "rps": w["requests"] / w["seconds"],
        "requests": w["requests"],
        "daemon_cpu_s": c1 - c0,
        "bpf_cpu_s": sum(p["cpu_s"] for p in progs.values()),
        "programs": progs,
    }


def trivial_floor(wrk_exe: str, port: int, seconds: int) -> dict[str, Any]:
    with trivial_programs():
        return measure(wrk_exe, port, seconds)


def table(label: str, m: dict[str, Any]) -> list[str]:
    lines = [
        f"### {label}: {m['rps']:,.0f} req/s, eBPF {m['bpf_cpu_s']:.2f} s of CPU "
        f"({1e9 * m['bpf_cpu_s'] / max(m['requests'], 1):.0f} ns per request), "
        f"daemon process {m['daemon_cpu_s']:.2f} s",
        "",
        "| program | runs | ns per run |",
        "| --- | ---: | ---: |",
    ]
    rows = sorted(m["programs"].items(), key=lambda kv: -kv[1]["cpu_s"])
    for name, p in rows:
        if p["runs"] >= 1000:
            lines.append(f"| `{name}` | {p['runs']:,} | {p['ns_per_run']:.0f} |")
    return [*lines, ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS-probe-cost.md"))
    args = ap.parse_args()
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text().strip()
    tmp = Path(tempfile.mkdtemp(prefix="hw-probe-"))
    out: dict[str, Any] = {}
    try:
        stats.write_text("1")
        wrk_exe = named(tmp, "lb_wrk", "wrk")
        port = free_port()
        with server(nginx_args(tmp, "lb_nginx", f"127.0.0.1:{port}", KEEPALIVE), port):
            wrk(wrk_exe, port, 3, 32)  # nginx and the page cache warm
            out["without"] = measure(wrk_exe, port, args.seconds)
            out["trivial"] = trivial_floor(wrk_exe, port, args.seconds)
            d = Daemon(tmp, name="hw_probe")
            try:
                wrk(wrk_exe, port, 5, 32)  # as load_bench: a daemon that has run a while
                d.settle(timeout=60, processes=PEERS)
                out["running"] = measure(wrk_exe, port, args.seconds, d.proc.pid)
                os.kill(d.proc.pid, signal.SIGSTOP)
                try:
                    out["stopped"] = measure(wrk_exe, port, args.seconds, d.proc.pid)
                finally:
                    os.kill(d.proc.pid, signal.SIGCONT)
            finally:
                d.stop()
    finally:
        stats.write_text(before)
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "# eBPF cost per program under saturation (bench/probe_cost.py)",
        "",
        f"Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}. `wrk -t1 -c32` against "
        f"nginx `return 200` on loopback, {args.seconds} s per slice, with the kernel's BPF "
        "statistics on (they add their own cost to every run: see `trivial`). Slices: no "
        "programs; trivial programs (`return 0`) on the data tracepoints the daemon "
        "attaches; the daemon running; the daemon stopped (SIGSTOP, its ring full: the "
        "shedding path).",
        "",
    ]
    for label in ("without", "trivial", "running", "stopped"):
        lines += table(label, out[label])
    lines += ["Raw figures:", "", "```json", json.dumps(out, indent=1), "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[:-5]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
