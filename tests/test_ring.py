"""capture/_ring.py without the kernel: a memfd laid out as a BPF ring buffer.

The kernel cannot be made to leave a record reserved (BUSY) or discarded on demand, and
where a record falls against the end of the data area depends on everything written
before it; a fake producer writes exactly the layout kernel/bpf/ringbuf.c writes. The real
ring is read in tests/test_capture.py.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hopwatch.capture import _ring
from hopwatch.capture._ring import Ring
from hopwatch.capture.live import LiveCapture

PAGE = mmap.PAGESIZE
SIZE = PAGE  # the smallest ring: one page of data
BUSY, DISCARD = 1 << 31, 1 << 30


class _NoEpoll:
    """A memfd cannot be polled; the reader's epoll is not what these tests are about."""

    def register(self, fd: int, events: int) -> None:
        pass

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        return []

    def close(self) -> None:
        pass


class FakeProducer:
    """Writes records as the kernel does: header {len | flags, page offset}, then the
    bytes, the next record 8-byte aligned; the data area wraps at SIZE."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mem = mmap.mmap(fd, 2 * PAGE + SIZE)
        self.prod = 0

    def put(self, payload: bytes, *, flags: int = 0) -> int:
        """Append a record; returns its position (for `commit`)."""
        at = self.prod
        self._write(at, struct.pack("<II", len(payload) | flags, 0))
        self._write(at + 8, payload)
        self.prod += (len(payload) + 8 + 7) & ~7
        struct.pack_into("<Q", self.mem, PAGE, self.prod)
        return at

    def commit(self, at: int) -> None:
        """Clear BUSY on the record at `at` (bpf_ringbuf_submit)."""
        off = 2 * PAGE + (at & (SIZE - 1))
        (head,) = struct.unpack_from("<I", self.mem, off)
        struct.pack_into("<I", self.mem, off, head & ~BUSY)

    @property
    def consumer(self) -> int:
        return int(struct.unpack_from("<Q", self.mem, 0)[0])

    def _write(self, pos: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[2 * PAGE + ((pos + i) & (SIZE - 1))] = b


@pytest.fixture
def ring(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Ring, FakeProducer]]:
    monkeypatch.setattr(_ring.select, "epoll", lambda *a: _NoEpoll())
    fd = os.memfd_create("hopwatch-ring-test")
    try:
        os.ftruncate(fd, 2 * PAGE + SIZE)
        producer = FakeProducer(fd)
        r = Ring(fd, SIZE)
        yield r, producer
        r.close()
        producer.mem.close()
    finally:
        os.close(fd)


def test_records_in_order_and_the_space_handed_back(ring: tuple[Ring, FakeProducer]) -> None:
    r, p = ring
    recs = [b"a", b"1234567", b"12345678", b"x" * 13]
    for rec in recs:
        p.put(rec)
    assert r.pending() == p.prod == (8 + 8) + (8 + 8) + (8 + 8) + (8 + 16)
    assert r.read(100) == recs
    assert p.consumer == p.prod and r.pending() == 0
    assert r.read(100) == []


def test_a_read_takes_at_most_limit_records(ring: tuple[Ring, FakeProducer]) -> None:
    r, p = ring
    for i in range(5):
        p.put(bytes([i]) * 10)
    assert r.read(2) == [b"\x00" * 10, b"\x01" * 10]
    assert p.consumer == 2 * 24  # the rest waits in the ring
    assert r.read(10) == [bytes([i]) * 10 for i in range(2, 5)]


def test_a_reserved_record_holds_back_the_ones_after_it(ring: tuple[Ring, FakeProducer]) -> None:
    r, p = ring
    p.put(b"first")
    busy = p.put(b"second", flags=BUSY)
    p.put(b"third")  # committed, but reserved after "second": read in reservation order
    assert r.read(10) == [b"first"]
    assert r.read(10) == []
    p.commit(busy)
    assert r.read(10) == [b"second", b"third"]


def test_a_discarded_record_is_consumed_not_returned(ring: tuple[Ring, FakeProducer]) -> None:
    r, p = ring
    p.put(b"kept")
    p.put(b"dropped by the producer", flags=DISCARD)
    p.put(b"kept too")
    assert r.read(10) == [b"kept", b"kept too"]
    assert p.consumer == p.prod


@pytest.mark.parametrize("before", [SIZE - 8 - 16, SIZE - 8 - 8, SIZE - 8])
def test_a_record_running_past_the_end_is_joined(
    ring: tuple[Ring, FakeProducer], before: int
) -> None:
    """The header lands 24, 16 or 8 bytes before the end: the payload wraps after 16 or 8
    bytes, or starts at the beginning of the data area."""
    r, p = ring
    p.put(b"f" * (before - 8))  # fills up to `before` (a record takes 8 + its length)
    assert r.read(10) == [b"f" * (before - 8)]
    payload = bytes(range(40))
    p.put(payload)
    assert r.read(10) == [payload]
    assert r.wrapped == 1
    p.put(b"after the wrap")
    assert r.read(10) == [b"after the wrap"]
    assert p.consumer == p.prod


def test_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Ring(-1, 3 * PAGE)


# A reader in another process, in C: loads the consumer position as one 8-byte word in a
# loop (as the kernel's producer does) and fails if it ever goes backwards.
_WATCHER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    int fd = atoi(argv[1]);
    uint64_t stop_at = strtoull(argv[2], 0, 10);
    volatile uint64_t *cons = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
    if (cons == MAP_FAILED) return 2;
    uint64_t last = *cons, loads = 0;
    puts("ready");
    fflush(stdout);
    while (last < stop_at) {
        uint64_t now = *cons;
        loads++;
        if (now < last) {
            printf("went back from %llu to %llu\n", (unsigned long long)last,
                   (unsigned long long)now);
            return 1;
        }
        last = now;
    }
    printf("ok %llu loads\n", (unsigned long long)loads);
    return 0;
}
"""


def test_the_consumer_position_is_never_seen_half_written(
    ring: tuple[Ring, FakeProducer], tmp_path: Path
) -> None:
    """Another CPU reading the consumer position while it is advanced across byte carries
    (every 256 bytes) never sees it go backwards: one 8-byte store, not eight 1-byte ones."""
    r, p = ring
    src = tmp_path / "watch.c"
    src.write_text(_WATCHER)
    exe = tmp_path / "watch"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    rounds = 40_000  # 8-byte records: a carry into the second byte every 32 of them
    stop_at = rounds * 8
    fd = p.fd  # the memfd: the consumer page is its first page
    watcher = subprocess.Popen(
        [str(exe), str(fd), str(stop_at)], pass_fds=(fd,), stdout=subprocess.PIPE, text=True
    )
    assert watcher.stdout is not None and watcher.stdout.readline().strip() == "ready"
    for _ in range(rounds):
        p.put(b"")
        assert r.read(1) == [b""]
    out, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, out
    assert p.consumer == stop_at


def test_consumed_counts_the_ring_bytes_read(ring: tuple[Ring, FakeProducer]) -> None:
    r, p = ring
    for rec in (b"a", b"x" * 13):
        p.put(rec)
    assert r.consumed() == 0
    r.read(1)
    assert r.consumed() == 16
    r.read(1)
    assert r.consumed() == 16 + 24 == p.consumer


def test_waiting_records_are_the_backlog_over_the_average_record(
    ring: tuple[Ring, FakeProducer],
) -> None:
    r, p = ring
    cap = LiveCapture()
    cap._ring = r  # the reader of an open capture, without the kernel
    try:
        p.put(b"x" * 24)
        assert cap.waiting_records() == 0  # nothing read yet: no average to go by
        for _ in range(3):
            p.put(b"x" * 24)  # 32 ring bytes each, header included
        cap.records_read += len(r.read(2))
        assert cap.waiting_records() == 2
        p.put(b"y" * 56)  # a larger record counts as more than one average one
        assert cap.waiting_records() == 4
        cap.records_read += len(r.read(10))
        assert cap.waiting_records() == 0
    finally:
        cap._ring = None


def test_limit_batch_bounds_each_poll_until_lifted() -> None:
    cap = LiveCapture()
    cap.limit_batch(512)
    assert cap._batch == 512
    cap.limit_batch(None)
    assert cap._batch == cap.config.batch_records == 4096
