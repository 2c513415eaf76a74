"""Shared fixtures. Kernel tests need root: without it they FAIL (never skip)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Daemon


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None and os.geteuid() != 0:
        pytest.fail("kernel test needs root (run `make test` as root); it is never skipped")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hopwatch")


@pytest.fixture(scope="session")
def daemon(session_tmp: Path) -> Iterator[Daemon]:
    """One real `hopwatch run` for the whole session (TESTING.md)."""
    d = Daemon(session_tmp, name=f"hw_s{os.getpid() % 100000}")  # unique: other runs may watch too
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, f"hopwatch exited {rc} on SIGTERM:\n{d.log_text()}"


@dataclass(frozen=True)
class NetNS:
    name: str
    host_ip: str  # the root namespace's end of the veth pair
    ns_ip: str  # the namespace's end


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def netns() -> Iterator[NetNS]:
    """A network namespace joined to the root namespace by a veth pair (10.213.x.0/30)."""
    tag = os.getpid() % 250
    name, host_if, ns_if = f"hwt{tag}", f"hwh{tag}", f"hwn{tag}"
    ns = NetNS(name, f"10.213.{tag}.1", f"10.213.{tag}.2")
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
