"""HTTP/1.1 client that runs exec with keep-alive connections open.
Usage: exec_client.py PORT NEW_EXE

Before the exec: one request on each of three connections, on fds 50, 51 and 52, all
close-on-exec but 51. Then exec of NEW_EXE (a Python) on this script. The new image prints
"ready" and waits for a line on stdin; then it puts a file on fds 50 and 52 (dup2, no
close() of them) and reads it through them, sends one more request on the inherited
connection and two on a new keep-alive connection."""

import os
import socket
import sys

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FDS = (50, 51, 52)


def exchange(s: socket.socket) -> None:
    s.sendall(f"GET / HTTP/1.1\r\nHost: exec\r\ntraceparent: {TP}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(65536)
        if not got:
            raise SystemExit("connection closed before the response head")
        buf += got
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += s.recv(65536)


def connect_at(fd: int, port: int, inheritable: bool) -> socket.socket:
    fresh = socket.socket()
    os.dup2(fresh.fileno(), fd, inheritable=inheritable)
    fresh.close()
    s = socket.socket(fileno=fd)
    s.connect(("127.0.0.1", port))
    return s


def before(port: int, new_exe: str) -> None:
    socks = [connect_at(fd, port, inheritable=fd == 51) for fd in FDS]
    for s in socks:
        exchange(s)
    print("before", flush=True)
    os.execv(new_exe, [new_exe, __file__, str(port), "-"])


def after(port: int) -> None:
    print("ready", flush=True)
    sys.stdin.readline()
    for fd in (50, 52):
        with open(__file__, "rb") as f:
            os.dup2(f.fileno(), fd)
        while os.read(fd, 4096):
            pass
        os.close(fd)
    exchange(socket.socket(fileno=51))
    with socket.create_connection(("127.0.0.1", port)) as s:
        exchange(s)
        exchange(s)


if __name__ == "__main__":
    if sys.argv[2] == "-":
        after(int(sys.argv[1]))
    else:
        before(int(sys.argv[1]), sys.argv[2])
