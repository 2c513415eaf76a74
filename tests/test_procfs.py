"""hopwatch.procfs: golden parsing on a fake /proc tree, then the live /proc.

The fixture tables in tests/fixtures/procfs/ are real /proc/net/tcp{,6} rows recorded on the
build machine (IPv4, IPv6 ::1, v4-mapped, TIME_WAIT rows with inode 0), plus two rows made
by hand for public-looking IPv4/IPv6 addresses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hopwatch.capture._types import SockAddr
from hopwatch.procfs import (
    Lookup,
    ProcessInfo,
    ProcFS,
    TcpState,
    decode_addr,
    normalize_addr,
    parse_cgroup,
    parse_tcp_table,
)

FIXTURES = Path(__file__).parent / "fixtures" / "procfs"
V4, V6 = socket.AF_INET, socket.AF_INET6
ID = "3f4e5a6b7c8d9e0f" * 4  # a 64-hex container id
NETNS = "net:[4026531840]"


# ---------------------------------------------------------------------------------------------
# fake /proc


def make_proc(
    root: Path,
    pid: int,
    *,
    comm: str = "proc",
    cgroup: str | None = "0::/\n",
    tcp: str | None = None,
    tcp6: str | None = None,
    fds: dict[int, str] | None = None,
    netns: str | None = NETNS,
) -> Path:
    """One process directory in a fake procfs: comm, cgroup, net/tcp{,6}, fd/ and ns/net."""
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "net").mkdir()
    (d / "ns").mkdir()
    (d / "comm").write_text(comm + "\n")
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)
    if tcp is not None:
        (d / "net" / "tcp").write_text(tcp)
    if tcp6 is not None:
        (d / "net" / "tcp6").write_text(tcp6)
    for fd, target in (fds or {}).items():
        os.symlink(target, d / "fd" / str(fd))  # dangling targets are fine for readlink
    if netns is not None:
        os.symlink(netns, d / "ns" / "net")
    return d


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ---------------------------------------------------------------------------------------------
# cgroup -> unit / container (golden)

CGROUP_CASES = [
    pytest.param("0::/system.slice/nginx.service\n", "nginx.service", None, None, id="v2-service"),
    pytest.param(
        "0::/system.slice/system-getty.slice/getty@tty1.service\n",
        "getty@tty1.service",
        None,
        None,
        id="v2-templated-service",
    ),
    pytest.param(
        "0::/system.slice/containerd.service/payload\n",
        "containerd.service",
        None,
        None,
        id="v2-delegated-subcgroup",
    ),
    pytest.param(
        "0::/user.slice/user-1000.slice/session-3.scope\n", None, None, None, id="session"
    ),
    pytest.param(
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/syncthing.service\n",
        "syncthing.service",
        None,
        None,
        id="user-unit",
    ),
    pytest.param(
        "0::/user.slice/user-1000.slice/user@1000.service/init.scope\n",
        None,
        None,
        None,
        id="user-manager-init-scope",
    ),
    pytest.param(
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-42.scope\n",
        None,
        None,
        None,
        id="user-app-scope",
    ),
    pytest.param("0::/init.scope\n", None, None, None, id="pid1"),
    pytest.param("0::/\n", None, None, None, id="root"),
    pytest.param(f"0::/system.slice/docker-{ID}.scope\n", None, "docker", ID, id="docker-systemd"),
    pytest.param(
        f"12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}\n1:name=systemd:/docker/{ID}\n",
        None,
        "docker",
        ID,
        id="docker-cgroupfs-v1",
    ),
    pytest.param(
        "0::/kubepods.slice/kubepods-burstable.slice/"
        "kubepods-burstable-pod1d2c3b4a_5e6f_7081_92a3_b4c5d6e7f809.slice/"
        f"cri-containerd-{ID}.scope\n",
        None,
        "containerd",
        ID,
        id="k8s-containerd",
    ),
    pytest.param(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice/"
        f"crio-{ID}.scope\n",
        None,
        "cri-o",
        ID,
        id="k8s-crio",
    ),
    pytest.param(
        f"0::/kubepods.slice/kubepods-podabc.slice/crio-conmon-{ID}.scope\n",
        None,
        None,
        None,
        id="crio-conmon-is-not-the-container",
    ),
    pytest.param(
        f"11:pids:/kubepods/burstable/pod1d2c3b4a-5e6f-7081-92a3-b4c5d6e7f809/{ID}\n",
        None,
        "kubepods",
        ID,
        id="k8s-cgroupfs-v1",
    ),
    pytest.param(f"0::/machine.slice/libpod-{ID}.scope\n", None, "podman", ID, id="podman"),
    pytest.param(
        "0::/user.slice/user-1000.slice/user@1000.service/user.slice/"
        f"libpod-{ID}.scope/container\n",
        None,
        "podman",
        ID,
        id="podman-rootless-cgroupns",
    ),
    pytest.param(
        f"0::/machine.slice/libpod-conmon-{ID}.scope\n", None, None, None, id="podman-conmon"
    ),
    pytest.param(
        "12:name=systemd:/system.slice/haproxy.service\n4:memory:/system.slice/haproxy.service\n"
        "0::/\n",
        "haproxy.service",
        None,
        None,
        id="hybrid-v1-systemd",
    ),
    pytest.param(
        "9:name=systemd:/\n4:memory:/process_api/e4dc9220c47142cae3937062248fe45d\n0::/\n",
        None,
        None,
        None,
        id="hybrid-unknown-32hex-is-not-a-container",
    ),
    pytest.param("garbage\n\n0::\n", None, None, None, id="garbage"),
]


@pytest.mark.parametrize(("text", "unit", "runtime", "container"), CGROUP_CASES)
def test_parse_cgroup(text: str, unit: str | None, runtime: str | None, container: str | None):
    assert parse_cgroup(text) == (unit, runtime, container)


@pytest.mark.parametrize(
    ("info", "label"),
    [
        pytest.param(ProcessInfo(1, "nginx", "nginx.service"), "nginx.service", id="unit"),
        pytest.param(ProcessInfo(1, "bash"), "bash", id="comm"),
        pytest.param(
            ProcessInfo(1, "python3", "containerd.service", ID, "containerd"),
            "containerd/3f4e5a6b7c8d",
            id="container-beats-unit",
        ),
    ],
)
def test_label(info: ProcessInfo, label: str):
    assert info.label == label


def test_process_from_fake_tree(tmp_path: Path):
    make_proc(tmp_path, 42, comm="nginx", cgroup="0::/system.slice/nginx.service\n")
    make_proc(tmp_path, 43, comm="app", cgroup=f"0::/system.slice/docker-{ID}.scope\n")
    make_proc(tmp_path, 44, comm="nocg", cgroup=None)
    pf = ProcFS(root=str(tmp_path))
    assert pf.process(42) == ProcessInfo(42, "nginx", "nginx.service", None, None)
    assert pf.process(43) == ProcessInfo(43, "app", None, ID, "docker")
    assert pf.process(43).label == "docker/3f4e5a6b7c8d"  # type: ignore[union-attr]
    assert pf.process(44) == ProcessInfo(44, "nocg")
    assert pf.process(999) is None
    assert pf.pids() == [42, 43, 44]


def test_process_cache_lru_age_and_forget(tmp_path: Path):
    now = [0.0]
    d = make_proc(tmp_path, 1, comm="one")
    make_proc(tmp_path, 2, comm="two")
    make_proc(tmp_path, 3, comm="three")
    pf = ProcFS(
        root=str(tmp_path), process_cache_size=2, process_max_age_s=10, clock=lambda: now[0]
    )
    assert pf.process(1).comm == "one"  # type: ignore[union-attr]
    (d / "comm").write_text("renamed\n")  # exec: the cache hides it until the entry ages out
    assert pf.process(1).comm == "one"  # type: ignore[union-attr]
    now[0] = 11.0
    assert pf.process(1).comm == "renamed"  # type: ignore[union-attr]
    pf.process(2)
    pf.process(3)  # bound 2: pid 1 is the least recently used and goes
    (d / "comm").write_text("again\n")
    assert pf.process(1).comm == "again"  # type: ignore[union-attr]
    # exit: forget() drops the entry, and a vanished pid is None, not an exception
    pf.forget(1)
    (d / "comm").unlink()
    assert pf.process(1) is None


# ---------------------------------------------------------------------------------------------
# /proc/net/tcp{,6} (golden)


@pytest.mark.parametrize(
    ("hex_addr", "family", "host"),
    [
        pytest.param("0100007F", V4, "127.0.0.1", id="v4-loopback"),
        pytest.param("00000000", V4, "0.0.0.0", id="v4-any"),
        pytest.param("0201A8C0", V4, "192.168.1.2", id="v4-private"),
        pytest.param("00000000000000000000000001000000", V6, "::1", id="v6-loopback"),
        pytest.param("00000000000000000000000000000000", V6, "::", id="v6-any"),
        pytest.param("0000000000000000FFFF00000100007F", V4, "127.0.0.1", id="v4-mapped"),
        pytest.param("0000000000000000FFFF00000A01010A", V4, "10.1.1.10", id="v4-mapped-10"),
        pytest.param("B80D0120000000000000000001000000", V6, "2001:db8::1", id="v6-doc"),
        pytest.param(
            "B80D01200000A3852E8A000034737003", V6, "2001:db8:85a3::8a2e:370:7334", id="v6-full"
        ),
        pytest.param("000080FE00000000FF000002FE030004", V6, "fe80::200:ff:400:3fe", id="v6-ll"),
    ],
)
def test_decode_addr(hex_addr: str, family: int, host: str):
    assert sys.byteorder == "little"  # the fixtures are little-endian recordings
    assert decode_addr(hex_addr) == (family, host)


@pytest.mark.parametrize(
    ("name", "inode", "local", "remote", "state"),
    [
        pytest.param("tcp", 106, ("0.0.0.0", 2024), ("0.0.0.0", 0), TcpState.LISTEN, id="v4-lis"),
        pytest.param(
            "tcp", 14712, ("127.0.0.1", 43984), ("127.0.0.1", 58639), TcpState.ESTABLISHED, id="v4"
        ),
        pytest.param(
            "tcp",
            20001,
            ("192.168.1.2", 54321),
            ("10.1.1.10", 443),
            TcpState.CLOSE_WAIT,
            id="v4-close-wait",
        ),
        pytest.param("tcp6", 14711, ("::", 58639), ("::", 0), TcpState.LISTEN, id="v6-any-lis"),
        pytest.param("tcp6", 14714, ("::1", 59803), ("::", 0), TcpState.LISTEN, id="v6-lo-lis"),
        pytest.param(
            "tcp6",
            14713,
            ("127.0.0.1", 58639),
            ("127.0.0.1", 43984),
            TcpState.ESTABLISHED,
            id="v4-mapped-accepted",
        ),
        pytest.param(
            "tcp6", 14715, ("::1", 35950), ("::1", 59803), TcpState.ESTABLISHED, id="v6-client"
        ),
        pytest.param(
            "tcp6",
            14800,
            ("2001:db8::1", 50000),
            ("2001:db8:85a3::8a2e:370:7334", 443),
            TcpState.SYN_SENT,
            id="v6-global",
        ),
    ],
)
def test_parse_tcp_table(
    name: str,
    inode: int,
    local: tuple[str, int],
    remote: tuple[str, int],
    state: TcpState,
):
    table = parse_tcp_table(fixture(name))
    sock = table[inode]
    assert (sock.local.host, sock.local.port) == local
    assert (sock.remote.host, sock.remote.port) == remote
    assert sock.state is state
    assert sock.inode == inode


def test_parse_tcp_table_skips_time_wait_and_garbage():
    assert sorted(parse_tcp_table(fixture("tcp"))) == [106, 14712, 20001]  # 2 TIME_WAIT rows out
    assert 0 not in parse_tcp_table(fixture("tcp6"))
    assert parse_tcp_table("header\n   0: ZZZ:0 x 01 a b c d e f\n\n") == {}
    assert parse_tcp_table("") == {}


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        pytest.param(
            SockAddr(V6, "::ffff:10.0.0.1", 80), SockAddr(V4, "10.0.0.1", 80), id="mapped"
        ),
        pytest.param(SockAddr(V6, "::1", 80), SockAddr(V6, "::1", 80), id="v6"),
        pytest.param(SockAddr(V4, "1.2.3.4", 1), SockAddr(V4, "1.2.3.4", 1), id="v4"),
        pytest.param(
            SockAddr(V6, "64:ff9b::1.2.3.4", 1), SockAddr(V6, "64:ff9b::1.2.3.4", 1), id="nat64"
        ),
        pytest.param(None, None, id="none"),
    ],
)
def test_normalize_addr(addr: SockAddr | None, expected: SockAddr | None):
    assert normalize_addr(addr) == expected


def test_fake_tree_fd_resolution_and_roles(tmp_path: Path):
    make_proc(
        tmp_path,
        7,
        tcp=fixture("tcp"),
        tcp6=fixture("tcp6"),
        fds={
            3: "socket:[106]",  # v4 listener on 2024
            4: "socket:[14712]",  # client 43984 -> 58639
            5: "socket:[14713]",  # accepted on 58639 (a listening port): server
            6: "socket:[55555]",  # a socket in no TCP table (unix, UDP...)
            7: "/var/log/app.log",
            8: "pipe:[123]",
            9: "anon_inode:[eventpoll]",
        },
    )
    pf = ProcFS(root=str(tmp_path))
    assert pf.listen_ports(7) == frozenset({2024, 58639, 59803})
    lis = pf.resolve_fd(7, 3)
    assert lis is not None and lis.socket.state is TcpState.LISTEN and not lis.socket.connected
    client = pf.resolve_fd(7, 4)
    assert client is not None and client.role == "client"
    assert client.socket.local == SockAddr(V4, "127.0.0.1", 43984)
    assert client.socket.remote == SockAddr(V4, "127.0.0.1", 58639)
    server = pf.resolve_fd(7, 5)
    assert server is not None and server.role == "server"
    assert server.socket.remote == SockAddr(V4, "127.0.0.1", 43984)
    for fd in (6, 7, 8, 9, 10):
        assert pf.resolve_fd(7, fd) is None, fd
    assert pf.resolve_fd(8, 3) is None  # no such process
    assert pf.socket_inode(7, 4) == 14712
    assert pf.socket_inode(7, 8) is None
    assert [(s.fd, s.role, s.socket.inode) for s in pf.tcp_fds(7)] == [
        (3, "server", 106),
        (4, "client", 14712),
        (5, "server", 14713),
    ]
    assert pf.tcp_fds(8) == []


def test_table_cache_rereads_on_miss(tmp_path: Path):
    now = [0.0]
    d = make_proc(tmp_path, 7, tcp=fixture("tcp"), tcp6="header\n", fds={4: "socket:[14712]"})
    pf = ProcFS(root=str(tmp_path), table_max_age_s=5, clock=lambda: now[0])
    assert pf.tcp_socket(7, 14712) is not None
    assert pf.table_reads == 1
    assert pf.tcp_socket(7, 106) is not None  # cached hit
    assert pf.table_reads == 1
    # a socket created after the read: the miss re-reads and finds it
    (d / "net" / "tcp6").write_text(fixture("tcp6"))
    assert pf.tcp_socket(7, 14715) is not None
    assert pf.table_reads == 2
    assert pf.tcp_socket(7, 424242) is None  # a real miss: one re-read, then None
    assert pf.table_reads == 3
    # processes sharing a namespace share the cached table
    make_proc(tmp_path, 8, tcp=fixture("tcp"), tcp6=fixture("tcp6"))
    assert pf.tcp_socket(8, 14712) is not None
    assert pf.table_reads == 3
    now[0] = 6.0
    pf.expire_tables()
    assert pf.tcp_socket(8, 14712) is not None
    assert pf.table_reads == 4


# ---------------------------------------------------------------------------------------------
# the live /proc


@pytest.fixture
def pf() -> ProcFS:
    return ProcFS()


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client, accepted server end) on loopback."""
    lis = socket.socket(family, socket.SOCK_STREAM)
    lis.bind((host, 0))
    lis.listen()
    cli = socket.create_connection((host, lis.getsockname()[1]))
    srv, _ = lis.accept()
    return lis, cli, srv


def test_resolve_fd_with_a_known_role_reads_no_table(pf: ProcFS):
    lis, cli, srv = _pair(V4, "127.0.0.1")
    pid = os.getpid()
    try:
        port = lis.getsockname()[1]
        reads = pf.table_reads
        s = pf.resolve_fd(pid, srv.fileno(), "server")
        c = pf.resolve_fd(pid, cli.fileno(), "client")
        assert pf.table_reads == reads  # asked of the sockets themselves
        assert s is not None and c is not None
        assert (s.role, c.role) == ("server", "client")
        assert s.socket.local == SockAddr(V4, "127.0.0.1", port)
        assert s.socket.remote == SockAddr(V4, "127.0.0.1", cli.getsockname()[1])
        assert c.socket.inode == os.fstat(cli.fileno()).st_ino
        # A listener has no peer: the hint does not make it a connection, and the socket
        # says so (no table read either).
        assert pf.resolve_fd(pid, lis.fileno(), "server") is None
        assert pf.table_reads == reads
    finally:
        for x in (lis, cli, srv):
            x.close()


@pytest.mark.parametrize(
    ("family", "host"),
    [pytest.param(V4, "127.0.0.1", id="v4"), pytest.param(V6, "::1", id="v6")],
)
def test_live_own_sockets(pf: ProcFS, family: int, host: str):
    lis, cli, srv = _pair(family, host)
    pid = os.getpid()
    try:
        port = lis.getsockname()[1]
        got_lis = pf.resolve_fd(pid, lis.fileno())
        assert got_lis is not None
        assert got_lis.socket.state is TcpState.LISTEN
        assert got_lis.socket.local == SockAddr(family, host, port)
        c = pf.resolve_fd(pid, cli.fileno())
        s = pf.resolve_fd(pid, srv.fileno())
        assert c is not None and s is not None
        assert c.role == "client" and s.role == "server"
        assert c.socket.state is TcpState.ESTABLISHED
        assert c.socket.local == SockAddr(family, host, cli.getsockname()[1])
        assert c.socket.remote == SockAddr(family, host, port)
        assert s.socket.local == SockAddr(family, host, port)
        assert s.socket.remote == SockAddr(family, host, cli.getsockname()[1])
        assert c.socket.inode == os.fstat(cli.fileno()).st_ino
        assert pf.socket_protocol(pid, cli.fileno()) == ("TCP" if family == V4 else "TCPv6")
        fds = {x.fd: x.role for x in pf.tcp_fds(pid)}
        assert fds[cli.fileno()] == "client" and fds[srv.fileno()] == "server"
    finally:
        for s_ in (lis, cli, srv):
            s_.close()


def test_live_v4_mapped_on_dual_stack_listener(pf: ProcFS):
    lis = socket.socket(V6)
    lis.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lis.bind(("::", 0))
    lis.listen()
    port = lis.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    srv, peer = lis.accept()
    try:
        assert peer[0] == "::ffff:127.0.0.1"
        s = pf.resolve_fd(os.getpid(), srv.fileno())
        assert s is not None and s.role == "server"
        assert s.socket.local == SockAddr(V4, "127.0.0.1", port)
        assert s.socket.remote == SockAddr(V4, "127.0.0.1", cli.getsockname()[1])
        assert pf.socket_protocol(os.getpid(), srv.fileno()) == "TCPv6"
    finally:
        for s_ in (lis, cli, srv):
            s_.close()


def test_live_non_inet_fds_are_none(pf: ProcFS, tmp_path: Path):
    pid = os.getpid()
    a, b = socket.socketpair()
    us = socket.socket(socket.AF_UNIX)
    us.bind(str(tmp_path / "u.sock"))
    udp = socket.socket(V4, socket.SOCK_DGRAM)
    udp.connect(("127.0.0.1", 9))
    r, w = os.pipe()
    f = open(tmp_path / "file.txt", "w")
    unconnected = socket.socket(V4)
    try:
        for fd in (a.fileno(), us.fileno(), udp.fileno(), r, w, f.fileno()):
            assert pf.resolve_fd(pid, fd) is None, os.readlink(f"/proc/self/fd/{fd}")
        assert pf.socket_inode(pid, r) is None
        assert pf.socket_inode(pid, f.fileno()) is None
        assert pf.socket_inode(pid, a.fileno()) == os.fstat(a.fileno()).st_ino
        # a TCP socket before bind/connect() is in no table yet
        assert pf.resolve_fd(pid, unconnected.fileno()) is None
        closed_fd = udp.fileno()
        udp.close()
        assert pf.resolve_fd(pid, closed_fd) is None
        assert pf.resolve_fd(pid, 10_000_000) is None
    finally:
        for s_ in (a, b, us, udp, unconnected):
            s_.close()
        os.close(r)
        os.close(w)
        f.close()


CHILD = r"""
import socket, sys
lis = socket.socket(); lis.bind(("127.0.0.1", 0)); lis.listen()
port = lis.getsockname()[1]
cli = socket.create_connection(("127.0.0.1", port))
srv, _ = lis.accept()
out = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(lis.fileno(), cli.fileno(), srv.fileno(), out.fileno(), port,
      cli.getsockname()[1], out.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[int], socket.socket]]:
    """A child process run through a symlink (unique comm) holding a listener, a connection
    to itself (both ends), and a client connection to a listener of the test process."""
    name = f"t_pf_{uuid.uuid4().hex[:6]}"
    exe = tmp_path / name
    exe.symlink_to(os.path.realpath(sys.executable))
    outer = socket.socket()
    outer.bind(("127.0.0.1", 0))
    outer.listen()
    proc = subprocess.Popen(
        [str(exe), "-c", CHILD, str(outer.getsockname()[1])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    nums = [int(x) for x in proc.stdout.readline().split()]
    assert len(nums) == 7, "child did not start"
    try:
        yield proc, nums, outer
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        outer.close()


def test_live_child_process(pf: ProcFS, child):
    proc, (lfd, cfd, sfd, ofd, port, cport, oport), outer = child
    info = pf.process(proc.pid)
    assert info is not None and info.comm == Path(proc.args[0]).name and info.pid == proc.pid
    assert info.label == info.unit or info.label == info.comm
    lis = pf.resolve_fd(proc.pid, lfd)
    assert lis is not None and lis.socket.local == SockAddr(V4, "127.0.0.1", port)
    c = pf.resolve_fd(proc.pid, cfd)
    s = pf.resolve_fd(proc.pid, sfd)
    o = pf.resolve_fd(proc.pid, ofd)
    assert c is not None and s is not None and o is not None
    assert (c.role, c.socket.local.port, c.socket.remote.port) == ("client", cport, port)
    assert (s.role, s.socket.local.port, s.socket.remote.port) == ("server", port, cport)
    assert (o.role, o.socket.remote.port, o.socket.local.port) == (
        "client",
        outer.getsockname()[1],
        oport,
    )
    by_fd = {x.fd: (x.role, x.socket.state) for x in pf.tcp_fds(proc.pid)}
    assert by_fd == {
        lfd: ("server", TcpState.LISTEN),
        cfd: ("client", TcpState.ESTABLISHED),
        sfd: ("server", TcpState.ESTABLISHED),
        ofd: ("client", TcpState.ESTABLISHED),
    }
    # the child exits: everything about it resolves to None, never raises
    proc.kill()
    proc.wait()
    pf.forget(proc.pid)
    assert pf.process(proc.pid) is None
    assert pf.resolve_fd(proc.pid, cfd) is None
    assert pf.tcp_fds(proc.pid) == []


def test_live_own_identity(pf: ProcFS):
    info = pf.process(os.getpid())
    assert info is not None
    assert info.comm == Path("/proc/self/comm").read_text().rstrip("\n")
    unit, runtime, container = parse_cgroup(Path("/proc/self/cgroup").read_text())
    assert (info.unit, info.runtime, info.container) == (unit, runtime, container)


# ---------------------------------------------------------------------------------------------
# network namespaces (root)

NS_CHILD = r"""
import socket, sys
lis = socket.socket(); lis.bind(("127.0.0.1", 0)); lis.listen()
cli = socket.create_connection(lis.getsockname())
srv, _ = lis.accept()
print(lis.fileno(), cli.fileno(), srv.fileno(), lis.getsockname()[1], cli.getsockname()[1],
      flush=True)
sys.stdin.read()
"""


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> str:
    name = f"hwpf{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    request.addfinalizer(lambda: subprocess.run(["ip", "netns", "del", name], check=False))
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    return name


@pytest.mark.kernel
def test_netns_listener_resolves_through_its_own_namespace(pf: ProcFS, netns: str):
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", NS_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lfd, cfd, sfd, port, cport = (int(x) for x in proc.stdout.readline().split())
        assert pf.netns(proc.pid) != pf.netns(os.getpid())  # `ip netns exec` exec()s in place
        c = pf.resolve_fd(proc.pid, cfd)
        s = pf.resolve_fd(proc.pid, sfd)
        lis = pf.resolve_fd(proc.pid, lfd)
        assert c is not None and s is not None and lis is not None
        assert (c.role, c.socket.local.port, c.socket.remote.port) == ("client", cport, port)
        assert (s.role, s.socket.local.port, s.socket.remote.port) == ("server", port, cport)
        assert lis.socket.state is TcpState.LISTEN
        assert pf.listen_ports(proc.pid) == frozenset({port})
        # the host namespace's table does not hold these sockets
        host = pf.read_tcp_table(os.getpid())
        assert host is not None and c.socket.inode not in host and s.socket.inode not in host
    finally:
        proc.kill()
        proc.wait()
    assert pf.process(proc.pid) is None
    assert pf.resolve_fd(proc.pid, cfd) is None


@pytest.mark.parametrize(
    ("family", "host"),
    [pytest.param(V4, "127.0.0.1", id="v4"), pytest.param(V6, "::1", id="v6")],
)
def test_socket_ends_asked_of_the_socket(pf: ProcFS, family: int, host: str, tmp_path: Path):
    lis, cli, srv = _pair(family, host)
    pid = os.getpid()
    r, w = os.pipe()
    try:
        port = lis.getsockname()[1]
        ino = os.fstat(cli.fileno()).st_ino
        assert pf.socket_ends(pid, cli.fileno(), ino) == (
            SockAddr(family, host, cli.getsockname()[1]),
            SockAddr(family, host, port),
        )
        srv_ino = os.fstat(srv.fileno()).st_ino
        assert pf.socket_ends(pid, srv.fileno(), srv_ino) == (
            SockAddr(family, host, port),
            SockAddr(family, host, cli.getsockname()[1]),
        )
        # Known not to be that connection (no table can say more): another socket now on
        # the fd (inode differs), a listener, a pipe, no such fd. The copies are closed.
        fds = len(os.listdir("/proc/self/fd"))
        assert pf.socket_ends(pid, cli.fileno(), srv_ino) is Lookup.GONE
        assert pf.socket_ends(pid, lis.fileno(), os.fstat(lis.fileno()).st_ino) is Lookup.GONE
        assert pf.socket_ends(pid, r, os.fstat(r).st_ino) is Lookup.GONE
        assert pf.socket_ends(pid, 10_000_000, ino) is Lookup.GONE
        assert len(os.listdir("/proc/self/fd")) == fds
        # no inode to check against: not asked
        assert pf.socket_ends(pid, cli.fileno(), 0) is None
        # a /proc that is not this machine's: never asked
        assert ProcFS(str(tmp_path)).socket_ends(pid, cli.fileno(), ino) is None
    finally:
        for s_ in (lis, cli, srv):
            s_.close()
        os.close(r)
        os.close(w)


def test_socket_ends_of_another_process(pf: ProcFS, child):
    proc, (*_, ofd, _port, _cport, oport), outer = child
    ino = pf.socket_inode(proc.pid, ofd)
    assert ino is not None
    assert pf.socket_ends(proc.pid, ofd, ino) == (
        SockAddr(V4, "127.0.0.1", oport),
        SockAddr(V4, "127.0.0.1", outer.getsockname()[1]),
    )
    proc.kill()
    proc.wait()
    assert pf.socket_ends(proc.pid, ofd, ino) is Lookup.GONE  # never raises
