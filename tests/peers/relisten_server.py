"""HTTP/1.1 server that serves one port, closes its listening socket, then listens on
another (the fd number is reused). Usage: relisten_server.py PORT_A N_A PORT_B N_B

Prints the listening fd once listening on each port; serves N one-request connections
on each (a connection closed before a whole request does not count)."""

import socket
import sys


def serve(port: int, n: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen()
    print(ls.fileno(), flush=True)
    served = 0
    while served < n:
        conn, _ = ls.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                got = conn.recv(65536)
                if not got:
                    break
                buf += got
            else:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                )
                served += 1
    ls.close()


serve(int(sys.argv[1]), int(sys.argv[2]))
serve(int(sys.argv[3]), int(sys.argv[4]))
