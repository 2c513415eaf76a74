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

from _h1 import exchange

FDS = (50, 51, 52)


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
        exchange(s, "exec")
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
    exchange(socket.socket(fileno=51), "exec")
    with socket.create_connection(("127.0.0.1", port)) as s:
        exchange(s, "exec")
        exchange(s, "exec")


if __name__ == "__main__":
    if sys.argv[2] == "-":
        after(int(sys.argv[1]))
    else:
        before(int(sys.argv[1]), sys.argv[2])
