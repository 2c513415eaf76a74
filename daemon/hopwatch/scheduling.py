"""Yield the CPU to the workloads being observed when the analysis cannot keep up anyway.

Theory of operation
-------------------
While the analysis loop keeps up with the traffic using less than half a CPU it is an
ordinary thread: every message is seen. A loop that keeps up only by using more than that
runs ``SCHED_IDLE`` (the caller decides, per iteration): on a saturated node that CPU is the
workloads' (a PyPy loop kept up with wrk against nginx by taking a whole CPU, and wrk ran at
0.40 of its throughput without hopwatch); where the workloads leave enough CPU free, an idle
loop still keeps up. Once it falls behind, the ring buffer fills and the kernel copies
nothing more, counting every syscall it lets pass
(``events_lost_total{reason="ring_full"}``) at the cost of a few lookups per syscall. From
then on a loop that keeps competing for CPU only makes the workloads slower without seeing
more of them: the node is saturated. So while the capture sheds, the loop runs under
``SCHED_IDLE``: the kernel gives it only CPU time that no ordinary thread wants, and any
waking workload thread preempts it at once (a low ``nice`` value does not: the running task
keeps its slice). When the shedding stops, it is ordinary again.

An idle thread can starve for as long as the node is saturated, and with it the systemd
watchdog and the HTTP scrapes (which need the interpreter lock the loop holds). A guard
thread, keeping the ordinary policy, checks the loop's heartbeat: when an iteration has not
finished for ``starve_s`` it lifts the loop to ``SCHED_OTHER`` (counted in ``boosts``); the
loop goes back to idle after that iteration if it still sheds. Each iteration is bounded
(``LiveCapture.batch_records``), so a lift costs the workloads one batch at most every
``starve_s``.

Yielding is not enough when the traffic is far beyond what the loop can analyse (a node
saturated by cheap requests): an idle loop still takes every CPU moment the workloads leave
free, and on this kind of VM that costs them throughput (wrk against nginx ``return 200``,
one interleaved run: 0.82 of the throughput without hopwatch with the loop SCHED_IDLE, 0.95
with it stopped, which leaves only the kernel's share). :class:`Overload` tells that
case apart: the data syscalls that arrive and go unread (shed by the kernel, or left to wait
in a ring that grows) against the records the loop analyses per CPU second. Counting the
ring's growth tells an overload from its onset, while the ring still fills: before that
counted, the loop ran flat out, as an ordinary thread, for as long as the ring took to fill
and for a window after (~0.6 s of CPU at each onset of the benchmark's overload, taken from
the workloads just when they needed it). While more than ``factor`` (2) times what one full
CPU of the loop could take arrives (read, shed, or left waiting), the loop would see only a
sample anyway, even flat out, so it keeps to a CPU budget (``[capture] shed_cpu_percent``);
below that it runs at full speed and catches up (a budget there would keep a loop that is
only a little behind from ever catching up). A pause of the loop does not count as an
overload: at 10,000 req/s, where the CPython loop needs about half a CPU, a stalled loop
lets the ring grow by what arrives, never by twice what the loop can take. Once the kernel
sheds (the ring is full: the loop is a whole ring behind), it is also an overload when more
than ``shed_factor`` (1) times the loop's capacity goes unread: a loop that competes with
saturated workloads slows them, so what arrives looks smaller than it is.

Session 15 counted only what goes unread, against twice the capacity. With PyPy's loop
(~150,000 records per CPU second against wrk's ~400,000) the onset then went on until the
ring was full and a window after: 0.2-1.0 s of CPU per 10 s benchmark round above the 5 %
budget, taken from the bottleneck workload nearly one for one. Counting all that arrives
decides it in the first window (``window_s``, 0.1 s), while the ring still fills.

Data can be shed; connection events cannot (a lost open leaves a connection untracked until
its next data, a lost close leaves a stale entry). The loop therefore does not yield while
many of those wait in the ring (a connection storm); the caller decides, per iteration.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

from ._compat import SCHED_IDLE

__all__ = ["IdleScheduling", "Overload", "budget_pause"]

log = logging.getLogger(__name__)

_PR_SET_NAME = 15


class IdleScheduling:
    """Call :meth:`start` from the loop's thread, :meth:`beat` after each iteration."""

    def __init__(self, starve_s: float = 2.0) -> None:
        self.starve_s = starve_s
        self.boosts = 0  # starved: lifted by the guard
        self.yields = 0  # switches to SCHED_IDLE (the capture was shedding)
        self._lock = threading.Lock()
        self._idle = False
        self._beat = time.monotonic()
        self._tid = 0
        self._stop = threading.Event()
        self._guard: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._guard is not None

    @property
    def idle(self) -> bool:
        """The loop runs SCHED_IDLE now."""
        return self._idle

    def start(self) -> bool:
        """Start the guard (the loop stays ordinary until it yields). False when the kernel
        would not let an idle loop become ordinary again."""
        # Leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE >= 20 (LimitNICE=+0 in the
        # unit): without it a starved loop could not be lifted, so it never yields.
        problem = _round_trip()
        if problem is not None:
            log.warning(
                "the analysis loop keeps the ordinary scheduling policy: leaving SCHED_IDLE "
                "again needs CAP_SYS_NICE or RLIMIT_NICE >= 20 (systemd: LimitNICE=+0): %s",
                problem,
            )
            return False
        self._tid = threading.get_native_id()
        self._beat = time.monotonic()
        self._guard = threading.Thread(target=self._watch, name="hopwatch-guard", daemon=True)
        self._guard.start()
        log.info("the analysis loop yields the CPU (SCHED_IDLE) while the capture sheds "
                 "or the loop is busy")
        return True

    def beat(self, *, yield_cpu: bool) -> None:
        """One loop iteration finished; ``yield_cpu``: run the next one SCHED_IDLE."""
        self._beat = time.monotonic()
        if self._guard is None or yield_cpu == self._idle:
            return
        with self._lock:
            if yield_cpu:
                os.sched_setscheduler(0, SCHED_IDLE, os.sched_param(0))
                self.yields += 1
            else:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            self._idle = yield_cpu

    def stop(self) -> None:
        """Stop the guard and give the calling thread the ordinary policy back."""
        if self._guard is None:
            return
        self._stop.set()
        self._guard.join()
        self._guard = None
        with self._lock:
            if self._idle:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                self._idle = False

    def _watch(self) -> None:
        _name_thread(b"hopwatch-guard")  # shown by top -H, ps -L
        while not self._stop.wait(self.starve_s / 4):
            if not self._idle or time.monotonic() - self._beat < self.starve_s:
                continue
            with self._lock:
                if self._stop.is_set() or not self._idle:
                    continue
                try:
                    os.sched_setscheduler(self._tid, os.SCHED_OTHER, os.sched_param(0))
                except OSError:  # the loop thread is gone
                    return
                self._idle = False
                self.boosts += 1


def _name_thread(name: bytes) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _round_trip() -> str | None:
    """Try SCHED_IDLE and back on a throwaway thread: None when both work, else the error."""
    result: list[str | None] = ["no result"]

    def probe() -> None:
        try:
            os.sched_setscheduler(0, SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            result[0] = None
        except OSError as exc:
            result[0] = exc.strerror or str(exc)

    t = threading.Thread(target=probe, name="hopwatch-sched-probe")
    t.start()
    t.join()
    return result[0]


def budget_pause(cpu_used_s: float, percent: int, cap_s: float = 1.0) -> float:
    """Seconds to pause after an iteration that used ``cpu_used_s`` of CPU, so that the loop
    uses at most ``percent`` % of one CPU (0 for 100 %); at most ``cap_s``."""
    if percent >= 100 or cpu_used_s <= 0:
        return 0.0
    return min(cap_s, cpu_used_s * (100 / max(percent, 1) - 1))


class Overload:
    """Is the traffic beyond ``factor`` times what the analysis loop can take on one CPU (or,
    while the kernel sheds, does more than ``shed_factor`` times that go unread)?

    Fed after each loop iteration with running totals (records read from the ring, data
    syscalls the kernel shed, the loop thread's CPU seconds) and the records waiting in the
    ring now. Decides once per ``window_s``.
    """

    def __init__(
        self, factor: float = 2.0, window_s: float = 0.1, shed_factor: float = 1.0
    ) -> None:
        self.factor = factor
        self.shed_factor = shed_factor  # the bar while the kernel sheds
        self.window_s = window_s
        self.active = False
        self.capacity = 0.0  # records the loop analyses per CPU second (smoothed)
        self.arrivals = 0.0  # records read + syscalls shed + ring growth, per second
        self.unread = 0.0  # of those, the syscalls shed and the ring's growth, per second
        self.cpu_share = 0.0  # of one CPU, what the loop used in the last window
        self._t0: float | None = None
        self._read0 = self._shed0 = self._waiting0 = 0
        self._cpu0 = 0.0

    def update(self, now: float, read: int, shed: int, cpu_s: float, waiting: int = 0) -> bool:
        """The totals as of ``now`` (monotonic seconds) and the records ``waiting`` in the
        ring; returns :attr:`active`."""
        t0 = self._t0
        if t0 is not None and now - t0 < self.window_s:
            return self.active
        if t0 is not None:
            d_read = read - self._read0
            d_cpu = cpu_s - self._cpu0
            if d_read > 0 and d_cpu >= 0.01:  # enough work to time the loop
                speed = d_read / d_cpu
                self.capacity = speed if not self.capacity else 0.7 * self.capacity + 0.3 * speed
            self.cpu_share = max(0.0, d_cpu) / (now - t0)
            self.unread = (shed - self._shed0 + waiting - self._waiting0) / (now - t0)
            self.arrivals = d_read / (now - t0) + self.unread
            shedding = shed > self._shed0
            self.active = self.capacity > 0 and (
                self.arrivals > self.factor * self.capacity
                or (shedding and self.unread > self.shed_factor * self.capacity)
            )
        self._t0, self._read0, self._shed0, self._cpu0 = now, read, shed, cpu_s
        self._waiting0 = waiting
        return self.active
