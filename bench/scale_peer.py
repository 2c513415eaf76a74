"""Peers for bench/scale_bench.py (system Python, no dependencies).

scale_peer.py server PORT [PORT...]        accept everything; answer each request head
                                           with an empty 200; print "listening"
scale_peer.py client PORT N ACTIVE_EVERY   open N connections, send one request on every
                                           ACTIVE_EVERY-th, read the answers, print
                                           "connected N", then stay idle until stdin closes
"""

from __future__ import annotations

import resource
import selectors
import socket
import sys

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
TRACEPARENT = b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"


def raise_nofile(n: int) -> None:
    """Up to the hard limit (raising it needs CAP_SYS_RESOURCE, absent in containers)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = n if hard == resource.RLIM_INFINITY else min(n, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def serve(ports: list[int]) -> None:
    raise_nofile(1 << 20)
    sel = selectors.EpollSelector()
    listeners = set()
    for port in ports:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(4096)
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ)
        listeners.add(ls)
    print("listening", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock in listeners:
                for _ in range(256):
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
            elif b"\r\n\r\n" in data:
                sock.send(RESPONSE * data.count(b"\r\n\r\n"))


def client(port: int, n: int, active_every: int) -> None:
    raise_nofile(n + 1000)
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
        if active_every and i % active_every == 0:
            s.sendall(b"GET /scale HTTP/1.1\r\nHost: scale\r\n" + TRACEPARENT + b"\r\n")
            got = b""
            while not got.endswith(b"\r\n\r\n"):
                got += s.recv(4096)
    print(f"connected {len(socks)}", flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()


def main() -> None:
    if sys.argv[1] == "server":
        serve([int(p) for p in sys.argv[2:]])
    else:
        client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))


if __name__ == "__main__":
    main()
