"""HTTP/1.1 client that closes its connected socket with close_range() (os.closerange),
not close(), then opens a file on the same fd number and writes and reads request-shaped
bytes through it: they are the file's, not the connection's.
Usage: close_range_client.py PORT FILE

One request on PORT, then the file. Prints the fd."""

import os
import socket
import sys

from _h1 import exchange, request

REQUEST = request("cr")

port, path = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
exchange(s, "cr")
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
