"""The analysis loop yields the CPU (SCHED_IDLE) while the capture sheds, without starving."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hopwatch.scheduling import IdleScheduling, budget_pause
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


def test_loop_yields_only_when_asked_and_guard_stays_ordinary() -> None:
    def body() -> None:
        s = IdleScheduling(starve_s=5.0)
        assert s.start()
        try:
            assert _policy(0) == os.SCHED_OTHER and not s.idle  # keeping up: ordinary
            guard = next(t for t in threading.enumerate() if t.name == "hopwatch-guard")
            assert guard.native_id is not None
            s.beat(yield_cpu=True)  # the capture sheds: yield
            assert _policy(0) == os.SCHED_IDLE and s.idle and s.yields == 1
            assert _policy(guard.native_id) == os.SCHED_OTHER
            s.beat(yield_cpu=True)  # still: no new switch
            assert s.yields == 1
            s.beat(yield_cpu=False)  # caught up: ordinary again
            assert _policy(0) == os.SCHED_OTHER and not s.idle and s.boosts == 0
            s.beat(yield_cpu=True)
        finally:
            s.stop()
        assert _policy(0) == os.SCHED_OTHER and s.yields == 2
        assert not any(t.name == "hopwatch-guard" for t in threading.enumerate())

    _in_thread(body)


def test_starved_loop_is_lifted() -> None:
    def body() -> None:
        s = IdleScheduling(starve_s=0.2)
        assert s.start()
        try:
            s.beat(yield_cpu=True)
            assert _policy(0) == os.SCHED_IDLE
            # No beat for longer than starve_s: the guard lifts this thread.
            deadline = time.monotonic() + 5
            while s.boosts == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.boosts == 1 and not s.idle
            assert _policy(0) == os.SCHED_OTHER
            s.beat(yield_cpu=True)  # the iteration ended, still shedding: idle again
            assert _policy(0) == os.SCHED_IDLE and s.yields == 2
            for _ in range(10):  # beating often enough: never lifted again
                time.sleep(0.05)
                s.beat(yield_cpu=True)
            assert s.boosts == 1 and _policy(0) == os.SCHED_IDLE
        finally:
            s.stop()
        assert _policy(0) == os.SCHED_OTHER

    _in_thread(body)


def _thread_names(pid: int) -> list[str]:
    return [
        Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
        for t in os.listdir(f"/proc/{pid}/task")
    ]


@pytest.mark.kernel
def test_daemon_that_keeps_up_stays_ordinary(daemon: Daemon) -> None:
    pid = daemon.proc.pid
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert all(_policy(tid) == os.SCHED_OTHER for tid in tids)
    assert _thread_names(pid).count("hopwatch-guard") == 1  # ready to yield when it sheds
    snap = daemon.scrape()
    names = {name for name, _labels in snap.samples}
    assert "hopwatch_capture_scheduling_yields_total" in names
    assert snap.total("hopwatch_capture_scheduling_idle") == 0


@pytest.mark.kernel
def test_scheduling_normal_starts_no_guard(tmp_path: Path) -> None:
    d = Daemon(tmp_path, config='[capture]\nscheduling = "normal"\n', name="hw_sched_normal")
    try:
        d.settle()
        assert "hopwatch-guard" not in _thread_names(d.proc.pid)
        assert d.scrape().total("hopwatch_capture_scheduling_yields_total") == 0
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(
    ("used", "percent", "pause"),
    [
        (0.1, 25, 0.3),  # 0.1 s of CPU then 0.3 s asleep: 25 % of one CPU
        (0.1, 50, 0.1),
        (0.1, 100, 0.0),  # no cap
        (0.5, 10, 1.0),  # capped: the loop comes back to beat the watchdog
        (0.0, 25, 0.0),
    ],
)
def test_budget_pause(used: float, percent: int, pause: float) -> None:
    assert budget_pause(used, percent) == pytest.approx(pause)
