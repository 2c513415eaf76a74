"""Shared fixtures. Kernel tests need root: without it they FAIL (never skip)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Daemon, NetNS, veth_namespace


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


@pytest.fixture(scope="session")
def netns() -> Iterator[NetNS]:
    """A network namespace joined to the root namespace by a veth pair (10.213.x.0/30)."""
    with veth_namespace("hw", "10.213") as ns:
        yield ns
