"""HTTP/1.1 client that puts a file on a connected socket's fd with dup2 (no close() of the
socket), then writes and reads HTTP-looking bytes through that fd: they are the file's, not
the connection's. Usage: dup_file_client.py PORT FILE [dup2|dup3]

One request on PORT, then the file. Prints the fd."""

import os
import socket
import sys

from _h1 import exchange, request

REQUEST = request("dup")

port, path, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
exchange(s, "dup")
fd = s.fileno()
f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
# os.dup2 calls dup3 for a non-inheritable copy, dup2 otherwise
os.dup2(f, fd, inheritable=(how == "dup2"))
os.close(f)
for _ in range(3):
    os.write(fd, REQUEST)  # a request's bytes, written to the file
os.lseek(fd, 0, os.SEEK_SET)
assert os.read(fd, 1 << 16) == REQUEST * 3
os.write(fd, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
print(fd, flush=True)
os.close(fd)
s.detach()  # the socket object no longer owns fd
