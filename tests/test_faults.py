"""Faults on the real kernel (issue 7, part 5): kill -9 under load, peers dying mid-request,
a full audit-log disk, invalid configurations."""

from __future__ import annotations

import contextlib
import errno
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    HOPWATCH,
    REPO,
    SYSTEM_PYTHON,
    Daemon,
    Snapshot,
    free_port,
    named,
    nginx_args,
    run,
    server,
    wait_for,
)

TRACEPARENT = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
KEEPALIVE = "keepalive_requests 1000000; keepalive_timeout 300s;"

LOAD = """
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
while True:
    c.request("GET", "/load", headers={"traceparent": sys.argv[2]})
    c.getresponse().read()
"""


def bpf_prog_ids(pid: int) -> set[int]:
    """The ids of the BPF programs a process holds open (its fdinfo)."""
    ids: set[int] = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            m = re.search(r"^prog_id:\s+(\d+)", info.read_text(), re.M)
            if m:
                ids.add(int(m.group(1)))
    return ids


def loaded_prog_ids() -> set[int]:
    out = run(["bpftool", "-j", "prog", "list"]).stdout
    return {int(p["id"]) for p in json.loads(out)}


@pytest.mark.kernel
def test_kill9_under_load_leaves_no_program_and_a_restart_counts_exactly(
    tmp_path: Path,
) -> None:
    port = free_port()
    with server(nginx_args(tmp_path, "ft_nginx", f"127.0.0.1:{port}", KEEPALIVE), port):
        load = subprocess.Popen(
            [named(tmp_path, "ft_load", SYSTEM_PYTHON), "-c", LOAD, str(port), TRACEPARENT[13:]]
        )
        try:
            d = Daemon(tmp_path, name="hw_kill9")
            ours = bpf_prog_ids(d.proc.pid)
            assert len(ours) >= 10, ours  # the syscall tracepoints, copy chain, uprobes
            assert ours <= loaded_prog_ids()
            # The load never pauses: wait until the daemon counts it, mid-load.
            assert wait_for(
                lambda: d.scrape().total("hopwatch_http_messages_total", process="ft_load") > 0
            )
            d.proc.kill()  # SIGKILL, mid-load: no shutdown code runs
            d.proc.wait(10)
            # The kernel detaches and frees what the dead process held (its fds closed).
            assert wait_for(lambda: not (ours & loaded_prog_ids())), ours & loaded_prog_ids()
        finally:
            load.kill()
            load.wait()

        # A restart resumes counting exactly.
        (tmp_path / "restart").mkdir()
        d2 = Daemon(tmp_path / "restart", name="hw_kill9b")
        try:
            before = d2.scrape()
            n = 40
            url = f"http://127.0.0.1:{port}/again"
            run(
                [named(tmp_path, "ft_curl", "curl"), "-sS", "-o", "/dev/null", "-H", TRACEPARENT]
                + [url] * n
            )
            delta = d2.settle() - before
            assert (
                delta.total(
                    "hopwatch_http_messages_total",
                    process="ft_curl",
                    direction="outbound",
                    kind="request",
                    context="w3c",
                )
                == n
            )
            assert (
                delta.total(
                    "hopwatch_http_messages_total",
                    process="ft_nginx",
                    direction="inbound",
                    kind="request",
                    context="w3c",
                )
                == n
            )
            assert delta.total("hopwatch_events_lost_total") == 0
        finally:
            assert d2.stop() == 0, d2.log_text()


def gauges(s: Snapshot) -> dict[str, float]:
    return {
        name: s.total(f"hopwatch_{name}")
        for name in (
            "connections_tracked",
            "capture_kernel_connections",
            "hop_open_requests",
            "hop_processes",
        )
    }


@pytest.mark.kernel
def test_processes_exiting_mid_request_free_their_state(tmp_path: Path) -> None:
    """A client and a server both die (SIGKILL) with requests in flight: the kernel map,
    the connection table and the hop state all let go of them."""
    port = free_port()
    k = 25
    sink = [named(tmp_path, "fx_sink", SYSTEM_PYTHON), str(REPO / "tests/peers/sink_server.py")]
    with server([*sink, str(port)], port) as sink_proc:
        client = subprocess.Popen(
            [named(tmp_path, "fx_client", SYSTEM_PYTHON), str(REPO / "tests/peers/loss_client.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None
        try:
            assert client.stdout.readline().startswith("ready")
            pids = [sink_proc.pid, client.pid]
            d = Daemon(tmp_path, config=f"[capture]\ninclude_pids = {pids}\n", name="hw_exit")
            try:
                start = d.settle()
                base = gauges(start)
                # k connections, one request each; the server never answers.
                client.stdin.write(f"open 127.0.0.1 {port} {k}\npaced {k} 0.005\n")
                client.stdin.flush()
                assert client.stdout.readline().startswith("ok")
                assert client.stdout.readline().startswith("ok")
                busy = d.settle(since=start)
                seen = gauges(busy)
                assert seen["connections_tracked"] >= base["connections_tracked"] + 2 * k
                assert (
                    seen["capture_kernel_connections"] >= base["capture_kernel_connections"] + 2 * k
                )
                assert seen["hop_open_requests"] == base["hop_open_requests"] + k
                assert busy.total("hopwatch_http_messages_total", process="fx_sink") == k

                client.kill()
                sink_proc.kill()
                client.wait()
                sink_proc.wait()
                assert wait_for(lambda: gauges(d.scrape()) == base), (base, gauges(d.scrape()))
            finally:
                assert d.stop() == 0, d.log_text()
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()


def fill(path: Path) -> None:
    """Write zeros to `path` until its file system is full."""
    block = b"\0" * 4096
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


@pytest.mark.kernel
def test_a_full_audit_disk_does_not_stop_metrics(tmp_path: Path) -> None:
    mnt = tmp_path / "auditfs"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=256k", "hw_audit_test", str(mnt)])
    try:
        port = free_port()
        with server(nginx_args(tmp_path, "fa_nginx", f"127.0.0.1:{port}"), port):
            d = Daemon(
                tmp_path,
                config=f'[audit]\npath = "{mnt / "audit.log"}"\n',
                name="hw_audit",
            )
            try:
                curl = named(tmp_path, "fa_curl", "curl")
                bad = "traceparent: 00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
                url = f"http://127.0.0.1:{port}/"

                def batch(n: int) -> Snapshot:
                    before = d.scrape()
                    run([curl, "-sS", "-o", "/dev/null", "-H", bad] + [url] * n)
                    return d.settle(since=before) - before

                ok = batch(3)
                assert ok.total("hopwatch_audit_lines_total") >= 3
                assert ok.total("hopwatch_audit_write_errors_total") == 0

                fill(mnt / "filler")
                n = 30
                full = batch(n)
                # Metrics go on: every message and finding counted; every line that could
                # not be written counted as a write error.
                assert (
                    full.total("hopwatch_http_messages_total", process="fa_curl", kind="request")
                    == n
                )
                assert (
                    full.total("hopwatch_findings_total", finding="malformed", process="fa_curl")
                    == n
                )
                assert full.total("hopwatch_audit_write_errors_total") >= n
                assert d.proc.poll() is None

                (mnt / "filler").unlink()  # space again: the log resumes
                again = batch(3)
                assert again.total("hopwatch_audit_lines_total") >= 3
                assert again.total("hopwatch_audit_write_errors_total") == 0
            finally:
                assert d.stop() == 0, d.log_text()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[capture]\n\nring_buffer_bytes = 65535\n", 3, "ring_buffer_bytes must be a power of two"),
        ("# ok\n[egress]\nallow = 7\n", 3, "egress.allow"),
        ("[limits]\nbaggage_bytes = 1\n[limits]\n", 3, ""),
        ("[capture\n", 1, ""),
    ],
)
def test_an_invalid_config_refuses_to_start_and_names_the_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    res = subprocess.run(
        [str(HOPWATCH), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res
    assert f"{cfg}:{line}" in res.stderr, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
