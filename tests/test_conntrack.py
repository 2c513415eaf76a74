"""hopwatch.conntrack: the (tgid, fd) connection table, on a fake /proc and on the live one."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hopwatch import conntrack
from hopwatch.capture._types import ConnOpened, SockAddr
from hopwatch.conntrack import Connection, ConnectionTable
from hopwatch.procfs import ProcessInfo, ProcFS
from tests.test_procfs import fixture, make_proc

V4, V6 = socket.AF_INET, socket.AF_INET6
S = 1_000_000_000
PEER = SockAddr(V4, "127.0.0.1", 58639)  # fixture pid 7's fd 4 is connected to it


def opened(
    tgid: int,
    fd: int,
    *,
    role: str = "client",
    peer: SockAddr | None = PEER,
    ts: int = 1,
    comm: str = "",
) -> ConnOpened:
    return ConnOpened(tgid=tgid, tid=tgid, fd=fd, role=role, peer=peer, ts_ns=ts, comm=comm)


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """pid 7 (a systemd service) with the fixture tables and a few fds; pid 8 a plain process."""
    make_proc(
        tmp_path,
        7,
        comm="nginx",
        cgroup="0::/system.slice/nginx.service\n",
        tcp=fixture("tcp"),
        tcp6=fixture("tcp6"),
        fds={
            3: "socket:[106]",  # listener :2024
            4: "socket:[14712]",  # client 127.0.0.1:43984 -> :58639
            5: "socket:[14713]",  # accepted on :58639 (v4-mapped in tcp6): server
            6: "socket:[55555]",  # no TCP table has it: unix or UDP
            7: "/var/log/nginx/access.log",
            8: "pipe:[99]",
            9: "socket:[20001]",  # 192.168.1.2:54321 -> 10.1.1.10:443, CLOSE_WAIT
        },
    )
    make_proc(tmp_path, 8, comm="worker", tcp=fixture("tcp"), tcp6=fixture("tcp6"))
    return tmp_path


def table(root: Path, **kw: object) -> ConnectionTable:
    pf = ProcFS(root=str(root), min_reread_s=0, reread_cost_factor=0)
    return ConnectionTable(pf, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# events


def test_open_get_close(fake: Path):
    t = table(fake)
    conn = t.open(opened(7, 4, ts=100))
    assert t.get(7, 4) is conn and (7, 4) in t and len(t) == 1
    assert conn.role == "client" and conn.origin == "opened"
    assert conn.process == ProcessInfo(7, "nginx", "nginx.service")
    assert conn.process.label == "nginx.service"
    # Nothing read from /proc for the socket until data arrives (idle connections are free).
    assert conn.inode == 0 and conn.local is None and not conn.resolved
    assert (conn.created_ns, conn.last_seen_ns) == (100, 100)
    assert t.close(7, 4) is conn
    assert t.get(7, 4) is None and len(t) == 0
    assert t.close(7, 4) is None
    assert t.counters()["opened"] == 1 and t.counters()["closed"] == 1


def test_first_data_resolves_local_address(fake: Path):
    t = table(fake)
    conn = t.open(opened(7, 4))
    assert t.get_or_adopt(7, 4, 5) is conn
    assert conn.resolved and conn.local == SockAddr(V4, "127.0.0.1", 43984)
    assert conn.last_seen_ns == 5
    # a server connection whose accept() event had no peer: the table gives both ends
    srv = t.open(opened(7, 5, role="server", peer=None))
    assert t.resolve(srv)
    assert srv.local == SockAddr(V4, "127.0.0.1", 58639)
    assert srv.peer == SockAddr(V4, "127.0.0.1", 43984)
    assert t.counters()["resolve_failed"] == 0


def test_lazy_local_address_is_resolved_when_asked(fake: Path):
    """``eager_local=False`` (the daemon): data does not look the local address up (only a
    finding's audit line needs it); a connection opened without a peer still is at once."""
    t = table(fake, eager_local=False)
    conn = t.open(opened(7, 4))
    assert t.get_or_adopt(7, 4, 5) is conn
    assert not conn.resolved and conn.local is None and t.procfs.table_reads == 0
    assert t.resolve(conn) and conn.local == SockAddr(V4, "127.0.0.1", 43984)
    srv = t.open(opened(7, 5, role="server", peer=None))
    assert t.get_or_adopt(7, 5, 6) is srv
    assert srv.resolved and srv.peer == SockAddr(V4, "127.0.0.1", 43984)


def test_resolution_failures_are_counted_and_kept(fake: Path):
    t = table(fake)
    # the event's peer disagrees with what the socket now says: the fd was reused meanwhile
    wrong = t.open(opened(7, 4, peer=SockAddr(V4, "127.0.0.1", 1)))
    assert not t.resolve(wrong) and wrong.local is None
    gone = t.open(opened(7, 30))  # no such fd any more
    assert not t.resolve(gone)
    vanished = t.open(opened(999, 4, comm="curl"))  # the process is already gone
    assert vanished.process == ProcessInfo(999, "curl")
    assert not t.resolve(vanished)
    assert t.counters()["resolve_failed"] == 3
    assert not t.resolve(wrong)  # kept: no second attempt, no second count
    assert t.counters()["resolve_failed"] == 3


def test_v4_mapped_peer_is_spelled_as_v4(fake: Path):
    t = table(fake)
    conn = t.open(opened(7, 5, role="server", peer=SockAddr(V6, "::ffff:127.0.0.1", 43984)))
    assert conn.peer == SockAddr(V4, "127.0.0.1", 43984)
    assert t.resolve(conn)  # and matches the table's (v4-mapped) row
    assert conn.local == SockAddr(V4, "127.0.0.1", 58639)


def test_budgeted_resolution_is_deferred_then_retried(tmp_path: Path):
    now = [0.0]
    d = make_proc(tmp_path, 7, tcp=fixture("tcp"), tcp6="header\n", fds={4: "socket:[14715]"})
    pf = ProcFS(root=str(tmp_path), min_reread_s=1.0, reread_cost_factor=0, clock=lambda: now[0])
    t = ConnectionTable(pf)
    assert pf.tcp_socket(7, 106) is not None  # a table read at t=0
    (d / "net" / "tcp6").write_text(fixture("tcp6"))  # the socket appears after that read
    conn = t.open(opened(7, 4, peer=SockAddr(V6, "::1", 59803)))
    assert t.get_or_adopt(7, 4, 10) is conn
    assert not conn.resolved and t.counters()["resolve_deferred"] == 1
    now[0] = 1.5
    t.get_or_adopt(7, 4, 20)
    assert conn.resolved and conn.local == SockAddr(V6, "::1", 35950)
    assert pf.table_reads == 2


def test_fd_reuse_replaces(fake: Path):
    drops: list[tuple[Connection, str]] = []
    t = table(fake, on_drop=lambda c, why: drops.append((c, why)))
    first = t.open(opened(7, 4, ts=1))
    first.state = "parser-1"
    second = t.open(opened(7, 4, role="server", peer=SockAddr(V4, "10.0.0.9", 80), ts=2))
    assert second is not first and t.get(7, 4) is second and len(t) == 1
    assert second.state is None and second.role == "server"
    assert drops == [(first, "replaced")]
    assert t.counters()["replaced"] == 1 and t.counters()["opened"] == 2


def test_process_exit_removes_only_that_process(fake: Path):
    t = table(fake)
    mine = [t.open(opened(7, fd)) for fd in (4, 5, 9)]
    other = t.open(opened(8, 4))
    t.get_or_adopt(7, 7, 1)  # a negative entry for pid 7
    assert t.negative_cached == 1
    assert t.process_exited(7) == mine
    assert t.get(7, 4) is None and t.get(8, 4) is other and len(t) == 1
    assert t.negative_cached == 0
    assert t.process_exited(7) == []
    assert t.counters()["exited"] == 3


def test_process_exit_drops_cached_identity(fake: Path):
    t = table(fake)
    t.open(opened(7, 4))
    (fake / "7" / "comm").write_text("reused\n")
    t.process_exited(7)
    assert t.open(opened(7, 4)).process.comm == "reused"  # pid reuse sees the new process


def test_lru_bound_evicts_least_recently_used(fake: Path):
    drops: list[tuple[Connection, str]] = []
    t = table(fake, max_entries=3, on_drop=lambda c, why: drops.append((c, why)))
    conns = [t.open(opened(8, fd, ts=fd)) for fd in (10, 11, 12)]
    assert t.get_or_adopt(8, 10, 50) is conns[0]  # touched: now the most recent
    t.open(opened(8, 13, ts=60))
    t.open(opened(8, 14, ts=61))
    assert [c.fd for c in t] == [10, 13, 14]  # least recently used first
    assert [(c.fd, why) for c, why in drops] == [(11, "evicted"), (12, "evicted")]
    assert t.counters()["evicted"] == 2 and len(t) == 3
    assert [c.fd for c in t.process_exited(8)] == [10, 13, 14]  # the per-process index agrees
    assert len(t) == 0


def test_evict_idle(fake: Path):
    drops: list[str] = []
    t = table(fake, on_drop=lambda c, why: drops.append(why))
    a = t.open(opened(8, 10, ts=1 * S))
    b = t.open(opened(8, 11, ts=2 * S))
    c = t.open(opened(8, 12, ts=3 * S))
    t.get_or_adopt(8, 10, 9 * S)  # a is busy again
    assert t.evict_idle(now_ns=10 * S, idle_ns=7 * S) == [b, c]
    assert list(t) == [a] and drops == ["idle", "idle"]
    assert t.counters()["idle_evicted"] == 2
    assert t.evict_idle(now_ns=10 * S, idle_ns=7 * S) == []


# ---------------------------------------------------------------------------------------------
# adoption of fds never seen opened


def test_adopt_inet_sockets_with_role_guess(fake: Path):
    t = table(fake)
    cli = t.get_or_adopt(7, 4, 100)
    srv = t.get_or_adopt(7, 5, 101)
    far = t.get_or_adopt(7, 9, 102)
    assert cli is not None and srv is not None and far is not None
    assert (cli.role, cli.origin, cli.resolved) == ("client", "adopted", True)
    assert cli.local == SockAddr(V4, "127.0.0.1", 43984)
    assert cli.peer == SockAddr(V4, "127.0.0.1", 58639)
    assert srv.role == "server" and srv.local == SockAddr(V4, "127.0.0.1", 58639)
    assert far.role == "client" and far.peer == SockAddr(V4, "10.1.1.10", 443)
    assert cli.process.label == "nginx.service" and cli.created_ns == 100
    assert t.get_or_adopt(7, 4, 200) is cli and cli.last_seen_ns == 200
    assert t.counters()["adopted"] == 3


@pytest.mark.parametrize(
    "fd",
    [
        pytest.param(3, id="listener"),
        pytest.param(6, id="non-tcp-socket"),
        pytest.param(7, id="file"),
        pytest.param(8, id="pipe"),
        pytest.param(40, id="no-such-fd"),
    ],
)
def test_adopt_refuses_and_remembers(fake: Path, fd: int, monkeypatch: pytest.MonkeyPatch):
    t = table(fake, negative_ttl_ns=10 * S)
    calls: list[int] = []
    real = t.procfs.resolve_fd
    monkeypatch.setattr(
        t.procfs, "resolve_fd", lambda p, f, r=None: calls.append(f) or real(p, f, r)
    )
    for ts in range(1, 1001):  # a process writing to a file in a loop
        assert t.get_or_adopt(7, fd, ts) is None
    assert calls == [fd], "one /proc look, then the negative cache answers"
    assert t.counters()["not_inet"] == 1 and t.negative_cached == 1
    assert t.get_or_adopt(7, fd, 11 * S) is None  # expired: looked at again
    assert calls == [fd, fd]
    assert t.evict_idle(now_ns=30 * S, idle_ns=S) == [] and t.negative_cached == 0


def test_open_and_close_clear_the_negative_entry(fake: Path):
    t = table(fake)
    assert t.get_or_adopt(7, 8, 1) is None  # a pipe on fd 8
    assert t.negative_cached == 1
    conn = t.open(opened(7, 8, ts=2))  # fd 8 now a connected socket
    assert t.negative_cached == 0 and t.get_or_adopt(7, 8, 3) is conn
    t.close(7, 8)
    assert t.get_or_adopt(7, 7, 4) is None
    t.close(7, 7)
    assert t.negative_cached == 0


def test_negative_cache_is_bounded(fake: Path):
    t = table(fake, max_negative=5)
    for fd in range(100, 120):
        t.get_or_adopt(8, fd, 1)
    assert t.negative_cached <= 5


def test_scan_existing_fake(fake: Path):
    t = table(fake)
    t.open(opened(7, 4))
    found = t.scan_existing(pids=[7, 8, 999])
    assert [(c.fd, c.role, c.origin) for c in found] == [
        (5, "server", "scanned"),
        (9, "client", "scanned"),
    ]
    assert t.counters()["scanned"] == 2 and len(t) == 3
    assert t.scan_existing(pids=[7]) == []  # already tracked: left alone


# ---------------------------------------------------------------------------------------------
# the live /proc


def test_live_own_connections(tmp_path: Path):
    t = ConnectionTable(ProcFS(min_reread_s=0, reread_cost_factor=0))
    pid = os.getpid()
    lis = socket.socket()
    lis.bind(("127.0.0.1", 0))
    lis.listen()
    port = lis.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    srv, _ = lis.accept()
    us_a, us_b = socket.socketpair()
    r, w = os.pipe()
    f = open(tmp_path / "x", "wb")
    try:
        # connect() seen: the table resolves the local end on the first data
        conn = t.open(opened(pid, cli.fileno(), peer=SockAddr(V4, "127.0.0.1", port), ts=1))
        assert t.get_or_adopt(pid, cli.fileno(), 2) is conn
        assert conn.local == SockAddr(V4, "127.0.0.1", cli.getsockname()[1])
        assert conn.inode == os.fstat(cli.fileno()).st_ino
        # accept() never seen: adopted from /proc as a server
        got = t.get_or_adopt(pid, srv.fileno(), 3)
        assert got is not None and got.role == "server" and got.origin == "adopted"
        assert got.local == SockAddr(V4, "127.0.0.1", port)
        assert got.peer == SockAddr(V4, "127.0.0.1", cli.getsockname()[1])
        assert got.process.comm == Path("/proc/self/comm").read_text().strip()
        for fd in (lis.fileno(), us_a.fileno(), r, w, f.fileno()):
            assert t.get_or_adopt(pid, fd, 4) is None
        assert t.counters()["not_inet"] == 5 and len(t) == 2
        # fd reuse: close the client, a new socket gets the same number
        fd = cli.fileno()
        cli.close()
        again = socket.create_connection(("127.0.0.1", port))
        srv2, _ = lis.accept()
        assert again.fileno() == fd
        t.close(pid, fd)  # the close event
        new = t.open(opened(pid, fd, peer=SockAddr(V4, "127.0.0.1", port), ts=5))
        t.get_or_adopt(pid, fd, 6)
        assert new.local == SockAddr(V4, "127.0.0.1", again.getsockname()[1])
        assert new.local != conn.local
        again.close()
        srv2.close()
    finally:
        for s in (lis, srv, us_a, us_b, cli):
            s.close()
        os.close(r)
        os.close(w)
        f.close()


CHILD = r"""
import socket, sys
lis = socket.socket(); lis.bind(("127.0.0.1", 0)); lis.listen()
cli = socket.create_connection(lis.getsockname())
srv, _ = lis.accept()
l6 = socket.socket(socket.AF_INET6); l6.bind(("::1", 0)); l6.listen()
c6 = socket.create_connection(l6.getsockname()[:2])
s6, _ = l6.accept()
u1, u2 = socket.socketpair()
f = open(sys.argv[1], "w")
print(lis.getsockname()[1], cli.fileno(), srv.fileno(), cli.getsockname()[1],
      l6.getsockname()[1], c6.fileno(), s6.fileno(), c6.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    exe = tmp_path / f"t_ct_{uuid.uuid4().hex[:6]}"
    exe.symlink_to(os.path.realpath(sys.executable))
    proc = subprocess.Popen(
        [str(exe), "-c", CHILD, str(tmp_path / "out.txt")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    nums = [int(x) for x in proc.stdout.readline().split()]
    assert len(nums) == 8, "child did not start"
    try:
        yield proc, nums
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_live_scan_existing_child_then_exit(child):
    proc, (port, cfd, sfd, cport, port6, cfd6, sfd6, cport6) = child
    t = ConnectionTable(ProcFS())
    found = {c.fd: c for c in t.scan_existing(pids=[proc.pid])}
    assert sorted(found) == sorted([cfd, sfd, cfd6, sfd6])  # no listener, unix socket, file
    lo4, lo6 = "127.0.0.1", "::1"
    expect = {
        cfd: ("client", SockAddr(V4, lo4, cport), SockAddr(V4, lo4, port)),
        sfd: ("server", SockAddr(V4, lo4, port), SockAddr(V4, lo4, cport)),
        cfd6: ("client", SockAddr(V6, lo6, cport6), SockAddr(V6, lo6, port6)),
        sfd6: ("server", SockAddr(V6, lo6, port6), SockAddr(V6, lo6, cport6)),
    }
    assert {fd: (c.role, c.local, c.peer) for fd, c in found.items()} == expect
    assert {c.process.comm for c in found.values()} == {Path(proc.args[0]).name}
    assert all(c.origin == "scanned" and c.tgid == proc.pid for c in found.values())
    # the whole-node scan finds them too, and never the daemon's own sockets
    own = socket.socket()
    own.bind(("127.0.0.1", 0))
    own.listen()
    mine = socket.create_connection(own.getsockname())
    try:
        t2 = ConnectionTable(ProcFS())
        everything = t2.scan_existing()
        assert {c.fd for c in everything if c.tgid == proc.pid} == set(expect)
        assert all(c.tgid != os.getpid() for c in everything)
    finally:
        mine.close()
        own.close()
    proc.kill()
    proc.wait()
    removed = t.process_exited(proc.pid)
    assert sorted(c.fd for c in removed) == sorted(expect)
    assert len(t) == 0 and t.counters()["exited"] == 4
    assert t.get_or_adopt(proc.pid, cfd, 1) is None  # gone: no exception, remembered
    assert t.counters()["not_inet"] == 1


def test_a_socket_closed_before_its_data_is_read_reads_no_table():
    """The reader lags (a storm): by the time the first data of a connection is read, the
    process closed it. Asking the socket says so; no namespace table is read for it (one
    read holds ~100 MiB on a node with 200k sockets)."""
    pf = ProcFS()
    t = ConnectionTable(pf)
    lis = socket.socket()
    lis.bind(("127.0.0.1", 0))
    lis.listen()
    cli = socket.create_connection(lis.getsockname())
    srv, _ = lis.accept()
    pid, fd = os.getpid(), cli.fileno()
    peer = SockAddr(V4, "127.0.0.1", lis.getsockname()[1])
    try:
        t.open_quiet(opened(pid, fd, peer=peer))
        srv.close()
        cli.close()  # the fd number is free (or reused) before the data is read
        reads = pf.table_reads
        conn = t.get_or_adopt(pid, fd, 2)
        assert conn is not None and conn.local is None and conn.resolved
        assert pf.table_reads == reads
        assert t.counters()["resolve_failed"] == 1
    finally:
        lis.close()


# ---------------------------------------------------------------------------------------------
# memory


def _services_table(root: Path) -> ConnectionTable:
    """500 systemd services, their identities cached (shared by all their entries)."""
    for pid in range(1000, 1500):
        make_proc(root, pid, comm=f"svc{pid}", cgroup=f"0::/system.slice/svc{pid}.service\n")
    t = ConnectionTable(ProcFS(root=str(root)), max_entries=200_000)
    for pid in range(1000, 1500):
        t.procfs.process(pid)
    return t


def _allocated(fill: Callable[[], None]) -> int:
    """Bytes ``fill`` leaves allocated (tracemalloc, after a collection)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_memory_per_idle_entry(tmp_path: Path):
    """100,000 connections of 500 processes: the table's own cost per entry."""
    t = _services_table(tmp_path)

    def fill() -> None:
        for i in range(100_000):
            # each peer a distinct SockAddr (and host string) that the entry keeps alive
            host = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            t.open(opened(1000 + i % 500, 10 + i // 500, peer=SockAddr(V4, host, 443), ts=i))

    used = _allocated(fill)
    per_entry = used / len(t)
    print(f"connection table: {per_entry:.0f} bytes per entry ({used} for {len(t)})")
    assert len(t) == 100_000
    assert per_entry < 600  # 100,000 entries well under 60 MB of the daemon's 200 MB budget


def test_memory_per_quiet_entry(tmp_path: Path):
    """The same 100,000 connections opened quiet (the daemon's path): a packed int each."""
    t = _services_table(tmp_path)
    events = [
        opened(
            1000 + i % 500,
            10 + i // 500,
            peer=SockAddr(V4, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 443),
            ts=10**18 + i,
        )
        for i in range(100_000)
    ]

    def fill() -> None:
        for ev in events:
            t.open_quiet(ev)

    used = _allocated(fill)
    per_entry = used / len(t)
    print(f"quiet connections: {per_entry:.0f} bytes per entry ({used} for {len(t)})")
    assert len(t) == 100_000
    assert per_entry < 160


# ---------------------------------------------------------------------------------------------
# quiet connections (opened, no data yet)


@pytest.fixture(params=[False, True], ids=["int", "tuple"])
def packing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both packings of a quiet connection: one int (CPython) and two (PyPy)."""
    monkeypatch.setattr(conntrack, "PYPY", request.param)
    return bool(request.param)


@pytest.mark.parametrize(
    "peer",
    [
        pytest.param(PEER, id="v4"),
        pytest.param(SockAddr(V6, "2001:db8::7", 8443), id="v6"),
        pytest.param(SockAddr(V6, "::ffff:10.0.0.9", 80), id="v4-mapped"),
        pytest.param(None, id="no-peer"),
    ],
)
def test_quiet_connection_wakes_on_first_data(fake: Path, peer: SockAddr | None, packing: bool):
    t = table(fake)
    t.open_quiet(opened(7, 4, role="server", peer=peer, ts=10**18 + 5))
    assert len(t) == 1 and (7, 4) in t and (7, 5) not in t
    assert type(t._quiet[7][4]) is (tuple if packing else int)
    conn = t.get_or_adopt(7, 4, 10**18 + 9)
    assert conn is not None and conn.origin == "opened" and conn.role == "server"
    want = None if peer is None else SockAddr(
        V4 if peer.host.startswith("::ffff:") else peer.family,
        peer.host.removeprefix("::ffff:"),
        peer.port,
    )
    if peer is None or peer == PEER:
        assert conn.peer == PEER  # resolved from the socket's table row
    else:
        assert conn.peer == want
    assert conn.created_ns == 10**18 + 5 and conn.last_seen_ns == 10**18 + 9
    assert conn.process == ProcessInfo(7, "nginx", "nginx.service")
    assert t.get(7, 4) is conn and len(t) == 1  # one connection, now a Connection
    assert t.counters()["opened"] == 1


def test_quiet_connection_close_exit_and_name_of_a_gone_process(fake: Path, packing: bool):
    t = table(fake)
    t.open_quiet(opened(7, 4))
    assert t.close(7, 4) is None  # nothing to finish: it never carried data
    assert len(t) == 0 and t.counters()["closed"] == 1 and t.close(7, 4) is None
    assert t.counters()["closed"] == 1
    for fd in (4, 5):
        t.open_quiet(opened(7, fd))
    assert t.process_exited(7) == [] and len(t) == 0 and t.counters()["exited"] == 2
    # A process /proc does not know (gone already): the name from its open event.
    t.open_quiet(opened(4_000_001, 3, comm="short-lived"))
    conn = t.get(4_000_001, 3)
    assert conn is not None and conn.process.comm == "short-lived"


def test_open_on_a_quiet_fd_replaces_it(fake: Path, packing: bool):
    t = table(fake)
    t.open_quiet(opened(7, 4, ts=1))
    conn = t.open(opened(7, 4, role="server", ts=2))
    assert len(t) == 1 and t.get(7, 4) is conn and t.counters()["replaced"] == 1


def test_quiet_connections_are_bounded_and_expire(fake: Path, packing: bool):
    drops: list[tuple[int, str]] = []
    t = table(fake, max_entries=3, on_drop=lambda c, why: drops.append((c.fd, why)))
    t.open(opened(8, 10, ts=1))  # a Connection, least recently used
    for fd, ts in ((11, 2), (12, 3), (13, 4)):
        t.open_quiet(opened(8, fd, ts=ts))
    assert len(t) == 3 and drops == [(11, "evicted")]  # the quiet ones go first
    assert [c.fd for c in t] == [12, 13, 10]  # quiet ones first in a snapshot
    assert [c.fd for c in t.evict_idle(now_ns=10, idle_ns=7)] == [10, 12]
    assert len(t) == 1 and (8, 13) in t
    assert drops[1:] == [(10, "idle"), (12, "idle")]


def test_exec_ends_the_connections_whose_fd_lost_their_socket(fake: Path, packing: bool):
    """After an exec a connection stays only while its fd holds its socket (the new image
    inherited it). Those exec closed (the fd is gone, or holds a file, a pipe or another
    socket now) end, quiet ones too; the survivors carry the new image's name."""
    t = table(fake)
    kept = t.open(opened(7, 4))  # fd 4 still holds the socket connected to PEER
    t.open(opened(7, 5, role="server", peer=SockAddr(V4, "10.9.9.9", 1)))  # another socket
    t.open(opened(7, 7))  # a file now
    t.open(opened(7, 30))  # no fd 30 any more
    t.open_quiet(opened(7, 8))  # a pipe now
    far = t.get_or_adopt(7, 9, 2)  # adopted: its socket's inode is known
    other = t.open(opened(8, 4))
    assert t.get_or_adopt(7, 6, 3) is None and t.negative_cached == 1
    (fake / "7" / "comm").write_text("image2\n")
    out = t.process_executed(7)
    assert [c.fd for c in out] == [8, 5, 7, 30]  # the quiet one, then by fd
    assert far is not None and list(t) == [kept, far, other]
    assert kept.process.comm == far.process.comm == "image2"
    assert other.process.comm == "worker" and t.negative_cached == 0
    assert t.counters()["exec_closed"] == 4
    # The adopted one is judged by its inode: another connected socket on fd 9 is not it.
    (fake / "7" / "fd" / "9").unlink()
    (fake / "7" / "fd" / "9").symlink_to("socket:[14713]")
    assert t.process_executed(7) == [far] and list(t) == [kept, other]
    # A quiet survivor: what wakes is named after the new image.
    t.close(7, 4)
    t.open_quiet(opened(7, 4))
    (fake / "7" / "comm").write_text("image3\n")
    assert t.process_executed(7) == [] and t.counters()["exec_closed"] == 5
    woken = t.get(7, 4)
    assert woken is not None and woken.process.comm == "image3"


def test_an_open_names_the_process_as_its_main_thread_was_called(fake: Path, packing: bool):
    """/proc is read after the event: the process may have run exec since. The main
    thread's name in the event is the process's name at the time; another thread's is its
    own, not the process's."""
    t = table(fake)
    leader = ConnOpened(7, 7, 4, "client", PEER, 1, comm="old-image")
    assert t.open(leader).process == ProcessInfo(7, "old-image", "nginx.service")
    assert t.open(ConnOpened(7, 70, 5, "client", PEER, 1, comm="worker-3")).process.comm == "nginx"
    t.open_quiet(ConnOpened(7, 7, 9, "client", PEER, 1, comm="old-image"))
    quiet = t.get(7, 9)
    assert quiet is not None and quiet.process.comm == "old-image"
