"""Yield the CPU to the workloads being observed, without starving.

Theory of operation
-------------------
An observer that competes with the node's workloads for CPU costs them throughput exactly
when they are busiest. So the analysis loop runs under ``SCHED_IDLE``: the kernel gives it
only CPU time that no ordinary thread wants, and any waking workload thread preempts it at
once (a low ``nice`` value does not: the running task keeps its slice). When the loop cannot
keep up, records wait in the ring buffer until it is full; then the kernel copies nothing
and counts every syscall it let pass (``events_lost_total{reason="ring_full"}``), at a cost
of a few hash lookups per syscall instead of a copy.

A thread that only ever runs when a CPU is idle can starve for as long as the node is
saturated, and with it the systemd watchdog, the process names read from /proc and the
HTTP scrapes (which need the interpreter lock the loop holds). A guard thread, created
before the loop turns idle and so keeping the ordinary policy, checks the loop's heartbeat:
when an iteration has not finished for ``starve_s`` it lifts the loop to ``SCHED_OTHER``
(counted in ``boosts``); the loop drops back to idle as soon as that iteration ends. Each
iteration is bounded (``LiveCapture.batch_records``), so a lift costs the workloads one
batch of analysis at most every ``starve_s``.

Data can be shed; connection events cannot (a lost open leaves a connection untracked
until its next data, a lost close leaves a stale entry). So while the kernel has submitted
many more of those than the loop has read (a connection storm), the loop itself asks for
the ordinary policy (``beat(urgent=True)``, counted in ``urgent``) until it has caught up.
"""

from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["IdleScheduling"]

log = logging.getLogger(__name__)


class IdleScheduling:
    """Call :meth:`start` from the loop's thread, :meth:`beat` after each iteration."""

    def __init__(self, starve_s: float = 2.0) -> None:
        self.starve_s = starve_s
        self.boosts = 0  # lifted by the guard (starved)
        self.urgent = 0  # lifted by the loop (connection events queued)
        self._lock = threading.Lock()
        self._boosted = False
        self._beat = time.monotonic()
        self._tid = 0
        self._stop = threading.Event()
        self._guard: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._guard is not None

    def start(self) -> bool:
        """Turn the calling thread idle and start the guard. False when the kernel refuses."""
        self._tid = threading.get_native_id()
        self._beat = time.monotonic()
        # Leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE >= 20 (LimitNICE=+0 in the
        # unit): without it a starved loop could not be lifted, so it stays ordinary.
        problem = _round_trip()
        if problem is not None:
            log.warning(
                "the analysis loop keeps the ordinary scheduling policy: leaving SCHED_IDLE "
                "again needs CAP_SYS_NICE or RLIMIT_NICE >= 20 (systemd: LimitNICE=+0): %s",
                problem,
            )
            return False
        guard = threading.Thread(target=self._watch, name="hopwatch-guard", daemon=True)
        guard.start()  # before the policy change: the guard keeps SCHED_OTHER
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        self._guard = guard
        log.info("analysis loop runs SCHED_IDLE (lifted when it starves for %.1f s)", self.starve_s)
        return True

    def beat(self, *, urgent: bool = False) -> None:
        """One loop iteration finished: back to idle if the guard had lifted it.

        ``urgent``: work that must not wait for idle CPU is queued (connection opens and
        closes: losing them loses track of connections, unlike data, which is shed and
        counted): keep or take the ordinary policy until it is done.
        """
        self._beat = time.monotonic()
        if urgent == self._boosted or self._guard is None:
            return
        with self._lock:
            if urgent:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                self._boosted = True
                self.urgent += 1
            else:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                self._boosted = False

    def stop(self) -> None:
        """Stop the guard and give the calling thread the ordinary policy back."""
        if self._guard is None:
            return
        self._stop.set()
        self._guard.join()
        self._guard = None
        with self._lock:
            self._boosted = False
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

    def _watch(self) -> None:
        while not self._stop.wait(self.starve_s / 4):
            if self._boosted or time.monotonic() - self._beat < self.starve_s:
                continue
            with self._lock:
                if self._stop.is_set() or self._boosted:
                    continue
                try:
                    os.sched_setscheduler(self._tid, os.SCHED_OTHER, os.sched_param(0))
                except OSError:  # the loop thread is gone
                    return
                self._boosted = True
                self.boosts += 1


def _round_trip() -> str | None:
    """Try SCHED_IDLE and back on a throwaway thread: None when both work, else the error."""
    result: list[str | None] = ["no result"]

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            result[0] = None
        except OSError as exc:
            result[0] = exc.strerror or str(exc)

    t = threading.Thread(target=probe, name="hopwatch-sched-probe")
    t.start()
    t.join()
    return result[0]
