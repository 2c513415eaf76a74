"""Plain events every capture source yields (live eBPF or pcap replay).

Only the capture source touches the kernel; everything after it consumes these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from .._compat import SLOTS

__all__ = [
    "CaptureEvent",
    "ConnClosed",
    "ConnOpened",
    "DataChunk",
    "Direction",
    "LostEvents",
    "ProcessExecuted",
    "ProcessExited",
    "SockAddr",
    "TlsServerName",
    "UnknownFd",
]


class Direction(enum.Enum):
    """Seen from the observed process: bytes it sent, or bytes it received."""

    SEND = "send"
    RECV = "recv"


@dataclass(frozen=True, **SLOTS)
class SockAddr:
    family: int  # socket.AF_INET / AF_INET6
    host: str  # textual IP address
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# Not frozen: one is built per message, and a frozen dataclass's __init__ costs ~5x more.
@dataclass(**SLOTS)
class DataChunk:
    """The bytes that moved through ONE socket syscall (or one SSL_read/SSL_write) on one fd.

    The capture source reassembles the kernel's bounded chunks of one syscall into one
    DataChunk. Layout of the ``total_len`` bytes the syscall really moved, in order:

    * ``skipped`` bytes the kernel did not copy because userspace asked it to skip them
      (bodies, DATA frames: see the skip map),
    * ``data``: the bytes copied,
    * ``missed`` = ``total_len - skipped - len(data)`` bytes lost to the per-syscall copy cap
      or to dropped kernel chunks: a gap the parser must be told about.

    ``offset`` is the absolute offset, in this direction of the connection, of the first byte
    the syscall moved (the first skipped byte, if any): ``data`` starts at
    ``offset + skipped``. The live source counts from the connection's open (or adoption);
    a source that cannot count leaves 0.
    """

    tgid: int
    tid: int
    fd: int
    direction: Direction
    ts_ns: int
    total_len: int
    data: bytes
    skipped: int = 0
    tls: bool = False
    comm: str = ""
    offset: int = 0
    role: str = ""  # "client" | "server" as the kernel tracks the connection; "" unknown

    @property
    def missed(self) -> int:
        return self.total_len - self.skipped - len(self.data)


@dataclass(frozen=True, **SLOTS)
class ConnOpened:
    """connect() (role client) or accept()/accept4() (role server) on an inet socket."""

    tgid: int
    tid: int
    fd: int
    role: str  # "client" | "server"
    peer: SockAddr | None
    ts_ns: int
    comm: str = ""
    listen_fd: int = -1  # accept: the listening socket it came from (live capture only)


@dataclass(frozen=True, **SLOTS)
class ConnClosed:
    tgid: int
    fd: int
    ts_ns: int


@dataclass(frozen=True, **SLOTS)
class ProcessExited:
    tgid: int
    ts_ns: int


@dataclass(frozen=True, **SLOTS)
class ProcessExecuted:
    """The process ran a new program image (exec). Sockets it opened close-on-exec are
    closed now without a close() call; others live on in the new image."""

    tgid: int
    ts_ns: int


@dataclass(frozen=True, **SLOTS)
class LostEvents:
    """Events the kernel side could not deliver, by reason (ring full, ...)."""

    reason: str
    count: int


@dataclass(frozen=True, **SLOTS)
class UnknownFd:
    """An fd the capture does not track wrote bytes that look like HTTP.

    Sent at most once per (tgid, fd) until it is closed: a socket opened before the capture
    started, or inherited. The consumer checks ``/proc/<tgid>/fd/<fd>`` and, for an inet
    socket, adopts it (``LiveCapture.adopt``), else ignores it. ``role_hint`` is "client"
    when a request (or the HTTP/2 preface) was written, "server" for a response, "" unknown.
    """

    tgid: int
    tid: int
    fd: int
    direction: Direction
    role_hint: str
    ts_ns: int
    comm: str = ""


@dataclass(frozen=True, **SLOTS)
class TlsServerName:
    """The server name (SNI) a TLS client set for the session on this connection.

    Emitted before the first plaintext ``DataChunk`` (``tls=True``) of that session, so a
    consumer can judge the destination by the name the client asked for.
    """

    tgid: int
    fd: int
    server_name: str  # lowercase, no trailing dot
    ts_ns: int


CaptureEvent = Union[
    DataChunk,
    ConnOpened,
    ConnClosed,
    ProcessExecuted,
    ProcessExited,
    LostEvents,
    UnknownFd,
    TlsServerName,
]
