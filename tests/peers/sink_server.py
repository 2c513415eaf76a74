"""A TCP server that accepts and reads everything, never answers (system Python).

sink_server.py PORT   prints "listening" when it accepts
"""

from __future__ import annotations

import selectors
import socket
import sys


def main() -> None:
    port = int(sys.argv[1])
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(1024)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ)
    print("listening", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is lsock:
                conn, _ = lsock.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()


if __name__ == "__main__":
    main()
