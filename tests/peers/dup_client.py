"""HTTP/1.1 client that replaces a connected socket's fd with dup2 (no close() of it) and
connects the new socket on the same fd to another port. Usage: dup_client.py PORT_A PORT_B

One request on PORT_A, then one on PORT_B. Prints the fd both used."""

import os
import socket
import sys

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def exchange(s: socket.socket) -> None:
    s.sendall(f"GET / HTTP/1.1\r\nHost: dup\r\ntraceparent: {TP}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\nok\n" not in buf:
        got = s.recv(65536)
        if not got:
            raise SystemExit("connection closed before the response")
        buf += got


port_a, port_b = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port_a))
exchange(s)
fresh = socket.socket()
os.dup2(fresh.fileno(), s.fileno())  # the connected socket is closed by dup2, not close()
fresh.close()
s.connect(("127.0.0.1", port_b))
exchange(s)
print(s.fileno(), flush=True)
s.close()
