"""The analysis loop yields the CPU (SCHED_IDLE) and is lifted when it starves."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hopwatch.scheduling import IdleScheduling
from tests.helpers import Daemon


def _policy(tid: int) -> int:
    return os.sched_getscheduler(tid)


def _in_thread(body: Callable[[], None]) -> None:
    """Run ``body`` in a fresh thread (policies are per thread: keep pytest's own intact)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def test_loop_thread_idles_guard_keeps_ordinary_policy() -> None:
    def body() -> None:
        s = IdleScheduling(starve_s=5.0)
        assert s.start()
        try:
            assert _policy(0) == os.SCHED_IDLE
            guard = next(t for t in threading.enumerate() if t.name == "hopwatch-guard")
            assert guard.native_id is not None
            assert _policy(guard.native_id) == os.SCHED_OTHER
            s.beat()
            assert _policy(0) == os.SCHED_IDLE and s.boosts == 0
        finally:
            s.stop()
        assert _policy(0) == os.SCHED_OTHER
        assert not any(t.name == "hopwatch-guard" for t in threading.enumerate())

    _in_thread(body)


def test_starved_loop_is_lifted_for_one_iteration() -> None:
    def body() -> None:
        s = IdleScheduling(starve_s=0.2)
        assert s.start()
        try:
            # No beat for longer than starve_s: the guard lifts this thread.
            deadline = time.monotonic() + 5
            while s.boosts == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.boosts == 1
            assert _policy(0) == os.SCHED_OTHER
            s.beat()  # the iteration ended: idle again
            assert _policy(0) == os.SCHED_IDLE
            # Beating often enough: never lifted again.
            for _ in range(10):
                time.sleep(0.05)
                s.beat()
            assert s.boosts == 1 and _policy(0) == os.SCHED_IDLE
        finally:
            s.stop()

    _in_thread(body)


def test_urgent_work_takes_the_ordinary_policy_until_done() -> None:
    def body() -> None:
        s = IdleScheduling(starve_s=5.0)
        assert s.start()
        try:
            s.beat(urgent=True)  # connection events queued: do not wait for idle CPU
            assert _policy(0) == os.SCHED_OTHER and s.urgent == 1
            s.beat(urgent=True)  # still urgent: stays, counted once
            assert _policy(0) == os.SCHED_OTHER and s.urgent == 1
            s.beat()  # caught up
            assert _policy(0) == os.SCHED_IDLE and s.urgent == 1 and s.boosts == 0
        finally:
            s.stop()

    _in_thread(body)


@pytest.mark.kernel
def test_daemon_loop_idles_and_metrics_thread_does_not(daemon: Daemon) -> None:
    pid = daemon.proc.pid
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    policies = {tid: _policy(tid) for tid in tids}
    assert policies[pid] == os.SCHED_IDLE  # the main thread runs the loop
    # The /metrics server (and the guard) keep the ordinary policy: scrapes answer.
    assert sum(p == os.SCHED_OTHER for tid, p in policies.items() if tid != pid) >= 2
    names = {name for name, _labels in daemon.scrape().samples}
    assert "hopwatch_capture_scheduling_boosts_total" in names


@pytest.mark.kernel
def test_scheduling_normal_keeps_the_loop_ordinary(tmp_path: Path) -> None:
    d = Daemon(tmp_path, config='[capture]\nscheduling = "normal"\n', name="hw_sched_normal")
    try:
        d.settle()
        assert _policy(d.proc.pid) == os.SCHED_OTHER
        assert d.scrape().total("hopwatch_capture_scheduling_boosts_total") == 0
    finally:
        assert d.stop() == 0
