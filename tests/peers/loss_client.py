"""A scripted HTTP/1.1 request writer for the loss and fault tests (system Python).

Commands on stdin, one per line; each answers "ok ..." on stdout when done:
  open HOST PORT K      open K keep-alive connections
  burst N               N requests round-robin over the connections, as fast as possible
  paced N INTERVAL_S    N requests, one every INTERVAL_S seconds
  close                 close the connections
Each request is one send() of the same length: GET /loss/<8 digits> with a traceparent.
"""

from __future__ import annotations

import socket
import sys
import time

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def request(i: int) -> bytes:
    return (
        f"GET /loss/{i:08d} HTTP/1.1\r\nHost: sink\r\ntraceparent: {TRACEPARENT}\r\n\r\n"
    ).encode()


def main() -> None:
    conns: list[socket.socket] = []
    sent = 0
    print(f"ready {len(request(0))}", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "open":
            host, port, k = args[0], int(args[1]), int(args[2])
            for _ in range(k):
                s = socket.create_connection((host, port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns.append(s)
        elif cmd == "burst":
            n = int(args[0])
            for i in range(n):
                conns[i % len(conns)].sendall(request(sent))
                sent += 1
        elif cmd == "paced":
            n, interval = int(args[0]), float(args[1])
            for i in range(n):
                conns[i % len(conns)].sendall(request(sent))
                sent += 1
                time.sleep(interval)
        elif cmd == "close":
            for s in conns:
                s.close()
            conns.clear()
        print(f"ok {sent}", flush=True)


if __name__ == "__main__":
    main()
