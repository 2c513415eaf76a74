"""The analysis loop yields the CPU (SCHED_IDLE) while the capture sheds, without starving."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hopwatch.config import Config
from hopwatch.scheduling import IdleScheduling, Overload, budget_pause
from hopwatch.server import Daemon as ServerDaemon
from hopwatch.server import HeapSettle
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


def test_overload_needs_arrivals_beyond_twice_what_the_loop_takes() -> None:
    o = Overload(factor=2.0, window_s=0.5)
    assert not o.update(0.0, read=0, shed=0, cpu_s=0.0)  # the baseline
    # Within a window nothing is decided.
    assert not o.update(0.2, read=10_000, shed=500_000, cpu_s=0.2)
    # Keeping up: 20,000 records/s read in 0.5 s of CPU per s -> 40,000 per CPU second.
    assert not o.update(1.0, read=20_000, shed=0, cpu_s=0.5)
    assert o.capacity == pytest.approx(40_000) and o.arrivals == pytest.approx(20_000)
    # Shedding, but only a little (30,000/s unread < 2 x 40,000): a loop just behind must
    # keep running at full speed to catch up.
    assert not o.update(2.0, read=60_000, shed=30_000, cpu_s=1.5)
    assert o.arrivals == pytest.approx(70_000) and o.unread == pytest.approx(30_000)
    # Far beyond: 10,000 read + 500,000 shed in a second.
    assert o.update(3.0, read=70_000, shed=530_000, cpu_s=1.75)
    assert o.capacity == pytest.approx(40_000)
    # The traffic drops: the loop reads 30,000 in 0.75 s of CPU and nothing is shed.
    assert not o.update(4.0, read=100_000, shed=530_000, cpu_s=2.5)


def test_overload_bar_is_once_what_the_loop_takes_while_the_kernel_sheds() -> None:
    o = Overload(factor=2.0, window_s=0.5, shed_factor=1.0)
    o.update(0.0, read=0, shed=0, cpu_s=0.0)
    assert not o.update(1.0, read=40_000, shed=0, cpu_s=1.0)  # 40,000 per CPU second
    # The ring fills, nothing shed yet: 70,000 arrive a second, under twice: behind.
    assert not o.update(2.0, read=80_000, shed=0, cpu_s=2.0, waiting=30_000)
    # The ring is full; the loop, slowed by the workloads it competes with, reads 25,000
    # in 0.625 s of CPU and the kernel sheds 45,000: what arrives looks like less than
    # twice, but more goes unread than the loop could take with a whole CPU.
    assert o.update(3.0, read=105_000, shed=45_000, cpu_s=2.625, waiting=30_000)
    assert o.arrivals == pytest.approx(70_000) and o.unread == pytest.approx(45_000)
    # Shedding less than that (30,000 a second): just behind, uncapped again.
    assert not o.update(4.0, read=145_000, shed=75_000, cpu_s=3.625, waiting=30_000)
    # With a bar of twice while shedding, the same flood was not an overload.
    o2 = Overload(factor=2.0, window_s=0.5, shed_factor=2.0)
    o2.update(0.0, read=0, shed=0, cpu_s=0.0)
    o2.update(1.0, read=40_000, shed=0, cpu_s=1.0)
    o2.update(2.0, read=80_000, shed=0, cpu_s=2.0, waiting=30_000)
    assert not o2.update(3.0, read=105_000, shed=45_000, cpu_s=2.625, waiting=30_000)


def test_overload_is_declared_at_the_onset_by_what_arrives() -> None:
    o = Overload(factor=2.0, window_s=0.5)
    o.update(0.0, read=0, shed=0, cpu_s=0.0)
    assert not o.update(1.0, read=150_000, shed=0, cpu_s=1.0)  # 150,000 per CPU second
    # The onset of a flood, as the benchmark's with PyPy: flat out, the loop reads 75,000
    # records in 0.5 s while the ring grows by 125,000. Less than twice its capacity goes
    # unread (250,000 a second), but 400,000 arrive: beyond twice what it can take,
    # decided in the first window, before the ring is full.
    assert o.update(1.5, read=225_000, shed=0, cpu_s=1.5, waiting=125_000)
    assert o.unread == pytest.approx(250_000) and o.arrivals == pytest.approx(400_000)
    # Capped, it reads 3,750 in 0.025 s of CPU; the ring grows by 196,250: still beyond.
    assert o.update(2.0, read=228_750, shed=0, cpu_s=1.525, waiting=321_250)
    # The flood ends: 10,000 arrive a second; uncapped again, it drains the ring.
    assert not o.update(2.5, read=303_750, shed=0, cpu_s=2.025, waiting=251_250)
    assert o.arrivals == pytest.approx(10_000)


def test_overload_is_never_declared_before_the_loop_was_timed() -> None:
    o = Overload(factor=2.0, window_s=0.5)
    o.update(0.0, read=0, shed=0, cpu_s=0.0)
    # A starved loop (no CPU at all) under a flood: its speed is unknown, nothing declared.
    assert not o.update(1.0, read=0, shed=1_000_000, cpu_s=0.0)
    assert not o.update(2.0, read=5, shed=2_000_000, cpu_s=0.001)
    assert o.capacity == 0
    # Timed once (10,000 records in 0.25 s: 40,000/s), the flood counts.
    assert o.update(3.0, read=10_005, shed=3_000_000, cpu_s=0.251)


def test_overload_counts_the_ring_filling_before_anything_is_shed() -> None:
    o = Overload(factor=2.0, window_s=0.5)
    o.update(0.0, read=0, shed=0, cpu_s=0.0, waiting=0)
    assert not o.update(1.0, read=20_000, shed=0, cpu_s=0.5, waiting=0)  # 40,000 per CPU s
    # The loop stalls for a second (a slow phase) under a load it can take: everything that
    # arrives waits, 40,000 records. That is behind, not far beyond.
    assert not o.update(2.0, read=20_000, shed=0, cpu_s=0.5, waiting=40_000)
    assert o.unread == pytest.approx(40_000)
    # The onset of a flood: flat out, the loop reads 40,000 while the ring grows by 200,000
    # records; nothing is shed yet (the ring is not full).
    assert o.update(3.0, read=60_000, shed=0, cpu_s=1.5, waiting=240_000)
    assert o.arrivals == pytest.approx(240_000) and o.unread == pytest.approx(200_000)
    # Afterwards the loop drains the ring: 40,000 read, 40,000 fewer waiting, none arrived.
    assert not o.update(4.0, read=100_000, shed=0, cpu_s=2.5, waiting=200_000)
    assert o.arrivals == pytest.approx(0)


class _Flood:
    """A capture under a steady overload, without a kernel: each poll the loop 'analyses'
    ``read`` records (burning ``cpu_s`` of CPU for them) while ``shed`` syscalls pass
    uncopied."""

    def __init__(
        self, read: int, shed: int, cpu_s: float, grow: int = 0, idle_s: float = 0.0
    ) -> None:
        self.read, self.shed, self.cpu_s, self.grow = read, shed, cpu_s, grow
        self.idle_s = idle_s  # waiting for records, after the work
        self.waiting = 0
        self.records_read = 0
        self.shed_syscalls = 0
        self.ring_full_at = -1e9
        self.polls = 0
        self.batch: int | None = None

    def poll(self, timeout_ms: int) -> list[object]:
        end = time.thread_time() + self.cpu_s
        while time.thread_time() < end:
            pass
        self.records_read += self.read
        self.shed_syscalls += self.shed
        self.waiting += self.grow
        if self.shed:
            self.ring_full_at = time.monotonic()
        self.polls += 1
        if self.idle_s:
            time.sleep(self.idle_s)
        return []

    def lifecycle_backlog(self) -> int:
        return 0

    def waiting_records(self) -> int:
        return self.waiting

    def limit_batch(self, records: int | None) -> None:
        self.batch = records


class _Sink:
    def handle(self, ev: object) -> None:
        raise AssertionError("no events expected")

    handle_event = handle

    def rest_idle(self, cutoff_ns: int) -> int:
        return 0


def _run_loop(flood: _Flood, seconds: float) -> ServerDaemon:
    d = ServerDaemon(Config())
    d.capture, d.pipeline, d.hops = flood, _Sink(), _Sink()  # type: ignore[assignment]

    def body() -> None:
        assert d.scheduling.start()
        threading.Timer(seconds, d.stop).start()
        try:
            d.loop()
        finally:
            d.scheduling.stop()

    _in_thread(body)
    return d


def test_loop_far_beyond_its_capacity_keeps_to_the_cpu_budget() -> None:
    # 400 records per 10 ms of CPU (40,000 per CPU second) while 20,000 syscalls are shed
    # per poll: the traffic is ~50 times what the loop could take.
    flood = _Flood(read=400, shed=20_000, cpu_s=0.01)
    d = _run_loop(flood, 1.5)
    assert d.scheduling.yields >= 1  # shedding: it yielded
    assert d.overload.active and d.overload.capacity == pytest.approx(40_000, rel=0.3)
    # The default budget (5 % of a CPU): 10 ms of work, then 190 ms asleep.
    assert d.config.capture.shed_cpu_percent == 5
    assert d.shed_pause_s >= 0.5
    assert flood.polls < 40  # uncapped it would poll ~150 times in 1.5 s
    assert flood.batch == 512  # smaller polls while far beyond: short, exact pauses


def test_loop_yields_and_keeps_to_the_budget_while_the_ring_still_fills() -> None:
    # Nothing shed yet, but the ring grows by 20,000 records per poll of 400: the onset of
    # a flood. The loop need not wait for the ring to fill to stop competing.
    flood = _Flood(read=400, shed=0, cpu_s=0.01, grow=20_000)
    d = _run_loop(flood, 1.5)
    assert flood.ring_full_at < 0  # never shed
    assert d.scheduling.yields >= 1 and d.overload.active
    assert d.shed_pause_s >= 0.5 and flood.polls < 40
    assert flood.batch == 512


def test_loop_just_behind_runs_uncapped_to_catch_up() -> None:
    # The kernel sheds a little (200 per 400 read): arrivals are 1.5 times what the loop
    # takes, under twice: no budget, it yields (SCHED_IDLE) but never pauses.
    flood = _Flood(read=400, shed=200, cpu_s=0.01)
    d = _run_loop(flood, 1.5)
    assert d.scheduling.yields >= 1
    assert not d.overload.active and d.overload.arrivals > d.overload.capacity
    assert d.shed_pause_s == 0
    assert flood.polls > 45  # ~150 with a CPU to itself; capped, < 40 (above)


def test_busy_loop_that_keeps_up_yields_but_never_pauses() -> None:
    # Nothing shed, the ring does not grow: the loop keeps up, but only by using a whole
    # CPU. On a saturated node that CPU is the workloads' (PyPy kept up with wrk that way,
    # at 0.40 of its throughput): it runs SCHED_IDLE, with no budget.
    flood = _Flood(read=400, shed=0, cpu_s=0.01)
    d = _run_loop(flood, 1.0)
    assert d.scheduling.yields >= 1 and d.overload.cpu_share > 0.5
    assert not d.overload.active and d.shed_pause_s == 0


def test_loop_with_time_to_spare_stays_ordinary() -> None:
    # 2 ms of work per 20 ms: a tenth of a CPU.
    flood = _Flood(read=80, shed=0, cpu_s=0.002, idle_s=0.018)
    d = _run_loop(flood, 1.0)
    assert d.scheduling.yields == 0 and d.overload.cpu_share < 0.5
    assert flood.polls > 20


# -- the heap settles once a burst is over ---------------------------------------------------
MiB = 1 << 20


def test_heap_settles_once_after_a_burst_when_the_loop_is_quiet() -> None:
    heap = HeapSettle(growth_bytes=8 * MiB, quiet_records=5_000)
    assert not heap.due(0, 140 * MiB)  # the first check only takes the baseline
    assert heap.baseline == 140 * MiB
    # A storm: the heap grows while the loop reads 100,000 records: busy, not yet.
    assert not heap.due(100_000, 190 * MiB)
    # Quiet again (1,000 records in the interval) and 50 MiB above the baseline: due.
    assert heap.due(101_000, 190 * MiB)
    heap.settled(178 * MiB)
    assert heap.settles == 1 and heap.baseline == 178 * MiB
    # Still quiet, no new growth: nothing more to do.
    assert not heap.due(101_500, 180 * MiB)
    assert not heap.due(102_000, 178 * MiB + 8 * MiB)  # growth must exceed the margin


def test_heap_baseline_follows_memory_given_back() -> None:
    heap = HeapSettle(growth_bytes=8 * MiB, quiet_records=5_000)
    heap.due(0, 180 * MiB)
    assert not heap.due(10, 150 * MiB)  # connections closed, memory went back
    assert heap.baseline == 150 * MiB
    assert heap.due(20, 160 * MiB)  # so 10 MiB of new growth counts
