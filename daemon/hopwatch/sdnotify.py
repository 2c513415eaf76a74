"""systemd's notify protocol (sd_notify(3)) without libsystemd: READY, STOPPING, WATCHDOG.

A datagram to the AF_UNIX socket named by $NOTIFY_SOCKET ('@' = abstract namespace).
Without $NOTIFY_SOCKET (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if path.startswith("@"):
            self._addr = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._addr = path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        usec_ok = usec.isascii() and usec.isdigit() and int(usec) > 0
        if usec_ok and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._last_ping = 0.0
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        if self._addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self._addr)
        except OSError:
            self.errors += 1
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *((f"STATUS={status}",) if status else ()))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self, now: float | None = None) -> bool:
        """Ping at most every half watchdog period; call it from the main loop."""
        if self.watchdog_s is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_s / 2:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")
