"""Coverage-guided fuzzing (atheris/libFuzzer) of the sans-IO entry points.

Targets:
  http1   Http1Parser.receive_data / receive_gap / receive_eof
  http2   Http2Parser.receive_data / receive_gap / receive_eof
  conn    ConnectionParser (protocol detection, h2c upgrade, CONNECT tunnels)
  header  check_header(name, value) and check_message over the same lines
  pipeline  the daemon's analysis of capture events (Pipeline, connection table, hop
          analysis), as Daemon.process drives it: two processes, two fds each (see
          `pipeline_ops`); the kernel's side is imitated (offsets, skips asked, ignores)

An input is a list of records: one tag byte, a 2-byte big-endian length, the bytes. Tag bit 0
picks the origin (0 client, 1 server); bit 1 makes the record a gap of `length` bytes; bit 2
an EOF. Seeds are the real captures of tests/fixtures (`seed` writes them in this format).

A crash is an exception escaping an entry point, or an ``*.internal_error`` event: the
parsers catch everything at their boundary and report it under that code, which hides a bug
from libFuzzer unless it is turned back into an exception here.

    python fuzz/hopwatch_fuzz.py seed CORPUS_ROOT
    python fuzz/hopwatch_fuzz.py run TARGET CORPUS_DIR [libFuzzer flags...]
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

TARGETS = ("http1", "http2", "conn", "header", "pipeline")

TAG_SERVER = 1
TAG_GAP = 2
TAG_EOF = 4

#: Header names the header target draws from (byte 0 of the input picks one).
HEADER_NAMES = (
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "uber-trace-id",
    "x-amzn-trace-id",
    "traceresponse",
)


class InternalError(Exception):
    """A parser reported a bug it caught at its API boundary."""


def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    i = 0
    while i + 3 <= len(data):
        tag = data[i]
        (n,) = struct.unpack(">H", data[i + 1 : i + 3])
        i += 3
        if tag & TAG_GAP:
            yield tag, n.to_bytes(2, "big")
            continue
        yield tag, data[i : i + n]
        i += n


def encode(chunks: list[tuple[bool, bytes]]) -> bytes:
    """(is_server, bytes) chunks -> one fuzz input (long chunks split at 65535)."""
    out = bytearray()
    for is_server, payload in chunks:
        for k in range(0, len(payload), 0xFFFF):
            part = payload[k : k + 0xFFFF]
            out += bytes([TAG_SERVER if is_server else 0]) + struct.pack(">H", len(part)) + part
    return bytes(out)


def _http1_fixture(path: Path) -> list[tuple[bool, bytes]]:
    raw = path.read_bytes()
    out: list[tuple[bool, bytes]] = []
    i = 0
    while i < len(raw):
        (n,) = struct.unpack(">I", raw[i + 1 : i + 5])
        out.append((raw[i : i + 1] != b"C", raw[i + 5 : i + 5 + n]))
        i += 5 + n
    return out


def _http2_fixture(path: Path) -> list[tuple[bool, bytes]]:
    fixture = json.loads(path.read_text())
    return [(tag != "c", bytes.fromhex(hx)) for tag, hx in fixture["chunks"]]


def _header_seeds() -> list[bytes]:
    lines = [
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "baggage: userId=alice,serverNode=DF%2028,isProduction=false;p=1",
        "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
        "x-b3-sampled: 1",
    ]
    out = []
    for line in lines:
        name, _, value = line.partition(": ")
        out.append(bytes([HEADER_NAMES.index(name)]) + value.encode())
    return out


def seed(root: Path) -> dict[str, int]:
    """Write the fixture captures as seed corpora under root/<target>/."""
    counts: dict[str, int] = {}
    h1 = [_http1_fixture(p) for p in sorted((FIXTURES / "http1").glob("*.rec"))]
    h2 = [_http2_fixture(p) for p in sorted((FIXTURES / "http2").glob("*.json"))]
    corpora = {
        "http1": [encode(c) for c in h1],
        "http2": [encode(c) for c in h2],
        "conn": [encode(c) for c in h1 + h2],
        "header": _header_seeds(),
        # Each exchange under the default configuration and under one other part of it.
        "pipeline": [
            _pipeline_seed(c, config)
            for k, c in enumerate(h1 + h2)
            for config in (0, 1 << (k % len(PIPELINE_CONFIG_PARTS)))
        ],
    }
    for target, inputs in corpora.items():
        d = root / target
        d.mkdir(parents=True, exist_ok=True)
        for k, blob in enumerate(inputs):
            (d / f"seed-{k:03d}").write_bytes(blob)
        counts[target] = len(inputs)
    return counts


def _raise_internal(events: list[object]) -> None:
    for ev in events:
        code = getattr(ev, "code", "")
        if isinstance(code, str) and code.endswith("internal_error"):
            raise InternalError(f"{code}: {getattr(ev, 'detail', '')}")


def _drive(parser: object, data: bytes) -> None:
    from hopwatch.protocols import Origin

    receive_data = parser.receive_data  # type: ignore[attr-defined]
    receive_gap = parser.receive_gap  # type: ignore[attr-defined]
    receive_eof = parser.receive_eof  # type: ignore[attr-defined]
    for tag, payload in records(data):
        origin = Origin.SERVER if tag & TAG_SERVER else Origin.CLIENT
        if tag & TAG_GAP:
            _raise_internal(receive_gap(origin, int.from_bytes(payload, "big")))
        elif tag & TAG_EOF:
            _raise_internal(receive_eof(origin))
        else:
            _raise_internal(receive_data(origin, payload))
    _raise_internal(receive_eof(Origin.CLIENT) + receive_eof(Origin.SERVER))


def one_http1(data: bytes) -> None:
    from hopwatch.protocols import Http1Parser

    _drive(Http1Parser(), data)


def one_http2(data: bytes) -> None:
    from hopwatch.protocols import Http2Parser

    _drive(Http2Parser(), data)


def one_conn(data: bytes) -> None:
    from hopwatch.protocols import ConnectionParser, Origin

    parser = ConnectionParser()
    _drive(parser, data)
    parser.skip_hint(Origin.CLIENT)  # reading state must not fail either
    parser.skip_hint(Origin.SERVER)


def one_header(data: bytes) -> None:
    from hopwatch.propagation import check_header, check_message

    if not data:
        return
    name = HEADER_NAMES[data[0] % len(HEADER_NAMES)]
    value = data[1:].decode("latin-1")
    check_header(name, value)
    lines = [(name, v) for v in value.split("\n")]
    check_message(lines, header_block_bytes=len(data))


# -- pipeline ------------------------------------------------------------------------------
# An input is a configuration byte (`pipeline_config`), then a list of operations: one tag
# byte, a 2-byte big-endian number N, and for the data operations N bytes. Tag bits 0-1 pick
# the connection: process 0 or 1 (bit 1), fd 5 or 6 (bit 0); bits 2-4 the operation; bit 5
# the direction of a data or loss operation (1: received); bit 6 makes a data operation TLS
# plaintext; bit 7 makes it lose bytes after its data (the copy cap: 16 * (N % 256) + 1).
# The exit operation is an exec instead when N is odd.
OP_DATA, OP_OPEN_CLIENT, OP_OPEN_SERVER, OP_CLOSE, OP_EXIT, OP_LOST, OP_TIME, OP_UNKNOWN = range(8)
TAG_RECV, TAG_TLS, TAG_MISSED = 0x20, 0x40, 0x80
PIPE_TGID = 4_100_000  # no such process: identities come from the events
PIPE_TIME_OPS = 64  # time operations per input: each runs the periodic work


#: Configuration byte bits: the parts of the configuration that change what the pipeline
#: and the hop analysis do with the same traffic.
PIPELINE_CONFIG_PARTS = (
    '[egress]\nallow = ["127.0.0.0/8"]\n',  # the peers (10.0.0.9) are third parties
    "[limits]\nbaggage_bytes = 64\nbaggage_members = 2\ntracestate_members = 2\n"
    "tracestate_bytes = 64\nheader_block_bytes = 256\n",
    '[processes]\nexclude = ["p1"]\n',
    "[capture]\nexclude_ports = [1025, 1026]\n",  # the peers' ports are 1024 + N
    "[sensitive]\nenabled = false\n",
)
_PIPELINE_CONFIGS: dict[int, object] = {}


def pipeline_config(byte: int) -> Any:
    """The `Config` a configuration byte stands for (parsed once per byte)."""
    from hopwatch.config import parse_config

    bits = byte & ((1 << len(PIPELINE_CONFIG_PARTS)) - 1)
    config = _PIPELINE_CONFIGS.get(bits)
    if config is None:
        text = "".join(part for k, part in enumerate(PIPELINE_CONFIG_PARTS) if bits >> k & 1)
        config = _PIPELINE_CONFIGS[bits] = parse_config(text)
    return config


def pipeline_ops(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(tag, operation, N, payload) of a pipeline input."""
    i = 0
    while i + 3 <= len(data):
        tag = data[i]
        (n,) = struct.unpack(">H", data[i + 1 : i + 3])
        i += 3
        op = (tag >> 2) & 7
        payload = b""
        if op == OP_DATA:
            payload = data[i : i + n]
            i += n
        yield tag, op, n, payload


def encode_ops(ops: list[tuple[int, bytes | int]]) -> bytes:
    """(tag, payload or N) operations -> one pipeline input (long payloads split)."""
    out = bytearray()
    for tag, arg in ops:
        if isinstance(arg, int):
            out += bytes([tag]) + struct.pack(">H", arg)
            continue
        for k in range(0, max(len(arg), 1), 0xFFFF):
            part = arg[k : k + 0xFFFF]
            out += bytes([tag]) + struct.pack(">H", len(part)) + part
    return bytes(out)


def _pipeline_seed(chunks: list[tuple[bool, bytes]], config: int = 0) -> bytes:
    """A capture's exchange seen from both ends, and relayed by the server's process: process
    0 is the client (fd 5); process 1 accepts it (fd 5) and makes each request again to an
    upstream (fd 6), whose answer it forwards, then runs exec."""
    data = OP_DATA << 2
    ops: list[tuple[int, bytes | int]] = [
        (0 | OP_OPEN_CLIENT << 2, 0),
        (2 | OP_OPEN_SERVER << 2, 0),
        (3 | OP_OPEN_CLIENT << 2, 0),
    ]
    for is_server, payload in chunks:
        if is_server:
            ops += [
                (3 | data | TAG_RECV, payload),
                (2 | data, payload),
                (0 | data | TAG_RECV, payload),
            ]
        else:
            ops += [(0 | data, payload), (2 | data | TAG_RECV, payload), (3 | data, payload)]
        ops.append((OP_TIME << 2, 5))
    # The relay ends by exec (its connections end without a close), then exits.
    ops += [(0 | OP_CLOSE << 2, 0), (3 | OP_EXIT << 2, 1), (3 | OP_EXIT << 2, 0)]
    return bytes([config]) + encode_ops(ops)


class _Kernel:
    """The capture's side of the pipeline's control: what it was asked to skip or ignore,
    applied to the data that follows, as capture.c does."""

    def __init__(self) -> None:
        self.skip: dict[tuple[int, int, object, bool], int] = {}
        self.ignored: set[tuple[int, int]] = set()

    def ignore(self, tgid: int, fd: int, *, as_of_ns: int) -> None:
        self.ignored.add((tgid, fd))

    def adopt(self, tgid: int, fd: int, role: str) -> bool:
        return True

    def set_skip_until(
        self,
        tgid: int,
        fd: int,
        direction: object,
        offset: int,
        *,
        tls: bool = False,
        as_of_ns: int,
    ) -> bool:
        self.skip[(tgid, fd, direction, tls)] = offset
        return True

    def forget(self, tgid: int, fd: int, *, as_of_ns: int = 0) -> None:
        self.ignored.discard((tgid, fd))
        for key in [k for k in self.skip if k[:2] == (tgid, fd)]:
            del self.skip[key]


def one_pipeline(data: bytes) -> Any:
    """Returns the run's `Metrics` (for the harness's own tests)."""
    from hopwatch.capture._types import (
        ConnClosed,
        ConnOpened,
        DataChunk,
        Direction,
        ProcessExecuted,
        ProcessExited,
        SockAddr,
        UnknownFd,
    )
    from hopwatch.conntrack import ConnectionTable
    from hopwatch.hops import HopAnalyzer
    from hopwatch.metrics import Metrics
    from hopwatch.pipeline import Pipeline

    if not data:
        return Metrics()
    config, metrics, kernel = pipeline_config(data[0]), Metrics(), _Kernel()
    hops = HopAnalyzer(config, metrics)
    failed: list[BaseException] = []

    def observe(obs: Any) -> None:
        # The pipeline catches (and logs) an observer's exception so that capture goes on:
        # here it is a crash all the same (that message's hop analysis was lost).
        try:
            hops(obs)
        except Exception as exc:
            failed.append(exc)

    pipe = Pipeline(
        config,
        metrics,
        ConnectionTable(),
        control=kernel,
        observers=(observe,),
    )
    offsets: dict[tuple[int, int, Direction, bool], int] = {}
    now = 10**12
    time_ops = 0

    def feed(ev: object) -> None:
        pipe.handle(ev)  # type: ignore[arg-type]
        if not isinstance(ev, DataChunk):
            hops.handle_event(ev)  # type: ignore[arg-type]

    def forget(tgid: int, fd: int) -> None:
        kernel.forget(tgid, fd)
        for key in [k for k in offsets if k[:2] == (tgid, fd)]:
            del offsets[key]

    for tag, op, n, payload in pipeline_ops(data[1:]):
        tgid, fd = PIPE_TGID + (tag >> 1 & 1), 5 + (tag & 1)
        comm = f"p{tag >> 1 & 1}"
        direction = Direction.RECV if tag & TAG_RECV else Direction.SEND
        tls = bool(tag & TAG_TLS)
        now += 1000
        if op == OP_DATA:
            if (tgid, fd) in kernel.ignored:
                continue
            key = (tgid, fd, direction, tls)
            offset = offsets.get(key, 0)
            missed = 16 * (n % 256) + 1 if tag & TAG_MISSED else 0
            skipped = min(len(payload), max(kernel.skip.get(key, 0) - offset, 0))
            total = len(payload) + missed
            offsets[key] = offset + total
            feed(
                DataChunk(
                    tgid,
                    tgid,
                    fd,
                    direction,
                    now,
                    total,
                    payload[skipped:],
                    skipped,
                    tls,
                    comm,
                    offset,
                )
            )
        elif op in (OP_OPEN_CLIENT, OP_OPEN_SERVER):
            forget(tgid, fd)
            role = "client" if op == OP_OPEN_CLIENT else "server"
            peer = SockAddr(2, "10.0.0.9", 1024 + n)
            listen_fd = 3 if role == "server" else -1  # asked of /proc: no such process
            feed(ConnOpened(tgid, tgid, fd, role, peer, now, comm, listen_fd))
        elif op == OP_CLOSE:
            forget(tgid, fd)
            feed(ConnClosed(tgid, fd, now))
        elif op == OP_EXIT:
            for f in (5, 6):
                forget(tgid, f)
            feed(ProcessExecuted(tgid, now) if n & 1 else ProcessExited(tgid, now))
        elif op == OP_LOST:  # records dropped: the next chunk starts further on
            key = (tgid, fd, direction, tls)
            offsets[key] = offsets.get(key, 0) + n
        elif op == OP_TIME and time_ops < PIPE_TIME_OPS:
            time_ops += 1
            now += n * 10**6  # N milliseconds
            pipe.rest_idle(now - 10**9)
            pipe.conns.evict_idle(now, 60 * 10**9)
        elif op == OP_UNKNOWN:
            feed(UnknownFd(tgid, tgid, fd, direction, ("client", "server", "")[n % 3], now, comm))
    if failed:
        raise failed[0]
    internal = [k for k in metrics.parse_errors._children if k[-1].endswith("internal_error")]
    if internal:
        raise InternalError(f"the pipeline's parsers reported {internal}")
    return metrics


ONE = {
    "http1": one_http1,
    "http2": one_http2,
    "conn": one_conn,
    "header": one_header,
    "pipeline": one_pipeline,
}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "seed":
        print(json.dumps(seed(Path(argv[2]))))
        return 0
    if len(argv) >= 4 and argv[1] == "run" and argv[2] in ONE:
        import atheris  # type: ignore[import-not-found]

        target = argv[2]
        with atheris.instrument_imports():
            import hopwatch.conntrack
            import hopwatch.hops
            import hopwatch.pipeline
            import hopwatch.propagation
            import hopwatch.protocols  # noqa: F401  (instrumented for coverage)
        atheris.Setup([argv[0], *argv[4:], argv[3]], ONE[target])
        atheris.Fuzz()
        return 0
    print(__doc__, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
