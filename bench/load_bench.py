"""Overhead and completeness under load (issue 7, part 1); writes bench/RESULTS-load.md
(the daemon on CPython: `HOPWATCH_RUNTIME=cpython`) or bench/RESULTS-load-pypy.md (PyPy).

(a) steady: bench/pacer.c (constant rate, keep-alive, traceparent on every request, latency
    from the time each request was due) against nginx on loopback, without and then with
    the daemon: requests completed vs messages the daemon counted, daemon CPU per observed
    message, client p99 with and without.
(b) saturation: wrk against nginx `return 200`, rounds without and with the daemon
    interleaved: throughput ratio, every shed event (events_lost_total deltas), daemon CPU
    and RSS.

Run as root after `make setup`:  .venv/bin/python bench/load_bench.py [--rate 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import Daemon, Snapshot, free_port, named, nginx_args, server

BENCH = Path(__file__).resolve().parent
TRACEPARENT = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
KEEPALIVE = "keepalive_requests 100000000; keepalive_timeout 300s;"
DATA_SYSCALLS = ("write", "writev", "read", "recvfrom")  # what wrk and nginx use
PEERS = ("lb_pacer", "lb_wrk", "lb_nginx")  # the processes whose messages the bench counts


@contextmanager
def trivial_programs(
    edges: tuple[str, ...] | None = None, syscalls: tuple[str, ...] = DATA_SYSCALLS
) -> Iterator[None]:
    """Programs that only return 0 on the tracepoints of the data syscalls wrk and nginx
    use that the daemon attaches (`edges`, default: the exit alone where it reads the
    arguments from the saved registers, else enter and exit): the floor any capture on
    those tracepoints costs."""
    from hopwatch._bcc import import_bcc
    from hopwatch.capture.live import regs_args_supported
    from hopwatch.kernel import prepare_kernel

    if edges is None:
        edges = ("exit",) if regs_args_supported() else ("enter", "exit")
    prepare_kernel()  # the headers bcc compiles against (BCC_KERNEL_SOURCE)
    text = "".join(
        f"TRACEPOINT_PROBE(syscalls, sys_{edge}_{s}) {{ return 0; }}\n"
        for s in syscalls
        for edge in edges
    )
    b = import_bcc().BPF(text=text)
    try:
        yield
    finally:
        b.cleanup()


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def msgs(s: Snapshot, **labels: str) -> float:
    return s.total("hopwatch_http_messages_total", **labels)


def lost_by_reason(delta: Snapshot) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in delta.samples.items():
        if name == "hopwatch_events_lost_total" and v:
            out[dict(labels)["reason"]] = v
    return out


def pacer(exe: str, port: int, conns: int, rate: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [exe, "127.0.0.1", str(port), str(conns), str(rate), str(seconds), TRACEPARENT],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def wrk(exe: str, port: int, seconds: int, conns: int) -> dict[str, float]:
    out = subprocess.run(
        [exe, "-t1", f"-c{conns}", f"-d{seconds}s", "-H", TRACEPARENT, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)s", out)
    assert m, out
    return {"requests": float(m.group(1)), "seconds": float(m.group(2))}


def steady(
    tmp: Path, port: int, pacer_exe: str, rate: int, seconds: float, warmup: float
) -> dict[str, Any]:
    res: dict[str, Any] = {"rate": rate, "seconds": seconds}
    res["without"] = pacer(pacer_exe, port, 64, rate, seconds)
    d = Daemon(tmp, name="hw_load")
    try:
        info = d.python_info()
        res["runtime"] = f"{info['implementation']} {info['version']}"
        if warmup:
            # PyPy's JIT compiles the hot path during the first seconds of traffic: that
            # phase is measured on its own, before the steady one.
            before = d.settle(processes=PEERS)
            cpu0 = cpu_seconds(d.proc.pid)
            done = pacer(pacer_exe, port, 64, rate, warmup)["completed"]
            delta = d.settle(timeout=30, processes=PEERS) - before
            cpu = cpu_seconds(d.proc.pid) - cpu0
            res["warmup"] = {
                "seconds": warmup,
                "completed": done,
                "client_requests_counted": msgs(
                    delta, process="lb_pacer", direction="outbound", kind="request"
                ),
                "cpu_s": cpu,
                "cpu_us_per_message": cpu
                / max(1.0, delta.total("hopwatch_http_messages_total"))
                * 1e6,
            }
        before = d.settle(processes=PEERS)
        cpu0 = cpu_seconds(d.proc.pid)
        res["with"] = pacer(pacer_exe, port, 64, rate, seconds)
        after = d.settle(timeout=30, processes=PEERS)
        cpu = cpu_seconds(d.proc.pid) - cpu0
        delta = after - before
        client_req = msgs(delta, process="lb_pacer", direction="outbound", kind="request")
        server_req = msgs(delta, process="lb_nginx", direction="inbound", kind="request")
        observed = msgs(delta, process="lb_pacer") + msgs(delta, process="lb_nginx")
        res["daemon"] = {
            "client_requests_counted": client_req,
            "server_requests_counted": server_req,
            "w3c_client_requests": msgs(
                delta, process="lb_pacer", direction="outbound", kind="request", context="w3c"
            ),
            "messages_observed": observed,
            "all_messages": delta.total("hopwatch_http_messages_total"),
            "cpu_s": cpu,
            "cpu_us_per_message": cpu / max(1.0, delta.total("hopwatch_http_messages_total")) * 1e6,
            "rss_mib": rss_mib(d.proc.pid),
            "lost": lost_by_reason(delta),
            "desyncs": delta.total("hopwatch_stream_desyncs_total"),
        }
    finally:
        d.stop()
    return res


def saturation(
    tmp: Path, port: int, wrk_exe: str, rounds: int, seconds: int, warmup: int
) -> dict[str, Any]:
    without: list[dict[str, float]] = []
    trivial: list[dict[str, float]] = []
    stopped: list[dict[str, float]] = []
    with_: list[dict[str, Any]] = []

    def baselines() -> None:
        without.append(wrk(wrk_exe, port, seconds, 32))
        with trivial_programs():
            trivial.append(wrk(wrk_exe, port, seconds, 32))

    for r in range(rounds):
        # ABBA: odd rounds run the daemon first, so a VM drifting during a round biases
        # half the rounds one way and half the other.
        if r % 2 == 0:
            baselines()
        sub = tmp / f"sat{r}"
        sub.mkdir()
        d = Daemon(sub, name="hw_load")
        try:
            if warmup:
                # A daemon that has run a while, as on a node (PyPy's JIT compiles the live
                # paths in its first seconds of traffic): not measured.
                wrk(wrk_exe, port, warmup, 32)
                d.settle(timeout=60, processes=PEERS)
            before = d.settle(processes=PEERS)
            cpu0 = cpu_seconds(d.proc.pid)
            w = wrk(wrk_exe, port, seconds, 32)
            cpu_wrk = cpu_seconds(d.proc.pid) - cpu0  # while the load lasted
            after = d.settle(timeout=60, processes=PEERS)
            delta = after - before
            rss, hwm = rss_mib(d.proc.pid), rss_mib(d.proc.pid, "VmHWM")
            cpu_all = cpu_seconds(d.proc.pid) - cpu0
            # The kernel side alone: the same load with the daemon stopped (SIGSTOP), its
            # programs attached and its ring full, so every data syscall takes the shedding
            # path. Against `without`, what the probes cost; against `with`, what the
            # running loop adds (its CPU, and the records it makes room for).
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                stopped.append(wrk(wrk_exe, port, seconds, 32))
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)  # then stopped below, its ring unread
            with_.append(
                {
                    **w,
                    "cpu_wrk_s": cpu_wrk,
                    "cpu_s": cpu_all,  # and the drain after it
                    "rss_mib": rss,
                    "hwm_mib": hwm,
                    "client_requests_counted": msgs(
                        delta, process="lb_wrk", direction="outbound", kind="request"
                    ),
                    "server_requests_counted": msgs(
                        delta, process="lb_nginx", direction="inbound", kind="request"
                    ),
                    "lost": lost_by_reason(delta),
                    "gap_bytes": delta.total("hopwatch_stream_gap_bytes_total"),
                    "desyncs": delta.total("hopwatch_stream_desyncs_total"),
                }
            )
        finally:
            d.stop()
        if r % 2 == 1:
            baselines()
    rps_without, rps_trivial, rps_with, rps_stopped = (
        [w["requests"] / w["seconds"] for w in runs] for runs in (without, trivial, with_, stopped)
    )
    return {
        "rounds": rounds,
        "seconds": seconds,
        "warmup": warmup,
        "without": without,
        "with": with_,
        "rps_without": rps_without,
        "rps_with": rps_with,
        "stopped": stopped,
        "rps_stopped": rps_stopped,
        "trivial": trivial,
        "rps_trivial": rps_trivial,
        "ratio": sum(rps_with) / sum(rps_without),
        "floor_ratio": sum(rps_trivial) / sum(rps_without),
        "kernel_ratio": sum(rps_stopped) / sum(rps_without),
        "loop_ratio": sum(rps_with) / sum(rps_stopped),
        "median_round_ratio": statistics.median(
            b / a for a, b in zip(rps_without, rps_with, strict=True)
        ),
    }


def warmup_lines(st: dict[str, Any]) -> list[str]:
    wu = st.get("warmup")
    if not wu:
        return []
    return [
        f"Before it, the same load for {wu['seconds']:g} s (warm-up, measured apart: on PyPy the "
        f"JIT compiles then): {wu['client_requests_counted']:.0f} / {wu['completed']} client "
        f"requests counted, {wu['cpu_us_per_message']:.2f} µs of daemon CPU per message.",
        "",
    ]


def report(st: dict[str, Any], sat: dict[str, Any]) -> str:
    w, wo, dm = st["with"], st["without"], st["daemon"]
    completed = w["completed"]
    lines = [
        "# Load benchmark (bench/load_bench.py)",
        "",
        f"Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}. Written by "
        "`.venv/bin/python bench/load_bench.py` (root).",
        "",
        "## (a) Steady load",
        "",
        f"bench/pacer.c: {st['rate']} requests/s for {st['seconds']} s over 64 keep-alive "
        "connections to nginx `return 200` (1 worker) on loopback, `traceparent` on every "
        "request; latency measured from the time each request was due. The daemon runs on "
        f"{st['runtime']}.",
        "",
        *warmup_lines(st),
        "| | requests completed | achieved req/s | p50 µs | p99 µs | p99.9 µs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| without daemon | {wo['completed']} | {wo['rate']:.0f} | {wo['p50_us']} | "
        f"{wo['p99_us']} | {wo['p999_us']} |",
        f"| with daemon | {w['completed']} | {w['rate']:.0f} | {w['p50_us']} | "
        f"{w['p99_us']} | {w['p999_us']} |",
        "",
        "| daemon | value |",
        "| --- | ---: |",
        f"| client requests counted / completed | {dm['client_requests_counted']:.0f} / "
        f"{completed} = {100 * dm['client_requests_counted'] / completed:.3f} % |",
        f"| nginx inbound requests counted / completed | {dm['server_requests_counted']:.0f} / "
        f"{completed} = {100 * dm['server_requests_counted'] / completed:.3f} % |",
        f"| client requests counted as w3c | {dm['w3c_client_requests']:.0f} |",
        f"| messages observed (all processes) | {dm['all_messages']:.0f} |",
        f"| daemon CPU | {dm['cpu_s']:.2f} s |",
        f"| daemon CPU per observed message | {dm['cpu_us_per_message']:.2f} µs |",
        f"| daemon RSS | {dm['rss_mib']:.0f} MiB |",
        f"| lost events by reason | {dm['lost'] or 'none'} |",
        f"| stream desyncs | {dm['desyncs']:.0f} |",
        "",
        "## (b) Saturation",
        "",
        f"`wrk -t1 -c32 -d{sat['seconds']}s -H traceparent:...` against the same nginx, "
        f"{sat['rounds']} rounds, each without and with the daemon (started fresh, then "
        f"{sat['warmup']} s of the same load not measured), the order alternating (ABBA: odd "
        "rounds run the daemon first). After the measured run, the same load once more with "
        "the daemon stopped (SIGSTOP: its programs attached, its ring full, so every data "
        "syscall takes the kernel's shedding path): the kernel side alone. Next to the run "
        "without, the same load with trivial programs (`return 0`) on the tracepoints of the "
        "four data syscalls wrk and nginx use that the daemon attaches (on x86-64 the exit "
        "alone: it reads the arguments from the saved registers): the floor any capture on "
        "those tracepoints costs.",
        "",
        "| round | req/s without | req/s with | ratio | req/s daemon stopped | "
        "req/s trivial programs | daemon CPU s "
        "during wrk (with the drain after) | RSS MiB (peak) | "
        "client requests counted | nginx requests counted | lost by reason | gap bytes | "
        "desyncs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: "
        "| ---: |",
    ]
    rows = zip(
        sat["rps_without"],
        sat["rps_with"],
        sat["rps_stopped"],
        sat["rps_trivial"],
        sat["with"],
        strict=True,
    )
    for i, (a, b, c, t, x) in enumerate(rows):
        lines.append(
            f"| {i + 1} | {a:.0f} | {b:.0f} | {b / a:.3f} | {c:.0f} | {t:.0f} | "
            f"{x['cpu_wrk_s']:.2f} "
            f"({x['cpu_s']:.1f}) | "
            f"{x['rss_mib']:.0f} ({x['hwm_mib']:.0f}) | {x['client_requests_counted']:.0f} / "
            f"{x['requests']:.0f} | {x['server_requests_counted']:.0f} | {x['lost'] or 'none'} | "
            f"{x['gap_bytes']:.0f} | {x['desyncs']:.0f} |"
        )
    lines += [
        "",
        f"Throughput with ÷ without (sum over rounds): **{sat['ratio']:.3f}**; the median "
        f"of the rounds' ratios: {sat['median_round_ratio']:.3f}. The kernel side alone "
        f"(stopped ÷ without): {sat['kernel_ratio']:.3f}; the running loop on top of it "
        f"(with ÷ stopped): {sat['loop_ratio']:.3f}. Trivial programs ÷ without (the "
        f"floor): {sat['floor_ratio']:.3f}.",
        "",
        "Raw figures:",
        "",
        "```json",
        json.dumps({"steady": st, "saturation": sat}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=5, help="seconds of load before (a)")
    ap.add_argument("--rounds", type=int, default=12)  # a round moves by ±0.15 here
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument(
        "--wrk-warmup", type=int, default=5, help="seconds of wrk before each measured round"
    )
    ap.add_argument("--out", help="default: by the daemon's runtime (RESULTS-load[-pypy].md)")
    ap.add_argument(
        "--saturation-only", action="store_true", help="(b) alone, printed; no RESULTS file"
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hw-load-"))
    try:
        subprocess.run(["gcc", "-O2", "-o", str(tmp / "pacer"), str(BENCH / "pacer.c")], check=True)
        pacer_exe = named(tmp, "lb_pacer", str(tmp / "pacer"))
        wrk_exe = named(tmp, "lb_wrk", "wrk")
        port = free_port()
        with server(nginx_args(tmp, "lb_nginx", f"127.0.0.1:{port}", KEEPALIVE), port):
            if not args.saturation_only:
                st = steady(tmp, port, pacer_exe, args.rate, args.seconds, args.warmup)
                print(json.dumps(st), flush=True)
            sat = saturation(tmp, port, wrk_exe, args.rounds, args.wrk_seconds, args.wrk_warmup)
            print(json.dumps(sat), flush=True)
        if args.saturation_only:
            print(
                f"saturation: with/without {sat['ratio']:.3f} (median "
                f"{sat['median_round_ratio']:.3f}), stopped/without {sat['kernel_ratio']:.3f}, "
                f"with/stopped {sat['loop_ratio']:.3f}, trivial/without {sat['floor_ratio']:.3f}"
            )
            return 0
        out = args.out or str(
            BENCH / ("RESULTS-load-pypy.md" if "PyPy" in st["runtime"] else "RESULTS-load.md")
        )
        Path(out).write_text(report(st, sat))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
