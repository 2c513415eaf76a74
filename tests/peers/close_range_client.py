"""HTTP/1.1 client that closes its connected socket with close_range() (os.closerange),
not close(), then opens a file on the same fd number and writes and reads request-shaped
bytes through it: they are the file's, not the connection's.
Usage: close_range_client.py PORT FILE

One request on PORT, then the file. Prints the fd."""

import os
import socket
import sys

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REQUEST = f"GET / HTTP/1.1\r\nHost: cr\r\ntraceparent: {TP}\r\n\r\n".encode()

port, path = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
s.sendall(REQUEST)
buf = b""
while b"\r\n\r\nok\n" not in buf:
    got = s.recv(65536)
    if not got:
        raise SystemExit("connection closed before the response")
    buf += got
fd = s.detach()  # the socket object lets go of the fd: nothing calls close() on it
os.closerange(fd, fd + 1)  # CPython: close_range(fd, fd, 0)
f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
assert f == fd, (f, fd)
for _ in range(3):
    os.write(f, REQUEST)
os.lseek(f, 0, os.SEEK_SET)
assert os.read(f, 1 << 16) == REQUEST * 3
os.write(f, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
print(fd, flush=True)
os.close(f)
