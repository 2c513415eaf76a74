"""Capture sources: plain events from the live kernel (or a pcap replay)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hopwatch.capture._types import (
    CaptureEvent,
    ConnClosed,
    ConnOpened,
    DataChunk,
    Direction,
    LostEvents,
    ProcessExecuted,
    ProcessExited,
    SockAddr,
    TlsServerName,
    UnknownFd,
)

if TYPE_CHECKING:
    from hopwatch.capture.live import CaptureConfig, LiveCapture

__all__ = [
    "CaptureConfig",
    "CaptureEvent",
    "ConnClosed",
    "ConnOpened",
    "DataChunk",
    "Direction",
    "LiveCapture",
    "LostEvents",
    "ProcessExecuted",
    "ProcessExited",
    "SockAddr",
    "TlsServerName",
    "UnknownFd",
]


def __getattr__(name: str) -> Any:
    # live.py is imported lazily: the pure consumers (replay, tests without root) never
    # import bcc.
    if name in ("LiveCapture", "CaptureConfig"):
        from hopwatch.capture import live

        return getattr(live, name)
    raise AttributeError(name)
