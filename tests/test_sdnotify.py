"""The notify protocol against a real AF_UNIX datagram socket (as systemd listens)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from hopwatch.sdnotify import Notifier


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    return s


def test_ready_stopping_reloading(tmp_path: Path) -> None:
    sock = _listen(tmp_path / "notify")
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert n.enabled
    assert n.ready("capturing")
    assert sock.recv(4096) == b"READY=1\nSTATUS=capturing"
    assert n.reloading()
    msg = sock.recv(4096).decode().split("\n")
    assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket() -> None:
    name = f"hopwatch-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(2)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
    assert s.recv(100) == b"READY=1"


def test_watchdog_pings_at_half_period(tmp_path: Path) -> None:
    sock = _listen(tmp_path / "n")
    n = Notifier(
        {
            "NOTIFY_SOCKET": str(tmp_path / "n"),
            "WATCHDOG_USEC": "2000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    assert n.watchdog_s == 2.0
    assert n.watchdog(now=100.0)
    assert not n.watchdog(now=100.5)  # within half the period
    assert n.watchdog(now=101.1)
    assert sock.recv(100) == b"WATCHDOG=1" and sock.recv(100) == b"WATCHDOG=1"


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path) -> None:
    n = Notifier(
        {"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    )
    assert n.watchdog_s is None


def test_a_watchdog_period_that_is_not_ascii_digits_is_ignored(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000\u00b3"})
    assert n.watchdog_s is None


def test_without_systemd_everything_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog()


def test_missing_socket_is_counted_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.ready()
    assert n.errors == 1
