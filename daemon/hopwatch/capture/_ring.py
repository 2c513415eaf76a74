"""The BPF ring buffer, read in place.

bcc's ``open_ring_buffer`` hands every record to Python through a ctypes callback (libbpf's
``ring_buffer__poll`` -> a C-to-Python trampoline -> bcc's wrapper -> ours -> ``string_at``):
5 % of the daemon's CPU at 10,000 requests/s in a py-spy profile, 2 % read here. This module
maps the ring as libbpf does (but its data area once) and takes each record with a slice.

Layout (kernel/bpf/ringbuf.c; libbpf's ringbuf.c reads it the same way):

* page 0: the consumer position (u64), the only page user space may write;
* page 1: the producer position (u64), read-only;
* then the data area (``size`` bytes, a power of two). The kernel offers it twice back to
  back, so that a record running past the end continues at the start; libbpf maps both,
  and every page of a ring mapping is resident from the start, so that costs ``size`` of
  RSS again (16 MiB by default). This maps it once and joins the two pieces of the rare
  record that wraps.

A record is an 8-byte header ``{u32 len | BUSY << 31 | DISCARD << 30, u32 page offset}``
followed by ``len`` bytes, padded to 8. BUSY means reserved and not committed yet (the reader
stops there: records commit in any order, but are read in reservation order); DISCARD means
committed and dropped (skipped). The consumer position is stored after a read, which hands the
space back to the kernel.

Ordering: the producer commits with a store-release of the header; this reader loads the
header, then the bytes. x86-64 keeps loads in order, so that is sound there; elsewhere
:func:`in_place_supported` is false and the caller uses libbpf's reader.

Tearing: the positions are read and the consumer position written as whole 8-byte words
(a native ``memoryview`` cast: one aligned load or store each), never byte by byte as
``struct``'s ``"<Q"`` does. A consumer position written a byte at a time passes through
values far behind the real one when a carry crosses a byte (0x00ffff10 on the way from
0x00fffff8 to 0x01000010): a producer reading it then sees a full ring and drops its
record. That cost tens of records per minute at 10,000 requests/s before it was found.
"""

from __future__ import annotations

import mmap
import platform
import select

__all__ = ["Ring", "in_place_supported"]

_BUSY = 1 << 31
_DISCARD = 1 << 30
_LEN = _DISCARD - 1
_HDR = 8


def in_place_supported() -> bool:
    """Plain loads are ordered here (x86-64), so the ring can be read without barriers."""
    return platform.machine().lower() in ("x86_64", "amd64")


class Ring:
    """One BPF_MAP_TYPE_RINGBUF, mapped from its fd (``size``: its data bytes)."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._base = page  # the data area starts after the producer page
        self._end = page + size
        self.wrapped = 0  # records joined from the end and the start of the data area
        self._cons = mmap.mmap(
            map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        try:
            self._data = mmap.mmap(
                map_fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
            # Whole words (see "Tearing"): [0] of each is the consumer / producer position;
            # a record header at byte `off` of the data mapping is self._heads[off >> 2].
            self._cons_pos = memoryview(self._cons).cast("Q")
            self._prod_pos = memoryview(self._data).cast("Q")
            self._heads = memoryview(self._data).cast("I")
            self._epoll = select.epoll(1)
            self._epoll.register(map_fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        # The views first: a mapping with views on it cannot be closed.
        for name in ("_cons_pos", "_prod_pos", "_heads", "_epoll", "_data", "_cons"):
            obj = self.__dict__.pop(name, None)
            if isinstance(obj, memoryview):
                obj.release()
            elif obj is not None:
                obj.close()

    def pending(self) -> int:
        """Bytes committed or reserved and not read yet."""
        return int(self._prod_pos[0] - self._cons_pos[0])

    def consumed(self) -> int:
        """Bytes read so far (records, their headers and padding), since the ring's start."""
        return int(self._cons_pos[0])

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel wakes readers (or ``timeout_ms`` passes)."""
        self._epoll.poll(max(timeout_ms, 0) / 1000.0, 1)

    def read(self, limit: int) -> list[bytes]:
        """Up to ``limit`` records, oldest first; the rest stay in the ring."""
        out: list[bytes] = []
        data = self._data
        heads = self._heads
        prod_pos = self._prod_pos
        base = self._base
        end = self._end
        mask = self._mask
        cons = start = self._cons_pos[0]
        prod = prod_pos[0]
        while cons < prod and len(out) < limit:
            off = base + (cons & mask)
            head = heads[off >> 2]
            if head & _BUSY:
                break  # reserved, not committed yet: later records wait behind it
            n = head & _LEN
            if not head & _DISCARD:
                first = off + _HDR
                if first + n <= end:
                    out.append(data[first : first + n])
                else:  # runs past the end of the data area: the rest is at its start
                    out.append(data[first:end] + data[base : base + first + n - end])
                    self.wrapped += 1
            cons += (n + _HDR + 7) & ~7
            if cons >= prod:
                prod = prod_pos[0]
        if cons != start:
            self._cons_pos[0] = cons  # one 8-byte store
        return out
